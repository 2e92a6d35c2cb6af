"""ComfyUI-MUMU: interleaved text+image prompts (MUMU, arXiv 2406.18790) for SDXL and its finetunes.

ComfyUI imports this folder as a package named after its path, so everything here is reached by
relative import. Importing the pack is cheap: no torch / transformers / diffusers at import time;
models load when a node runs. Classic (V1) node API, which every ComfyUI version users run
supports (the V3 schema API needs ComfyUI >= 0.3.48).
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Loaded as a lone file, not as a package: pytest does this when the checkout's folder name is
    # not a Python identifier (`ComfyUI-MUMU`, `ci.1234`), while setting the folder up for the tests.
    # There is nothing to register then; ComfyUI always imports the folder as a package.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
