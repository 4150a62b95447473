"""What the server's modules share: its configuration (`ServerConfig`), the checks and engine submission
every endpoint makes (`Server`), and one choice's outputs turned into text and logprob entries (`Choice`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import string
import time
import weakref
from collections.abc import Callable, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from mixlab.engine import QueueFull, RequestOutput, SamplingParams, Structured
from mixlab.engine.structured import lltokenizer
from mixlab.serve.metrics import Metrics
from mixlab.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ResponsesRequest,
    Tool,
    not_supported,
)
from mixlab.serve.store import Item, ResponseStore, Stored
from mixlab.tokenizer import ChatError, Tokenizer

_T = TypeVar("_T")
# what the access log cannot show (an error after a stream's 200); server._config sends it to stderr beside uvicorn's
log = logging.getLogger("mixlab.serve")


class EngineLike(Protocol):
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None) -> Any: ...
    def cancel(self, request: Any) -> None: ...
    def stats(self) -> dict[str, Any]: ...


class LiveResponse(Protocol):
    """A Responses API response still being made (responses.py's), as the drain sees it."""

    @property
    def background(self) -> bool: ...
    @property
    def task(self) -> asyncio.Task[None] | None: ...


@dataclass
class ServerConfig:
    """What the server answers with and the bounds it enforces."""

    model_name: str = "mixlab"
    context_len: int = 4096  # prompt + max_tokens must fit (the engine's per-sequence room)
    max_tokens_limit: int | None = None  # the largest max_tokens accepted (default: context_len)
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    read_timeout_s: float = 60.0  # a request's head, then its whole body, must arrive within this time (and
    # a client that reads nothing of its response for as long is disconnected: server._H11)
    # open connections at most (idle keep-alive ones too): a request on one more is answered 503 and its
    # connection closed, before its body is read (each may buffer up to max_body_bytes); None: no cap
    max_connections: int | None = 512
    cors_origins: list[str] = field(default_factory=list)
    # Host header names answered besides IP addresses and localhost (DNS rebinding: a web page whose
    # name an attacker points at 127.0.0.1 is same-origin with this server); None: any name
    allowed_hosts: list[str] | None = field(default_factory=list)
    retry_after_s: int = 1
    model_info: dict[str, Any] = field(default_factory=dict)  # extra /v1/models fields (layers, experts)
    model_root: str | None = None  # /v1/models' `root`: where the model was loaded from
    # the engine's LoRA adapters (`Engine(adapters=)`), each served as a model of its own name: name -> folder
    adapters: dict[str, str] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))  # /v1/models' `created`: when it loaded
    # build llguidance's view of the tokenizer (structured outputs) as the server starts, not in the first
    # constrained request's time (~0.2 s for 32,000 tokens); nothing happens without llguidance
    prepare_structured: bool = True
    # Responses API responses kept (store.py) for previous_response_id and GET / DELETE /v1/responses/{id}: at
    # most this many, of at most this many bytes together; 0: none (POST /v1/responses is stateless)
    responses_store: int = 1000
    responses_store_bytes: int = 256 << 20
    # greedy requests draft up to this many tokens a step by prompt lookup (`SamplingParams.speculative_tokens`:
    # the same outputs, in fewer steps where they repeat the prompt); 0: off
    speculative_tokens: int = 0

    def __post_init__(self) -> None:
        if self.responses_store < 0 or self.responses_store_bytes < 1:
            raise ValueError(f"ServerConfig.responses_store must be >= 0 and responses_store_bytes >= 1, got "
                             f"{self.responses_store} and {self.responses_store_bytes}")
        if self.api_key is not None and (why := api_key_problem(self.api_key)):
            raise ValueError(f"ServerConfig.api_key {why}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"ServerConfig.max_connections must be >= 1 or None, got {self.max_connections}")
        if self.model_name in self.adapters:
            raise ValueError(f"ServerConfig.adapters: the adapter name {self.model_name!r} is the model's own name")


def api_key_problem(key: str) -> str | None:
    """Why no client could send `key` as `Authorization: Bearer KEY`, or None. An empty key let every
    request through (an absent header compared equal to it); HTTP headers are ASCII and trimmed of
    spaces, so a key with others never matched."""
    if not key:
        return "is empty: it would let every request in"
    if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
        return "has a space or a character that is not printable ASCII: no client can send it in an HTTP header"
    return None


# ------------------------------------------------------------------------------------------------
# one choice: engine outputs -> text, logprobs, experts


def token_piece(tok: Tokenizer, i: int, start: bool = False) -> tuple[str, list[int]]:
    """A token's own text and bytes, for top-logprob alternatives ("▁" is a space; a byte piece is
    its byte, whose text is U+FFFD, as OpenAI reports a partial character; an id past the
    tokenizer's vocabulary, a padded vocabulary's, has no text, as the stream decoder gives it).
    `start`: the token begins a text (a chat reply, an echoed prompt, a completion of an empty prompt), where
    its one leading space is dropped, as the chosen token's is: the alternatives are shown as the text would
    begin with them."""
    if i >= tok.vocab_size:
        return "", []
    b = tok.piece_byte(i)
    if b is not None:
        return bytes([b]).decode("utf-8", errors="replace"), [b]
    text = tok.id_to_piece(i).replace("\u2581", " ")
    if start and text.startswith(" "):
        text = text[1:]
    return text, list(text.encode())


def token_name(i: int, text: str, as_ids: bool) -> str:
    """A logprob entry's `token`: its text, or (vLLM's return_tokens_as_token_ids) "token_id:<i>", which
    names a token whose text is not one (a byte piece's half character, a control token's nothing)."""
    return f"token_id:{i}" if as_ids else text


@dataclass
class Choice:
    index: int
    handle: Any
    alone: bool = False  # its first token begins a text: a chat reply (decoded alone), a prompt of BOS alone
    hidden: bool = False  # max_tokens=0 with echo: the one generated token is not reported
    text: str = ""
    tokens: list[dict[str, Any]] = field(default_factory=list)  # logprob entries
    token_ids: list[int] = field(default_factory=list)  # the generated ids (return_token_ids)
    experts: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or stop token id that ended it
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list[float | None] | None = None
    prompt_top: list[Any] | None = None
    prompt_ranks: list[int | None] | None = None
    as_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprob tokens are "token_id:123"

    def tool_calls(self, token: int | None, *, parallel: bool = True) -> list[dict[str, Any]] | None:
        """OpenAI's `tool_calls` when the reply began with `token` ([TOOL_CALLS]; None: tools not rendered) and
        the text after it parses (`tool_calls_of`), else None (the reply is its text). `parallel` False (the
        request's `parallel_tool_calls`): the first call alone, as vLLM keeps it where the model wrote several."""
        if token is None or self.token_ids[:1] != [token]:
            return None
        calls = tool_calls_of(self.text.removeprefix("[TOOL_CALLS]"))  # its text with skip_special_tokens false
        return calls if calls is None or parallel else calls[:1]

    def take(self, out: RequestOutput, tok: Tokenizer, want_logprobs: bool) -> tuple[str, dict | None, dict | None]:
        """Consume one output; return (text delta, logprob entry, experts entry) to report."""
        self.prompt_tokens, self.cached_tokens = out.prompt_tokens, out.cached_tokens
        self.completion_tokens = out.completion_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
            self.prompt_top = getattr(out, "prompt_top_logprobs", None)
            self.prompt_ranks = getattr(out, "prompt_ranks", None)
        if out.finish_reason is not None:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
            self.error = out.error
        if self.hidden:
            if out.finish_reason is not None:
                self.finish_reason = "length" if out.finish_reason in ("stop", "length") else out.finish_reason
                self.stop_reason = None
            self.completion_tokens = 0
            return "", None, None
        delta = out.text
        self.text += delta
        if out.token_id is None:
            return delta, None, None
        self.token_ids.append(out.token_id)
        lp = ex = None
        if want_logprobs and out.logprob is not None:
            # a stop token gets an entry too (its text is only what the decoder still held back):
            # lm-eval's scoring slices token_logprobs[ctxlen:-1], which assumes one per generated token
            start = self.alone and out.completion_tokens == 1
            top = [{"token": token_name(i, text, self.as_ids), "logprob": v, "bytes": raw, "id": i}
                   for i, v in (out.top_logprobs or []) for text, raw in [token_piece(tok, i, start)]]
            # "text": the delta, whose lengths give the legacy text_offset whatever "token" shows
            lp = {"token": token_name(out.token_id, delta, self.as_ids), "text": delta, "logprob": out.logprob,
                  "bytes": list(delta.encode()), "id": out.token_id, "top_logprobs": top, "start": start}
            self.tokens.append(lp)
        if out.experts is not None:
            ex = {"token_id": out.token_id, "text": delta, "experts": out.experts}
            self.experts.append(ex)
        return delta, lp, ex


# ------------------------------------------------------------------------------------------------


class Server:
    def __init__(self, engine: EngineLike, tok: Tokenizer, cfg: ServerConfig) -> None:
        self.engine, self.tok, self.cfg = engine, tok, cfg
        self.metrics = Metrics(engine.stats)
        self.draining = False
        self.connections: Sized = ()  # the open connections: server._Server puts uvicorn's set here
        self.limit = cfg.max_tokens_limit or cfg.context_len
        # prompts are encoded in this thread: a long text takes seconds (3 MB: 4-6 s), and on the event
        # loop every stream, and /health, waited for it; one thread, to leave the cores to the engine
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="mixlab-encode")
        if cfg.prepare_structured:  # without llguidance its ImportError stays in the future: the requests say it
            self.encoder.submit(lltokenizer, tok)
        self.store = ResponseStore(cfg.responses_store, cfg.responses_store_bytes) if cfg.responses_store else None
        if self.store is not None:
            store = self.store
            self.metrics.watch_store(lambda: len(store), lambda: store.nbytes)
        # responses still being made that GET answers (stored once finished): as many as the engine holds requests
        self.live: dict[str, LiveResponse] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # the app's, once a request has been submitted
        # the engine requests submitted (`submit`), for `abort`; a finished one's handle is let go
        self.handles: weakref.WeakSet[Any] = weakref.WeakSet()
        self.aborted = False  # the drain's deadline passed (or a second signal came): what ran was ended

    async def off_loop(self, encode: Callable[..., _T], *args: Any, **kw: Any) -> _T:
        """`encode(*args, **kw)` in the encoding thread."""
        return await asyncio.get_running_loop().run_in_executor(self.encoder, functools.partial(encode, *args, **kw))

    async def encode_chat(self, messages: list[ChatMessage], param: str, *, room: int | None = None,
                          keep: int = 1, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The chat template's token ids for `messages` (in the encoding thread); its errors a 400 naming `param`.
        `room`: the oldest turns before the last `keep` messages dropped to fit in it (`encode_chat_within`).
        `tools`: rendered for the model to call (a v2/v3 template's; a v1 one's is a 400 naming tools)."""
        if tools and self.tok.chat_version == 1:
            raise ApiError(400, "tools: this model's chat template (Mistral's v1, Mixtral 8x7B Instruct's) has no "
                                "tools, so it cannot call them; send tool_choice \"none\" (tools are not shown) or "
                                "serve a model with a v2/v3 tokenizer", param="tools")

        def encode() -> list[int]:
            chat = [m.template() for m in messages]
            if room is None:
                return self.tok.encode_chat(chat, tools=tools)
            return self.tok.encode_chat_within(chat, room, keep, tools=tools)[0]

        try:
            return await self.off_loop(encode)
        except ChatError as e:
            raise ApiError(400, f"invalid {param}: {e}", param=param) from None

    # -- the Responses API's store (touched on the event loop only) --

    def conversation(self, previous: str | None) -> tuple[Item, ...]:
        """The turns `previous_response_id` continues: that response's conversation, then its output."""
        if previous is None:
            return ()
        if self.store is None:
            raise ApiError(400, not_supported("previous_response_id", previous, None), param="previous_response_id")
        if previous in self.live:
            raise ApiError(400, f"previous_response_id: response {previous!r} is still in progress: continue it "
                                "once it has finished (GET /v1/responses/{id} shows its status)",
                           param="previous_response_id")
        stored = self.store.get(previous)
        if stored is None:
            raise ApiError(404, f"Previous response with id {previous[:80]!r} not found ({self.absent()})",
                           param="previous_response_id", code="previous_response_not_found")
        return (*stored.items, *stored.output)

    def stored(self, response_id: str, *, delete: bool = False) -> Stored:
        """A stored response (`delete`: taken out of the store), else a 404 naming it."""
        if self.store is None:
            raise ApiError(404, f"no response {response_id[:80]!r}: this server stores no responses (POST "
                                "/v1/responses is stateless; its `store` is answered false)", param="response_id",
                           code="not_found")
        stored = self.store.pop(response_id) if delete else self.store.get(response_id)
        if stored is None:
            raise ApiError(404, f"Response with id {response_id[:80]!r} not found ({self.absent()})",
                           param="response_id", code="not_found")
        return stored

    def absent(self) -> str:
        n = self.store.max_count if self.store is not None else 0
        return f"not stored (store false), deleted, or evicted: this server keeps the last {n} (--responses-store)"

    # -- checks shared by the endpoints --

    def check_model(self, model: str | None) -> None:
        """A 404 for a `model` that is neither the model's name nor one of its adapters' (None: the model)."""
        if model is not None and model != self.cfg.model_name and model not in self.cfg.adapters:
            served = ", ".join(map(repr, [self.cfg.model_name, *self.cfg.adapters]))
            raise ApiError(404, f"the model {model[:80]!r} does not exist; this server serves {served}",
                           param="model", code="model_not_found")

    def drain(self) -> None:
        """The server is shutting down (SIGTERM): requests get 503 and background responses are cancelled (their
        results would live in this process's memory only, and no connection waits for them). Called from a signal
        handler or another thread: the event loop cancels them."""
        self.draining = True
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.cancel_background)

    def abort(self) -> None:
        """The drain's deadline (`--drain-timeout`), or a second signal: every engine request still waiting or
        running is cancelled, so that its stream ends with an error event and `[DONE]`, and an unstreamed request
        is answered 503 (`failure`), rather than cut off when uvicorn cancels the handlers. On the event loop."""
        self.draining = self.aborted = True
        for handle in list(self.handles):
            handle.cancel()

    def abort_soon(self) -> None:
        """`abort`, from a signal handler or another thread."""
        self.draining = True
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.abort)

    def failure(self, reason: str | None, error: str | None) -> str:
        """What a request that ended with `reason` "error" or "cancelled" says: a server shutting down says so."""
        if self.aborted and reason == "cancelled":
            return "the server is shutting down: the request did not finish within its drain (--drain-timeout)"
        return f"generation failed: {error or reason}"

    def cancel_background(self) -> None:
        for live in list(self.live.values()):
            if live.background and live.task is not None:
                live.task.cancel()

    def check_open(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down", code="shutting_down",
                           headers={"Retry-After": str(self.cfg.retry_after_s)})

    def max_tokens(self, asked: int | None, prompt_len: int, *, where: str, default: int | None,
                   param: str = "max_tokens") -> int:
        room = self.cfg.context_len - prompt_len
        if room < 1:
            verb = "take" if where == "messages" else "takes"
            raise ApiError(400, f"the {where} {verb} {prompt_len} tokens, which leaves no room for a reply in the "
                                f"context of {self.cfg.context_len} tokens", param=where,
                           code="context_length_exceeded")
        if asked is None:
            return min(default if default is not None else room, room, self.limit)
        if asked > self.limit:
            raise ApiError(400, f"invalid {param}={asked}: this server allows at most {self.limit}", param=param)
        if prompt_len + asked > self.cfg.context_len:
            raise ApiError(400, f"the {where} ({prompt_len} tokens) + {param}={asked} = {prompt_len + asked} "
                                f"exceeds the model's context of {self.cfg.context_len} tokens",
                           param=param, code="context_length_exceeded")
        return asked

    def structured(self, body: ChatCompletionRequest | CompletionRequest | ResponsesRequest) -> Structured | None:
        """The request's constraint on its output, compiled and built over the vocabulary (in the encoding
        thread: a large schema takes a while; llguidance's view of the tokenizer is made there as the server
        starts, or here with `ServerConfig.prepare_structured=False`)."""
        asked = body.constraint()
        if asked is None:
            return None
        param, kind, value = asked
        if kind == "tool_calls":  # a forced call (`protocol._tool_constraint`)
            assert not isinstance(body, CompletionRequest)
            return self.tool_calls_structured(body, value["tools"], parallel=value["parallel"])
        try:
            spec = Structured(kind, value)
            spec.prepare(self.tok)  # here, not in each choice's Engine.submit on the event loop
        except ValueError as e:
            raise ApiError(400, f"invalid {param}: {str(e).removeprefix(f'invalid structured {kind}: ')}",
                           param=param) from None
        except ImportError as e:
            raise ApiError(400, f"{param}: this server cannot constrain outputs: {e}", param=param) from None
        return spec

    def check_tools(self, body: ChatCompletionRequest | ResponsesRequest) -> None:
        """A 400 naming `tools[i].function.parameters` (the Responses API's: `tools[i].parameters`) for a tool's
        schema that is not one: llguidance compiles each, in
        its lenient mode, which skips the keywords it leaves out (`not`, `uniqueItems`...: they are JSON Schema,
        which the model only reads under "auto"), so what it refuses is broken (an unknown type, a `$ref` to
        nothing, a bad `pattern`). A schema with a `$ref` to another document is not checked (llguidance
        fetches none), nor is any without llguidance (calls that are not forced need none)."""
        for i, tool in enumerate(body.function_tools()):
            params = tool.function.parameters
            if not params or _remote_ref(params):
                continue
            guidance = params.get("x-guidance")
            try:
                Structured("json_schema", {**params, "x-guidance": {**(guidance if isinstance(guidance, dict) else {}),
                                                                      "lenient": True}})
            except ImportError:
                return
            except ValueError as e:
                where = body.tool_param(i, "parameters")
                raise ApiError(400, f"invalid {where}: not a JSON Schema: "
                                    f"{str(e).removeprefix('invalid structured json_schema: ')}", param=where) from None

    def tool_calls_structured(self, body: ChatCompletionRequest | ResponsesRequest, tools: list[Tool], *,
                              parallel: bool) -> Structured:
        """A forced tool call's constraint (`tool_calls_grammar`), built over the vocabulary; a tool whose
        parameters llguidance cannot compile is a 400 naming it (`tools[i].function.parameters`; the Responses
        API's `tools[i].parameters`)."""
        sent = body.function_tools()
        try:
            grammar = tool_calls_grammar(self.tok, tools, parallel=parallel)
        except ValueError as e:
            raise ApiError(400, f"invalid tools: {e}", param="tools") from None
        try:
            spec = Structured("grammar", grammar)
            spec.prepare(self.tok)
        except ImportError as e:
            raise ApiError(400, f"tool_choice: this server cannot force a tool call: {e}",
                           param="tool_choice") from None
        except ValueError as e:
            param, why = "tool_choice", str(e).removeprefix("invalid structured grammar: ")
            for i, tool in enumerate(sent):  # which tool's schema it was
                try:
                    if tool in tools:
                        Structured("json_schema", tool.function.parameters or {"type": "object"})
                except ValueError as bad:
                    param, why = body.tool_param(i, "parameters"), str(bad).removeprefix("invalid structured "
                                                                                           "json_schema: ")
                    break
            raise ApiError(400, f"invalid {param}: {why}", param=param) from None
        return spec

    def sampling(self, body: ChatCompletionRequest | CompletionRequest | ResponsesRequest, max_tokens: int, choice: int,
                 logprobs: int | None, prompt_logprobs: bool = False, decode_alone: bool = False,
                 structured: Structured | None = None, prompt_top: int | None = None) -> SamplingParams:
        if body.allowed_token_ids and not choice:  # a 400 naming it, before any choice is queued
            self.check_ids(body.allowed_token_ids, "allowed_token_ids")
        seed = body.seed
        if seed is not None and choice:  # n > 1: each choice its own (reproducible) stream
            seed = (seed + choice + 2**63) % 2**64 - 2**63
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if body.temperature is None else float(body.temperature),
                top_p=1.0 if body.top_p is None else float(body.top_p), top_k=body.top_k,
                min_p=float(body.min_p), repetition_penalty=float(body.repetition_penalty),
                presence_penalty=float(body.presence_penalty), frequency_penalty=float(body.frequency_penalty),
                seed=seed, stop=body.stops(), stop_token_ids=list(body.stop_token_ids or []), logprobs=logprobs,
                prompt_logprobs=prompt_logprobs, prompt_top_logprobs=prompt_top, return_experts=body.return_experts,
                ignore_eos=body.ignore_eos,
                logit_bias=body.biases(), min_tokens=body.min_tokens, decode_alone=decode_alone,
                structured=structured, adapter=body.model if body.model in self.cfg.adapters else None,
                speculative_tokens=self.cfg.speculative_tokens,
                include_stop_str_in_output=body.include_stop_str_in_output,
                allowed_token_ids=body.allowed_token_ids, bad_words=list(body.bad_words or []),
                skip_special_tokens=body.skip_special_tokens)
        except ValueError as e:
            raise ApiError(400, str(e), param=_guess_param(str(e))) from None

    def check_truncate(self, k: int | None) -> int | None:
        """vLLM's truncate_prompt_tokens as a count of tokens kept (-1: the context's worth; None: all); a `k`
        over the context is a 400 in vLLM's words (the prompt could never fit), before any work."""
        if k is None:
            return None
        n = self.cfg.context_len if k == -1 else k
        if n > self.cfg.context_len:
            raise ApiError(400, f"truncate_prompt_tokens value ({k}) is greater than max_model_len "
                                f"({self.cfg.context_len}). Please, select a smaller truncation size.",
                           param="truncate_prompt_tokens")
        return n

    def truncate(self, ids: list[int], k: int | None) -> list[int]:
        """The prompt's last tokens that truncate_prompt_tokens `k` keeps (`check_truncate`)."""
        n = self.check_truncate(k)
        return ids if n is None else ids[-n:]

    def check_ids(self, ids: list[int], param: str) -> None:
        V = self.tok.vocab_size if self.cfg.model_info.get("vocab_size") is None else self.cfg.model_info["vocab_size"]
        bad = [i for i in ids if not 0 <= i < V]
        if bad:
            raise ApiError(400, f"invalid {param}: token id {bad[0]} is outside the vocabulary [0, {V})", param=param)

    def check_count(self, count: int, *, param: str) -> None:
        queue = getattr(self.engine, "max_queue", None)
        if queue is not None and count > queue:  # it could never be queued: a 429 would be retried forever
            raise ApiError(400, f"this request asks for {count} completions (prompts x n); the server queues at "
                                f"most {queue} (--max-queue): send fewer per request", param=param)

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], rid: str, *, param: str,
               n: int) -> list[Any]:
        """One engine request per choice: `prompts` holds each prompt `n` times in a row."""
        self.check_count(len(prompts), param=param)
        handles: list[Any] = []
        try:
            for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
                handles.append(self.engine.submit(ids, p, request_id=f"{rid}-{i}"))
        except QueueFull as e:
            for h in handles:
                h.cancel()
            raise ApiError(429, f"the server is busy ({e}); retry after {self.cfg.retry_after_s} s",
                           type="server_error", code="queue_full",
                           headers={"Retry-After": str(self.cfg.retry_after_s)}) from None
        except ValueError as e:
            for h in handles:
                h.cancel()
            raise ApiError(400, str(e), param=_guess_param(str(e))) from None
        except RuntimeError as e:  # the engine was shut down under the server
            for h in handles:
                h.cancel()
            raise ApiError(503, f"the engine is not running: {e}", type="server_error",
                           code="engine_unavailable") from None
        for ids in prompts[::n]:  # a prompt counts once however many choices it has, as in `usage`
            self.metrics.prompt_tokens.inc(len(ids))
        self.loop = asyncio.get_running_loop()
        self.handles.update(handles)
        if self.aborted:  # submitted after the drain's deadline (its prompt was being encoded)
            for h in handles:
                h.cancel()
        return handles


