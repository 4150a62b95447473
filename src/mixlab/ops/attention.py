"""Attention for one query token (a decoding step), without SDPA's fixed cost.

PyTorch's CPU `scaled_dot_product_attention` runs a flash-attention kernel built for blocks of
queries; for a single query it costs ~300 us per layer regardless of context length, 3-10x more
than two small matmuls (measured on the benchmark CPU, see BENCHMARKS.md). This computes the same
thing as SDPA with `enable_gqa=True` (query head h reads key/value head h // (H/G)) in float32, as
SDPA does internally, so the result matches it to float32 rounding.

Shape legend: B batch, H query heads, G key/value heads, R = H/G query heads per kv head,
S keys, Hd head dim.
"""

from __future__ import annotations

import math

import torch


def single_query_attention(
    q_BH1Hd: torch.Tensor, k_BGSHd: torch.Tensor, v_BGSHd: torch.Tensor, mask_B11S: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(Hd) + mask) v for one query per head; `mask` True = visible."""
    B, H, _, Hd = q_BH1Hd.shape
    G, S = k_BGSHd.shape[1], k_BGSHd.shape[2]
    q_BGRHd = q_BH1Hd.reshape(B, G, H // G, Hd).float()
    scores_BGRS = torch.matmul(q_BGRHd, k_BGSHd.float().transpose(-1, -2)) * (1.0 / math.sqrt(Hd))
    if mask_B11S is not None:
        scores_BGRS = scores_BGRS.masked_fill(~mask_B11S.reshape(B, 1, 1, S), float("-inf"))
    p_BGRS = torch.softmax(scores_BGRS, dim=-1)
    y_BGRHd = torch.matmul(p_BGRS, v_BGSHd.float())
    return y_BGRHd.reshape(B, H, 1, Hd).to(q_BH1Hd.dtype)
