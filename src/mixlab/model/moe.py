"""The sparse MoE block in three parts: a float32 `Router` choosing top-k of E experts per token,
`dispatch` / `combine` (`mixlab.ops.moe`: tokens grouped by expert and back), and an `Experts`
module that owns the E SwiGLU experts' weights in one format and computes rows already grouped by
expert, `forward(xs_ND, counts)`.

Expert parallelism shards `Experts` on its expert dimension (dim 0 of `w13`, `w2`) and replaces
dispatch / combine with an all-to-all, from outside the model. Each weight format is its own class:
`Experts` here (plain float, trainable), the inference formats in `mixlab.model.formats`.

Shape legend: T tokens, D width, F expert FFN width, E experts, K experts per token, N rows grouped
by expert.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mixlab.config import ModelConfig, MoEConfig
from mixlab.ops.moe import (
    SEGMENT_ROWS,
    choose_impl,
    combine,
    dispatch,
    expert_grouped_mm,
    expert_segments,
    grouped_applies,
    moe_ffn,
    trains,
)


@dataclass
class Routing:
    """What the router did in one layer: raw logits (float32), chosen experts and their weights."""

    logits_TE: torch.Tensor
    idx_TK: torch.Tensor
    weight_TK: torch.Tensor
    dropped: int = 0  # (token, slot) pairs over an expert's capacity (only with moe.capacity_factor)


def route(logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts and their mixing weights: softmax over the k chosen logits (Mixtral §2.1).

    This equals transformers' softmax -> top-k -> renormalise, since softmax is monotone and
    renormalising the k largest probabilities cancels the full partition function.

    Tied logits go to the lowest expert index, as in the native kernels' router (decode.c `route`):
    `torch.topk` breaks ties as its kernel happens to (experts 2 and 3 of 4 equal logits), so a
    router of equal rows (an upcycled model's `--router-init zeros`) chose other experts in every
    path. A stable sort of E values per token costs no more than topk.
    """
    sorted_TE, order_TE = torch.sort(logits_TE, dim=-1, descending=True, stable=True)
    top_TK, idx_TK = sorted_TE[..., :top_k].contiguous(), order_TE[..., :top_k].contiguous()
    return idx_TK, torch.softmax(top_TK, dim=-1)


class Router(nn.Module):
    """The gate: `weight` `[E, D]`, top-k in float32, training-time jitter and optional capacity."""

    def __init__(self, dim: int, moe: MoEConfig) -> None:
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.empty(moe.num_experts, dim))
        nn.init.uniform_(self.weight, -dim**-0.5, dim**-0.5)  # nn.Linear's default; no work on "meta"

    def extra_repr(self) -> str:
        m = self.moe
        return (f"dim={self.weight.shape[-1]}, num_experts={m.num_experts}, top_k={m.top_k}"
                + (f", capacity_factor={m.capacity_factor}" if m.capacity_factor is not None else ""))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        r_TD = x_TD
        if self.training and self.moe.jitter > 0:
            r_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.moe.jitter, 1 + self.moe.jitter)
        # Route in float32: in bf16, near-tied logits flip expert choices and the softmax loses precision.
        # Autocast is switched off here, or it would run this linear in bf16 despite the casts.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(r_TD.float(), self.weight.float())
        return self.routing(logits_TE)

    def routing(self, logits_TE: torch.Tensor) -> Routing:
        """The top-k experts and their weights for float32 router logits (capacity applied): the rest of
        `forward`, also for logits computed elsewhere (a LoRA adapter's update added to them)."""
        idx_TK, weight_TK = route(logits_TE, self.moe.top_k)
        dropped = 0
        if self.moe.capacity_factor is not None:
            weight_TK, dropped = apply_capacity(idx_TK, weight_TK, self.moe.num_experts, self.moe.capacity_factor)
        return Routing(logits_TE, idx_TK, weight_TK, dropped)


class ExpertWeights(NamedTuple):
    """An experts module's weights as the whole-layer kernels of `mixlab.ops.moe` take them: stacked
    tensors (or one oneDNN-packed matrix per expert) and, for int8, per-row scales."""

    w13: torch.Tensor | Sequence[torch.Tensor]  # [E, 2F, D]
    w2: torch.Tensor | Sequence[torch.Tensor]  # [E, D, F]
    w13_scale: torch.Tensor | None = None  # [E, 2F]
    w2_scale: torch.Tensor | None = None  # [E, D]


