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

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from mixlab.ops import registry
from mixlab.ops.linear import linear
from mixlab.ops.quant import dequantize

# Training pads each expert's segment to a multiple of this many rows (see `_sorted_training`).
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
) -> torch.Tensor:
    gate_NF, up_NF = linear(x_ND, w13_2FD, s13_2F).chunk(2, dim=-1)
    return linear(F.silu(gate_NF) * up_NF, w2_DF, s2_D)


def _expert_autograd(
    x_ND: torch.Tensor, w13_2FD: torch.Tensor, w2_DF: torch.Tensor, s13_2F: torch.Tensor | None = None,
    s2_D: torch.Tensor | None = None,
) -> torch.Tensor:
    """`_expert` for training (no int8 scales): plain F.linear, differentiable and traceable by
    torch.compile, never the inference kernels of ops/linear.py."""
    gate_NF, up_NF = F.linear(x_ND, w13_2FD).chunk(2, dim=-1)
    return F.linear(F.silu(gate_NF) * up_NF, w2_DF)


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
        # Plain F.linear, never the fast kernels of ops/linear.py: the oracle must not share them.
        gate_NF, up_NF = F.linear(x_TD[tok_N], w13).chunk(2, dim=-1)
        y_ND = F.linear(F.silu(gate_NF) * up_NF, w2)
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


def _round_up(n: Any) -> Any:
    """`n` (ints, symbolic sizes or a tensor) rounded up to a multiple of `SEGMENT_ROWS`."""
    return (n + SEGMENT_ROWS - 1) // SEGMENT_ROWS * SEGMENT_ROWS


def _padded_segments(flat_idx_N: torch.Tensor, order_N: torch.Tensor, counts: list[int], counts_E: torch.Tensor,
                     inv_N: torch.Tensor) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Each expert's segment rounded up to a multiple of `SEGMENT_ROWS` rows: the padded counts, the
    padded row of each sorted pair, and the padded row of each pair in token order."""
    pad_E = _round_up(counts_E)
    shift_E = (pad_E.cumsum(0) - pad_E) - (counts_E.cumsum(0) - counts_E)  # where each segment moves
    pos_N = torch.arange(len(order_N), device=order_N.device) + shift_E[flat_idx_N[order_N]]
    return [_round_up(c) for c in counts], pos_N, pos_N.index_select(0, inv_N)


def _combine(ys_ND: torch.Tensor, weight_TK: torch.Tensor, inv_N: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Back to token order (`inv_N`: the sorted row of each (token, slot) pair), weighted, each
    token's K rows summed (in `out_dtype`, as the reference's `index_add_`; for K = 2 the same sum
    bit for bit)."""
    T, K = weight_TK.shape
    ys_TKD = ys_ND.index_select(0, inv_N).view(T, K, -1)
    return (ys_TKD * weight_TK[..., None].to(ys_TKD.dtype)).sum(1, dtype=out_dtype)


def _autocast_once(x_ND: torch.Tensor, *ws: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, cast the activations and the stacked expert weights once here, instead of
    F.linear casting each expert's slices separately (2E casts per layer forward, 2E backward)."""
    dev = x_ND.device.type
    if not torch.is_autocast_enabled(dev):
        return (x_ND, *ws)
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) for t in (x_ND, *ws))


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
    """Dropless sort-by-expert: one gather, one matmul per expert segment, one permutation back.

    The (token, slot) pairs are sorted by expert so each expert reads one contiguous block of rows;
    no token is ever dropped (MegaBlocks, arXiv 2211.15841). Training (and anything torch.compile
    traces) takes `_sorted_training`: plain differentiable F.linear, never the inference kernels.
    """
    E = len(w13_E2FD)
    order_N, tok_N, counts_E = _sort_by_expert(idx_TK, E)
    inv_N = _inverse_permutation(order_N)
    counts = counts_E.tolist()
    compiling = torch.compiler.is_compiling()
    training = (torch.is_grad_enabled() or compiling) and isinstance(w13_E2FD, torch.Tensor) and w13_scale_E2F is None
    if training and not w13_E2FD.is_mkldnn and x_TD.is_floating_point():
        return _sorted_training(x_TD, w13_E2FD, w2_EDF, idx_TK, weight_TK, order_N, tok_N, inv_N, counts_E, counts)
    xs_ND = x_TD.index_select(0, tok_N)
    # Under torch.compile the counts are symbolic: every expert runs (a zero-row matmul is harmless).
    ys = []
    for e, xs_nD in enumerate(xs_ND.split(counts)):
        if compiling or counts[e]:
            s13 = None if w13_scale_E2F is None else w13_scale_E2F[e]
            s2 = None if w2_scale_ED is None else w2_scale_ED[e]
            ys.append(_expert(xs_nD, w13_E2FD[e], w2_EDF[e], s13, s2))
    if not ys:  # no tokens
        return torch.zeros_like(x_TD)
    ys_ND = torch.cat(ys) if len(ys) > 1 else ys[0]
    return _combine(ys_ND, weight_TK, inv_N, x_TD.dtype)