def _guess_param(message: str) -> str | None:
    for name in ("min_tokens", "max_tokens", "logit_bias", "stop_token_ids", "allowed_token_ids", "bad_words",
                 "include_stop_str_in_output", "skip_special_tokens", "stop", "temperature", "top_p",
                 "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "logprobs",
                 "return_experts"):
        if name in message:
            return name
    if "prompt" in message:
        return "prompt"
    return None


def usage_of(choices: list[Choice], prompt_lens: list[int], n: int) -> dict[str, Any]:
    prompt = sum(prompt_lens)
    done = sum(c.completion_tokens for c in choices)
    cached = sum(c.cached_tokens for c in choices if c.index % n == 0)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
            "prompt_tokens_details": {"cached_tokens": cached}}


def decoded_token(tok: Tokenizer, i: int) -> str:
    """vLLM's `decoded_token` of a logprob: the token decoded alone (a control token: ""), with the leading spaces
    its piece's "▁" stand for, which decoding a text's first token drops, restored (vLLM's
    `convert_ids_list_to_tokens`)."""
    if i >= tok.vocab_size:
        return ""
    text, piece = tok.decode([i]), tok.id_to_piece(i)
    missing = (len(piece) - len(piece.lstrip("\u2581"))) - (len(text) - len(text.lstrip(" ")))
    return " " * missing + text if missing > 0 else text


