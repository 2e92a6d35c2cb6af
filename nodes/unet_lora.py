"""MUMU's SDXL UNet LoRA in ComfyUI: apply at runtime (optionally per block) or bake into a finetune file.

Thin adapters over `mumu_core.unet_lora` (patch building) and `mumu_core.merge` (streaming engine).
Runtime nodes clone the MODEL and call `add_patches` once with the whole patch dict (ComfyUI's merge
nodes call it per key, and each call rebuilds the state dict). The save node streams from the
finetune file on disk, so RAM never holds a second copy of the model.
"""

from __future__ import annotations

import importlib
import os
import re

from . import _comfy

_LORA_FOLDERS = ("mumu", "loras")
_BLOCK_INPUTS = [f"input_{i}" for i in range(9)] + ["middle"] + [f"output_{i}" for i in range(9)]
_SAVE_DIR = "checkpoints"
_lora_cache: dict = {}  # path -> (mtime, size, kohya state dict, info); a workflow re-runs with the same file


def _lora_choices() -> list[str]:
    """Bundles from models/mumu and .safetensors LoRAs from models/loras, as "folder/name"."""
    fp = _comfy.folder_paths()
    names = [f"mumu/{n}" for n in _comfy.list_bundles()]
    try:
        names += [f"loras/{n}" for n in fp.get_filename_list("loras") if n.lower().endswith(".safetensors")]
    except KeyError:
        pass
    return names


def _resolve_lora(choice: str) -> str:
    folder, _, name = str(choice).partition("/")
    if folder not in _LORA_FOLDERS or not name:
        raise ValueError(f"LoRA '{choice}' is not from the list; pick a file from models/mumu or models/loras.")
    if folder == "mumu":
        return _comfy.resolve_bundle(name)
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or any(p in ("", ".", "..") for p in parts) or not name.lower().endswith(".safetensors"):
        raise ValueError(f"LoRA '{choice}' is not a plain .safetensors name inside models/loras; pick it from the "
                         f"list.")
    return _comfy.folder_paths().get_full_path_or_raise("loras", name)


def _load_lora(path: str):
    st = os.stat(path)
    hit = _lora_cache.get(path)
    if hit and hit[0] == st.st_mtime_ns and hit[1] == st.st_size:
        return hit[2], hit[3]
    kohya, info = _comfy.core("unet_lora").load_unet_lora(path, compute_hash=False)
    _lora_cache.clear()
    _lora_cache[path] = (st.st_mtime_ns, st.st_size, kohya, info)
    return kohya, info


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


def _patched_clone(model, lora_choice: str, strength: float, block_weights):
    _check_sdxl(model)
    kohya, _ = _load_lora(_resolve_lora(lora_choice))
    patches = _comfy.core("unet_lora").comfy_patches(kohya, model.model_state_dict(), strength,
                                                     block_weights=block_weights)
    clone = model.clone()
    clone.add_patches(patches, 1.0)  # strength and block weights are folded into each patch
    return clone


def _lora_input(tooltip_extra: str = "") -> tuple:
    return (_lora_choices(), {"tooltip": "MUMU bundle (mumu/…, its unet_lora part) or a standalone SDXL UNet LoRA "
                                         "(loras/…, kohya, ComfyUI or PEFT keys; .safetensors only)." + tooltip_extra})


def _strength_input(default: float = 1.0) -> tuple:
    return ("FLOAT", {"default": default, "min": -4.0, "max": 4.0, "step": 0.01,
                      "tooltip": "LoRA strength: 1.0 = as trained; lower it when the finetune's style fights the "
                                 "MUMU conditioning, raise it if images ignore the image prompts."})


class MumuApplyUnetLora:
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
            "lora": _lora_input(),
            "strength": _strength_input(),
        }}

    def apply(self, model, lora, strength):
        return (_patched_clone(model, lora, float(strength), None),)


def _block_tooltip(name: str) -> str:
    if name == "middle":
        return "Multiplier for the middle block (middle_block, the 1280-channel bottleneck)."
    side, i = name.split("_")
    return f"Multiplier for {side}_blocks.{i} of the SDXL UNet ({'encoder' if side == 'input' else 'decoder'} side)."


class MumuApplyUnetLoraBlocks:
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
            "lora": _lora_input(),
            "strength": _strength_input(),
            **blocks,
        }}

    def apply(self, model, lora, strength, **blocks):
        weights = [float(blocks.get(name, 1.0)) for name in _BLOCK_INPUTS]
        return (_patched_clone(model, lora, float(strength), weights),)


