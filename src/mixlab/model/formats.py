"""The experts' inference weight formats, one module class each (`mixlab.model.moe.Experts` is the
plain float, trainable one). `prepare_for_inference` swaps a block's `Experts` for one of these; a
module's type says what it holds.

- `Int8Experts`: int8 weight-only, one scale per output row (`mixlab.ops.quant`).
- `PackedExperts`: one oneDNN-packed matrix per expert (`mixlab.ops.linear.pack`): opaque, not
  saved, no autograd.
- `Int4Experts`: packed int4 with float16 scales per group of inputs (llama.cpp Q4_0's layout).

The linears outside the experts have their own format classes: `nn.Linear` (plain),
`mixlab.ops.linear.InferenceLinear` (plain or packed, inference only) and
`mixlab.ops.quant.Int8Linear` / `Int4Linear`.

Shape legend: E experts, D width, F expert FFN width.
"""

from __future__ import annotations

import torch

from mixlab.model.moe import Experts, ExpertsBase, ExpertWeights
from mixlab.ops.linear import pack
from mixlab.ops.quant import quantize_int4, quantize_int8


class Int8Experts(ExpertsBase):
    """int8 weights `w13` `[E, 2F, D]`, `w2` `[E, D, F]` with row scales `w13_scale` `[E, 2F]`,
    `w2_scale` `[E, D]` (w ≈ q * s[..., None]); buffers, so a state dict holds them. Inference only."""

    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale: torch.Tensor
    w2_scale: torch.Tensor

    def __init__(self, w13_E2FD: torch.Tensor, w13_scale_E2F: torch.Tensor, w2_EDF: torch.Tensor,
                 w2_scale_ED: torch.Tensor) -> None:
        super().__init__()
        if w13_E2FD.dtype != torch.int8 or w2_EDF.dtype != torch.int8:
            raise ValueError(f"Int8Experts needs int8 weights, got {w13_E2FD.dtype} and {w2_EDF.dtype}")
        self.num_experts = w13_E2FD.shape[0]
        self.register_buffer("w13", w13_E2FD)
        self.register_buffer("w13_scale", w13_scale_E2F)
        self.register_buffer("w2", w2_EDF)
        self.register_buffer("w2_scale", w2_scale_ED)

    @classmethod
    def quantize(cls, experts: Experts, *, scale_dtype: torch.dtype) -> Int8Experts:
        q13, s13 = quantize_int8(experts.w13)
        q2, s2 = quantize_int8(experts.w2)
        return cls(q13, s13.to(scale_dtype), q2, s2.to(scale_dtype))

    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.w13, self.w2, self.w13_scale, self.w2_scale)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, int8 weight-only"


class PackedExperts(ExpertsBase):
    """Each expert's `w13` `[2F, D]` and `w2` `[D, F]` packed in oneDNN's blocked layout: tuples of
    opaque tensors (plain attributes, not in the state dict). Inference only, CPU only."""

    def __init__(self, experts: Experts) -> None:
        super().__init__()
        self.num_experts = experts.num_experts
        with torch.no_grad():
            self.w13: tuple[torch.Tensor, ...] = tuple(pack(w) for w in experts.w13.detach().unbind(0))
            self.w2: tuple[torch.Tensor, ...] = tuple(pack(w) for w in experts.w2.detach().unbind(0))

    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.w13, self.w2)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, oneDNN-packed"


class Int4Experts(ExpertsBase):
    """Packed int4 weights (two 4-bit codes per uint8, llama.cpp Q4_0's nibble layout) `w13`
    `[E, 2F, D/2]`, `w2` `[E, D, F/2]` with float16 scales per group of inputs `w13_scale`
    `[E, 2F, D/G]`, `w2_scale` `[E, D, F/G]` (`mixlab.ops.quant.quantize_int4`); buffers. Inference
    only. Built from float experts (`quantize`) or from packed data (a GGUF Q4_0 file)."""

    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale: torch.Tensor
    w2_scale: torch.Tensor

    def __init__(self, w13_E2FDh: torch.Tensor, w13_scale_E2FG: torch.Tensor, w2_EDFh: torch.Tensor,
                 w2_scale_EDG: torch.Tensor) -> None:
        super().__init__()
        if w13_E2FDh.dtype != torch.uint8 or w2_EDFh.dtype != torch.uint8:
            raise ValueError(f"Int4Experts needs packed uint8 weights, got {w13_E2FDh.dtype} and {w2_EDFh.dtype}")
        self.num_experts = w13_E2FDh.shape[0]
        self.register_buffer("w13", w13_E2FDh)
        self.register_buffer("w13_scale", w13_scale_E2FG)
        self.register_buffer("w2", w2_EDFh)
        self.register_buffer("w2_scale", w2_scale_EDG)

    @classmethod
    def quantize(cls, experts: Experts, *, group: int = 32) -> Int4Experts:
        q13, s13 = quantize_int4(experts.w13.detach(), group)
        q2, s2 = quantize_int4(experts.w2.detach(), group)
        return cls(q13, s13, q2, s2)

    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.w13, self.w2, self.w13_scale, self.w2_scale)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, int4 group-wise"


EXPERT_FORMATS: dict[type[ExpertsBase], str] = {
    Experts: "plain", Int8Experts: "int8", PackedExperts: "packed", Int4Experts: "int4",
}
