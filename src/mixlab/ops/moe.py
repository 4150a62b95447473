"""The one seam for the expert computation of an MoE layer.

Shape legend: T tokens (batch and sequence flattened), D model width, F expert FFN width,
E experts, K experts chosen per token, N = T*K (token, slot) pairs.

Expert weights are stacked per layer: `w13_E2FD` holds each expert's gate (w1) and up (w3)
projections fused along dim 1 (rows [0, F) are w1, rows [F, 2F) are w3), `w2_EDF` the down
projection. Every implementation computes, for each token t,

    y_t = sum_k weight_tk * w2[e] @ (silu(w1[e] @ x_t) * (w3[e] @ x_t)),   e = idx_tk

and `reference` is the readable oracle every other implementation is tested against. With int8
weight-only quantisation (`mixlab.ops.quant`) the weights are int8 and `w13_scale_E2F` /
`w2_scale_ED` hold one scale per output row; every implementation accepts them. For CPU inference
the experts may also be a list of oneDNN-packed matrices, one per expert (`mixlab.ops.linear.pack`);
everything but `grouped` indexes them the same way.

Implementations (all dropless):
- `reference`: one loop over experts, gather and scatter per expert (mistral-inference's moe.py).
- `sorted`: sort the N pairs by expert, one gather, one matmul per contiguous segment, one weighted
  scatter-add (MegaBlocks, arXiv 2211.15841). Differentiable; the training path.
- `grouped`: as `sorted`, but the per-expert matmuls are one `torch._grouped_mm` call each.
- `decode`: for one token (a decoding step): only its K experts run, on views of the stacked
  weights, with no sort, gather, scatter or weight copy. Decoding reads each chosen expert's
  weights once, so its speed is set by memory bandwidth; every skipped op is saved latency.

`auto` (the default) picks `decode` for a single token and `sorted` otherwise (on this CPU the
grouped kernel is no faster than the segment loop; see BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from mixlab.ops.linear import linear
from mixlab.ops.quant import dequantize_int8


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
        if w13_scale_E2F is not None and w2_scale_ED is not None:  # int8: the dequantised weights
            w13 = dequantize_int8(w13, w13_scale_E2F[e], x_TD.dtype)
            w2 = dequantize_int8(w2, w2_scale_ED[e], x_TD.dtype)
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
    counts_E = torch.bincount(flat_idx_N, minlength=E)
    return order_N, tok_N, counts_E


def _combine(
    x_TD: torch.Tensor, ys_ND: torch.Tensor, weight_TK: torch.Tensor, order_N: torch.Tensor, tok_N: torch.Tensor
) -> torch.Tensor:
    """The one weighted scatter-add back to token order."""
    ys_ND = ys_ND * weight_TK.reshape(-1)[order_N, None].to(ys_ND.dtype)
    out_TD = torch.zeros_like(x_TD)
    return out_TD.index_add_(0, tok_N, ys_ND.to(out_TD.dtype))


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
    """Dropless sort-by-expert: one gather, one matmul per expert segment, one weighted scatter-add.

    The (token, slot) pairs are sorted by expert so each expert reads one contiguous block of rows;
    no token is ever dropped (MegaBlocks, arXiv 2211.15841).
    """
    order_N, tok_N, counts_E = _sort_by_expert(idx_TK, len(w13_E2FD))
    xs_ND = x_TD[tok_N]
    # unbind, not w[e]: in backward, each w[e] would materialise a zero-filled gradient of the whole
    # stacked tensor (E of them per step); unbind's backward stacks the per-expert gradients once.
    w13s = w13_E2FD.unbind(0) if isinstance(w13_E2FD, torch.Tensor) else w13_E2FD
    w2s = w2_EDF.unbind(0) if isinstance(w2_EDF, torch.Tensor) else w2_EDF
    ys = []
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            s13 = None if w13_scale_E2F is None else w13_scale_E2F[e]
            s2 = None if w2_scale_ED is None else w2_scale_ED[e]
            ys.append(_expert(xs_ND[start : start + n], w13s[e], w2s[e], s13, s2))
        start += n
    if not ys:  # no tokens
        return torch.zeros_like(x_TD)
    ys_ND = torch.cat(ys) if len(ys) > 1 else ys[0]
    return _combine(x_TD, ys_ND, weight_TK, order_N, tok_N)


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
    return _combine(x_TD, ys_ND, weight_TK, order_N, tok_N)


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


IMPLS: dict[str, MoEImpl] = {
    "reference": reference,
    "sorted": sorted_grouped,
    "grouped": grouped_mm,
    "decode": decode,
}


def choose_impl(T: int) -> str:
    """What `auto` runs for T tokens: `decode` for one token, else the sorted segment loop."""
    return "decode" if T == 1 else "sorted"


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
        impl = choose_impl(x_TD.shape[0])
    try:
        fn = IMPLS[impl]
    except KeyError:
        raise ValueError(f"unknown MoE implementation {impl!r}; known: auto, {', '.join(IMPLS)}") from None
    if (w13_scale_E2F is None) != (w2_scale_ED is None):
        raise ValueError("int8 experts need both w13_scale_E2F and w2_scale_ED")
    return fn(x_TD, w13_E2FD, w2_EDF, idx_TK, weight_TK, w13_scale_E2F=w13_scale_E2F, w2_scale_ED=w2_scale_ED)
