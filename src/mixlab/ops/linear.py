"""Linear layers for CPU inference: one `linear(x, w, scale)` that runs plain, oneDNN-packed or int8
weights.

Why packing: eager `F.linear` hands oneDNN a plain row-major weight and oneDNN re-lays it out for
its kernels on every call; for a few rows of activations (decoding) that reorder costs as much as
the matmul. Packing once ahead of time (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's
weight freezing does on CPU) removes it: on an AVX-512-bf16 CPU a packed bf16 matrix-vector product
runs faster at a few rows, and no slower at many (numbers in BENCHMARKS.md). Packed weights are
opaque oneDNN tensors: inference only (no autograd, no slicing, not saved in a state dict).
Which kernel runs is `mixlab.ops.registry`'s choice (few rows of plain or int8 weights: the native
kernel `torch.ops.mixlab.linear`); batch-1 decoding of a prepared model bypasses this module.

Shape legend: N rows of activations, X output features, D input features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixlab.ops import registry
from mixlab.ops.quant import int8_linear


def can_pack(w_XD: torch.Tensor) -> bool:
    """oneDNN packing applies to float32/bf16 CPU matrices when torch was built with oneDNN."""
    return (
        w_XD.device.type == "cpu"
        and w_XD.ndim == 2
        and w_XD.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and (w_XD.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def pack(w_XD: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's blocked layout (tuned for few-row inputs; correct for any)."""
    return torch.ops.mkldnn._reorder_linear_weight(w_XD.detach().contiguous(), 1)


def linear(x_ND: torch.Tensor, w_XD: torch.Tensor, scale_X: torch.Tensor | None = None, *,
           act8: bool = False) -> torch.Tensor:
    """x @ w.T for a plain, packed (`pack`), int8 or int4 (`scale_X` given) weight; `act8`: int4 weights
    times x rounded to int8 per block of 32 (`mixlab.ops.quant.round_activations_q8`)."""
    if scale_X is not None:
        return int8_linear(x_ND, w_XD, scale_X, act8=act8)
    impl = registry.linear_impl(x_ND, w_XD)
    if impl == "native":
        return torch.ops.mixlab.linear(x_ND, w_XD, None)
    if impl == "packed":
        lead = x_ND.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(x_ND.reshape(-1, x_ND.shape[-1]).contiguous(), w_XD, None,
                                               "none", [], "")
        return y.reshape(*lead, y.shape[-1])
    return F.linear(x_ND, w_XD)


class InferenceLinear(nn.Module):
    """A bias-free `nn.Linear` for inference through `linear`, with a oneDNN-packed (`packed=True`) or
    plain weight. No autograd."""

    def __init__(self, lin: nn.Linear, *, packed: bool = False) -> None:
        super().__init__()
        if lin.bias is not None:
            raise ValueError("InferenceLinear supports bias-free linears only")
        self.in_features: int = lin.in_features
        self.out_features: int = lin.out_features
        self.packed: bool = packed
        w = lin.weight.detach()
        self.weight: torch.Tensor = pack(w) if packed else w  # a plain attribute: packed tensors are opaque

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)

    def extra_repr(self) -> str:
        kind = "oneDNN-packed" if self.packed else "plain"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"
