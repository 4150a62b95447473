"""The engine's model side: the KV cache of the running sequences and the forward pass of a step.

The cache is a pool of per-sequence slots (mistral-inference's per-sequence cache with lengths):
per layer one buffer `[S, G, C, Hd]`, where each running sequence owns one slot of C positions and
`pos_SC` records the absolute position each position holds (-1 = empty), so masks come from
positions alone, as in `mixlab.cache`. Token at position p goes to index p % C: with C >= the
longest sequence the slot is static; for a sliding-window model C = window + prefill_chunk - 1
and the slot is a rolling buffer (a chunk never evicts keys its own queries still need). The pool's
size is a byte budget (`cache_bytes`); when every slot is taken, new requests wait.

A finished sequence's slot keeps its keys and values until another request needs it: a new prompt
that begins with the tokens a free slot holds (the earlier turns of a chat) takes that slot and
skips prefilling them (prefix reuse; a rolling slot that wrapped around holds no whole prefix). A
running sequence's prefix is shared too, by copying its keys and values into the new slot
(`copy_prefix`; the engine's `_admit` decides).

A step (`forward`) runs every item of every sequence in one pass: each weight matrix multiplies
the N tokens of the step at once (one decoding token per sequence plus prompt chunks), so a dense
weight is streamed once per step for all rows and each expert once for all its tokens
(`moe_ffn`: the native kernel up to 64 tokens); attention runs per sequence: the decoding rows
together (single-query attention over their gathered slots), each prompt chunk through SDPA.
A step with a single decoding token and nothing else runs the whole model in one native call
(`mixlab.model.native.NativeDecoder` over the sequence's slot), the fastest batch-1 path; any other
step, decoding tokens and prompt chunks mixed, also runs in one native call when the registry
chooses it for the step's token count (`decode_batch`: every weight streamed once for all the
step's tokens, each token attending over its own sequence's slot at its own position, causal inside
a chunk). The PyTorch pass below is the reference, and runs on GPUs and for larger steps.

LoRA adapters served over the base (`Runner(adapters=)`, `adapter_factors`' low-rank updates): a
step with rows under adapters runs in the same one native call (`decode_batch` with the decoder's
`lora_table` of every adapter and each row's adapter: after each product an adapter updates, its
rows get their update, base rows beside them none). Where that call cannot run them (no native
kernels, a GPU, more tokens than the registry gives it), the PyTorch pass is the fallback and the
reference: its items ordered by adapter, so that each adapter's rows are one range, each weight's
product followed by every adapter's update added to its slice (`StepAdapters.add`; no gather or
scatter); the feed-forward block of a layer an adapter adapts runs the router with the updates to
its logits, then the (token, slot) pairs grouped by expert, each adapter's pairs a range of its
expert's, the updates inside the SwiGLU (`_adapted_ffn`). The products of a few rows read the native
decoder's panels of a bf16 weight where it keeps them (`_product`), as its own steps do. Over int4
weights whose activations are rounded to int8 (`int4_activations`, the default), the PyTorch
pass rounds them the same way before each int4 product (`ops.quant.rounds_activations`: a step of
more tokens than the native call takes), as a native step does whatever its row count (decode.c's
`gemm_panels_a8` for 64 rows or more: the integer sums of the few-row kernels), so the two compute
the same products. A slot's keys hold the adapter they were computed under: prefix reuse only within
one adapter.

Shape legend: N tokens of a step, S slots, C positions per slot, G kv heads, H query heads,
Hd head dim, D width, T tokens of one item, V vocabulary, L layers, K experts per token, E experts;
for the adapters: R an adapter's rank, I / X a weight's input / output width, F expert FFN width,
n the rows of one expert.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from mixlab import pages
from mixlab.cache import KVCache
from mixlab.checkpoint.adapter import LowRank
from mixlab.config import format_bytes
from mixlab.dtypes import dtype_name
from mixlab.engine.cuda_graphs import GraphedDecode
from mixlab.engine.sampling import row_argmax
from mixlab.model.inference import inference_format
from mixlab.model.layers import apply_rope, attention_mask, rope_cos_sin, training_sdpa
from mixlab.model.memory import available_memory
from mixlab.model.moe import MoEBlock, Routing
from mixlab.model.native import LoraTable, NativeDecoder, shared_decoder
from mixlab.model.transformer import Block, Transformer
from mixlab.ops import native as native_lib
from mixlab.ops import registry
from mixlab.ops.attention import single_query_attention
from mixlab.ops.linear import linear
from mixlab.ops.moe import combine, dispatch
from mixlab.ops.quant import rounds_activations
from mixlab.ops.swiglu import swiglu

DEFAULT_CACHE_BYTES = 2 * 2**30


@dataclass
class Item:
    """One sequence's share of a step: `tokens` at positions start, start+1, ...; which logits to
    return ("none", "last" or "all") and whether to return the last position's experts."""

    slot: int
    tokens: list[int]
    start: int
    logits: str = "last"
    experts: bool = False
    adapter: str | None = None  # the LoRA adapter the sequence runs under (`Runner.adapters`), or the base
    draft: int = 0  # the last `draft` tokens are a speculative draft (`Engine._verify`): see `forget`


