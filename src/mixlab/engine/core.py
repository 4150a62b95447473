"""The engine: requests join and leave a running batch at every step (continuous batching).

One background thread owns the model (`start()`); callers submit requests and read their outputs
through thread-safe queues (`Handle`). Without `start()`, `step()` can be driven by the caller
(what `mixlab.generate` does), never both at once.

A step (`step`): admit waiting requests while the cache has room (else they wait), then one
forward pass (`Runner.forward`) over every running sequence: one token for each decoding sequence
plus chunks of prompts being prefilled, under `token_budget` tokens per step and at most
`prefill_chunk` of one prompt, so a long prompt is spread over several steps instead of freezing
the other streams (chunked prefill, Sarathi-Serve arXiv 2403.02310). Then each row is sampled with
its own settings and generator; a finished or cancelled sequence frees its cache at once. A row
that fails (NaN logits) ends its own request with "error", as does a failed admission (out of
memory for its state); a step that fails ends all of the step's. With `return_experts` a token's
output waits for the step that runs that token (its experts are chosen then), and a finished request
runs its last token once more for its experts before its cache is freed.

Batch independence: each row's logits depend only on its own tokens, and its sampling only on its
own generator, so a seeded request gives the same tokens whatever runs beside it, up to the
rounding of the kernels a step picks (the one-call native step for a lone token, the native
few-row kernels, oneDNN/MKL beyond 16 rows): in float32 the tests find the tokens identical; in
bf16 the logits of the same row can differ in the last bits between batch sizes, which can flip a
near-tie. `Engine(batch_invariant=True)` removes that rounding: every step runs one kernel family
whose arithmetic for a row does not depend on the other rows (`mx_batch.invariant`).
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mixlab.checkpoint.adapter import Adapter, LowRank, adapter_factors
from mixlab.engine import api
from mixlab.engine.api import Handle, QueueFull, RequestOutput, SamplingParams, _deliver, _is_array
from mixlab.engine.lookup import PromptLookup
from mixlab.engine.runner import Item, Result, Runner, common_prefix
from mixlab.engine.sampling import (
    Sampler,
    bad_words_ids,
    banned_tokens,
    row_argmax,
    sample_row,
    seed_generator,
    top_logprobs,
)
from mixlab.engine.structured import Matcher
from mixlab.errors import MixlabError
from mixlab.model.formats import expert_cache
from mixlab.model.inference import inference_format
from mixlab.model.moe import MoEBlock
from mixlab.model.transformer import check_model
from mixlab.tokenizer import check_tokenizer

if TYPE_CHECKING:
    from mixlab.model import Transformer
    from mixlab.tokenizer import StreamDecoder, Tokenizer

__all__ = ["Engine"]

_log = logging.getLogger("mixlab.engine")
PREFILL_CHUNK = 128  # the longest piece of one prompt per step, by default (see `Engine`)
# A request waits to be admitted while a running prompt that shares at least this many of its first
# tokens is still prefilling them: it then copies those keys and values instead of computing them.
SHARE_WAIT = 16


@dataclass(eq=False)
class _Seq:
    rid: str
    prompt: list[int]
    params: SamplingParams
    handle: Handle
    sampler: Sampler
    stop_ids: set[int]
    generator: torch.Generator | None
    decoder: StreamDecoder | None
    out: list[int] = field(default_factory=list)
    n_cached: int = 0  # tokens of prompt + out whose keys and values are in the cache
    cached_tokens: int = 0  # prompt tokens reused from the cache (prefix reuse)
    text: str = ""  # decoded output text (for stop strings)
    sent: int = 0  # characters of `text` already streamed
    stop_floor: int = 0  # a stop string must end after this character: the text of the first min_tokens tokens
    prompt_lp: list[float | None] | None = None
    prompt_top: list[list[tuple[int, float]] | None] | None = None  # with prompt_logprobs and a prompt_top > 0
    prompt_rank: list[int | None] | None = None  # with prompt_logprobs: each prompt token's rank
    seen_1V: torch.Tensor | None = None  # prompt + output tokens (repetition penalty)
    counts_1V: torch.Tensor | None = None  # output token counts (presence/frequency penalties)
    bias_1V: torch.Tensor | None = None  # logit_bias (and allowed_token_ids' -inf elsewhere) as a row
    bad_ids: list[list[int]] = field(default_factory=list)  # bad_words as token sequences (`bad_words_ids`)
    matcher: Matcher | None = None  # params.structured's state: the tokens allowed next
    first: bool = True
    slot: int = -1  # the runner's cache slot
    # return_experts: the last token's output, held until that token has run through the model (the
    # next step, or one more step after the request finished: `routing_only`) and its experts are known
    held: RequestOutput | None = None
    routing_only: bool = False  # finished: its last token runs once more for its experts alone
    lookup: PromptLookup | None = None  # speculative_tokens (greedy): the drafts' n-gram index
    draft: list[int] = field(default_factory=list)  # the tokens this step verifies after the last one

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out

    @property
    def prefilling(self) -> bool:
        return self.n_cached < len(self.prompt)


class Engine:
    """Continuous-batching inference over one model (see the module docstring).

    `max_batch`: sequences decoded together; `cache_bytes`: the KV cache's memory budget (default
    2 GiB), `max_seq_len`: positions per sequence (default: the model's context, halved until
    `max_batch` sequences fit the budget; see `runner.Runner`); `prefix_cache`: reuse prompt
    prefixes that free slots hold, or that running sequences hold (copied into the new slot; a request
    whose prompt shares at least its first `SHARE_WAIT` tokens with a prompt still prefilling waits
    for them: `n` samples of one prompt, or requests with one long system prompt, prefill it once;
    a request with `prompt_logprobs` takes those too, from a running or ended request that computed
    the same ones: lm-eval's endings of one context prefill it once);
    `max_queue`: waiting requests before `submit` raises `QueueFull`; `token_budget`: tokens per
    step (decoding rows count one each; prompt chunks fill the rest); `prefill_chunk`: the longest
    piece of one prompt per step (default 128, at most `token_budget`: a long prompt's steps then
    keep the streams decoding beside it at ~4x their usual inter-token time on a 2-core CPU, not
    ~12x as with 512-token pieces, while a prompt alone prefills as fast in 128-token pieces as in
    512; BENCHMARKS.md, "Long prompts beside decoding streams"); `pack_weights`: keep the bf16
    weights a second time in the native kernels' panels (`NativeDecoder.pack`: ~1.1x faster steps
    of several sequences, twice the weights' memory, kept with the model's decoder), None (default)
    when the engine decodes several sequences and that copy takes at most half the memory
    available (`runner.Runner`); `batch_invariant`: every step through the native kernels'
    batch-invariant arithmetic (CPU, bf16 or float32 weights): a request's logits, so its tokens,
    are bit for bit those of its run alone whatever else runs (in bf16 too, where the default
    kernels' rounding differs between batch sizes), at a cost in speed (BENCHMARKS.md);
    `sync_token`: every sampled token goes through it before it is used (expert-parallel decoding's
    `mixlab.parallel.expert.rank0_token`: each process continues with rank 0's token, so processes
    whose draws or rounding differ cannot part and stop at different steps); a row that fails then
    fails the step (`step()` raises), as the processes must stay in step.
    `adapters`: PEFT LoRA adapters served over the model, by name (`{"name": folder or Adapter}`, vLLM's
    `--lora-modules`), each kept apart from the weights as low-rank factors (`adapter_factors`); a
    request picks one with `SamplingParams(adapter=name)` and gets what the model with that adapter
    merged gives. On CPU a step with rows under adapters runs in the same one native call as the base's
    steps (each row's updates after each product), elsewhere the PyTorch pass; a request reuses only
    keys computed under its own adapter.
    """

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer | None = None, *, max_batch: int = 16,
        cache_bytes: int | None = None, max_queue: int = 256, token_budget: int = 512,
        prefill_chunk: int = PREFILL_CHUNK, max_seq_len: int | None = None, prefix_cache: bool = True,
        pack_weights: bool | None = None, batch_invariant: bool = False,
        sync_token: Callable[[int], int] | None = None, adapters: Mapping[str, str | Path | Adapter] | None = None,
    ) -> None:
        for name, v in (("max_batch", max_batch), ("max_queue", max_queue), ("token_budget", token_budget)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"invalid {name}={v!r}: expected an integer >= 1")
        check_model(model)
        check_tokenizer(tokenizer, model.config.vocab_size)
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.sync_token = sync_token
        self.max_batch, self.max_queue, self.token_budget = max_batch, max_queue, token_budget
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"invalid prefill_chunk={prefill_chunk!r}: expected an integer >= 1")
        self.prefill_chunk = min(prefill_chunk, token_budget)
        factors = self._adapter_factors(model, adapters, batch_invariant=batch_invariant)
        self.runner = Runner(model, max_batch=max_batch, cache_bytes=cache_bytes, prefill_chunk=self.prefill_chunk,
                             max_seq_len=max_seq_len, prefix_cache=prefix_cache, pack_weights=pack_weights,
                             batch_invariant=batch_invariant, adapters=factors)
        self._lock = threading.Lock()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._cancel_ids: set[str] = set()
        self._ids = itertools.count()
        self._live: dict[str, Handle] = {}  # request id -> handle of the request that holds it now
        self._scored: dict[int, _Seq] = {}  # free slot -> the ended request with prompt logprobs it holds
        self._wake = threading.Event()
        self._stop = False
        self._closed = False  # shut down: submit raises (nothing would ever run its request) until start()
        self._last_step = time.monotonic()  # when step() last ran (or the engine was made)
        self._thread: threading.Thread | None = None
        self._stepping = threading.Lock()
        self._outbox: list[tuple[Handle, RequestOutput]] = []  # this step's outputs, pushed when it ends
        # draft_tokens / accepted_tokens: speculative tokens verified / kept (their ratio: the acceptance rate)
        self._stats = {"tokens_in": 0, "tokens_out": 0, "steps": 0, "cached_tokens": 0, "draft_tokens": 0,
                       "accepted_tokens": 0}
        self._adapter_requests = dict.fromkeys(self.runner.adapters, 0)  # requests submitted under each adapter

    @staticmethod
    def _adapter_factors(model: Transformer, adapters: Mapping[str, str | Path | Adapter] | None, *,
                         batch_invariant: bool) -> dict[str, dict[str, LowRank]]:
        """Each adapter's low-rank factors, or ValueError (CheckpointError) naming the adapter."""
        if adapters is None:
            return {}
        if not isinstance(adapters, Mapping):
            raise ValueError(f"invalid adapters={adapters!r}: expected a mapping of names to adapter folders")
        why = None  # what the adapters' steps (every expert resident, the regular kernels) cannot run beside
        if batch_invariant:
            why = "batch_invariant=True runs every step through the invariant native kernels, which take no adapters"
        elif inference_format(model) == "offloaded":
            why = "the model's experts are offloaded (load_model(max_memory=)); an adapter's steps need them resident"
        elif any(m.experts.num_experts != m.moe.num_experts for m in model.modules() if isinstance(m, MoEBlock)):
            why = "the model's experts are split over processes (expert parallelism)"
        out = {}
        for name, path in adapters.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"invalid adapter name {name!r}: expected a non-empty string")
            if why:
                raise ValueError(f"adapter {name!r}: {why}; serve adapters without it, or merge the adapter into "
                                 "the weights (load_model(..., adapter=DIR))")
            out[name] = adapter_factors(model, path)
        return out

    def __repr__(self) -> str:
        with self._lock:
            running, waiting = len(self._running), len(self._waiting)
        closed = ", closed=True" if self._closed else ""
        return (f"Engine(running={running}, waiting={waiting}, max_batch={self.max_batch}, "
                f"thread={self._thread is not None}{closed})")

    # ---- the caller's side ----

    def start(self) -> Engine:
        """Start the background thread that runs the steps (`with Engine(...)` does); returns the engine."""
        if self._thread is None:
            self.runner.prepare()  # the native decoder (and its panels) now, not in the first request's time
            self._stop = self._closed = False
            self._thread = threading.Thread(target=self._loop, name="mixlab-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def closed(self) -> bool:
        """Shut down: nothing submitted now would run (until `start()`)."""
        return self._closed

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the thread; requests still waiting or running finish with "error", and `submit` raises
        RuntimeError until `start()`."""
        with self._lock:
            self._closed = True
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._stepping:
            for seq in list(self._running) + list(self._waiting):
                self._finish(seq, "error", error="the engine shut down")
            self._waiting.clear()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
               request_id: str | None = None) -> Handle:
        """Queue a request; its outputs stream through the returned handle (an empty prompt becomes
        `[bos]`, as in `generate`: the model writes from the start of a text). Raises `ValueError` for a
        bad prompt or parameters (before anything is queued) and `QueueFull` when `max_queue`
        requests already wait; RuntimeError after `shutdown()` (until `start()`)."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, not {type(params).__name__}")
        params.check()
        prompt = self._check_prompt(prompt_ids, params)
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop strings {params.stop!r} need an engine made with a tokenizer")
        if params.structured is not None and self.tokenizer is None:
            raise ValueError(f"structured {params.structured.kind} output needs an engine made with a tokenizer")
        cfg = self.config
        bad = [i for i in params.stop_token_ids if not 0 <= i < cfg.vocab_size]
        if bad:
            raise ValueError(f"invalid stop_token_ids: {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
        bad = [i for i in params.logit_bias if not 0 <= i < cfg.vocab_size]
        if bad:
            raise ValueError(f"invalid logit_bias: token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
        bad = [i for i in params.allowed_token_ids or () if not 0 <= i < cfg.vocab_size]
        if bad:
            raise ValueError(f"invalid allowed_token_ids: token id {bad[0]} is outside the vocabulary "
                             f"[0, {cfg.vocab_size})")
        if params.bad_words and self.tokenizer is None:
            raise ValueError(f"bad_words {params.bad_words!r} need an engine made with a tokenizer")
        bad_ids = bad_words_ids(self.tokenizer, params.bad_words) if self.tokenizer is not None else []
        if params.return_experts and cfg.moe is None:
            raise ValueError("return_experts=True needs a MoE model; this one is dense")
        if params.adapter is not None and params.adapter not in self.runner.adapters:
            known = ", ".join(map(repr, self.runner.adapters)) or "none (Engine(adapters=...) names them)"
            raise ValueError(f"unknown adapter {params.adapter!r}: this engine's adapters are {known}")
        rid = str(request_id) if request_id is not None else f"req-{next(self._ids)}"
        handle = Handle(rid, self.cancel, self._stall_reason)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(cfg.eos_ids))
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.runner.device)
            if params.seed is None:
                generator.seed()
            else:
                seed_generator(generator, params.seed)
        context = () if params.decode_alone else prompt[-4:]  # the prompt's last tokens keep a leading space
        # only when asked: a tokenizer-like object (check_tokenizer's: one that streams) need not take it
        special = {} if params.skip_special_tokens else {"skip_special_tokens": False}
        decoder = self.tokenizer.stream(context=context, **special) if self.tokenizer is not None else None
        seq = _Seq(rid, prompt, params, handle, Sampler(params.temperature, params.top_k, params.top_p,
                   params.min_p, params.repetition_penalty), stop_ids, generator, decoder)
        if params.structured is not None and self.tokenizer is not None:
            seq.matcher = Matcher(params.structured, self.tokenizer, cfg.vocab_size)
        seq.bad_ids = bad_ids
        if params.speculative_tokens and params.greedy and not params.return_experts:
            seq.lookup = PromptLookup()  # (a sampled request decodes a token a step: its draws would change)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is shut down (Engine.start() starts it again)")
            if rid in self._live:
                raise ValueError(f"request_id {rid!r} is already running")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue})")
            self._live[rid] = handle
            self._waiting.append(seq)
            if params.adapter is not None:
                self._adapter_requests[params.adapter] += 1
        self._wake.set()
        return handle

    def _check_prompt(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        if _is_array(prompt_ids, 1):
            prompt_ids = prompt_ids.tolist()
        if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
            shape = getattr(prompt_ids, "shape", None)  # a [1, T] tensor, as a model's forward takes them
            got = f"{type(prompt_ids).__name__} of shape {list(shape)}" if shape is not None else \
                type(prompt_ids).__name__
            raise ValueError(f"prompt_ids must be a list (or 1-D tensor / array) of token ids, got {got}; one "
                             "request is one prompt: submit each row of a batch on its own")
        try:
            prompt = [operator.index(i) for i in prompt_ids]
            if any(isinstance(i, bool) for i in prompt_ids):  # True is no token id (stop_token_ids refuse it too)
                raise TypeError
        except TypeError:
            raise ValueError("prompt_ids contains a non-integer token id") from None
        if not prompt:
            prompt = [self.config.bos_id]  # an empty prompt: generate from the start-of-text token alone
        V = self.config.vocab_size
        bad = [i for i in prompt if not 0 <= i < V]
        if bad:
            raise ValueError(f"prompt_ids has token id {bad[0]} outside the model's vocabulary [0, {V})")
        room = self.runner.max_len
        if len(prompt) + params.max_tokens > room:
            raise ValueError(f"the prompt ({len(prompt)} tokens) + max_tokens={params.max_tokens} = "
                             f"{len(prompt) + params.max_tokens} exceeds the context of {room} tokens")
        return prompt

    def cancel(self, request: str | Handle) -> None:
        """Stop a request (waiting or running); its stream ends with finish_reason "cancelled". A
        request that has ended is not cancelled, nor a later one given the same request id (when the
        ended one's handle is given)."""
        rid = request.request_id if isinstance(request, Handle) else str(request)
        with self._lock:
            live = self._live.get(rid)
            if live is not None and (live is request or not isinstance(request, Handle)):
                self._cancel_ids.add(rid)
        self._wake.set()

    def stats(self) -> dict[str, object]:
        """Running and waiting requests, KV cache bytes used and total, token and step counts, each
        expert's load (and the expert cache's counters for offloaded experts; with adapters, each one's
        requests submitted and running): what /metrics shows."""
        with self._lock:
            waiting = len(self._waiting)
        load = self.runner.expert_load()
        out = {
            "running": len(self._running), "waiting": waiting,
            "cache_used_bytes": self.runner.used_bytes(), "cache_total_bytes": self.runner.total_bytes,
            "weight_panels_bytes": self.runner.packed_bytes, **self._stats, "expert_load": load.tolist(),
        }
        if self.runner.adapters:
            running = [s.params.adapter for s in list(self._running)]
            with self._lock:
                out["adapters"] = {name: {"requests": n, "running": running.count(name)}
                                   for name, n in self._adapter_requests.items()}
        cache = expert_cache(self.model)
        if cache is not None:  # offloaded experts (load_model(max_memory=)): what their cache did
            out["expert_cache"] = {**cache.stats.as_dict(), "slots": cache.num_slots,
                                   "slot_bytes": cache.expert_bytes}
        return out

    def has_work(self) -> bool:
        """Whether a request is running or waiting (or a cancel is pending): `step()` has work."""
        with self._lock:
            return bool(self._running or self._waiting or self._cancel_ids)

    # ---- the engine thread ----

    def _loop(self) -> None:
        while not self._stop:
            try:
                worked = self.step()
            except Exception:  # noqa: BLE001 (a broken step fails its requests, not the engine)
                # its requests end with "error" and its message; the traceback is the operator's (`mixlab serve`'s log)
                _log.exception("an engine step failed: its requests end with finish_reason \"error\"")
                worked = True
            if not worked:
                self._wake.wait(0.05)
                self._wake.clear()

    def _fail_running(self, error: str) -> None:
        for seq in list(self._running):
            self._finish(seq, "error", error=error)

    def step(self) -> bool:
        """Admit, run one forward pass over every running sequence, sample, stream. Returns whether
        there was anything to do."""
        with self._stepping:
            self._last_step = time.monotonic()
            try:
                return self._step()
            except Exception as e:  # the step's requests end with "error" (they stayed running, and every
                self._fail_running(f"{type(e).__name__}: {e}")  # later step of a caller-driven engine failed)
                raise

    def _stall_reason(self) -> str | None:
        """Why a request cannot progress, or None: no engine thread, and no `step()` for a while."""
        if self._thread is not None or time.monotonic() - self._last_step < api.STALL_WARNING_S:
            return None
        return ("the engine was never started (use `with Engine(...) as engine:` or `engine.start()`) and "
                "nothing has called `engine.step()` since")

    def _step(self) -> bool:
        self._handle_cancels()
        self._admit()
        if not self._running:
            return False
        items: list[Item] = []
        budget = max(self.token_budget - sum(not s.prefilling for s in self._running), 0)
        for seq in self._running:
            if not seq.prefilling and seq.lookup is not None:
                seq.draft = self._draft(seq, budget)  # drafts before prompt chunks: they are few, and cheap
                budget -= len(seq.draft)
        for seq in self._running:
            if not seq.prefilling:
                want = "none" if seq.routing_only else ("all" if seq.draft else "last")
                items.append(Item(seq.slot, (seq.out[-1:] or seq.prompt[-1:]) + seq.draft, seq.n_cached,
                                  logits=want, experts=seq.params.return_experts, adapter=seq.params.adapter,
                                  draft=len(seq.draft)))
            elif budget > 0:
                n = min(len(seq.prompt) - seq.n_cached, budget, self.prefill_chunk)
                budget -= n
                ends = seq.n_cached + n == len(seq.prompt)
                want = "all" if seq.params.prompt_logprobs else ("last" if ends else "none")
                items.append(Item(seq.slot, seq.prompt[seq.n_cached : seq.n_cached + n], seq.n_cached, logits=want,
                                  experts=seq.params.return_experts and ends, adapter=seq.params.adapter))
        if not items:
            return False
        by_slot = {s.slot: s for s in self._running}
        with torch.inference_mode():
            results = self.runner.forward(items)
        try:
            self._collect(items, results, by_slot)
        finally:  # the step's outputs go out together: an event loop is woken once per step, not per token
            outbox, self._outbox = self._outbox, []
            _deliver(outbox)
        return True

    def _collect(self, items: list[Item], results: list[Result], by_slot: dict[int, _Seq]) -> None:
        self._stats["steps"] += 1
        for item, res in zip(items, results, strict=True):
            seq = by_slot[item.slot]
            seq.n_cached += len(item.tokens)
            self._stats["tokens_in"] += len(item.tokens)
            if not seq.prefilling:
                seq.handle._state = "decoding"
            try:
                self._collect_row(seq, item, res)
            except Exception as e:  # noqa: BLE001 (one request's failure ends it, not the others of the step)
                if self.sync_token is not None:  # processes in step (a lost peer in its collective): the step's
                    raise
                self._finish(seq, "error", error=str(e) if isinstance(e, MixlabError) else f"{type(e).__name__}: {e}")

    def _collect_row(self, seq: _Seq, item: Item, res: Result) -> None:
        """One row's results: its prompt logprobs, then (once its prompt is in) its next token."""
        if seq.params.prompt_logprobs and seq.prompt_lp is not None and res.logits_TV is not None:
            lp_TV = torch.log_softmax(res.logits_TV, dim=-1)
            for j in range(len(item.tokens)):
                p = item.start + j + 1  # the prompt token this position predicts
                if p < len(seq.prompt):
                    v = lp_TV[j, seq.prompt[p]]
                    seq.prompt_lp.append(float(v))
                    if seq.prompt_rank is not None:  # vLLM's rank: 1 + the tokens more likely
                        seq.prompt_rank.append(int((lp_TV[j] > v).sum()) + 1)
                    if seq.prompt_top is not None:
                        seq.prompt_top.append(top_logprobs(lp_TV[j], seq.params.prompt_top))
        if seq.routing_only:  # a finished request's last token has run: its output goes out, complete
            self._give_held(seq, res.experts_LK)
            self._release(seq)
        elif seq.draft:
            self._verify(seq, item, res)
        elif not seq.prefilling and res.logits_TV is not None:
            self._emit(seq, res.logits_TV[-1:], res.experts_LK, res.argmax)

    def _draft(self, seq: _Seq, budget: int) -> list[int]:
        """The tokens `seq` (greedy, with speculative_tokens) verifies after its last one this step:
        prompt lookup's guess (`engine.lookup`), at most speculative_tokens, the step's `budget`, one
        less than the tokens max_tokens leaves (the step emits up to one more than it drafts) and
        `prefill_chunk - 1` (a rolling slot's rule for a chunk: it never evicts keys its own queries need)."""
        assert seq.lookup is not None
        k = min(seq.params.speculative_tokens, budget, seq.params.max_tokens - len(seq.out) - 1, self.prefill_chunk - 1)
        return seq.lookup.draft(seq.tokens, k) if k > 0 else []

    def _verify(self, seq: _Seq, item: Item, res: Result) -> None:
        """A decoding row that ran its last token and a draft (`item.tokens`): the logits of each
        position emitted in turn, exactly as plain decoding's steps would emit them (penalties,
        constraints, stops and max_tokens included), while the token emitted equals the draft's next,
        whose keys and values are then the ones plain decoding computes; the positions after the last
        one kept are marked empty (`Runner.forget`), so the cache is plain decoding's."""
        draft, seq.draft = seq.draft, []
        assert res.logits_TV is not None and len(res.logits_TV) == len(draft) + 1
        kept = 0
        for j, top in enumerate(row_argmax(res.logits_TV)):
            seq.n_cached = item.start + j + 1  # the last token and the drafts kept so far
            n = len(seq.out)
            self._emit(seq, res.logits_TV[j : j + 1], None, top)
            if j == len(draft) or seq.out[n:] != [draft[j]]:
                break
            kept += 1
            if seq not in self._running:  # it ended on that token (a stop, max_tokens)
                break
        self.runner.forget(seq.slot, seq.n_cached, item.start + len(item.tokens))
        self._stats["draft_tokens"] += len(draft)
        self._stats["accepted_tokens"] += kept

    def _handle_cancels(self) -> None:
        with self._lock:
            ids, self._cancel_ids = self._cancel_ids, set()
            if not ids:
                return
            keep: deque[_Seq] = deque()
            cancelled: list[_Seq] = []
            for seq in self._waiting:
                (cancelled if seq.rid in ids else keep).append(seq)
            self._waiting = keep
        # (a running request that has ended, its last token running once more for its experts alone, is not
        # cancelled: its last output, which the cancel would send without them, is already decided)
        for seq in cancelled + [s for s in self._running if s.rid in ids and not s.routing_only]:
            self._finish(seq, "cancelled")

    @staticmethod
    def _scored_prefix(source: _Seq, seq: _Seq) -> int:
        """Prompt tokens whose keys and values *and prompt logprobs* `seq` (with `prompt_logprobs`)
        may take from `source`: one short of their common prompt prefix (the logits of that prefix's
        last position predict `seq`'s first token of its own, so they run again), and none when
        `source` computes no prompt logprobs or other alternatives, or runs under another adapter."""
        if (not source.params.prompt_logprobs or source.params.prompt_top != seq.params.prompt_top
                or source.params.adapter != seq.params.adapter):
            return 0
        return max(common_prefix(source.prompt, seq.prompt, len(seq.prompt)) - 1, 0)

    def _shared(self, seq: _Seq) -> tuple[_Seq | None, int, int]:
        """The running sequence whose keys and values `seq`'s prompt can start from: (that sequence,
        prompt tokens it holds now, prompt tokens it will hold once its own prompt is in). Only slots
        that have not wrapped around qualify, and at least one prompt token is left to run. A request
        with prompt logprobs (an evaluation harness scoring one context with several endings) also
        takes the source's logprobs (`_scored_prefix`). Only a sequence under the same adapter (or both
        under the base model) qualifies: another's keys are other numbers."""
        best: tuple[_Seq | None, int, int] = (None, 0, 0)
        if not self.runner.prefix_cache:
            return best
        for s in self._running:
            if s.n_cached > self.runner.capacity or s.params.adapter != seq.params.adapter:
                continue
            if seq.params.prompt_logprobs:
                n = self._scored_prefix(s, seq)
            else:
                n = common_prefix(s.tokens, seq.prompt, len(seq.prompt) - 1)
            now = min(n, s.n_cached)
            later = now if len(s.prompt) > self.runner.capacity else max(now, min(n, len(s.prompt)))
            if (later, now) > (best[2], best[1]):
                best = (s, now, later)
        return best

    def _admit(self) -> None:
        while len(self._running) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    return
                seq = self._waiting[0]
            try:
                source, now, later = self._shared(seq)
                if later > now and later >= SHARE_WAIT:
                    return  # a running prompt that begins as this one does is still prefilling: copy it after
                reuse: bool | dict[int, int] = True  # a free slot's prefix; with prompt logprobs, its logprobs too
                if seq.params.prompt_logprobs:
                    reuse = {slot: self._scored_prefix(s, seq) for slot, s in self._scored.items()}
                alloc = self.runner.allocate(seq.prompt, len(seq.prompt) + seq.params.max_tokens, reuse=reuse,
                                             adapter=seq.params.adapter)
                if alloc is None:
                    return  # the cache is full: it waits (first come, first served)
                with self._lock:
                    self._waiting.popleft()
                seq.slot, seq.n_cached = alloc
                kept = self._scored.pop(seq.slot, None)  # the slot's old keys are written over from here on
                self._running.append(seq)  # from here on, finishing it frees its slot
                seq.handle._state = "prefilling"
                if source is not None and now > seq.n_cached:  # a running sequence holds more of the prompt
                    self.runner.copy_prefix(source.slot, seq.slot, now)
                    seq.n_cached = now
                else:
                    source = kept if seq.n_cached else None
                self._setup(seq, source)
            except Exception as e:  # noqa: BLE001 (out of memory, say: this request fails, not the engine)
                with self._lock:
                    if self._waiting and self._waiting[0] is seq:
                        self._waiting.popleft()
                self._finish(seq, "error", error=f"{type(e).__name__}: {e}")

    def _setup(self, seq: _Seq, source: _Seq | None = None) -> None:
        """A newly admitted request's state: its prompt logprobs (those of the prompt tokens it took
        from `source`, see `_scored_prefix`), penalty and bias rows."""
        seq.cached_tokens = seq.n_cached
        self._stats["cached_tokens"] += seq.n_cached
        if seq.params.prompt_logprobs:
            seq.prompt_lp, seq.prompt_top = [None], [None] if seq.params.prompt_top else None
            seq.prompt_rank = [None]
            if seq.n_cached and source is not None and source.prompt_lp is not None:
                seq.prompt_lp = source.prompt_lp[: seq.n_cached + 1]
                if seq.prompt_top is not None and source.prompt_top is not None:
                    seq.prompt_top = source.prompt_top[: seq.n_cached + 1]
                if source.prompt_rank is not None:
                    seq.prompt_rank = source.prompt_rank[: seq.n_cached + 1]
        V = self.config.vocab_size
        if seq.params.repetition_penalty != 1.0:
            seq.seen_1V = torch.zeros(1, V, dtype=torch.bool, device=self.runner.device)
            seq.seen_1V[0, seq.prompt] = True
        if seq.params.presence_penalty or seq.params.frequency_penalty:
            seq.counts_1V = torch.zeros(1, V, device=self.runner.device)
        if seq.params.logit_bias or seq.params.allowed_token_ids is not None:
            bias_1V = torch.zeros(1, V, device=self.runner.device)
            if seq.params.logit_bias:
                ids, values = zip(*seq.params.logit_bias.items(), strict=True)
                bias_1V[0, list(ids)] = torch.tensor(values, device=self.runner.device)
            if seq.params.allowed_token_ids is not None:  # vLLM's: every other token -inf
                allowed = torch.zeros(V, dtype=torch.bool, device=self.runner.device)
                allowed[seq.params.allowed_token_ids] = True
                bias_1V[0].masked_fill_(~allowed, -math.inf)
            seq.bias_1V = bias_1V

    def _emit(self, seq: _Seq, logits_1V: torch.Tensor, experts_LK: torch.Tensor | None,
              argmax: int | None = None) -> None:
        p = seq.params
        bias_1V = seq.bias_1V
        banned = banned_tokens(seq.bad_ids, seq.out) if seq.bad_ids else []  # bad_words' last tokens, now
        if len(seq.out) < p.min_tokens and seq.stop_ids and not (seq.matcher is not None and seq.matcher.ending):
            # min_tokens: no stop token yet (-inf, not -100), unless a failed constraint allows EOS alone
            banned += sorted(seq.stop_ids)
        if banned:
            bias_1V = torch.zeros_like(logits_1V) if bias_1V is None else bias_1V.clone()
            bias_1V[0, banned] = -math.inf
        tok: int | None = None
        if seq.sampler.greedy and seq.seen_1V is None and seq.counts_1V is None and bias_1V is None:
            if seq.matcher is None:  # greedy without penalties or biases: the step's batched argmax (NaN-free)
                tok = argmax
            elif p.logprobs is None:  # and under a constraint that allows the row's argmax (one bit of its mask):
                best = argmax if argmax is not None else row_argmax(logits_1V)[0]  # the masked row's argmax too
                tok = best if best is not None and seq.matcher.allows(best) else None
        if tok is None:
            if seq.matcher is not None:  # the constraint first: penalties, biases and logprobs see what it allows
                logits_1V = seq.matcher.mask(logits_1V)
            tok = sample_row(logits_1V, p, seq.sampler, seen_1V=seq.seen_1V, counts_1V=seq.counts_1V,
                             bias_1V=bias_1V, generator=seq.generator)
        if self.sync_token is not None:
            tok = self.sync_token(tok)
        refused = seq.matcher is not None and not seq.matcher.advance(tok)  # the output ends before it
        if not refused:
            seq.out.append(tok)
            self._stats["tokens_out"] += 1
        complete = seq.matcher is not None and seq.matcher.complete  # nothing more may follow
        if complete and seq.matcher is not None and seq.matcher.failed:  # the output ends here, "stop" (as vLLM)
            n = len(seq.out)
            where = f"before its token {n + 1}, which it could not take" if refused else f"at its token {n}"
            warnings.warn(f"request {seq.rid!r}: structured output: {seq.matcher.failed}; the output ends {where} "
                          "(finish_reason 'stop')", RuntimeWarning, stacklevel=2)
        if seq.seen_1V is not None:
            seq.seen_1V[0, tok] = True
        if seq.counts_1V is not None:
            seq.counts_1V[0, tok] += 1
        logprob, top = None, None
        if p.logprobs is not None and not refused:
            lp_V = torch.log_softmax(logits_1V[0], dim=-1)
            logprob = float(lp_V[tok])
            top = top_logprobs(lp_V, p.logprobs) if p.logprobs > 0 else []
        finish, text = None, ""
        stop_reason: int | str | None = None  # vLLM's (see RequestOutput)
        if refused:  # a last output without a token: the text the accepted tokens' decoder held back
            finish, text = "stop", self._flush_text(seq)
        elif tok in seq.stop_ids:
            finish = "stop"
            if p.include_stop_str_in_output and seq.decoder is not None:  # vLLM's: the stop token is decoded too
                seq.text += seq.decoder.push(tok)
            text = self._flush_text(seq)
            # vLLM's stop_reason: the stop token id that ended it; None for EOS (checked first, as vLLM does)
            stop_reason = tok if tok not in self.config.eos_ids or p.ignore_eos else None
        else:
            if seq.decoder is not None:
                seq.text += seq.decoder.push(tok)
            if len(seq.out) <= p.min_tokens:  # vLLM's min_tokens: stop strings too are not matched before it
                seq.stop_floor = len(seq.text)
            text, hit = self._take_text(seq)
            if hit is not None:
                finish, stop_reason = "stop", hit
            elif complete:
                finish = "stop"
                text += self._flush_text(seq)
            elif len(seq.out) >= p.max_tokens:
                finish = "length"
                text += self._flush_text(seq)
        if complete and seq.matcher is not None and seq.matcher.failed:
            stop_reason = f"structured output failed: {seq.matcher.failed}"  # mixlab's, not vLLM's
        out = RequestOutput(seq.rid, None if refused else tok, text, logprob, top, None, finish, len(seq.prompt),
                            len(seq.out), seq.cached_tokens, seq.prompt_lp if seq.first else None,
                            prompt_top_logprobs=seq.prompt_top if seq.first else None, stop_reason=stop_reason,
                            prompt_ranks=seq.prompt_rank if seq.first else None)
        seq.first = False
        if p.return_experts:
            # This step ran the previous token (the prompt's last, for the first output): its experts
            # complete that token's output. This token's come with the next step; a finished request
            # runs its last token once more for them (`routing_only`), its cache slot still held.
            self._give_held(seq, experts_LK)
            if not refused:
                seq.held = out
                seq.routing_only = finish is not None
                return
        if finish is not None:
            self._release(seq)
        self._outbox.append((seq.handle, out))

    def _give_held(self, seq: _Seq, experts_LK: torch.Tensor | None) -> None:
        """Send the held output of `seq` (return_experts) with the experts its token went to."""
        if seq.held is not None:
            seq.held.experts = experts_LK.tolist() if experts_LK is not None else None
            self._outbox.append((seq.handle, seq.held))
            seq.held = None

    def _take_text(self, seq: _Seq) -> tuple[str, str | None]:
        """The text that can be streamed now and the stop string that completed, if one did."""
        stops = seq.params.stop
        if not stops:
            text, seq.sent = seq.text[seq.sent :], len(seq.text)
            return text, None
        hit = self._find_stop(seq)
        if hit is not None:
            end = self._stop_end(seq, *hit)
            text = seq.text[seq.sent : end] if end > seq.sent else ""
            seq.sent = len(seq.text)
            return text, hit[1]
        # a stop string may still begin after `safe`: held back, unless it is to be sent anyway (vLLM's)
        held = 0 if seq.params.include_stop_str_in_output else max(map(len, stops)) - 1
        safe = max(seq.sent, len(seq.text) - held)
        text, seq.sent = seq.text[seq.sent : safe], safe
        return text, None

    def _flush_text(self, seq: _Seq) -> str:
        if seq.decoder is not None:
            seq.text += seq.decoder.flush()
            if len(seq.out) <= seq.params.min_tokens:
                seq.stop_floor = len(seq.text)
        if seq.params.stop:  # the held-back tail may still contain a stop string
            hit = self._find_stop(seq)
            text = seq.text[seq.sent : len(seq.text) if hit is None else max(self._stop_end(seq, *hit), seq.sent)]
        else:
            text = seq.text[seq.sent :]
        seq.sent = len(seq.text)
        return text

    @staticmethod
    def _stop_end(seq: _Seq, at: int, stop: str) -> int:
        """Where the text ends when the stop string `stop` was found at `at`: before it, or (vLLM's
        include_stop_str_in_output) after it; what follows it in the same token is dropped either way."""
        return at + len(stop) if seq.params.include_stop_str_in_output else at

    @staticmethod
    def _find_stop(seq: _Seq) -> tuple[int, str] | None:
        """Where the first stop string in the unsent text begins, and which it is: one that ends after
        `stop_floor` and overlaps the unsent text (anything earlier was searched already)."""
        hits = [(i, s) for s in seq.params.stop
                if (i := seq.text.find(s, max(0, seq.sent - len(s) + 1, seq.stop_floor - len(s) + 1))) >= 0]
        return min(hits, key=lambda h: h[0]) if hits else None

    def _release(self, seq: _Seq, *, keep: bool = True) -> None:
        if seq in self._running:
            self._running.remove(seq)
            # `keep`: the slot's tokens stay for prefix reuse. Not after an error: a failed step may
            # have written part of its chunk, over the oldest positions of a rolling slot
            self.runner.free(seq.slot, seq.tokens[: seq.n_cached] if keep else [], seq.params.adapter)
            if keep and seq.params.prompt_logprobs:
                self._scored[seq.slot] = seq  # its prompt logprobs go with the keys the slot keeps
        with self._lock:  # a cancel still pending was meant for this request: not for the next with its id
            self._live.pop(seq.rid, None)
            self._cancel_ids.discard(seq.rid)

    def _finish(self, seq: _Seq, reason: str, *, error: str | None = None) -> None:
        self._release(seq, keep=reason != "error")
        held, seq.held = seq.held, None
        if held is not None:  # return_experts: a token whose experts never came still goes out (without them)
            seq.handle._push(held)
            if held.finish_reason is not None:  # the request had ended; only its last token's routing was lost
                return
        seq.handle._push(RequestOutput(seq.rid, None, "", None, None, None, reason, len(seq.prompt), len(seq.out),
                                       seq.cached_tokens, seq.prompt_lp if seq.first else None, error,
                                       prompt_top_logprobs=seq.prompt_top if seq.first else None,
                                       prompt_ranks=seq.prompt_rank if seq.first else None))
        seq.first = False

    def run_until_idle(self, *, poll: float = 0.0) -> None:
        """Drive `step()` from the calling thread until no request is left (without `start()`)."""
        while self.has_work():
            if not self.step() and poll:
                time.sleep(poll)
