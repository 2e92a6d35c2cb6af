import pytest
import torch

from mumu_core.adapter import AdapterConfig, MumuAdapter


def make(depth=3, width=32, heads=4, input_dim=24):
    torch.manual_seed(0)
    return MumuAdapter(AdapterConfig(input_dim=input_dim, width=width, depth=depth, heads=heads)).eval()


def test_shapes_and_configurable_depth_width():
    a = make(depth=5, width=48, heads=6)
    assert len(a.blocks) == 5 and a.input_proj.out_features == 48
    ctx, pooled = a(torch.randn(2, 7, 24), torch.ones(2, 7, dtype=torch.bool))
    assert ctx.shape == (2, 7, 2048) and pooled.shape == (2, 1280)


def test_paper_default_is_16_layers():
    assert AdapterConfig(input_dim=4096).depth == 16


def test_padding_does_not_change_real_tokens():
    a = make()
    real = torch.randn(1, 5, 24)
    ctx1, pooled1 = a(real, torch.ones(1, 5, dtype=torch.bool))
    padded = torch.cat([real, 100 * torch.randn(1, 4, 24)], 1)
    mask = torch.tensor([[True] * 5 + [False] * 4])
    ctx2, pooled2 = a(padded, mask)
    torch.testing.assert_close(ctx2[:, :5], ctx1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled2, pooled1, atol=1e-5, rtol=1e-5)


def test_attention_is_non_causal():
    a = make()
    x = torch.randn(1, 6, 24)
    m = torch.ones(1, 6, dtype=torch.bool)
    y = x.clone()
    y[0, -1] += 1.0
    assert not torch.allclose(a(x, m)[0][0, 0], a(y, m)[0][0, 0])


def test_gradient_checkpointing_matches_plain_forward():
    a = make().train()
    x = torch.randn(2, 6, 24)
    m = torch.ones(2, 6, dtype=torch.bool)
    ctx1, _ = a(x, m)
    a.gradient_checkpointing = True
    ctx2, _ = a(x, m)
    torch.testing.assert_close(ctx1, ctx2)
    ctx2.sum().backward()
    assert a.input_proj.weight.grad is not None


def test_width_must_divide_heads():
    with pytest.raises(ValueError, match="divisible"):
        AdapterConfig(input_dim=8, width=30, heads=4)
