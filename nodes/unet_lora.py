"""MUMU's SDXL UNet LoRA applied to a ComfyUI MODEL at runtime, at one strength or per UNet block.

Thin adapters over `mumu_core.unet_lora` (file loading) and `lora_patches` (ComfyUI patch dicts).
The nodes clone the MODEL and call `add_patches` once with the whole patch dict (ComfyUI's merge
nodes call it per key, and each call rebuilds the state dict). Baking the LoRA into a checkpoint
file is the merge node's job (`merge.py`).
"""

from __future__ import annotations

import importlib
import os

from . import _comfy
from .lora_patches import comfy_patches

_BLOCK_INPUTS = [f"input_{i}" for i in range(9)] + ["middle"] + [f"output_{i}" for i in range(9)]


def lora_choices() -> list[str]:
    """Bundles from models/mumu and .safetensors LoRAs from models/loras, as "folder/name"."""
    fp = _comfy.folder_paths()
    names = [f"mumu/{n}" for n in _comfy.list_bundles()]
    try:
        names += [f"loras/{n}" for n in fp.get_filename_list("loras") if n.lower().endswith(".safetensors")]
    except KeyError:
        pass
    return names


def _check_sdxl(model) -> None:
    try:
        sdxl_cls = importlib.import_module("comfy.model_base").SDXL
    except (ImportError, AttributeError):
        sdxl_cls = None
    inner = getattr(model, "model", None)
    if sdxl_cls is not None and not isinstance(inner, sdxl_cls):
        raise ValueError(f"MUMU's UNet LoRA fits SDXL models only, but this MODEL is "
                         f"{type(inner).__name__} (SD1.5, SD2, the SDXL refiner, SD3 and Flux have different "
                         f"UNets). Load an SDXL checkpoint (base or a finetune such as Juggernaut, Animagine, Pony).")


class _UnetLoraNode:
    """Base of the apply nodes: keeps the last LoRA file read on the node, as ComfyUI's LoraLoader
    does (`self.loaded_lora`), so re-running a workflow does not re-read it."""

    loaded_lora = None  # (path, mtime_ns, size, kohya state dict, info)

    def _load_lora(self, path: str):
        st = os.stat(path)
        hit = self.loaded_lora
        if hit and hit[0] == path and hit[1] == st.st_mtime_ns and hit[2] == st.st_size:
            return hit[3], hit[4]
        self.loaded_lora = None
        kohya, info = _comfy.core("unet_lora").load_unet_lora(path, compute_hash=False)
        self.loaded_lora = (path, st.st_mtime_ns, st.st_size, kohya, info)
        return kohya, info

    def _patched_clone(self, model, lora_choice: str, strength: float, block_weights):
        _check_sdxl(model)
        kohya, _ = self._load_lora(_comfy.resolve_lora(lora_choice))
        patches = comfy_patches(kohya, model.model_state_dict(), strength, block_weights=block_weights)
        clone = model.clone()
        clone.add_patches(patches, 1.0)  # strength and block weights are folded into each patch
        return clone


def lora_input(tooltip_extra: str = "") -> tuple:
    return (lora_choices(), {"tooltip": "MUMU bundle (mumu/…, its unet_lora part) or a standalone SDXL UNet LoRA "
                                        "(loras/…, kohya, ComfyUI or PEFT keys; .safetensors only)." + tooltip_extra})


def strength_input(default: float = 1.0) -> tuple:
    return ("FLOAT", {"default": default, "min": -4.0, "max": 4.0, "step": 0.01,
                      "tooltip": "LoRA strength: 1.0 = as trained; lower it when the finetune's style fights the "
                                 "MUMU conditioning, raise it if images ignore the image prompts."})


class MumuApplyUnetLora(_UnetLoraNode):
    CATEGORY = "MUMU/model"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A copy of the model with MUMU's UNet LoRA applied (the input model is unchanged).",)
    DESCRIPTION = ("Applies MUMU's UNet LoRA to any SDXL model (base or community finetune) at runtime, so MUMU "
                   "conditioning from MUMU Encode works in that model's style. Nothing is written to disk; use "
                   "MUMU Save Merged Checkpoint to bake it into a file.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SDXL model from Load Checkpoint (base or finetune)."}),
            "lora": lora_input(),
            "strength": strength_input(),
        }}

    def apply(self, model, lora, strength):
        return (self._patched_clone(model, lora, float(strength), None),)


def _block_tooltip(name: str) -> str:
    if name == "middle":
        return "Multiplier for the middle block (middle_block, the 1280-channel bottleneck)."
    side, i = name.split("_")
    return f"Multiplier for {side}_blocks.{i} of the SDXL UNet ({'encoder' if side == 'input' else 'decoder'} side)."


class MumuApplyUnetLoraBlocks(_UnetLoraNode):
    CATEGORY = "MUMU/model"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A copy of the model with MUMU's UNet LoRA applied per block.",)
    DESCRIPTION = ("Like MUMU Apply UNet LoRA, with a strength per SDXL UNet block (input 0-8, middle, output 0-8, "
                   "the blocks of ModelMergeSDXL). Each block's weight multiplies the overall strength, e.g. to "
                   "try lower output blocks when a finetune's style should dominate.")

    @classmethod
    def INPUT_TYPES(cls):
        blocks = {name: ("FLOAT", {"default": 1.0, "min": -2.0, "max": 2.0, "step": 0.01,
                                   "tooltip": _block_tooltip(name)}) for name in _BLOCK_INPUTS}
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SDXL model from Load Checkpoint (base or finetune)."}),
            "lora": lora_input(),
            "strength": strength_input(),
            **blocks,
        }}

    def apply(self, model, lora, strength, **blocks):
        weights = [float(blocks.get(name, 1.0)) for name in _BLOCK_INPUTS]
        return (self._patched_clone(model, lora, float(strength), weights),)


NODE_CLASS_MAPPINGS = {
    "MumuApplyUnetLora": MumuApplyUnetLora,
    "MumuApplyUnetLoraBlocks": MumuApplyUnetLoraBlocks,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MumuApplyUnetLora": "MUMU Apply UNet LoRA",
    "MumuApplyUnetLoraBlocks": "MUMU Apply UNet LoRA (per block)",
}
