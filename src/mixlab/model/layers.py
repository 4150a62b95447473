"""Building blocks shared by the dense and MoE models: RMSNorm, rotary embeddings, grouped-query
attention with an optional KV cache, and the dense SwiGLU FFN of Mistral 7B.

Shape legend: B batch, T query tokens, S key tokens, D model width, H query heads, G key/value
heads, Hd head dim, F FFN width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mixlab.cache import KVCache
from mixlab.config import ModelConfig
from mixlab.ops.attention import single_query_attention
from mixlab.ops.swiglu import swiglu


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, cast back, then scale: the order transformers uses, so bf16 matches.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(
    pos_BT: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables `[B, T, 1, Hd]` for the "rotate half" layout (transformers' q/k row
    order), broadcasting over the heads of `[B, T, heads, Hd]`. The sin table's first half is
    negated: rotate_half's sign, folded in once per forward instead of once per layer (`apply_rope`)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos_BT.device, dtype=torch.float32) / head_dim))
    freqs_BTh = pos_BT.clamp(min=0).float()[..., None] * inv_freq
    sin_BTh = freqs_BTh.sin()
    cos_BTHd = freqs_BTh.cos().repeat(1, 1, 2)  # both halves share each frequency
    sin_BTHd = torch.cat((-sin_BTh, sin_BTh), dim=-1)
    return cos_BTHd.to(dtype)[:, :, None], sin_BTHd.to(dtype)[:, :, None]


def apply_rope(x_BTNHd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin_table, rotate_half(x) = (-x2, x1) for the halves x1, x2 of each head.

    The halves are swapped by `flip` on a `[2, Hd/2]` view and the sign comes with `sin` (`rope_cos_sin`
    negates its first half): transformers' formula without its `neg` and `cat`, with the same
    products and sums, so the same bits.
    """
    swapped = x_BTNHd.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (x2, x1)
    return x_BTNHd * cos + swapped * sin


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


def attention_weights(q_BHTHd: torch.Tensor, k_BGSHd: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(Hd) + mask) `[B, H, T, S]` in float32: the weights SDPA gives the values
    but does not return (transformers' `output_attentions=True`, under its eager attention). `mask`
    True = visible, broadcasting to `[B, H, T, S]`; None: causal, the queries being the last T keys."""
    H, T, Hd = q_BHTHd.shape[1:]
    G, S = k_BGSHd.shape[1:3]
    k_BHSHd = k_BGSHd.float().repeat_interleave(H // G, dim=1)  # query head h reads kv head h // (H / G)
    scores_BHTS = torch.matmul(q_BHTHd.float(), k_BHSHd.transpose(-1, -2)) / math.sqrt(Hd)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q_BHTHd.device).tril(S - T)
    return torch.softmax(scores_BHTS.masked_fill(~mask, float("-inf")), dim=-1)


def training_sdpa(
    q_BHTHd: torch.Tensor, k_BGTHd: torch.Tensor, v_BGTHd: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """SDPA (causal when `mask` is None). When gradients will flow through attention that would run
    in bf16/fp16 on CPU (low-precision inputs, or autocast, which casts SDPA's inputs down), it runs
    in float32 instead: the CPU flash kernel's backward is faster in float32 than in bf16 (numbers
    in BENCHMARKS.md) and more accurate. The
    forward alone is as fast either way, so inference keeps its dtype. The output has the dtype
    SDPA would have returned."""
    qkv = (q_BHTHd, k_BGTHd, v_BGTHd)
    dev = q_BHTHd.device.type
    autocast = torch.is_autocast_enabled(dev)
    low = autocast or any(t.dtype in (torch.bfloat16, torch.float16) for t in qkv)
    if not (dev == "cpu" and low and torch.is_grad_enabled() and any(t.requires_grad for t in qkv)):
        return F.scaled_dot_product_attention(
            q_BHTHd, k_BGTHd, v_BGTHd, attn_mask=mask, is_causal=mask is None, enable_gqa=True
        )
    out_dtype = torch.get_autocast_dtype(dev) if autocast else q_BHTHd.dtype
    with torch.autocast(device_type=dev, enabled=False):
        y_BHTHd = F.scaled_dot_product_attention(
            q_BHTHd.float(), k_BGTHd.float(), v_BGTHd.float(), attn_mask=mask, is_causal=mask is None,
            enable_gqa=True,
        )
    return y_BHTHd.to(out_dtype)


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
        weights: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`weights`: a list to append this call's attention weights to (`attention_weights`)."""
        B, T, _ = x_BTD.shape
        Hd = self.head_dim
        H, G = self.n_heads, self.n_kv_heads
        qk_BTX, v_BTX = self.wqkv(x_BTD).split([(H + G) * Hd, G * Hd], dim=-1)
        # q and k rows are adjacent: rotate all H + G heads in one pass (half the elementwise ops).
        q_BTHHd, k_BTGHd = apply_rope(qk_BTX.unflatten(-1, (H + G, Hd)), cos, sin).split([H, G], dim=2)
        q_BHTHd, k_BGTHd = q_BTHHd.transpose(1, 2), k_BTGHd.transpose(1, 2)
        v_BGTHd = v_BTX.view(B, T, G, Hd).transpose(1, 2)
        if cache is not None:
            assert slots is not None
            cache.k[layer][:, :, slots] = k_BGTHd.to(cache.k[layer].dtype)
            cache.v[layer][:, :, slots] = v_BGTHd.to(cache.v[layer].dtype)
            n = cache.n_filled(T)
            k_BGTHd, v_BGTHd = cache.k[layer][:, :, :n], cache.v[layer][:, :, :n]
        if weights is not None:
            weights.append(attention_weights(q_BHTHd, k_BGTHd, mask))
        if T == 1 and cache is not None:  # a decoding step: SDPA's fixed cost dominates one query
            y_BHTHd = single_query_attention(q_BHTHd, k_BGTHd, v_BGTHd, mask)
        else:
            y_BHTHd = training_sdpa(q_BHTHd, k_BGTHd, v_BGTHd, mask)
        return self.wo(y_BHTHd.transpose(1, 2).reshape(B, T, self.n_heads * Hd))


class DenseFFN(nn.Module):
    """SwiGLU: w2 @ (silu(w1 @ x) * (w3 @ x)), with w1 and w3 fused into `w13` (rows: w1, then w3)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w13 = nn.Linear(config.dim, 2 * config.ffn_dim, bias=False)
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w13(x_BTD)))
