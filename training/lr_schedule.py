"""Learning-rate schedules as a factor of the base rate: linear warm-up, then constant or cosine.

The paper trains at a constant rate after warm-up ("constant", the default). "cosine" anneals to
`min_lr_ratio` of the base rate at the last step, which short runs (the shapes world) need to end
on a low-noise model.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, warmup: int, total: int, schedule: str = "constant", min_lr_ratio: float = 0.1) -> float:
    """The factor on the base learning rate at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown LR schedule {schedule!r}; expected one of {SCHEDULES}")
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
