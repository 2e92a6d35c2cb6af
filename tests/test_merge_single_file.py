"""Writing SDXL in the original single-file layout (what `mumu tiny` ships and finetunes use)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mumu_core.sdxl.single_file import (LDM_VAE_PREFIX, diffusers_folder_to_single_file, vae_diffusers_to_ldm,
                                        write_sdxl_single_file)
from mumu_core.tiny.configs import tiny_unet_config, tiny_vae_config


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**tiny_unet_config()), AutoencoderKL(**tiny_vae_config())
    folder = tmp_path_factory.mktemp("sdxl") / "sdxl"
    StableDiffusionXLPipeline(vae=vae, unet=unet, scheduler=EulerDiscreteScheduler(), text_encoder=None,
                              text_encoder_2=None, tokenizer=None, tokenizer_2=None).save_pretrained(folder)
    return folder, unet, vae


def test_vae_mapping_is_the_inverse_of_diffusers_converter(pipeline_folder):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    _, _, vae = pipeline_folder
    ldm = vae_diffusers_to_ldm(vae.state_dict(), vae.config)
    assert ldm["encoder.mid.attn_1.q.weight"].dim() == 4  # the original attention uses 1x1 convs
    assert "decoder.up.0.block.0.conv1.weight" in ldm and "encoder.down.0.downsample.conv.weight" in ldm
    back = convert_ldm_vae_checkpoint({LDM_VAE_PREFIX + k: v for k, v in ldm.items()}, dict(vae.config))
    sd = vae.state_dict()
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_single_file_loads_back_in_diffusers_with_identical_weights(pipeline_folder, tmp_path, dtype):
    from diffusers import StableDiffusionXLPipeline

    folder, unet, vae = pipeline_folder
    path = diffusers_folder_to_single_file(folder, tmp_path / "sdxl_tiny.safetensors", dtype=dtype)
    raw = load_file(str(path))
    assert sum(k.startswith("model.diffusion_model.") for k in raw) == len(unet.state_dict())
    assert sum(k.startswith(LDM_VAE_PREFIX) for k in raw) == len(vae.state_dict())
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(folder), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        local_files_only=True, torch_dtype=torch.float32)
    for got, want in ((pipe.unet.state_dict(), unet.state_dict()), (pipe.vae.state_dict(), vae.state_dict())):
        assert got.keys() == want.keys()
        for k in want:
            expected = want[k] if dtype is None else want[k].to(dtype).float()
            assert torch.equal(got[k].float(), expected), k
    assert not list(tmp_path.glob(".*partial*"))


def test_write_requires_vae_config(pipeline_folder, tmp_path):
    _, unet, vae = pipeline_folder
    with pytest.raises(ValueError, match="vae_config"):
        write_sdxl_single_file(unet.state_dict(), vae.state_dict(), tmp_path / "x.safetensors")
