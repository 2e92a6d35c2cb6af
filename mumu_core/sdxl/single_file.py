"""Write an SDXL model in the original single-file layout (what community finetunes ship).

diffusers converts single-file -> diffusers (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`)
but not back. The UNet direction reuses `sdxl.keys`; the VAE direction below is the exact inverse
of diffusers' VAE converter (checked in tests by converting back with diffusers):
  UNet  -> `model.diffusion_model.<ldm key>`
  VAE   -> `first_stage_model.<ldm key>` (mid-block attention projections become 1x1 convs)
CLIP tensors (`conditioner.embedders.0/1.`) are not written: MUMU replaces both text encoders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..atomic import atomic_write
from . import keys as K

LDM_VAE_PREFIX = "first_stage_model."
_VAE_ATTN = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))


def _vae_key_to_ldm(name: str, num_up_blocks: int) -> str:
    parts = name.split(".")
    side = parts[0]  # encoder | decoder | quant_conv | post_quant_conv
    rest = ".".join(parts[1:])
    if side not in ("encoder", "decoder"):
        return name
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest[len('conv_norm_out.'):]}"
    if rest.startswith(("conv_in.", "conv_out.")):
        return name
    if rest.startswith("mid_block.resnets."):
        i, tail = rest[len("mid_block.resnets."):].split(".", 1)
        return f"{side}.mid.block_{int(i) + 1}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
    if rest.startswith("mid_block.attentions.0."):
        tail = rest[len("mid_block.attentions.0."):]
        for d, o in _VAE_ATTN:
            if tail.startswith(d):
                return f"{side}.mid.attn_1.{o}{tail[len(d):]}"
    if rest.startswith(("down_blocks.", "up_blocks.")):
        kind, i, sub, j, tail = rest.split(".", 4)
        i = int(i)
        ldm_block = f"down.{i}" if kind == "down_blocks" else f"up.{num_up_blocks - 1 - i}"
        if sub == "resnets":
            return f"{side}.{ldm_block}.block.{j}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
        if sub in ("downsamplers", "upsamplers"):
            return f"{side}.{ldm_block}.{'downsample' if sub == 'downsamplers' else 'upsample'}.{tail}"
    raise KeyError(f"no original-layout name for VAE parameter {name!r}")


def vae_diffusers_to_ldm(vae_state_dict: dict[str, torch.Tensor], vae_config) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> original layout (no prefix)."""
    cfg = K.as_config_dict(vae_config)
    out = {}
    for name, t in vae_state_dict.items():
        key = _vae_key_to_ldm(name, len(cfg["up_block_types"]))
        if ".mid.attn_1." in key and key.endswith(".weight") and t.dim() == 2:
            t = t[:, :, None, None]  # the original attention uses 1x1 convs
        out[key] = t
    return out


def unet_diffusers_to_ldm(unet_state_dict: dict[str, torch.Tensor], unet_config) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> original layout (no prefix); shapes are unchanged."""
    return {K.diffusers_to_ldm(n, unet_config): t for n, t in unet_state_dict.items()}


def write_sdxl_single_file(unet_state_dict_diffusers: dict[str, torch.Tensor],
                           vae_state_dict_diffusers: dict[str, torch.Tensor] | None, out_path: str | os.PathLike,
                           dtype: torch.dtype | None = torch.float16, unet_config=None, vae_config=None,
                           metadata: dict[str, str] | None = None) -> Path:
    """Write UNet (+ VAE) as an original-layout SDXL checkpoint, atomically.

    `unet_config` defaults to SDXL base (any config with the SDXL topology, such as the tiny one,
    maps identically); `vae_config` is required with a VAE. dtype None keeps the tensors' dtypes.
    """
    from safetensors.torch import save_file

    sd = {}
    for k, t in unet_diffusers_to_ldm(unet_state_dict_diffusers, unet_config or K.SDXL_BASE_UNET_CONFIG).items():
        sd[K.LDM_UNET_PREFIX + k] = t
    if vae_state_dict_diffusers is not None:
        if vae_config is None:
            raise ValueError("vae_config is needed to name the VAE's up blocks")
        for k, t in vae_diffusers_to_ldm(vae_state_dict_diffusers, vae_config).items():
            sd[LDM_VAE_PREFIX + k] = t
    sd = {k: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous() for k, t in sd.items()}
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models", **(metadata or {})}
    return atomic_write(out_path, lambda tmp: save_file(sd, tmp, metadata=meta))


def _load_component(folder: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    from safetensors.torch import load_file

    if not (folder / "config.json").is_file():
        return None
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        if (folder / name).is_file():
            return load_file(str(folder / name)), json.loads((folder / "config.json").read_text())
    return None


def diffusers_folder_to_single_file(folder: str | os.PathLike, out_path: str | os.PathLike,
                                    dtype: torch.dtype | None = None) -> Path:
    """A diffusers SDXL pipeline folder (unet/ + vae/) -> original-layout single file (dtype None = as stored).

    Loads one component at a time: meant for the tiny offline SDXL and modest models.
    """
    folder = Path(folder)
    unet = _load_component(folder / "unet")
    if unet is None:
        raise FileNotFoundError(f"{folder}/unet has no config.json + diffusion_pytorch_model.safetensors")
    vae = _load_component(folder / "vae")
    return write_sdxl_single_file(unet[0], vae[0] if vae else None, out_path, dtype=dtype, unet_config=unet[1],
                                  vae_config=vae[1] if vae else None)
