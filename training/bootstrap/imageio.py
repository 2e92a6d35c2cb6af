"""Open images defensively: every failure becomes a reason string, never an exception.

Policy (counted in the stats either way):
- skipped: ``corrupt`` (not an image / unreadable header), ``truncated`` (data ends early),
  ``decompression_bomb`` (more pixels than ``max_pixels``; PIL's DecompressionBombWarning and
  DecompressionBombError are both treated as this), ``too_small`` (a side below ``min_side``,
  e.g. 1x1), ``missing_image``.
- EXIF orientation is applied, so sizes and boxes refer to the upright image.
- converted to RGB and kept: ``cmyk``, ``16bit`` (I;16*, I, F modes are rescaled to 8 bit by their
  actual range rather than clipped, which would turn most 16-bit photos white), ``palette`` (P/PA),
  and ``other`` modes (L, LA, 1, RGBA, ...; alpha is dropped onto black — the paper's padding colour).
  These are useful pixels: skipping them would silently drop real data.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
SKIP_REASONS = ("missing_image", "corrupt", "truncated", "decompression_bomb", "too_small", "missing_caption")


class ImageSkip(Exception):
    """An image that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class LoadedImage:
    image: Image.Image  # RGB
    original_mode: str
    converted: str | None  # "cmyk" | "16bit" | "palette" | "other" | None


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode == "CMYK":
        return img.convert("RGB"), "cmyk"
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img.convert("F") if mode != "F" else img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L").convert("RGB"), "16bit"
    if mode in ("P", "PA"):
        return _flatten_alpha(img.convert("RGBA")), "palette"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        return _flatten_alpha(img.convert("RGBA")), "other"
    return img.convert("RGB"), "other"


def _flatten_alpha(rgba: Image.Image) -> Image.Image:
    black = Image.new("RGB", rgba.size, (0, 0, 0))
    black.paste(rgba, mask=rgba.getchannel("A"))
    return black


def open_image(data: bytes | str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 2) -> LoadedImage:
    """Decode fully (so truncation surfaces here, not at crop time) and convert to RGB.

    Raises ImageSkip with the reason; any other exception from PIL is reported as ``corrupt``.
    """
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise ImageSkip("missing_image", str(path))
        data = path.read_bytes()
    old = Image.MAX_IMAGE_PIXELS
    try:
        # PIL reads the limit from a module global; set it per call so a user setting wins and
        # so a warning-sized image (between 1x and 2x the limit) is an error too.
        Image.MAX_IMAGE_PIXELS = max_pixels
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageSkip("decompression_bomb", str(exc)) from None
    except UnidentifiedImageError as exc:
        raise ImageSkip("corrupt", str(exc)) from None
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc).lower() or "broken data stream" in str(exc).lower() else "corrupt"
        raise ImageSkip(reason, str(exc)) from None
    except Exception as exc:  # PIL raises many types (SyntaxError, ValueError, struct.error) on bad files
        raise ImageSkip("corrupt", f"{type(exc).__name__}: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old
    w, h = img.size
    if w < min_side or h < min_side:
        raise ImageSkip("too_small", f"{w}x{h} px, need at least {min_side} px per side")
    mode = img.mode
    try:
        # Camera photos store their rotation in EXIF; boxes (bootstrap) and crops (training) both
        # use the upright image because both load through here.
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block is not worth losing the image over
        pass
    rgb, converted = _to_rgb(img)
    return LoadedImage(rgb, mode, converted)


def read_source_bytes(source: dict[str, Any], image_root: str | os.PathLike | None) -> bytes:
    """Bytes of a record's source image: a file path, or a tar member at a stored byte offset."""
    root = Path(image_root) if image_root is not None else Path(".")
    if "path" in source:
        path = root / source["path"]
        if not path.is_file():
            raise ImageSkip("missing_image", str(path))
        return path.read_bytes()
    tar_path = root / source["tar"]
    if not tar_path.is_file():
        raise ImageSkip("missing_image", f"{tar_path} (member {source.get('member')})")
    with open(tar_path, "rb") as f:  # the data offset is recorded at bootstrap: no tar index scan
        f.seek(int(source["offset"]))
        return f.read(int(source["size"]))


def load_source_image(source: dict[str, Any], image_root: str | os.PathLike | None, *,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    return open_image(read_source_bytes(source, image_root), max_pixels=max_pixels).image
