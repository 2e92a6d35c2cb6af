"""Sample builder: annotation record + its image -> one interleaved MUMU training sample.

Public API (used through mumu_training.annotation_dataset by the training loop, training/train.py)::

    from mumu_training.annotation_dataset import AnnotationDataset
    from mumu_training.samples import SampleBuilder, SampleBuilderConfig, TrainingSample, collate_samples

    ds = AnnotationDataset("/data/boot_out", SampleBuilderConfig(stage=1, resolution=1024), seed=0)
    ds.set_epoch(epoch)                 # per-sample RNG = (seed, epoch, index): reproducible
    sample: TrainingSample = ds[i]
    sample.prompt        # mumu_core.prompt.InterleavedPrompt (empty prompt when sample.dropped)
    sample.target        # PIL RGB at the sample's aspect-ratio bucket (resized + cropped, never padded)
    sample.target_tensor()   # torch float [3, H, W] in [-1, 1]
    sample.time_ids()    # SDXL micro-conditioning: [orig_h, orig_w, crop_top, crop_left, target_h, target_w]
    loader = DataLoader(ds, batch_size=B, shuffle=True, collate_fn=collate_samples)  # -> list[TrainingSample]

What a sample is (MUMU arXiv 2406.18790 §2/§3):
- Stage 1: up to ``max_crops`` (3) crops of detected objects, each inserted immediately before the
  caption words its box was grounded on ("a <image> man and his <image> dog"); crops always come
  from the target image itself. With ``edge_map_prob`` (30%) a control map of the full image
  (canny, depth or sketch, split by ``control_maps``; training/control_maps.py) is added at the end
  of the prompt, keeping the total at most ``max_images`` (4). Each image is ``stage1_tokens`` (324)
  tokens. The map's kind is recorded in ``ConditioningInfo.control`` (its ``kind`` stays "edge").
- Stage 2: a single crop at ``stage2_tokens`` (1296), a person/face crop when the image has one.
- Person crops are swapped for their head crop with ``head_swap_prob`` (70%) when a head was found.
- The paper's minimum crop size (150 px): a crop or head box is used only when both its sides are
  at least ``min_crop_side`` px (default 150 x resolution / 1024; ``min_crop_rule: area`` reads it
  as w*h >= side**2 instead). A head below it falls back to its person crop: an upscaled 16 px head
  is a blurry face target exactly where the paper wants face detail.
- ``augment_prob`` (20%) of conditioning images are augmented: each of random crop, horizontal
  flip, Gaussian noise and grayscale is applied with ``augment_op_prob`` (at least one).
- Conditioning images are padded to square with black, never stretched (the paper's rule for VLM
  inputs). The target is not: it is resized to cover its aspect-ratio bucket and cropped
  (training/buckets.py; center crop by default), and the crop is recorded for SDXL's
  micro-conditioning, as SDXL and its usual trainers do.
- ``cond_dropout_prob`` (10%): the whole prompt becomes the empty prompt (CFG's unconditional).

``edge_map`` (a Sobel map) and ``pad_square_resize`` stay for callers of the old API; the builder
uses control_maps and buckets.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageFilter

from mumu_core.errors import MumuError
from mumu_core.prompt import InterleavedPrompt, PromptImage

from .buckets import Bucket, TargetCrop, apply_crop, nearest_bucket, plan_crop, resolve_buckets
from .control_maps import KINDS as CONTROL_KINDS
from .control_maps import ControlMaps

log = logging.getLogger(__name__)
PLACEHOLDER = "<image>"


@dataclass
class SampleBuilderConfig:
    """Every count and probability of the sample builder (defaults = the paper's, where stated)."""

    stage: int = 1                     # 1: up to 3 crops at 324 tokens; 2: one crop at 1296 tokens
    resolution: int = 1024             # target side in px (SDXL native; paper: NS)
    max_crops: int = 3                 # paper: up to 3 detected objects per prompt (stage 1)
    min_crops: int = 1                 # when the record has crops, draw k uniformly in [min, max]
    max_images: int = 4                # paper: up to 4 images per prompt (3 crops + edge map)
    stage1_tokens: int = 324
    stage2_tokens: int = 1296
    patch_size: int = 14               # Idefics2: 324 tokens -> 252 px, 1296 -> 504 px
    edge_map_prob: float = 0.3         # stage 1 only: add a full-image control map (paper: 30%)
    control_maps: dict = field(default_factory=lambda: {"canny": 1.0, "depth": 0.0, "sketch": 1.0})  # split (weights)
    depth_model: str | None = None     # HF depth-estimation folder (DPT / Depth Anything); needed when depth > 0
    depth_device: str = "cpu"          # where depth runs (DataLoader workers: cpu)
    sketch_extractor: str | None = None  # "package.module:factory" learned line extractor; None = XDoG filter
    sketch_model: str | None = None    # passed to the sketch factory (e.g. a PiDiNet folder)
    canny_low: float = 100.0           # cv2.Canny hysteresis thresholds (ControlNet's defaults)
    canny_high: float = 200.0
    control_max_side: int = 512        # maps are computed at most this large (prompt images are 252/504 px)
    min_crop_side: float | None = None  # paper: crops < 150x150 px dropped; None = 150 * resolution / 1024
    min_crop_rule: str = "sides"       # "sides": both sides >= min; "area": w*h >= min**2 (the other reading)
    buckets: Any = "auto"              # "auto" (around resolution) | "square" | ["1216x832", [896, 1152], ...]
    bucket_step: int | None = None     # auto buckets' grid (default 64 px at 1024, >= 32)
    bucket_max_aspect: float = 2.0     # auto buckets' widest/tallest aspect ratio
    target_crop: str = "center"        # "center" | "random" (target augmentation; refused with a latent cache)
    head_swap_prob: float = 0.7
    augment_prob: float = 0.2
    augment_op_prob: float = 0.5
    random_crop_min_frac: float = 0.8  # random crop keeps 80-100% of each side
    noise_sigma: tuple[float, float] = (0.02, 0.08)  # on 0..1 pixel values
    cond_dropout_prob: float = 0.1     # paper: NS; ~10% is the usual CFG choice
    stage2_person_only: bool = False   # stage 2 without a person crop: False = any crop, True = text only

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise MumuError(f"SampleBuilderConfig.stage must be 1 or 2; got {self.stage!r}.")
        for name in ("edge_map_prob", "head_swap_prob", "augment_prob", "augment_op_prob", "cond_dropout_prob"):
            v = getattr(self, name)
            if not 0.0 <= float(v) <= 1.0:
                raise MumuError(f"SampleBuilderConfig.{name} is a probability in [0, 1]; got {v!r}.")
        if not 0 <= self.min_crops <= self.max_crops:
            raise MumuError(f"need 0 <= min_crops <= max_crops; got {self.min_crops}, {self.max_crops}.")
        if self.max_images < 1:
            raise MumuError(f"max_images must be at least 1; got {self.max_images}.")
        if self.resolution < 8:
            raise MumuError(f"resolution must be at least 8 px; got {self.resolution}.")
        self.noise_sigma = tuple(self.noise_sigma)
        if self.min_crop_rule not in ("sides", "area"):
            raise MumuError(f"min_crop_rule must be 'sides' (both sides >= min_crop_side) or 'area' "
                            f"(w*h >= min_crop_side**2); got {self.min_crop_rule!r}.")
        if self.min_crop_side is not None and not float(self.min_crop_side) >= 0:
            raise MumuError(f"min_crop_side must be >= 0 px (or null for 150 x resolution / 1024); "
                            f"got {self.min_crop_side!r}.")
        if self.target_crop not in ("center", "random"):
            raise MumuError(f"target_crop must be 'center' or 'random'; got {self.target_crop!r}.")
        if not isinstance(self.control_maps, dict):
            raise MumuError(f"control_maps is a mapping of kind -> weight over {list(CONTROL_KINDS)}; "
                            f"got {self.control_maps!r}.")
        unknown = sorted(set(self.control_maps) - set(CONTROL_KINDS))
        if unknown:
            raise MumuError(f"control_maps: unknown kind(s) {unknown}; the kinds are {list(CONTROL_KINDS)}.")
        if self.edge_map_prob > 0 and self.stage == 1 and not sum(float(v) for v in self.control_maps.values()) > 0:
            raise MumuError("edge_map_prob > 0 needs a positive weight for at least one of control_maps "
                            f"{list(CONTROL_KINDS)}; got {self.control_maps!r} (or set edge_map_prob: 0).")
        if (self.stage == 1 and self.edge_map_prob > 0 and float(self.control_maps.get("depth", 0) or 0) > 0
                and not self.depth_model):
            raise MumuError("control_maps.depth > 0 needs depth_model: a depth-estimation model folder in Hugging "
                            "Face layout (e.g. depth-anything/Depth-Anything-V2-Small-hf). Or set control_maps.depth: 0.")
        self._buckets = resolve_buckets(self.resolution, self.buckets, self.bucket_step, self.bucket_max_aspect)

    @property
    def tokens_per_image(self) -> int:
        return self.stage1_tokens if self.stage == 1 else self.stage2_tokens

    @property
    def conditioning_side(self) -> int:
        return math.isqrt(self.tokens_per_image) * self.patch_size

    @property
    def bucket_list(self) -> list[Bucket]:
        return list(self._buckets)

    @property
    def min_side_px(self) -> float:
        """The paper's 150 px minimum, scaled with the resolution unless set explicitly."""
        if self.min_crop_side is not None:
            return float(self.min_crop_side)
        return 150.0 * self.resolution / 1024.0

    def bucket_for(self, width: int, height: int) -> Bucket:
        return nearest_bucket(width, height, self._buckets)


@dataclass
class ConditioningInfo:
    """Where one prompt image came from (for tests, debugging and logging)."""

    kind: str                          # "object" | "head" | "edge" (a full-image control map)
    phrase: str | None = None
    start: int | None = None           # character span in the caption (None for the edge map)
    end: int | None = None
    box: list[float] | None = None     # pixels of the source image the crop was cut from
    target_box: list[float] | None = None  # the same box in the target's pixels (grounding_loss.py)
    augmentations: list[str] = field(default_factory=list)
    control: str | None = None         # for kind "edge": "canny" | "depth" | "sketch"


@dataclass
class TrainingSample:
    prompt: InterleavedPrompt          # bind order = prompt order; empty when dropped
    target: Image.Image                # RGB at the bucket size (resized to cover + cropped; no padding)
    text: str                          # prompt text with <image> placeholders ("" when dropped)
    caption: str                       # the original caption
    conditioning: list[ConditioningInfo]
    dropped: bool                      # conditioning dropout fired (unconditional sample)
    record_id: str
    original_size: tuple[int, int]     # (height, width) of the source image, for SDXL micro-conditioning
    stage: int
    crop_top_left: tuple[int, int] = (0, 0)   # (top, left) of the target crop in the resized image
    target_size: tuple[int, int] | None = None  # (height, width) = the bucket; None: the target's size
    bucket: str = ""                   # "WxH"
    filtered: dict = field(default_factory=dict)  # boxes the min-size rule removed: {"crops": n, "heads": n}

    def target_tensor(self):
        """torch float32 [3, H, W] in [-1, 1] (the VAE's input range)."""
        import torch

        arr = np.asarray(self.target, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def time_ids(self) -> list[int]:
        """SDXL `add_time_ids` for this target: original (h, w), crop (top, left), target (h, w)."""
        th, tw = self.target_size or (self.target.height, self.target.width)
        return [int(self.original_size[0]), int(self.original_size[1]), int(self.crop_top_left[0]),
                int(self.crop_top_left[1]), int(th), int(tw)]

    def control_kinds(self) -> list[str]:
        return [c.control or "edge" for c in self.conditioning if c.kind == "edge"]


def collate_samples(samples: Sequence[TrainingSample]) -> list[TrainingSample]:
    """DataLoader collate: prompts have different image counts, so keep a plain list."""
    return list(samples)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index)]))


