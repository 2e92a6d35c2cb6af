"""`mumu` command line.

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> int`;
only the chosen one is imported, so `mumu --help` is instant and subcommands stay independent.
User errors (`MumuError`) print one clear line and exit with status 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import MumuError

# The one list of commands: name -> (module, one-line help). Commands live in mumu_core/commands/,
# except `bootstrap`, whose module belongs to the training package it drives (mumu_training) so
# the core never imports training code; `python -m mumu_training.bootstrap` reuses its help line.
COMMANDS: dict[str, tuple[str, str]] = {
    "tiny": ("mumu_core.commands.tiny", "write tiny offline components (VLMs, bundle, SDXL, detectors)"),
    "demo": ("mumu_core.commands.demo", "the shipped shapes model composes sample-scene crops: demo.png + demo.json (--random-weights: tiny smoke run)"),
    "encode": ("mumu_core.commands.encode", "prompt + images -> conditioning .safetensors (context, pooled, mask)"),
    "generate": ("mumu_core.commands.generate", "generate an image with diffusers SDXL + a MUMU bundle"),
    "eval": ("mumu_core.commands.eval", "measure a shapes-world model: composition accuracy with 95% intervals"),
    "merge": ("mumu_core.commands.merge", "stream MUMU's UNet LoRA into an SDXL finetune checkpoint"),
    "bootstrap": ("mumu_training.bootstrap.cli", "ground caption phrases in images -> annotation shards"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
    return argparse.ArgumentParser(
        prog="mumu",
        description="MUMU: multimodal (interleaved text + image) prompting for SDXL.",
        epilog=f"commands:\n{lines}\n\nRun `mumu COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _version() -> str:
    from . import __version__

    return f"mumu {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    top.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    top.add_argument("--version", action="version", version=_version())
    if argv and argv[0] in ("--version", "-V"):
        print(_version())
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        top.parse_args(argv[:1])  # prints the usage error and exits 2
    name = argv[0]
    module_name, help_ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(
                f"mumu {name}: its module {module_name} is not installed. Install the project with "
                f"`pip install -e .` from the ComfyUI-MUMU checkout.",
                file=sys.stderr,
            )
            return 2
        raise
    parser = argparse.ArgumentParser(prog=f"mumu {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except MumuError as exc:
        print(f"mumu {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mumu {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
