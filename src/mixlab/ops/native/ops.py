"""The native kernels as PyTorch operators: `torch.ops.mixlab.linear`, `.moe`, `.decode_step` and
`.decode_batch`.

Each is a PyTorch operator (`torch.library`) with a fake implementation that gives only the
output's shape and dtype, so `torch.compile` traces a call as one opaque node (no graph break, no escape hatch)
and runs the C kernel at run time. The operators are inference-only (no autograd formula): the
registry (`mixlab.ops.registry`) never chooses them when gradients are needed.

`decode_step` runs a whole batch-1 decoding step of a model described to C by a decoder object
(`mixlab.model.native.NativeDecoder`), named by the integer handle `register_decoder` returns: an
operator cannot take a Python object, and the handle keeps the compiled graph's guard a constant.
It writes the step's key and value into the KV cache and the token's position into the cache's
position table, which it declares as mutated arguments. `decode_batch` is an engine step of
several sequences at once (a decoding token or a prompt chunk each, each in its own slot of a cache
pool `[S, G, C, Hd]` per layer, the engine's), through the same decoder.

Shape legend: N rows, D input features, X output features, T tokens, E experts, K experts per
token, F expert FFN width, L layers, V vocabulary, B batch, C cache slots.
"""

from __future__ import annotations

import weakref
from typing import Protocol

import torch

from mixlab.ops import native

# linear and moe run many times per step (batched decoding): defined with `torch.library.Library`,
# whose eager dispatch costs less than `custom_op`'s (BENCHMARKS.md); decode_step, once per token,
# uses `custom_op` for its handling of mutated arguments.
_LIB = torch.library.Library("mixlab", "DEF")
_LIB.define("linear(Tensor x_ND, Tensor w_XD, Tensor? scale_X=None, bool act8=False) -> Tensor")
_LIB.define("moe(Tensor x_TD, Tensor w13_E2FD, Tensor w2_EDF, Tensor idx_TK, Tensor weight_TK, "
            "Tensor? w13_scale_E2F=None, Tensor? w2_scale_ED=None) -> Tensor")


def linear(x_ND: torch.Tensor, w_XD: torch.Tensor, scale_X: torch.Tensor | None = None,
           act8: bool = False) -> torch.Tensor:
    """x @ w.T (times the row scales of int8 weights) for a few rows, each weight row read once
    (`act8`: x rounded to int8 per block of 32, integer products: `native.linear`)."""
    return native.linear(x_ND, w_XD, scale_X, act8=act8)


def moe(x_TD: torch.Tensor, w13_E2FD: torch.Tensor, w2_EDF: torch.Tensor, idx_TK: torch.Tensor,
        weight_TK: torch.Tensor, w13_scale_E2F: torch.Tensor | None = None,
        w2_scale_ED: torch.Tensor | None = None) -> torch.Tensor:
    """The experts of an MoE layer for a few tokens, each chosen expert's weights read once."""
    return native.moe(x_TD, w13_E2FD, w2_EDF, idx_TK, weight_TK, w13_scale_E2F, w2_scale_ED)


_LIB.impl("linear", linear, "CPU")
_LIB.impl("moe", moe, "CPU")


@torch.library.register_fake("mixlab::linear", lib=_LIB)
def _(x_ND: torch.Tensor, w_XD: torch.Tensor, scale_X: torch.Tensor | None = None, act8: bool = False) -> torch.Tensor:
    return x_ND.new_empty(*x_ND.shape[:-1], w_XD.shape[0])


@torch.library.register_fake("mixlab::moe", lib=_LIB)
def _(x_TD: torch.Tensor, w13_E2FD: torch.Tensor, w2_EDF: torch.Tensor, idx_TK: torch.Tensor,
      weight_TK: torch.Tensor, w13_scale_E2F: torch.Tensor | None = None,
      w2_scale_ED: torch.Tensor | None = None) -> torch.Tensor:
    return torch.empty_like(x_TD)


