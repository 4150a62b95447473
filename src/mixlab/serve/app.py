"""The OpenAI-compatible HTTP API over an engine (`create_app`), and the chat page at `/`.

Requests become engine requests (`engine.submit(prompt_ids, SamplingParams)`, one per choice);
their `RequestOutput`s, one per token, become OpenAI's response objects or server-sent events.
The engine batches requests itself, so every handler here is a thin async translation: no model
work runs on the event loop.

Text conventions:
  - completions continue the prompt: the text of each token is the engine's stream-decoder delta
    (decoded with the prompt's last tokens as context, so a leading space is kept);
  - a chat reply drops the one leading space SentencePiece's "▁" puts on its first word (as
    `tokenizer.decode` of the reply alone, mistral-common and `mixlab chat` do), unless it continues
    a last assistant message sent with `"prefix": true`: the engine decodes it alone
    (`SamplingParams.decode_alone`), so that stop strings are matched on the text the client gets;
  - the logprob `token`s of a choice are those same deltas, so they concatenate to its text (a stop
    token, EOS or `stop_token_ids`, has an entry whose text is empty or what the decoder held back);
    the alternatives are the tokens' own pieces, less their leading space where the chosen token lost
    its own (the first token of a text: a chat reply's, an echoed prompt's, a completion's of an empty
    prompt: `token_piece(start=True)`).
"""

from __future__ import annotations

import asyncio
import email.message
import itertools
import json
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from importlib import resources
from typing import Any, TypeVar, get_type_hints

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from mixlab.engine import RequestOutput
from mixlab.engine.api import MAX_LOGPROBS
from mixlab.serve.common import (
    Choice,
    EngineLike,
    Server,
    ServerConfig,
    chat_lp,
    log,
    token_name,
    token_piece,
    usage_of,
    vllm_prompt_logprobs,
)
from mixlab.serve.guard import Guard
from mixlab.serve.metrics import CONTENT_TYPE
from mixlab.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
)
from mixlab.serve.responses import add_responses_routes
from mixlab.tokenizer import Tokenizer

__all__ = ["ServerConfig", "create_app"]

FINGERPRINT = "mixlab-0.1.0"
_M = TypeVar("_M", bound=BaseModel)
_F = TypeVar("_F", bound=Callable[..., Any])
_STATIC = ("index.html", "chat.js", "chat.css")


# ------------------------------------------------------------------------------------------------
# validation errors -> OpenAI's 400 with the parameter named

_EXPECTED = {
    "stop": "a non-empty string or a list of at most 16 non-empty strings",
    "prompt": "a non-empty string, list of strings, list of token ids or list of token-id lists",
    "messages": "a non-empty list of {'role': 'system'|'user'|'assistant'|'tool', 'content': str} messages",
    "messages.content": "a string or a list of {'type': 'text', 'text': str} parts (this model reads text only: no "
                        "images, audio or files)",
    "temperature": "a number in [0, 2]",
    "top_p": "a number in (0, 1]",
    "n": "an integer in [1, 16]",
    "max_tokens": "an integer >= 1 (0: /v1/completions with echo, to score the prompt alone)",
    "max_completion_tokens": "an integer >= 1",
    "input": "a string or a non-empty list of message items {'role': ..., 'content': a string or text parts}",
    "max_output_tokens": "an integer >= 1",
    "previous_response_id": "the id of a stored response (\"resp_...\"), or null",
    "presence_penalty": "a number in [-2, 2]",
    "frequency_penalty": "a number in [-2, 2]",
    "top_k": "an integer >= 0 (0 or -1: off)",
    "min_p": "a number in [0, 1]",
    "repetition_penalty": "a number in (0, 10]",
    "seed": "an integer in [-2**63, 2**63 - 1]",
    "logprobs": "true/false (chat) or an integer in [0, 20] (completions)",
    "top_logprobs": "an integer in [0, 20]",
    "stream": "a boolean",
    "echo": "a boolean",
    "tokens": "a list of token ids",
    "allowed_token_ids": "a non-empty list of token ids (integers >= 0)",
    "bad_words": "a list of at most 256 words (non-empty strings)",
    "truncate_prompt_tokens": "an integer >= 1 (keep the prompt's last k tokens) or -1 (the model's context)",
    "include_stop_str_in_output": "a boolean",
    "return_tokens_as_token_ids": "a boolean",
    "skip_special_tokens": "a boolean",
    "prompt_logprobs": "an integer in [0, 20] (the most likely tokens shown at each prompt position)",
}
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: Sequence[Any]) -> str | None:
    parts: list[str] = []
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
            continue
        p = str(p)
        if p in _TYPE_TAGS or any(c in p for c in "[-("):  # pydantic's union-branch tags
            break
        parts.append(("." if parts else "") + p)
    return "".join(parts) or None


