"""Routing statistics of the Mixtral paper §5 (arXiv 2401.04088), as pure functions on arrays.

Everything here works on integer expert ids (numpy or torch, converted on entry) and returns plain
numbers, so it is testable on synthetic routers with known answers. `RoutingCounts` accumulates
counts over a stream of batches, so a corpus of any size is analysed in bounded memory.

Shape legend: T tokens (batch and sequence flattened, row-major), K experts per token (top-k),
E experts, L MoE layers.

Definitions (all "shares" are fractions in [0, 1]):

- selection share of expert e: tokens whose top-k contains e / tokens. Sums to k over experts;
  uniform routing gives k/E.
- assignment share of expert e: the same count / (tokens * k), i.e. the share of all (token, slot)
  assignments going to e. Sums to 1; uniform gives 1/E. This is what the paper's Figure 7 plots
  ("experts selected as a first or second choice", dashed line at 1/8).
- first-choice share: tokens whose highest-weighted expert is e / tokens.
- repeat, first choice (Table 5, first column): for consecutive tokens t, t+1 of the same document
  and the same model sequence, the share with idx[t, 0] == idx[t+1, 0].
- repeat, top-k overlap (Table 5, "first or second choice"): the share of those pairs whose top-k
  sets share at least one expert, i.e. the same expert is observed as first or second choice of
  both tokens. The paper's random reference 1 - 6/8 * 5/7 ~ 46 % for E = 8, k = 2 is exactly the
  probability that two independent uniform 2-subsets of 8 experts intersect, which fixes this
  reading (see `random_baseline`).
- the same two repeat rates over pairs of *different* token ids only: a router that is a function
  of the token id repeats on every identical neighbour (runs of spaces), which is not locality.
- domain specialisation: total variation distance between a domain's and all domains' shares.
- a repeat rate over no pairs is None (0 would read as "never repeats").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

Array = np.ndarray | torch.Tensor


def _np(x: Array) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _counts_E(x: Array, name: str) -> np.ndarray:
    """One layer's numbers per expert `[E]` as float64: a `[L, E]` array (`RoutingCounts.selected_LE`)
    gave numbers pooled over the layers (an entropy 3 x ln E for 8 layers), with no error."""
    c = _np(x).astype(np.float64)
    if c.ndim != 1:
        raise ValueError(f"{name} must hold one layer's numbers per expert [E], got shape {list(c.shape)} "
                         "(for [layers, experts]: one call per row)")
    return c


def random_baseline(*, num_experts: int, top_k: int) -> dict[str, float]:
    """Repeat rates of a router that picks a uniformly random top-k set, independently per token.

    First choice: the next token's first choice equals this one's with probability 1/E.
    Top-k overlap: the next token's k-subset is uniform over C(E, k) subsets, of which C(E-k, k)
    avoid all k experts of this token, so P(overlap) = 1 - C(E-k, k) / C(E, k). For E=8, k=2:
    1 - 15/28 = 13/28 ~ 0.464, the paper's 1 - 6/8 * 5/7. (C(E-k, k) = 0 when 2k > E: overlap
    is certain.)
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    return {
        "first_choice": 1.0 / num_experts,
        "topk_overlap": 1.0 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k),
    }


def _ids_TK(idx_TK: Array) -> np.ndarray:
    idx = _np(idx_TK)
    if idx.ndim != 2:  # one layer's `Routing.idx_TK` (batch and sequence flattened), not [B, T, K] or [T]
        raise ValueError(f"expected expert ids of shape [T, K], got {list(idx.shape)}")
    return idx


