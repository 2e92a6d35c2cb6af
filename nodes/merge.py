"""MUMU Save Merged Checkpoint: bake MUMU's UNet LoRA into an SDXL finetune file with the streaming merge engine.

The node streams from the finetune file on disk (`mumu_core.merge`), so RAM never holds a second
copy of the model; the output goes to ComfyUI's output folder under a new counter, never over a
file that exists.
"""

from __future__ import annotations

from . import _comfy
from .unet_lora import lora_input, strength_input

_SAVE_DIR = "checkpoints"


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
            "lora": lora_input(),
            "strength": strength_input(),
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
        lora_path = _comfy.resolve_lora(lora)
        out = _comfy.output_path(filename_prefix, default=f"{_SAVE_DIR}/MUMU_merged")
        mm = _comfy.model_management()
        pbar = _comfy.utils().ProgressBar(1000)

        def progress(done, total):
            mm.throw_exception_if_processing_interrupted()  # Cancel aborts; the partial file is removed
            pbar.update_absolute(int(1000 * done / max(total, 1)), 1000)

        report = _comfy.core("merge").merge_checkpoint(ckpt, out, lora=lora_path, strength=float(strength),
                                                       block_weights=block_weights or None, progress=progress)
        return {"ui": {"text": [report.summary()]}, "result": ()}


NODE_CLASS_MAPPINGS = {"MumuSaveMergedCheckpoint": MumuSaveMergedCheckpoint}
NODE_DISPLAY_NAME_MAPPINGS = {"MumuSaveMergedCheckpoint": "MUMU Save Merged Checkpoint"}
