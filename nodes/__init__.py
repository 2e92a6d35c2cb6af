"""Node registry of the pack: merges the mappings of each node module.

Only relative imports (ComfyUI imports the pack by file path) and nothing heavy at import time:
the node modules import torch / transformers / mumu_core's models inside their functions.
"""

from __future__ import annotations

import importlib
import logging

from . import _comfy

_comfy.ensure_core()
_comfy.register_model_folder()

from . import encode, loaders, prompt  # noqa: E402  (after the core and the folder are registered)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

_modules = [loaders, prompt, encode]
try:
    unet_lora = importlib.import_module(f"{__name__}.unet_lora")  # UNet-LoRA / merge nodes
except ModuleNotFoundError as exc:
    # Only tolerate the module itself being absent (a partial checkout); an import error
    # *inside* it is a bug and must show up as ComfyUI's "IMPORT FAILED".
    if exc.name != f"{__name__}.unet_lora":
        raise
    logging.getLogger("comfyui_mumu").warning("ComfyUI-MUMU: nodes/unet_lora.py is missing; "
                                              "the UNet LoRA nodes are not available.")
else:
    _modules.append(unet_lora)

for _module in _modules:
    for _name in _module.NODE_CLASS_MAPPINGS:
        if _name in NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"ComfyUI-MUMU: node id {_name} is defined twice ({_module.__name__}).")
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
