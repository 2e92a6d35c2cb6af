"""`accelerate launch -m mumu_training.bootstrap --input ... --format ... --detector ... --out ...`"""

import argparse
import sys

from mumu_core.cli import COMMANDS
from mumu_core.errors import MumuError

from .cli import add_arguments, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mumu_training.bootstrap", description=COMMANDS["bootstrap"][1])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(run(args) or 0)
    except MumuError as exc:
        print(f"mumu bootstrap: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