def _output_path(filename_prefix: str) -> str:
    fp = _comfy.folder_paths()
    root = os.path.abspath(fp.get_output_directory())
    prefix = str(filename_prefix).strip().replace("\\", "/") or f"{_SAVE_DIR}/MUMU_merged"
    parts = prefix.split("/")
    if os.path.isabs(prefix) or any(p in ("", ".", "..") for p in parts) or re.search(r"[\x00:*?\"<>|]", prefix):
        raise ValueError(f"filename_prefix '{filename_prefix}' must be a plain relative name inside ComfyUI's "
                         f"output folder, like '{_SAVE_DIR}/MUMU_merged'.")
    folder = os.path.join(root, *parts[:-1])
    if os.path.commonpath([os.path.abspath(folder), root]) != root:
        raise ValueError(f"filename_prefix '{filename_prefix}' leaves the output folder.")
    os.makedirs(folder, exist_ok=True)
    counter = 1
    while True:
        path = os.path.join(folder, f"{parts[-1]}_{counter:05}_.safetensors")
        if not os.path.exists(path):
            return path
        counter += 1


class MumuSaveMergedCheckpoint:
    CATEGORY = "MUMU/model"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    RETURN_NAMES = ()
    OUTPUT_TOOLTIPS = ()
    DESCRIPTION = ("Bakes MUMU's UNet LoRA into an SDXL checkpoint file: streams the chosen checkpoint from disk "
                   "tensor by tensor into output/checkpoints/… (CLIP and VAE copied unchanged), so RAM never holds "
                   "a second copy of the model. The file carries metadata on the sources and how much of the change "
                   "survived rounding to the checkpoint's precision. Runtime application (MUMU Apply UNet LoRA) "
                   "keeps full precision and needs no disk space.")

    @classmethod
    def INPUT_TYPES(cls):
        fp = _comfy.folder_paths()
        try:
            ckpts = [n for n in fp.get_filename_list("checkpoints") if n.lower().endswith(".safetensors")]
        except KeyError:
            ckpts = []
        return {"required": {
            "ckpt_name": (ckpts, {"tooltip": "The SDXL finetune in models/checkpoints to merge into (single-file "
                                             ".safetensors, fp16/bf16/fp32; it is only read)."}),
            "lora": _lora_input(),
            "strength": _strength_input(),
            "block_weights": ("STRING", {"default": "", "tooltip": "Optional per-block strengths, e.g. "
                                         "'input=1,middle=1,output=0.8' or 19 numbers (input 0-8, middle, output "
                                         "0-8). Empty = 1.0 everywhere."}),
            "filename_prefix": ("STRING", {"default": f"{_SAVE_DIR}/MUMU_merged",
                                           "tooltip": "Output name inside ComfyUI's output folder; a counter and "
                                                      ".safetensors are appended."}),
        }}

    def save(self, ckpt_name, lora, strength, block_weights, filename_prefix):
        fp = _comfy.folder_paths()
        if ckpt_name not in [n for n in fp.get_filename_list("checkpoints")]:
            raise ValueError(f"checkpoint '{ckpt_name}' is not in models/checkpoints; pick it from the list.")
        ckpt = fp.get_full_path_or_raise("checkpoints", ckpt_name)
        lora_path = _resolve_lora(lora)
        out = _output_path(filename_prefix)
        mm = _comfy.model_management()
        pbar = _comfy.utils().ProgressBar(1000)

        def progress(done, total):
            mm.throw_exception_if_processing_interrupted()  # Cancel aborts; the partial file is removed
            pbar.update_absolute(int(1000 * done / max(total, 1)), 1000)

        report = _comfy.core("merge").merge_checkpoint(ckpt, out, lora=lora_path, strength=float(strength),
                                                       block_weights=block_weights or None, progress=progress)
        return {"ui": {"text": [report.summary()]}, "result": ()}


NODE_CLASS_MAPPINGS = {
    "MumuApplyUnetLora": MumuApplyUnetLora,
    "MumuApplyUnetLoraBlocks": MumuApplyUnetLoraBlocks,
    "MumuSaveMergedCheckpoint": MumuSaveMergedCheckpoint,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MumuApplyUnetLora": "MUMU Apply UNet LoRA",
    "MumuApplyUnetLoraBlocks": "MUMU Apply UNet LoRA (per block)",
    "MumuSaveMergedCheckpoint": "MUMU Save Merged Checkpoint",
}
