"""Decoding over a static per-sequence KV cache, captured once in a CUDA graph and replayed.

A decoding step of a small batch launches hundreds of tiny kernels; on a GPU their launch cost,
not the arithmetic, sets the speed. A CUDA graph records the step's kernels once and replays them
with one launch. That needs a step with no host synchronisation and no shape that changes:

- the cache is static, `[B, G, S, Hd]` per layer with S fixed, each row with its own position in
  a device tensor (`pos_B`), advanced inside the graph; a sliding-window model keeps a rolling
  buffer (slot = position mod S) and masks by the positions each slot holds (`kpos_BS`);
- attention reads all S slots under a mask (its cost is fixed; SDPA on S keys);
- the MoE layer runs the registry's implementation, which on CUDA is the fused Triton kernel that
  sorts by expert without reading counts back to the host (`mixlab.ops.triton_moe`).

On the CPU the same code runs eagerly (`graph=False`), which is how the tests check it against a
full recompute; the CUDA path adds only the capture. Prefill runs through the same code in chunks.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mixlab.engine.sampling import Sampler, seed_generator
from mixlab.model.layers import apply_rope, rope_cos_sin
from mixlab.model.transformer import Block, Transformer


class StaticDecoder:
    """B sequences decoded together over a static cache; `graph=True` (default on CUDA) replays the
    decode step as a CUDA graph."""

    def __init__(self, model: Transformer, *, batch_size: int, max_len: int, prefill_chunk: int = 256,
                 graph: bool | None = None) -> None:
        cfg = model.config
        for name, v in (("batch_size", batch_size), ("max_len", max_len), ("prefill_chunk", prefill_chunk)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:  # else a torch error from the buffers
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's context length {cfg.max_seq_len}")
        p = next(model.parameters())
        self.model, self.cfg, self.device, self.dtype = model, cfg, p.device, p.dtype
        self.window = cfg.sliding_window
        S = max_len if self.window is None else min(max_len, self.window + prefill_chunk - 1)
        self.B, self.S, self.chunk, self.max_len = batch_size, S, prefill_chunk, max_len
        shape = (batch_size, cfg.n_kv_heads, S, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.n_layers)]
        self.kpos_BS = torch.full((batch_size, S), -1, dtype=torch.long, device=self.device)
        self.pos_B = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.tok_B = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        # Each row's length, kept on the host (reading pos_B would sync the device): 0 = not in use.
        # Past max_len a row's slots would wrap round and attention silently lose its first tokens.
        self.lengths = [0] * batch_size
        self.graph = (self.device.type == "cuda") if graph is None else graph
        if self.graph and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self._cuda_graph: torch.cuda.CUDAGraph | None = None
        self._logits_BV: torch.Tensor | None = None

    # -- the step: one code path for prefill chunks and decode steps --------------------------------
    @torch.no_grad()
    def _forward(self, tokens_BT: torch.Tensor, rows: slice) -> torch.Tensor:
        """Append `tokens_BT` to the sequences `rows` at their positions; returns last-token logits."""
        cfg, model = self.cfg, self.model
        B, T = tokens_BT.shape
        H, G, Hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        pos_B = self.pos_B[rows]
        pos_BT = pos_B[:, None] + torch.arange(T, device=self.device)
        slot_BT = pos_BT % self.S
        b_BT = torch.arange(B, device=self.device)[:, None].expand(B, T)
        kpos_BS = self.kpos_BS[rows]
        kpos_BS[b_BT, slot_BT] = pos_BT
        visible = (kpos_BS[:, None, :] >= 0) & (kpos_BS[:, None, :] <= pos_BT[:, :, None])
        if self.window is not None:
            visible &= pos_BT[:, :, None] - kpos_BS[:, None, :] < self.window
        mask_B1TS = visible[:, None]
        x_BTD = model.tok_embeddings(tokens_BT)
        cos, sin = rope_cos_sin(pos_BT, Hd, cfg.rope_theta, x_BTD.dtype)
        for i, block in enumerate(model.layers):
            assert isinstance(block, Block)
            attn = block.attn
            qk, v = attn.wqkv(block.attn_norm(x_BTD)).split([(H + G) * Hd, G * Hd], dim=-1)
            q_BTHHd, k_BTGHd = apply_rope(qk.unflatten(-1, (H + G, Hd)), cos, sin).split([H, G], dim=2)
            k_cache, v_cache = self.k[i][rows], self.v[i][rows]
            k_cache[b_BT, :, slot_BT] = k_BTGHd.to(k_cache.dtype)
            v_cache[b_BT, :, slot_BT] = v.view(B, T, G, Hd).to(v_cache.dtype)
            y = F.scaled_dot_product_attention(q_BTHHd.transpose(1, 2), k_cache, v_cache, attn_mask=mask_B1TS,
                                               enable_gqa=True)
            x_BTD = x_BTD + attn.wo(y.transpose(1, 2).reshape(B, T, H * Hd))
            h_BTD = block.ffn_norm(x_BTD)
            out = block.ffn(h_BTD)
            x_BTD = x_BTD + (out[0] if isinstance(out, tuple) else out)
        self.pos_B[rows] += T
        return model.output(model.norm(x_BTD[:, -1]))

    # -- public API -----------------------------------------------------------------------------------
    def reset(self, row: int | None = None) -> None:
        """Forget sequence `row` (all when None)."""
        if row is not None and not (isinstance(row, int) and 0 <= row < self.B):
            raise ValueError(f"row must be an integer in [0, {self.B}) (the batch size), got {row!r}")
        rows = slice(None) if row is None else slice(row, row + 1)
        self.kpos_BS[rows] = -1
        self.pos_B[rows] = 0
        for r in range(self.B)[rows]:
            self.lengths[r] = 0

    def prefill(self, row: int, prompt: Sequence[int]) -> torch.Tensor:
        """Write `prompt` into sequence `row` (which starts over); returns the next-token logits `[V]`."""
        # Checked here: on CUDA an id outside the vocabulary is a device-side assert that breaks the context;
        # a float id (1.5) became token 1 without a word.
        try:
            if isinstance(prompt, str | bytes):
                raise TypeError
            prompt = [operator.index(i) for i in prompt]
        except TypeError:
            raise ValueError(f"a prompt is a list of integer token ids, not {prompt!r:.60}") from None
        if not prompt:
            raise ValueError("prefill needs at least one prompt token")
        if len(prompt) > self.max_len:
            raise ValueError(f"a prompt of {len(prompt)} tokens exceeds max_len={self.max_len}")
        V = self.cfg.vocab_size
        bad = [i for i in prompt if not 0 <= i < V]
        if bad:
            raise ValueError(f"prompt has token id {bad[0]} outside the model's vocabulary [0, {V})")
        self.reset(row)
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
        logits = None
        for s in range(0, ids.shape[1], self.chunk):
            logits = self._forward(ids[:, s : s + self.chunk], slice(row, row + 1))
        assert logits is not None
        self.lengths[row] = len(prompt)
        return logits[0]

    def step(self, tokens_B: torch.Tensor) -> torch.Tensor:
        """One decoding step for all B sequences (one new token each); returns logits `[B, V]`.
        Rows that are not in use decode garbage that nobody reads; a row in use that holds max_len
        tokens is refused (reset or prefill it again)."""
        full = [r for r, n in enumerate(self.lengths) if n >= self.max_len]
        if full:
            raise ValueError(f"sequence {full[0]} holds max_len={self.max_len} tokens: no room for another "
                             "(a larger max_len, or reset / prefill the row)")
        self.lengths = [n + 1 if n else 0 for n in self.lengths]
        self.tok_B.copy_(tokens_B)
        if not self.graph:
            return self._forward(self.tok_B[:, None], slice(None))
        if self._cuda_graph is None:
            self._capture()
        assert self._cuda_graph is not None and self._logits_BV is not None
        self._cuda_graph.replay()
        return self._logits_BV

    def _capture(self) -> None:
        # Warm up on a side stream (lazy initialisation, autotuning), then record one step. Both
        # advance the positions: put them back, and restore the slots the two steps wrote.
        saved = (self.pos_B.clone(), self.kpos_BS.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(self.tok_B[:, None], slice(None))
        torch.cuda.current_stream().wait_stream(stream)
        self.pos_B.copy_(saved[0])
        self.kpos_BS.copy_(saved[1])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits_BV = self._forward(self.tok_B[:, None], slice(None))
        self.pos_B.copy_(saved[0])
        self.kpos_BS.copy_(saved[1])
        self._cuda_graph = graph

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, sampler: Sampler | None = None,
                 seed: int | None = None, eos_id: int | None = None) -> list[list[int]]:
        """New tokens for up to B prompts, decoded together (greedy by default)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"invalid max_new_tokens={max_new_tokens!r}: expected an integer >= 1")  # -1 gave []
        if not prompts:  # torch.stack's error before
            raise ValueError("prompts must be a non-empty list of token-id lists")
        if len(prompts) > self.B:
            raise ValueError(f"{len(prompts)} prompts for a decoder of batch size {self.B}")
        if any(len(p) + max_new_tokens > self.max_len for p in prompts):
            raise ValueError(f"prompt + max_new_tokens exceeds max_len={self.max_len}")
        sampler = sampler or Sampler()
        gen = torch.Generator(device=self.device)
        if seed is not None:
            seed_generator(gen, seed)
        self.reset()
        n = len(prompts)
        first = torch.stack([self.prefill(r, p) for r, p in enumerate(prompts)])
        out: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        nxt = sampler(first.float(), generator=gen)
        for _ in range(max_new_tokens):
            ids = nxt.tolist()
            for r in range(n):
                if not done[r]:
                    out[r].append(ids[r])
                    done[r] = ids[r] == eos_id or len(out[r]) >= max_new_tokens
            if all(done):
                break
            tokens = torch.zeros(self.B, dtype=torch.long, device=self.device)
            tokens[:n] = nxt
            nxt = sampler(self.step(tokens)[:n].float(), generator=gen)
        return out
