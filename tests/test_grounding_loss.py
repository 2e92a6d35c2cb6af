"""Grounding loss: boxes carried into the target, attention recorded from the real UNet, loss values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mumu_training.buckets import Bucket, plan_crop
from mumu_training.config import TrainConfigError, load_config
from mumu_training.grounding_loss import (CrossAttentionRecorder, GroundingTarget, box_coverage, grounding_loss,
                                          grounding_targets, phrase_targets)
from mumu_training.samples import SampleBuilder, SampleBuilderConfig, sample_rng


def test_box_coverage_is_the_share_of_each_cell_inside_the_box():
    cov = box_coverage((16, 0, 48, 32), (64, 64), (4, 4)).view(4, 4)
    expected = torch.zeros(4, 4)
    expected[0:2, 1:3] = 1.0
    torch.testing.assert_close(cov, expected)
    # a box smaller than a cell still counts: a quarter of cell (0, 0)
    small = box_coverage((8, 8, 16, 16), (64, 64), (4, 4)).view(4, 4)
    assert small[0, 0].item() == pytest.approx(0.25) and small.sum().item() == pytest.approx(0.25)
    # non-square: 2 rows x 4 columns over a 32 x 64 target
    wide = box_coverage((0, 0, 32, 16), (32, 64), (2, 4)).view(2, 4)
    torch.testing.assert_close(wide, torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))


def test_box_in_target_follows_the_resize_and_the_crop():
    crop = plan_crop(100, 50, Bucket(64, 64))          # scaled x1.28 to 128 x 64, 32 px cut on the left
    assert crop.resized == (64, 128) and crop.crop_top_left == (0, 32)
    assert crop.box_in_target([30, 10, 60, 40]) == pytest.approx([6.4, 12.8, 44.8, 51.2])
    assert crop.box_in_target([0, 0, 20, 50]) is None  # entirely in the part cut away
    assert crop.box_in_target([20, 0, 60, 50]) == pytest.approx([0.0, 0.0, 44.8, 64.0])  # clipped at the cut


def _record_and_image():
    caption = "a red ball and a blue box"
    crops = []
    for word, box in {"ball": [0, 0, 40, 40], "box": [60, 20, 100, 60]}.items():
        start = caption.index(word)
        crops.append({"phrase": word, "start": start, "end": start + len(word), "box": box, "score": 0.9,
                      "person": False, "head_box": None, "head_score": None})
    arr = np.zeros((64, 128, 3), np.uint8)
    arr[0:40, 0:40] = (255, 0, 0)
    arr[20:60, 60:100] = (0, 0, 255)
    from PIL import Image

    return {"id": "0", "caption": caption, "width": 128, "height": 64, "crops": crops}, Image.fromarray(arr)


def test_targets_pair_each_crops_tokens_with_its_box_in_the_target():
    builder = SampleBuilder(SampleBuilderConfig(resolution=64, patch_size=2, min_crops=2, max_crops=2,
                                                cond_dropout_prob=0.0, augment_prob=0.0, edge_map_prob=0.0,
                                                min_crop_side=0))
    record, image = _record_and_image()
    sample = builder.build(record, image, sample_rng(0, 0, 0))
    spans = [[(0, 2, 6), (1, 9, 13)]]                   # as VlmBackbone.tokenize reports them
    targets = grounding_targets([sample], spans)
    # 128 x 64 already covers 64 x 64; the centre crop cuts 32 px on the left
    assert [t.tokens for t in targets] == [(2, 6), (9, 13)]
    assert targets[0].box == pytest.approx((0.0, 0.0, 8.0, 40.0))
    assert targets[1].box == pytest.approx((28.0, 20.0, 64.0, 60.0))
    assert all(t.size == (64, 64) for t in targets)
    dropped = builder.build(record, image, sample_rng(0, 0, 0))
    dropped.conditioning = []
    assert grounding_targets([dropped], [[]]) == []


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    from mumu_core.tiny.configs import tiny_unet_config

    torch.manual_seed(0)
    return UNet2DConditionModel(**{**tiny_unet_config(), "sample_size": 8}).eval()


def _unet_inputs(batch=2, tokens=5):
    torch.manual_seed(1)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[1, -2:] = False                                 # padding in the second prompt
    return dict(sample=torch.randn(batch, 4, 8, 8), timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(batch, tokens, 2048), encoder_attention_mask=mask,
                added_cond_kwargs={"text_embeds": torch.randn(batch, 1280),
                                   "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * batch, dtype=torch.float32)})


def test_recorder_keeps_outputs_and_records_each_cross_attention_layer():
    unet, inputs = _tiny_unet(), _unet_inputs()
    with torch.no_grad():
        before = unet(**inputs).sample
    recorder = CrossAttentionRecorder(unet)
    with torch.no_grad():
        after = unet(**inputs).sample
        assert recorder.maps == []                       # outside recording() nothing is kept
        with recorder.recording() as maps:
            unet(**inputs)
    torch.testing.assert_close(after, before)
    n_cross = sum(1 for name in unet.attn_processors if ".attn2." in name)
    assert len(maps) == n_cross > 0
    for m in maps:
        assert m.shape[0] == 2 and m.shape[2] == 5 and m.shape[1] in (16, 4)   # 4x4 and 2x2 levels
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:2]))
        assert m[1, :, -2:].abs().max() < 1e-6          # padded tokens get no attention


def test_recorder_reuses_the_processors_query_and_key():
    """The maps are softmax(q k^T / sqrt(d)) of the layer's own projections, which run once per
    forward (they are caught, not recomputed: the key reads the 2,048-wide context)."""
    unet, inputs = _tiny_unet(), _unet_inputs()
    recorder = CrossAttentionRecorder(unet)
    layers = [m for name, m in unet.named_modules() if name.endswith(".attn2")]
    calls, expected = [], []

    def record_expected(attn):
        def hook(_m, args, kwargs, _out):
            hidden, context = args[0], kwargs.get("encoder_hidden_states")
            q = attn.head_to_batch_dim(attn.to_q(hidden))
            k = attn.head_to_batch_dim(attn.to_k(context))
            probs = (q @ k.transpose(1, 2) * attn.scale).softmax(-1)   # prompt 0 has no padding
            expected.append(probs.view(hidden.shape[0], attn.heads, hidden.shape[1], -1).mean(1)[0])
        return hook

    with recorder.recording() as maps:
        handles = [a.to_k.register_forward_hook(lambda *_: calls.append(1)) for a in layers]
        unet(**inputs)
        for h in handles:
            h.remove()
    assert len(calls) == len(layers) == len(maps)        # one key projection per layer, not two
    handles = [a.register_forward_hook(record_expected(a), with_kwargs=True) for a in layers]
    with torch.no_grad():
        unet(**inputs)
    for h in handles:
        h.remove()
    for m, e in zip(maps, expected):
        torch.testing.assert_close(m[0].detach(), e, rtol=1e-5, atol=1e-6)


def test_loss_is_zero_inside_one_outside_and_reaches_the_unet():
    target = GroundingTarget(sample=0, tokens=(1, 3), box=(0, 0, 32, 32), size=(64, 64))
    inside = torch.zeros(1, 4, 4)                        # 2x2 map: cell 0 is the box's
    inside[0, 0, 1:3] = 1.0
    inside[0, 1:, 0] = 1.0
    assert grounding_loss([inside], [target]).item() == pytest.approx(0.0)
    outside = torch.zeros(1, 4, 4)
    outside[0, 3, 1:3] = 1.0
    outside[0, :3, 0] = 1.0
    assert grounding_loss([outside], [target]).item() == pytest.approx(1.0)
    assert grounding_loss([outside], []).item() == 0.0
    with pytest.raises(ValueError, match="no cross-attention maps"):
        grounding_loss([], [target])

    unet, inputs = _tiny_unet(), _unet_inputs()
    recorder = CrossAttentionRecorder(unet)
    with recorder.recording() as maps:
        unet(**inputs)
    loss = grounding_loss(maps, [GroundingTarget(0, (1, 3), (0, 0, 32, 32), (64, 64))])
    assert 0 < loss.item() < 1
    loss.backward()
    to_k = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight
    assert to_k.grad is not None and to_k.grad.abs().sum() > 0


def test_config_rejects_a_negative_weight():
    tiny = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"
    with pytest.raises(TrainConfigError, match="loss.grounding_weight must be a number >= 0"):
        load_config(tiny, {"loss.grounding_weight": -1.0})
    assert load_config(tiny).loss.grounding_weight == 0.0    # off unless a config asks for it


def test_phrase_targets_cover_each_phrases_tokens_with_its_box():
    """Stage 0's text grounding: a phrase split into several tokens (the toy tokenizer spells colours
    letter by letter) maps to the contiguous run of exactly those tokens, in the encoder's ids."""
    from mumu_core.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(vocab_size=300, corpus=["a red striped ball and a box on the floor"] * 4)
    texts = ["a red striped ball and a box on the floor", "a box on the floor"]
    rows = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    ids = torch.zeros(2, max(map(len, rows)), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    phrases = [[((2, 18), (0, 0, 20, 20)), ((25, 28), (30, 30, 60, 60))], [((2, 5), (1, 2, 3, 4))]]
    targets = phrase_targets(tok, ids, texts, phrases, (64, 64))
    assert [(t.sample, t.box, t.size) for t in targets] == [
        (0, (0.0, 0.0, 20.0, 20.0), (64, 64)), (0, (30.0, 30.0, 60.0, 60.0), (64, 64)), (1, (1.0, 2.0, 3.0, 4.0), (64, 64))]
    for t, (b, span) in zip(targets, [(0, (2, 18)), (0, (25, 28)), (1, (2, 5))]):
        text = tok.decode(ids[b, t.tokens[0]:t.tokens[1]].tolist()).strip()
        assert text == texts[b][span[0]:span[1]]
    # prompts without phrases (dropped for CFG) give none; ids that are not this text's are refused
    assert phrase_targets(tok, ids, texts, [[], []], (64, 64)) == []
    with pytest.raises(ValueError, match="tokenizes differently"):
        phrase_targets(tok, ids.flip(0), texts, phrases, (64, 64))