def _validation_error(errors: Sequence[Any]) -> ApiError:
    """FastAPI's / pydantic's errors (their locations under "body") as OpenAI's 400 naming the parameter."""
    if not errors:
        return ApiError(400, "invalid request body")
    # text that is not Unicode, whichever union branch reported it (the others say "not a list")
    e = next((x for x in errors if x.get("type") == "string_unicode"), errors[0])
    if tuple(e.get("loc", ())) == ("body",) and e.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return ApiError(400, "the request body must be a JSON object (Content-Type: application/json)")
    original = (e.get("ctx") or {}).get("error")
    if original is not None and hasattr(original, "param"):  # our own cross-field checks
        return ApiError(400, str(original), param=original.param)
    param = _param(e.get("loc", ()))
    if param is None:
        return ApiError(400, f"invalid request body: {e.get('msg')}")
    if e.get("type") == "missing":
        return ApiError(400, f"missing required parameter {param!r}", param=param)
    if e.get("type") == "string_unicode":
        return ApiError(400, f"invalid {param}: {e.get('msg')}", param=param)
    value = _head(e.get("input"))
    shown = json.dumps(value)[:80] if _jsonable(value) else repr(value)[:80]
    expected = _EXPECTED.get(re.sub(r"\[\d+\]", "", param))  # messages[3].content: messages.content's
    if expected is not None:
        return ApiError(400, f"invalid {param}={shown}: expected {expected}", param=param)
    msg = str(e.get("msg", "")).removeprefix("Value error, ")
    return ApiError(400, f"invalid {param}={shown}: {msg[:1].lower() + msg[1:]}", param=param)


def _read_body(raw: bytes, content_type: str | None, model: type[_M]) -> _M:
    """A request body read as FastAPI reads one (JSON only under a JSON Content-Type: a form or text/plain,
    which a page on another site may send without CORS's consent, is not an object), then validated into
    `model`; errors as OpenAI's 400. Run in the encoding thread (`_OffLoopBody`)."""
    data: Any = raw or None
    kind = email.message.Message()
    kind["content-type"] = content_type or ""
    subtype = kind.get_content_subtype()
    if raw and kind.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json")):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e.msg}") from None
        except UnicodeDecodeError as e:  # PowerShell 5's Invoke-RestMethod sends Latin-1
            raise ApiError(400, f"the request body is not valid JSON: it is not UTF-8 ({e.reason} at byte {e.start})"
                           ) from None
        except RecursionError:  # FastAPI's answer, and why
            raise ApiError(400, "There was an error parsing the body: it is nested too deep") from None
        except ValueError:  # Python's limit on the digits of an integer it reads (sys.set_int_max_str_digits)
            raise ApiError(400, "There was an error parsing the body: an integer in it has over "
                                f"{sys.get_int_max_str_digits()} digits") from None
    try:
        return model.model_validate(data, from_attributes=True)  # from_attributes: FastAPI's errors for a non-object
    except ValidationError as e:
        raise _validation_error([{**x, "loc": ("body", *x["loc"])} for x in e.errors(include_url=False)]) from None


class _OffLoopBody(APIRoute):
    """A POST route whose body is read and validated in the encoding thread (`_read_body`), not on the
    event loop as FastAPI reads it: a 4 MB chat of 90,000 short messages took pydantic 1-2 s, in which no
    stream got a token. Its endpoint is called as `endpoint(body[, request])`; its signature still gives
    the OpenAPI schema."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint, hints = self.endpoint, get_type_hints(self.endpoint)

        async def handler(request: Request) -> Response:
            srv: Server = request.app.state.server
            body = await srv.off_loop(_read_body, await request.body(), request.headers.get("content-type"),
                                      hints["body"])
            result = await (endpoint(body, request) if "request" in hints else endpoint(body))
            return result if isinstance(result, Response) else JSONResponse(result)

        return handler


def _head(v: Any, depth: int = 40) -> Any:
    """Enough of a value to show its first 80 characters: json.dumps of all of a 4 MB logit_bias took
    a second, on the event loop (each element shows as at least one character and a comma), and a value
    nested 1,300 deep (which JSON parses) went past Python's recursion limit: a 500."""
    if isinstance(v, (list, dict)) and depth == 0:
        return "..."
    if isinstance(v, list):
        return [_head(x, depth - 1) for x in v[:80]]
    if isinstance(v, dict):
        return {k: _head(x, depth - 1) for k, x in itertools.islice(v.items(), 80)}
    return v