# ---------------------------------------------------------------- image operations

def crop_box(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """Crop covering the (float) box: floor the start, ceil the end, clip to the image."""
    w, h = image.size
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(w, math.ceil(box[2])), min(h, math.ceil(box[3]))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty box {list(box)} for a {w}x{h} image")
    return image.crop((x0, y0, x1, y1))


def pad_square_resize(image: Image.Image, side: int) -> Image.Image:
    """Fit the longer edge to `side` and centre on black (the paper's padding; never stretch).

    Same result as mumu_core.images.prepare_image for RGB images without a mask, but resizes in
    PIL before padding, which is ~10x faster on large photos (this runs for every sample).
    """
    w, h = image.size
    scale = side / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0 if scale < 0.5 else None)
    if nw == nh == side:
        return image
    out = Image.new("RGB", (side, side))
    out.paste(image, ((side - nw) // 2, (side - nh) // 2))
    return out


def edge_map(image: Image.Image, max_side: int = 512) -> Image.Image:
    """Binary white-on-black Sobel edge map of the whole image (RGB, same size as the input)."""
    small = image.convert("L")
    scale = max_side / max(small.size)
    if scale < 1:
        small = small.resize((max(1, round(small.width * scale)), max(1, round(small.height * scale))), Image.BILINEAR)
    g = np.asarray(small.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
    p = np.pad(g, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mag = np.hypot(gx, gy)
    # Strongest ~15% of gradients (and never flat-image noise): a sparse sketch like Canny's.
    thresh = max(float(np.percentile(mag, 85)), 16.0)
    edges = Image.fromarray(np.where(mag > thresh, 255, 0).astype(np.uint8), mode="L")
    return edges.resize(image.size, Image.NEAREST).convert("RGB")


def augment(crop: Image.Image, rng: np.random.Generator, cfg: SampleBuilderConfig) -> tuple[Image.Image, list[str]]:
    """The paper's conditioning augmentations; each op with augment_op_prob, at least one."""
    ops = [name for name in ("random_crop", "flip", "noise", "grayscale") if rng.random() < cfg.augment_op_prob]
    if not ops:
        ops = [("random_crop", "flip", "noise", "grayscale")[int(rng.integers(4))]]
    out = crop
    for op in ops:
        if op == "random_crop":
            w, h = out.size
            cw = max(1, round(w * rng.uniform(cfg.random_crop_min_frac, 1.0)))
            ch = max(1, round(h * rng.uniform(cfg.random_crop_min_frac, 1.0)))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            out = out.crop((x0, y0, x0 + cw, y0 + ch))
        elif op == "flip":
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        elif op == "noise":
            arr = np.asarray(out, dtype=np.float32) / 255.0
            arr = arr + rng.normal(0.0, rng.uniform(*cfg.noise_sigma), arr.shape).astype(np.float32)
            out = Image.fromarray(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8), mode="RGB")
        else:
            out = out.convert("L").convert("RGB")
    return out, ops


# ---------------------------------------------------------------- the builder

def _safe_caption(caption: str) -> str:
    # A caption containing "<image>" or "<img>" would be parsed as placeholders (or rejected);
    # swapping the angle brackets for same-length lookalikes keeps every character span valid.
    return caption.replace("<", "\u2039").replace(">", "\u203a")


def _valid_crops(record: dict[str, Any], min_side: float = 0.0, rule: str = "sides",
                 counts: dict | None = None) -> list[dict[str, Any]]:
    """Crops whose span matches the caption and whose box is large enough (`min_side`, `rule`).

    A head box below the minimum is dropped and its person crop kept (the fallback). `counts`,
    when given, receives how many crops / heads the size rule removed.
    """
    caption = record.get("caption", "")
    w, h = record.get("width"), record.get("height")
    good = []
    for c in record.get("crops", []):
        s, e = c.get("start"), c.get("end")
        if not (isinstance(s, int) and isinstance(e, int) and 0 <= s < e <= len(caption) and caption[s:e] == c.get("phrase")):
            continue
        if not _box_ok(c.get("box"), w, h):
            continue
        if not _big_enough(c["box"], w, h, min_side, rule):
            if counts is not None:
                counts["crops"] = counts.get("crops", 0) + 1
            continue
        if c.get("head_box") is not None:
            if not _box_ok(c["head_box"], w, h):
                c = dict(c, head_box=None)  # keep the person crop, drop the unusable head
            elif not _big_enough(c["head_box"], w, h, min_side, rule):
                c = dict(c, head_box=None)  # too small a face: the person crop instead
                if counts is not None:
                    counts["heads"] = counts.get("heads", 0) + 1
        good.append(c)
    return good


def _clipped_size(box, w, h) -> tuple[float, float]:
    x0, y0, x1, y1 = box
    W, H = (w or float("inf")), (h or float("inf"))
    return min(x1, W) - max(x0, 0), min(y1, H) - max(y0, 0)


def _box_ok(box, w, h) -> bool:
    """At least one whole pixel once clipped (a box from a hand-edited or foreign shard may be junk)."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4):
        return False
    bw, bh = _clipped_size(box, w, h)
    return bw >= 1 and bh >= 1


def _big_enough(box, w, h, min_side: float, rule: str) -> bool:
    """The paper's "crops smaller than 150x150": both sides by default; the area reading on request."""
    if min_side <= 0:
        return True
    bw, bh = _clipped_size(box, w, h)
    if rule == "area":
        return bw * bh >= min_side * min_side - 1e-6
    return min(bw, bh) >= min_side - 1e-6


def _pick_non_overlapping(crops: list[dict[str, Any]], k: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """k crops with pairwise disjoint caption spans (one image per word), chosen at random."""
    chosen: list[dict[str, Any]] = []
    if k <= 0:
        return chosen
    for i in rng.permutation(len(crops)):
        c = crops[int(i)]
        if all(c["end"] <= d["start"] or d["end"] <= c["start"] for d in chosen):
            chosen.append(c)
            if len(chosen) == k:
                break
    return chosen


class SampleBuilder:
    def __init__(self, config: SampleBuilderConfig | None = None) -> None:
        self.config = config or SampleBuilderConfig()
        c = self.config
        self.control = ControlMaps(c.control_maps if c.stage == 1 and c.edge_map_prob > 0 else {},
                                   depth_model=c.depth_model, depth_device=c.depth_device,
                                   sketch_extractor=c.sketch_extractor, sketch_model=c.sketch_model,
                                   canny_low=c.canny_low, canny_high=c.canny_high, max_side=c.control_max_side)

    def target_crop(self, width: int, height: int, bucket: Bucket | None = None,
                    rng: np.random.Generator | None = None) -> TargetCrop:
        """The bucket (nearest aspect ratio unless given) and the crop the target will get."""
        cfg = self.config
        bucket = bucket or cfg.bucket_for(width, height)
        return plan_crop(width, height, bucket, cfg.target_crop, rng)

    def build(self, record: dict[str, Any], image: Image.Image, rng: np.random.Generator,
              bucket: Bucket | None = None) -> TrainingSample:
        """One sample; `bucket` forces the target's bucket (default: nearest to the image's aspect)."""
        cfg = self.config
        image = image.convert("RGB")
        caption = record.get("caption", "")
        tcrop = self.target_crop(image.width, image.height, bucket, rng if cfg.target_crop == "random" else None)
        target = apply_crop(image, tcrop)
        filtered: dict[str, int] = {}
        crops = _valid_crops(record, cfg.min_side_px, cfg.min_crop_rule, filtered)
        common = dict(target=target, caption=caption, record_id=str(record.get("id", "")),
                      original_size=tcrop.original_size, stage=cfg.stage, crop_top_left=tcrop.crop_top_left,
                      target_size=tcrop.target_size, bucket=tcrop.bucket.name, filtered=filtered)
        if rng.random() < cfg.cond_dropout_prob:
            return TrainingSample(prompt=InterleavedPrompt.parse("", []), text="", conditioning=[], dropped=True, **common)

        if cfg.stage == 1:
            n_max = min(cfg.max_crops, cfg.max_images, len(crops))
            k = int(rng.integers(min(cfg.min_crops, n_max), n_max + 1)) if n_max > 0 else 0
            chosen = _pick_non_overlapping(crops, k, rng)
        else:
            people = [c for c in crops if c.get("person")]
            pool = people or ([] if cfg.stage2_person_only else crops)
            chosen = [pool[int(rng.integers(len(pool)))]] if pool else []
        chosen.sort(key=lambda c: c["start"])

        side, tokens = cfg.conditioning_side, cfg.tokens_per_image
        images: list[PromptImage] = []
        infos: list[ConditioningInfo] = []
        for c in chosen:
            kind, box = "object", c["box"]
            if c.get("person") and c.get("head_box") and rng.random() < cfg.head_swap_prob:
                kind, box = "head", c["head_box"]
            crop = crop_box(image, box)
            ops: list[str] = []
            if rng.random() < cfg.augment_prob:
                crop, ops = augment(crop, rng, cfg)
            images.append(PromptImage(pad_square_resize(crop, side), tokens_per_image=tokens))
            infos.append(ConditioningInfo(kind, c["phrase"], c["start"], c["end"], list(box),
                                          tcrop.box_in_target(box), ops))

        safe = _safe_caption(caption)
        parts, cursor = [], 0
        for c in chosen:
            parts += [safe[cursor : c["start"]], PLACEHOLDER + " "]
            cursor = c["start"]
        parts.append(safe[cursor:])
        text = "".join(parts)

        if (cfg.stage == 1 and self.control.enabled and len(images) < cfg.max_images
                and rng.random() < cfg.edge_map_prob):
            kind = self.control.choose(rng)
            images.append(PromptImage(pad_square_resize(self.control.render(kind, image), side), tokens_per_image=tokens))
            infos.append(ConditioningInfo("edge", control=kind))
            text = text.rstrip() + " " + PLACEHOLDER
        if not text.strip():
            text = ""  # an empty caption with no images is the unconditional prompt
        return TrainingSample(prompt=InterleavedPrompt.parse(text, images), text=text, conditioning=infos,
                              dropped=False, **common)
