"""The engine's public types: `SamplingParams` (per request), `RequestOutput` (streamed), `Handle`
(a request's stream, iterable from threads and from asyncio), `QueueFull`.

A request streams one `RequestOutput` per generated token. The output that carries a
`finish_reason` is the last one: for "stop" and "length" it is the last token's own output (its
`text` includes whatever the stream decoder still held back); for "cancelled" and "error" it is an
extra output with `token_id=None`, as it is for the "stop" of a structured output whose constraint
refused the token sampled (`Matcher.advance`: that token is dropped; the output's `text` is what was
held back). Stop tokens (EOS, `stop_token_ids`) are reported as tokens but
add no text; a stop string ends the text just before it (OpenAI's convention), and text that could
still become a stop string is held back until it cannot.
"""

from __future__ import annotations

import asyncio
import math
import operator
import queue
import reprlib
import threading
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

from mixlab.tokenizer import check_text

if TYPE_CHECKING:
    from mixlab.engine.structured import Structured

__all__ = ["GREEDY_TEMPERATURE", "MAX_LOGPROBS", "Handle", "QueueFull", "RequestOutput", "SamplingParams"]

# Temperatures below this decode greedily (vLLM's rule): dividing the logits by a tinier one overflows
# float32 (1e-45: inf logits, NaN probabilities), and the limit of sampling as it goes to 0 is greedy.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # top alternatives per token, at most: OpenAI's bound, and vLLM's default max_logprobs


class QueueFull(RuntimeError):
    """The engine's waiting queue is full (`max_queue`): retry later (HTTP 503/429)."""


