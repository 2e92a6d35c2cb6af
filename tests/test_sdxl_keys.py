"""SDXL key mapping: derived from the config, checked against diffusers' converter and real SDXL shapes."""

from __future__ import annotations

import math

import pytest
import torch

from mumu_core.sdxl import keys as K
from mumu_core.errors import MumuError
from mumu_core.sdxl.shapes import meta_device_shapes
from mumu_core.tiny.configs import tiny_unet_config

CONFIGS = {"sdxl": K.SDXL_BASE_UNET_CONFIG, "tiny": tiny_unet_config()}
LORA_TARGET_SUFFIXES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                        "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def test_real_sdxl_shapes():
    shapes = K.ldm_unet_shapes(K.SDXL_BASE_UNET_CONFIG)
    # published SDXL facts: 1680 UNet tensors, 2,567,463,684 parameters
    assert len(shapes) == 1680
    assert sum(math.prod(s) for s in shapes.values()) == 2_567_463_684
    assert shapes["input_blocks.4.1.proj_in.weight"] == (640, 640)  # linear projection: 2-D in ldm too
    assert shapes["input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    assert shapes["label_emb.0.0.weight"] == (1280, 2816)
    assert shapes["output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)  # upsampler after the attention
    assert shapes["output_blocks.5.2.conv.weight"] == (640, 640, 3, 3)
    assert shapes["input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert shapes["middle_block.1.transformer_blocks.9.ff.net.0.proj.weight"] == (10240, 1280)
    assert "output_blocks.8.2.conv.weight" not in shapes  # the last up block has no upsampler


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_param_maps_distinctly_with_same_shape_and_round_trips(name):
    cfg = CONFIGS[name]
    d_shapes = K.diffusers_unet_shapes(cfg)
    km = K.unet_key_map(cfg)
    assert set(km) == set(d_shapes)
    assert len(set(km.values())) == len(km), "two diffusers params map to one ldm key"
    ldm_shapes = K.ldm_unet_shapes(cfg)
    for d, o in km.items():
        assert ldm_shapes[o] == d_shapes[d]
        assert K.ldm_to_diffusers(o, cfg) == d
        assert K.diffusers_to_ldm(d, cfg) == o


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mapping_agrees_with_diffusers_single_file_converter(name):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = CONFIGS[name]
    km = K.unet_key_map(cfg)
    shapes = K.diffusers_unet_shapes(cfg)
    # meta tensors carry identity only: the converter must route each one to our diffusers name
    ckpt = {K.LDM_UNET_PREFIX + o: torch.empty(shapes[d], device="meta") for d, o in km.items()}
    origin = {id(t): k for k, t in ckpt.items()}
    converted = convert_ldm_unet_checkpoint(ckpt, K.as_config_dict(cfg))
    assert set(converted) == set(km)
    for d, o in km.items():
        assert origin[id(converted[d])] == K.LDM_UNET_PREFIX + o, d


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_lora_target_has_a_kohya_stem(name):
    cfg = CONFIGS[name]
    targets = K.lora_weight_keys(cfg)
    d_names = [d for d in K.diffusers_unet_shapes(cfg) if d.endswith(".weight")]
    attn_like = [d for d in d_names if d[: -len(".weight")].endswith(LORA_TARGET_SUFFIXES)]
    n_transformer_blocks = sum(1 for d in d_names if d.endswith("attn1.to_q.weight"))
    assert len(attn_like) == n_transformer_blocks * 10 + 2 * sum(1 for d in d_names if d.endswith("proj_in.weight"))
    for d in attn_like:
        ldm_module = K.diffusers_to_ldm(d, cfg)[: -len(".weight")]
        assert ldm_module in targets
        stem = K.kohya_stem(ldm_module)
        assert K.stem_to_ldm_module(stem, cfg) == ldm_module
        # kohya stems spelled with the diffusers path resolve to the same module
        assert K.stem_to_ldm_module(K.kohya_stem(d[: -len(".weight")]), cfg) == ldm_module
    assert K.kohya_stem("input_blocks.4.1.transformer_blocks.0.attn2.to_q") == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q"
    # convs (resnets, samplers, conv_in/out) and embeddings are LoRA-able too
    assert "input_blocks.1.0.in_layers.2" in targets and "out.2" in targets and "label_emb.0.0" in targets


def test_tiny_names_are_a_subset_of_sdxl_names():
    # the LoRA code resolves stems with the SDXL table by default; that must cover the tiny UNet
    assert set(K.lora_weight_keys(tiny_unet_config())) <= set(K.lora_weight_keys(K.SDXL_BASE_UNET_CONFIG))


def test_unknown_names_raise():
    with pytest.raises(KeyError):
        K.diffusers_to_ldm("down_blocks.7.resnets.0.conv1.weight", tiny_unet_config())
    with pytest.raises(KeyError):
        K.ldm_to_diffusers("input_blocks.99.0.in_layers.2.weight", tiny_unet_config())
    assert K.stem_to_ldm_module("lora_unet_nothing_here", tiny_unet_config()) is None


def test_block_index_and_weights():
    assert K.block_index("input_blocks.0.0.weight") == 0
    assert K.block_index("input_blocks.8.0.in_layers.2.weight") == 8
    assert K.block_index("middle_block.1.proj_in.weight") == 9
    assert K.block_index("output_blocks.0.1.proj_in.weight") == 10
    assert K.block_index("output_blocks.8.0.skip_connection.weight") == 18
    assert K.block_index("time_embed.0.weight") is None and K.block_index("out.2.weight") is None

    w = K.parse_block_weights("input=0.5, middle=0, output=1, output4=0.25")
    assert w[:9] == [0.5] * 9 and w[9] == 0.0 and w[14] == 0.25 and w[10] == 1.0
    assert K.parse_block_weights(",".join(str(i) for i in range(19))) == [float(i) for i in range(19)]
    assert K.parse_block_weights("") is None
    assert K.block_weight("output_blocks.4.1.proj_in.weight", w) == 0.25
    assert K.block_weight("time_embed.0.weight", w) == 1.0
    for bad in ("1,2,3", "input=x", "inptu=1", "1,input=2"):
        with pytest.raises(MumuError):
            K.parse_block_weights(bad)


def test_non_uniform_layers_per_block_is_refused():
    cfg = dict(tiny_unet_config(), layers_per_block=[1, 2, 2])
    with pytest.raises(MumuError, match="layers_per_block"):
        K.module_pairs(cfg)


@pytest.mark.parametrize("cfg", [
    K.SDXL_BASE_UNET_CONFIG, tiny_unet_config(), dict(K.SDXL_BASE_UNET_CONFIG, in_channels=9),
    dict(tiny_unet_config(), use_linear_projection=False, transformer_layers_per_block=3)],
    ids=["sdxl", "tiny", "sdxl-inpaint", "tiny-conv-proj"])
def test_python_derived_shapes_equal_diffusers_meta_device_model(cfg):
    # the engine derives names/shapes without diffusers; diffusers' own model is the reference
    assert K.diffusers_unet_shapes(cfg) == meta_device_shapes(cfg)
