import pytest
import torch
from PIL import Image

from mumu_core.encoder import MumuEncoder
from mumu_core.prompt import InterleavedPrompt, PromptImage

RED = Image.new("RGB", (80, 50), (220, 30, 30))
GREEN = Image.new("RGB", (40, 70), (30, 220, 30))


def prompt(text="a <image> man and his <image> dog", tokens=(16, 16), weights=(1.0, 1.0), images=(RED, GREEN)):
    return InterleavedPrompt.parse(text, [PromptImage(im, weight=w, tokens_per_image=t)
                                          for im, w, t in zip(images, weights, tokens)])


def test_encode_shapes_and_layout(tiny_encoder):
    c = tiny_encoder.encode(prompt(tokens=(16, 36)))
    assert c.context.shape[0] == 1 and c.context.shape[2] == 2048 and c.pooled.shape == (1, 1280)
    assert c.mask.shape == c.context.shape[:2] and bool(c.mask.all())
    assert [e["tokens"] for e in c.layouts[0]] == [16, 36]
    assert [e["side"] for e in c.layouts[0]] == [56, 84]
    assert c.layouts[0][0]["end"] <= c.layouts[0][1]["start"]


def test_context_length_grows_by_exactly_the_extra_tokens(tiny_encoder):
    small = tiny_encoder.encode(prompt(tokens=(16, 16)))
    big = tiny_encoder.encode(prompt(tokens=(36, 36)))
    assert big.context.shape[1] - small.context.shape[1] == 2 * (36 - 16)


def test_image_weight_scales_only_that_image(tiny_encoder):
    base = tiny_encoder.encode(prompt())
    weighted = tiny_encoder.encode(prompt(weights=(1.0, 0.5)))
    (_, s1, e1), (_, s2, e2) = [(e["image"], e["start"], e["end"]) for e in base.layouts[0]]
    torch.testing.assert_close(weighted.context[0, s2:e2], base.context[0, s2:e2] * 0.5)
    outside = torch.ones(base.context.shape[1], dtype=torch.bool)
    outside[s2:e2] = False
    torch.testing.assert_close(weighted.context[0, outside], base.context[0, outside])
    assert not torch.allclose(weighted.context[0, s2:e2], base.context[0, s2:e2])


def test_weight_zero_leaves_the_image_out_so_no_later_token_has_read_it(tiny_encoder):
    # a scaled image still reaches the words after it through the causal VLM: weight 0.01 is not "gone"
    text_only = tiny_encoder.encode(prompt("a man and his <image> dog", tokens=(16,), images=(GREEN,)))
    nearly = tiny_encoder.encode(prompt(weights=(0.01, 1.0)))
    zero = tiny_encoder.encode(prompt(weights=(0.0, 1.0)))
    assert zero.context.shape == text_only.context.shape
    torch.testing.assert_close(zero.context, text_only.context)
    torch.testing.assert_close(zero.pooled, text_only.pooled)
    assert nearly.context.shape[1] > text_only.context.shape[1] + 16  # 16 patch tokens + image markers
    # the layout names the image the caller gave (2), with its tokens where the text-only prompt has them
    assert [(e["image"], e["start"], e["end"]) for e in zero.layouts[0]] == \
        [(2, e["start"], e["end"]) for e in text_only.layouts[0]]
    assert not tiny_encoder.encode(prompt("<image> alone", tokens=(16,), weights=(0.0,), images=(RED,))).layouts[0]


def test_batch_with_different_image_counts_matches_single_encodes(tiny_encoder):
    prompts = [prompt(), InterleavedPrompt.parse("just text"), prompt("<image> alone", tokens=(36,), images=(RED,))]
    batch = tiny_encoder.encode(prompts)
    for i, p in enumerate(prompts):
        one = tiny_encoder.encode(p)
        n = one.context.shape[1]
        assert int(batch.mask[i].sum()) == n and not batch.mask[i, n:].any()
        torch.testing.assert_close(batch.context[i, :n], one.context[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(batch.pooled[i], one.pooled[0], atol=2e-5, rtol=1e-4)


def test_unconditional_is_the_empty_prompt(tiny_encoder):
    u = tiny_encoder.encode_unconditional()
    e = tiny_encoder.encode(InterleavedPrompt.parse(""))
    torch.testing.assert_close(u.context, e.context)
    assert u.context.shape[1] >= 1 and u.pooled.shape == (1, 1280)


def test_same_image_twice_uses_the_same_features(tiny_encoder):
    c = tiny_encoder.encode(InterleavedPrompt.parse("<image> and again <image:1>", [PromptImage(RED, tokens_per_image=16)]))
    assert len(c.layouts[0]) == 2 and all(e["image"] == 1 for e in c.layouts[0])


def test_on_image_reports_progress_and_can_abort(tiny_encoder):
    calls = []
    tiny_encoder.encode(prompt(tokens=(16, 36)), on_image=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]

    class Stop(Exception):
        pass

    def abort(done, total):
        raise Stop

    with pytest.raises(Stop):
        tiny_encoder.encode(prompt(), on_image=abort)


def test_bundle_vlm_lora_is_merged_into_the_vlm(tiny):
    from mumu_core.bundle import load_bundle
    from mumu_core.vlm import load_vlm

    bundle = load_bundle(tiny["bundle"])
    plain = load_vlm(tiny["vlm"])
    merged = MumuEncoder.from_pretrained(tiny["vlm"], tiny["bundle"]).vlm
    key = next(k for k in bundle.vlm_lora if "q_proj.lora_A" in k)
    module = key.replace("base_model.model.", "").split(".lora_A")[0]
    a, b = bundle.vlm_lora[key], bundle.vlm_lora[key.replace("lora_A", "lora_B")]
    scale = bundle.config["vlm_lora"]["alpha"] / bundle.config["vlm_lora"]["rank"]
    w_plain = dict(plain.model.named_modules())[module].weight
    w_merged = dict(merged.model.named_modules())[module].weight
    torch.testing.assert_close(w_merged, w_plain + scale * b @ a, atol=1e-6, rtol=1e-5)


def test_forward_is_differentiable_for_training(tiny):
    enc = MumuEncoder.from_pretrained(tiny["vlm"], tiny["bundle"])
    enc.adapter.requires_grad_(True).train()
    ctx, pooled, mask = enc(enc.prepare([prompt()]))
    (ctx.pow(2).mean() + pooled.pow(2).mean()).backward()
    assert enc.adapter.input_proj.weight.grad.abs().sum() > 0
