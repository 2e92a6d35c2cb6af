"""8-bit weight storage for the VLM (fp8_e4m3fn, int8): bytes halve, outputs stay close, dtype casts cannot undo it."""

from __future__ import annotations

import pytest
import torch

from mumu_core import weight_storage as ws
from mumu_core.errors import MumuError

NEEDS_FP8 = pytest.mark.skipif(not ws.fp8_available(), reason="torch without float8_e4m3fn")
FORMATS = [pytest.param("fp8_e4m3fn", marks=NEEDS_FP8), "int8"]
CODE_DTYPE = {"fp8_e4m3fn": torch.uint8, "int8": torch.int8}


@pytest.mark.parametrize("fmt, max_rel", [pytest.param("fp8_e4m3fn", 0.05, marks=NEEDS_FP8), ("int8", 0.02)])
def test_quantize_rows_round_trips_within_the_formats_precision(fmt, max_rel):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * torch.logspace(-4, 0, 64).unsqueeze(1)  # rows of very different scale
    q, scale = ws.quantize_rows(w, fmt)
    assert q.dtype == CODE_DTYPE[fmt] and scale.shape == (64, 1)
    assert torch.all(torch.log2(scale) == torch.round(torch.log2(scale)))  # powers of two: exact in bf16
    back = ws.dequantize_rows(q, scale, torch.float32)
    rel = ((back - w).norm(dim=1) / w.norm(dim=1)).max()
    assert rel < max_rel  # every row uses the format's whole range, whatever its scale


@NEEDS_FP8
def test_int8_rounds_closer_than_fp8():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(1)) * 0.02
    err = {fmt: (ws.dequantize_rows(*ws.quantize_rows(w, fmt), torch.float32) - w).norm() / w.norm()
           for fmt in ("fp8_e4m3fn", "int8")}
    assert err["int8"] < 0.6 * err["fp8_e4m3fn"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_linear_matches_the_linear_and_survives_module_casts(fmt):
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 192), torch.nn.GELU(), torch.nn.Linear(192, 48, bias=False))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02, generator=g)
    x = torch.randn(5, 96, generator=g)
    ref = model(x)
    before = ws.weight_bytes(model)
    report = ws.store_linear_weights(model, fmt)
    assert report["layers"] == 2 and report["bytes_after"] < 0.3 * report["bytes_before"]
    assert ws.weight_bytes(model) < 0.3 * before  # fp32 -> 1 byte (+ bias, scales)
    model = model.to(torch.bfloat16)  # what the encoder / ComfyUI may do: must not widen the weights
    assert model[0].weight_codes.dtype == CODE_DTYPE[fmt] and model[2].bias is None
    out = model(x.bfloat16()).float()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.995


def test_unknown_format_is_refused_with_the_choices():
    with pytest.raises(MumuError, match="unknown weight storage 'int4'.*fp8_e4m3fn, int8"):
        ws.store_linear_weights(torch.nn.Linear(4, 4), "int4")


@pytest.mark.parametrize("fmt", FORMATS)
def test_encoder_from_pretrained_with_8_bit_weights(tiny, tiny_encoder, fmt):
    from mumu_core.encoder import MumuEncoder
    from mumu_core.prompt import InterleavedPrompt, PromptImage

    enc8 = MumuEncoder.from_pretrained(tiny["vlm"], tiny["bundle"], dtype=torch.bfloat16, weight_storage=fmt)
    enc16 = MumuEncoder.from_pretrained(tiny["vlm"], tiny["bundle"], dtype=torch.bfloat16)
    assert ws.weight_bytes(enc8.vlm) < 0.9 * ws.weight_bytes(enc16.vlm)  # tiny: embeddings weigh a lot
    assert not any(type(m) is torch.nn.Linear for m in enc8.vlm.model.modules())
    image = torch.rand(40, 30, 3, generator=torch.Generator().manual_seed(0))
    prompt = InterleavedPrompt.parse("a <image> man", [PromptImage(image, tokens_per_image=16)])
    a, b = enc8.encode(prompt).context, enc16.encode(prompt).context
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
