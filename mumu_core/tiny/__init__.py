"""Tiny offline components (VLMs, bundle, SDXL, detectors) for tests, the demo and `mumu tiny`.

`build` writes them; `configs` holds their configs as plain data.
"""

from .build import build_tiny_tokenizer, write_tiny_components  # noqa: F401
