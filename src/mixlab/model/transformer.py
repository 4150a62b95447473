"""The decoder-only transformer (Mixtral when `config.moe` is set, Mistral 7B when it is None).

Shape legend: B batch, T tokens in this call, D width, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from mixlab.cache import KVCache
from mixlab.config import ModelConfig
from mixlab.model.formats import Int4Experts, Int8Experts
from mixlab.model.layers import Attention, DenseFFN, RMSNorm, attention_mask, rope_cos_sin
from mixlab.model.moe import MoEBlock, Routing
from mixlab.ops.moe import check_impl
from mixlab.ops.quant import Int4Linear, Int8Linear

if TYPE_CHECKING:
    from mixlab.model.native import NativeDecoder


@dataclass
class ModelOutput:
    """What `Transformer.forward_output` computed: the final normed hidden state, each MoE layer's
    `Routing` (first layer first; empty for a dense model), the logits unless skipped and, when asked
    for, the residual stream (`hidden_states=True`: the embeddings, then each block's output) and each
    layer's attention weights (`attentions=True`)."""

    hidden_BTD: torch.Tensor
    routing: list[Routing] = field(default_factory=list)
    logits_BTV: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] | None = None
    attentions: list[torch.Tensor] | None = None


def _check_inputs(tokens_BT: object, positions_BT: torch.Tensor | None, segments_BT: torch.Tensor | None) -> None:
    """Shapes and dtypes only (no host sync; the ids' range is the embedding's to check, and
    `forward_output` names it): a 1-D tensor, float ids or positions of another shape failed deep in
    attention or the embedding."""
    if not isinstance(tokens_BT, torch.Tensor) or tokens_BT.dim() != 2 or tokens_BT.dtype not in (torch.long,
                                                                                               torch.int32):
        what = (f"a {tokens_BT.dim()}-D {tokens_BT.dtype} tensor of shape {list(tokens_BT.shape)}"
                if isinstance(tokens_BT, torch.Tensor) else type(tokens_BT).__name__)
        raise ValueError(f"tokens must be an int64 (or int32) tensor of token ids [batch, seq], got {what} "
                         "(one sequence: ids[None])")
    for name, t in (("positions_BT", positions_BT), ("segments_BT", segments_BT)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != tokens_BT.shape):
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor of the tokens' shape {list(tokens_BT.shape)}, got {got}")


