"""A negative that ComfyUI batches with MUMU's long positive: one UNet call per sampling step.

MUMU's positive context is long (3 images x 324 patch tokens + text ~ 1000 rows); the
unconditional context (the empty prompt's encoding) is 1 row. ComfyUI runs cond and uncond in one
UNet call only when `comfy/conds.py` `CONDCrossAttn.can_concat` accepts their lengths:
`lcm(L1, L2) / min(L1, L2) <= 4`, after which it tiles each to the lcm. 1 vs 1000 fails that
test, so every step costs two UNet calls. `tile_for_cfg_batching` tiles the negative's context
itself (whole copies, `[c, c, ..., c]`) to a length ComfyUI batches — the positive's own length
whenever that is a multiple of the negative's.

Why tiling is exact. SDXL's UNet reads the context only through cross-attention:
`out_q = sum_i softmax(s)_i v_i` with `s_i = q . k_i / sqrt(d)`, and `k_i, v_i` are per-row
linear maps of the context. Tiling the context m times gives every key/value pair exactly m
copies, so `softmax` becomes `m e^{s_i} / (m sum_j e^{s_j})` = the same weights, and the output is
the same up to float summation order. This holds only for whole copies (a partial copy would give
some rows more weight), and only when every row is a real token: SDXL's cross-attention has no
key mask, so a padded row would become an attended key. The conditioning MUMU Encode emits has
no padded rows (a batch of one prompt has none, and `encode_to_conditioning` drops masked rows
before anything else), so the tiled negative attends to exactly the keys the untiled one does.
The pooled vector and the SDXL size keys are not touched. ComfyUI makes the same argument for
its own padding ("padding with repeat doesn't change result", comfy/conds.py).
"""

from __future__ import annotations

import math

MAX_LCM_RATIO = 4  # comfy/conds.py CONDCrossAttn.can_concat


def can_concat(len_a: int, len_b: int, max_ratio: int = MAX_LCM_RATIO) -> bool:
    """ComfyUI's length rule for batching two cross-attention conds into one UNet call."""
    return math.lcm(len_a, len_b) // min(len_a, len_b) <= max_ratio


def batching_repeats(negative_len: int, positive_len: int, max_ratio: int = MAX_LCM_RATIO) -> int | None:
    """How many whole copies of the negative make it batch with the positive at the least cost.

    Returns the m for which ComfyUI accepts `m * negative_len` beside `positive_len` with the
    smallest padded length (their lcm, what the UNet then processes per row); ties go to the
    length closest to the positive's, so m == positive_len / negative_len whenever that divides
    (the negative then has exactly the positive's length). None when no m works.
    """
    if negative_len <= 0 or positive_len <= 0:
        return None
    best = None
    for m in range(1, max_ratio * positive_len // negative_len + 1):
        length = m * negative_len
        if not can_concat(length, positive_len, max_ratio):
            continue
        cost = (math.lcm(length, positive_len), abs(length - positive_len))
        if best is None or cost < best[0]:
            best = (cost, m)
    return None if best is None else best[1]


def tile_for_cfg_batching(context, positive_len: int, max_ratio: int = MAX_LCM_RATIO):
    """`context` [B, n, D] tiled along tokens so ComfyUI batches it with a `positive_len` positive.

    Returned unchanged when it already batches with no extra cost or when no tiling works (then
    ComfyUI runs two UNet calls, which is still correct).
    """
    n = int(context.shape[1])
    m = batching_repeats(n, positive_len, max_ratio)
    if m is None or m == 1:
        return context
    return context.repeat(1, m, 1)
