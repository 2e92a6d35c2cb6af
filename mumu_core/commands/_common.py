"""Helpers shared by the `mumu` subcommands (encode, generate, demo): argument groups, dtype and device
choice, prompt building from --prompt/--image, refusing to overwrite inputs, PNG writing.

The leading underscore says it is no command itself: `mumu_core.cli` lists the commands.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ..atomic import atomic_write  # noqa: F401  (re-exported for the commands)
from ..errors import MumuError

DTYPES = ("fp32", "fp16", "bf16", "fp8", "int8")  # fp8 / int8: the VLM's linear weights stored in 8 bits, computed in bf16
WEIGHT_STORAGE = {"fp8": "fp8_e4m3fn", "int8": "int8"}


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("prompt")
    g.add_argument("--prompt", required=True, help='interleaved prompt, e.g. "a <image> man and his <image> dog"')
    g.add_argument("--image", action="append", default=[], metavar="PNG",
                   help="image for the next <image> placeholder (repeat, in order)")
    g.add_argument("--mask", action="append", default=[], metavar="PNG|none",
                   help="mask per --image, in the same order (white keeps, black is blacked out); 'none' skips one")
    g.add_argument("--weight", action="append", type=float, default=[], metavar="W",
                   help="weight per --image, in the same order (default 1.0)")
    g.add_argument("--tokens-per-image", type=int, default=None, metavar="N",
                   help="patch tokens per image, a square number (default: the bundle's, 324 in stage 1)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models")
    g.add_argument("--vlm", required=True, type=Path, help="VLM folder in Hugging Face layout (e.g. models/mumu/idefics2-8b)")
    g.add_argument("--bundle", required=True, type=Path, help="MUMU bundle .safetensors")
    g.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="compute dtype (default fp32; bf16 on GPUs). fp8 / int8: store the VLM's linear weights in "
                        "8 bits (float8_e4m3fn / int8 per row) and compute in bf16: about half the VLM memory, "
                        "int8 the closer to bf16; SDXL runs in bf16")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def torch_dtype(name: str):
    from ..dtypes import DTYPES

    # fp8 / int8 are storage formats for the VLM's weights; computation (and SDXL) runs in bf16
    return DTYPES["bf16" if name in WEIGHT_STORAGE else name]


def weight_storage(name: str) -> str | None:
    """The VLM weight storage a --dtype choice asks for (None: weights stay in the compute dtype)."""
    return WEIGHT_STORAGE.get(name)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def open_image(path: str | Path, what: str = "image"):
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise MumuError(f"{what} {path} does not exist.") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise MumuError(f"{what} {path} could not be read as an image ({exc}).") from None


def build_prompt(args: argparse.Namespace, default_tokens: int):
    from ..prompt import InterleavedPrompt, PromptImage

    n = len(args.image)
    for flag, values in (("--mask", args.mask), ("--weight", args.weight)):
        if len(values) > n:
            raise MumuError(f"{len(values)} {flag} values for {n} --image values; give at most one per image.")
    tokens = args.tokens_per_image or default_tokens
    images = []
    for i, path in enumerate(args.image):
        mask_path = args.mask[i] if i < len(args.mask) else "none"
        mask = None if mask_path.lower() == "none" else open_image(mask_path, "mask").convert("L")
        weight = args.weight[i] if i < len(args.weight) else 1.0
        images.append(PromptImage(open_image(path), mask=mask, weight=weight, tokens_per_image=tokens))
    return InterleavedPrompt.parse(args.prompt, images)


def refuse_overwriting_inputs(out: Path, inputs: list[Any]) -> None:
    for p in inputs:
        if p and Path(p).exists() and out.exists() and os.path.samefile(out, p):
            raise MumuError(f"--out {out} is one of the inputs; choose another output path.")


def save_png(path: Path, image, info: dict) -> Path:
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("mumu", json.dumps(info, sort_keys=True))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=meta))