def check_model(model: object) -> None:
    """ValueError unless `model` is a mixlab `Transformer` (or a wrapper that forwards its attributes,
    as `torch.compile`'s does): a path, a state dict or a transformers model passed as the model
    failed with an AttributeError deep inside generation, the engine or preparation; a model on the
    meta device (built without data) with "unknown device type for autocast"."""
    if isinstance(getattr(model, "config", None), ModelConfig):
        emb = getattr(getattr(model, "tok_embeddings", None), "weight", None)
        if isinstance(emb, torch.Tensor) and emb.is_meta:
            raise ValueError("the model's weights are on the meta device, which holds no data: load them "
                             "(mixlab.load_model(path), or model.load_state_dict(state, assign=True))")
        return
    if isinstance(model, str | Path):
        hint = f" (load it: mixlab.load_model({str(model)!r}))"
    elif hasattr(getattr(model, "config", None), "model_type"):
        hint = (" (a transformers model: mixlab.from_state_dict(hf.state_dict(), "
                "mixlab.ModelConfig.from_hf_dict(hf.config.to_dict())), or save_pretrained it and mixlab.load_model "
                "the folder)")
    elif isinstance(model, Mapping):
        hint = " (a state dict: mixlab.from_state_dict(state, config), or mixlab.load_model(path))"
    else:
        hint = " (mixlab.load_model(path), or mixlab.Transformer(config))"
    raise ValueError(f"model must be a mixlab Transformer, not {type(model).__name__}{hint}")


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn: MoEBlock | DenseFFN = MoEBlock(config) if config.moe is not None else DenseFFN(config)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
        slots: torch.Tensor | None,
        last_only: bool = False,
        weights: list[torch.Tensor] | None = None,
        routing_only: bool = False,
    ) -> tuple[torch.Tensor, Routing | None]:
        """`last_only`: the feed-forward block for the last position alone (`[B, 1, D]` out).
        `weights`: a list to append the attention weights to.
        `routing_only`: every position routed, no expert computed (`[B, 0, D]` out)."""
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, mask, cache, layer, slots, weights)
        if routing_only:
            B, T, D = x_BTD.shape
            none_R = torch.zeros(0, dtype=torch.long, device=x_BTD.device)
            return x_BTD[:, :0], self.feed_forward_rows(x_BTD.reshape(1, B * T, D), none_R)[1]
        if last_only and self._rows_alone():
            return self.feed_forward(x_BTD[:, -1:])
        y_BTD, routing = self.feed_forward(x_BTD)
        return (y_BTD[:, -1:] if last_only else y_BTD), routing

    def _rows_alone(self) -> bool:
        """Whether the feed-forward block of some rows equals those rows of the whole pass: not with
        an expert capacity, which drops tokens by the whole batch."""
        return not (isinstance(self.ffn, MoEBlock) and self.ffn.moe.capacity_factor is not None)

    def feed_forward_rows(self, x_1TD: torch.Tensor, rows_R: torch.Tensor) -> tuple[torch.Tensor, Routing | None]:
        """`feed_forward` for the positions `rows_R` of `x_1TD` alone, `[1, R, D]` out (an engine
        step's last layer: only the rows whose logits are wanted). An MoE layer still routes every
        position, and its routing covers all T. The block is called as a whole (`self.ffn`), so
        that a wrapped forward (expert parallelism's all-to-all) runs."""
        if not self._rows_alone():
            y_1TD, routing = self.feed_forward(x_1TD)
            return y_1TD[:, rows_R], routing
        h_TD = self.ffn_norm(x_1TD[0])
        routing = self.ffn.gate(h_TD) if isinstance(self.ffn, MoEBlock) else None
        if rows_R.numel() == 0:
            return x_1TD[:, :0], routing
        h_1RD = h_TD[rows_R][None]
        y_1RD = self.ffn(h_1RD)[0] if isinstance(self.ffn, MoEBlock) else self.ffn(h_1RD)
        return x_1TD[:, rows_R] + y_1RD, routing

    def feed_forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, Routing | None]:
        """The block's second half, x + ffn(ffn_norm(x)), and the routing of an MoE layer (the
        engine's batched step and CUDA-graph step run their own attention, then this)."""
        h_BTD = self.ffn_norm(x_BTD)
        if isinstance(self.ffn, MoEBlock):
            y_BTD, routing = self.ffn(h_BTD)
            return x_BTD + y_BTD, routing
        return x_BTD + self.ffn(h_BTD), None


