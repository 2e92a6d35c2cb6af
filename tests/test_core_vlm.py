import json
import shutil

import pytest
import torch
from PIL import Image

from mumu_core.errors import ModelFolderError, PromptError
from mumu_core.prompt import InterleavedPrompt, PromptImage
from mumu_core.vlm import PerceiverRemoved, load_processor, load_vlm, remove_perceiver


def test_tiny_folder_is_a_real_hf_folder(tiny):
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(tiny["vlm"])
    assert type(model).__name__ == "Idefics2ForConditionalGeneration"
    assert AutoTokenizer.from_pretrained(tiny["vlm"]).convert_tokens_to_ids("<image>") == model.config.image_token_id
    processor = AutoProcessor.from_pretrained(tiny["vlm"])
    assert type(processor).__name__ == "Idefics2Processor"


def test_perceiver_removed_after_construction_and_after_from_pretrained(tiny):
    from transformers import AutoConfig, Idefics2Model

    built = remove_perceiver(Idefics2Model(AutoConfig.from_pretrained(tiny["vlm"])))
    assert isinstance(built.connector.perceiver_resampler, PerceiverRemoved)
    vlm = load_vlm(tiny["vlm"])
    assert isinstance(vlm.model.connector.perceiver_resampler, PerceiverRemoved)
    assert not any("perceiver" in n for n, _ in vlm.model.named_parameters())


def test_token_geometry_matches_the_paper(tiny):
    vlm = load_vlm(tiny["vlm"])
    assert vlm.side_for_tokens(324) == 252 and vlm.side_for_tokens(1296) == 504
    assert vlm.tokens_for_side(252) == 324
    with pytest.raises(PromptError, match="at most 4900"):
        vlm.side_for_tokens(71 * 71)


def test_each_image_contributes_exactly_its_patch_tokens(tiny):
    vlm = load_vlm(tiny["vlm"])
    pixels = vlm.pixel_values([Image.new("RGB", (vlm.side_for_tokens(36),) * 2)])
    assert vlm.image_features(pixels).shape == (1, 36, vlm.hidden_size)


def test_our_forward_equals_stock_hf_forward_without_perceiver(tiny):
    """Stock Idefics2Model.forward (processor image_seq_len = patch count) == our merge path."""
    vlm = load_vlm(tiny["vlm"])
    prompt = InterleavedPrompt.parse("a <image> man and his <image> dog",
                                     [PromptImage(Image.new("RGB", (60, 40), (200, 10, 10)), tokens_per_image=16),
                                      PromptImage(Image.new("RGB", (30, 50), (10, 200, 10)), tokens_per_image=16)])
    from mumu_core.images import prepare_image

    tokens = vlm.tokenize([prompt])
    side = vlm.side_for_tokens(16)
    pixels = vlm.pixel_values([prepare_image(im.image, side) for im in prompt.images])
    with torch.no_grad():
        stock = vlm.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask.long(),
                          pixel_values=pixels[None], use_cache=False).last_hidden_state
        embeds = vlm.embed(tokens.input_ids).clone()
        feats = vlm.image_features(pixels)
        for img, s, e in tokens.image_spans[0]:
            embeds[0, s:e] = feats[img]
        ours = vlm.language_hidden_states(embeds, tokens.attention_mask)
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)
    processor = load_processor(tiny["vlm"], 16)
    assert processor.image_seq_len == 16


def test_idefics3_family_uses_pixel_shuffle_geometry(tiny):
    vlm = load_vlm(tiny["vlm_idefics3"])
    assert vlm.family.name == "idefics3" and vlm.grid_unit == 16
    side = vlm.side_for_tokens(16)
    assert side == 64
    feats = vlm.image_features(vlm.pixel_values([Image.new("RGB", (side, side))]))
    assert feats.shape == (1, 16, vlm.hidden_size)


def test_hidden_layer_is_configurable(tiny):
    last = load_vlm(tiny["vlm"])
    first = load_vlm(tiny["vlm"], hidden_layer=1)
    tokens = last.tokenize([InterleavedPrompt.parse("a man")])
    with torch.no_grad():
        a = last.language_hidden_states(last.embed(tokens.input_ids), tokens.attention_mask)
        b = first.language_hidden_states(first.embed(tokens.input_ids), tokens.attention_mask)
    assert a.shape == b.shape and not torch.allclose(a, b)
    with pytest.raises(ModelFolderError, match="out of range"):
        load_vlm(tiny["vlm"], hidden_layer=9)


def test_folder_errors_are_clear(tiny, tmp_path):
    with pytest.raises(ModelFolderError, match="config.json is missing"):
        load_vlm(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelFolderError, match="'llama' model"):
        load_vlm(tmp_path)
    no_weights = tmp_path / "noweights"
    shutil.copytree(tiny["vlm"], no_weights)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelFolderError, match="safetensors"):
        load_vlm(no_weights)


def _has_smolvlm() -> bool:
    import transformers

    return hasattr(transformers, "SmolVLMConfig")


@pytest.mark.skipif(_has_smolvlm(), reason="transformers >= 4.50 has SmolVLM (tested below)")
def test_smolvlm_on_old_transformers_is_a_clear_error(tmp_path):
    """The lowest supported transformers (< 4.50) lacks SmolVLM: a clear error, no AttributeError."""
    (tmp_path / "config.json").write_text('{"model_type": "smolvlm"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelFolderError, match=r"SmolVLMModel; it needs transformers >= 4\.50"):
        load_vlm(tmp_path)


@pytest.mark.skipif(not _has_smolvlm(), reason="SmolVLM needs transformers >= 4.50 (the lowest end has a clear-error test)")
def test_smolvlm_folder_loads_behind_the_same_interface(tmp_path):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    from mumu_core.tiny import build_tiny_tokenizer
    from mumu_core.compat import image_processor_class

    tok = build_tiny_tokenizer()
    cfg = SmolVLMConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=256, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=48, intermediate_size=96,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
    SmolVLMForConditionalGeneration(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    image_processor_class("smolvlm")().save_pretrained(tmp_path)
    vlm = load_vlm(tmp_path)
    assert vlm.family.name == "smolvlm" and vlm.hidden_size == 48
    p = InterleavedPrompt.parse("a <image> cat", [PromptImage(Image.new("RGB", (30, 20)), tokens_per_image=16)])
    tokens = vlm.tokenize([p])
    (_, s, e), = tokens.image_spans[0]
    assert e - s == 16
    feats = vlm.image_features(vlm.pixel_values([Image.new("RGB", (vlm.side_for_tokens(16),) * 2)]))
    assert feats.shape == (1, 16, 48)
