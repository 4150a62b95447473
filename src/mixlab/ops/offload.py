"""Expert offloading: a byte-budgeted cache of experts read on demand from the checkpoint.

An `ExpertCache` holds one pool of `S` slots shared by every MoE layer, each slot one expert's
weights in one format (`SlotFormat`: plain float, int8 with row scales, int4 with group scales).
The pool tensors are stacked like a layer's resident experts (`w13` `[S, 2F, D]`, `w2` `[S, D, F]`,
scales `[S, ...]`), so a layer runs the same kernels as resident experts (the registry chooses
them) on the pool with its expert ids replaced by slot ids: nothing is copied to compute.

An `ExpertSource` fills a slot from disk (`mixlab.checkpoint.offload`: byte ranges of safetensors
or GGUF files, `pread`, no mmap, so file pages never count in the process's memory).

Eviction: LRU, or LFU (uses of each (layer, expert) over the whole run, ties broken by recency).
Prefetch (Eliseev & Mazur 2023, arXiv 2312.17238 §3.2): the next layer's router applied to the
current layer's hidden state guesses that layer's experts; a background thread reads them while
this layer computes. The disk is the bottleneck when experts are large (a 22 MB read takes ~20 ms,
a layer's compute ~4 ms), so a guess must never delay a read the computing thread waits for: the
prefetch thread reads in chunks of `CHUNK` bytes and, between chunks, stands aside while a demand
read runs and abandons its read (freeing the slot) once the guessed layer has started without
needing it. And guesses are read only while a read roughly fits in the compute it can hide behind:
the cache keeps running means of one expert's read time and of the time between one layer's
experts being ready and the next layer asking for its own; when a read takes much longer
(`MAX_READ_PER_WINDOW`), a guess saves at most that window while its read still takes disk time and
CPU (the copy out of the page cache) from the demand reads and the compute, so prefetch then only
counts the guesses it skips (BENCHMARKS.md "Expert offloading": 22 MB experts read in ~18 ms
against ~3 ms of compute per layer lost 10.4 -> 9.3 tokens/s; 99 MB Mixtral-sized experts read in
~50-60 ms against 25-65 ms gained 12-37%), and only while a read is long enough to be worth a
thread's hand-off (`MIN_PREFETCH_READ_S`). A guess still queued when its layer starts is dropped, and a guess never
evicts an expert the previous token used (with a budget of about top-k experts per layer there is
then no room to guess, and prefetch does nothing). Pinned slots (the experts of the layer computing now)
are never evicted, so the pool must hold one token's top-k experts; batches needing more distinct
experts than the pool holds run in passes.

Shape legend: S slots, E experts, D width, F expert FFN width, G scale groups per row.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from mixlab.config import format_bytes, parse_bytes
from mixlab.ops.quant import INT4_GROUPS, quantize_int4, quantize_int8
from mixlab.pages import huge_empty

POLICIES = ("lru", "lfu")
CHUNK = 1 << 20  # prefetch reads pause or stop between chunks: a demand read waits for at most one (~1 ms)
EWMA = 0.2  # weight of the newest sample in the running means of read time and compute window
# A prefetch costs the computing thread ~0.25 ms (thread hand-offs of the GIL, measured on 2 cores:
# the trained tiny model lost 337 -> 264 tokens/s with 3.2 prefetches per token whose reads took
# ~0.1 ms from the page cache): a shorter read is cheaper done when needed.
MIN_PREFETCH_READ_S = 5e-4
# A guess is read only while a read takes at most this many times the compute between two layers:
# a right guess then hides at least a third of its read. Measured: a random Mixtral-8x7B-shaped
# Q4_0 file (99 MB experts) decodes 0.215 -> 0.295 tokens/s reading every guess with reads of
# 60-66 ms and layers 62-68 ms apart, and 0.314 -> 0.351 (half of the experts cached, cold file,
# two runs each) with reads of 47-62 ms and layers 24-31 ms apart, where a gate at 2x read few
# guesses (+1%); a random 1024-wide bf16 model (22 MB experts read in 17.6 ms, layers 3.1 ms apart,
# 5.7x) loses 10.4 -> 9.3.
MAX_READ_PER_WINDOW = 3.0
KINDS = ("plain", "int8", "int4")

def _mean(mean: float | None, x: float) -> float:
    """A running mean (exponentially weighted) updated with `x`."""
    return x if mean is None else mean + EWMA * (x - mean)


@dataclass(frozen=True)
class SlotFormat:
    """How a slot holds one expert: `kind` plain (`dtype` weights), int8 (row scales in `dtype`) or
    int4 (float16 scales per `group` inputs). `dtype` is the model's float dtype: experts are
    converted to it before being quantised, as resident experts are."""

    kind: str
    dtype: torch.dtype
    group: int = 32

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown expert format {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind == "int4" and self.group not in INT4_GROUPS:
            raise ValueError(f"int4 group size must be one of {INT4_GROUPS}, not {self.group}")

    def shapes(self, dim: int, ffn_dim: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-slot shape and dtype of each pool tensor (w13, w2 and, when quantised, their scales)."""
        D, F = dim, ffn_dim
        if self.kind == "plain":
            return {"w13": ((2 * F, D), self.dtype), "w2": ((D, F), self.dtype)}
        if self.kind == "int8":
            return {"w13": ((2 * F, D), torch.int8), "w2": ((D, F), torch.int8),
                    "w13_scale": ((2 * F,), self.dtype), "w2_scale": ((D,), self.dtype)}
        G = self.group
        return {"w13": ((2 * F, D // 2), torch.uint8), "w2": ((D, F // 2), torch.uint8),
                "w13_scale": ((2 * F, D // G), torch.float16), "w2_scale": ((D, F // G), torch.float16)}

    def expert_bytes(self, dim: int, ffn_dim: int) -> int:
        return sum(math.prod(s) * d.itemsize for s, d in self.shapes(dim, ffn_dim).values())

    def fill(self, slot: Slot, w13_2FD: torch.Tensor, w2_DF: torch.Tensor) -> None:
        """Write one expert given as float matrices into `slot` (quantising as this format says,
        exactly as the resident formats quantise their stacked weights, row by row)."""
        self.fill_rows(slot, "w13", 0, w13_2FD)
        self.fill_rows(slot, "w2", 0, w2_DF)

    def fill_rows(self, slot: Slot, which: str, lo: int, rows_RD: torch.Tensor) -> None:
        """Write float rows `rows_RD` as rows lo.. of the slot's `which` ("w13" or "w2"): `fill` a few
        rows at a time (each row is quantised alone, so the bytes are the same), what a source that
        converts an expert in chunks calls (`GGUFSource.read`: no float copy of a whole expert)."""
        w, s = (slot.w13, slot.w13_scale) if which == "w13" else (slot.w2, slot.w2_scale)
        x, hi = rows_RD.to(self.dtype), lo + rows_RD.shape[0]
        if self.kind == "plain":
            w[lo:hi].copy_(x)
            return
        assert s is not None
        q, sc = quantize_int8(x) if self.kind == "int8" else quantize_int4(x, self.group)
        w[lo:hi].copy_(q)
        s[lo:hi].copy_(sc)


class Slot(NamedTuple):
    """Views of one slot of the pool (what a source writes)."""

    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale: torch.Tensor | None
    w2_scale: torch.Tensor | None


class Cancelled(Exception):
    """Raised by a prefetch read's `pause` callback: the guess is no longer wanted."""


Pause = Callable[[int], None]


class ExpertSource(Protocol):
    """Reads experts from a checkpoint. `read` fills `slot` with expert `expert` of MoE layer
    `layer` in `fmt` and returns the bytes it read from disk. Called from two threads at once.
    `pause` (prefetch reads), when given, is called after each chunk of at most `CHUNK` bytes read
    from disk with that chunk's size: it may block (a demand read is running) or raise `Cancelled`."""

    def read(self, layer: int, expert: int, fmt: SlotFormat, slot: Slot, *, pause: Pause | None = None) -> int: ...

    def close(self) -> None: ...


@dataclass
class CacheStats:
    """What the cache did: `hits` / `misses` count (layer, expert) requests of the layers' forward
    passes (a hit on an expert still being prefetched is a hit, and its wait is in `wait_s`);
    `bytes_read` and `read_s` count every read (demand and prefetch); `wait_s` is the time the
    computing thread spent blocked on expert loads; `prefetched` experts the prefetch thread read,
    `prefetch_used` how many of those were used before eviction."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    read_s: float = 0.0
    wait_s: float = 0.0
    prefetched: int = 0
    prefetch_used: int = 0
    prefetch_failed: int = 0  # prefetch reads that raised (the computing thread reads those experts itself)
    prefetch_cancelled: int = 0  # prefetch reads abandoned part way: their layer started without needing them
    prefetch_skipped: int = 0  # guesses not read: a read did not fit in the compute window
    passes: int = 0  # layer calls that needed more than one pass (more distinct experts than slots)
    layer_calls: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate, "bytes_read": self.bytes_read,
                "read_s": self.read_s, "wait_s": self.wait_s, "prefetched": self.prefetched,
                "prefetch_used": self.prefetch_used, "prefetch_failed": self.prefetch_failed,
                "prefetch_cancelled": self.prefetch_cancelled, "prefetch_skipped": self.prefetch_skipped,
                "multi_pass_calls": self.passes, "layer_calls": self.layer_calls}

    def summary(self) -> str:
        failed = f", {self.prefetch_cancelled} cancelled" if self.prefetch_cancelled else ""
        failed += f", {self.prefetch_failed} failed" if self.prefetch_failed else ""
        if self.prefetch_skipped:
            failed += f"; {self.prefetch_skipped} guesses skipped: reads too short or too long to hide"
        pf = f", prefetched {self.prefetched} (used {self.prefetch_used}{failed})" if self.prefetched else ""
        if self.prefetch_skipped and not self.prefetched:
            pf = f", prefetched 0{failed}"
        return (f"expert cache: hit rate {self.hit_rate:.1%} ({self.hits} hits, {self.misses} misses), "
                f"read {format_bytes(self.bytes_read)} in {self.read_s:.2f} s, waited {self.wait_s:.2f} s{pf}")


@dataclass
class _Request:
    layer: int
    experts: list[int]
    valid_until: int  # the layer call count after which the guess is stale


@dataclass
class _SlotState:
    key: tuple[int, int] | None = None
    pins: int = 0
    loading: bool = False
    last: int = 0
    prefetched: bool = False  # read by the prefetch thread and not used since
    last_call: int = 0  # the layer call that last used (or prefetched) it
    ready: threading.Event = field(default_factory=threading.Event)


class ExpertCache:
    """`budget` bytes of expert slots over `num_layers` MoE layers of `num_experts` experts each,
    filled from `source` (see the module docstring). `policy`: "lru" or "lfu"; `prefetch`: guess
    and read the next layer's experts in a background thread. The pool is allocated on first use
    (a format change before that costs nothing)."""

    def __init__(self, source: ExpertSource, *, num_layers: int, num_experts: int, top_k: int, dim: int,
                 ffn_dim: int, budget: int, fmt: SlotFormat, policy: str = "lru", prefetch: bool = True) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; expected one of {', '.join(POLICIES)}")
        self.source = source
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.dim, self.ffn_dim = dim, ffn_dim
        self.budget = parse_bytes(budget, what="max_memory")
        self.policy = policy
        self.prefetch_enabled = prefetch
        self.stats = CacheStats()
        self._cond = threading.Condition()
        self._uses: Counter[tuple[int, int]] = Counter()
        self._clock = 0
        self._calls = 0
        self._demand = 0  # demand reads in progress (the prefetch thread stands aside meanwhile)
        self.read_s_mean: float | None = None  # running mean of one expert's read time (whole reads)
        self.window_s_mean: float | None = None  # ... of the time from a layer's experts ready to the next layer's ask
        self._ready: tuple[int, float] | None = None  # (layer, when its experts were ready)
        self.prefetch_gate = True  # False: read every guess, whatever the timings (benchmarks)
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._pool: dict[str, torch.Tensor] | None = None
        self.set_format(fmt)

    # -- format and pool --------------------------------------------------------------------

    def set_format(self, fmt: SlotFormat) -> None:
        """Hold experts in `fmt` from now on (only before the pool is first used)."""
        if self._pool is not None:
            raise ValueError("the expert cache is in use; its format can change only before the first forward pass")
        for name, n in (("dim", self.dim), ("ffn_dim", self.ffn_dim)):
            if fmt.kind == "int4" and n % fmt.group:  # refused now, not when the first expert is read in
                raise ValueError(f"int4 with groups of {fmt.group} needs a multiple of {fmt.group} inputs per row, "
                                 f"not {n} (the experts' {name})")
        per = fmt.expert_bytes(self.dim, self.ffn_dim)
        slots = min(self.budget // per, self.num_layers * self.num_experts)
        self.fmt, self.expert_bytes, self.num_slots = fmt, per, slots
        self._slots = [_SlotState() for _ in range(slots)]
        self._where: dict[tuple[int, int], int] = {}

    def check(self) -> None:
        """ValueError unless the budget holds one token's top-k experts in this format (checked
        when the format is final: inference preparation, or the first forward pass)."""
        if self.num_slots < self.top_k:
            total, per = self.num_layers * self.num_experts, self.expert_bytes
            raise ValueError(
                f"max_memory {format_bytes(self.budget)} holds {self.num_slots} experts of {format_bytes(per)} each "
                f"({self.fmt.kind}); a layer computing one token needs its top-{self.top_k}: give at least "
                f"{format_bytes(self.top_k * per)} (all {total} experts: {format_bytes(total * per)})")

    @property
    def total_expert_bytes(self) -> int:
        return self.num_layers * self.num_experts * self.expert_bytes

    def pool(self) -> dict[str, torch.Tensor]:
        """The pool tensors (allocated here on first use; uninitialised: pages count in memory only
        once a slot is written)."""
        if self._pool is None:
            self.check()
            with self._cond:
                if self._pool is None:
                    # on 2 MiB pages: the kernels stream the slots as they stream resident weights
                    # (greedy decoding at a 97% hit rate, mini-moe bf16: 1.04-1.10x tokens/s, in-process
                    # A/B against the same slots on 4 KiB pages)
                    self._pool = {name: huge_empty((self.num_slots, *shape), dtype)
                                  for name, (shape, dtype) in self.fmt.shapes(self.dim, self.ffn_dim).items()}
        return self._pool

    def slot(self, s: int) -> Slot:
        p = self.pool()
        return Slot(p["w13"][s], p["w2"][s], p["w13_scale"][s] if "w13_scale" in p else None,
                    p["w2_scale"][s] if "w2_scale" in p else None)

    # -- eviction ---------------------------------------------------------------------------

    def _victim(self, *, since: int | None = None) -> int | None:
        """A free slot, else the policy's choice among unpinned loaded slots; None if all are busy.
        `since` (prefetch): only slots not used by a layer call after that one. Lock held."""
        best, best_key = None, None
        for s, st in enumerate(self._slots):
            if st.pins or st.loading or (since is not None and st.key is not None and st.last_call > since):
                continue
            if st.key is None:
                return s
            k = (self._uses[st.key], st.last) if self.policy == "lfu" else (st.last, 0)
            if best_key is None or k < best_key:
                best, best_key = s, k
        return best

    def _assign(self, s: int, key: tuple[int, int], *, prefetched: bool) -> None:
        st = self._slots[s]
        if st.key is not None:
            del self._where[st.key]
        st.key, st.loading, st.prefetched, st.last = key, True, prefetched, self._clock
        st.ready.clear()
        self._where[key] = s

    def _forget(self, s: int) -> None:
        """Slot `s` holds nothing (its read failed or will never run); whoever waits for it wakes. Lock held."""
        st = self._slots[s]
        if st.key is not None:
            self._where.pop(st.key, None)
        st.key, st.loading, st.prefetched = None, False, False
        st.ready.set()

    def _load(self, s: int, layer: int, expert: int, *, pause: Pause | None = None) -> None:
        """Read expert `expert` of `layer` into slot `s`: a demand read (counted in `_demand`,
        which the caller raised) or, with `pause`, a prefetch read."""
        t0 = time.perf_counter()
        partial = [0]

        def count(n: int) -> None:
            partial[0] += n
            assert pause is not None
            pause(n)

        try:
            # Inference mode on both threads: the pool is allocated by whichever forward pass comes
            # first, often under `torch.inference_mode()` (generate), and its inference tensors refuse
            # in-place writes outside that mode. Inference mode is thread-local, so the prefetch thread
            # never had it: every prefetch that converts (int8/int4, other dtypes, GGUF Q4_0) failed.
            with torch.inference_mode():
                n = self.source.read(layer, expert, self.fmt, self.slot(s), pause=count if pause else None)
        except BaseException:
            with self._cond:
                self._forget(s)  # the half-written slot
                self.stats.bytes_read += partial[0]
                self.stats.read_s += time.perf_counter() - t0
                self._demand -= pause is None
                self._cond.notify_all()
            raise
        with self._cond:
            dt = time.perf_counter() - t0
            self.stats.bytes_read += n
            self.stats.read_s += dt
            self.read_s_mean = _mean(self.read_s_mean, dt)
            self._slots[s].loading = False
            self._slots[s].ready.set()
            self._demand -= pause is None
            self._cond.notify_all()

    # -- the computing thread ---------------------------------------------------------------

    def acquire(self, layer: int, experts: Sequence[int], *,
                prefetch: tuple[int, Sequence[int]] | None = None) -> list[int]:
        """Slots holding `experts` of `layer` (at most `num_slots` distinct ones), pinned until
        `release`; reads the missing ones on this thread and waits for any still being prefetched.
        `prefetch`: (next layer, guessed experts), queued once these are pinned (so the guesses
        never evict them) and before the reads here (so both overlap)."""
        if len(experts) > self.num_slots:
            raise ValueError(f"{len(experts)} experts asked at once; the cache holds {self.num_slots}")
        self.pool()
        t0 = time.perf_counter()
        if self._ready is not None and self._ready[0] + 1 == layer:  # the compute a guess for this layer hid behind
            w = t0 - self._ready[1]
            self.window_s_mean = _mean(self.window_s_mean, w)
        slots: list[int] = []
        todo: list[tuple[int, int]] = []
        wait: list[tuple[int, int]] = []
        with self._cond:
            self._calls += 1
            for e in experts:
                self._clock += 1
                key = (layer, e)
                self._uses[key] += 1
                s = self._where.get(key)
                if s is not None:
                    self.stats.hits += 1
                    st = self._slots[s]
                    if st.prefetched:
                        self.stats.prefetch_used += 1
                        st.prefetched = False
                    if st.loading:
                        wait.append((s, e))
                else:
                    self.stats.misses += 1
                    while (s := self._victim()) is None:  # every free slot is being prefetched: wait for one
                        self._cond.wait()
                    self._assign(s, key, prefetched=False)
                    todo.append((s, e))
                    self._demand += 1
                st = self._slots[s]
                st.pins += 1
                st.last, st.last_call = self._clock, self._calls
                slots.append(s)
        if prefetch is not None:
            self.prefetch(*prefetch)
        try:
            for n, (s, e) in enumerate(todo):
                try:
                    self._load(s, layer, e)
                except BaseException:
                    with self._cond:  # the reads not started never will: their slots hold nothing (a later
                        for later, _ in todo[n + 1 :]:  # call waited for them forever), the prefetch thread goes on
                            self._forget(later)
                        self._demand -= len(todo) - n - 1
                        self._cond.notify_all()
                    raise
            for s, e in wait:
                self._slots[s].ready.wait()
                if self._slots[s].key != (layer, e):  # its prefetch failed: read it here
                    with self._cond:
                        self._assign(s, (layer, e), prefetched=False)
                        self._demand += 1
                    self._load(s, layer, e)
        except BaseException:
            self.release(slots)
            raise
        finally:
            t1 = time.perf_counter()
            self.stats.wait_s += t1 - t0
        self._ready = (layer, t1)
        return slots

    def release(self, slots: Sequence[int]) -> None:
        with self._cond:
            for s in slots:
                self._slots[s].pins -= 1
            self._cond.notify_all()

    # -- prefetch ---------------------------------------------------------------------------

    def prefetch(self, layer: int, experts: Sequence[int]) -> None:
        """Ask the background thread to read `experts` of `layer` (the next layer to compute), in
        order of preference; dropped if that layer starts first."""
        if not self.prefetch_enabled or self._closed:
            return
        with self._cond:  # only what is missing (most guesses are cached: consecutive tokens share experts)
            experts = [e for e in experts if (layer, e) not in self._where]
        if not experts:
            return
        if not self.prefetch_pays():
            self.stats.prefetch_skipped += len(experts)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mixlab-expert-prefetch", daemon=True)
            self._thread.start()
        self._queue.put(_Request(layer, list(experts), self._calls))

    def prefetch_pays(self) -> bool:
        """Whether one expert's read is at most `MAX_READ_PER_WINDOW` times the compute between two
        layers and longer than a prefetch's own cost (running means; true until both are measured).
        A longer read hides little of itself and takes the disk and a core from the reads and
        compute the next layer waits for; a read under `MIN_PREFETCH_READ_S` saves less than handing
        it to a thread costs."""
        r, w = self.read_s_mean, self.window_s_mean
        return not self.prefetch_gate or r is None or w is None or MIN_PREFETCH_READ_S <= r <= MAX_READ_PER_WINDOW * w

    def _run(self) -> None:
        while True:
            req = self._queue.get()
            if req is None:
                return
            for e in req.experts:
                key = (req.layer, e)
                with self._cond:
                    if self._closed or self._calls > req.valid_until:  # its layer started: stale
                        break
                    if key in self._where:
                        continue
                    # A guess never evicts what the last token used (one call per layer ago): those
                    # experts are the best guess there is (consecutive tokens share experts, Mixtral §5).
                    s = self._victim(since=self._calls - self.num_layers)
                    if s is None:
                        break
                    self._clock += 1
                    self._assign(s, key, prefetched=True)
                    self._slots[s].last_call = self._calls
                    self.stats.prefetched += 1
                try:
                    self._load(s, req.layer, e, pause=self._pauser(s, req))
                except Cancelled:
                    self.stats.prefetch_cancelled += 1
                    continue  # the next guess is stale too, or the cache is closing: both end the loop above
                except Exception:  # noqa: BLE001  the computing thread reads it again and reports the error
                    self.stats.prefetch_failed += 1
                    break

    def _pauser(self, s: int, req: _Request) -> Pause:
        """The `pause` of a prefetch read into slot `s`: between chunks, wait while a demand read runs
        (the disk serves one reader at a time: sharing it only delays the read being waited for);
        give up once the guessed layer has started without pinning this slot (a wrong guess)."""

        def pause(_: int) -> None:
            st = self._slots[s]
            if not self._demand and not self._closed and (st.pins or self._calls <= req.valid_until):
                return  # the common case, without the lock
            with self._cond:
                while True:
                    pinned = st.pins > 0  # its layer needs it: the computing thread waits for it
                    if self._closed or (self._calls > req.valid_until and not pinned):
                        raise Cancelled
                    if pinned or self._demand == 0:
                        return
                    self._cond.wait()

        return pause

    def close(self) -> None:
        """Stop the prefetch thread (waits for the read in progress) and close the source."""
        with self._cond:
            self._closed = True  # a prefetch read paused between chunks gives up
            self._cond.notify_all()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self.source.close()

    @property
    def prefetching(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def clear(self) -> None:
        """Forget every cached expert (waits for reads in progress); the pool stays allocated."""
        with self._cond:
            while any(st.loading or st.pins for st in self._slots):
                self._cond.wait()
            for st in self._slots:
                st.key, st.prefetched = None, False
            self._where.clear()
            self._uses.clear()

    def reset_stats(self) -> None:
        self.stats = CacheStats()

    def cached(self) -> set[tuple[int, int]]:
        with self._cond:
            return {st.key for st in self._slots if st.key is not None and not st.loading}
