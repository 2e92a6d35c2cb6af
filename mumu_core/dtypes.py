"""Precision names -> torch dtypes: the one map shared by the CLI, the ComfyUI nodes and training.

"fp32" / "fp16" / "bf16" are what `--dtype`, the encoder loader's dtype input and accelerate's
`mixed_precision` say; callers add their own extra choices ("auto", "fp8", "no") on top.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
