"""The KV cache: preallocated per-layer buffers, static or rolling (sliding window), one code path.

Token number t of the (left-padded) batch is written to slot t % capacity. Each slot also records
the absolute position of the token it holds (-1 = empty or padding), so attention masks come from
positions alone: a key is visible to a query when 0 <= q_pos - k_pos < window. With capacity equal
to the longest sequence the cache is static; with a sliding window the capacity can be smaller
than the sequence and old slots are overwritten (the rolling buffer of Mistral 7B, arXiv
2310.06825 §2). A chunk of T tokens never evicts a key that one of its own queries still needs
while T <= capacity - window + 1; the model checks this.

Shape legend: B batch, G key/value heads, C capacity (slots), Hd head dim.
"""

from __future__ import annotations

import torch

from mixlab import pages
from mixlab.config import ModelConfig
from mixlab.errors import MixlabError


class CacheFullError(MixlabError):
    """A cache asked to hold more tokens than it (or the model's context) can."""


class KVCache:
    """The keys and values of a batch of sequences, per layer `[B, G, C, Hd]`, for `Transformer.forward`
    (`cache=`), `generate(cache=)` and `greedy_step`: e.g. `KVCache(model.config, batch_size=1,
    max_len=256, dtype=model.tok_embeddings.weight.dtype)`. Token t goes to slot t % C; with a
    sliding window C is the window plus a prefill chunk (a rolling buffer), else `max_len`."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        prefill_chunk: int = 512,
        reserve: int | None = None,
    ) -> None:
        """`max_len`: the longest sequence (prompt + new tokens) this cache will hold.

        With a sliding window, only `window + prefill_chunk - 1` slots are kept (rolling buffer).
        `reserve`: without a window, allocate slots for this many tokens first and grow (doubling,
        up to `max_len`) as tokens arrive: for a long-lived cache such as a chat's, which may hold
        the model's whole context but usually holds far less (Mixtral's 32k tokens: 4.3 GB in bf16).
        """
        if max_len > config.max_seq_len:
            raise CacheFullError(
                f"requested cache length {max_len} exceeds the model's context length {config.max_seq_len}"
            )
        capacity = max_len
        if config.sliding_window is not None:
            capacity = min(max_len, config.sliding_window + prefill_chunk - 1)
        elif reserve is not None:
            capacity = min(max_len, max(1, reserve))
        self.config = config
        self.max_len = max_len
        self.window = config.sliding_window
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.pos_BC = torch.full((batch_size, 0), -1, dtype=torch.long, device=device)
        self.capacity = 0
        self._resize(capacity, dtype=dtype, device=torch.device(device))
        self.t = 0  # tokens written so far (padded index)
        self.tokens: list[int] = []  # batch 1: the ids written so far, kept by `generate` for prefix reuse

    @classmethod
    def over(cls, config: ModelConfig, k: list[torch.Tensor], v: list[torch.Tensor], pos_BC: torch.Tensor, *,
             max_len: int, t: int = 0) -> KVCache:
        """A cache over existing buffers `[B, G, C, Hd]` per layer (one slot of the engine's pool,
        which owns them and sets `t`); static when C >= max_len, else rolling."""
        cache = cls.__new__(cls)
        cache.config, cache.max_len, cache.window = config, max_len, config.sliding_window
        cache.k, cache.v, cache.pos_BC, cache.capacity = k, v, pos_BC, pos_BC.shape[1]
        cache.t, cache.tokens = t, []
        return cache

    @property
    def batch_size(self) -> int:
        return self.pos_BC.shape[0]

    def _resize(self, capacity: int, *, dtype: torch.dtype, device: torch.device) -> None:
        """New buffers of `capacity` slots holding the current ones' (a static cache never wraps, so
        slot i holds token i). Ordinary tensors even when growing under inference mode, so that the
        cache stays writable outside it, as one made outside it is."""
        B, C = self.pos_BC.shape
        shape = (B, self.config.n_kv_heads, capacity, self.config.head_dim)
        with torch.inference_mode(False), torch.no_grad():
            for buffers in (self.k, self.v):
                old = list(buffers)  # empty on the first allocation
                buffers[:] = [pages.zeros(shape, dtype, device) for _ in range(self.config.n_layers)]
                for new_, old_ in zip(buffers, old, strict=False):
                    new_[:, :, :C] = old_
            pos_BC = torch.full((B, capacity), -1, dtype=torch.long, device=device)
            pos_BC[:, :C] = self.pos_BC
        self.pos_BC, self.capacity = pos_BC, capacity

    def slots(self, T: int) -> torch.Tensor:
        """The slots the next T tokens go to, checking that nothing still needed is overwritten (a
        static cache made with `reserve` grows here)."""
        if self.t + T > self.max_len:
            raise CacheFullError(f"the cache holds {self.max_len} tokens; {self.t} used, {T} more requested")
        if self.t + T > self.capacity and self.window is None:  # static: grow (capacity < max_len)
            self._resize(min(self.max_len, max(self.t + T, 2 * self.capacity)), dtype=self.k[0].dtype,
                         device=self.k[0].device)
        if self.t + T > self.capacity:
            assert self.window is not None
            if T > self.capacity - self.window + 1:
                raise CacheFullError(
                    f"a chunk of {T} tokens would overwrite keys still inside the window "
                    f"({self.window}) of a rolling cache with {self.capacity} slots; prefill in smaller chunks"
                )
        return (self.t + torch.arange(T, device=self.pos_BC.device)) % self.capacity

    def n_filled(self, T: int) -> int:
        """Slots in use once the next T tokens are written (the prefix of slots attention reads)."""
        return min(self.t + T, self.capacity)

    def reset(self) -> None:
        """Empty the cache (its buffers are kept)."""
        self.pos_BC.fill_(-1)
        self.t = 0
        self.tokens = []

    def rewind(self, n: int) -> None:
        """Keep the first n tokens and forget the rest (a conversation's shared prefix). Only a cache
        that never wrapped around holds all of its tokens; a wrapped rolling cache is reset."""
        if not 0 <= n <= self.t:
            raise ValueError(f"cannot rewind a cache holding {self.t} tokens to {n}")
        if self.t > self.capacity:
            self.reset()
            return
        self.pos_BC[:, n : self.t] = -1  # no wrap-around: token i sits in slot i
        self.t = n
        del self.tokens[n:]