class _Shown(reprlib.Repr):
    """A value as an error shows it: its start. Whole, a list of a million ids made a message as long, and
    one nested 1,000 deep (or an int of 5,000 digits) raised RecursionError (ValueError) writing it."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxdict, self.maxstring, self.maxother = 3, 8, 8, 80, 80

    def repr_int(self, x: int, level: int) -> str:
        return super().repr_int(x, level) if x.bit_length() < 4000 else f"<an integer of {x.bit_length()} bits>"


def _bad(name: str, value: object, expected: str) -> ValueError:
    return ValueError(f"invalid {name}={_Shown().repr(value)}: expected {expected}")


def _is_array(x: object, ndim: int) -> TypeGuard[Any]:
    """A torch tensor or NumPy array of `ndim` dimensions (ids come as either)."""
    return type(x).__module__.split(".")[0] in ("torch", "numpy") and getattr(x, "ndim", None) == ndim


def _number(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, int) and abs(v) > 1e308) \
            or not math.isfinite(v):  # (an int of 309 digits or more: no float, math.isfinite's OverflowError)
        raise _bad(name, v, "a finite number")
    return float(v)


def _int(name: str, v: object, lo: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _bad(name, v, what)
    return v


@dataclass
class SamplingParams:
    """How one request is decoded. Penalties follow vLLM/OpenAI: `repetition_penalty` (CTRL, arXiv
    1909.05858) over prompt and output tokens, `presence_penalty` / `frequency_penalty` over output
    tokens; then temperature, top-k, top-p, min-p. `logit_bias` ({token id: bias in [-100, 100]}, OpenAI's) is added
    to the logits before all of them. `temperature=0` (below 1e-5) is greedy. `seed` seeds the
    request's own generator: its samples do not depend on what else the engine runs."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings, matched on the decoded text
    logprobs: int | None = None  # None: off; 0: the chosen token's logprob; n <= MAX_LOGPROBS: plus the top n
    prompt_logprobs: bool = False  # the logprob (and rank) of every prompt token (None for the first)
    # vLLM's prompt_logprobs=N: the N most likely tokens at each prompt position too (None: logprobs's n)
    prompt_top_logprobs: int | None = None
    return_experts: bool = False  # the experts of every MoE layer for each generated token
    ignore_eos: bool = False
    min_tokens: int = 0  # vLLM's: no stop token (EOS, stop_token_ids) or stop string before this many tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to those tokens' logits (logprobs: raw)
    # the text is `decode(output)` alone, not the prompt's continuation: a chat reply, whose first word loses
    # the leading space SentencePiece's "▁" gives it; stop strings are matched on that text
    decode_alone: bool = False
    # the output's form (JSON, a schema's, a regex's, a choice, a grammar's): tokens outside it are masked
    # before sampling (logprobs are the masked distribution's), and the output ends once it is complete
    structured: Structured | None = None
    adapter: str | None = None  # the engine's LoRA adapter of this name (`Engine(adapters=)`); None: the base model
    # greedy requests: up to this many tokens drafted by prompt lookup (`engine.lookup`) and verified in one
    # step, the output unchanged (0: off; sampled requests and return_experts decode one token a step)
    speculative_tokens: int = 0
    # vLLM's: the stop string that matched stays at the end of the text (and a stop token's text, EOS's
    # being none, is decoded into it), where OpenAI's convention cuts the text just before it
    include_stop_str_in_output: bool = False
    # vLLM's: only these tokens may be sampled (every other logit -inf before sampling; logprobs stay the
    # model's, as logit_bias's do); None: any
    allowed_token_ids: list[int] | None = None
    # vLLM's: words never generated. Each is encoded alone and with a leading space (`bad_words_ids`, vLLM's
    # rule); its last token is banned where the output's last tokens are the word's others (a one-token
    # word: always). Needs an engine made with a tokenizer
    bad_words: list[str] = field(default_factory=list)
    # vLLM's: False writes control tokens (`<s>`, `[INST]`...) into the text, as the tokenizer's `decode` names
    # them (a stop token still adds none, unless include_stop_str_in_output)
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """A ValueError naming the first field that is wrong; as it is made, and again in `Engine.submit`: a
        field set after (`params.max_tokens = 0`, `params.logit_bias = {"a": 1}`) went unchecked, to the
        engine's loop or a bare TypeError."""
        _int("max_tokens", self.max_tokens, 1, "an integer >= 1")
        _int("min_tokens", self.min_tokens, 0, "an integer >= 0")
        _int("speculative_tokens", self.speculative_tokens, 0, "an integer >= 0 (0 = off)")
        for name in ("prompt_logprobs", "return_experts", "ignore_eos", "decode_alone",
                     "include_stop_str_in_output", "skip_special_tokens"):  # "no" was true
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "True or False")
        if self.min_tokens > self.max_tokens:
            raise _bad("min_tokens", self.min_tokens, f"at most max_tokens ({self.max_tokens})")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):  # as floats: an int of 64 bits or more overflowed in the engine's loop
            setattr(self, name, _number(name, getattr(self, name)))
        if self.temperature < 0:
            raise _bad("temperature", self.temperature, "a number >= 0 (0 = greedy)")
        _int("top_k", self.top_k, -1, "an integer >= -1 (0 or -1 = off)")
        if not 0 < self.top_p <= 1:
            raise _bad("top_p", self.top_p, "a number in (0, 1] (1 = off)")
        if not 0 <= self.min_p <= 1:
            raise _bad("min_p", self.min_p, "a number in [0, 1] (0 = off)")
        if self.repetition_penalty <= 0:
            raise _bad("repetition_penalty", self.repetition_penalty, "a number > 0 (1 = off)")
        if self.seed is not None:
            _int("seed", self.seed, -(2**63), "an integer in [-2**63, 2**64) or None")
            if self.seed >= 2**64:  # a generator's seed is 64 bits
                raise _bad("seed", self.seed, "an integer in [-2**63, 2**64) or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise _bad("stop", self.stop, "a list of non-empty strings")
        for s in self.stop:  # one that no decoded text can contain would never stop anything
            check_text(s, f"stop string {s!r}")
        if not isinstance(self.stop_token_ids, (list, tuple, set)):
            raise _bad("stop_token_ids", self.stop_token_ids, "a list of token ids")
        try:  # True is not token 1, and no token has a negative id: either would never stop anything meant
            if any(isinstance(i, bool) for i in self.stop_token_ids):
                raise TypeError
            self.stop_token_ids = [operator.index(i) for i in self.stop_token_ids]
        except TypeError:
            raise _bad("stop_token_ids", self.stop_token_ids, "a list of integer token ids") from None
        if any(i < 0 for i in self.stop_token_ids):
            raise _bad("stop_token_ids", self.stop_token_ids, "token ids >= 0")
        if not isinstance(self.logit_bias, dict):
            raise _bad("logit_bias", self.logit_bias, "a dict of token id -> bias")
        try:
            self.logit_bias = {operator.index(k): _number(f"logit_bias[{k!r}]", v) for k, v in self.logit_bias.items()}
        except TypeError:
            raise _bad("logit_bias", self.logit_bias, "a dict with integer token ids as keys") from None
        for k, v in self.logit_bias.items():  # 1e300 became inf in float32 logits, then NaN probabilities
            if not -100 <= v <= 100:
                raise _bad(f"logit_bias[{k}]", v, "a number in [-100, 100] (OpenAI's bound: -100 bans the token)")
        # Bounded: each alternative costs every token (and every prompt token with prompt_logprobs) a
        # tuple; logprobs=10**6 listed the whole vocabulary at each position.
        for name in ("logprobs", "prompt_top_logprobs"):
            if getattr(self, name) is not None:
                expected = f"None or an integer in [0, {MAX_LOGPROBS}] (number of top alternatives)"
                if _int(name, getattr(self, name), 0, expected) > MAX_LOGPROBS:
                    raise _bad(name, getattr(self, name), expected)
        if self.allowed_token_ids is not None:
            expected = "None or a non-empty list of token ids >= 0"
            if not isinstance(self.allowed_token_ids, (list, tuple, set)) or not self.allowed_token_ids \
                    or any(isinstance(i, bool) for i in self.allowed_token_ids):
                raise _bad("allowed_token_ids", self.allowed_token_ids, expected)
            try:
                self.allowed_token_ids = [operator.index(i) for i in self.allowed_token_ids]
            except TypeError:
                raise _bad("allowed_token_ids", self.allowed_token_ids, expected) from None
            if any(i < 0 for i in self.allowed_token_ids):
                raise _bad("allowed_token_ids", self.allowed_token_ids, expected)
        if isinstance(self.bad_words, str) or not isinstance(self.bad_words, (list, tuple)) \
                or not all(isinstance(w, str) and w.strip() for w in self.bad_words):
            raise _bad("bad_words", self.bad_words, "a list of words (strings with a character other than spaces)")
        self.bad_words = list(self.bad_words)
        for w in self.bad_words:
            check_text(w, f"bad_words entry {w!r}")
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter):
            raise _bad("adapter", self.adapter, "None or the name of one of the engine's adapters")
        if self.structured is not None:
            from mixlab.engine.structured import Structured

            if not isinstance(self.structured, Structured):
                raise _bad("structured", self.structured, "a mixlab.engine.structured.Structured (or None)")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def prompt_top(self) -> int:
        """The top alternatives at each prompt position (with prompt_logprobs): prompt_top_logprobs, else logprobs."""
        n = self.logprobs if self.prompt_top_logprobs is None else self.prompt_top_logprobs
        return n or 0


