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


class _QuantizedExperts(ExpertsBase):
    """Quantized weights `w13`, `w2` of one integer dtype with their scales `w13_scale`, `w2_scale`;
    buffers, so a state dict holds them. Inference only."""

    CODE_DTYPE: torch.dtype
    FORMAT: str

    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale: torch.Tensor
    w2_scale: torch.Tensor

    def __init__(self, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor) -> None:
        super().__init__()
        if w13.dtype != self.CODE_DTYPE or w2.dtype != self.CODE_DTYPE:
            raise ValueError(f"{type(self).__name__} needs {self.CODE_DTYPE} weights, got {w13.dtype} and {w2.dtype}")
        self.num_experts = w13.shape[0]
        self.register_buffer("w13", w13)
        self.register_buffer("w13_scale", w13_scale)
        self.register_buffer("w2", w2)
        self.register_buffer("w2_scale", w2_scale)

    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.w13, self.w2, self.w13_scale, self.w2_scale)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, {self.FORMAT}"


class Int8Experts(_QuantizedExperts):
    """int8 weights `w13` `[E, 2F, D]`, `w2` `[E, D, F]` with row scales `w13_scale` `[E, 2F]`,
    `w2_scale` `[E, D]` (w ≈ q * s[..., None])."""

    CODE_DTYPE = torch.int8
    FORMAT = "int8 weight-only"

    @classmethod
    def quantize(cls, experts: Experts, *, scale_dtype: torch.dtype) -> Int8Experts:
        q13, s13 = quantize_int8(experts.w13)
        q2, s2 = quantize_int8(experts.w2)
        return cls(q13, s13.to(scale_dtype), q2, s2.to(scale_dtype))


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


class Int4Experts(_QuantizedExperts):
    """Packed int4 weights (two 4-bit codes per uint8, llama.cpp Q4_0's nibble layout) `w13`
    `[E, 2F, D/2]`, `w2` `[E, D, F/2]` with float16 scales per group of inputs `w13_scale`
    `[E, 2F, D/G]`, `w2_scale` `[E, D, F/G]` (`mixlab.ops.quant.quantize_int4`). Built from float
    experts (`quantize`) or from packed data (a GGUF Q4_0 file)."""

    CODE_DTYPE = torch.uint8
    FORMAT = "int4 group-wise"

    @classmethod
    def quantize(cls, experts: Experts, *, group: int = 32) -> Int4Experts:
        q13, s13 = quantize_int4(experts.w13.detach(), group)
        q2, s2 = quantize_int4(experts.w2.detach(), group)
        return cls(q13, s13, q2, s2)


EXPERT_FORMATS: dict[type[ExpertsBase], str] = {
    Experts: "plain", Int8Experts: "int8", PackedExperts: "packed", Int4Experts: "int4",
}
