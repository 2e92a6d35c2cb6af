"""`mumu encode`: prompt + images -> conditioning .safetensors (context, pooled, mask).

    mumu encode --vlm models/mumu/idefics2-8b --bundle models/mumu/mumu.safetensors \
        --prompt "a <image> man and his <image> dog" --image man.png --image dog.png --out cond.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import (add_model_arguments, add_prompt_arguments, atomic_write, build_prompt, refuse_overwriting_inputs,
                      resolve_device, torch_dtype, weight_storage)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_prompt_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="output .safetensors (tensors context, pooled, mask)")


def run(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from ..bundle import read_bundle_config
    from ..encoder import MumuEncoder

    refuse_overwriting_inputs(args.out, [args.bundle, *args.image, *args.mask])
    config = read_bundle_config(args.bundle)  # fail fast on a bad bundle, before the VLM loads
    prompt = build_prompt(args, int(config.get("tokens_per_image", 324)))
    encoder = MumuEncoder.from_pretrained(args.vlm, args.bundle, dtype=torch_dtype(args.dtype), device=resolve_device(args.device),
                                         weight_storage=weight_storage(args.dtype))
    cond = encoder.encode(prompt)
    tensors = {"context": cond.context.cpu().contiguous(), "pooled": cond.pooled.cpu().contiguous(),
               "mask": cond.mask.cpu().contiguous()}
    meta = {"prompt": args.prompt, "layout": json.dumps(cond.layouts[0]), "bundle": Path(args.bundle).name}
    atomic_write(args.out, lambda tmp: save_file(tensors, tmp, metadata=meta))
    print(f"wrote {args.out}: context {list(tensors['context'].shape)}, pooled {list(tensors['pooled'].shape)}")
    for entry in cond.layouts[0]:
        print(f"  image {entry['image']}: tokens {entry['start']}..{entry['end']} ({entry['tokens']}, {entry['side']} px)")
    return 0
