"""UNet calls per sampling step with MUMU's conditioning, old negative vs batched negative.

ComfyUI runs cond and uncond in one UNet call only when `CONDCrossAttn.can_concat` accepts their
lengths (comfy/conds.py: lcm(L1, L2) / min(L1, L2) <= 4). MUMU's positive is ~1000 tokens
(3 images x 324 + text); the plain unconditional is 1 token -> two UNet calls per step. MUMU
Encode's `negative` output repeats the unconditional to the positive's length -> one call.

This bench samples with a mid-size SDXL-topology UNet (diffusers UNet2DConditionModel: SDXL's
block types, cross_attention_dim 2048, text_time ADM of 2816) under ComfyUI's batching rule —
ComfyUI's own `comfy.conds` when importable, else the copy in tests/comfy_cond_batching.py —
with the same seed and the same Euler/CFG loop, old negative vs new, in one run. The contexts
are the real shapes of a 3-image MUMU prompt (random values; exactness does not depend on them).

Last line: one JSON object, e.g.
{"unet_calls_per_step": 1, "unet_calls_per_step_before": 2, "sampling_speedup": 1.3, "max_abs_diff": 1e-6}
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from comfy_cond_batching import calc_cond_batch, cond_classes, model_conds  # noqa: E402
from mumu_core.negative import tile_for_cfg_batching  # noqa: E402

POSITIVE_TOKENS = 3 * 324 + 29  # 3 images at the stage-1 budget + text and image markers
STEPS = int(os.environ.get("MUMU_BENCH_STEPS", 6))
LATENT = int(os.environ.get("MUMU_BENCH_LATENT", 32))  # 256 px
REPEATS = int(os.environ.get("MUMU_BENCH_REPEATS", 2))
CFG = 6.0


def build_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128, 256), layers_per_block=1, transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8), cross_attention_dim=2048, norm_num_groups=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ).eval().requires_grad_(False)


def make_apply_model(unet, counter):
    def apply_model(x, t, c_crossattn, y):  # ComfyUI's BaseModel.apply_model signature, SDXL's y = pooled + time ids
        counter[0] += 1
        added = {"text_embeds": y[:, :1280], "time_ids": y[:, 1280:]}
        return unet(x, t, encoder_hidden_states=c_crossattn, added_cond_kwargs=added).sample

    return apply_model


def sample(apply_model, positive, negative, adm_pos, adm_neg, seed: int = 0):
    """Euler, epsilon prediction, CFG; conds batched like ComfyUI. Returns (latent, UNet calls)."""
    g = torch.Generator().manual_seed(seed)
    sigmas = torch.linspace(10.0, 0.0, STEPS + 1)
    x = torch.randn(1, 4, LATENT, LATENT, generator=g) * sigmas[0]
    conds = [model_conds(positive, adm_pos), model_conds(negative, adm_neg)]
    calls = 0
    for i in range(STEPS):
        sigma = sigmas[i]
        x_in = x / torch.sqrt(sigma**2 + 1)
        t = torch.full((1,), float(999 * i / STEPS))
        (eps_c, eps_u), n = calc_cond_batch(apply_model, conds, x_in, t)
        calls += n
        eps = eps_u + CFG * (eps_c - eps_u)
        x = x + eps * (sigmas[i + 1] - sigma)
    return x, calls


def main() -> None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    unet = build_unet()
    g = torch.Generator().manual_seed(1)
    positive = torch.randn(1, POSITIVE_TOKENS, 2048, generator=g)
    uncond = torch.randn(1, 1, 2048, generator=g)  # the empty prompt's encoding: 1 token
    batched = tile_for_cfg_batching(uncond, POSITIVE_TOKENS)  # MUMU Encode's negative output
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])
    adm_pos = torch.cat([torch.randn(1, 1280, generator=g), time_ids], dim=1)
    adm_neg = torch.cat([torch.randn(1, 1280, generator=g), time_ids], dim=1)

    counter = [0]
    apply_model = make_apply_model(unet, counter)
    with torch.no_grad():
        sample(apply_model, positive, batched, adm_pos, adm_neg)  # warm-up
        times = {"before": [], "after": []}
        outs = {}
        for r in range(REPEATS):  # alternate so machine noise hits both alike
            for name, neg in (("before", uncond), ("after", batched)) if r % 2 == 0 else (("after", batched), ("before", uncond)):
                t0 = time.perf_counter()
                outs[name] = sample(apply_model, positive, neg, adm_pos, adm_neg)
                times[name].append(time.perf_counter() - t0)
    (x_before, calls_before), (x_after, calls_after) = outs["before"], outs["after"]
    t_before, t_after = min(times["before"]), min(times["after"])
    real = cond_classes()[1].__module__.startswith("comfy.")
    print(f"UNet params: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M, latent {LATENT}x{LATENT}, "
          f"{STEPS} steps, positive {POSITIVE_TOKENS} tokens, batching rule from "
          f"{'ComfyUI' if real else 'tests/comfy_cond_batching.py (copy of ComfyUI 0.3.64)'}")
    print(f"before: 1-token negative        {calls_before / STEPS:.0f} UNet calls/step, {t_before:.2f} s")
    print(f"after:  negative tiled to {POSITIVE_TOKENS}  {calls_after / STEPS:.0f} UNet calls/step, {t_after:.2f} s")
    diff = float((x_before - x_after).abs().max())
    scale = float(x_before.abs().max())
    print(f"final latents: max |diff| {diff:.3g} (latent max {scale:.3g})")
    print(json.dumps({
        "unet_calls_per_step": calls_after / STEPS,
        "unet_calls_per_step_before": calls_before / STEPS,
        "sampling_speedup": round(t_before / t_after, 3),
        "max_abs_diff": diff,
        "max_rel_diff": diff / scale,
    }))


if __name__ == "__main__":
    main()
