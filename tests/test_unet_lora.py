"""UNet LoRA formats: PEFT <-> kohya, file loading, deltas, diffusers load_lora_weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from mumu_core.errors import MumuError
from mumu_core.sdxl import keys as K
from mumu_core.tiny.configs import tiny_unet_config, tiny_vae_config
from mumu_core.unet_lora import (kohya_to_peft, load_unet_lora, lora_deltas, lora_modules,
                                 normalize_unet_lora, peft_unet_lora_to_kohya, save_unet_lora)

RANK, ALPHA = 4, 8.0  # alpha != rank on purpose: scale 2.0
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
           "time_emb_proj", "conv_shortcut", "conv", "linear_1", "linear_2", "conv_in", "conv_out"]



pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")

@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config()).eval()


@pytest.fixture(scope="module")
def peft_sd(unet):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    model = copy.deepcopy(unet)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS), model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return get_peft_model_state_dict(model)


@pytest.fixture(scope="module")
def kohya(peft_sd, unet):
    return peft_unet_lora_to_kohya(peft_sd, unet.config, alpha=ALPHA)


def test_peft_to_kohya_keys_values_alpha(peft_sd, kohya, unet):
    n_modules = len(peft_sd) // 2
    assert len(kohya) == 3 * n_modules
    stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q"
    peft_key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"
    assert torch.equal(kohya[f"{stem}.lora_down.weight"], peft_sd[f"{peft_key}.lora_A.weight"])
    assert torch.equal(kohya[f"{stem}.lora_up.weight"], peft_sd[f"{peft_key}.lora_B.weight"])
    assert kohya[f"{stem}.alpha"].item() == ALPHA and kohya[f"{stem}.alpha"].dim() == 0
    # resnet convs use ldm names; the conv LoRA keeps its 4-D shape
    assert kohya["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].shape == (RANK, 32, 3, 3)
    # up block 0 has attention, so its upsampler is the third module of output_blocks.2
    assert "lora_unet_output_blocks_2_2_conv.lora_up.weight" in kohya
    # a base_model.model. prefix (PeftModel) gives the same result
    prefixed = {f"base_model.model.{k}": v for k, v in peft_sd.items()}
    assert peft_unet_lora_to_kohya(prefixed, unet.config, alpha=ALPHA).keys() == kohya.keys()


def test_kohya_to_peft_round_trip(peft_sd, kohya, unet):
    back, alphas = kohya_to_peft(kohya, unet.config)
    assert back.keys() == peft_sd.keys()
    assert all(torch.equal(back[k], peft_sd[k]) for k in back)
    assert set(alphas.values()) == {ALPHA}


def test_deltas_scale_alpha_over_rank_and_block_weights(kohya, peft_sd):
    blocks = K.parse_block_weights("input=0.5,middle=0,output=2")
    deltas = dict(lora_deltas(kohya, strength=0.7, block_weights=blocks))
    key = "output_blocks.3.1.transformer_blocks.0.attn1.to_v.weight"  # up_blocks.1.attentions.0
    a = peft_sd["up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v.lora_A.weight"]
    b = peft_sd["up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v.lora_B.weight"]
    torch.testing.assert_close(deltas[key], 0.7 * 2.0 * (ALPHA / RANK) * (b @ a), rtol=1e-6, atol=1e-7)
    assert deltas["middle_block.1.proj_in.weight"].abs().max() == 0
    # outside the 19 blocks (time embedding) only the strength applies
    a = peft_sd["time_embedding.linear_1.lora_A.weight"]
    b = peft_sd["time_embedding.linear_1.lora_B.weight"]
    torch.testing.assert_close(deltas["time_embed.0.weight"], 0.7 * (ALPHA / RANK) * (b @ a))
    # conv delta has the conv weight's shape
    assert deltas["input_blocks.1.0.in_layers.2.weight"].shape == (32, 32, 3, 3)


def test_diffusers_load_lora_weights_applies_every_module_exactly(kohya, unet):
    """The exported kohya LoRA loads in diffusers with nothing dropped and the exact expected delta."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**tiny_vae_config()), unet=copy.deepcopy(unet),
        scheduler=EulerDiscreteScheduler(),
        text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    from mumu_core.compat import diffusers_version

    if diffusers_version() < (0, 39):
        # diffusers < 0.39 raises on kohya modules outside the 19 blocks (see compat.diffusers_version):
        # check everything else there; 0.39+ (the newest end of CI) checks all of them
        outside = ("lora_unet_input_blocks_0_0.", "lora_unet_time_embed_", "lora_unet_out_", "lora_unet_label_emb_")
        kohya = {k: v for k, v in kohya.items() if not k.startswith(outside)}
    pipe.load_lora_weights({k: v.clone() for k, v in kohya.items()})
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    fused, base = pipe.unet.state_dict(), unet.state_dict()
    ldm_to_diff = {v: k for k, v in K.unet_key_map(unet.config).items()}
    modules = lora_modules(kohya)
    expected_changed = {ldm_to_diff[k] for k in modules}
    changed = {k for k in base if not torch.equal(base[k], fused[k])}
    assert changed == expected_changed  # every LoRA module applied, nothing else touched
    for ldm_key, m in modules.items():
        d = ldm_to_diff[ldm_key]
        torch.testing.assert_close(fused[d], base[d] + m.delta(1.0, base[d].shape), rtol=1e-5, atol=1e-6)


