"""MUMU core library: interleaved text+image prompts -> SDXL conditioning.

Importable and testable without ComfyUI. Heavy libraries (torch, transformers, diffusers) are
imported by the submodules that need them, so `import mumu_core` stays cheap.
"""

__version__ = "0.1.0"

from .errors import MumuError  # noqa: F401