class Decoder(Protocol):
    """What `decode_step` needs of a decoder (`mixlab.model.native.NativeDecoder`)."""

    n_layers: int
    top_k: int
    vocab_size: int

    def run(self, token: int, position: int, pos_BC: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor],
            slot: int, n: int, logits_1V: torch.Tensor) -> torch.Tensor: ...

    def run_batch(self, tokens_T: torch.Tensor, positions_T: torch.Tensor, seqs_T: torch.Tensor,
                  rows_R: torch.Tensor, pos_SC: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor],
                  logits_RV: torch.Tensor, chosen_LTK: torch.Tensor) -> None: ...


_DECODERS: weakref.WeakValueDictionary[int, Decoder] = weakref.WeakValueDictionary()
_next_handle = [0]


def register_decoder(decoder: Decoder) -> int:
    """A handle for `decoder` to pass to `decode_step` (held weakly: it lives as long as its model)."""
    _next_handle[0] += 1
    _DECODERS[_next_handle[0]] = decoder
    return _next_handle[0]


def _decoder(handle: int) -> Decoder:
    try:
        return _DECODERS[handle]
    except KeyError:
        raise RuntimeError(f"native decoder {handle} no longer exists (its model was freed)") from None


@torch.library.custom_op("mixlab::decode_step", mutates_args=("pos_BC", "k", "v"))
def decode_step(decoder: int, token: torch.Tensor, position: torch.Tensor, pos_BC: torch.Tensor,
                k: list[torch.Tensor], v: list[torch.Tensor], slot: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch-1 decoding step: the next-token logits `[1, V]` (float32) and the experts each layer
    chose `[L, K]` (int32). Writes the token's keys and values into slot `slot` of `k`/`v` and its
    position into `pos_BC[0, slot]`; attention reads the first `n` slots."""
    dec = _decoder(decoder)
    logits_1V = torch.empty(1, dec.vocab_size, dtype=torch.float32)
    chosen_LK = dec.run(int(token), int(position), pos_BC, k, v, slot, n, logits_1V)
    return logits_1V, chosen_LK.clone()


@decode_step.register_fake
def _(decoder: int, token: torch.Tensor, position: torch.Tensor, pos_BC: torch.Tensor,
      k: list[torch.Tensor], v: list[torch.Tensor], slot: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    dec = _decoder(decoder)
    return (pos_BC.new_empty(1, dec.vocab_size, dtype=torch.float32),
            pos_BC.new_empty(dec.n_layers, dec.top_k, dtype=torch.int32))


@torch.library.custom_op("mixlab::decode_batch", mutates_args=("pos_SC", "k", "v"))
def decode_batch(decoder: int, tokens_T: torch.Tensor, positions_T: torch.Tensor, seqs_T: torch.Tensor,
                 rows_R: torch.Tensor, pos_SC: torch.Tensor, k: list[torch.Tensor],
                 v: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One engine step of T tokens: token `tokens_T[t]` at position `positions_T[t]` of the sequence
    in slot `seqs_T[t]` of the pool `k`/`v` (`[S, G, C, Hd]` per layer, index position % C; `pos_SC`
    the positions each index holds, updated). A sequence's tokens are consecutive rows at consecutive
    positions: one decoding token, or a prompt chunk (causal attention inside it). Returns the
    logits of rows `rows_R` `[R, V]` (float32) and the experts each layer chose `[L, T, K]` (int32)."""
    dec = _decoder(decoder)
    T, R = tokens_T.shape[0], rows_R.shape[0]
    logits_RV = torch.empty(R, dec.vocab_size, dtype=torch.float32)
    chosen_LTK = torch.empty(dec.n_layers, T, dec.top_k, dtype=torch.int32)
    dec.run_batch(tokens_T, positions_T, seqs_T, rows_R, pos_SC, k, v, logits_RV, chosen_LTK)
    return logits_RV, chosen_LTK


@decode_batch.register_fake
def _(decoder: int, tokens_T: torch.Tensor, positions_T: torch.Tensor, seqs_T: torch.Tensor, rows_R: torch.Tensor,
      pos_SC: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    dec = _decoder(decoder)
    return (pos_SC.new_empty(rows_R.shape[0], dec.vocab_size, dtype=torch.float32),
            pos_SC.new_empty(dec.n_layers, tokens_T.shape[0], dec.top_k, dtype=torch.int32))
