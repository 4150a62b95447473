"""The one seam for the expert computation of an MoE layer.

Shape legend: T tokens (batch and sequence flattened), D model width, F expert FFN width,
E experts, K experts chosen per token.

Expert weights are stacked per layer: `w13_E2FD` holds each expert's gate (w1) and up (w3)
projections fused along dim 1 (rows [0, F) are w1, rows [F, 2F) are w3), `w2_EDF` the down
projection. Every implementation computes, for each token t,

    y_t = sum_k weight_tk * w2[e] @ (silu(w1[e] @ x_t) * (w3[e] @ x_t)),   e = idx_tk

and `reference` is the readable oracle every other implementation is tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

MoEImpl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _expert(x_ND: torch.Tensor, w13_2FD: torch.Tensor, w2_DF: torch.Tensor) -> torch.Tensor:
    gate_NF, up_NF = F.linear(x_ND, w13_2FD).chunk(2, dim=-1)
    return F.linear(F.silu(gate_NF) * up_NF, w2_DF)


def reference(
    x_TD: torch.Tensor, w13_E2FD: torch.Tensor, w2_EDF: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor
) -> torch.Tensor:
    """The oracle: for each expert, the tokens that chose it (as mistral-inference's moe.py)."""
    out_TD = torch.zeros_like(x_TD)
    for e in range(w13_E2FD.shape[0]):
        tok_N, slot_N = torch.where(idx_TK == e)
        if tok_N.numel() == 0:
            continue
        y_ND = _expert(x_TD[tok_N], w13_E2FD[e], w2_EDF[e])
        out_TD.index_add_(0, tok_N, (y_ND * weight_TK[tok_N, slot_N, None]).to(out_TD.dtype))
    return out_TD


def sorted_grouped(
    x_TD: torch.Tensor, w13_E2FD: torch.Tensor, w2_EDF: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor
) -> torch.Tensor:
    """Dropless sort-by-expert: one gather, one matmul per expert segment, one weighted scatter-add.

    The (token, slot) pairs are sorted by expert so each expert reads one contiguous block of rows;
    no token is ever dropped (MegaBlocks, arXiv 2211.15841).
    """
    T, K = idx_TK.shape
    E = w13_E2FD.shape[0]
    flat_idx_N = idx_TK.reshape(-1)  # N = T*K
    order_N = torch.argsort(flat_idx_N, stable=True)
    tok_N = order_N // K
    counts_E = torch.bincount(flat_idx_N, minlength=E).tolist()
    xs_ND = x_TD[tok_N]
    ys = []
    start = 0
    for e, n in enumerate(counts_E):
        if n:
            ys.append(_expert(xs_ND[start : start + n], w13_E2FD[e], w2_EDF[e]))
        start += n
    ys_ND = torch.cat(ys) if ys else xs_ND[:0]
    ys_ND = ys_ND * weight_TK.reshape(-1)[order_N, None].to(ys_ND.dtype)
    out_TD = torch.zeros_like(x_TD)
    out_TD.index_add_(0, tok_N, ys_ND.to(out_TD.dtype))
    return out_TD


IMPLS: dict[str, MoEImpl] = {
    "reference": reference,
    "sorted": sorted_grouped,
}


def moe_ffn(
    x_TD: torch.Tensor,
    w13_E2FD: torch.Tensor,
    w2_EDF: torch.Tensor,
    idx_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Apply the chosen experts to each token and mix them with the router weights."""
    if impl == "auto":
        impl = "sorted"
    try:
        fn = IMPLS[impl]
    except KeyError:
        raise ValueError(f"unknown MoE implementation {impl!r}; known: {', '.join(IMPLS)}") from None
    return fn(x_TD, w13_E2FD, w2_EDF, idx_TK, weight_TK)