def _write(path, sd, metadata=None):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def test_load_every_file_format_gives_the_same_lora(tmp_path, kohya, peft_sd):
    comfy = {}
    for k, v in kohya.items():
        stem, _, suffix = k.partition(".")
        comfy[f"diffusion_model.{K.stem_to_ldm_module(stem, tiny_unet_config())}.{suffix}"] = v
    peft_file = {f"unet.{k}": v for k, v in peft_sd.items()}
    bundle = {f"unet_lora.{k}": v for k, v in kohya.items()}
    bundle["adapter.proj.weight"] = torch.zeros(2, 2)
    files = {
        "kohya": _write(tmp_path / "k.safetensors", kohya),
        "comfy": _write(tmp_path / "c.safetensors", comfy),
        "peft": _write(tmp_path / "p.safetensors", peft_file),
        "mumu-bundle": _write(tmp_path / "b.safetensors", bundle, {"mumu_config": json.dumps({"format_version": 1})}),
    }
    for fmt, path in files.items():
        sd, info = load_unet_lora(path)
        assert info["format"] == fmt
        assert len(info["sha256"]) == 64
        if fmt == "peft":  # PEFT files carry no alpha: alpha defaults to rank (scale 1)
            assert info["alphas"] == [float(RANK)]
            continue
        assert sd.keys() == kohya.keys() and all(torch.equal(sd[k], kohya[k]) for k in sd), fmt
    assert load_unet_lora(files["mumu-bundle"])[1]["mumu_config"] == {"format_version": 1}


def test_save_unet_lora_round_trip(tmp_path, kohya):
    path = save_unet_lora(tmp_path / "lora.safetensors", kohya, dtype=torch.float16)
    sd, info = load_unet_lora(path)
    assert info["format"] == "kohya" and sd.keys() == kohya.keys()
    assert sd["lora_unet_out_2.lora_up.weight"].dtype == torch.float16
    assert not list(tmp_path.glob(".*partial*"))


def test_bad_files_are_refused_cleanly(tmp_path, kohya):
    pickle = tmp_path / "lora.ckpt"
    torch.save({"a": torch.zeros(1)}, pickle)
    with pytest.raises(MumuError, match="pickle|zip"):
        load_unet_lora(pickle)
    good = _write(tmp_path / "good.safetensors", kohya)
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MumuError, match="truncated"):
        load_unet_lora(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(MumuError, match="not valid JSON"):
        load_unet_lora(tmp_path / "junk.safetensors")


def test_unmatched_and_text_encoder_keys():
    sd = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 64),
          "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(64, 2),
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8)}
    out, info = normalize_unet_lora(sd)
    assert info["ignored"] == ["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]
    assert out["lora_unet_input_blocks_4_1_proj_in.alpha"].item() == 2.0  # absent alpha = rank
    bad = dict(sd, **{"lora_unet_input_blocks_99_1_proj_in.lora_down.weight": torch.zeros(2, 64)})
    with pytest.raises(MumuError, match="input_blocks_99"):
        normalize_unet_lora(bad)
    with pytest.raises(MumuError, match="both down"):
        normalize_unet_lora({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 64)})