@dataclass
class RequestOutput:
    """One streamed event of a request (see the module docstring for which output is the last)."""

    request_id: str
    token_id: int | None
    text: str  # the text this token completes (a StreamDecoder delta; '' possible)
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    # with return_experts: [layer][k], the experts this token went to as it ran through the model (its
    # output is sent once they are known: one step after the token, see `Engine`)
    experts: list[list[int]] | None
    finish_reason: str | None  # None while running; "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens found in the cache (not prefilled again)
    prompt_logprobs: list[float | None] | None  # only on the first output, when asked
    error: str | None = None
    # with prompt_logprobs and logprobs=n > 0 (or prompt_top_logprobs=n): the n most likely tokens at each prompt
    # position (None for the first), as OpenAI's echo + logprobs returns them (lm-eval's is_greedy reads them)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    # vLLM's, on a "stop" output: the stop string that matched, the `stop_token_ids` id that ended it, or
    # None (EOS); "structured output failed: <reason>" (mixlab's) when a constraint ended the output
    stop_reason: int | str | None = None
    # with prompt_logprobs: each prompt token's rank in its position's distribution (1: the most likely; None for
    # the first), vLLM's `rank`
    prompt_ranks: list[int | None] | None = None


_DONE = object()
STALL_WARNING_S = 10.0  # a blocked iteration checks this often whether anything can still arrive


class _Mailbox:
    """Outputs on their way from the engine thread to one event loop. The engine thread adds a step's
    outputs, then kicks once: one `call_soon_threadsafe` (one self-pipe write) hands them all over,
    so a step that streams to B requests wakes the loop once, not B times."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[object], object]] = []
        self._scheduled = False

    def add(self, aq: asyncio.Queue[object], item: object) -> None:
        with self._lock:
            self._items.append((aq, item))

    def kick(self) -> None:
        with self._lock:
            if self._scheduled or not self._items:
                return
            self._scheduled = True
        loop = self._loop()
        try:
            if loop is None:
                raise RuntimeError("the event loop is gone")
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop was closed: nobody is listening any more
            with self._lock:
                self._items.clear()
                self._scheduled = False

    def _drain(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for aq, item in items:
            aq.put_nowait(item)


def _deliver(outputs: list[tuple[Handle, RequestOutput]]) -> None:
    """Hand several requests' outputs over together (the engine thread, at the end of a step)."""
    boxes: dict[int, _Mailbox] = {}
    for handle, out in outputs:
        box = handle._stage(out)
        if box is not None:
            boxes[id(box)] = box
    for box in boxes.values():
        box.kick()


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()
_MAILBOXES_LOCK = threading.Lock()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    with _MAILBOXES_LOCK:
        box = _MAILBOXES.get(loop)
        if box is None:
            box = _MAILBOXES[loop] = _Mailbox(loop)
        return box


