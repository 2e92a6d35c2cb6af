"""`mumu eval`: measure a shapes-world MUMU model — does it compose crops from different images?

    mumu eval                                   # the shipped model (mumu_core/assets/shapes_model)
    mumu eval --model runs/shapes/model --n 256 --steps 15 --conditions a,b,b',c,d,e,f,g --out eval_out

For each condition (a same-image, b cross-image, b' unseen combinations, c swapped words,
d text only, e floor from another scene, f weight 0 / masked crops, g CFG 1/3/6) it builds held-out
prompts, generates through the real path (MumuEncoder -> SDXL pipeline + UNet LoRA, DDIM, CFG 3
unless g) and reads every image with the attribute probe: per-object colour accuracy (each object
compared with its own crop), all-objects-right rate, pattern, presence, with Wilson 95 % intervals
and chance levels. Prints the table and, as its last line, one JSON object with every figure;
writes OUT/eval.json and OUT/contact_sheet.png. With --clip / --dino (transformers CLIPModel /
Dinov2Model folders) it adds CLIP-I, CLIP-T and DINO similarities.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import MumuError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="shapes model folder: vlm/, sdxl/, mumu_shapes.safetensors, probe.safetensors "
                             "(default: the shipped mumu_core/assets/shapes_model)")
    parser.add_argument("--n", type=int, default=256, help="prompts per condition (default 256)")
    parser.add_argument("--steps", type=int, default=15, help="DDIM steps (default 15)")
    parser.add_argument("--cfg", type=float, default=3.0, help="guidance scale except for g1/g6 (default 3)")
    parser.add_argument("--conditions", default=None,
                        help="comma list of a,b,b',c,d,e,f,g (or b2,f0,fm,g1,g6; default all)")
    parser.add_argument("--batch", type=int, default=32, help="images sampled together (default 32)")
    parser.add_argument("--scheduler", choices=("ddim", "euler"), default="ddim")
    parser.add_argument("--out", type=Path, default=Path("eval_out"), help="output folder (default eval_out)")
    parser.add_argument("--sheet-rows", type=int, default=3, help="contact-sheet rows per condition (default 3)")
    parser.add_argument("--clip", type=Path, default=None, help="transformers CLIPModel folder: CLIP-I and CLIP-T")
    parser.add_argument("--dino", type=Path, default=None, help="transformers Dinov2Model folder: DINO similarity")
    parser.add_argument("--no-progress", action="store_true")


def _training():
    try:
        from mumu_training.shapes import conditions, evaluate
    except ModuleNotFoundError as exc:
        raise MumuError(f"mumu eval needs the training package (mumu_training; {exc}). Install the project with "
                        f"`pip install -e .` from the ComfyUI-MUMU checkout.") from None
    return conditions, evaluate


def run(args: argparse.Namespace) -> int:
    conditions, evaluate = _training()
    if args.n < 1 or args.steps < 1 or args.batch < 1:
        raise MumuError("--n, --steps and --batch must be at least 1.")
    for flag, path in (("--clip", args.clip), ("--dino", args.dino)):
        if path is not None and not (path / "config.json").is_file():
            raise MumuError(f"{flag} {path} is not a transformers model folder (no config.json).")
    try:
        names = conditions.expand_conditions(args.conditions)
    except ValueError as exc:
        raise MumuError(str(exc)) from None
    model = args.model or evaluate.shipped_model_dir()
    evaluate.model_paths(model)  # a clear error before anything slow
    settings = evaluate.Settings(steps=args.steps, cfg=args.cfg, batch=args.batch, scheduler=args.scheduler)
    result = evaluate.run_eval(model, names, args.n, settings, out=args.out, clip=args.clip, dino=args.dino,
                               sheet_rows=args.sheet_rows, progress=not args.no_progress)
    table = result.pop("table")
    probe = result.get("probe", {}).get("held_out", {})
    print(f"shapes model {result['model']}  (probe held-out accuracy: colour {probe.get('colour', float('nan')):.3f}, "
          f"pattern {probe.get('pattern', float('nan')):.3f})")
    print(f"{args.n} prompts per condition, {args.steps} {args.scheduler.upper()} steps, CFG {args.cfg:g}; "
          f"accuracies in %, Wilson 95% intervals; colour right = the probe finds the object and reads its crop's colour")
    print(table)
    print(f"wrote {result.get('eval_json')} and {result.get('contact_sheet')}")
    print(json.dumps(result))
    return 0