class Transformer(nn.Module):
    """A Mixtral (`config.moe` set) or Mistral (dense) decoder: token embedding, `config.n_layers`
    `Block`s (attention, then the MoE or dense feed-forward block), final norm and output matrix.
    Made with float32 parameters (nn.Linear's default initialisation; `init_weights` for training);
    `mixlab.load_model` / `save_model` read and write checkpoints, whose names `checkpoint/keymaps.py`
    maps to mixlab's. `forward(tokens_BT)` gives the logits, `forward_output` also each MoE layer's
    routing (and when asked, each layer's hidden state and attention weights); `mixlab.generate` decodes."""

    def __init__(self, config: ModelConfig) -> None:
        if not isinstance(config, ModelConfig):  # else an AttributeError on its first field
            raise ValueError(f"Transformer takes a mixlab ModelConfig, not {type(config).__name__} (a preset: "
                             "mixlab.get_preset(name); a checkpoint's: mixlab.ModelConfig.from_dir(path))")
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Set by `prepare_for_inference` when the native kernels decode this model (model/native.py).
        self.native_decoder: NativeDecoder | None = None
        self.int4_activations = None  # the default ("int8"), for every int4 module (the property below)
        self.int8_activations = None  # the default ("float32"), for every int8 module

    @property
    def int4_activations(self) -> str | None:
        """How int4 weights multiply activations: "int8" (None: the default) rounded per block of 32
        (`mixlab.ops.quant.round_activations_q8`), or "float32" exact ones
        (`model.native.INT4_ACTIVATIONS`), in every path, with or without the native kernels. Setting
        it sets every int4 module's `act8` (`Int4Linear`, `Int4Experts`), so that
        PyTorch's pass multiplies what the native steps multiply, at any row count."""
        return self._int4_activations

    @int4_activations.setter
    def int4_activations(self, mode: str | None) -> None:
        self._int4_activations = mode
        for m in self.modules():
            if isinstance(m, Int4Linear | Int4Experts):
                m.act8 = mode != "float32"

    @property
    def int8_activations(self) -> str | None:
        """How int8 weights multiply activations: "float32" (None: the default) exact, or "int8"
        rounded per block of 32 as int4's are (llama.cpp's Q8_0 x Q8_0), in every path, with or without
        the native kernels. Setting it sets every int8 module's `act8` (`Int8Linear`, `Int8Experts`)."""
        return self._int8_activations

    @int8_activations.setter
    def int8_activations(self, mode: str | None) -> None:
        self._int8_activations = mode
        for m in self.modules():
            if isinstance(m, Int8Linear | Int8Experts):
                m.act8 = mode == "int8"

    def init_weights(self, *, std: float = 0.02, seed: int | None = None) -> None:
        """Random initialisation for training from scratch: normal(0, std); output projections
        (wo, w2) scaled by 1/sqrt(2 * n_layers) as in GPT-2."""
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in self.initial_values(std=std, seed=seed):
                params[name].copy_(value)

    def initial_values(self, *, std: float = 0.02, seed: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """`init_weights`' value of each parameter, one at a time (float32, CPU), in `named_parameters`
        order: all drawn from one generator, so a sharded copy of the model that keeps its part of each
        gets the same weights (`mixlab.parallel.train`). Reads the shapes only: works on the meta device."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                yield name, torch.ones(p.shape, device="cpu")
            else:
                s = out_std if name.endswith(("wo.weight", "w2", "w2.weight")) else std
                yield name, torch.randn(p.shape, generator=g, dtype=torch.float32, device="cpu").mul_(s)

    def set_moe_impl(self, impl: str) -> None:
        """Every MoE layer's expert computation: "auto" (the kernel registry's choice) or one of
        `mixlab.ops.moe.IMPLS` (e.g. "reference", the readable loop). An unknown name is refused here,
        not at the next forward pass."""
        check_impl(impl)
        for block in self.layers:
            if isinstance(block.ffn, MoEBlock):
                block.ffn.impl = impl

    def forward(
        self,
        tokens_BT: torch.Tensor,
        *,
        positions_BT: torch.Tensor | None = None,
        segments_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits `[B, T, V]` (float, the model's dtype) for token ids `[B, T]` (see `forward_output`)."""
        logits_BTV = self.forward_output(tokens_BT, positions_BT=positions_BT, segments_BT=segments_BT,
                                         cache=cache).logits_BTV
        assert logits_BTV is not None
        return logits_BTV

    def forward_output(
        self,
        tokens_BT: torch.Tensor,
        *,
        positions_BT: torch.Tensor | None = None,
        segments_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits: bool = True,
        last_only: bool = False,
        hidden_states: bool = False,
        attentions: bool = False,
        routing_only: bool = False,
    ) -> ModelOutput:
        """The final hidden state, each MoE layer's routing and (unless `logits=False`, e.g. for chunked
        losses) the logits `[B, T, V]` for token ids `[B, T]`.

        `last_only`: only the last position's output is wanted (a prompt's prefill): the last layer
        runs its feed-forward block for that position alone (the other positions still write their
        keys and values into `cache`), as llama.cpp skips unused outputs; the hidden state, the
        logits and the last layer's routing then cover one position `[B, 1, ...]`.

        `routing_only`: only the routing is wanted (routing analysis): the last layer routes every
        position but computes none of its experts; no logits, and the hidden state covers no
        position `[B, 0, D]`.

        `positions_BT`: absolute position of each token, -1 for padding; default 0..T-1 (or
        continuing the cache). With a cache, the tokens are appended to it. `segments_BT`: packed
        sequences (no cache): a token attends only to tokens of its own segment id, causally by
        position, so positions restarting per segment give each the attention it gets alone.

        `hidden_states`: also return the residual stream, `n_layers + 1` tensors `[B, T, D]`: the
        token embeddings, then each block's output (before the final norm; with `last_only` the last
        one is `[B, 1, D]`). transformers' `output_hidden_states=True` gives the same first
        `n_layers`, and as its last the final normed state, `hidden_BTD` here.

        `attentions`: also return each layer's attention weights, float32 `[B, n_heads, T, S]`
        (softmax(q k^T / sqrt(head_dim)) over the visible keys, which SDPA applies without returning
        them; transformers' `output_attentions=True`). S: the T tokens, or with a cache its slots so far
        (`cache.pos_BC` gives their positions). Computed apart from the pass itself, which is unchanged.
        """
        _check_inputs(tokens_BT, positions_BT, segments_BT)
        device = self.tok_embeddings.weight.device
        for name, t in (("tokens", tokens_BT), ("positions_BT", positions_BT), ("segments_BT", segments_BT)):
            if t is not None and t.device != device:  # else torch's "Expected all tensors to be on the same device"
                raise ValueError(f"{name} is on {t.device} but the model's weights are on {device}: move it there "
                                 f"({name.removesuffix('_BT')}.to({str(device)!r}))")
        B, T = tokens_BT.shape
        if cache is not None and cache.batch_size != B:  # else a reshape fails deep in attention
            raise ValueError(f"the cache holds {cache.batch_size} sequences but the tokens are {B} "
                             f"(KVCache(config, batch_size={B}, ...))")
        cfg = self.config
        # Default positions hold no padding: skip the check (a host sync, and a torch.compile graph break).
        may_pad = positions_BT is not None
        if positions_BT is None:
            start = 0 if cache is None else cache.t
            positions_BT = torch.arange(start, start + T, device=tokens_BT.device).expand(B, T)
        try:
            x_BTD = self.tok_embeddings(tokens_BT)
        except IndexError:  # torch's "index out of range in self" named neither the ids nor the vocabulary
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}) (the model's vocabulary); these span "
                             f"[{int(tokens_BT.min())}, {int(tokens_BT.max())}]") from None
        cos, sin = rope_cos_sin(positions_BT, cfg.head_dim, cfg.rope_theta, x_BTD.dtype)
        slots = None
        if cache is not None:
            slots = cache.slots(T)
            cache.pos_BC[:, slots] = positions_BT
            k_pos_BS = cache.pos_BC[:, : cache.n_filled(T)]
            mask: torch.Tensor | None = attention_mask(positions_BT, k_pos_BS, cfg.sliding_window)
        elif segments_BT is not None:  # block-diagonal causal
            same_B1TT = (segments_BT[:, :, None] == segments_BT[:, None, :])[:, None]
            mask = attention_mask(positions_BT, positions_BT, cfg.sliding_window) & same_B1TT
            mask |= ~mask.any(-1, keepdim=True)  # a padding query (position -1) still sees something
        elif (may_pad and bool((positions_BT < 0).any())) or (
            cfg.sliding_window is not None and T > cfg.sliding_window
        ):
            mask = attention_mask(positions_BT, positions_BT, cfg.sliding_window)
        else:
            mask = None  # plain causal: lets SDPA take its fastest kernel
        routings: list[Routing] = []
        states: list[torch.Tensor] | None = [x_BTD] if hidden_states else None
        weights: list[torch.Tensor] | None = [] if attentions else None
        last = len(self.layers) - 1
        for i, block in enumerate(self.layers):
            x_BTD, routing = block(x_BTD, cos, sin, mask, cache, i, slots, last_only and i == last, weights,
                                   routing_only and i == last)
            if routing is not None:
                routings.append(routing)
            if states is not None:
                states.append(x_BTD)
        if cache is not None:
            cache.t += T
        h_BTD = self.norm(x_BTD)
        return ModelOutput(h_BTD, routings, self.output(h_BTD) if logits and not routing_only else None, states,
                           weights)
