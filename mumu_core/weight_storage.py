"""8-bit weight storage for the VLM: linear weights in float8_e4m3fn or int8, computed in bf16/fp16.

Idefics2-8B needs ~16 GB in bf16, more than most ComfyUI users' GPUs. Almost all of it is the
weights of `nn.Linear` layers (the LLM's attention/MLP projections, the vision tower's, the
modality projection). `store_linear_weights` swaps each for a `QuantizedLinear` that keeps its
weight in 1 byte per element and dequantises it, one layer at a time, to the activations' dtype
inside `forward` (the way ComfyUI runs its fp8 text encoders: 8-bit storage, bf16/fp16 compute),
so the VLM needs about half the memory. Embeddings, norms, biases and the adapter stay as they are.

Two formats, same bytes:
- `fp8_e4m3fn`, the format ComfyUI users know: 3 mantissa bits, ≈2.5 % RMS rounding per weight.
- `int8`, symmetric per output row: 255 evenly spaced levels across the row's range, ≈1 % RMS
  rounding for the bell-shaped weights of a trained network — the closer conditioning of the two
  (bench/vlm_memory.py measures both against bf16).

Each output row gets a power-of-two scale chosen so that its largest value lands near the format's
maximum (448 for e4m3, 127 for int8): rows use the format's whole range instead of letting small
initialisations fall into e4m3's subnormals or int8's few lowest levels, and the scale is exact in
any float dtype — `.to(torch.bfloat16)` on the module cannot round it.

Storage: the 8-bit codes are kept as a `uint8` (fp8: a bit-for-bit view) or `int8` parameter,
because `nn.Module.to(dtype)` casts every floating-point tensor — an fp8 parameter would be silently
widened back to bf16 by the encoder's own `.to(dtype=...)` or by ComfyUI. Integer parameters are
moved between devices (ComfyUI's ModelPatcher moves parameters) but never re-typed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FORMATS = {"fp8_e4m3fn": 448.0, "int8": 127.0}  # format -> largest code magnitude


def fp8_available() -> bool:
    """True when this torch build has float8_e4m3fn (torch >= 2.1)."""
    return FP8_DTYPE is not None


def _check_format(fmt: str) -> None:
    from .errors import MumuError

    if fmt not in FORMATS:
        raise MumuError(f"unknown weight storage {fmt!r}; expected one of {', '.join(FORMATS)}.")
    if fmt == "fp8_e4m3fn" and not fp8_available():
        raise MumuError(f"fp8 weight storage needs torch >= 2.1 (float8_e4m3fn); this is torch {torch.__version__}. "
                        f"Choose int8, bf16 or fp16 instead.")


def quantize_rows(weight: torch.Tensor, fmt: str = "fp8_e4m3fn") -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (8-bit codes: uint8 view of e4m3, or int8; [out, 1] float32 power-of-two scale)."""
    _check_format(fmt)
    top = FORMATS[fmt]
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    scale = torch.exp2(torch.ceil(torch.log2(amax / top)))  # smallest power of two with amax / scale <= top
    scaled = (w / scale).clamp(-top, top)
    if fmt == "int8":
        return torch.round(scaled).to(torch.int8), scale
    return scaled.to(FP8_DTYPE).view(torch.uint8), scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The codes' dtype says the format: int8 codes are integers, uint8 codes are e4m3 bits."""
    values = codes if codes.dtype == torch.int8 else codes.view(FP8_DTYPE)
    return values.to(dtype) * scale.to(dtype)


class QuantizedLinear(nn.Module):
    """`nn.Linear` with its weight stored in 8 bits (fp8_e4m3fn or int8); computes in the input's dtype."""

    def __init__(self, linear: nn.Linear, fmt: str = "fp8_e4m3fn"):
        super().__init__()
        self.in_features, self.out_features, self.format = linear.in_features, linear.out_features, fmt
        codes, scale = quantize_rows(linear.weight, fmt)
        self.weight_codes = nn.Parameter(codes.to(linear.weight.device), requires_grad=False)
        self.weight_scale = nn.Parameter(scale.to(linear.weight.device), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight in the bias' (or float32) dtype; for inspection, not used by forward."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return dequantize_rows(self.weight_codes, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_rows(self.weight_codes, self.weight_scale, x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={self.format}")


def store_linear_weights(module: nn.Module, fmt: str = "fp8_e4m3fn", min_params: int = 0) -> dict:
    """Replace every `nn.Linear` under `module` by a `QuantizedLinear` in `fmt`, in place.

    Call it after any LoRA has been merged (PEFT wraps `nn.Linear`, not `QuantizedLinear`). Returns
    `{"format": fmt, "layers": n, "bytes_before": b0, "bytes_after": b1}` for the swapped weights.
    """
    _check_format(fmt)
    targets = [(name, m) for name, m in module.named_modules()
               if type(m) is nn.Linear and m.weight.numel() >= max(min_params, 1)]
    before = after = 0
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        before += linear.weight.numel() * linear.weight.element_size()
        replacement = QuantizedLinear(linear, fmt)
        after += replacement.weight_codes.numel() + replacement.weight_scale.numel() * 4
        setattr(parent, child, replacement)
        del linear
    return {"format": fmt, "layers": len(targets), "bytes_before": before, "bytes_after": after}


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of `module` (what it occupies on a device)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total