def vllm_prompt_logprobs(c: Choice, ids: list[int], n: int, tok: Tokenizer) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then at each position {token id: {"logprob",
    "rank", "decoded_token"}} of the prompt's token (first) and the `n` most likely (ranks 1..n), -inf written as
    -9999.0 (vLLM's clamp: JSON has no infinity)."""
    lps, ranks, tops = c.prompt_logprobs or [], c.prompt_ranks or [], c.prompt_top or []
    out: list[dict[str, Any] | None] = [None]
    for k in range(1, min(len(ids), len(lps))):
        v = lps[k]
        assert v is not None
        entry = {str(ids[k]): {"logprob": max(v, -9999.0), "rank": ranks[k] if k < len(ranks) else None,
                               "decoded_token": decoded_token(tok, ids[k])}}
        for r, (i, lp) in enumerate(((tops[k] if k < len(tops) else None) or [])[:n]):
            entry[str(i)] = {"logprob": max(lp, -9999.0), "rank": r + 1, "decoded_token": decoded_token(tok, i)}
        out.append(entry)
    return out


def chat_lp(e: dict[str, Any]) -> dict[str, Any]:
    return {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"],
            "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"]}
                             for t in e["top_logprobs"]]}


_ID_CHARS = string.ascii_letters + string.digits


