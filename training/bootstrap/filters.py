"""Box filters from the paper (§3) plus per-phrase NMS, on plain detections (testable without a model).

Definitions (pixels of the stored image, after clipping the box to the image):
- ``too_small``: w * h < min_box_area (default 150 * 150 = 22,500, the paper's "< 150x150 px"),
  or min(w, h) < min_box_side (default 0 = off; e.g. 150 for "both sides at least 150 px").
- ``too_large``: w * h > max_box_fraction * W * H (default 0.75, the paper's "> 75% of the image").
- ``nms``: a box overlapping a higher-scoring box of the same caption span with IoU > nms_iou.
Boundaries are inclusive for keeping: a box of exactly 150x150 or exactly 75% is kept.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Detection:
    phrase: str
    start: int
    end: int
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels
    score: float


@dataclass
class FilterConfig:
    min_box_area: float = 150 * 150
    min_box_side: float = 0.0
    max_box_fraction: float = 0.75
    nms_iou: float = 0.5
    max_boxes_per_image: int = 32  # after filtering, highest scores first (bounds record size)

    def as_dict(self) -> dict:
        return asdict(self)


def clip_box(box, width: int, height: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((min(max(x0, 0.0), width), min(max(x1, 0.0), width)))
    y0, y1 = sorted((min(max(y0, 0.0), height), min(max(y1, 0.0), height)))
    return x0, y0, x1, y1


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def filter_detections(dets: list[Detection], width: int, height: int, cfg: FilterConfig) -> tuple[list[Detection], Counter]:
    """Apply size filters then per-span NMS; return kept detections (sorted by span, then score) and drop counts."""
    dropped: Counter = Counter()
    sized: list[Detection] = []
    image_area = float(width) * float(height)
    for d in dets:
        box = clip_box(d.box, width, height)
        w, h = box[2] - box[0], box[3] - box[1]
        if w * h < cfg.min_box_area or min(w, h) < cfg.min_box_side or w <= 0 or h <= 0:
            dropped["too_small"] += 1
        elif w * h > cfg.max_box_fraction * image_area:
            dropped["too_large"] += 1
        else:
            sized.append(Detection(d.phrase, d.start, d.end, box, float(d.score)))
    # Deterministic order: score desc, ties broken by span and box so reruns are byte-identical.
    sized.sort(key=lambda d: (-d.score, d.start, d.end, d.box))
    kept: list[Detection] = []
    for d in sized:
        if any(k.start == d.start and k.end == d.end and iou(k.box, d.box) > cfg.nms_iou for k in kept):
            dropped["nms"] += 1
            continue
        kept.append(d)
    if len(kept) > cfg.max_boxes_per_image:
        dropped["over_max_boxes"] += len(kept) - cfg.max_boxes_per_image
        kept = kept[: cfg.max_boxes_per_image]
    kept.sort(key=lambda d: (d.start, d.end, -d.score, d.box))
    return kept, dropped
