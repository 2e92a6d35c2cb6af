"""Image preparation for the VLM: mask, pad to a black square, resize to S x S.

Without the perceiver each image becomes a fixed grid of patch tokens, so every image is brought
to one square size S with (S / patch)^2 = tokens per image (Idefics2, patch 14: 324 -> 252 px,
1296 -> 504 px). The paper pads to square with black pixels; we never stretch.

Accepts PIL images, numpy arrays and torch tensors (ComfyUI IMAGE [H,W,C] floats in 0..1, or
[C,H,W]); torch is only touched through duck typing, so this module does not import it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .errors import PromptError


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def to_rgb_array(image: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 [H,W,3] in 0..1, plus the alpha channel as a mask when the image has one."""
    if isinstance(image, Image.Image):
        alpha = None
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            alpha = np.asarray(rgba, dtype=np.float32)[..., 3] / 255.0
            image = rgba
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return rgb, alpha
    arr = _as_array(image).astype(np.float32)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3:
        raise PromptError(f"an image must be [H,W,C] or [C,H,W]; got shape {tuple(arr.shape)}.")
    if arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    channels = arr.shape[-1]
    if channels not in (1, 3, 4):
        raise PromptError(f"an image needs 1, 3 or 4 channels; got shape {tuple(arr.shape)}.")
    if arr.max(initial=0.0) > 1.0 + 1e-3:  # 0..255 arrays
        arr = arr / 255.0
    alpha = arr[..., 3] if channels == 4 else None
    rgb = np.repeat(arr, 3, axis=-1) if channels == 1 else arr[..., :3]
    return np.clip(rgb, 0.0, 1.0), alpha


def to_mask_array(mask: Any, height: int, width: int) -> np.ndarray:
    """float32 [H,W] in 0..1 at the image's size (1 keeps the pixel, 0 blacks it out)."""
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    else:
        arr = _as_array(mask).astype(np.float32)
        while arr.ndim > 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2:
            raise PromptError(f"a mask must be [H,W]; got shape {tuple(arr.shape)}.")
        if arr.max(initial=0.0) > 1.0 + 1e-3:
            arr = arr / 255.0
    if arr.shape != (height, width):
        pil = Image.fromarray(np.clip(arr * 255.0, 0, 255).astype(np.uint8), mode="L")
        arr = np.asarray(pil.resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0
    return np.clip(arr, 0.0, 1.0)


def pad_to_square(rgb: np.ndarray) -> np.ndarray:
    """Centre the image on a black square whose side is its longer edge (never stretch)."""
    h, w, c = rgb.shape
    side = max(h, w)
    out = np.zeros((side, side, c), dtype=rgb.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = rgb
    return out


def prepare_image(image: Any, side: int, mask: Any = None) -> Image.Image:
    """Mask (explicit mask, else the image's alpha), pad to a black square, resize to side x side."""
    rgb, alpha = to_rgb_array(image)
    h, w = rgb.shape[:2]
    if h < 1 or w < 1:
        raise PromptError(f"an image is empty ({w}x{h} px).")
    keep = to_mask_array(mask, h, w) if mask is not None else alpha
    if keep is not None:
        rgb = rgb * keep[..., None]
    square = pad_to_square(rgb)
    pil = Image.fromarray(np.round(square * 255.0).astype(np.uint8), mode="RGB")
    if pil.size != (side, side):
        pil = pil.resize((side, side), Image.BICUBIC)
    return pil
