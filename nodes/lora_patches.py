"""ComfyUI patch dicts from a MUMU UNet LoRA: what `ModelPatcher.add_patches` takes.

The core (`mumu_core.unet_lora`) knows the LoRA as format-neutral modules keyed by original (ldm)
weight names; this module turns them into ComfyUI's patch values, so the library never imports
ComfyUI.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from . import _comfy


def lora_adapter_class():
    """ComfyUI's own `LoRAAdapter` (ComfyUI >= 0.3.3x), or None where `comfy.weight_adapter` is absent."""
    try:
        from comfy.weight_adapter.lora import LoRAAdapter
    except ImportError:
        return None
    return LoRAAdapter


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def comfy_patches(lora_state_dict: Mapping, model_state_keys: Iterable[str] | Mapping, strength: float,
                  block_weights: list[float] | None = None, form: str = "auto", unet_config=None) -> dict:
    """The ONE dict for `ModelPatcher.add_patches(patches, 1.0)` applying the LoRA to a ComfyUI SDXL model.

    Keys are `diffusion_model.<ldm key>`. form "lora": ComfyUI's own LoRAAdapter (what its LoRA
    loader builds; low memory: the delta is formed at patch time) with strength and block weight
    folded into alpha; "diff": full fp32 deltas `("diff", (delta,))`, understood by every ComfyUI
    version; "auto": "lora" when `comfy.weight_adapter` exists. Every LoRA module must match a
    model key (else MumuError listing them); shapes are checked when `model_state_keys` maps keys
    to tensors.
    """
    K = _comfy.core("sdxl.keys")
    MumuError = _comfy.core("errors").MumuError
    if form not in ("auto", "lora", "diff"):
        raise ValueError(f"form must be auto, lora or diff, not {form!r}")
    adapter_cls = lora_adapter_class() if form in ("auto", "lora") else None
    if form == "lora" and adapter_cls is None:
        raise MumuError("this ComfyUI has no comfy.weight_adapter (too old); use form='diff'.")
    shapes = None
    if isinstance(model_state_keys, Mapping):
        shapes = {k: tuple(getattr(v, "shape", ())) for k, v in model_state_keys.items()}
        keys = set(shapes)
    else:
        keys = set(model_state_keys)
    modules = _comfy.core("unet_lora").lora_modules(lora_state_dict, unet_config)
    missing = [k for k in modules if K.COMFY_UNET_PREFIX + k not in keys]
    if missing:
        raise MumuError(f"{len(missing)} of {len(modules)} LoRA modules have no weight in this model, e.g. "
                        f"{', '.join(missing[:5])}. The model is not an SDXL UNet with the layers this LoRA was "
                        f"trained on.")
    patches = {}
    for ldm_key, m in modules.items():
        key = K.COMFY_UNET_PREFIX + ldm_key
        weight = strength * K.block_weight(ldm_key, block_weights)
        target = shapes.get(key) if shapes else None
        if target is not None and _numel(target) != _numel(m.out_shape()):
            raise MumuError(f"LoRA module {ldm_key} makes a {list(m.out_shape())} change but the model's weight is "
                            f"{list(target)}; the LoRA belongs to a different model size.")
        if weight == 0.0:
            continue
        if adapter_cls is not None:
            # LoRAAdapter scales by strength * v[2] / rank: fold our multiplier into alpha
            patches[key] = adapter_cls(set(), (m.up, m.down, m.alpha * weight, None, None, None))
        else:
            patches[key] = ("diff", (m.delta(weight, target),))
    return patches