@dataclass
class Result:
    logits_TV: torch.Tensor | None  # float32; [1, V] for "last", [T, V] for "all"
    experts_LK: torch.Tensor | None  # the last position's experts
    argmax: int | None = None  # the last row's argmax when the step computed it (NaN-free rows only)


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens `a` and `b` share, at most `limit` (slices compare at C speed: a long
    prompt is searched in O(n log n) element comparisons without a Python loop over its tokens)."""
    lo, hi = 0, max(min(len(a), len(b), limit), 0)
    while lo < hi:  # a[:lo] == b[:lo] holds throughout
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def bytes_per_token(model: Transformer) -> int:
    cfg = model.config
    elem = model.tok_embeddings.weight.element_size()
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * elem


class StepAdapters:
    """The LoRA adapters of a step's rows, which `Runner.forward` orders by adapter: row n runs under
    adapter `owner[n]` (non-decreasing), an index into `factors` (each adapter's `adapter_factors`),
    or -1: the base model. Each adapter's rows are then one range (`spans`), so its updates are added
    to slices of a product: no gather, no scatter (a bf16 `index_add_` on CPU is slow)."""

    def __init__(self, factors: list[dict[str, LowRank]], owner: list[int],
                 panels: dict[tuple[int, str], torch.Tensor] | None = None) -> None:
        self.factors, self.owner = factors, owner
        self.spans = _spans(owner)
        # the native decoder's copies of the bf16 weights in panels (`NativeDecoder.panels`), read by `_product`
        self.panels = panels or {}
        self._owner_N: torch.Tensor | None = None

    def select(self, rows: list[int]) -> StepAdapters:
        """The same for the rows `rows` (ascending) alone, in that order."""
        return StepAdapters(self.factors, [self.owner[r] for r in rows], self.panels)

    def touches(self, prefix: str) -> bool:
        """Whether an adapter updates a weight whose name starts with `prefix`."""
        return any(name.startswith(prefix) for f in self.factors for name in f)

    def owner_N(self, device: torch.device) -> torch.Tensor:
        if self._owner_N is None:
            self._owner_N = torch.tensor(self.owner, device=device, dtype=torch.long)
        return self._owner_N

    def add(self, name: str, x_NI: torch.Tensor, y_NX: torch.Tensor, expert: int | None = None,
            spans: list[tuple[int, int, int]] | None = None) -> torch.Tensor:
        """`y_NX` (= x_NI times weight `name`, or expert `expert` of that stacked weight) with each adapter's
        update on its rows (`spans`: (adapter, first row, end row), by default the step's), y += (x A^T) B^T,
        computed in float32 and rounded once; in place, returned."""
        for j, a, b in self.spans if spans is None else spans:
            lr = self.factors[j].get(name)
            if lr is not None:
                A_RI, B_XR = (lr.A, lr.B) if expert is None else (lr.A[expert], lr.B[expert])
                y_NX[a:b] += (x_NI[a:b].float() @ A_RI.T) @ B_XR.T
        return y_NX


def _spans(owner: list[int]) -> list[tuple[int, int, int]]:
    """The runs of equal adapters in `owner` (non-decreasing) as (adapter, first row, end row); base
    rows (-1) have none."""
    out: list[tuple[int, int, int]] = []
    for i, j in enumerate(owner):
        if j >= 0:
            out.append((j, out.pop()[1] if out and out[-1][0] == j else i, i + 1))
    return out


def _product(x_NI: torch.Tensor, w_XI: torch.Tensor, scale_X: torch.Tensor | None = None,
             panels_XI: torch.Tensor | None = None, act8: bool = False) -> torch.Tensor:
    """`ops.linear.linear` (`act8`: int4 weights times x rounded to int8); where it runs the native
    kernel (a few rows) on a bf16 weight the native decoder keeps in panels too, the kernel reads the
    panels (`native.linear_packed`): one stream per panel serves every row, as in the engine's native
    step (a row is read once per group of 4 rows)."""
    if panels_XI is not None and registry.linear_impl(x_NI, w_XI, scale_X) == "native":
        return native_lib.linear_packed(x_NI, w_XI, panels_XI)
    return linear(x_NI, w_XI, scale_X, act8=act8)


def _lin(mod: nn.Module, x_ND: torch.Tensor, ad: StepAdapters | None = None, name: str = "",
         key: tuple[int, str] | None = None) -> torch.Tensor:
    """A model linear on N rows: plain `nn.Linear` weights through `ops.linear` (the native kernel
    for a few rows, without preparing the model); prepared linears run themselves. `ad`: plus the
    step's adapters' updates of weight `name` (`layers.0.attn.wo.weight`) on their rows, the product
    read from the weight's panels `ad.panels[key]` if any."""
    if ad is None:
        return linear(x_ND, mod.weight) if type(mod) is nn.Linear else mod(x_ND)
    P = None if key is None else ad.panels.get(key)
    y_NX = _product(x_ND, mod.weight, None, P) if type(mod) is nn.Linear else mod(x_ND)
    return ad.add(name, x_ND, y_NX)


def _adapted_ffn(block: Block, li: int, x_1ND: torch.Tensor, ad: StepAdapters,
                 rows: list[int] | None) -> tuple[torch.Tensor, Routing | None]:
    """`Block.feed_forward` (`feed_forward_rows` for the rows `rows` alone) with each row's adapter's
    updates: to the router's logits (every row routed, as `Router.forward` does), then inside the
    SwiGLU of the dense FFN or of each expert, for any format of resident experts (`ops.linear.linear`
    with their scales). The experts run on the (token, slot) pairs grouped by expert (`ops.moe.dispatch`,
    which keeps the rows' order inside each expert's segment, so each adapter's pairs are one range
    of it), one product per expert and projection and one update per expert and adapter, then
    `ops.moe.combine`."""
    p, ffn = f"layers.{li}.ffn.", block.ffn
    x_ND = x_1ND[0]
    h_ND = block.ffn_norm(x_ND)
    routing = None
    if isinstance(ffn, MoEBlock):
        routing = ffn.gate.routing(ad.add(p + "gate.weight", h_ND, F.linear(h_ND.float(), ffn.gate.weight.float())))
    if rows is not None:
        rows_R = torch.tensor(rows, device=x_ND.device, dtype=torch.long)
        x_ND, h_ND, ad = x_ND[rows_R], h_ND[rows_R], ad.select(rows)
    if not isinstance(ffn, MoEBlock):
        a_NF = swiglu(_lin(ffn.w13, h_ND, ad, p + "w13.weight", (li, "w13")))
        return (x_ND + _lin(ffn.w2, a_NF, ad, p + "w2.weight", (li, "w2")))[None], None
    assert routing is not None
    idx_NK, weight_NK = (routing.idx_TK, routing.weight_TK) if rows is None else \
        (routing.idx_TK[rows_R], routing.weight_TK[rows_R])
    E, J = ffn.experts.num_experts, len(ad.factors)
    xs_nD, d = dispatch(h_ND, idx_NK, E)
    # pairs per expert and adapter (column 0: the base's), in one bincount
    key_NK = idx_NK * (J + 1) + ad.owner_N(h_ND.device)[:, None] + 1
    counts_EJ = torch.bincount(key_NK.reshape(-1), minlength=E * (J + 1)).view(E, J + 1).tolist()
    w = ffn.experts.weights()
    act8 = rounds_activations(ffn.experts)  # int4 experts times int8-rounded activations, as native steps
    P13, P2 = ad.panels.get((li, "w13")), ad.panels.get((li, "w2"))
    ys: list[torch.Tensor] = []
    start = 0
    for e, counts in enumerate(counts_EJ):
        n = sum(counts)
        if n == 0:
            continue
        ends = list(accumulate(counts))  # the base's pairs first, then each adapter's
        spans = [(j, ends[j], ends[j + 1]) for j in range(J) if counts[j + 1]]
        xs = xs_nD[start : start + n]
        s13 = None if w.w13_scale is None else w.w13_scale[e]
        s2 = None if w.w2_scale is None else w.w2_scale[e]
        h_n2F = _product(xs, w.w13[e], s13, None if P13 is None else P13[e], act8)
        a_nF = swiglu(ad.add(p + "experts.w13", xs, h_n2F, e, spans))
        ys_nD = _product(a_nF, w.w2[e], s2, None if P2 is None else P2[e], act8)
        ys.append(ad.add(p + "experts.w2", a_nF, ys_nD, e, spans))
        start += n
    if not ys:  # no rows
        return x_ND[None], routing
    ys_nD = torch.cat(ys) if len(ys) > 1 else ys[0]
    return (x_ND + combine(ys_nD, weight_NK, d, x_ND.dtype))[None], routing


class Runner:
    """The slot pool and the batched forward pass (see the module docstring).

    `max_seq_len`: positions per sequence (default: the model's context, or as many as
    `cache_bytes` allows for `max_batch` sequences); `cache_bytes`: the pool's budget (default
    2 GiB at most), giving min(max_batch, cache_bytes // slot bytes) slots; `pack_weights`: see
    `Engine` (the panels belong to the model's native decoder, shared by every engine over it:
    False never packs, it does not unpack what another engine packed). `adapters`: LoRA adapters by
    name (`adapter_factors`), for the items that name one.
    """

    def __init__(self, model: Transformer, *, max_batch: int, cache_bytes: int | None, prefill_chunk: int,
                 max_seq_len: int | None, prefix_cache: bool, pack_weights: bool | None = None,
                 batch_invariant: bool = False, adapters: dict[str, dict[str, LowRank]] | None = None) -> None:
        cfg = model.config
        self.model = model
        self.adapters = adapters or {}
        self.per_token = bytes_per_token(model)
        w = model.tok_embeddings.weight
        self.dtype, self.device = w.dtype, w.device
        if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                        or not 1 < max_seq_len <= cfg.max_seq_len):
            raise ValueError(f"invalid max_seq_len={max_seq_len!r}: expected an integer in [2, {cfg.max_seq_len}]")
        if cache_bytes is not None and (isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int)
                                        or cache_bytes < 1):
            raise ValueError(f"invalid cache_bytes={cache_bytes!r}: expected a positive integer")
        budget = DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes
        window = cfg.sliding_window

        def capacity(n: int) -> int:  # positions a slot holds for sequences of up to n tokens
            return n if window is None else min(n, window + prefill_chunk - 1)

        if max_seq_len is None:
            max_seq_len = cfg.max_seq_len
            while capacity(max_seq_len) * self.per_token * max_batch > budget and max_seq_len > 2:
                max_seq_len //= 2
            most = budget // (capacity(max_seq_len) * self.per_token)
            if 0 < most < max_batch:  # ran fewer, each of 2 tokens: no request fits
                raise ValueError(f"max_batch={max_batch} sequences cannot fit in the KV cache's "
                                 f"{format_bytes(budget)} (cache_bytes), even of 2 tokens each: at most {most}")
        self.max_len = max_seq_len
        C = capacity(max_seq_len)
        self.slot_bytes = C * self.per_token
        S = min(max_batch, budget // self.slot_bytes)
        if S < 1:
            raise ValueError(f"cache_bytes={budget} cannot hold one sequence of {max_seq_len} tokens "
                             f"({self.slot_bytes} bytes): raise cache_bytes or lower max_seq_len")
        self.n_slots, self.capacity = S, C
        self.total_bytes = S * self.slot_bytes
        free = available_memory() if self.device.type == "cpu" else 0
        if free and self.total_bytes > free:  # zeroed below: the machine would swap or kill a process
            raise ValueError(f"a KV cache of {format_bytes(self.total_bytes)} ({S} sequences of {C} positions, "
                             f"cache_bytes={budget}) cannot fit: {format_bytes(free)} of memory is available; at "
                             f"most cache_bytes={free}")
        shape = (S, cfg.n_kv_heads, C, cfg.head_dim)
        self.k = [pages.zeros(shape, self.dtype, self.device) for _ in range(cfg.n_layers)]  # 2 MiB pages on CPU
        self.v = [pages.zeros(shape, self.dtype, self.device) for _ in range(cfg.n_layers)]
        self.pos_SC = torch.full((S, C), -1, dtype=torch.long, device=self.device)
        self.prefix_cache = prefix_cache
        if self.device.type == "cpu":
            # An engine is an inference entry point (`generate`, `chat` and `serve` run through it),
            # so, like `prepare_for_inference`, it builds (once, cached) and loads the native kernels:
            # `load_model` + `generate` gets the fast path without a preparation call. Forward passes
            # and training never do (`ops.registry`).
            registry.prepare_native()
        self.free_slots: OrderedDict[int, list[int]] = OrderedDict((s, []) for s in range(S))  # LRU first
        self._slot_adapter: dict[int, str | None] = {}  # the adapter a free slot's keys were computed under
        self._last_idx: torch.Tensor | None = None  # the last step's experts [L, N, K]
        self._load_pending: list[torch.Tensor] = []  # steps' experts not yet counted into _load_LE
        self._load_lock = threading.Lock()  # `expert_load` is read from other threads (metrics)
        self._drafts: dict[int, tuple[int, torch.Tensor]] = {}  # slot -> a draft's first position, its experts
        moe = model.config.moe
        self._load_LE = torch.zeros(cfg.n_layers if moe else 0, moe.num_experts if moe else 0, dtype=torch.long)
        self._views: dict[int, KVCache] = {}
        if pack_weights is not None and not isinstance(pack_weights, bool):
            raise ValueError(f"invalid pack_weights={pack_weights!r}: expected True, False or None (automatic)")
        if not isinstance(batch_invariant, bool):
            raise ValueError(f"invalid batch_invariant={batch_invariant!r}: expected True or False")
        if batch_invariant and pack_weights:
            raise ValueError("pack_weights=True has no use with batch_invariant=True (its steps never read the panels)")
        self.batch_invariant = batch_invariant
        self.pack_weights = False if batch_invariant else pack_weights
        self.packed_bytes = 0  # what the decoder keeps in panels (`NativeDecoder.pack`), once packed
        self._native: NativeDecoder | None = None
        self._native_stale = True  # look the decoder up again before the next native step
        self._adapter_names = sorted(self.adapters)  # a native step's adapter j: the j-th name
        self._lora: tuple[NativeDecoder | None, LoraTable | None] = (None, None)  # (decoder, its table)
        self.graphed: GraphedDecode | None = None
        if self.device.type == "cuda" and native_lib.env_on("MIXLAB_CUDA_GRAPHS"):
            self.graphed = GraphedDecode(self)
        if batch_invariant:  # every step through the native kernels' invariant arithmetic: check they run
            dec = self._native_decoder() if self.device.type == "cpu" else None
            if dec is None or dec.weight.dtype not in (torch.bfloat16, torch.float32):
                fmt = inference_format(model)
                kernels = ((f"over {fmt} matrices" if fmt in ("int8", "int4") else f"over {dec.weight.dtype}")
                           if dec is not None else "without a whole-model step: the experts are offloaded"
                           if fmt == "offloaded" else "unavailable")
                if (dec is None and self.device.type == "cpu" and native_lib.library() is not None
                        and w.dtype in (torch.bfloat16, torch.float32) and not native_lib.fast(w.dtype)):
                    # built, but refused over these weights: this CPU lacks the instructions they need
                    kernels = (f"not vectorised for {w.dtype} on this CPU: they need AVX-512"
                               f"{' and AVX512-BF16' if w.dtype == torch.bfloat16 else ''}")
                raise ValueError("batch_invariant=True needs mixlab's native CPU kernels over bf16 or float32 weights "
                                 f"(here: device {self.device.type}, weights {w.dtype}, native kernels {kernels}); "
                                 "int8/int4 and GPU steps have no batch-invariant arithmetic")
        if pack_weights:  # asked for: panels no step would read (it did nothing, silently) are refused
            # the decoder the steps will use, not packed yet (`prepare` or the first step packs it)
            dec = (model.native_decoder or shared_decoder(model)) if self.device.type == "cpu" else None
            if dec is None or not dec.packable_bytes():
                fmt = inference_format(model)
                why = ("its experts are offloaded: no native decoder" if fmt == "offloaded"
                       else f"its matrices are {fmt}" if fmt in ("int8", "int4")
                       else f"its weights are {dtype_name(w.dtype)}" if w.dtype != torch.bfloat16
                       else f"no native kernels run its steps (device {self.device.type})" if dec is None
                       else "this CPU's bf16 kernels take no panels (they need AVX512-BF16)")
                raise ValueError(f"pack_weights=True keeps bf16 weights a second time in the native kernels' panels, "
                                 f"but this model has none to keep ({why}); pass None (automatic) or False")

    # ---- slots ----

    def used_bytes(self) -> int:
        return (self.n_slots - len(self.free_slots)) * self.slot_bytes

    def allocate(self, prompt: list[int], need: int, *, reuse: bool | dict[int, int],
                 adapter: str | None = None) -> tuple[int, int] | None:
        """A free slot for a sequence of up to `need` tokens and how many prompt tokens it already
        holds (the longest shared prefix among free slots, leaving at least one token to run), or
        None when every slot is taken. `reuse` as a dict: the most tokens each free slot it names
        may give (slots it does not name give none). Only keys computed under the same `adapter`
        (None: the base model) are reused."""
        if not self.free_slots:
            return None
        if len(self.free_slots) == self.n_slots:
            self._native_stale = True  # a batch starts: the weights may have changed since the last
        best, best_n = next(iter(self.free_slots)), 0  # default: the least recently used
        if reuse and self.prefix_cache:
            for s, held in self.free_slots.items():
                if self._slot_adapter.get(s) != adapter:
                    continue
                n = common_prefix(held, prompt, len(prompt) - 1)
                if isinstance(reuse, dict):
                    n = min(n, reuse.get(s, 0))
                if n > best_n:
                    best, best_n = s, n
        del self.free_slots[best]
        self.pos_SC[best, best_n:] = -1  # an unwrapped slot holds token i at index i
        if best_n == 0:
            self.pos_SC[best] = -1
        return best, best_n

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Give slot `dst` the keys and values of positions 0..n-1 that slot `src` holds (a running
        sequence whose slot has not wrapped around: position i sits at index i)."""
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]
        self.pos_SC[dst, :n] = self.pos_SC[src, :n]

    def free(self, slot: int, tokens: list[int], adapter: str | None = None) -> None:
        """Give the slot back; it keeps `tokens` (those written to it under `adapter`) for prefix reuse."""
        self.free_slots[slot] = list(tokens) if len(tokens) <= self.capacity and self.prefix_cache else []
        self._slot_adapter[slot] = adapter

    def forget(self, slot: int, start: int, end: int) -> None:
        """After a step that verified a speculative draft in `slot` (`Engine._verify`): mark positions
        start..end-1, its rejected tokens, which plain decoding never ran, empty, and count the experts
        of the draft's tokens before `start` (the kept ones; `record_experts` held them back), so the
        expert load is plain decoding's. In a rolling slot the rejected indices held positions C
        earlier, which no later query's window reaches (a draft, like a chunk, is shorter than
        prefill_chunk), so masks from positions see what plain decoding's would."""
        held = self._drafts.pop(slot, None)
        if held is not None and start > held[0]:
            self._count_load(held[1][:, : start - held[0]])
        if end > start:
            self.pos_SC[slot, torch.arange(start, end, device=self.device) % self.capacity] = -1

    # ---- the forward pass ----

    def forward(self, items: list[Item]) -> list[Result]:
        adapted = [it.adapter is not None for it in items]
        if any(adapted):
            outs = self._native_batch(items)  # each row's adapter's updates inside the one native call
            if outs is not None:
                return outs
            # else the PyTorch pass with the adapters' updates: the reference, and where native cannot run
            # items ordered by adapter, the base's first (`StepAdapters`); results in the items' order
            order = sorted(range(len(items)), key=lambda i: (items[i].adapter is not None, items[i].adapter or ""))
            results = dict(zip(order, self._batched([items[i] for i in order]), strict=True))
            return [results[i] for i in range(len(items))]
        if self.batch_invariant:  # one kernel family for every step, whatever its tokens (`mx_batch.invariant`)
            outs = self._native_batch(items, invariant=True) if items else []
            if outs is None:
                raise RuntimeError("batch_invariant: the native kernels are not available for this step")
            return outs
        if self.graphed is not None and items and all(len(it.tokens) == 1 for it in items):
            return self.graphed.decode(items)  # CUDA: decode-only steps replay a recorded graph
        if len(items) == 1 and len(items[0].tokens) == 1:
            out = self._native_step(items[0])
            if out is not None:
                return [out]
        elif items:
            outs = self._native_batch(items)
            if outs is not None:
                return outs
        return self._batched(items)

    def _native_decoder(self) -> NativeDecoder | None:
        """A `NativeDecoder` over the model's weights: the model's own when prepared, else one kept
        for the model (`native.shared_decoder`), looked up again when a batch starts in an empty
        pool (the model can be trained between batches, not while sequences run over its cache)."""
        own = self.model.native_decoder
        if own is not None:
            if self._native is not own:
                self._native = own
                self._pack(own)
            return own
        if self._native_stale:
            dec = shared_decoder(self.model) if self.device.type == "cpu" else None
            if dec is not None and dec is not self._native:
                self._pack(dec)
            self._native = dec
            self._native_stale = False
        return self._native

    def prepare(self) -> None:
        """Look up the native decoder now (packing its weights, `pack_weights`): what the first step
        would otherwise do."""
        if self.device.type == "cpu" and len(self.free_slots) == self.n_slots:
            self._native_decoder()

    def adapters_run_natively(self) -> bool:
        """Whether the adapters' rows get their updates inside the native step (`_native_batch`), as
        a step's rows do on CPU; False where the PyTorch pass runs them (no native kernels, a GPU, an
        adapter the native step cannot update). Builds the adapters' table the first such step would."""
        dec = self._native_decoder() if self.adapters and len(self.free_slots) == self.n_slots else None
        if dec is None:
            return False
        if self._lora[0] is not dec:
            self._lora = (dec, dec.lora_table([self.adapters[n] for n in self._adapter_names]))
        return self._lora[1] is not None

    def _pack(self, dec: NativeDecoder) -> None:
        """Keep the decoder's bf16 weights in panels too (`NativeDecoder.pack`) when `pack_weights`
        says so, or (None) when several sequences share the steps (one sequence decodes through the
        batch-1 step, which reads the rows) and the copy takes at most half of the memory available
        now."""
        want = self.pack_weights
        if want is None:
            need = dec.packable_bytes()
            want = self.n_slots > 1 and 0 < need <= available_memory() // 2
        if want:
            try:
                self.packed_bytes = dec.pack()
            except MemoryError as e:  # the rows still work: slower steps, not a failed request
                warnings.warn(f"mixlab engine: {e}; the engine steps read the rows instead", stacklevel=2)

    def _native_step(self, it: Item) -> Result | None:
        dec = self._native_decoder()
        if dec is None or not dec.chooses(1, self.device.type):
            return None
        view = self._views.get(it.slot)
        if view is None:
            s = it.slot
            view = KVCache.over(self.model.config, [k[s : s + 1] for k in self.k], [v[s : s + 1] for v in self.v],
                                self.pos_SC[s : s + 1], max_len=self.max_len)
            self._views[it.slot] = view
        view.t = it.start
        logits_1V, chosen_LK, top = dec.step_top(it.tokens[0], it.start, view)
        if self.model.config.moe is not None:
            self.record_experts(chosen_LK[:, None])
        return Result(logits_1V if it.logits != "none" else None, chosen_LK.long() if it.experts else None, top)

    def _native_batch(self, items: list[Item], *, invariant: bool = False) -> list[Result] | None:
        """A step (decoding tokens and prompt chunks) in one native call over the slot pool, when the
        registry chooses it for the step's token count (always with `invariant`: batch-invariant
        arithmetic); None otherwise. Rows under LoRA adapters get their updates in the same call
        (`NativeDecoder.lora_table`, built once per decoder); None where it cannot hold the adapters."""
        dec = self._native_decoder()
        n_tokens = sum(len(it.tokens) for it in items)
        if dec is None or (not invariant and registry.choose(
                "decode_batch", device=self.device.type, tokens=n_tokens, training=False,
                fmt=registry.weight_format(dec.weight), dtype=dec.weight.dtype, act_dtype=self.dtype,
                panels=bool(dec.panels())) != "native"):
            return None
        lora, adapter = None, None
        if any(it.adapter is not None for it in items):
            if self._lora[0] is not dec:
                self._lora = (dec, dec.lora_table([self.adapters[n] for n in self._adapter_names]))
            lora = self._lora[1]
            if lora is None or torch.compiler.is_compiling():
                return None
            adapter = [-1 if it.adapter is None else self._adapter_names.index(it.adapter)
                       for it in items for _ in it.tokens]
        tokens: list[int] = []
        pos: list[int] = []
        seq: list[int] = []
        rows: list[int] = []
        spans: list[tuple[int, int] | None] = []  # each item's logit rows in the output
        last: list[int] = []  # each item's last token's row
        for it in items:
            T, a = len(it.tokens), len(tokens)
            tokens += it.tokens
            pos += range(it.start, it.start + T)
            seq += [it.slot] * T
            last.append(a + T - 1)
            if it.logits == "none":
                spans.append(None)
                continue
            r = range(a, a + T) if it.logits == "all" else [a + T - 1]
            spans.append((len(rows), len(rows) + len(r)))
            rows += r
        if torch.compiler.is_compiling() and not invariant:
            logits_RV, chosen_LTK = torch.ops.mixlab.decode_batch(
                dec.handle, torch.tensor(tokens), torch.tensor(pos), torch.tensor(seq),
                torch.tensor(rows, dtype=torch.long), self.pos_SC, self.k, self.v)
            tops = row_argmax(logits_RV)
        else:  # eager: call C directly (the operator's dispatch costs ~0.1 ms a step)
            logits_RV = torch.empty(len(rows), dec.vocab_size, dtype=torch.float32)
            chosen_LTK = torch.empty(dec.n_layers, len(tokens), dec.top_k, dtype=torch.int32)
            tops = dec.batch(tokens, pos, seq, rows, self.pos_SC, self.k, self.v, logits_RV, chosen_LTK,
                             invariant=invariant, lora=lora, adapter=adapter)
        if self.model.config.moe is not None:
            self.record_experts(chosen_LTK, items)
        return [Result(logits_RV[span[0] : span[1]] if span is not None else None,
                       chosen_LTK[:, t].long() if it.experts and self.model.config.moe is not None else None,
                       tops[span[1] - 1] if span is not None else None)
                for it, span, t in zip(items, spans, last, strict=True)]

    # ---- expert load (what `/metrics` reports) ----

    def record_experts(self, idx_LNK: torch.Tensor, items: Sequence[Item] = ()) -> None:
        """Note a step's experts `[L, N, K]` (a tensor the caller no longer writes to; `items`: the
        step's items in the order of its N rows). A draft's rows (`Item.draft`) are held back until
        `forget` says which of its tokens were kept: the load counts the tokens the sequences keep, so
        the same output leaves the same load with and without speculation. Counting is deferred
        (`expert_load`): a bincount per step costs ~0.1 ms after a native step has streamed the
        weights through the caches, ~1% of a batch-1 step."""
        self._last_idx = idx_LNK
        if any(it.draft for it in items):
            keep_N = torch.ones(idx_LNK.shape[1], dtype=torch.bool, device=idx_LNK.device)
            end = 0
            for it in items:
                end += len(it.tokens)
                if it.draft:
                    self._drafts[it.slot] = (it.start + len(it.tokens) - it.draft, idx_LNK[:, end - it.draft : end])
                    keep_N[end - it.draft : end] = False
            idx_LNK = idx_LNK[:, keep_N]
        self._count_load(idx_LNK)

    def _count_load(self, idx_LNK: torch.Tensor) -> None:
        with self._load_lock:
            self._load_pending.append(idx_LNK)
            if len(self._load_pending) >= 256:
                self._fold_load()

    def _fold_load(self) -> None:
        if self._load_pending:
            L = self._load_LE.shape[0]
            flat = torch.cat([t.reshape(L, -1).to(device="cpu", dtype=torch.long) for t in self._load_pending], dim=1)
            self._load_LE += self._counts(flat)
            self._load_pending.clear()

    def expert_load(self) -> torch.Tensor:
        """Tokens sent to each expert of each layer `[L, E]` since the runner was made (thread-safe)."""
        with self._load_lock:
            self._fold_load()
            return self._load_LE.clone()

    @property
    def last_counts_LE(self) -> torch.Tensor | None:
        """The last step's tokens per expert per layer `[L, E]`, or None (a dense model, no step yet)."""
        return self._counts(self._last_idx) if self._last_idx is not None else None

    def _counts(self, idx_LNK: torch.Tensor) -> torch.Tensor:
        moe = self.model.config.moe
        assert moe is not None
        E = moe.num_experts
        L = idx_LNK.shape[0]
        flat = (idx_LNK.reshape(L, -1).long().cpu() + torch.arange(L)[:, None] * E).reshape(-1)
        return torch.bincount(flat, minlength=L * E).view(L, E)

    def _step_adapters(self, items: list[Item]) -> StepAdapters | None:
        """The adapters of the step's rows (items ordered by adapter: `forward`), or None (base rows alone)."""
        names = sorted({it.adapter for it in items if it.adapter is not None})
        if not names:
            return None
        owner: list[int] = []
        for it in items:
            owner += [-1 if it.adapter is None else names.index(it.adapter)] * len(it.tokens)
        dec = self._native_decoder() if self.device.type == "cpu" else None
        return StepAdapters([self.adapters[n] for n in names], owner, dec.panels() if dec is not None else None)

    def _batched(self, items: list[Item]) -> list[Result]:
        model, cfg = self.model, self.model.config
        C, dev = self.capacity, self.device
        H, G, Hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        tokens: list[int] = []
        pos: list[int] = []
        slot: list[int] = []
        for it in items:
            tokens += it.tokens
            pos += range(it.start, it.start + len(it.tokens))
            slot += [it.slot] * len(it.tokens)
        N = len(tokens)
        ad = self._step_adapters(items)
        tokens_N = torch.tensor(tokens, device=dev)
        pos_N = torch.tensor(pos, device=dev)
        slot_N = torch.tensor(slot, device=dev)
        idx_N = pos_N % C
        self.pos_SC[slot_N, idx_N] = pos_N
        # Rows of the flattened [S * G * C, Hd] pool each token's key/value heads go to (one index_copy_).
        rows_X = ((slot_N[:, None] * G + torch.arange(G, device=dev)) * C + idx_N[:, None]).reshape(-1)
        # Rows of the step: decoding rows (one token) attend together, each chunk on its own.
        offsets, o = [], 0
        for it in items:
            offsets.append(o)
            o += len(it.tokens)
        single = [i for i, it in enumerate(items) if len(it.tokens) == 1]
        chunks = [i for i, it in enumerate(items) if len(it.tokens) > 1]
        s_rows = torch.tensor([offsets[i] for i in single], device=dev)
        s_slots = torch.tensor([items[i].slot for i in single], device=dev)
        s_pos = pos_N[s_rows] if single else pos_N[:0]
        s_n = min(C, max((items[i].start + 1 for i in single), default=0))
        s_mask = None
        if single:
            s_mask = attention_mask(s_pos[:, None], self.pos_SC[s_slots, :s_n], cfg.sliding_window)
        c_masks = []
        for i in chunks:
            it = items[i]
            n = min(C, it.start + len(it.tokens))
            q_pos = pos_N[offsets[i] : offsets[i] + len(it.tokens)]
            c_masks.append(attention_mask(q_pos[None], self.pos_SC[it.slot : it.slot + 1, :n], cfg.sliding_window))

        # The rows whose logits are wanted: the last layer's feed-forward block runs for them alone
        # (the other rows only leave keys and values; they are still routed), as `mx_decode_batch`.
        rows: list[int] = []
        spans: list[tuple[int, int] | None] = []
        for i, it in enumerate(items):
            T, a = len(it.tokens), offsets[i]
            if it.logits == "none":
                spans.append(None)
                continue
            r = list(range(a, a + T)) if it.logits == "all" else [a + T - 1]
            spans.append((len(rows), len(rows) + len(r)))
            rows += r
        rows_R = torch.tensor(rows, device=dev, dtype=torch.long)
        some = len(rows) < N

        x_ND = model.tok_embeddings(tokens_N)
        cos, sin = rope_cos_sin(pos_N[None], Hd, cfg.rope_theta, x_ND.dtype)  # [1, N, 1, Hd]
        routed: list[torch.Tensor] = []
        last_layer = len(model.layers) - 1
        for li, block in enumerate(model.layers):
            assert isinstance(block, Block)
            attn = block.attn
            h_ND = block.attn_norm(x_ND)
            qkv_NX = _lin(attn.wqkv, h_ND, ad, f"layers.{li}.attn.wqkv.weight", (li, "wqkv"))
            qk_NX, v_NX = qkv_NX.split([(H + G) * Hd, G * Hd], dim=-1)
            q_NHHd, k_NGHd = apply_rope(qk_NX.view(1, N, H + G, Hd), cos, sin)[0].split([H, G], dim=1)
            kc, vc = self.k[li], self.v[li]
            kc.view(-1, Hd).index_copy_(0, rows_X, k_NGHd.reshape(N * G, Hd).to(kc.dtype))
            vc.view(-1, Hd).index_copy_(0, rows_X, v_NX.reshape(N * G, Hd).to(vc.dtype))
            y_NHHd = torch.empty_like(q_NHHd)
            if single:
                q_B1 = q_NHHd[s_rows][:, :, None]  # [B, H, 1, Hd]
                k_B = kc[:, :, :s_n].index_select(0, s_slots)
                v_B = vc[:, :, :s_n].index_select(0, s_slots)
                y_NHHd[s_rows] = single_query_attention(q_B1, k_B, v_B, s_mask)[:, :, 0]
            for i, mask in zip(chunks, c_masks, strict=True):
                it = items[i]
                T, a = len(it.tokens), offsets[i]
                n = mask.shape[-1]
                q_1HTHd = q_NHHd[a : a + T].transpose(0, 1)[None]
                y = training_sdpa(q_1HTHd, kc[it.slot : it.slot + 1, :, :n], vc[it.slot : it.slot + 1, :, :n], mask)
                y_NHHd[a : a + T] = y[0].transpose(0, 1)
            x_1ND = (x_ND + _lin(attn.wo, y_NHHd.reshape(N, H * Hd), ad, f"layers.{li}.attn.wo.weight",
                                 (li, "wo")))[None]
            if ad is not None and ad.touches(f"layers.{li}.ffn."):
                x_1ND, routing = _adapted_ffn(block, li, x_1ND, ad, rows if li == last_layer and some else None)
            elif li == last_layer and some:
                x_1ND, routing = block.feed_forward_rows(x_1ND, rows_R)  # x_ND: the wanted rows, in order
            else:
                x_1ND, routing = block.feed_forward(x_1ND)
            x_ND = x_1ND[0]
            if routing is not None:
                routed.append(routing.idx_TK)
        if routed:
            self.record_experts(torch.stack(routed), items)

        # Output projection only where logits are wanted.
        logits_RV = None
        if rows:
            h_RD = model.norm(x_ND if some else x_ND[rows_R])
            logits_RV = _lin(model.output, h_RD, ad, "output.weight", (-1, "out")).float()
        out = []
        for i, it in enumerate(items):
            span = spans[i]
            logits = logits_RV[span[0] : span[1]] if span is not None and logits_RV is not None else None
            experts = None
            if it.experts and routed:
                last = offsets[i] + len(it.tokens) - 1
                experts = torch.stack([r[last] for r in routed])
            out.append(Result(logits, experts))
        return out
