"""`mumu tiny --out DIR`: write the tiny offline components (see mumu_core.tiny)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder to write the components into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-detectors", action="store_true", help="skip the tiny Grounding DINO / OWLv2 folders")


def run(args: argparse.Namespace) -> int:
    from ..tiny import write_tiny_components

    paths = write_tiny_components(args.out, seed=args.seed, detectors=not args.no_detectors)
    width = max(len(k) for k in paths)
    for name, path in paths.items():
        print(f"{name:<{width}}  {path}")
    return 0
