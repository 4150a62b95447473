"""The one seam for the expert computation of an MoE layer.

Shape legend: T tokens (batch and sequence flattened), D model width, F expert FFN width,
E experts, K experts chosen per token, N = T*K (token, slot) pairs.

Expert weights are stacked per layer: `w13_E2FD` holds each expert's gate (w1) and up (w3)
projections fused along dim 1 (rows [0, F) are w1, rows [F, 2F) are w3), `w2_EDF` the down
projection. Every implementation computes, for each token t,

    y_t = sum_k weight_tk * w2[e] @ (silu(w1[e] @ x_t) * (w3[e] @ x_t)),   e = idx_tk

and `reference` is the readable oracle every other implementation is tested against. With int8
weight-only quantisation (`mixlab.ops.quant`) the weights are int8 and `w13_scale_E2F` /
`w2_scale_ED` hold one scale per output row, or packed int4 (uint8) with float16 scales per group
of inputs (`[E, 2F, D/G]`, `[E, D, F/G]`); every implementation accepts them. For CPU inference
the experts may also be a list of oneDNN-packed matrices, one per expert (`mixlab.ops.linear.pack`);
everything but `grouped` indexes them the same way.

The sorted paths come in three parts, which `mixlab.model.moe.MoEBlock` calls separately:
`dispatch` (rows grouped by expert), the experts on grouped rows (`expert_segments`,
`expert_grouped_mm`; `Experts.forward(xs_ND, counts)` in the model) and `combine` (back to token
order, weighted). Expert parallelism replaces `dispatch` and `combine` with an all-to-all.

Implementations (all dropless):
- `reference`: one loop over experts, gather and scatter per expert (mistral-inference's moe.py).
- `sorted`: sort the N pairs by expert, one gather, one matmul per contiguous segment, one
  permutation back to token order and a weighted sum over each token's K rows (MegaBlocks, arXiv
  2211.15841). The training path: differentiable, its backward free of accumulating scatters; each
  expert's segment is zero-padded to a multiple of `SEGMENT_ROWS` rows (MegaBlocks' block padding)
  so that oneDNN reuses the GEMM kernels it compiled for earlier steps.
- `grouped`: as `sorted`, but the per-expert matmuls are one `torch._grouped_mm` call each.
- `decode`: for one token (a decoding step): only its K experts run, on views of the stacked
  weights, with no sort, gather, scatter or weight copy. Decoding reads each chosen expert's
  weights once, so its speed is set by memory bandwidth; every skipped op is saved latency.
- `native`: for a few tokens on CPU, the C kernel `torch.ops.mixlab.moe` (`mx_moe`): the same sort
  and gather, then each chosen expert's weights are streamed once for all its tokens at close to
  the memory bandwidth, in one call (no autograd; plain float32/bf16 or int8 stacked weights).

`auto` (the default) runs what `mixlab.ops.registry` chooses: `native` for a few tokens when the
kernels are loaded, else `decode` for a single token and `sorted` otherwise (on this CPU the
grouped kernel is no faster than the segment loop; see BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from mixlab.ops import registry
from mixlab.ops.linear import linear
from mixlab.ops.quant import dequantize
from mixlab.ops.swiglu import swiglu

# Training pads each expert's segment to a multiple of this many rows (see `expert_segments`).
SEGMENT_ROWS = 32


class MoEImpl(Protocol):
    def __call__(
        self,
        x_TD: torch.Tensor,
        w13_E2FD: torch.Tensor,
        w2_EDF: torch.Tensor,
        idx_TK: torch.Tensor,
        weight_TK: torch.Tensor,
        *,
        w13_scale_E2F: torch.Tensor | None = None,
        w2_scale_ED: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def _expert(
    x_ND: torch.Tensor,
    w13_2FD: torch.Tensor,
    w2_DF: torch.Tensor,
    s13_2F: torch.Tensor | None = None,
    s2_D: torch.Tensor | None = None,
    act8: bool = False,
) -> torch.Tensor:
    return linear(swiglu(linear(x_ND, w13_2FD, s13_2F, act8=act8)), w2_DF, s2_D, act8=act8)


def _plain_expert(x_ND: torch.Tensor, w13_2FD: torch.Tensor, w2_DF: torch.Tensor) -> torch.Tensor:
    """`_expert` in plain F.linear (no int8 scales): differentiable and traceable by torch.compile
    for training, and the oracle's, never the inference kernels of ops/linear.py."""
    return F.linear(swiglu(F.linear(x_ND, w13_2FD)), w2_DF)