def _jsonable(v: object) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


async def _merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, RequestOutput]]:
    """The outputs of several handles as they arrive, tagged with their choice."""
    if len(choices) == 1:
        async for out in choices[0].handle.aiter():
            yield choices[0], out
        return
    q: asyncio.Queue[tuple[Choice, RequestOutput] | None] = asyncio.Queue()

    async def pump(c: Choice) -> None:
        try:
            async for out in c.handle.aiter():
                await q.put((c, out))
        finally:
            await q.put(None)

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        left = len(tasks)
        while left:
            item = await q.get()
            if item is None:
                left -= 1
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def _who(request: Request, rid: str) -> str:
    """A request as the log names it: its path, its response's id, and the X-Request-Id it was answered with
    (the one it sent, else the Guard's: what a proxy's log and the openai client's `_request_id` show)."""
    return f"{request.url.path} {rid} (X-Request-Id {request.scope.get('state', {}).get('request_id')})"


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def create_app(engine: EngineLike, tokenizer: Tokenizer, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (started by the caller) under `config`."""
    cfg = config or ServerConfig()
    srv = Server(engine, tokenizer, cfg)
    tok = tokenizer
    app = FastAPI(title="mixlab", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = _validation_error(exc.errors())
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # FastAPI's own: its `{"detail"}` body is not OpenAI's, which clients read the message from
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), type=kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # a bug of ours, not the request's: OpenAI's body still (clients read the message from it), and
        # uvicorn logs the traceback as before
        return JSONResponse(error_body(f"internal server error: {type(exc).__name__}: {exc}", type="server_error",
                                       code="internal_error"), status_code=500)

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"no route {request.method} {request.url.path}", code="not_found"),
                            status_code=404)

    @app.exception_handler(405)
    async def _bad_method(request: Request, exc: Exception) -> JSONResponse:
        # with Starlette's Allow header, which a 405 must carry (RFC 9110 15.5.6): what to send instead
        return JSONResponse(error_body(f"method {request.method} is not allowed on {request.url.path}",
                                       code="method_not_allowed"), status_code=405,
                            headers=getattr(exc, "headers", None))

    def post(path: str) -> Callable[[_F], _F]:  # a route whose body is validated off the loop (_OffLoopBody)
        def add(endpoint: _F) -> _F:
            app.router.add_api_route(path, endpoint, methods=["POST"], route_class_override=_OffLoopBody)
            return endpoint

        return add

    # -- generation ---------------------------------------------------------------------------------

    def observer(arrived: float) -> Callable[[Choice, RequestOutput], None]:
        """Counts a request's generated tokens and their latencies: the time to the first token from `arrived`
        (the request's perf_counter() as its handler began: its prompt's encoding is part of it), then between."""
        last: dict[int, float] = {}

        def observe(c: Choice, out: RequestOutput) -> None:
            if out.token_id is None or c.hidden:
                return
            now = time.perf_counter()
            if c.index in last:
                srv.metrics.itl.observe(now - last[c.index])
            else:
                srv.metrics.ttft.observe(now - arrived)
            last[c.index] = now
            srv.metrics.generation_tokens.inc()

        return observe

    async def gather(request: Request, choices: list[Choice], observe: Callable[[Choice, RequestOutput], None],
                     want_logprobs: bool) -> Response | None:
        """Every output of `choices` taken in (unstreamed); see `settle`."""
        async def collect() -> None:
            async for c, out in _merged(choices):
                observe(c, out)
                c.take(out, tok, want_logprobs)

        srv.metrics.in_progress += 1
        try:
            return await settle(request, choices, asyncio.ensure_future(collect()))
        except ApiError as e:  # the engine failed a choice: the access log has the status, this line why
            log.warning("%s: the request failed: %s", _who(request, choices[0].handle.request_id), e)
            raise
        finally:
            srv.metrics.in_progress -= 1

    async def settle(request: Request, choices: list[Choice], work: asyncio.Future[None]) -> Response | None:
        """`work`, which takes in every output of `choices`, awaited; a 499 if the client left first (its requests
        cancelled, their cache freed), an ApiError if the engine failed one."""
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the client left: stop its requests, free their cache
                work.cancel()
                await asyncio.wait({work})
                return Response(status_code=499)
            work.result()
        finally:
            gone.cancel()
            left = [c for c in choices if c.finish_reason is None]
            for c in left:
                c.handle.cancel()
            srv.metrics.cancelled.inc(len(left))
        failed = [c for c in choices if c.finish_reason in ("error", "cancelled")]
        if failed:
            c = failed[0]
            ended = srv.aborted and c.finish_reason == "cancelled"  # the drain's deadline passed
            raise ApiError(500 if c.finish_reason == "error" else 503, srv.failure(c.finish_reason, c.error),
                           code="shutting_down" if ended else "engine_error",
                           headers={"Retry-After": str(cfg.retry_after_s)} if ended else None)
        return None

    def stream_over(choices: list[Choice]) -> None:
        """A stream ended, or its client disconnected: its requests stop, their cache is freed."""
        srv.metrics.in_progress -= 1
        left = [c for c in choices if c.finish_reason is None]
        for c in left:
            c.handle.cancel()
        if left:
            srv.metrics.cancelled.inc(len(left))

    async def respond(request: Request, body: ChatCompletionRequest | CompletionRequest, choices: list[Choice],
                      prompts: list[list[int]], *, chat: bool, rid: str, want_logprobs: bool,
                      echo: list[dict[str, Any]] | None, arrived: float, tool_token: int | None = None,
                      tool_finish: str = "tool_calls", tool_parallel: bool = True) -> Response:
        """`prompts`: each prompt's token ids, once however many choices it has. `arrived`: the request's
        perf_counter() as its handler began (the time to first token counts from there: its prompt's
        encoding is part of it). `tool_token`: [TOOL_CALLS]'s id where tools were rendered: a reply that
        begins with it is held back and answered as `tool_calls` (streamed: in the choice's last chunk), with
        `finish_reason` `tool_finish`; `tool_parallel` False: its first call alone (`Choice.tool_calls`)."""
        prompt_lens = [len(p) for p in prompts]
        served = body.model or cfg.model_name  # the model or adapter that answers
        # return_token_ids, as vLLM answers it: the prompt's ids on a chat response (streamed: on each choice's
        # first chunk) and on each completion choice (its first chunk); the generated ids on each choice (chunk)
        want_ids = body.return_token_ids
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        observe = observer(arrived)

        if not body.stream:
            if (left := await gather(request, choices, observe, want_logprobs)) is not None:
                return left
            out_choices = []
            for c in choices:
                ch: dict[str, Any] = {"index": c.index, "finish_reason": c.finish_reason,
                                      "stop_reason": c.stop_reason}
                if chat:
                    calls = c.tool_calls(tool_token, parallel=tool_parallel)
                    ch["message"] = {"role": "assistant", "content": c.text} if calls is None else \
                        {"role": "assistant", "content": None, "tool_calls": calls}
                    if calls is not None:
                        ch["finish_reason"] = tool_finish
                    ch["logprobs"] = {"content": [chat_lp(e) for e in c.tokens], "refusal": None} \
                        if want_logprobs else None
                else:
                    head = echo[c.index // body.n] if echo is not None else None
                    ch["text"] = (head["text"] if head else "") + c.text
                    ch["logprobs"] = _completion_lp(head, c, tok, generated=True,
                                                    top=getattr(body, "logprobs", None) or 0) if want_logprobs else None
                    if body.prompt_logprobs is not None:  # vLLM's: each completion choice's own prompt
                        ch["prompt_logprobs"] = vllm_prompt_logprobs(c, prompts[c.index // body.n],
                                                                     body.prompt_logprobs, tok)
                if body.return_experts:
                    ch["experts"] = c.experts
                if want_ids:
                    if not chat:
                        ch["prompt_token_ids"] = prompts[c.index // body.n]
                    ch["token_ids"] = c.token_ids
                out_choices.append(ch)
            res = {"id": rid, "object": obj, "created": created, "model": served,
                   "system_fingerprint": FINGERPRINT, "choices": out_choices,
                   "usage": usage_of(choices, prompt_lens, body.n)}
            if want_ids and chat:
                res["prompt_token_ids"] = prompts[0]
            if chat and body.prompt_logprobs is not None:  # vLLM's: the response's, of the one prompt
                res["prompt_logprobs"] = vllm_prompt_logprobs(choices[0], prompts[0], body.prompt_logprobs, tok)
            return JSONResponse(res)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        continuous = include_usage and body.stream_options is not None and body.stream_options.continuous_usage_stats
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(ch: dict[str, Any], first: bool = False) -> dict[str, Any]:
            d: dict[str, Any] = {"id": rid, "object": chunk_obj, "created": created, "model": served,
                                 "system_fingerprint": FINGERPRINT, "choices": [ch]}
            if want_ids and first:  # a choice's first chunk
                if chat:
                    d["prompt_token_ids"] = prompts[0]
                else:
                    ch["prompt_token_ids"] = prompts[ch["index"] // body.n]
            if include_usage:
                d["usage"] = usage_of(choices, prompt_lens, body.n) if continuous else None
            return d

        async def events() -> AsyncIterator[bytes]:
            srv.metrics.in_progress += 1
            try:
                if chat:
                    for c in choices:
                        yield _sse(chunk({"index": c.index, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}, first=True))
                started = {c.index for c in choices} if chat else set()  # the choices whose first chunk went
                echoed: set[int] = set()
                async for c, out in _merged(choices):
                    observe(c, out)
                    delta, lp, ex = c.take(out, tok, want_logprobs)
                    if echo is not None and c.index not in echoed and out.finish_reason not in ("error", "cancelled"):
                        echoed.add(c.index)  # the prompt (and its logprobs) comes with the first output
                        head = echo[c.index // body.n]
                        yield _sse(chunk({"index": c.index, "text": head["text"], "logprobs":
                                          _completion_lp(head, c, tok, generated=False, top=getattr(body, "logprobs",
                                                         None) or 0) if want_logprobs else None,
                                          "finish_reason": None}, first=c.index not in started))
                        started.add(c.index)
                    if out.finish_reason in ("error", "cancelled"):
                        ended = srv.aborted and out.finish_reason == "cancelled"  # the drain's deadline passed
                        msg = srv.failure(out.finish_reason, out.error)
                        # the access log said 200 as the stream began: the error is said here
                        log.warning("%s: the stream ended with an error: %s", _who(request, rid), msg)
                        yield _sse(error_body(msg, type="server_error", code="shutting_down" if ended else
                                              "engine_error"))
                        yield b"data: [DONE]\n\n"
                        return
                    finish = c.finish_reason if out.finish_reason is not None else None  # max_tokens=0: "length"
                    new = [out.token_id] if out.token_id is not None and not c.hidden else []
                    lps, exs, calls = [lp] if lp is not None else [], [ex] if ex is not None else [], None
                    if tool_token is not None and c.token_ids[:1] == [tool_token]:  # held back to its end
                        if finish is None:
                            continue
                        calls = c.tool_calls(tool_token, parallel=tool_parallel)  # else the reply, as text
                        delta, lps, exs, new = "" if calls else c.text, c.tokens, c.experts, c.token_ids
                        finish = tool_finish if calls else finish
                    if not delta and not lps and not exs and finish is None and not (want_ids and new):
                        continue
                    if chat:
                        ch: dict[str, Any] = {
                            "index": c.index,
                            "delta": {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]} if calls
                            else {"content": delta} if delta else {},
                            "logprobs": {"content": [chat_lp(e) for e in lps], "refusal": None} if lps else None,
                            "finish_reason": finish}
                    else:
                        ch = {"index": c.index, "text": delta, "finish_reason": finish,
                              "logprobs": None}
                        if want_logprobs:  # the token's offset in the choice's whole text (echoed prompt included)
                            at = (len(echo[c.index // body.n]["text"]) if echo is not None else 0) + len(c.text)
                            ch["logprobs"] = _stream_completion_lp(lp, at - len(delta), tok, c.as_ids)
                    if finish is not None:  # vLLM's, on the chunk that ends the choice
                        ch["stop_reason"] = c.stop_reason
                    if exs:
                        ch["experts"] = exs
                    if want_ids:
                        ch["token_ids"] = new
                    if calls:  # OpenAI's shape: the calls' delta, then the finish in a chunk of its own
                        ch["finish_reason"] = None
                        ch.pop("stop_reason")
                        yield _sse(chunk(ch, first=c.index not in started))
                        started.add(c.index)
                        ch = {"index": c.index, "delta": {}, "logprobs": None, "finish_reason": finish,
                              "stop_reason": c.stop_reason}
                    yield _sse(chunk(ch, first=c.index not in started))
                    started.add(c.index)
                if include_usage:
                    yield _sse({"id": rid, "object": chunk_obj, "created": created, "model": served,
                                "system_fingerprint": FINGERPRINT, "choices": [],
                                "usage": usage_of(choices, prompt_lens, body.n)})
                yield b"data: [DONE]\n\n"
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 (the stream has started: report in-band, and log the traceback)
                log.exception("%s: the stream ended with an internal error", _who(request, rid))
                yield _sse(error_body(f"internal error: {type(e).__name__}: {e}", type="server_error"))
                yield b"data: [DONE]\n\n"
            finally:  # a client that disconnects lands here too
                stream_over(choices)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrived = time.perf_counter()
        srv.check_open()
        srv.check_model(body.model)
        tools = body.rendered_tools()
        srv.check_truncate(body.truncate_prompt_tokens)  # a k over the context: a 400 before the work
        ids = srv.truncate(await srv.encode_chat(body.messages, "messages", tools=tools), body.truncate_prompt_tokens)
        if body.tools and tools:
            await srv.off_loop(srv.check_tools, body)
        limit = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"  # the one obeyed
        max_tokens = srv.max_tokens(body.limit(), len(ids), where="messages", default=None, param=limit)
        top = body.top_logprobs or 0
        lp = top if body.logprobs else None
        # a reply that continues an assistant prefix keeps its first word's leading space, as a completion does
        alone = not body.messages[-1].prefix
        structured = await srv.off_loop(srv.structured, body)
        scored = body.prompt_logprobs is not None and not body.stream  # vLLM's prompt_logprobs (0 with a stream:
        params = [srv.sampling(body, max_tokens, i, lp, decode_alone=alone, structured=structured,  # nothing)
                               prompt_logprobs=scored, prompt_top=body.prompt_logprobs if scored else None)
                  for i in range(body.n)]
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        handles = srv.submit([ids] * body.n, params, rid, param="n", n=body.n)
        choices = [Choice(i, h, alone=alone, as_ids=body.return_tokens_as_token_ids) for i, h in enumerate(handles)]
        # OpenAI's finish_reason for a call: "tool_calls", but "stop" where tool_choice named the function (vLLM's too)
        named = isinstance(body.tool_choice, dict)
        return await respond(request, body, choices, [ids], chat=True, rid=rid, want_logprobs=body.logprobs,
                             echo=None, arrived=arrived, tool_token=tok.special_id("[TOOL_CALLS]") if tools else None,
                             tool_finish="stop" if named else "tool_calls", tool_parallel=body.parallel_tool_calls)

    @post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrived = time.perf_counter()
        srv.check_open()
        srv.check_model(body.model)

        def encode() -> tuple[list[str] | list[list[int]], list[list[int]]]:
            # in the encoding thread: a prompt of 1.3M token ids (4 MB) is a second's loops over them
            batch = body.prompts()
            srv.check_count(len(batch) * body.n, param="prompt" if len(batch) > 1 else "n")  # before encoding them
            srv.check_truncate(body.truncate_prompt_tokens)
            prompts = [srv.truncate(tok.encode(p, bos=body.add_special_tokens) if isinstance(p, str) else p,
                                    body.truncate_prompt_tokens) for p in batch]
            if not all(prompts):  # vLLM's "the decoder prompt cannot be empty"
                raise ApiError(400, "the prompt is empty: with add_special_tokens false, an empty text has no "
                                    "tokens, not even BOS", param="prompt")
            return batch, prompts

        batch, prompts = await srv.off_loop(encode)
        wheres = ["prompt"] if len(batch) == 1 else [f"prompt[{j}]" for j in range(len(batch))]
        hidden = body.max_tokens == 0
        max_tokens = [srv.max_tokens(1 if hidden else body.max_tokens, len(p), where=where, default=16)
                      for where, p in zip(wheres, prompts, strict=True)]
        for where, p, given in zip(wheres, prompts, batch, strict=True):  # after: each fits the context
            if not isinstance(given, str):
                srv.check_ids(p, where)
        want_lp = body.logprobs is not None
        asked = body.prompt_logprobs if not body.stream else None  # vLLM's (0 with a stream: nothing to carry)
        score_prompt = (body.echo and want_lp) or asked is not None
        # the alternatives at each prompt position: the echo's (logprobs) and prompt_logprobs' (each takes its top)
        prompt_top = None if asked is None else max(asked, (body.logprobs or 0) if body.echo else 0)
        structured = await srv.off_loop(srv.structured, body)
        params, ids, choices_meta = [], [], []
        for j, p in enumerate(prompts):
            for i in range(body.n):
                params.append(srv.sampling(body, max_tokens[j], i, body.logprobs, prompt_logprobs=score_prompt,
                                           structured=structured, prompt_top=prompt_top))
                ids.append(p)
                choices_meta.append(j)
        rid = f"cmpl-{uuid.uuid4().hex}"
        handles = srv.submit(ids, params, rid, param="prompt" if len(prompts) > 1 else "n", n=body.n)
        # a prompt with no text (BOS alone: prompt "") leaves the first generated token to begin one
        empty = [all(i in (tok.bos_id, tok.eos_id) for i in p) for p in prompts]
        choices = [Choice(k, h, alone=empty[choices_meta[k]], hidden=hidden, as_ids=body.return_tokens_as_token_ids)
                   for k, h in enumerate(handles)]
        echo = [_echo_head(tok, p) for p in prompts] if body.echo else None
        return await respond(request, body, choices, prompts, chat=False, rid=rid,
                             want_logprobs=want_lp, echo=echo, arrived=arrived)

    add_responses_routes(app, srv, post=post, observer=observer, settle=settle)

    # -- models, health, metrics, tokenizer ---------------------------------------------------------

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(cfg, name) for name in (cfg.model_name, *cfg.adapters)]}

    @app.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"])
    async def model(model_id: str) -> dict[str, Any]:
        srv.check_model(model_id)
        return _model_card(cfg, model_id)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        if srv.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if getattr(srv.engine, "closed", False):  # a load balancer must stop sending requests here
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics() -> Response:
        return Response(srv.metrics.render(), media_type=CONTENT_TYPE)

    @post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        srv.check_model(body.model)
        if body.messages is not None:
            ids = await srv.encode_chat(body.messages, "messages")
        else:
            prompt = body.prompt or ""
            special = {tok.id_to_piece(tok.bos_id): tok.bos_id, tok.id_to_piece(tok.eos_id): tok.eos_id}
            # a prompt that is exactly a special token's name is that token (how lm-eval's remote
            # tokenizer finds BOS/EOS ids); anywhere else such text stays text
            ids = [special[prompt]] if prompt in special else await srv.off_loop(tok.encode, prompt,
                                                                              bos=body.add_special_tokens)
        out: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": cfg.context_len}
        if body.return_token_strs:
            out["token_strs"] = [tok.id_to_piece(i) for i in ids]
        return out

    @app.api_route("/tokenizer_info", methods=["GET", "HEAD"])
    async def tokenizer_info() -> dict[str, Any]:  # vLLM's endpoint; lm-eval's remote tokenizer reads it
        return {"bos_token": tok.id_to_piece(tok.bos_id), "eos_token": tok.id_to_piece(tok.eos_id), "pad_token": None,
                "model_max_length": cfg.context_len, "vocab_size": tok.vocab_size}

    @post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        srv.check_model(body.model)

        def decode() -> str:  # in the encoding thread: a million ids take a second
            srv.check_ids(body.tokens, "tokens")
            return tok.decode([i for i in body.tokens if i < tok.vocab_size])  # padded ids: no text

        return {"prompt": await srv.off_loop(decode)}

    # -- the chat page --------------------------------------------------------------------------------

    files = {name: (resources.files("mixlab.serve") / "static" / name).read_bytes() for name in _STATIC}
    types = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
             "css": "text/css; charset=utf-8"}
    # its own files only; no other site may frame it (clickjacking: clicks on an invisible page)
    csp = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
           "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")

    @app.api_route("/", methods=["GET", "HEAD"])  # HEAD: `curl -I`, uptime checks
    async def page() -> Response:
        return Response(files["index.html"], media_type=types["html"], headers={"Content-Security-Policy": csp})

    @app.api_route("/static/{name}", methods=["GET", "HEAD"])
    async def static(name: str) -> Response:
        if name not in files:  # a fixed table: no path from the request reaches the filesystem
            raise ApiError(404, f"no static file {name!r}", code="not_found")
        return Response(files[name], media_type=types[name.rsplit(".", 1)[-1]],
                        headers={"Content-Security-Policy": csp, "Cache-Control": "no-cache"})

    guarded = Guard(app, srv)
    if cfg.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        # any request header: the openai JavaScript client sends its X-Stainless-* ones, and a preflight
        # that refused them kept browsers from every request (the origins are the operator's to trust); every
        # method the API has (DELETE /v1/responses/{id}'s preflight was refused: client.responses.delete)
        cors: Any = CORSMiddleware(guarded, allow_origins=cfg.cors_origins,  # type: ignore[arg-type]
                                   allow_methods=["GET", "HEAD", "POST", "DELETE"], allow_headers=["*"],
                                   expose_headers=["X-Request-Id"])
        cors.state = app.state  # the drain on SIGTERM finds the server there (and tests do)
        return cors
    return guarded  # type: ignore[return-value]


def _echo_head(tok: Tokenizer, ids: list[int]) -> dict[str, Any]:
    """The prompt's text as the concatenation of its tokens' stream-decoder deltas; `start`: the position
    of its first token other than BOS / EOS, which begins the text (decoded alone: no leading space)."""
    dec = tok.stream()
    pieces = [dec.push(i) for i in ids]
    tail = dec.flush()
    if tail:
        pieces[-1] += tail
    start = next((k for k, i in enumerate(ids) if i not in (tok.bos_id, tok.eos_id)), None)
    return {"ids": ids, "pieces": pieces, "text": "".join(pieces), "start": start}


def _top_dict(entries: Iterable[dict[str, Any]], tok: Tokenizer, chosen: int, logprob: float,
              start: bool, as_ids: bool = False) -> dict[str, float]:
    """A legacy `top_logprobs` entry: the alternatives, then the chosen token if it is not among them
    (OpenAI's "up to logprobs + 1 elements"; vLLM's too), so `logprobs: 0` still names the token.
    `start`: the position begins a text (`token_piece`)."""
    d: dict[str, float] = {}
    for t in entries:
        d.setdefault(t["token"], t["logprob"])  # two ids with one text: keep the likelier (listed first)
    d.setdefault(token_name(chosen, token_piece(tok, chosen, start)[0], as_ids), logprob)
    return d


def _completion_lp(head: dict[str, Any] | None, c: Choice, tok: Tokenizer, *, generated: bool,
                   top: int = MAX_LOGPROBS) -> dict[str, Any]:
    """The legacy logprobs object: the echoed prompt's tokens (when `head`), then
    the generated ones (when `generated`)."""
    tokens: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    pos = 0
    if head is not None:
        plp, ptop = c.prompt_logprobs, c.prompt_top
        for k, s in enumerate(head["pieces"]):
            tokens.append(token_name(head["ids"][k], s, c.as_ids))
            offsets.append(pos)
            pos += len(s)
            v = plp[k] if plp is not None and k < len(plp) else None
            lps.append(v)
            if v is None:
                tops.append(None)
            else:
                # none with logprobs=0; prompt_logprobs may have asked for more
                alternatives = (ptop[k] if ptop is not None and ptop[k] is not None else [])[:top]
                start = k == head["start"]
                tops.append(_top_dict(({"token": token_name(a, token_piece(tok, a, start)[0], c.as_ids), "logprob": b}
                                       for a, b in alternatives), tok, head["ids"][k], v, start, c.as_ids))
    if generated:
        for e in c.tokens:
            tokens.append(e["token"])
            offsets.append(pos)
            pos += len(e["text"])
            lps.append(e["logprob"])
            tops.append(_top_dict(e["top_logprobs"], tok, e["id"], e["logprob"], e["start"], c.as_ids))
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _stream_completion_lp(e: dict[str, Any] | None, offset: int, tok: Tokenizer,
                          as_ids: bool = False) -> dict[str, Any] | None:
    if e is None:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    return {"tokens": [e["token"]], "token_logprobs": [e["logprob"]],
            "top_logprobs": [_top_dict(e["top_logprobs"], tok, e["id"], e["logprob"], e["start"], as_ids)],
            "text_offset": [offset]}


def _model_card(cfg: ServerConfig, name: str) -> dict[str, Any]:
    """The model's card, or (`name` an adapter's) the adapter's, as vLLM lists a LoRA module: its
    folder as `root`, the model as `parent`."""
    adapter = cfg.adapters.get(name)
    return {"id": name, "object": "model", "created": cfg.created, "owned_by": "mixlab",
            "root": adapter if adapter is not None else cfg.model_root,
            "parent": cfg.model_name if adapter is not None else None,
            "max_model_len": cfg.context_len, "mixlab": dict(cfg.model_info)}
