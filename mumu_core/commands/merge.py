"""`mumu merge`: stream MUMU's UNet LoRA (or a full UNet difference) into an SDXL finetune checkpoint."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="SDXL finetune: single-file .safetensors (original layout, fp16/bf16/fp32/fp8) or a "
                             "diffusers UNet folder")
    parser.add_argument("--lora", help="MUMU bundle or UNet LoRA .safetensors (kohya, ComfyUI or PEFT keys)")
    parser.add_argument("--add-difference", nargs=2, metavar=("MUMU_UNET", "BASE_UNET"),
                        help="instead of a LoRA: add STRENGTH x (MUMU_UNET - BASE_UNET), for fully trained UNets")
    parser.add_argument("--strength", type=float, default=1.0, help="LoRA strength / difference multiplier (1.0)")
    parser.add_argument("--blocks", default=None,
                        help='per-block strengths multiplying --strength: "input=1,middle=0.5,output=1" (also '
                             'input0..input8, output0..output8) or 19 comma-separated numbers (input 0-8, middle, '
                             'output 0-8)')
    parser.add_argument("--out", required=True, help="output .safetensors (never one of the inputs)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--hash-checkpoint", action="store_true",
                        help="also record the finetune's sha256 in the metadata (computed while streaming; slower on "
                             "busy machines). The LoRA's sha256 is always recorded.")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..errors import MumuError
    from ..merge import merge_checkpoint

    if args.lora and args.add_difference:
        raise MumuError("use either --lora or --add-difference, not both.")
    if not args.lora and not args.add_difference:
        raise MumuError("nothing to merge: pass --lora BUNDLE_OR_LORA.safetensors or --add-difference MUMU BASE.")
    bar = None
    progress = None
    if not args.quiet:
        from tqdm import tqdm

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:  # created on the first write, so validation errors print alone
                bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging",
                           dynamic_ncols=True)
            bar.update(done - bar.n)

    try:
        report = merge_checkpoint(
            args.checkpoint, args.out, lora=args.lora,
            add_difference=tuple(args.add_difference) if args.add_difference else None,
            strength=args.strength, block_weights=args.blocks, overwrite=args.overwrite,
            hash_checkpoint=args.hash_checkpoint, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(report.summary())
    return 0