class ExpertsBase(nn.Module):
    """E SwiGLU experts, w2 @ (silu(w1 @ x) * (w3 @ x)), whose weights are held in one format.

    Subclasses (one per format) store the weights and say what they hold through `weights`;
    `forward` computes rows already grouped by expert."""

    num_experts: int

    def weights(self) -> ExpertWeights:
        raise NotImplementedError

    def mix(self, x_TD: torch.Tensor, routing: Routing, impl: str) -> torch.Tensor:
        """The layer's output `[T, D]`: each token's chosen experts mixed with the router weights.
        `impl` chooses the computation (`auto`, or one of `mixlab.ops.moe.IMPLS`): `sorted` and
        `grouped` run dispatch -> `forward` -> combine here; `reference` (the oracle), `decode` (one
        token) and `native` (the C kernel) are whole-layer kernels on `weights()`."""
        w = self.weights()
        if impl == "auto":
            impl = choose_impl(x_TD.shape[0], w.w13, x_TD, w.w13_scale)  # type: ignore[arg-type]
        if impl in ("sorted", "grouped"):
            # Training pads each expert's segment (see mixlab.ops.moe.SEGMENT_ROWS).
            pad = SEGMENT_ROWS if impl == "sorted" and trains(x_TD, w.w13, w.w13_scale) else 1
            xs_ND, d = dispatch(x_TD, routing.idx_TK, self.num_experts, pad_to=pad)
            ys_ND = self(xs_ND, d.counts, grouped=impl == "grouped")
            return combine(ys_ND, routing.weight_TK, d, x_TD.dtype)
        return moe_ffn(x_TD, w.w13, w.w2, routing.idx_TK, routing.weight_TK, impl=impl,  # type: ignore[arg-type]
                       w13_scale_E2F=w.w13_scale, w2_scale_ED=w.w2_scale)

    def forward(self, xs_ND: torch.Tensor, counts: list[int], *, grouped: bool = False) -> torch.Tensor:
        """`counts[e]` rows of expert e, in expert order (what `dispatch` makes) -> `[N, D]`.
        `grouped`: one `torch._grouped_mm` per projection where this format allows it."""
        w = self.weights()
        if grouped and grouped_applies(w.w13, w.w13_scale, xs_ND):
            assert isinstance(w.w13, torch.Tensor) and isinstance(w.w2, torch.Tensor)
            return expert_grouped_mm(xs_ND, counts, w.w13, w.w2)
        return expert_segments(xs_ND, counts, w.w13, w.w2, w.w13_scale, w.w2_scale)  # type: ignore[arg-type]


class Experts(ExpertsBase):
    """Plain float experts, stacked: `w13` `[E, 2F, D]` (w1 (gate) rows [0, F), w3 (up) rows
    [F, 2F)), `w2` `[E, D, F]`. The trainable format; grouped matmuls need no reshape."""

    def __init__(self, num_experts: int, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.num_experts, self.dim, self.ffn_dim = num_experts, dim, ffn_dim
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * ffn_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, ffn_dim))
        # nn.Linear's default per expert, U(±1/sqrt(fan_in)), as every other module of a freshly built
        # model has (init_weights or a checkpoint replaces it; no work on the "meta" device)
        nn.init.uniform_(self.w13, -dim**-0.5, dim**-0.5)
        nn.init.uniform_(self.w2, -ffn_dim**-0.5, ffn_dim**-0.5)

    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.w13, self.w2)

    def extra_repr(self) -> str:  # num_experts: this process's, under expert parallelism
        return f"num_experts={self.num_experts}, dim={self.dim}, ffn_dim={self.ffn_dim}"


class MoEBlock(nn.Module):
    """Router -> dispatch -> Experts -> combine (`ExpertsBase.mix`). `impl` chooses the expert
    computation (`auto`, or one of `mixlab.ops.moe.IMPLS`): `sorted` and `grouped` run the three
    parts; `reference` (the oracle), `decode` (one token) and `native` (the C kernel) are
    whole-layer kernels. Offloaded experts (`mixlab.model.formats.OffloadedExperts`) read the
    chosen experts into a cache first."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.moe is not None
        self.moe = config.moe
        # Experts before the router: the parameter order (and so a seeded init_weights) of earlier versions.
        self.experts: ExpertsBase = Experts(config.moe.num_experts, config.dim, config.ffn_dim)
        self.gate = Router(config.dim, config.moe)
        self.impl = "auto"

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(-1, D)
        routing = self.gate(x_TD)
        y_TD = self.experts.mix(x_TD, routing, self.impl)
        return y_TD.view(B, T, D), routing


def apply_capacity(
    idx_TK: torch.Tensor, weight_TK: torch.Tensor, num_experts: int, capacity_factor: float
) -> tuple[torch.Tensor, int]:
    """Token dropping (GShard arXiv 2006.16668 §2.2, Switch arXiv 2101.03961 §2.2): each expert takes
    at most C = ceil(capacity_factor * T * K / E) (token, slot) pairs; first choices (slot 0) of all
    tokens are served before second choices, in token order. Over-capacity pairs get weight 0, so
    the token keeps only the residual for that slot. Returns the new weights and the number dropped."""
    T, K = idx_TK.shape
    capacity = math.ceil(capacity_factor * T * K / num_experts)
    # Slot-major order: all slot-0 choices, then all slot-1 choices (priority to first choices).
    flat_N = idx_TK.t().reshape(-1)
    onehot_NE = F.one_hot(flat_N, num_experts)
    position_N = ((onehot_NE.cumsum(0) - 1) * onehot_NE).sum(-1)  # arrival order within its expert
    keep_TK = (position_N < capacity).view(K, T).t()
    return weight_TK * keep_TK.to(weight_TK.dtype), int((~keep_TK).sum())
