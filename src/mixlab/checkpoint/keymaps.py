"""One explicit key map per checkpoint format.

Each `Rule` says which tensors on disk make one of mixlab's tensors, as views of it (`parts`): a
loader reads each file tensor straight into its view, a saver writes each view out, and `join` /
`split` do the same in memory. Names carry `{i}` (layer) and `{e}` (expert) placeholders; a rule
whose on-disk names carry `{e}` covers every expert of the layer, in order.

mixlab's own names (see model/): `tok_embeddings.weight`, `norm.weight`, `output.weight`, and per
layer `layers.{i}.attn_norm.weight`, `layers.{i}.ffn_norm.weight`, `layers.{i}.attn.wqkv.weight`
(q, k, v rows fused), `layers.{i}.attn.wo.weight`, and either `layers.{i}.ffn.gate.weight`,
`layers.{i}.ffn.experts.w13` `[E, 2F, D]`, `layers.{i}.ffn.experts.w2` `[E, D, F]` (MoE) or
`layers.{i}.ffn.w13.weight` `[2F, D]`, `layers.{i}.ffn.w2.weight` (dense).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mixlab.config import ModelConfig

Tensors = list[torch.Tensor]
Parts = Callable[[torch.Tensor], Tensors]

FORMATS = ("hf", "hf-fused", "mistral")


@dataclass(frozen=True)
class Rule:
    """mixlab tensor `ours` (shape `shape`) is made of the tensors `theirs` on disk (shapes `shapes`).

    `parts(t)` returns views of `t`, one per name in `theirs`, each holding that tensor's elements
    in its row-major order on disk (possibly in another shape, e.g. for the rotary permutation):
    loading reads each file tensor straight into its view, saving writes each view out.
    """

    ours: str
    theirs: tuple[str, ...]
    shape: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    parts: Parts

    def join(self, ts: Tensors) -> torch.Tensor:
        """The mixlab tensor from the on-disk tensors (shapes checked; RuntimeError if wrong)."""
        for name, t, s in zip(self.theirs, ts, self.shapes, strict=True):
            if tuple(t.shape) != s:
                raise RuntimeError(f"{name}: expected shape {list(s)}, found {list(t.shape)}")
        out = torch.empty(self.shape, dtype=ts[0].dtype, device=ts[0].device)
        for view, t in zip(self.parts(out), ts, strict=True):
            view.copy_(t.reshape(view.shape))
        return out

    def split(self, t: torch.Tensor) -> Tensors:
        """The on-disk tensors of mixlab tensor `t`: views where the layout allows, else copies."""
        return [v.contiguous().view(s) for v, s in zip(self.parts(t), self.shapes, strict=True)]


def _whole(t: torch.Tensor) -> Tensors:
    return [t]


def _rows(sizes: list[int]) -> Parts:
    return lambda t: list(t.split(sizes, dim=0))


def _rope_view(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Mistral/Meta checkpoints rotate interleaved pairs (x0,x1),(x2,x3)...; transformers (and
    mixlab) rotate halves (x_j, x_{j+Hd/2}). Within each head, interleaved row 2j+p is half-layout
    row p*Hd/2+j: this view of the half-layout rows `[heads, Hd/2, 2, D]` lists them in the
    interleaved order. (transformers' convert_mistral_weights_to_hf.py applies the same permutation.)"""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2)