def expert_counts(idx_TK: Array, *, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(selected_E, first_E): tokens whose top-k contains e, tokens whose first choice is e.

    A router never picks an expert twice for one token, so counting every slot counts tokens.
    """
    idx = _ids_TK(idx_TK).astype(np.int64, copy=False)
    if idx.size and (idx.min() < 0 or idx.max() >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got [{idx.min()}, {idx.max()}]")
    selected_E = np.bincount(idx.reshape(-1), minlength=num_experts)
    first_E = np.bincount(idx[:, 0], minlength=num_experts)
    return selected_E, first_E


def pair_mask(segment_T: Array) -> np.ndarray:
    """bool [T-1]: True where tokens t and t+1 are consecutive tokens of one document.

    `segment_T` gives each token the id of the contiguous piece of a document it belongs to (one
    id per model row or window, distinct across documents and rows) and -1 for padding, so pairs
    never straddle a document, a sequence row or padding.
    """
    seg = _np(segment_T).reshape(-1)
    return (seg[:-1] == seg[1:]) & (seg[:-1] >= 0)


def consecutive_repeats(idx_TK: Array, pairs_ok: Array) -> tuple[int, int, int]:
    """(pairs, same first choice, top-k sets overlap) over the consecutive pairs in `pairs_ok`."""
    idx = _ids_TK(idx_TK)
    ok = _np(pairs_ok).astype(bool).reshape(-1)
    if ok.shape[0] != max(idx.shape[0] - 1, 0):
        raise ValueError(f"pairs_ok has {ok.shape[0]} entries for {idx.shape[0]} tokens (expected T-1)")
    a_PK, b_PK = idx[:-1][ok], idx[1:][ok]
    same_first = int((a_PK[:, 0] == b_PK[:, 0]).sum())
    overlap = int((a_PK[:, :, None] == b_PK[:, None, :]).any(axis=(1, 2)).sum())
    return int(ok.sum()), same_first, overlap


def load_balance(counts_E: Array) -> dict[str, float]:
    """How evenly the load (assignments per expert) is spread.

    entropy: of the load distribution p_e = counts_e / sum, in nats; entropy_norm divides by
    ln E (1 = perfectly balanced, 0 = one expert takes everything). max_over_mean: the busiest
    expert's load relative to the mean, the factor that sizes expert capacity in a dropless or
    expert-parallel system (1 = balanced, E = collapse).
    """
    c = _counts_E(counts_E, "counts_E")
    E, total = c.shape[0], c.sum()
    if total <= 0:
        nan = float("nan")
        return {"entropy": nan, "entropy_norm": nan, "max_over_mean": nan, "min_over_mean": nan}
    p = c / total
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    mean = total / E
    return {
        "entropy": entropy,
        "entropy_norm": entropy / math.log(E) if E > 1 else 1.0,
        "max_over_mean": float(c.max() / mean),
        "min_over_mean": float(c.min() / mean),
    }


def total_variation(p_E: Array, q_E: Array) -> float:
    """Half the L1 distance between two distributions over experts (0 = same, 1 = disjoint): how
    differently a domain is routed from the corpus as a whole."""
    p, q = _counts_E(p_E, "p_E"), _counts_E(q_E, "q_E")
    if p.shape != q.shape:
        raise ValueError(f"p_E and q_E must cover the same experts, got {p.shape[0]} and {q.shape[0]} entries")
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


def _rates(count_L: np.ndarray, pairs: int) -> list[float | None]:
    """count / pairs per layer; None where there is no pair (0 would read as "never repeats")."""
    return (count_L / pairs).tolist() if pairs else [None] * len(count_L)


@dataclass
class RoutingCounts:
    """Running counts for one data set (a domain) over all L MoE layers."""

    num_layers: int
    num_experts: int
    top_k: int
    tokens: int = 0
    pairs: int = 0
    diff_pairs: int = 0  # consecutive pairs of two different token ids
    compared_pairs: int = 0  # pairs counted with their token ids (`update(tokens_T=)`)
    selected_LE: np.ndarray = field(init=False)
    first_LE: np.ndarray = field(init=False)
    same_first_L: np.ndarray = field(init=False)
    overlap_L: np.ndarray = field(init=False)
    same_first_diff_L: np.ndarray = field(init=False)  # the same, over pairs of different tokens
    overlap_diff_L: np.ndarray = field(init=False)

    _ARRAYS = ("selected_LE", "first_LE", "same_first_L", "overlap_L", "same_first_diff_L", "overlap_diff_L")

    def __post_init__(self) -> None:
        L, E = self.num_layers, self.num_experts
        self.selected_LE = np.zeros((L, E), np.int64)
        self.first_LE = np.zeros((L, E), np.int64)
        for name in self._ARRAYS[2:]:
            setattr(self, name, np.zeros(L, np.int64))

    def update(self, idx_per_layer: Sequence[Array], *, valid_T: Array, pairs_ok: Array,
               tokens_T: Array | None = None) -> None:
        """Add one batch: each layer's top-k ids `[T, K]` (first choice in slot 0), `valid_T` the
        non-padding tokens, `pairs_ok` the consecutive pairs to count (see `pair_mask`). With the
        token ids `tokens_T`, repeats are also counted over pairs of two different tokens only: a
        router that is a function of the token id alone repeats on every identical pair (runs of
        spaces in code, "\n\n"), which is not the positional locality the paper describes."""
        if len(idx_per_layer) != self.num_layers:
            raise ValueError(f"got routing for {len(idx_per_layer)} layers, expected {self.num_layers}")
        valid = _np(valid_T).astype(bool).reshape(-1)
        ok = _np(pairs_ok).astype(bool).reshape(-1)
        tok = None if tokens_T is None else _np(tokens_T).reshape(-1)
        ids = [_ids_TK(idx_TK) for idx_TK in idx_per_layer]
        T = ids[0].shape[0] if ids else valid.shape[0]
        for layer, idx in enumerate(ids):  # all checked before anything is counted
            if idx.shape[0] != T:
                raise ValueError(f"layer {layer}'s routing has {idx.shape[0]} tokens, layer 0's {T}")
        for name, a, n in (("valid_T", valid, T), ("tokens_T", tok, T), ("pairs_ok", ok, max(T - 1, 0))):
            if a is not None and a.shape[0] != n:  # else numpy's indexing or broadcasting error
                raise ValueError(f"{name} has {a.shape[0]} entries for {T} routed tokens (expected {n})")
        diff = None if tok is None else ok & (tok[:-1] != tok[1:])
        for layer, idx in enumerate(ids):
            sel, first = expert_counts(idx[valid], num_experts=self.num_experts)
            self.selected_LE[layer] += sel
            self.first_LE[layer] += first
            _, same, over = consecutive_repeats(idx, ok)
            self.same_first_L[layer] += same
            self.overlap_L[layer] += over
            if diff is not None:
                _, same, over = consecutive_repeats(idx, diff)
                self.same_first_diff_L[layer] += same
                self.overlap_diff_L[layer] += over
        self.tokens += int(valid.sum())
        self.pairs += int(ok.sum())
        self.diff_pairs += int(diff.sum()) if diff is not None else 0
        self.compared_pairs += int(ok.sum()) if diff is not None else 0

    def merged(self, other: RoutingCounts) -> RoutingCounts:
        out = RoutingCounts(self.num_layers, self.num_experts, self.top_k)
        out.tokens, out.pairs = self.tokens + other.tokens, self.pairs + other.pairs
        out.diff_pairs = self.diff_pairs + other.diff_pairs
        out.compared_pairs = self.compared_pairs + other.compared_pairs
        for name in self._ARRAYS:
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def summary(self) -> dict[str, Any]:
        """Every derived number, JSON-ready (lists indexed [layer][expert] or [layer]). A repeat rate over
        no pairs (a domain of one-token windows; no two different neighbours) is None, not 0."""
        t = max(self.tokens, 1)
        return {
            "tokens": self.tokens,
            "pairs": self.pairs,
            "different_token_pairs": self.diff_pairs,
            "identical_token_pair_share": (1 - self.diff_pairs / self.compared_pairs if self.compared_pairs
                                           else None),
            "repeat_first_choice_different_tokens": _rates(self.same_first_diff_L, self.diff_pairs),
            "repeat_topk_overlap_different_tokens": _rates(self.overlap_diff_L, self.diff_pairs),
            "selection_share": (self.selected_LE / t).tolist(),
            "assignment_share": (self.selected_LE / (t * self.top_k)).tolist(),
            "first_choice_share": (self.first_LE / t).tolist(),
            "repeat_first_choice": _rates(self.same_first_L, self.pairs),
            "repeat_topk_overlap": _rates(self.overlap_L, self.pairs),
            "load_balance": [load_balance(c) for c in self.selected_LE],
            "counts": {"selected": self.selected_LE.tolist(), "first": self.first_LE.tolist(),
                       "same_first": self.same_first_L.tolist(), "overlap": self.overlap_L.tolist(),
                       "same_first_different_tokens": self.same_first_diff_L.tolist(),
                       "overlap_different_tokens": self.overlap_diff_L.tolist()},
        }
