"""The streaming merge engine: bake MUMU's UNet changes into an SDXL finetune checkpoint.

`engine` holds `merge_checkpoint` (what `mumu merge` and the merge node run), `sources` opens the
input models, `io` streams tensors in and writes the output atomically.
"""

from .engine import merge_checkpoint  # noqa: F401
