"""Aspect-ratio buckets for training targets, with SDXL micro-conditioning of what was done.

SDXL was trained, and its users' trainers (kohya, OneTrainer, diffusers' SDXL scripts) train, on
aspect-ratio buckets: every target is resized to cover the bucket whose aspect ratio is closest
to its own and cropped to it, never letterboxed; the UNet is told the source size, the crop
offset and the bucket size through its micro-conditioning time ids
``(original_h, original_w, crop_top, crop_left, target_h, target_w)`` (SDXL paper §2.2). A UNet
trained on black-padded targets learns to draw black bars; padding is the MUMU paper's rule for
the *conditioning* images only.

Buckets around ``resolution`` (kohya's construction): for each width ``w`` on a ``step`` grid
between ``resolution / max_aspect`` and ``resolution * max_aspect``, the tallest height on the
grid with ``w * h <= resolution**2``; pairs wider/taller than ``max_aspect`` are dropped. At 1024
with step 64 this gives SDXL's familiar list (1024x1024, 1152x896, 1216x832, 1344x768, 1472x704,
...). The step is at least 32 px: the VAE divides by 8 and SDXL's UNet downsamples latents twice,
so smaller steps give latents the UNet cannot take. For small runs the list scales with the
resolution (at 64 px only 64x64 remains with max_aspect 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from mumu_core.errors import MumuError

MIN_STEP = 32  # VAE /8 x UNet /4


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"

    @classmethod
    def parse(cls, value) -> "Bucket":
        """'1216x832', [1216, 832], (1216, 832) or a Bucket -> Bucket (width x height)."""
        if isinstance(value, Bucket):
            return value
        if isinstance(value, str):
            parts = value.lower().replace(" ", "").split("x")
            if len(parts) == 2 and all(p.isdigit() for p in parts):
                return cls(int(parts[0]), int(parts[1]))
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
            return cls(int(value[0]), int(value[1]))
        raise MumuError(f"a bucket is WIDTHxHEIGHT (e.g. '1216x832' or [1216, 832]); got {value!r}.")


def default_step(resolution: int) -> int:
    """64 px at 1024 (SDXL practice), scaled with the resolution, never below 32 px."""
    return max(MIN_STEP, (resolution // 16) // MIN_STEP * MIN_STEP)


def make_buckets(resolution: int, step: int | None = None, max_aspect: float = 2.0) -> list[Bucket]:
    """Buckets of area <= resolution**2 on a `step` grid, aspect ratio within [1/max_aspect, max_aspect]."""
    step = step or default_step(resolution)
    if step % 8:
        raise MumuError(f"bucket step must be a multiple of 8 px (VAE); got {step}.")
    if max_aspect < 1:
        raise MumuError(f"bucket max_aspect must be >= 1; got {max_aspect}.")
    area = resolution * resolution
    out = {Bucket(resolution // step * step or step, resolution // step * step or step)}
    lo = max(step, int(resolution / max_aspect) // step * step)
    hi = int(resolution * max_aspect) // step * step
    for w in range(lo, hi + 1, step):
        h = min(hi, (area // w) // step * step)
        if h < step:
            continue
        for b in (Bucket(w, h), Bucket(h, w)):
            if 1 / max_aspect - 1e-9 <= b.aspect <= max_aspect + 1e-9:
                out.add(b)
    return sorted(out, key=lambda b: (b.aspect, b.width))


def resolve_buckets(resolution: int, buckets: Sequence | None, step: int | None, max_aspect: float) -> list[Bucket]:
    """The configured list (explicit, or generated around the resolution), checked."""
    if buckets is None or buckets == "auto":
        return make_buckets(resolution, step, max_aspect)
    if buckets in ("square", "none"):
        return [Bucket(resolution, resolution)]
    out = sorted({Bucket.parse(b) for b in buckets}, key=lambda b: (b.aspect, b.width))
    for b in out:
        if b.width % 8 or b.height % 8:
            raise MumuError(f"bucket {b.name}: both sides must be multiples of 8 px (the VAE downsamples by 8).")
    if not out:
        raise MumuError("the bucket list is empty; use 'auto' or list WIDTHxHEIGHT pairs.")
    return out


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to the image's (in log space, ties -> larger area)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height}")
    a = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - a), -b.width * b.height))


@dataclass(frozen=True)
class TargetCrop:
    """What was done to the source image to make the target: SDXL micro-conditioning inputs."""

    bucket: Bucket
    original_size: tuple[int, int]       # (height, width) of the source image
    crop_top_left: tuple[int, int]       # (top, left) in the resized image's pixels
    resized: tuple[int, int]             # (height, width) after scaling to cover the bucket

    @property
    def target_size(self) -> tuple[int, int]:
        return (self.bucket.height, self.bucket.width)

    def time_ids(self) -> list[int]:
        """SDXL `add_time_ids`: original (h, w) + crop (top, left) + target (h, w)."""
        return [*self.original_size, *self.crop_top_left, *self.target_size]

    def box_in_target(self, box) -> list[float] | None:
        """A box (x0, y0, x1, y1) in source pixels, in the target's pixels (clipped); None if cropped away."""
        (oh, ow), (rh, rw), (top, left) = self.original_size, self.resized, self.crop_top_left
        th, tw = self.target_size
        x0, x1 = (min(max(box[i] * rw / ow - left, 0.0), float(tw)) for i in (0, 2))
        y0, y1 = (min(max(box[i] * rh / oh - top, 0.0), float(th)) for i in (1, 3))
        return [x0, y0, x1, y1] if x1 > x0 and y1 > y0 else None


def plan_crop(width: int, height: int, bucket: Bucket, mode: str = "center",
              rng: np.random.Generator | None = None) -> TargetCrop:
    """Scale to cover the bucket (keeping the aspect ratio) and choose the crop offset."""
    scale = max(bucket.width / width, bucket.height / height)
    rw, rh = max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale))
    if mode == "center":
        top, left = (rh - bucket.height) // 2, (rw - bucket.width) // 2
    elif mode == "random":
        if rng is None:
            raise ValueError("random crops need an rng")
        top, left = int(rng.integers(0, rh - bucket.height + 1)), int(rng.integers(0, rw - bucket.width + 1))
    else:
        raise MumuError(f"target_crop must be 'center' or 'random'; got {mode!r}.")
    return TargetCrop(bucket, (height, width), (top, left), (rh, rw))


def apply_crop(image: Image.Image, crop: TargetCrop) -> Image.Image:
    """The target: resized to cover the bucket, cropped to it. No padding anywhere."""
    rh, rw = crop.resized
    w, h = image.size
    if (rw, rh) != (w, h):
        image = image.resize((rw, rh), Image.BICUBIC, reducing_gap=3.0 if rw < w / 2 else None)
    top, left = crop.crop_top_left
    return image.crop((left, top, left + crop.bucket.width, top + crop.bucket.height))


def histogram(buckets: Iterable[Bucket | str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for b in buckets:
        key = b.name if isinstance(b, Bucket) else str(b)
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