def rules(config: ModelConfig, fmt: str) -> list[Rule]:
    """Every rule for one model, placeholders filled in."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")
    c = config
    D, F_, E = c.dim, c.ffn_dim, (c.moe.num_experts if c.moe else 0)
    qkv = _rows([c.q_dim, c.kv_dim, c.kv_dim])
    gate_up = _rows([F_, F_])

    def experts_w13(t: torch.Tensor) -> Tensors:  # [E, 2F, D] -> w1_0, w3_0, w1_1, w3_1, ...
        return [x for e in range(E) for x in t[e].split([F_, F_], dim=0)]

    def experts_w2(t: torch.Tensor) -> Tensors:  # [E, D, F] -> w2_0, w2_1, ...
        return list(t.unbind(0))

    def mistral_qkv(t: torch.Tensor) -> Tensors:
        q, k, v = qkv(t)
        return [_rope_view(q, c.n_heads), _rope_view(k, c.n_kv_heads), v]

    shapes: dict[str, tuple[int, ...]] = {
        "tok_embeddings.weight": (c.vocab_size, D),
        "norm.weight": (D,),
        "output.weight": (c.vocab_size, D),
        "layers.{i}.attn_norm.weight": (D,),
        "layers.{i}.ffn_norm.weight": (D,),
        "layers.{i}.attn.wqkv.weight": (c.q_dim + 2 * c.kv_dim, D),
        "layers.{i}.attn.wo.weight": (D, c.q_dim),
        "layers.{i}.ffn.gate.weight": (E, D),
        "layers.{i}.ffn.experts.w13": (E, 2 * F_, D),
        "layers.{i}.ffn.experts.w2": (E, D, F_),
        "layers.{i}.ffn.w13.weight": (2 * F_, D),
        "layers.{i}.ffn.w2.weight": (D, F_),
    }

    table: list[tuple[str, tuple[str, ...], Parts]]
    if fmt in ("hf", "hf-fused"):
        L = "model.layers.{i}."
        table = [
            ("tok_embeddings.weight", ("model.embed_tokens.weight",), _whole),
            ("norm.weight", ("model.norm.weight",), _whole),
            ("layers.{i}.attn_norm.weight", (L + "input_layernorm.weight",), _whole),
            ("layers.{i}.ffn_norm.weight", (L + "post_attention_layernorm.weight",), _whole),
            ("layers.{i}.attn.wqkv.weight", tuple(L + f"self_attn.{p}_proj.weight" for p in "qkv"), qkv),
            ("layers.{i}.attn.wo.weight", (L + "self_attn.o_proj.weight",), _whole),
        ]
        if c.moe is None:
            table += [
                ("layers.{i}.ffn.w13.weight", (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), gate_up),
                ("layers.{i}.ffn.w2.weight", (L + "mlp.down_proj.weight",), _whole),
            ]
        elif fmt == "hf":
            X = L + "block_sparse_moe."
            table += [
                ("layers.{i}.ffn.gate.weight", (X + "gate.weight",), _whole),
                ("layers.{i}.ffn.experts.w13", (X + "experts.{e}.w1.weight", X + "experts.{e}.w3.weight"), experts_w13),
                ("layers.{i}.ffn.experts.w2", (X + "experts.{e}.w2.weight",), experts_w2),
            ]
        else:  # transformers v5 fused experts: gate_up_proj is [E, 2F, D], gate (w1) rows first, as ours
            table += [
                ("layers.{i}.ffn.gate.weight", (L + "mlp.gate.weight",), _whole),
                ("layers.{i}.ffn.experts.w13", (L + "mlp.experts.gate_up_proj",), _whole),
                ("layers.{i}.ffn.experts.w2", (L + "mlp.experts.down_proj",), _whole),
            ]
        if not c.tie_embeddings:
            table.append(("output.weight", ("lm_head.weight",), _whole))
    else:  # Mistral consolidated
        L = "layers.{i}."
        table = [
            ("tok_embeddings.weight", ("tok_embeddings.weight",), _whole),
            ("norm.weight", ("norm.weight",), _whole),
            ("layers.{i}.attn_norm.weight", (L + "attention_norm.weight",), _whole),
            ("layers.{i}.ffn_norm.weight", (L + "ffn_norm.weight",), _whole),
            ("layers.{i}.attn.wqkv.weight", tuple(L + f"attention.w{p}.weight" for p in "qkv"), mistral_qkv),
            ("layers.{i}.attn.wo.weight", (L + "attention.wo.weight",), _whole),
        ]
        X = L + "feed_forward."
        if c.moe is None:
            table += [
                ("layers.{i}.ffn.w13.weight", (X + "w1.weight", X + "w3.weight"), gate_up),
                ("layers.{i}.ffn.w2.weight", (X + "w2.weight",), _whole),
            ]
        else:
            table += [
                ("layers.{i}.ffn.gate.weight", (X + "gate.weight",), _whole),
                ("layers.{i}.ffn.experts.w13", (X + "experts.{e}.w1.weight", X + "experts.{e}.w3.weight"), experts_w13),
                ("layers.{i}.ffn.experts.w2", (X + "experts.{e}.w2.weight",), experts_w2),
            ]
        if not c.tie_embeddings:
            table.append(("output.weight", ("output.weight",), _whole))

    out: list[Rule] = []
    for ours, theirs, parts in table:
        shape = shapes[ours]
        # Shapes on disk: those of the views, except the rotary views, which are 2-D on disk.
        views = parts(torch.empty(shape, device="meta"))
        disk = tuple((math.prod(v.shape[:-1]), v.shape[-1]) if v.dim() == 4 else tuple(v.shape) for v in views)
        for i in range(c.n_layers) if "{i}" in ours else [None]:
            names: list[str] = []
            if any("{e}" in t for t in theirs):
                for e in range(E):
                    names += [t.format(i=i, e=e) for t in theirs]
            else:
                names = [t.format(i=i) for t in theirs]
            out.append(Rule(ours.format(i=i), tuple(names), shape, disk, parts))
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
