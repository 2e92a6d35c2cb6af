"""What model is in a safetensors file? SDXL detection from key names and shapes, before any write.

Mirrors ComfyUI's own detection (`comfy/model_detection.py`: context dim from attn2.to_k, ADM
width from label_emb, linear proj_in) so a file we accept is one ComfyUI loads as SDXL, then
checks every UNet key and shape against the exact table derived from the UNet config.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MumuError
from . import keys as K

_DIFFUSERS_MARKERS = ("conv_in.weight", "down_blocks.", "mid_block.", "up_blocks.")


@dataclass
class UnetLayout:
    """Where the UNet lives in a file and how its names map to ldm keys."""

    kind: str  # "single-file" | "ldm-unet" | "comfy-unet" | "diffusers-unet"
    prefix: str  # prefix before ldm keys ("" for diffusers names)
    to_ldm: dict[str, str]  # file tensor name -> ldm key, for every UNet tensor in the file
    config: dict  # the UNet config the shapes were checked against
    variant: str  # human description, e.g. "SDXL (base/finetune)", "SDXL inpainting", "tiny SDXL topology"


def _family_from_keys(joined: list[str]) -> str | None:
    if any("double_blocks." in k or "single_blocks." in k for k in joined):
        return "a Flux model"
    if any("joint_blocks." in k for k in joined):
        return "an SD3 model"
    if any(k.startswith(("adapter.", "vlm_lora.", "unet_lora.")) for k in joined):
        return "a MUMU bundle (pass it with --lora)"
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in joined):
        return "a LoRA (pass it with --lora, not --checkpoint)"
    if any(k.startswith("first_stage_model.") for k in joined) and not any("input_blocks.0.0" in k for k in joined):
        return "a checkpoint without a UNet (VAE/CLIP only)"
    return None


def _unet_features(ldm_shapes: dict[str, tuple]) -> tuple[int | None, int | None]:
    ctx = next((s[1] for k, s in ldm_shapes.items() if k.endswith("attn2.to_k.weight") and len(s) == 2), None)
    adm = ldm_shapes.get("label_emb.0.0.weight", (None, None))[1]
    return ctx, adm


def _name_family(ctx, adm) -> str:
    if ctx == 768:
        return "SD 1.x (cross-attention width 768)"
    if ctx == 1024:
        return "SD 2.x (cross-attention width 1024)"
    if ctx == 1280 and adm == 2560:
        return "the SDXL refiner (cross-attention 1280, ADM 2560; MUMU targets the SDXL base UNet)"
    if ctx is None:
        return "a UNet without cross-attention"
    return f"an unknown UNet (cross-attention width {ctx}, ADM width {adm})"


def _split_unet(keys: list[str]) -> tuple[str, str] | None:
    """(kind, prefix) of the UNet tensors in a file, or None if there are none."""
    if sum(k.startswith(K.LDM_UNET_PREFIX) for k in keys) > 5:
        return "single-file", K.LDM_UNET_PREFIX
    if sum(k.startswith(K.COMFY_UNET_PREFIX) for k in keys) > 5:
        return "comfy-unet", K.COMFY_UNET_PREFIX
    if "input_blocks.0.0.weight" in keys:
        return "ldm-unet", ""
    if "conv_in.weight" in keys and any(k.startswith(_DIFFUSERS_MARKERS[1:]) for k in keys):
        return "diffusers-unet", ""
    return None


def _candidate_configs(ldm_shapes: dict[str, tuple], diffusers_config: dict | None) -> list[tuple[dict, str]]:
    from ..tiny.configs import tiny_unet_config

    out = []
    if diffusers_config is not None:
        out.append((K.as_config_dict(diffusers_config), "SDXL (diffusers config)"))
    conv_in = ldm_shapes.get("input_blocks.0.0.weight")
    in_ch = conv_in[1] if conv_in and len(conv_in) == 4 else 4
    sdxl = dict(K.SDXL_BASE_UNET_CONFIG, in_channels=in_ch)
    out.append((sdxl, "SDXL" if in_ch == 4 else f"SDXL inpainting ({in_ch} input channels)"))
    out.append((K.as_config_dict(tiny_unet_config()), "tiny SDXL topology (mumu tiny)"))
    return out


def detect_sdxl_unet(shapes: dict[str, tuple], what: str = "checkpoint", diffusers_config: dict | None = None
                     ) -> UnetLayout:
    """Check that `shapes` (a file's tensor names -> shapes) hold an SDXL UNet; MumuError otherwise.

    The message names what was found (SD1.5, SD2, refiner, SD3, Flux, a LoRA...) so users know why.
    """
    keys = list(shapes)
    family = _family_from_keys(keys)
    if family:
        raise MumuError(f"{what} is {family}, not an SDXL checkpoint. MUMU merges into SDXL-based models "
                        f"(SDXL base, Juggernaut, RealVis, Animagine, Pony...).")
    split = _split_unet(keys)
    if split is None:
        raise MumuError(f"{what} has no UNet tensors ({len(keys)} tensors, e.g. {', '.join(keys[:3])}); expected an "
                        f"SDXL checkpoint with `model.diffusion_model.*` keys or a diffusers UNet.")
    kind, prefix = split
    if kind == "diffusers-unet":
        to_ldm = {}
        for k in keys:
            try:
                to_ldm[k] = K.diffusers_to_ldm(k, diffusers_config or K.SDXL_BASE_UNET_CONFIG)
            except KeyError:
                pass
    else:
        to_ldm = {k: k[len(prefix):] for k in keys if k.startswith(prefix)}
    ldm_shapes = {to_ldm[k]: tuple(shapes[k]) for k in to_ldm}
    ctx, adm = _unet_features(ldm_shapes)
    if ctx != 2048 or adm != 2816:
        raise MumuError(f"{what} is {_name_family(ctx, adm)}, not SDXL. MUMU's UNet LoRA only fits SDXL-based "
                        f"models (cross-attention 2048, ADM 2816).")
    problems_by_candidate = []
    for cfg, variant in _candidate_configs(ldm_shapes, diffusers_config):
        expected = K.ldm_unet_shapes(cfg)
        missing = [k for k in expected if k not in ldm_shapes]
        wrong = [f"{k} {list(ldm_shapes[k])} (expected {list(s)})" for k, s in expected.items()
                 if k in ldm_shapes and tuple(ldm_shapes[k]) != tuple(s)]
        if not missing and not wrong:
            return UnetLayout(kind, prefix, to_ldm, cfg, variant)
        problems_by_candidate.append((len(missing) + len(wrong), variant, missing, wrong))
    _, variant, missing, wrong = min(problems_by_candidate, key=lambda p: p[0])
    detail = "; ".join(filter(None, [
        f"missing {len(missing)} keys, e.g. {', '.join(missing[:3])}" if missing else "",
        f"{len(wrong)} shapes differ, e.g. {', '.join(wrong[:3])}" if wrong else ""]))
    raise MumuError(f"{what} looks SDXL-like (cross-attention 2048, ADM 2816) but its UNet does not match the "
                    f"{variant} layout: {detail}. The file may be damaged or a modified architecture.")