def reference(
    x_TD: torch.Tensor,
    w13_E2FD: torch.Tensor,
    w2_EDF: torch.Tensor,
    idx_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    *,
    w13_scale_E2F: torch.Tensor | None = None,
    w2_scale_ED: torch.Tensor | None = None,
) -> torch.Tensor:
    """The oracle: for each expert, the tokens that chose it (as mistral-inference's moe.py)."""
    out_TD = torch.zeros_like(x_TD)
    for e in range(len(w13_E2FD)):
        tok_N, slot_N = torch.where(idx_TK == e)
        if tok_N.numel() == 0:
            continue
        w13, w2 = w13_E2FD[e], w2_EDF[e]
        if w13_scale_E2F is not None and w2_scale_ED is not None:  # int8 / int4: the dequantised weights
            w13 = dequantize(w13, w13_scale_E2F[e], x_TD.dtype)
            w2 = dequantize(w2, w2_scale_ED[e], x_TD.dtype)
        y_ND = _plain_expert(x_TD[tok_N], w13, w2)  # never the fast kernels: the oracle must not share them
        out_TD.index_add_(0, tok_N, (y_ND * weight_TK[tok_N, slot_N, None]).to(out_TD.dtype))
    return out_TD


def _sort_by_expert(idx_TK: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The order of the N pairs sorted by expert, the token of each sorted pair, and per-expert counts."""
    flat_idx_N = idx_TK.reshape(-1)
    order_N = torch.argsort(flat_idx_N, stable=True)
    tok_N = order_N // idx_TK.shape[1]
    # scatter_add_, not bincount: a static shape, so torch.compile traces it (bincount's depends on the data).
    counts_E = torch.zeros(E, dtype=torch.long, device=idx_TK.device)
    counts_E.scatter_add_(0, flat_idx_N, torch.ones_like(flat_idx_N))
    return order_N, tok_N, counts_E


def _inverse_permutation(order_N: torch.Tensor) -> torch.Tensor:
    inv_N = torch.empty_like(order_N)
    inv_N[order_N] = torch.arange(len(order_N), device=order_N.device)
    return inv_N


class _DispatchPadded(torch.autograd.Function):
    """Each token's row once per (token, slot) pair, at its row `pos_N` of an expert-sorted buffer
    of `P` rows whose expert segments are padded with zero rows (`_padded_segments`).

    The backward is a gather through `pos_tok_N` (the padded row of each pair, in token order) and a
    sum over each token's K copies: no scatter, no accumulation."""

    @staticmethod
    def forward(x_TD: torch.Tensor, tok_N: torch.Tensor, pos_N: torch.Tensor, pos_tok_N: torch.Tensor,
                P: int) -> torch.Tensor:
        out_PD = x_TD.new_zeros(P, x_TD.shape[1])
        return out_PD.index_copy_(0, pos_N, x_TD.index_select(0, tok_N))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.T = inputs[0].shape[0]
        ctx.save_for_backward(inputs[3])

    @staticmethod
    def backward(ctx: Any, g_PD: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        (pos_tok_N,) = ctx.saved_tensors
        return g_PD.index_select(0, pos_tok_N).view(ctx.T, -1, g_PD.shape[-1]).sum(1), None, None, None, None


class _GatherRows(torch.autograd.Function):
    """`x_PD[rows_N]` for distinct rows; the backward puts each gradient row back in place (rows
    never gathered, the segments' padding, get zero)."""

    @staticmethod
    def forward(x_PD: torch.Tensor, rows_N: torch.Tensor) -> torch.Tensor:
        return x_PD.index_select(0, rows_N)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.P = inputs[0].shape[0]
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx: Any, g_ND: torch.Tensor) -> tuple[torch.Tensor, None]:
        (rows_N,) = ctx.saved_tensors
        return g_ND.new_zeros(ctx.P, g_ND.shape[1]).index_copy_(0, rows_N, g_ND), None


def _round_up(n: Any, multiple: int) -> Any:
    """`n` (ints, symbolic sizes or a tensor) rounded up to a multiple of `multiple`."""
    return (n + multiple - 1) // multiple * multiple


def _padded_segments(flat_idx_N: torch.Tensor, order_N: torch.Tensor, counts: list[int], counts_E: torch.Tensor,
                     inv_N: torch.Tensor, multiple: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Each expert's segment rounded up to a multiple of `multiple` rows: the padded counts, the
    padded row of each sorted pair, and the padded row of each pair in token order."""
    pad_E = _round_up(counts_E, multiple)
    shift_E = (pad_E.cumsum(0) - pad_E) - (counts_E.cumsum(0) - counts_E)  # where each segment moves
    pos_N = torch.arange(len(order_N), device=order_N.device) + shift_E[flat_idx_N[order_N]]
    return [_round_up(c, multiple) for c in counts], pos_N, pos_N.index_select(0, inv_N)


@dataclass
class Dispatched:
    """Where `dispatch` put the (token, slot) pairs, for `combine` to undo: `counts[e]` rows of
    expert e's segment (padding included), `rows_N` the row of each pair in token order."""

    counts: list[int]
    rows_N: torch.Tensor
    autograd: bool  # combine through `_GatherRows` (a gradient without accumulating scatters)


def _needs_grad(x_TD: torch.Tensor) -> bool:
    return (torch.is_grad_enabled() or torch.compiler.is_compiling()) and x_TD.is_floating_point()


def dispatch(x_TD: torch.Tensor, idx_TK: torch.Tensor, num_experts: int, *,
             pad_to: int = 1) -> tuple[torch.Tensor, Dispatched]:
    """Each token's row once per chosen expert, grouped by expert (expert 0's rows first): `xs_ND`
    and the bookkeeping for `combine`. With `pad_to` > 1 each expert's segment is zero-padded to a
    multiple of that many rows (see `SEGMENT_ROWS`). Expert parallelism replaces this and `combine`
    with an all-to-all; `Experts.forward(xs_ND, counts)` stays as it is."""
    order_N, tok_N, counts_E = _sort_by_expert(idx_TK, num_experts)
    inv_N = _inverse_permutation(order_N)
    counts = counts_E.tolist()
    if pad_to == 1 and not _needs_grad(x_TD):
        return x_TD.index_select(0, tok_N), Dispatched(counts, inv_N, autograd=False)
    padded, pos_N, pos_tok_N = _padded_segments(idx_TK.reshape(-1), order_N, counts, counts_E, inv_N, pad_to)
    xs_PD = _DispatchPadded.apply(x_TD, tok_N, pos_N, pos_tok_N, sum(padded))
    return xs_PD, Dispatched(padded, pos_tok_N, autograd=True)


def combine(ys_ND: torch.Tensor, weight_TK: torch.Tensor, d: Dispatched, out_dtype: torch.dtype) -> torch.Tensor:
    """Back to token order, weighted, each token's K rows summed (in `out_dtype`, as the reference's
    `index_add_`; for K = 2 the same sum bit for bit)."""
    T, K = weight_TK.shape
    rows_TKD = _GatherRows.apply(ys_ND, d.rows_N) if d.autograd else ys_ND.index_select(0, d.rows_N)
    ys_TKD = rows_TKD.view(T, K, ys_ND.shape[-1])
    return (ys_TKD * weight_TK[..., None].to(ys_TKD.dtype)).sum(1, dtype=out_dtype)


def _autocast_once(x_ND: torch.Tensor, *ws: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, cast the activations and the stacked expert weights once here, instead of
    F.linear casting each expert's slices separately (2E casts per layer forward, 2E backward)."""
    dev = x_ND.device.type
    if not torch.is_autocast_enabled(dev):
        return (x_ND, *ws)
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) for t in (x_ND, *ws))


def trains(x_TD: torch.Tensor, w13_E2FD: Any, w13_scale_E2F: torch.Tensor | None = None) -> bool:
    """Whether these plain float weights run the differentiable training path (gradients enabled or
    torch.compile tracing): plain F.linear, traceable, never the inference kernels of ops/linear.py."""
    return (_needs_grad(x_TD) and isinstance(w13_E2FD, torch.Tensor) and not w13_E2FD.is_mkldnn
            and w13_scale_E2F is None)


def expert_segments(
    xs_ND: torch.Tensor,
    counts: list[int],
    w13_E2FD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w13_scale_E2F: torch.Tensor | None = None,
    w2_scale_ED: torch.Tensor | None = None,
    *,
    act8: bool = False,
) -> torch.Tensor:
    """The experts on rows already grouped by expert (`counts[e]` rows of expert e, in order): one
    SwiGLU per segment. `act8`: int4 weights times the inputs of both products rounded to int8 per
    block of 32 (`mixlab.ops.quant.round_activations_q8`), as the native steps multiply them.

    For training (`trains`) every backward step is a `cat` or a `stack` (unbind and split, not
    w[e] / xs[a:b], whose backward would materialise a zero-filled gradient of the whole tensor per
    expert), and under autocast the activations and stacked weights are cast once per layer. Under
    torch.compile the counts are symbolic: every expert runs (a zero-row matmul is harmless).
    """
    compiling = torch.compiler.is_compiling()
    if trains(xs_ND, w13_E2FD, w13_scale_E2F):
        xs_ND, w13_E2FD, w2_EDF = _autocast_once(xs_ND, w13_E2FD, w2_EDF)
        ys = [_plain_expert(xs_nD, w13_2FD, w2_DF)
              for n, xs_nD, w13_2FD, w2_DF in zip(counts, xs_ND.split(counts), w13_E2FD.unbind(0),
                                                  w2_EDF.unbind(0), strict=True)
              if compiling or n]
    else:
        ys = []
        for e, xs_nD in enumerate(xs_ND.split(counts)):
            if compiling or counts[e]:
                s13 = None if w13_scale_E2F is None else w13_scale_E2F[e]
                s2 = None if w2_scale_ED is None else w2_scale_ED[e]
                ys.append(_expert(xs_nD, w13_E2FD[e], w2_EDF[e], s13, s2, act8))
    if not ys:  # no tokens
        return xs_ND.new_zeros(0, xs_ND.shape[-1])  # experts map width D to D
    return torch.cat(ys) if len(ys) > 1 else ys[0]


def grouped_applies(w13_E2FD: Any, w13_scale_E2F: torch.Tensor | None, x_TD: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` can run these experts: plain float (not float64) stacked weights
    whose rows (D and F elements) are multiples of 16 bytes, as its strides must be."""
    if not (isinstance(w13_E2FD, torch.Tensor) and not w13_E2FD.is_mkldnn and w13_scale_E2F is None
            and hasattr(torch, "_grouped_mm") and x_TD.dtype != torch.float64):
        return False
    E, F2, D = w13_E2FD.shape
    return all(n * w13_E2FD.element_size() % 16 == 0 for n in (D, F2 // 2))


def expert_grouped_mm(xs_ND: torch.Tensor, counts: list[int], w13_E2FD: torch.Tensor,
                      w2_EDF: torch.Tensor) -> torch.Tensor:
    """`expert_segments` with each projection one grouped matmul over all experts."""
    offs_E = torch.tensor(counts, device=xs_ND.device).cumsum(0).to(torch.int32)  # end row of each segment
    h_N2F = torch._grouped_mm(xs_ND, w13_E2FD.transpose(1, 2), offs=offs_E)
    return torch._grouped_mm(swiglu(h_N2F).contiguous(), w2_EDF.transpose(1, 2), offs=offs_E)


def sorted_grouped(
    x_TD: torch.Tensor,
    w13_E2FD: torch.Tensor,
    w2_EDF: torch.Tensor,
    idx_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    *,
    w13_scale_E2F: torch.Tensor | None = None,
    w2_scale_ED: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dropless sort-by-expert: `dispatch`, one matmul per expert segment, `combine`.

    The (token, slot) pairs are sorted by expert so each expert reads one contiguous block of rows;
    no token is ever dropped (MegaBlocks, arXiv 2211.15841). Training pads the segments to
    `SEGMENT_ROWS` rows.
    """
    pad = SEGMENT_ROWS if trains(x_TD, w13_E2FD, w13_scale_E2F) else 1
    xs_ND, d = dispatch(x_TD, idx_TK, len(w13_E2FD), pad_to=pad)
    ys_ND = expert_segments(xs_ND, d.counts, w13_E2FD, w2_EDF, w13_scale_E2F, w2_scale_ED)
    return combine(ys_ND, weight_TK, d, x_TD.dtype)


def grouped_mm(
    x_TD: torch.Tensor,
    w13_E2FD: torch.Tensor,
    w2_EDF: torch.Tensor,
    idx_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    *,
    w13_scale_E2F: torch.Tensor | None = None,
    w2_scale_ED: torch.Tensor | None = None,
) -> torch.Tensor:
    """As `sorted`, with each projection one grouped matmul over all experts (`torch._grouped_mm`)."""
    if not grouped_applies(w13_E2FD, w13_scale_E2F, x_TD):
        return sorted_grouped(x_TD, w13_E2FD, w2_EDF, idx_TK, weight_TK,
                              w13_scale_E2F=w13_scale_E2F, w2_scale_ED=w2_scale_ED)
    xs_ND, d = dispatch(x_TD, idx_TK, len(w13_E2FD))
    return combine(expert_grouped_mm(xs_ND, d.counts, w13_E2FD, w2_EDF), weight_TK, d, x_TD.dtype)


def decode(
    x_TD: torch.Tensor,
    w13_E2FD: torch.Tensor,
    w2_EDF: torch.Tensor,
    idx_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    *,
    w13_scale_E2F: torch.Tensor | None = None,
    w2_scale_ED: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token: run only its K experts on views of the stacked weights and sum them."""
    if x_TD.shape[0] != 1:
        return sorted_grouped(x_TD, w13_E2FD, w2_EDF, idx_TK, weight_TK,
                              w13_scale_E2F=w13_scale_E2F, w2_scale_ED=w2_scale_ED)
    out_TD: torch.Tensor | None = None
    for k, e in enumerate(idx_TK[0].tolist()):
        s13 = None if w13_scale_E2F is None else w13_scale_E2F[e]
        s2 = None if w2_scale_ED is None else w2_scale_ED[e]
        y_TD = _expert(x_TD, w13_E2FD[e], w2_EDF[e], s13, s2) * weight_TK[:, k : k + 1].to(x_TD.dtype)
        out_TD = y_TD if out_TD is None else out_TD + y_TD
    assert out_TD is not None
    return out_TD


def native_experts(
    x_TD: torch.Tensor,
    w13_E2FD: torch.Tensor,
    w2_EDF: torch.Tensor,
    idx_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    *,
    w13_scale_E2F: torch.Tensor | None = None,
    w2_scale_ED: torch.Tensor | None = None,
) -> torch.Tensor:
    """The C kernel (`torch.ops.mixlab.moe`). It has no autograd and needs the kernels loaded
    (`mixlab.ops.native.load`); `auto` runs it only where the registry says so."""
    return torch.ops.mixlab.moe(x_TD, w13_E2FD, w2_EDF, idx_TK, weight_TK, w13_scale_E2F, w2_scale_ED)


def triton(
    x_TD: torch.Tensor,
    w13_E2FD: torch.Tensor,
    w2_EDF: torch.Tensor,
    idx_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    *,
    w13_scale_E2F: torch.Tensor | None = None,
    w2_scale_ED: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused Triton kernel (`mixlab.ops.triton_moe`; CUDA, or the CPU interpreter in tests)."""
    from mixlab.ops.triton_moe import triton_moe

    return triton_moe(x_TD, w13_E2FD, w2_EDF, idx_TK, weight_TK, w13_scale_E2F=w13_scale_E2F,
                      w2_scale_ED=w2_scale_ED)


IMPLS: dict[str, MoEImpl] = {
    "reference": reference,
    "sorted": sorted_grouped,
    "grouped": grouped_mm,
    "decode": decode,
    "native": native_experts,
    "triton": triton,
}


def check_impl(impl: str) -> None:
    """ValueError unless `impl` is "auto" or one of `IMPLS`."""
    if impl != "auto" and impl not in IMPLS:
        raise ValueError(f"unknown MoE implementation {impl!r}; known: auto, {', '.join(IMPLS)}")


def choose_impl(T: int, w13_E2FD: torch.Tensor | None = None, x_TD: torch.Tensor | None = None,
                w13_scale_E2F: torch.Tensor | None = None) -> str:
    """What `auto` runs for T tokens: `mixlab.ops.registry`'s choice (without tensors: for inference
    on CPU with weights the native kernels do not take)."""
    if w13_E2FD is None or x_TD is None:
        return registry.choose("moe", device="cpu", fmt="strided", dtype=torch.float32, tokens=T, training=False)
    return registry.moe_impl(x_TD, w13_E2FD, w13_scale_E2F)


def moe_ffn(
    x_TD: torch.Tensor,
    w13_E2FD: torch.Tensor,
    w2_EDF: torch.Tensor,
    idx_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    *,
    impl: str = "auto",
    w13_scale_E2F: torch.Tensor | None = None,
    w2_scale_ED: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply the chosen experts to each token and mix them with the router weights.

    `w13_scale_E2F` / `w2_scale_ED`: per-row scales when the expert weights are int8.
    """
    if impl == "auto":
        impl = registry.moe_impl(x_TD, w13_E2FD, w13_scale_E2F)
    check_impl(impl)
    fn = IMPLS[impl]
    if (w13_scale_E2F is None) != (w2_scale_ED is None):
        raise ValueError("int8 experts need both w13_scale_E2F and w2_scale_ED")
    return fn(x_TD, w13_E2FD, w2_EDF, idx_TK, weight_TK, w13_scale_E2F=w13_scale_E2F, w2_scale_ED=w2_scale_ED)
