"""`mumu demo`: the whole inference path on the tiny offline components.

    mumu demo --out demo_out

Writes the tiny components (if absent), encodes the paper's composition prompt with the bundled
sample images, generates with the tiny SDXL and writes `demo.png` and `demo.json` (token layout
per image, tensor shapes, timings). Random tiny weights: the picture is noise; the point is that
every stage runs, offline, through the same code that loads the real models.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import atomic_write

DEMO_PROMPT = "a <image> man and his <image> dog in an <image> animated style"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    parser.add_argument("--tiny", type=Path, default=None, help="tiny components folder (default OUT/tiny; written if absent)")
    parser.add_argument("--tokens-per-image", type=int, default=36, help="patch tokens per image (default 36)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="output width and height in px")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from ..tiny import write_tiny_components
    from .generate import run_generation

    tiny_dir = args.tiny or args.out / "tiny"
    print(f"tiny components: {tiny_dir}")
    paths = write_tiny_components(tiny_dir, detectors=False)
    images = paths["images"]
    gen_args = argparse.Namespace(
        sdxl=paths["sdxl"], sdxl_config=None, vlm=paths["vlm"], bundle=paths["bundle"], dtype="fp32", device="cpu",
        prompt=DEMO_PROMPT, image=[images / "man.png", images / "dog.png", images / "style.png"], mask=[], weight=[],
        tokens_per_image=args.tokens_per_image, negative="", steps=args.steps, cfg=6.0, seed=args.seed,
        width=args.size, height=args.size, scheduler="ddim", lora_strength=1.0, no_unet_lora=False,
        out=args.out / "demo.png",
    )
    summary = run_generation(gen_args)
    summary["tiny_components"] = {k: str(v) for k, v in paths.items()}
    atomic_write(args.out / "demo.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    print(f"wrote {args.out / 'demo.png'} and {args.out / 'demo.json'}")
    for entry in summary["layout"]:
        print(f"  image {entry['image']}: {entry['tokens']} tokens at {entry['start']}..{entry['end']} ({entry['side']} px)")
    print(f"  context {summary['context_shape']}, pooled {summary['pooled_shape']}, timings {summary['timings']}")
    return 0
