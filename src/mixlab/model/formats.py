"""The experts' inference weight formats, one module class each (`mixlab.model.moe.Experts` is the
plain float, trainable one). `prepare_for_inference` swaps a block's `Experts` for one of these; a
module's type says what it holds.

- `Int8Experts`: int8 weight-only, one scale per output row (`mixlab.ops.quant`).
- `PackedExperts`: one oneDNN-packed matrix per expert (`mixlab.ops.linear.pack`): opaque, not
  saved, no autograd.
- `Int4Experts`: packed int4 with float16 scales per group of inputs (llama.cpp Q4_0's layout).
- `OffloadedExperts`: on disk, read on demand into an expert cache (`mixlab.ops.offload`) that
  holds them plain, int8 or int4.

The linears outside the experts have their own format classes: `nn.Linear` (plain),
`mixlab.ops.linear.InferenceLinear` (plain or packed, inference only) and
`mixlab.ops.quant.Int8Linear` / `Int4Linear`.

Shape legend: E experts, D width, F expert FFN width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixlab.model.moe import Experts, ExpertsBase, ExpertWeights, Router, Routing
from mixlab.ops.linear import pack
from mixlab.ops.moe import choose_impl, expert_segments, moe_ffn
from mixlab.ops.offload import ExpertCache
from mixlab.ops.quant import quantize_int4, quantize_int8, rounds_activations


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

        # its model's int4 / int8_activations is "int8" (`Transformer` sets it): `rounds_activations`
        self.act8 = False

    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.w13, self.w2, self.w13_scale, self.w2_scale)

    def mix(self, x_TD: torch.Tensor, routing: Routing, impl: str) -> torch.Tensor:
        """`ExpertsBase.mix`; with activations rounded to int8 (`rounds_activations`) always dispatch ->
        `forward` -> combine, whose products round them: the whole-layer kernels (`decode`, `native`,
        `reference`) multiply exact ones, and the second product's input (the SwiGLU's output) exists
        only inside them, so no rounding before dispatch could stand in. Without the native kernels
        `auto` runs `sorted` for more than one token anyway, so the rounding is all that "int8" adds
        to PyTorch's pass: int4 mini-moe's forward at 1 thread takes 1.00-1.01x "float32"'s time for
        one token, 1.00-1.03x for 64 and 512 (in-process A/B by CPU time, two processes)."""
        return super().mix(x_TD, routing, "sorted" if rounds_activations(self) else impl)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, {self.FORMAT}"


class Int8Experts(_QuantizedExperts):
    """int8 weights `w13` `[E, 2F, D]`, `w2` `[E, D, F]` with row scales `w13_scale` `[E, 2F]`,
    `w2_scale` `[E, D]` (w ≈ q * s[..., None])."""

    CODE_DTYPE = torch.int8
    FORMAT = "int8 weight-only"

    def forward(self, xs_ND: torch.Tensor, counts: list[int], *, grouped: bool = False) -> torch.Tensor:
        if not rounds_activations(self):
            return super().forward(xs_ND, counts, grouped=grouped)
        return expert_segments(xs_ND, counts, self.w13, self.w2, self.w13_scale, self.w2_scale, act8=True)

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

    def forward(self, xs_ND: torch.Tensor, counts: list[int], *, grouped: bool = False) -> torch.Tensor:
        return expert_segments(xs_ND, counts, self.w13, self.w2, self.w13_scale, self.w2_scale,
                               act8=rounds_activations(self))

    @classmethod
    def quantize(cls, experts: Experts, *, group: int = 32) -> Int4Experts:
        q13, s13 = quantize_int4(experts.w13.detach(), group)
        q2, s2 = quantize_int4(experts.w2.detach(), group)
        return cls(q13, s13, q2, s2)


EXPERT_FORMATS: dict[type[ExpertsBase], str] = {
    Experts: "plain", Int8Experts: "int8", PackedExperts: "packed", Int4Experts: "int4",
}


class OffloadedExperts(ExpertsBase):
    """The E experts of MoE layer `layer` kept on disk: each forward pass reads the chosen ones into
    the shared `ExpertCache` (`mixlab.ops.offload`; one pool of slots, a byte budget, LRU or LFU)
    and runs the registry's kernel on the pool with expert ids replaced by slot ids, so results
    equal resident experts of the cache's format (plain, int8 or int4). With prefetch, the next
    MoE layer's router (`next_gate`) applied to this layer's input guesses its experts, which a
    background thread reads while this layer computes (Eliseev & Mazur 2023). Inference only;
    `weights()` is refused (no resident stacked weights: no native whole-model decoder)."""

    def __init__(self, cache: ExpertCache, layer: int, num_experts: int, next_gate: Router | None = None) -> None:
        super().__init__()
        self.cache, self.layer, self.num_experts = cache, layer, num_experts
        self._next = (next_gate,)  # a tuple: not registered as a submodule (the router belongs to its block)

    def weights(self) -> ExpertWeights:
        raise ValueError(f"layer {self.layer}'s experts are offloaded (read on demand into an expert cache); "
                         "they have no resident stacked weights")

    def _guess(self, x_TD: torch.Tensor, room: int) -> tuple[int, list[int]] | None:
        """The next layer's likely experts, most chosen first (at most `room`), from its router."""
        gate = self._next[0]
        if gate is None or not self.cache.prefetch_enabled or room <= 0:
            return None
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), gate.weight.float())
        idx_TK = torch.topk(logits_TE, gate.moe.top_k, dim=-1).indices
        if idx_TK.shape[0] == 1:
            return self.layer + 1, idx_TK[0].tolist()[:room]
        counts_E = torch.bincount(idx_TK.reshape(-1), minlength=self.num_experts)
        order = torch.argsort(counts_E, descending=True, stable=True)[: int((counts_E > 0).sum())]
        return self.layer + 1, order[:room].tolist()

    def mix(self, x_TD: torch.Tensor, routing: Routing, impl: str) -> torch.Tensor:
        cache = self.cache
        idx_TK, weight_TK = routing.idx_TK, routing.weight_TK
        few = idx_TK.shape[0] <= 4  # decoding: Python lists beat tensor ops on a handful of ids
        ids = idx_TK.tolist() if few else None
        needed = sorted({e for row in ids for e in row}) if ids is not None else torch.unique(idx_TK).tolist()
        pool = cache.pool()  # first: checks that the budget holds top-k experts in the final format
        S = cache.num_slots
        passes = [needed[i : i + S] for i in range(0, len(needed), S)]
        cache.stats.layer_calls += 1
        cache.stats.passes += len(passes) > 1
        w13, w2 = pool["w13"], pool["w2"]
        s13, s2 = pool.get("w13_scale"), pool.get("w2_scale")
        if impl == "auto":
            impl = choose_impl(x_TD.shape[0], w13, x_TD, s13)
        out_TD: torch.Tensor | None = None
        for n, group in enumerate(passes):
            last = n == len(passes) - 1
            guess = self._guess(x_TD, S - len(group)) if last else None
            slots = cache.acquire(self.layer, group, prefetch=guess)
            try:
                if ids is not None and len(passes) == 1:
                    where = dict(zip(group, slots, strict=True))
                    slot_TK = torch.tensor([[where[e] for e in row] for row in ids], device=idx_TK.device)
                else:
                    lut_E = torch.full((self.num_experts,), -1, dtype=torch.long, device=idx_TK.device)
                    lut_E[group] = torch.tensor(slots, dtype=torch.long, device=idx_TK.device)
                    slot_TK = lut_E[idx_TK]
                if len(passes) == 1:
                    return moe_ffn(x_TD, w13, w2, slot_TK, weight_TK, impl=impl, w13_scale_E2F=s13, w2_scale_ED=s2)
                # More distinct experts than slots: this pass mixes only its experts' pairs.
                here_TK = slot_TK >= 0
                tok_T = here_TK.any(1).nonzero().squeeze(1)
                slot_tK = torch.where(here_TK, slot_TK, slots[0])[tok_T]
                w_tK = (weight_TK * here_TK)[tok_T]
                y_tD = moe_ffn(x_TD[tok_T], w13, w2, slot_tK, w_tK, impl=impl, w13_scale_E2F=s13, w2_scale_ED=s2)
                out_TD = torch.zeros_like(x_TD) if out_TD is None else out_TD
                out_TD.index_add_(0, tok_T, y_tD)
            finally:
                cache.release(slots)
        assert out_TD is not None
        return out_TD

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, offloaded ({self.cache.fmt.kind})"


EXPERT_FORMATS[OffloadedExperts] = "offloaded"


def expert_cache(model: torch.nn.Module) -> ExpertCache | None:
    """The expert cache of a model whose experts are offloaded, else None."""
    for m in model.modules():
        if isinstance(m, OffloadedExperts):
            return m.cache
    return None
