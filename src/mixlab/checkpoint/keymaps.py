"""One explicit key map per checkpoint format.

Each `Rule` says which tensors on disk make one of mixlab's tensors (`join`) and how to cut it back
(`split`). Names carry `{i}` (layer) and `{e}` (expert) placeholders; a rule whose on-disk names
carry `{e}` reads every expert of the layer, in order.

mixlab's own names (see model/): `tok_embeddings.weight`, `norm.weight`, `output.weight`, and per
layer `layers.{i}.attn_norm.weight`, `layers.{i}.ffn_norm.weight`, `layers.{i}.attn.wqkv.weight`
(q, k, v rows fused), `layers.{i}.attn.wo.weight`, and either `layers.{i}.ffn.gate.weight`,
`layers.{i}.ffn.w13` `[E, 2F, D]`, `layers.{i}.ffn.w2` `[E, D, F]` (MoE) or
`layers.{i}.ffn.w13.weight` `[2F, D]`, `layers.{i}.ffn.w2.weight` (dense).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mixlab.config import ModelConfig

Tensors = list[torch.Tensor]

FORMATS = ("hf", "hf-fused", "mistral")


@dataclass(frozen=True)
class Rule:
    ours: str
    theirs: tuple[str, ...]
    join: Callable[[Tensors], torch.Tensor]
    split: Callable[[torch.Tensor], Tensors]


def _same(ts: Tensors) -> torch.Tensor:
    return ts[0]


def _wrap(t: torch.Tensor) -> Tensors:
    return [t]


def _cat_rows(sizes: list[int]) -> tuple[Callable[[Tensors], torch.Tensor], Callable[[torch.Tensor], Tensors]]:
    return (lambda ts: torch.cat(ts, dim=0)), (lambda t: [x.contiguous() for x in t.split(sizes, dim=0)])


def _rope_interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Mistral/Meta checkpoints rotate interleaved pairs (x0,x1),(x2,x3)...; transformers (and
    mixlab) rotate halves. Reordering each head's rows of wq/wk turns one into the other."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _rope_half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def rules(config: ModelConfig, fmt: str) -> list[Rule]:
    """Every rule for one model, placeholders filled in."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")
    c = config
    F_, E = c.ffn_dim, (c.moe.num_experts if c.moe else 0)
    qkv_sizes = [c.q_dim, c.kv_dim, c.kv_dim]
    cat_qkv, split_qkv = _cat_rows(qkv_sizes)
    cat_ff, split_ff = _cat_rows([F_, F_])

    def stack_experts(ts: Tensors) -> torch.Tensor:  # [w1_0, w3_0, w1_1, w3_1, ...] -> [E, 2F, D]
        return torch.stack([torch.cat((ts[2 * e], ts[2 * e + 1]), dim=0) for e in range(E)])

    def unstack_experts(t: torch.Tensor) -> Tensors:
        return [x.contiguous() for e in range(E) for x in t[e].split([F_, F_], dim=0)]

    def stack_w2(ts: Tensors) -> torch.Tensor:
        return torch.stack(ts)

    def unstack_w2(t: torch.Tensor) -> Tensors:
        return [t[e].contiguous() for e in range(E)]

    table: list[tuple[str, tuple[str, ...], Callable[[Tensors], torch.Tensor], Callable[[torch.Tensor], Tensors]]]
    if fmt in ("hf", "hf-fused"):
        L = "model.layers.{i}."
        table = [
            ("tok_embeddings.weight", ("model.embed_tokens.weight",), _same, _wrap),
            ("norm.weight", ("model.norm.weight",), _same, _wrap),
            ("layers.{i}.attn_norm.weight", (L + "input_layernorm.weight",), _same, _wrap),
            ("layers.{i}.ffn_norm.weight", (L + "post_attention_layernorm.weight",), _same, _wrap),
            ("layers.{i}.attn.wqkv.weight", tuple(L + f"self_attn.{p}_proj.weight" for p in "qkv"), cat_qkv, split_qkv),
            ("layers.{i}.attn.wo.weight", (L + "self_attn.o_proj.weight",), _same, _wrap),
        ]
        if c.moe is None:
            table += [
                ("layers.{i}.ffn.w13.weight", (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), cat_ff, split_ff),
                ("layers.{i}.ffn.w2.weight", (L + "mlp.down_proj.weight",), _same, _wrap),
            ]
        elif fmt == "hf":
            X = L + "block_sparse_moe."
            table += [
                ("layers.{i}.ffn.gate.weight", (X + "gate.weight",), _same, _wrap),
                ("layers.{i}.ffn.w13", (X + "experts.{e}.w1.weight", X + "experts.{e}.w3.weight"),
                 stack_experts, unstack_experts),
                ("layers.{i}.ffn.w2", (X + "experts.{e}.w2.weight",), stack_w2, unstack_w2),
            ]
        else:  # transformers v5 fused experts: gate_up_proj is already [E, 2F, D] with gate rows first
            table += [
                ("layers.{i}.ffn.gate.weight", (L + "mlp.gate.weight",), _same, _wrap),
                ("layers.{i}.ffn.w13", (L + "mlp.experts.gate_up_proj",), _same, _wrap),
                ("layers.{i}.ffn.w2", (L + "mlp.experts.down_proj",), _same, _wrap),
            ]
        if not c.tie_embeddings:
            table.append(("output.weight", ("lm_head.weight",), _same, _wrap))
    else:  # Mistral consolidated
        L = "layers.{i}."

        def join_qkv(ts: Tensors) -> torch.Tensor:
            q, k, v = ts
            return torch.cat((_rope_interleaved_to_half(q, c.n_heads), _rope_interleaved_to_half(k, c.n_kv_heads), v))

        def split_qkv_m(t: torch.Tensor) -> Tensors:
            q, k, v = split_qkv(t)
            return [_rope_half_to_interleaved(q, c.n_heads).contiguous(),
                    _rope_half_to_interleaved(k, c.n_kv_heads).contiguous(), v]

        table = [
            ("tok_embeddings.weight", ("tok_embeddings.weight",), _same, _wrap),
            ("norm.weight", ("norm.weight",), _same, _wrap),
            ("layers.{i}.attn_norm.weight", (L + "attention_norm.weight",), _same, _wrap),
            ("layers.{i}.ffn_norm.weight", (L + "ffn_norm.weight",), _same, _wrap),
            ("layers.{i}.attn.wqkv.weight", tuple(L + f"attention.w{p}.weight" for p in "qkv"), join_qkv, split_qkv_m),
            ("layers.{i}.attn.wo.weight", (L + "attention.wo.weight",), _same, _wrap),
        ]
        X = L + "feed_forward."
        if c.moe is None:
            table += [
                ("layers.{i}.ffn.w13.weight", (X + "w1.weight", X + "w3.weight"), cat_ff, split_ff),
                ("layers.{i}.ffn.w2.weight", (X + "w2.weight",), _same, _wrap),
            ]
        else:
            table += [
                ("layers.{i}.ffn.gate.weight", (X + "gate.weight",), _same, _wrap),
                ("layers.{i}.ffn.w13", (X + "experts.{e}.w1.weight", X + "experts.{e}.w3.weight"),
                 stack_experts, unstack_experts),
                ("layers.{i}.ffn.w2", (X + "experts.{e}.w2.weight",), stack_w2, unstack_w2),
            ]
        if not c.tie_embeddings:
            table.append(("output.weight", ("output.weight",), _same, _wrap))

    out: list[Rule] = []
    for ours, theirs, join, split in table:
        layers = range(c.n_layers) if "{i}" in ours else [None]
        for i in layers:
            names: list[str] = []
            if any("{e}" in t for t in theirs):
                for e in range(E):
                    names += [t.format(i=i, e=e) for t in theirs]
            else:
                names = [t.format(i=i) for t in theirs]
            out.append(Rule(ours.format(i=i), tuple(names), join, split))
    return out


def detect_format(keys: set[str]) -> str:
    """Which format a set of tensor names is in, or ValueError."""
    if "model.embed_tokens.weight" in keys:
        return "hf-fused" if any(k.endswith("mlp.experts.gate_up_proj") for k in keys) else "hf"
    if "tok_embeddings.weight" in keys:
        return "mistral"
    raise ValueError(
        "tensor names match no known format (expected transformers 'model.embed_tokens.weight' "
        "or Mistral 'tok_embeddings.weight')"
    )
