"""The engine's decoding steps as CUDA graphs, one per batch-size bucket.

A decode-only step of B running sequences (one token each) launches a few hundred small kernels;
on a GPU their launch cost, not their arithmetic, sets the step time. Here such a step is
recorded once per bucket size (1, 2, 4, 8, ... up to the slot pool's size) and replayed: the
step's tokens, positions and slots are copied into the bucket's static input tensors, the graph
replays, and the logits and experts are read from its static outputs.

Everything in the recorded step is a device op over the runner's slot pool (`Runner.k`, `.v`,
`.pos_SC`): keys and values are written at `pos % C` of each row's slot, attention reads the
rows' slots under a mask built from the positions they hold, and the MoE layer runs the
registry's CUDA kernel (`mixlab.ops.triton_moe`, which sorts by expert without host syncs).
A bucket larger than the step repeats the step's first row: the repeat writes the same values to
the same place, and its outputs are ignored.

`capture=False` runs the same step eagerly (any device): the tests check it against the runner's
ordinary batched step on the CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mixlab.model.layers import apply_rope, rope_cos_sin
from mixlab.model.transformer import Block

if TYPE_CHECKING:
    from mixlab.engine.runner import Item, Result, Runner


def buckets(n_slots: int) -> list[int]:
    """Batch sizes that get a graph: powers of two up to the pool's size, and the size itself."""
    out, b = [], 1
    while b < n_slots:
        out.append(b)
        b *= 2
    return [*out, n_slots]


class GraphedDecode:
    def __init__(self, runner: Runner, *, capture: bool | None = None) -> None:
        self.runner = runner
        self.capture = runner.device.type == "cuda" if capture is None else capture
        self.sizes = buckets(runner.n_slots)
        dev = runner.device
        self.inputs = {B: (torch.zeros(B, dtype=torch.long, device=dev), torch.zeros(B, dtype=torch.long, device=dev),
                           torch.zeros(B, dtype=torch.long, device=dev)) for B in self.sizes}
        self.graphs: dict[int, Any] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._pool: Any = None

    @torch.no_grad()
    def _step(self, B: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        r = self.runner
        model, cfg = r.model, r.model.config
        H, G, Hd, C = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, r.capacity
        tok_B, pos_B, slot_B = self.inputs[B]
        idx_B = pos_B % C
        r.pos_SC[slot_B, idx_B] = pos_B
        kpos_BC = r.pos_SC[slot_B]
        visible = (kpos_BC >= 0) & (kpos_BC <= pos_B[:, None])
        if cfg.sliding_window is not None:
            visible &= pos_B[:, None] - kpos_BC < cfg.sliding_window
        mask_B11C = visible[:, None, None, :]
        x_BD = model.tok_embeddings(tok_B)
        cos, sin = rope_cos_sin(pos_B[:, None], Hd, cfg.rope_theta, x_BD.dtype)  # [B, 1, 1, Hd]
        routed: list[torch.Tensor] = []
        for li, block in enumerate(model.layers):
            assert isinstance(block, Block)
            attn = block.attn
            qk, v = attn.wqkv(block.attn_norm(x_BD)).split([(H + G) * Hd, G * Hd], dim=-1)
            q_B1HHd, k_B1GHd = apply_rope(qk.view(B, 1, H + G, Hd), cos, sin).split([H, G], dim=2)
            kc, vc = r.k[li], r.v[li]
            kc[slot_B, :, idx_B] = k_B1GHd[:, 0].to(kc.dtype)
            vc[slot_B, :, idx_B] = v.view(B, G, Hd).to(vc.dtype)
            y = F.scaled_dot_product_attention(q_B1HHd.transpose(1, 2), kc[slot_B], vc[slot_B], attn_mask=mask_B11C,
                                               enable_gqa=True)
            x_1BD, routing = block.feed_forward((x_BD + attn.wo(y.reshape(B, H * Hd)))[None])
            x_BD = x_1BD[0]
            if routing is not None:
                routed.append(routing.idx_TK)
        logits_BV = model.output(model.norm(x_BD)).float()
        return logits_BV, (torch.stack(routed) if routed else None)

    def _run(self, B: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.capture:
            return self._step(B)
        if B not in self.graphs:
            # Warm up on a side stream (kernel compilation, autotuning), then record. Both run the
            # step on its real inputs: they write the same keys and values the replay writes.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._step(B)
            torch.cuda.current_stream().wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self.outputs[B] = self._step(B)
            self.graphs[B] = graph
        self.graphs[B].replay()
        return self.outputs[B]

    def decode(self, items: list[Item]) -> list[Result]:
        """One token for each item (all decoding): logits and experts per item."""
        from mixlab.engine.runner import Result

        n = len(items)
        B = next(b for b in self.sizes if b >= n)
        pad = [items[0]] * (B - n)
        tok_B, pos_B, slot_B = self.inputs[B]
        dev = tok_B.device
        tok_B.copy_(torch.tensor([it.tokens[0] for it in items + pad], device=dev))
        pos_B.copy_(torch.tensor([it.start for it in items + pad], device=dev))
        slot_B.copy_(torch.tensor([it.slot for it in items + pad], device=dev))
        logits_BV, idx_LBK = self._run(B)
        if idx_LBK is not None:
            self.runner.record_experts(idx_LBK[:, :n].clone())
        out = []
        for i, it in enumerate(items):
            logits = None if it.logits == "none" else logits_BV[i : i + 1].clone()
            experts = idx_LBK[:, i].clone() if it.experts and idx_LBK is not None else None
            out.append(Result(logits, experts))
        return out
