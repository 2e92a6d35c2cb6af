"""The `mumu bootstrap` command (listed in `mumu_core.cli.COMMANDS`), also run as `accelerate launch -m mumu_training.bootstrap`.

Under accelerate, each process takes the work units `index % num_processes == process_index`
and runs its detector on its own device; the main process writes manifest.json and stats.json.
"""

from __future__ import annotations

import argparse
import json
import sys

from mumu_core.errors import MumuError

from .filters import FilterConfig
from .imageio import DEFAULT_MAX_PIXELS
from .sources import FORMATS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="image folder, .tar / folder of .tar, or .jsonl / .parquet index (or a folder of them)")
    p.add_argument("--format", required=True, choices=FORMATS, help="input layout")
    p.add_argument("--detector", required=True, help="local Grounding DINO or OWLv2 folder (Hugging Face layout)")
    p.add_argument("--out", required=True, help="output folder (shards/, manifest.json, stats.json); rerun to resume")
    p.add_argument("--detector-type", choices=("grounding_dino", "owlv2"), default=None,
                   help="check the folder holds this detector (default: read from its config.json)")
    p.add_argument("--box-threshold", type=float, default=None, help="min box score (default 0.35 Grounding DINO, 0.2 OWLv2)")
    p.add_argument("--text-threshold", type=float, default=0.25, help="min caption-token score (Grounding DINO)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per output shard (webdataset: one shard per tar)")
    f = FilterConfig()
    p.add_argument("--min-box-area", type=float, default=f.min_box_area, help="drop boxes with w*h below this (px^2; paper: 150x150)")
    p.add_argument("--min-box-side", type=float, default=f.min_box_side, help="drop boxes with a side below this (px; 0 = off)")
    p.add_argument("--max-box-fraction", type=float, default=f.max_box_fraction, help="drop boxes over this share of the image area (paper: 0.75)")
    p.add_argument("--nms-iou", type=float, default=f.nms_iou, help="per-phrase NMS IoU")
    p.add_argument("--max-boxes-per-image", type=int, default=f.max_boxes_per_image)
    p.add_argument("--no-heads", action="store_true", help="do not look for head boxes inside person boxes")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are skipped as decompression bombs")
    p.add_argument("--min-image-side", type=int, default=64, help="smaller images are skipped (too_small)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per detector call (faster on GPU; batched images are padded, which changes "
                        "results slightly, so it is part of the run's settings)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: accelerate's device / cuda if available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per process (0 = torch's default; accelerate launch sets 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace, device: str):
    from .run import BootstrapOptions

    for name in ("box_threshold", "text_threshold"):
        v = getattr(args, name)
        if v is not None and not 0.0 <= v <= 1.0:
            raise MumuError(f"--{name.replace('_', '-')} is a score in [0, 1]; got {v}.")
    if args.batch_size < 1:
        raise MumuError(f"--batch-size must be at least 1; got {args.batch_size}.")
    if not 0.0 < args.max_box_fraction <= 1.0:
        raise MumuError(f"--max-box-fraction is a share of the image area in (0, 1]; got {args.max_box_fraction}.")
    filters = FilterConfig(min_box_area=args.min_box_area, min_box_side=args.min_box_side,
                           max_box_fraction=args.max_box_fraction, nms_iou=args.nms_iou,
                           max_boxes_per_image=args.max_boxes_per_image)
    return BootstrapOptions(input=args.input, format=args.format, detector=args.detector, out=args.out,
                            detector_type=args.detector_type, box_threshold=args.box_threshold,
                            text_threshold=args.text_threshold, shard_size=args.shard_size, filters=filters,
                            heads=not args.no_heads, max_image_pixels=args.max_image_pixels,
                            min_image_side=args.min_image_side, batch_size=args.batch_size, device=device, dtype=args.dtype,
                            progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from .run import run_bootstrap

    import os

    import torch

    # PartialState (unlike Accelerator) ignores ACCELERATE_USE_CPU; without cpu=True a CPU-only
    # multi-process launch would see N independent single-process runs.
    use_cpu = (args.device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
               or not torch.cuda.is_available())
    if args.threads < 0:
        raise MumuError(f"--threads must be 0 (default) or a positive count; got {args.threads}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    state = PartialState(cpu=use_cpu)
    device = args.device or ("cpu" if use_cpu else str(state.device))
    opts = options_from_args(args, device)
    summary = run_bootstrap(opts, state.process_index, state.num_processes, wait=state.wait_for_everyone)
    if state.is_main_process:
        if summary.get("complete"):
            print(json.dumps({"out": args.out, **summary["counts"]}), file=sys.stdout)
            return 0
        print(f"bootstrap: {len(summary['missing_units'])} shards missing; rerun the same command to finish.",
              file=sys.stderr)
        return 1
    return 0
