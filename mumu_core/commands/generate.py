"""`mumu generate`: an SDXL image (any local SDXL checkpoint) from an interleaved prompt.

    mumu generate --sdxl models/checkpoints/sd_xl_base_1.0.safetensors \
        --vlm models/mumu/idefics2-8b --bundle models/mumu/mumu.safetensors \
        --prompt "a <image> man and his <image> dog in an <image> animated style" \
        --image man.png --image dog.png --image cartoon.png --out out.png

The paper's settings are the defaults: 50-step DDIM, guidance 6, no negative prompt (the
negative is the empty prompt's encoding). The bundle's UNet LoRA is applied unless --no-unet-lora.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from ..errors import MumuError
from ._common import (add_model_arguments, add_prompt_arguments, build_prompt, refuse_overwriting_inputs, resolve_device,
                      save_png, torch_dtype, weight_storage)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sdxl", required=True, type=Path,
                        help="SDXL checkpoint: a diffusers folder or a single-file .safetensors (any SDXL finetune)")
    parser.add_argument("--sdxl-config", type=Path, default=None,
                        help="diffusers config folder for a single file that is not full-size SDXL (default: bundled SDXL base configs)")
    add_model_arguments(parser)
    add_prompt_arguments(parser)
    g = parser.add_argument_group("sampling")
    g.add_argument("--negative", default="", help="negative interleaved prompt (text only; default: empty = unconditional)")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--cfg", type=float, default=6.0, help="classifier-free guidance scale (paper: 6)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--scheduler", choices=("ddim", "euler"), default="ddim")
    g.add_argument("--lora-strength", type=float, default=1.0, help="strength of the bundle's UNet LoRA")
    g.add_argument("--no-unet-lora", action="store_true", help="do not apply the bundle's UNet LoRA")
    parser.add_argument("--out", required=True, type=Path, help="output PNG")


def run_generation(args: argparse.Namespace) -> dict:
    """Encode, generate, save; returns a summary (shapes, layout, timings) for `demo.json`."""
    from ..bundle import read_bundle_config
    from ..encoder import MumuEncoder
    from ..pipeline import generate, load_sdxl_pipeline, load_unet_lora_into_pipeline
    from ..prompt import InterleavedPrompt

    if args.width % 8 or args.height % 8:
        raise MumuError(f"--width/--height must be multiples of 8; got {args.width}x{args.height}.")
    refuse_overwriting_inputs(args.out, [args.bundle, args.sdxl, *args.image, *args.mask])
    config = read_bundle_config(args.bundle)
    prompt = build_prompt(args, int(config.get("tokens_per_image", 324)))
    negative_prompt = InterleavedPrompt.parse(args.negative)
    device, dtype = resolve_device(args.device), torch_dtype(args.dtype)
    timings = {}

    t = time.perf_counter()
    encoder = MumuEncoder.from_pretrained(args.vlm, args.bundle, dtype=dtype, device=device,
                                         weight_storage=weight_storage(args.dtype))
    timings["load_encoder_s"] = time.perf_counter() - t
    t = time.perf_counter()
    positive, negative = encoder.encode(prompt), encoder.encode(negative_prompt)
    timings["encode_s"] = time.perf_counter() - t
    del encoder  # the VLM and SDXL need not share memory
    gc.collect()

    t = time.perf_counter()
    pipe = load_sdxl_pipeline(args.sdxl, dtype=dtype, device=device, config=args.sdxl_config)
    lora_layers = 0
    if not args.no_unet_lora and config.get("unet_lora"):
        lora_layers = load_unet_lora_into_pipeline(pipe, args.bundle, args.lora_strength)
    timings["load_sdxl_s"] = time.perf_counter() - t
    t = time.perf_counter()
    image = generate(pipe, positive, negative, steps=args.steps, cfg=args.cfg, seed=args.seed,
                     width=args.width, height=args.height, scheduler=args.scheduler)
    timings["generate_s"] = time.perf_counter() - t

    summary = {
        "prompt": args.prompt,
        "negative": args.negative,
        "images": [str(p) for p in args.image],
        "layout": positive.layouts[0],
        "context_shape": list(positive.context.shape),
        "pooled_shape": list(positive.pooled.shape),
        "negative_context_shape": list(negative.context.shape),
        "unet_lora_layers": lora_layers,
        "sampling": {"steps": args.steps, "cfg": args.cfg, "seed": args.seed, "width": args.width,
                     "height": args.height, "scheduler": args.scheduler, "lora_strength": args.lora_strength},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "output": str(args.out),
    }
    save_png(args.out, image, {k: summary[k] for k in ("prompt", "negative", "sampling", "layout")})
    return summary


def run(args: argparse.Namespace) -> int:
    summary = run_generation(args)
    print(f"wrote {summary['output']} (context {summary['context_shape']}, {summary['timings']['generate_s']} s sampling)")
    return 0
