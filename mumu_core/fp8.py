"""fp8 weight storage for the VLM: store linear weights in float8_e4m3fn, compute in bf16/fp16.

Idefics2-8B needs ~16 GB in bf16, more than most ComfyUI users' GPUs. Almost all of it is the
weights of `nn.Linear` layers (the LLM's attention/MLP projections, the vision tower's, the
modality projection). `store_linear_weights_fp8` swaps each for an `Fp8Linear` that keeps its
weight in 1 byte per element and dequantises it, one layer at a time, to the activations' dtype
inside `forward` (the way ComfyUI runs its fp8 text encoders: fp8 storage, bf16/fp16 compute),
so the VLM needs about half the memory. Embeddings, norms, biases and the adapter stay as they are.

Precision: each output row of a weight gets a power-of-two scale chosen so that its largest
value lands near e4m3's maximum (448). Rows therefore use e4m3's full normal range (3 mantissa
bits, ≈2 % RMS rounding per weight) instead of letting small initialisations fall into its
subnormals, and the scale itself is exact in any float dtype — `.to(torch.bfloat16)` on the
module cannot round it. bench/vlm_memory.py measures bytes and the conditioning's cosine vs bf16.

Storage: the fp8 bits are kept as a `uint8` parameter (a bit-for-bit view), because
`nn.Module.to(dtype)` casts every floating-point tensor — an fp8 parameter would be silently
widened back to bf16 by the encoder's own `.to(dtype=...)` or by ComfyUI. Integer parameters
are moved between devices (ComfyUI's ModelPatcher moves parameters) but never re-typed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_available() -> bool:
    """True when this torch build has float8_e4m3fn (torch >= 2.1)."""
    return FP8_DTYPE is not None


def _require_fp8() -> None:
    if not fp8_available():
        from .errors import MumuError

        raise MumuError(f"fp8 weight storage needs torch >= 2.1 (float8_e4m3fn); this is torch {torch.__version__}. "
                        f"Choose bf16 or fp16 instead.")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (uint8 view of the e4m3 values, [out, 1] float32 power-of-two scale)."""
    _require_fp8()
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    # smallest power of two with amax / scale <= FP8_MAX
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(torch.uint8), scale


def dequantize_rows(q_uint8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q_uint8.view(FP8_DTYPE).to(dtype) * scale.to(dtype)


class Fp8Linear(nn.Module):
    """`nn.Linear` with its weight stored in float8_e4m3fn; computes in the input's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_rows(linear.weight)
        self.weight_fp8 = nn.Parameter(q.to(linear.weight.device), requires_grad=False)
        self.weight_scale = nn.Parameter(scale.to(linear.weight.device), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight in the bias' (or float32) dtype; for inspection, not used by forward."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return dequantize_rows(self.weight_fp8, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_rows(self.weight_fp8, self.weight_scale, x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, weight=fp8_e4m3fn"


def store_linear_weights_fp8(module: nn.Module, min_params: int = 0) -> dict:
    """Replace every `nn.Linear` under `module` by an `Fp8Linear`, in place.

    Call it after any LoRA has been merged (PEFT wraps `nn.Linear`, not `Fp8Linear`). Returns
    `{"layers": n, "bytes_before": b0, "bytes_after": b1}` for the swapped weights.
    """
    _require_fp8()
    targets = [(name, m) for name, m in module.named_modules()
               if type(m) is nn.Linear and m.weight.numel() >= max(min_params, 1)]
    before = after = 0
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        before += linear.weight.numel() * linear.weight.element_size()
        replacement = Fp8Linear(linear)
        after += replacement.weight_fp8.numel() + replacement.weight_scale.numel() * 4
        setattr(parent, child, replacement)
        del linear
    return {"layers": len(targets), "bytes_before": before, "bytes_after": after}


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of `module` (what it occupies on a device)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def compute_dtype_for(device, prefer_bf16: bool | None = None) -> torch.dtype:
    """The dtype fp8-stored weights are computed in: bf16 where supported, else fp16 (CPU: bf16)."""
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if device.type == "cuda":
        if prefer_bf16 is None:
            prefer_bf16 = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if prefer_bf16 else torch.float16
    return torch.bfloat16

