"""fp8 weight storage for the VLM: bytes halve, outputs stay close, dtype casts cannot undo it."""

from __future__ import annotations

import pytest
import torch

from mumu_core import fp8

pytestmark = pytest.mark.skipif(not fp8.fp8_available(), reason="torch without float8_e4m3fn")


def test_quantize_rows_round_trips_within_e4m3_precision():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * torch.logspace(-4, 0, 64).unsqueeze(1)  # rows of very different scale
    q, scale = fp8.quantize_rows(w)
    assert q.dtype == torch.uint8 and scale.shape == (64, 1)
    assert torch.all(torch.log2(scale) == torch.round(torch.log2(scale)))  # powers of two: exact in bf16
    back = fp8.dequantize_rows(q, scale, torch.float32)
    rel = ((back - w).norm(dim=1) / w.norm(dim=1)).max()
    assert rel < 0.05  # 3 mantissa bits, every row in the normal range


def test_fp8_linear_matches_the_linear_and_survives_module_casts():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 192), torch.nn.GELU(), torch.nn.Linear(192, 48, bias=False))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02, generator=g)
    x = torch.randn(5, 96, generator=g)
    ref = model(x)
    before = fp8.weight_bytes(model)
    report = fp8.store_linear_weights_fp8(model)
    assert report["layers"] == 2 and report["bytes_after"] < 0.3 * report["bytes_before"]
    assert fp8.weight_bytes(model) < 0.3 * before  # fp32 -> 1 byte (+ bias, scales)
    model = model.to(torch.bfloat16)  # what the encoder / ComfyUI may do: must not widen the weights
    assert model[0].weight_fp8.dtype == torch.uint8 and model[2].bias is None
    out = model(x.bfloat16()).float()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.995


def test_encoder_from_pretrained_with_fp8_weights(tiny, tiny_encoder):
    from mumu_core.encoder import MumuEncoder
    from mumu_core.prompt import InterleavedPrompt, PromptImage

    enc8 = MumuEncoder.from_pretrained(tiny["vlm"], tiny["bundle"], dtype=torch.bfloat16, fp8_weights=True)
    enc16 = MumuEncoder.from_pretrained(tiny["vlm"], tiny["bundle"], dtype=torch.bfloat16)
    assert fp8.weight_bytes(enc8.vlm) < 0.9 * fp8.weight_bytes(enc16.vlm)  # tiny: embeddings weigh a lot
    assert not any(type(m) is torch.nn.Linear for m in enc8.vlm.model.modules())
    image = torch.rand(40, 30, 3, generator=torch.Generator().manual_seed(0))
    prompt = InterleavedPrompt.parse("a <image> man", [PromptImage(image, tokens_per_image=16)])
    a, b = enc8.encode(prompt).context, enc16.encode(prompt).context
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
