"""The engine's model side: the KV cache of every running sequence and the forward pass of a step.

This first version gives each sequence its own batch-1 `KVCache` and runs the items of a step one
after the other (the native kernels decode a lone token); correct, not yet batched.

Shape legend: T tokens of an item, V vocabulary, L MoE layers, K experts per token, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mixlab.cache import KVCache

if TYPE_CHECKING:
    from mixlab.model import Transformer


@dataclass
class Item:
    """One sequence's share of a step: `tokens` at positions start, start+1, ...; which logits to
    return ("none", "last" or "all") and whether to return the last position's experts."""

    slot: int
    tokens: list[int]
    start: int
    logits: str = "last"
    experts: bool = False


@dataclass
class Result:
    logits_TV: torch.Tensor | None  # float32; [1, V] for "last", [T, V] for "all"
    experts_LK: torch.Tensor | None  # the last position's experts
    expert_counts_LE: torch.Tensor | None  # tokens routed to each expert in this item


def bytes_per_token(model: Transformer) -> int:
    cfg = model.config
    elem = model.tok_embeddings.weight.element_size()
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * elem


class Runner:
    def __init__(self, model: Transformer, *, max_batch: int, cache_bytes: int | None, prefill_chunk: int,
                 max_seq_len: int | None, prefix_cache: bool) -> None:
        cfg = model.config
        self.model = model
        self.max_len = min(cfg.max_seq_len, max_seq_len or cfg.max_seq_len)
        self.per_token = bytes_per_token(model)
        self.total_bytes = cache_bytes if cache_bytes is not None else min(
            max_batch * self.max_len * self.per_token, 2**30)
        self.prefill_chunk = prefill_chunk
        self.caches: dict[int, KVCache] = {}
        self._next = 0

    def used_bytes(self) -> int:
        return sum(self._bytes(c) for c in self.caches.values())

    def _bytes(self, c: KVCache) -> int:
        return c.capacity * self.per_token

    def allocate(self, prompt: list[int], need: int, *, reuse: bool) -> tuple[int, int] | None:
        """A slot for a sequence of up to `need` tokens and how many prompt tokens it already holds,
        or None when the cache has no room now."""
        w = self.model.tok_embeddings.weight
        cap = need if self.model.config.sliding_window is None else min(
            need, self.model.config.sliding_window + self.prefill_chunk - 1)
        if self.used_bytes() + cap * self.per_token > self.total_bytes and self.caches:
            return None
        slot, self._next = self._next, self._next + 1
        self.caches[slot] = KVCache(self.model.config, batch_size=1, max_len=need, dtype=w.dtype, device=w.device,
                                    prefill_chunk=self.prefill_chunk)
        return slot, 0

    def free(self, slot: int, tokens: list[int]) -> None:
        self.caches.pop(slot, None)

    def forward(self, items: list[Item]) -> list[Result]:
        return [self._one(it) for it in items]

    def _one(self, it: Item) -> Result:
        model, cache = self.model, self.caches[it.slot]
        T = len(it.tokens)
        tokens_1T = torch.tensor([it.tokens], device=cache.k[0].device)
        positions_1T = torch.arange(it.start, it.start + T, device=tokens_1T.device)[None]
        native = getattr(model, "native_decoder", None)
        moe = model.config.moe is not None
        if T == 1 and native is not None and native.accepts(tokens_1T, cache):
            logits_1V = native.step(it.tokens[0], it.start, cache)
            idx_LK = native.chosen.long().clone() if moe else None
            return Result(logits_1V if it.logits != "none" else None, idx_LK if it.experts else None,
                          self._counts([idx_LK]) if idx_LK is not None else None)
        h_1TD, routings = model(tokens_1T, positions_BT=positions_1T, cache=cache, return_hidden=True,
                                return_routing=True)
        logits = None
        if it.logits == "all":
            logits = model.output(h_1TD[0]).float()
        elif it.logits == "last":
            logits = model.output(h_1TD[0, -1:]).float()
        experts = torch.stack([r.idx_TK[-1] for r in routings]) if it.experts and routings else None
        counts = self._counts([r.idx_TK for r in routings]) if routings else None
        return Result(logits, experts, counts)

    def _counts(self, idx_per_layer: list[torch.Tensor]) -> torch.Tensor:
        moe = self.model.config.moe
        assert moe is not None
        return torch.stack([torch.bincount(i.reshape(-1).cpu(), minlength=moe.num_experts) for i in idx_per_layer])
