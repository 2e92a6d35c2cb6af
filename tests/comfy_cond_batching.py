"""ComfyUI's rule for batching cond and uncond into one UNet call, reproduced for tests and benches.

Copied in behaviour from ComfyUI 0.3.64 (a125cd84): `comfy/conds.py` (`CONDRegular`,
`CONDCrossAttn.can_concat` / `concat`) and the grouping loop of `comfy/samplers.py`
`_calc_cond_batch` / `can_concat_cond` / `cond_cat`, for the case MUMU workflows hit: one
CONDITIONING entry per side, no area/mask/hooks/ControlNet/timestep ranges, enough memory to
batch everything that may be batched. Each cond's model conds are `c_crossattn` (the context)
and `y` (SDXL's ADM vector), as `model_base.SDXL.extra_conds` builds them.

When real ComfyUI is importable (`comfy.conds`), `cond_classes()` returns its classes instead, so
the same bench runs against the real length rule.
"""

from __future__ import annotations

import math

import torch


class CONDRegular:
    def __init__(self, cond):
        self.cond = cond

    def can_concat(self, other):
        return self.cond.shape == other.cond.shape and self.cond.device == other.cond.device

    def concat(self, others):
        return torch.cat([self.cond] + [x.cond for x in others])


class CONDCrossAttn(CONDRegular):
    def can_concat(self, other):
        s1, s2 = self.cond.shape, other.cond.shape
        if s1 != s2:
            if s1[0] != s2[0] or s1[2] != s2[2]:
                return False
            if math.lcm(s1[1], s2[1]) // min(s1[1], s2[1]) > 4:
                return False
        return self.cond.device == other.cond.device

    def concat(self, others):
        conds = [self.cond] + [x.cond for x in others]
        length = math.lcm(*[c.shape[1] for c in conds])
        return torch.cat([c.repeat(1, length // c.shape[1], 1) if c.shape[1] < length else c for c in conds])


def cond_classes():
    """(CONDRegular, CONDCrossAttn): ComfyUI's own when it is importable, else the copies above."""
    try:
        import comfy.conds as real  # noqa: PLC0415

        return real.CONDRegular, real.CONDCrossAttn
    except Exception:  # noqa: BLE001  (no ComfyUI, or the test doubles' `comfy` package)
        return CONDRegular, CONDCrossAttn


def model_conds(context: torch.Tensor, adm: torch.Tensor) -> dict:
    regular, crossattn = cond_classes()
    return {"c_crossattn": crossattn(context), "y": regular(adm)}


def _equal_size(c1: dict, c2: dict) -> bool:
    return c1.keys() == c2.keys() and all(c1[k].can_concat(c2[k]) for k in c1)


def calc_cond_batch(apply_model, conds: list[dict], x: torch.Tensor, timestep: torch.Tensor) -> tuple[list, int]:
    """One prediction per cond (dict of model conds), batching like ComfyUI; returns (outputs, UNet calls).

    apply_model(x, t, c_crossattn=..., y=...) -> prediction. Conds are taken first-come; all that
    `can_concat` with the first one go into its call (ComfyUI then splits only for memory).
    """
    to_run = list(range(len(conds)))
    outputs: list = [None] * len(conds)
    calls = 0
    while to_run:
        first = to_run[0]
        batch = [i for i in to_run if _equal_size(conds[i], conds[first])]
        to_run = [i for i in to_run if i not in batch]
        c = {k: conds[batch[0]][k].concat([conds[i][k] for i in batch[1:]]) for k in conds[first]}
        out = apply_model(torch.cat([x] * len(batch)), torch.cat([timestep] * len(batch)), **c)
        calls += 1
        for i, chunk in zip(batch, out.chunk(len(batch))):
            outputs[i] = chunk
    return outputs, calls
