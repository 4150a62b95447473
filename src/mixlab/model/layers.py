"""Building blocks shared by the dense and MoE models: RMSNorm, rotary embeddings, grouped-query
attention with an optional KV cache, and the dense SwiGLU FFN of Mistral 7B.

Shape legend: B batch, T query tokens, S key tokens, D model width, H query heads, G key/value
heads, Hd head dim, F FFN width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixlab.cache import KVCache
from mixlab.config import ModelConfig
from mixlab.ops.attention import single_query_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, cast back, then scale: the order transformers uses, so bf16 matches.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(
    pos_BT: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables `[B, 1, T, Hd]` for the "rotate half" layout (transformers' q/k row order)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos_BT.device, dtype=torch.float32) / head_dim))
    freqs_BTh = pos_BT.clamp(min=0).float()[..., None] * inv_freq
    emb_BTHd = torch.cat((freqs_BTh, freqs_BTh), dim=-1)
    return emb_BTHd.cos().to(dtype)[:, None], emb_BTHd.sin().to(dtype)[:, None]


def apply_rope(x_BHTHd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHTHd.chunk(2, dim=-1)
    return x_BHTHd * cos + torch.cat((-x2, x1), dim=-1) * sin


def attention_mask(q_pos_BT: torch.Tensor, k_pos_BS: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean `[B, 1, T, S]`: key visible to query when 0 <= q_pos - k_pos (< window); -1 = padding."""
    q = q_pos_BT[:, :, None]
    k = k_pos_BS[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= q - k < window
    # A padding query sees nothing; let it see everything so softmax stays finite (its output is unused).
    mask |= ~mask.any(-1, keepdim=True)
    return mask[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        # q, k and v fused into one matrix: one matmul instead of three (rows: q, then k, then v).
        self.wqkv = nn.Linear(config.dim, config.q_dim + 2 * config.kv_dim, bias=False)
        self.wo = nn.Linear(config.q_dim, config.dim, bias=False)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        Hd = self.head_dim
        q_BTX, k_BTX, v_BTX = self.wqkv(x_BTD).split(
            [self.n_heads * Hd, self.n_kv_heads * Hd, self.n_kv_heads * Hd], dim=-1
        )
        q_BHTHd = q_BTX.view(B, T, self.n_heads, Hd).transpose(1, 2)
        k_BGTHd = k_BTX.view(B, T, self.n_kv_heads, Hd).transpose(1, 2)
        v_BGTHd = v_BTX.view(B, T, self.n_kv_heads, Hd).transpose(1, 2)
        q_BHTHd, k_BGTHd = apply_rope(q_BHTHd, cos, sin), apply_rope(k_BGTHd, cos, sin)
        if cache is not None:
            assert slots is not None
            cache.k[layer][:, :, slots] = k_BGTHd.to(cache.k[layer].dtype)
            cache.v[layer][:, :, slots] = v_BGTHd.to(cache.v[layer].dtype)
            n = cache.n_filled(T)
            k_BGTHd, v_BGTHd = cache.k[layer][:, :, :n], cache.v[layer][:, :, :n]
        if T == 1 and cache is not None:  # a decoding step: SDPA's fixed cost dominates one query
            y_BHTHd = single_query_attention(q_BHTHd, k_BGTHd, v_BGTHd, mask)
        else:
            y_BHTHd = F.scaled_dot_product_attention(
                q_BHTHd, k_BGTHd, v_BGTHd, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            )
        return self.wo(y_BHTHd.transpose(1, 2).reshape(B, T, self.n_heads * Hd))


class DenseFFN(nn.Module):
    """SwiGLU: w2 @ (silu(w1 @ x) * (w3 @ x)), with w1 and w3 fused into `w13` (rows: w1, then w3)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w13 = nn.Linear(config.dim, 2 * config.ffn_dim, bias=False)
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x_BTD).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)
