"""The batched negative: ComfyUI's length rule, and why whole-copy tiling is exact for cross-attention."""

from __future__ import annotations

import math

import pytest
import torch

from mumu_core.negative import batching_repeats, can_concat, tile_for_cfg_batching


@pytest.mark.parametrize("n,T,expected", [(1, 1000, 1000), (1, 7, 7), (2, 1000, 500), (250, 1000, 4), (1000, 1000, 1)])
def test_repeats_reach_the_positive_length_when_it_divides(n, T, expected):
    assert batching_repeats(n, T) == expected
    assert can_concat(n * expected, T)


def test_without_a_divisor_the_cheapest_accepted_length_is_chosen_or_none():
    m = batching_repeats(3, 662)  # 662 = 2 x 331: 3 x 331 = 993 batches (lcm 1986 = 3 x 662)
    assert m == 331 and can_concat(993, 662)
    assert batching_repeats(5, 662) is None  # lcm(5k, 662) >= 5 x 662: ComfyUI would refuse any k


def test_one_token_negative_is_refused_by_comfy_before_tiling():
    assert not can_concat(1, 1000) and can_concat(1000, 1000)


def test_tiled_keys_give_the_same_cross_attention():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 64, 40, generator=g)
    for n in (1, 3, 7):
        ctx = torch.randn(2, n, 40, generator=g)
        tiled = tile_for_cfg_batching(ctx, 7 * 12)
        assert tiled.shape[1] % n == 0 and torch.equal(tiled[:, :n], ctx)
        plain = torch.nn.functional.scaled_dot_product_attention(q, ctx, ctx)
        rep = torch.nn.functional.scaled_dot_product_attention(q, tiled, tiled)
        torch.testing.assert_close(rep, plain, rtol=1e-5, atol=1e-6)


def test_partial_copies_would_not_be_exact():
    """Why only whole copies: one key more often than the others shifts the softmax."""
    g = torch.Generator().manual_seed(1)
    q, ctx = torch.randn(1, 4, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    partial = torch.cat([ctx, ctx[:, :1]], dim=1)
    a = torch.nn.functional.scaled_dot_product_attention(q, ctx, ctx)
    b = torch.nn.functional.scaled_dot_product_attention(q, partial, partial)
    assert not torch.allclose(a, b, atol=1e-4)


def test_lcm_rule_matches_comfy_conds():
    from comfy_cond_batching import CONDCrossAttn

    for a, b in [(1, 1000), (77, 300), (77, 308), (3, 993), (662, 993)]:
        ours = can_concat(a, b)
        comfy = CONDCrossAttn(torch.zeros(1, a, 2)).can_concat(CONDCrossAttn(torch.zeros(1, b, 2)))
        assert ours == comfy == (math.lcm(a, b) // min(a, b) <= 4)
