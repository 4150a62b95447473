"""Int8 weight-only quantisation: symmetric, one scale per output row (as gpt-fast and torchao do).

A weight `w_XD` (X output rows, D inputs) is stored as `q_XD` int8 and `s_X` with w ≈ q * s[:, None],
s = max|w_row| / 127. Activations stay in bf16/f32; only the weights shrink, which is what matters
for decoding: one token reads every weight it touches once, so time ≈ bytes / memory bandwidth and
int8 halves the bytes of bf16.

`int8_linear` runs the kernel `mixlab.ops.registry` picks by the number of rows: for a few rows
(decoding) the native kernel (or, without it, torch's fused `aten._weight_int8pack_mm`) reads int8
and scales on the fly; for many rows (prefill) the matmul is compute-bound, so the weight is
dequantised once to the activation dtype for the bf16 GEMM. Batch-1 decoding of a prepared model
runs the whole step natively instead (`mixlab.model.native`).

Shape legend: N rows of activations, X output features, D input features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixlab.ops import registry


def quantize_int8(w_XD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_XD int8, s_X) with w ≈ q * s[:, None]; works on stacked weights `[..., X, D]` too."""
    w = w_XD.detach().float()
    s = w.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(w / s[..., None]).clamp(-127, 127).to(torch.int8)
    return q, s


def dequantize_int8(q_XD: torch.Tensor, s_X: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q_XD.to(torch.float32) * s_X.float()[..., None]).to(dtype)


def int8_linear(x_ND: torch.Tensor, q_XD: torch.Tensor, s_X: torch.Tensor) -> torch.Tensor:
    """x @ (q * s).T without materialising the bf16 weight when x has few rows."""
    impl = registry.linear_impl(x_ND, q_XD, s_X)
    if impl == "native":
        return torch.ops.mixlab.linear(x_ND, q_XD, s_X)
    lead = x_ND.shape[:-1]
    x2 = x_ND.reshape(-1, x_ND.shape[-1])
    if impl == "int8pack":
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), q_XD, s_X.to(x2.dtype))
    else:
        y = F.linear(x2, q_XD.to(x2.dtype)) * s_X.to(x2.dtype)
    return y.reshape(*lead, q_XD.shape[0])


class Int8Linear(nn.Module):
    """A bias-free `nn.Linear` replacement holding int8 weights and per-row scales (inference only)."""

    def __init__(self, linear: nn.Linear, *, scale_dtype: torch.dtype) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear supports bias-free linears only")
        q, s = quantize_int8(linear.weight)
        self.in_features: int = linear.in_features
        self.out_features: int = linear.out_features
        self.weight: torch.Tensor
        self.scale: torch.Tensor
        self.register_buffer("weight", q)
        self.register_buffer("scale", s.to(scale_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"