def tool_calls_of(text: str) -> list[dict[str, Any]] | None:
    """A v2/v3 model's reply after its [TOOL_CALLS] token, `[{"name", "arguments"[, "id"]}, ...]`, as OpenAI's
    `tool_calls`; None when it is not that JSON (it is then returned as text, as vLLM's mistral parser does).
    The id is the model's where v3 wrote one (9 letters and digits), else 9 random ones, as vLLM makes them."""
    try:
        calls = json.loads(text)
    except ValueError:
        return None
    if not isinstance(calls, list) or not calls:
        return None
    out = []
    for call in calls:
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and "arguments" in call):
            return None
        call_id = call.get("id")
        if not (isinstance(call_id, str) and len(call_id) == 9 and all(ch in _ID_CHARS for ch in call_id)):
            call_id = "".join(secrets.choice(_ID_CHARS) for _ in range(9))
        out.append({"id": call_id, "type": "function",  # arguments: JSON text, as vLLM writes them
                    "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}})
    return out


def _remote_ref(schema: Any) -> bool:
    """Whether a JSON Schema holds a `$ref` to another document (not `#...`); a loop, not a recursion: a
    request's schema may nest as deep as JSON lets it."""
    todo = [schema]
    while todo:
        x = todo.pop()
        if isinstance(x, dict):
            ref = x.get("$ref")
            if isinstance(ref, str) and not ref.startswith("#"):
                return True
            todo.extend(x.values())
        elif isinstance(x, list):
            todo.extend(x)
    return False


def tool_calls_grammar(tok: Tokenizer, tools: Sequence[Tool], *, parallel: bool = True) -> str:
    """A Lark grammar (llguidance's) of a reply that calls one of `tools`: the [TOOL_CALLS] control token, then
    the JSON list a v2/v3 chat template writes after it for an assistant's calls (`Tokenizer.chat_turns`: what
    the model was trained to write, its leading space and `json.dumps`'s separators included): at least one
    (`parallel` False: exactly one) `{"name": one of the tools' names, "arguments": that tool's parameters
    (none: any object)[, "id": 9 letters and digits, v3's]}`, which `tool_calls_of` parses. The tools' `$defs`
    (pydantic's schemas' `$ref` targets) go to the list's schema, where `#/$defs/...` finds them; ValueError
    when two tools define one name differently."""
    token = tok.special_id("[TOOL_CALLS]")
    if token is None or tok.chat_version not in (2, 3):
        raise ValueError(f"{tok.path} has no [TOOL_CALLS] control token (Mistral's v2/v3 chat template)")
    defs: dict[str, Any] = {}
    calls = []
    for tool in tools:
        arguments = dict(tool.function.parameters) or {"type": "object"}
        for key in ("$defs", "definitions"):
            for name, sub in (arguments.pop(key, None) or {}).items():
                if defs.setdefault(f"{key}/{name}", sub) != sub:
                    raise ValueError(f"the tools define {key}/{name} differently: a forced call's schema holds "
                                     "them all")
        props = {"name": {"const": tool.function.name}, "arguments": arguments}
        if tok.chat_version == 3:  # the id the template writes after the arguments, where the call had one
            props["id"] = {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}
        calls.append({"type": "object", "properties": props, "required": ["name", "arguments"],
                      "additionalProperties": False})
    schema: dict[str, Any] = {
        "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
        "type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1,
        **({} if parallel else {"maxItems": 1})}
    for key, sub in defs.items():
        group, name = key.split("/", 1)
        schema.setdefault(group, {})[name] = sub
    # the template's list is tok.encode(json text): a SentencePiece tokenizer spells its "[" with a space first
    spelled = "".join(tok.id_to_piece(i) for i in tok.encode("[", bos=False)).replace("\u2581", " ")
    lead = f" {json.dumps(spelled[:-1])}" if spelled.endswith("[") and len(spelled) > 1 else ""
    return f"start: <[{token}]>{lead} calls\ncalls: %json {json.dumps(schema)}\n"
