"""User-facing errors.

A `MumuError` message is shown to a person (ComfyUI's error dialog, the CLI's stderr), so it says
what was wrong, what was expected and how to fix it. The CLI prints it without a traceback.
"""


class MumuError(Exception):
    """An error caused by the user's input, files or configuration (not a bug)."""


class PromptError(MumuError, ValueError):
    """The interleaved prompt and its images do not fit together."""


class BundleError(MumuError):
    """A MUMU bundle file is missing, corrupt, not safetensors or does not match its VLM."""


class ModelFolderError(MumuError):
    """A model folder is missing files or holds a model family MUMU cannot use."""
