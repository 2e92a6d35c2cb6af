"""MUMU Encoder Loader: VLM folder + bundle -> MUMU_ENCODER (a ComfyUI ModelPatcher)."""

from __future__ import annotations

from . import _comfy

DTYPES = ["auto", "fp32", "fp16", "bf16", "fp8_e4m3fn", "int8"]
WEIGHT_STORAGE = ("fp8_e4m3fn", "int8")  # storage only: linear weights in 8 bits, computed in what "auto" picks


def _torch_dtype(name: str, load_device):
    import torch

    if name == "auto" or name in WEIGHT_STORAGE:
        # fp16/bf16 on CPU are slow or unsupported for some ops: CPU runs in fp32. On a GPU,
        # bf16 where ComfyUI says it is fast (Idefics2's Mistral was trained in bf16), else fp16.
        if getattr(load_device, "type", str(load_device)) == "cpu":
            return torch.float32
        mm = _comfy.model_management()
        should_bf16 = getattr(mm, "should_use_bf16", None)
        return torch.bfloat16 if should_bf16 is not None and should_bf16(load_device) else torch.float16
    return _comfy.core("dtypes").DTYPES[name]


class MumuEncoderLoader:
    """Loads the VLM (Hugging Face folder) and a MUMU bundle into one encoder ComfyUI can offload."""

    CATEGORY = "MUMU/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("MUMU_ENCODER",)
    RETURN_NAMES = ("mumu_encoder",)
    OUTPUT_TOOLTIPS = ("The MUMU encoder (VLM without perceiver + adapter); connect it to MUMU Encode.",)
    DESCRIPTION = (
        "Loads the MUMU prompt encoder: a vision-language model folder (Idefics2/Idefics3 in Hugging Face "
        "layout, e.g. models/mumu/idefics2-8b) and a MUMU bundle (.safetensors in models/mumu) holding the "
        "adapter and the VLM LoRA. It replaces SDXL's CLIP text encoders. The weights load when the node "
        "runs and ComfyUI moves them between GPU and RAM like any other model."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vlm_folder": (_comfy.list_vlm_folders(), {
                    "tooltip": "Folder in models/mumu (or a mumu path from extra_model_paths.yaml) holding the "
                               "VLM in Hugging Face layout: config.json, *.safetensors, tokenizer files. "
                               "Must be the VLM the bundle was trained on (e.g. idefics2-8b)."}),
                "bundle": (_comfy.list_bundles(), {
                    "tooltip": "MUMU bundle (.safetensors in models/mumu): adapter + VLM LoRA (+ UNet LoRA for "
                               "MUMU Apply UNet LoRA)."}),
                "dtype": (DTYPES, {
                    "default": "auto",
                    "tooltip": "Weight precision. auto: fp32 on CPU; on GPU bf16 where supported, else fp16. "
                               "fp8_e4m3fn / int8: the VLM's linear weights stored in 8 bits and computed in "
                               "bf16/fp16, like ComfyUI's fp8 text encoders: Idefics2-8b needs ~8.5 GB instead of "
                               "~16 GB (fits 12 GB GPUs). int8 (per-row scales) stays closer to bf16 than fp8 at "
                               "the same size. fp32: ~32 GB."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, vlm_folder):
        # Replaces ComfyUI's bare "value not in list" for the VLM folder with where to download it,
        # and rejects names that try to leave models/mumu before anything runs. Only vlm_folder is
        # taken: ComfyUI repeats this message for every input named here. The bundle keeps the
        # stock list check (so only listed files pass) and is resolved safely again in load().
        try:
            _comfy.resolve_vlm_folder(vlm_folder)
        except (FileNotFoundError, ValueError) as exc:
            return str(exc)
        return True

    def load(self, vlm_folder, bundle, dtype="auto"):
        vlm_dir = _comfy.resolve_vlm_folder(vlm_folder)
        bundle_path = _comfy.resolve_bundle(bundle)
        mm = _comfy.model_management()
        load_device = mm.get_torch_device()
        offload = getattr(mm, "text_encoder_offload_device", None) or mm.unet_offload_device
        offload_device = offload()
        encoder_mod = _comfy.core("encoder")
        encoder = encoder_mod.MumuEncoder.from_pretrained(
            vlm_dir, bundle_path, dtype=_torch_dtype(dtype, load_device), device=offload_device,
            weight_storage=dtype if dtype in WEIGHT_STORAGE else None)
        # The patcher reads `model.device`; record where the weights are now.
        encoder.device = offload_device
        encoder.mumu_source = {"vlm_folder": vlm_folder, "bundle": bundle, "bundle_path": bundle_path}
        patcher = _comfy.model_patcher().ModelPatcher(encoder, load_device=load_device, offload_device=offload_device)
        return (patcher,)


NODE_CLASS_MAPPINGS = {"MumuEncoderLoader": MumuEncoderLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"MumuEncoderLoader": "MUMU Encoder Loader"}
