"""Node registry of the pack: merges the mappings of each node module.

Only relative imports (ComfyUI imports the pack by file path) and nothing heavy at import time:
the node modules import torch / transformers / mumu_core's models inside their functions.
"""

from __future__ import annotations

from . import _comfy

_comfy.ensure_core()
_comfy.register_model_folder()

from . import encode, loaders, merge, prompt, unet_lora  # noqa: E402  (after the core and folder are set up)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

_modules = [loaders, prompt, encode, unet_lora, merge]
for _module in _modules:
    for _name in _module.NODE_CLASS_MAPPINGS:
        if _name in NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"ComfyUI-MUMU: node id {_name} is defined twice ({_module.__name__}).")
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
