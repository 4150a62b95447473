"""Decoding with the KV cache gives the logits of recomputing the whole sequence (float32, 1e-5),
for static and rolling (sliding-window) caches, chunked prefill and left-padded batches."""

from __future__ import annotations

import pytest
import torch

from mixlab.cache import CacheFullError, KVCache
from mixlab.config import get_preset
from mixlab.generate import decode_step, prefill
from mixlab.model import Transformer

CASES = {
    # name: (config changes, prompt lengths, prefill chunk, new tokens)
    "moe-static": (dict(), (7, 12, 3), 512, 10),
    "moe-static-chunked": (dict(), (7, 12, 3), 4, 10),
    "moe-static-growing": (dict(), (7, 12, 3), 4, 10, 3),  # reserve=3: the buffers grow 3 -> 6 -> 12 -> 22
    "moe-rolling": (dict(sliding_window=6), (7, 12, 3), 4, 14),
    "dense-rolling": (dict(moe=None, sliding_window=5), (9, 2), 3, 16),
    "dense-window-longer-than-sequence": (dict(moe=None, sliding_window=64), (9, 2), 5, 8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_decoding_equals_full_recompute(case):
    changes, lengths, chunk, n_new, *reserve = CASES[case]
    cfg = get_preset("tiny-moe").replace(vocab_size=96, max_seq_len=64, **changes)
    model = Transformer(cfg).eval()
    model.init_weights(std=0.1, seed=0)  # logits of order 1, so 1e-5 is a float32-rounding bound
    B, T = len(lengths), max(lengths)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (B, T + n_new), generator=g)
    positions = torch.full((B, T + n_new), -1)
    for b, n in enumerate(lengths):  # left padding: prompt b occupies the last n of the first T columns
        positions[b, T - n :] = torch.arange(n + n_new)
    cache = KVCache(cfg, batch_size=B, max_len=T + n_new, prefill_chunk=chunk, reserve=(reserve or [None])[0])
    if reserve:
        assert cache.capacity == reserve[0] and cache.k[0].shape[2] == reserve[0]
    if cfg.sliding_window and cfg.sliding_window + chunk - 1 < T + n_new:
        assert cache.capacity < T + n_new, "this case must exercise the rolling buffer"
    with torch.no_grad():
        full = model(tokens, positions_BT=positions).float()  # no cache: the window mask over everything
        logits, _ = prefill(model, tokens[:, :T], positions[:, :T], cache, chunk=chunk)
        torch.testing.assert_close(logits, full[:, T - 1], atol=1e-5, rtol=0)
        for t in range(T, T + n_new):
            logits, _ = decode_step(model, tokens[:, t : t + 1], positions[:, t : t + 1], cache)
            torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=0, msg=f"step {t}")
    assert cache.t == T + n_new
    if reserve:
        assert cache.capacity == cache.k[0].shape[2] == T + n_new  # grown to max_len, no further


def test_attention_weights_through_a_rolling_cache_are_the_full_passes():
    """forward_output(attentions=True) with a cache: each chunk's weights over the cache's slots (a
    rolling buffer, the window 4 smaller than the sequence) are the uncached pass's, column by position."""
    cfg = get_preset("tiny-moe").replace(vocab_size=96, sliding_window=4)
    model = Transformer(cfg).eval()
    model.init_weights(std=0.1, seed=0)
    tokens = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(0))
    cache = KVCache(cfg, batch_size=2, max_len=13, prefill_chunk=5)
    assert cache.capacity < 13
    with torch.no_grad():
        full = model.forward_output(tokens, attentions=True).attentions  # [B, H, 13, 13] per layer
        for a, b in ((0, 5), (5, 10), (10, 11), (11, 13)):
            got = model.forward_output(tokens[:, a:b], cache=cache, attentions=True).attentions
            pos_BS = cache.pos_BC[:, : got[0].shape[-1]]  # the position each slot holds
            for layer, w in enumerate(got):
                want = full[layer][:, :, a:b].gather(-1, pos_BS.clamp(min=0)[:, None, None].expand_as(w))
                torch.testing.assert_close(w, want * (pos_BS >= 0)[:, None, None], atol=1e-6, rtol=0)
                torch.testing.assert_close(w.sum(-1), torch.ones_like(w[..., 0]))


def test_rolling_cache_is_smaller_than_the_sequence():
    cfg = get_preset("tiny-dense").replace(sliding_window=8, max_seq_len=4096)
    cache = KVCache(cfg, batch_size=1, max_len=4096, prefill_chunk=16)
    assert cache.capacity == 8 + 16 - 1
    assert cache.k[0].shape[2] == cache.capacity


def test_cache_refuses_overflow_and_oversized_chunks():
    cfg = get_preset("tiny-moe").replace(max_seq_len=64)
    with pytest.raises(CacheFullError, match="exceeds the model's context length 64"):
        KVCache(cfg, batch_size=1, max_len=65)
    cache = KVCache(cfg, batch_size=1, max_len=10)
    cache.slots(10)
    cache.t = 8
    with pytest.raises(CacheFullError, match="holds 10 tokens; 8 used, 3 more requested"):
        cache.slots(3)
    rolling = KVCache(cfg.replace(sliding_window=4), batch_size=1, max_len=40, prefill_chunk=4)
    rolling.t = 20
    with pytest.raises(CacheFullError, match="prefill in smaller chunks"):
        rolling.slots(5)