def _sorted_training(x_TD: torch.Tensor, w13_E2FD: torch.Tensor, w2_EDF: torch.Tensor, idx_TK: torch.Tensor,
                     weight_TK: torch.Tensor, order_N: torch.Tensor, tok_N: torch.Tensor, inv_N: torch.Tensor,
                     counts_E: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """`sorted` for training: differentiable; every backward step is a gather, a non-accumulating
    `index_copy_`, a `cat` or a `stack` (no `index_add_`, no zero-filled gradient per expert).

    Each expert's segment is padded with zero rows to a multiple of `SEGMENT_ROWS` (MegaBlocks'
    block padding): the per-expert matmul shapes then come from a small set that oneDNN has already
    compiled kernels for, instead of new row counts every step (zero rows add nothing to any
    gradient; on average they add E * SEGMENT_ROWS / 2 rows of work). Under autocast the
    activations and the stacked weights are cast once per layer, not once per expert.
    """
    T, K = weight_TK.shape
    if T == 0:
        return torch.zeros_like(x_TD)
    padded, pos_N, pos_tok_N = _padded_segments(idx_TK.reshape(-1), order_N, counts, counts_E, inv_N)
    xs_PD = _DispatchPadded.apply(x_TD, tok_N, pos_N, pos_tok_N, sum(padded))
    xs_PD, w13_E2FD, w2_EDF = _autocast_once(xs_PD, w13_E2FD, w2_EDF)
    # unbind / split, not w[e] / xs[a:b]: in backward, each index or slice would materialise a
    # zero-filled gradient of the whole tensor (E of them per layer); unbind and split backward
    # stack / cat the per-expert gradients once. Under torch.compile the counts are symbolic: every
    # expert runs (a zero-row matmul is harmless).
    compiling = torch.compiler.is_compiling()
    ys = [_expert_autograd(xs_pD, w13_2FD, w2_DF)
          for n, xs_pD, w13_2FD, w2_DF in zip(padded, xs_PD.split(padded), w13_E2FD.unbind(0), w2_EDF.unbind(0),
                                              strict=True)
          if compiling or n]
    ys_TKD = _GatherRows.apply(torch.cat(ys), pos_tok_N).view(T, K, -1)
    return (ys_TKD * weight_TK[..., None].to(ys_TKD.dtype)).sum(1, dtype=x_TD.dtype)


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
    plain = isinstance(w13_E2FD, torch.Tensor) and not w13_E2FD.is_mkldnn
    if w13_scale_E2F is not None or not plain or not hasattr(torch, "_grouped_mm") or x_TD.dtype == torch.float64:
        return sorted_grouped(x_TD, w13_E2FD, w2_EDF, idx_TK, weight_TK,
                              w13_scale_E2F=w13_scale_E2F, w2_scale_ED=w2_scale_ED)
    E = w13_E2FD.shape[0]
    order_N, tok_N, counts_E = _sort_by_expert(idx_TK, E)
    offs_E = counts_E.cumsum(0).to(torch.int32)  # end row of each expert's segment
    xs_ND = x_TD[tok_N]
    h_N2F = torch._grouped_mm(xs_ND, w13_E2FD.transpose(1, 2), offs=offs_E)
    gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
    ys_ND = torch._grouped_mm((F.silu(gate_NF) * up_NF).contiguous(), w2_EDF.transpose(1, 2), offs=offs_E)
    return _combine(ys_ND, weight_TK, _inverse_permutation(order_N), x_TD.dtype)


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
    try:
        fn = IMPLS[impl]
    except KeyError:
        raise ValueError(f"unknown MoE implementation {impl!r}; known: auto, {', '.join(IMPLS)}") from None
    if (w13_scale_E2F is None) != (w2_scale_ED is None):
        raise ValueError("int8 experts need both w13_scale_E2F and w2_scale_ED")
    return fn(x_TD, w13_E2FD, w2_EDF, idx_TK, weight_TK, w13_scale_E2F=w13_scale_E2F, w2_scale_ED=w2_scale_ED)
