"""The sparse MoE block: a float32 router choosing top-k of E SwiGLU experts per token.

Shape legend: T tokens, D width, F expert FFN width, E experts, K experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixlab.config import ModelConfig
from mixlab.ops.moe import moe_ffn


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
    """
    top_TK, idx_TK = torch.topk(logits_TE, top_k, dim=-1)
    return idx_TK, torch.softmax(top_TK, dim=-1)


class MoEBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.moe is not None
        self.moe = config.moe
        E, F_, D = config.moe.num_experts, config.ffn_dim, config.dim
        self.gate = nn.Linear(D, E, bias=False)  # the router
        # Stacked experts: expert parallelism shards dim 0, grouped matmuls need no reshape.
        self.w13 = nn.Parameter(torch.empty(E, 2 * F_, D))  # w1 (gate) rows [0, F), w3 (up) rows [F, 2F)
        self.w2 = nn.Parameter(torch.empty(E, D, F_))
        self.impl = "auto"

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(-1, D)
        r_TD = x_TD
        if self.training and self.moe.jitter > 0:
            r_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.moe.jitter, 1 + self.moe.jitter)
        # Route in float32: in bf16, near-tied logits flip expert choices and the softmax loses precision.
        # Autocast is switched off here, or it would run this linear in bf16 despite the casts.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(r_TD.float(), self.gate.weight.float())
        idx_TK, weight_TK = route(logits_TE, self.moe.top_k)
        dropped = 0
        if self.moe.capacity_factor is not None:
            weight_TK, dropped = apply_capacity(idx_TK, weight_TK, self.moe.num_experts, self.moe.capacity_factor)
        # int8 weight-only experts (mixlab.ops.quant.quantize_model_int8) carry per-row scales.
        y_TD = moe_ffn(x_TD, self.w13, self.w2, idx_TK, weight_TK, impl=self.impl,
                       w13_scale_E2F=getattr(self, "w13_scale", None), w2_scale_ED=getattr(self, "w2_scale", None))
        return y_TD.view(B, T, D), Routing(logits_TE, idx_TK, weight_TK, dropped)


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