class Handle:
    """A submitted request: iterate it (blocking, from any thread) or `async for out in h.aiter()`
    for its `RequestOutput`s, once (`finished` once the last is read; iterating again yields nothing);
    `cancel()` stops it (a final output with "cancelled" follows); `state` says where it is."""

    def __init__(self, request_id: str, canceller: Callable[[Handle], None],
                 stalled: Callable[[], str | None] | None = None) -> None:
        self.request_id = request_id
        self._cancel = canceller
        self._stalled = stalled  # why nothing can arrive (an engine nobody runs), or None
        self._q: queue.SimpleQueue[object] = queue.SimpleQueue()  # C-implemented: cheap per token
        self._lock = threading.Lock()
        self._box: _Mailbox | None = None
        self._aq: asyncio.Queue[object] | None = None
        self.finished = False
        self._finish_reason: str | None = None  # the final output's, once the engine has sent it
        self._state = "waiting"  # set by the engine as the request moves on

    @property
    def state(self) -> str:
        """"waiting" (in the queue, no cache slot yet), "prefilling" (its prompt is being run),
        "decoding" (generating tokens) or "finished" (the engine has sent its last output)."""
        return "finished" if self._finish_reason is not None else self._state

    def __repr__(self) -> str:
        if self._finish_reason is None:
            return f"Handle(request_id={self.request_id!r}, state={self._state!r})"
        return f"Handle(request_id={self.request_id!r}, state='finished', finish_reason={self._finish_reason!r})"

    def cancel(self) -> None:
        """Stop the request; its last output (finish_reason "cancelled") still arrives."""
        self._cancel(self)

    def _push(self, out: RequestOutput) -> None:
        """Called by the engine thread."""
        box = self._stage(out)
        if box is not None:
            box.kick()

    def _stage(self, out: RequestOutput) -> _Mailbox | None:
        """Queue `out` (and the end, after a final output); the mailbox to kick when a loop listens."""
        with self._lock:
            self._finish_reason = out.finish_reason
            items: list[object] = [out, _DONE] if out.finish_reason is not None else [out]
            for item in items:
                if self._aq is not None and self._box is not None:
                    self._box.add(self._aq, item)
                else:
                    self._q.put(item)
            return self._box if self._aq is not None else None

    def _warn_if_stalled(self) -> bool:
        """Still waiting: say so (once) if the engine runs no thread and no steps; whether it said so."""
        why = self._stalled() if self._stalled is not None else None
        if why:
            warnings.warn(f"request {self.request_id!r} is waiting: {why}", RuntimeWarning, stacklevel=3)
        return bool(why)

    def __iter__(self) -> Iterator[RequestOutput]:
        warned = False
        while not self.finished:  # every output read already: nothing more will come (it waited forever)
            try:
                item = self._q.get(timeout=None if warned else STALL_WARNING_S)
            except queue.Empty:
                warned = self._warn_if_stalled()
                continue
            if item is _DONE:
                self.finished = True
                return
            assert isinstance(item, RequestOutput)
            yield item

    async def aiter(self) -> AsyncIterator[RequestOutput]:
        """The outputs in an event loop: `async for out in handle.aiter()` (no thread blocks). Cancelling
        the task that awaits it cancels the request (breaking out of the loop does not)."""
        with self._lock:
            if self._aq is None:
                self._box = _mailbox(asyncio.get_running_loop())
                self._aq = asyncio.Queue()
                while not self._q.empty():  # outputs pushed before the switch
                    self._aq.put_nowait(self._q.get_nowait())
        assert self._aq is not None
        warned = self._stalled is None
        while not self.finished:  # every output read already: nothing more will come (it waited forever)
            try:
                if warned or not self._aq.empty():
                    item = await self._aq.get()
                else:
                    try:
                        async with asyncio.timeout(STALL_WARNING_S):
                            item = await self._aq.get()
                    except TimeoutError:
                        warned = self._warn_if_stalled()
                        continue
            except asyncio.CancelledError:
                # The task reading it was cancelled (asyncio.wait_for's timeout, a TaskGroup, a client gone):
                # the request stops too, as vLLM's AsyncLLM.generate aborts its request; it decoded on to
                # max_tokens in a batch slot nobody read.
                self.cancel()
                raise
            if item is _DONE:
                self.finished = True
                return
            assert isinstance(item, RequestOutput)
            yield item

    def poll(self) -> list[RequestOutput]:
        """The outputs available now, without blocking (for a caller that drives `Engine.step`)."""
        out: list[RequestOutput] = []
        q = self._q
        while not q.empty():  # one consumer: what empty() saw is there
            item = q.get_nowait()
            if item is _DONE:
                self.finished = True
                return out
            assert isinstance(item, RequestOutput)
            out.append(item)
        return out

    def result(self) -> list[RequestOutput]:
        """Block until the request finishes; all its outputs (those not read yet)."""
        if self.finished:
            raise RuntimeError(f"request {self.request_id!r}: its outputs were read already (a handle gives them once)")
        return list(self)
