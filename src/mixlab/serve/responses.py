"""OpenAI's Responses API (`add_responses_routes`): `POST /v1/responses` on the chat path's encoding, sampling
and `settle`, a stored response's conversation before its input; `GET` / `DELETE /v1/responses/{id}`, its
`input_items` and `cancel`. A response being made is a `_Live`, whose streams are made afresh from its state
(`_events`), so no event is kept. Function tools are the chat path's (rendering, forcing, `tool_calls_of`): a reply
that is a call is answered as `function_call` output items; `function_call` / `function_call_output` input items
are the template's assistant calls and tool results."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mixlab.engine import RequestOutput
from mixlab.serve.common import Choice, Server, chat_lp, log, usage_of
from mixlab.serve.protocol import ApiError, ChatMessage, ResponsesRequest, not_supported
from mixlab.serve.store import Item, Stored
from mixlab.tokenizer import tool_call_id_ok


def add_responses_routes(app: FastAPI, srv: Server, *, post: Callable[[str], Callable[[Callable[..., Any]], Any]],
                         observer: Callable[[float], Callable[[Choice, RequestOutput], None]],
                         settle: Callable[[Request, list[Choice], asyncio.Future[None]], Awaitable[Response | None]]
                         ) -> None:
    """The Responses API's endpoints on `app`, served by `srv`; `post`, `observer` and `settle`: `create_app`'s, which
    the chat endpoints use too."""
    cfg, tok = srv.cfg, srv.tok

    @post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        """OpenAI's Responses API: the chat path's prompt, sampling and engine request, answered as a `response`
        object (or its typed events); with `store` (and a store: `ServerConfig.responses_store`) kept once it
        finished, with its conversation, for `previous_response_id` and `GET /v1/responses/{id}`, which also
        answers it while it is being made; with `background`, answered at once while the engine makes it."""
        arrived = time.perf_counter()
        srv.check_open()
        srv.check_model(body.model)
        if body.background and srv.store is None:
            raise ApiError(400, not_supported("background", True, False) + ": it stores no responses "
                                "(--responses-store 0), where a background response is read back from",
                           param="background")
        earlier = srv.conversation(body.previous_response_id)
        calls = {i.call_id: i.name or "" for i in earlier if i.type == "function_call" and i.call_id is not None}
        inputs = await srv.off_loop(_input_messages, body, calls)
        _check_call_ids(body, tok.chat_version)
        tools = body.rendered_tools()
        # truncation "auto": the oldest turns go until the rest fits with max_output_tokens (at least one token)
        room = cfg.context_len - (body.max_output_tokens or 1) if body.truncation == "auto" else None
        ids = await srv.encode_chat(body.messages([*_messages(earlier), *inputs]), "input", room=room,
                                    keep=len(inputs), tools=tools)
        if tools:
            await srv.off_loop(srv.check_tools, body)
        max_tokens = srv.max_tokens(body.max_output_tokens, len(ids), where="input", default=None,
                                    param="max_output_tokens")
        structured = await srv.off_loop(srv.structured, body)
        if body.background:  # a drain that began while it was encoded would not see it
            srv.check_open()
        rid, mid = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        want_lp = body.wants_logprobs()
        top = (body.top_logprobs or 0) if want_lp else None
        handle, = srv.submit([ids], [srv.sampling(body, max_tokens, 0, top, decode_alone=True, structured=structured)],
                             rid, param="input", n=1)
        c = Choice(0, handle, alone=True)
        observe = observer(arrived)
        store = srv.store if body.store else None
        turn = _items(inputs) if store is not None else ()
        live = _Live(_created({
            "id": rid, "object": "response", "created_at": int(time.time()), "status": None, "error": None,
            "incomplete_details": None, "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "model": body.model or cfg.model_name, "output": [], "parallel_tool_calls": body.parallel_tool_calls,
            "max_tool_calls": body.max_tool_calls,
            "previous_response_id": body.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "store": store is not None, "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {"format": body.text_format()}, "tool_choice": body.echoed_tool_choice(),
            "tools": body.echoed_tools(),
            "top_p": 1.0 if body.top_p is None else body.top_p, "truncation": body.truncation or "disabled",
            "top_logprobs": body.top_logprobs, "usage": None, "user": body.user, "metadata": body.metadata or {},
            "background": body.background, "completed_at": None}), mid, c, (*earlier, *turn),
            lp_ends=[] if want_lp else None, tool_token=tok.special_id("[TOOL_CALLS]") if tools else None)

        def finish() -> None:
            """Its final object; kept in the store (`store`) if it finished, or ran in the background."""
            reason, calls = c.finish_reason, c.tool_calls(live.tool_token, parallel=body.parallel_tool_calls)
            status = ("incomplete" if reason == "length" else "failed" if reason == "error" else
                      ("cancelled" if body.background else "failed") if reason == "cancelled" else "completed")
            if reason == "error" or (srv.aborted and reason == "cancelled"):  # (a client that left: not logged)
                log.warning("/v1/responses %s: the response failed: %s", rid, srv.failure(reason, c.error))
            if calls is not None and status == "incomplete":  # its list of calls closed, and parses: they are made
                status = "completed"
            if calls is not None:  # OpenAI's function_call items, the chat path's calls (their ids too)
                output = [{"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
                           "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                           "status": "completed"} for call in calls]
                said = tuple(Item(o["id"], "assistant", o["arguments"], "function_call", o["call_id"], o["name"])
                             for o in output)
            else:
                if live.held():  # a call that did not parse: the text it is, as one delta (as the chat path sends it)
                    live.ends.append(len(c.text))
                    if live.lp_ends is not None:
                        live.lp_ends.append(len(live.lps))
                output = [_message_item(mid, "completed" if status == "completed" else "incomplete", c.text, live.lps)]
                said = (Item(mid, "assistant", c.text),)
            if body.return_experts:
                output[0]["experts"] = c.experts
            if body.return_token_ids:
                output[0]["token_ids"] = c.token_ids
            u = usage_of([c], [len(ids)], 1)
            usage = {"input_tokens": u["prompt_tokens"],
                     # cache_write_tokens: OpenAI's explicit (TTL) cache, which this server has not
                     "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
                                              "cache_write_tokens": 0},
                     "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": u["total_tokens"]}
            live.final = {**live.head, "status": status,
                          "error": {"code": "server_error", "message": srv.failure(reason, c.error)}
                          if status == "failed" else None,
                          "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                          "output": output, "usage": usage,
                          "completed_at": int(time.time()) if status == "completed" else None}
            live.body = bytes(JSONResponse(live.final).body)  # the bytes themselves (starlette types them as a buffer)
            srv.live.pop(rid, None)
            if store is not None and (status in ("completed", "incomplete") or body.background):
                store.put(rid, Stored(live.body, live.items, said,
                                      array("I", live.ends) if body.background else None,
                                      array("I", live.lp_ends) if body.background and live.lp_ends is not None
                                      else None))
            live.wake()

        async def run() -> None:
            srv.metrics.in_progress += 1
            try:
                async for out in c.handle.aiter():
                    observe(c, out)
                    delta, lp, _ = c.take(out, tok, want_lp)
                    if lp is not None:
                        live.lps.append(chat_lp(lp))
                    # a call is held back to its end (`finish`); a token whose text is held back (or EOS's) still
                    # has its logprob
                    if not live.held() and (delta or lp is not None):
                        live.ends.append(len(c.text))
                        if live.lp_ends is not None:
                            live.lp_ends.append(len(live.lps))
                    live.wake()
            finally:
                srv.metrics.in_progress -= 1
                if c.finish_reason is None:  # stopped first: its client left, it was cancelled, the server drains
                    c.handle.cancel()
                    srv.metrics.cancelled.inc()
                    c.finish_reason = "cancelled"
                finish()

        if store is not None:
            srv.live[rid], srv.loop = live, asyncio.get_running_loop()
        live.task = asyncio.ensure_future(run())
        if body.stream:  # a background response's goes on if its client leaves
            return StreamingResponse(_follow(live, 0, owned=not body.background), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        if body.background:
            return JSONResponse(live.now())
        if (left := await settle(request, [c], live.task)) is not None:
            return left
        return Response(live.body, media_type="application/json")

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str) -> Response:
        """A background response cancelled (one that has finished: answered as it is, as OpenAI does)."""
        found = _find(srv, response_id)
        if not found.background:
            raise ApiError(400, "Cannot cancel a synchronous response.", param="response_id")  # OpenAI's words
        if isinstance(found, _Live) and found.task is not None:
            found.task.cancel()
            await asyncio.wait({found.task})
        return Response(found.body, media_type="application/json")

    if srv.store is not None:
        @app.api_route("/v1/responses/{response_id}/input_items", methods=["GET", "HEAD"])
        async def input_items(response_id: str, request: Request) -> dict[str, Any]:
            """The items a stored response answered (earlier turns' included; OpenAI's list object, `desc` by
            default), `limit` (1-100, default 20) at a time after the item `after`."""
            items = _find(srv, response_id).items
            q = request.query_params
            order = q.get("order", "desc")
            if order not in ("asc", "desc"):
                raise ApiError(400, f"invalid order={order!r}: expected 'asc' or 'desc'", param="order")
            limit = q.get("limit", "20")
            if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= 100):
                raise ApiError(400, f"invalid limit={limit!r}: expected an integer in [1, 100]", param="limit")
            listed = items if order == "asc" else items[::-1]
            start = 0
            if "after" in q:
                start = next((k + 1 for k, i in enumerate(listed) if i.id == q["after"]), -1)
                if start < 0:
                    raise ApiError(400, f"invalid after={q['after'][:80]!r}: no input item of response {response_id!r} "
                                        "has that id", param="after")
            page = [_item(i) for i in listed[start:start + int(limit)]]
            return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                    "last_id": page[-1]["id"] if page else None, "has_more": start + len(page) < len(listed)}

    @app.api_route("/v1/responses/{response_id:path}", methods=["GET", "HEAD", "DELETE"])
    async def stored_response(response_id: str, request: Request) -> Response:
        """A response, stored or still being made; `?stream=true` (a background response's): its events again,
        those after `starting_after` (a sequence number), then the rest as they come."""
        found = _find(srv, response_id)
        if request.method == "DELETE":  # OpenAI's deleted object (the openai client returns None)
            if isinstance(found, _Live):
                how = "cancel it first (POST /v1/responses/{id}/cancel)" if found.background else "wait for its end"
                raise ApiError(400, f"response {response_id!r} is still in progress: {how}", param="response_id")
            srv.stored(response_id, delete=True)
            return JSONResponse({"id": response_id, "object": "response", "deleted": True})
        q = request.query_params
        if q.get("stream", "false").lower() in ("false", "0"):
            return JSONResponse(found.now()) if isinstance(found, _Live) else \
                Response(found.body, media_type="application/json")
        if not found.background:
            raise ApiError(400, "stream: only a background response's events can be streamed again (this one was not "
                                "made with background=true: GET it whole)", param="stream")
        after = q.get("starting_after", "-1")
        if not (after == "-1" or (after.isascii() and after.isdigit())):
            raise ApiError(400, f"invalid starting_after={after!r}: expected a sequence number, an integer >= 0",
                           param="starting_after")
        first = int(after) + 1
        if isinstance(found, _Live):
            events = _follow(found, first, owned=False)
        else:
            final = json.loads(found.body)
            said = final["output"][0]
            text, lps = (said["content"][0]["text"], said["content"][0]["logprobs"]) if said["type"] == "message" else \
                ("", [])
            events = _replay(_events(_created(final), said["id"], text, found.ends or (), final, first, lps,
                                     found.lp_ends))
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _output_text(text: str, logprobs: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """OpenAI's `ResponseOutputText`; `logprobs`: its tokens' (`chat_lp`'s entries), with the include asking."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": list(logprobs)}


def _text_lps(logprobs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Logprob entries as the text events carry them (`response.output_text.delta` / `.done`): OpenAI's schema
    for those has no `bytes`, which the output part's entries have."""
    return [{"token": e["token"], "logprob": e["logprob"],
             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]} for t in e["top_logprobs"]]}
            for e in logprobs]


def _message_item(mid: str, status: str, text: str | None, logprobs: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """A response's output message (OpenAI's `ResponseOutputMessage`); `text` None: no part yet."""
    return {"type": "message", "id": mid, "status": status, "role": "assistant",
            "content": [] if text is None else [_output_text(text, logprobs)]}


# what a response object holds until it has finished (as created, and as `GET` answers it while in progress)
_UNFINISHED: dict[str, Any] = {"error": None, "incomplete_details": None, "output": [], "usage": None,
                               "completed_at": None}


def _created(obj: dict[str, Any]) -> dict[str, Any]:
    """A response object as it was created (its stream's `response.created` event), from any later one: a
    finished background response's replay begins with the very event its live stream began with."""
    return {**obj, **_UNFINISHED, "status": "queued" if obj["background"] else "in_progress"}


def _event(kind: str, seq: int, **fields: Any) -> bytes:
    """One of the Responses API's typed server-sent events: `event: TYPE`, then its data."""
    data = json.dumps({"type": kind, "sequence_number": seq, **fields}, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


def _events(head: dict[str, Any], mid: str, text: str, ends: Sequence[int], final: dict[str, Any] | None,
            first: int, lps: Sequence[dict[str, Any]] = (), lp_ends: Sequence[int] | None = None, *,
            opened: bool = True) -> Iterator[bytes]:
    """A response's stream from sequence number `first` on, as far as it has got. Its events are a function of
    its object as created (`head`), its output `text` (its length after each delta event: `ends`), its tokens'
    logprobs `lps` (with the include: how many after each delta event, `lp_ends`; None: not asked for) and its
    final object (None: not finished; given, every delta is in `ends`), so a stream resumed at any event is the
    one first sent and no event is kept. It ends with the final object: `response.completed`, `.incomplete` or
    `.failed` (OpenAI's events); a cancelled one's (status "cancelled") comes as `response.incomplete`, the
    union's event for a response that ended before its output did (it has no `response.cancelled`).
    `ends` is read as its first event is asked for: a live response's must not change in between (nothing else
    runs on the event loop between `_follow`'s call and that), so that it matches `text` and `final`.
    `opened`: whether its output message has begun (where tools were rendered: once its first token is not
    [TOOL_CALLS]; a call is held back to its end), given by `final` once there is one: its output is a message,
    or function calls, each sent as OpenAI sends one (`output_item.added` with no arguments yet, their delta and
    `.done`, then `output_item.done`)."""
    n, at = len(ends), {"item_id": mid, "output_index": 0, "content_index": 0}
    if final is not None:
        opened = final["output"][0]["type"] == "message"
    opening: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": head}),
        *([("response.queued", {"response": head})] if head["status"] == "queued" else []),  # background ones
        ("response.in_progress", {"response": {**head, "status": "in_progress"}}),
        *([("response.output_item.added", {"output_index": 0, "item": _message_item(mid, "in_progress", None)}),
           ("response.content_part.added", {**at, "part": _output_text("")})] if opened else [])]
    for seq in range(first, len(opening)):
        yield _event(opening[seq][0], seq, **opening[seq][1])
    for k in range(max(first - len(opening), 0), n):
        yield _event("response.output_text.delta", len(opening) + k, **at, delta=text[ends[k - 1] if k else 0:ends[k]],
                     logprobs=[] if lp_ends is None else _text_lps(lps[lp_ends[k - 1] if k else 0:lp_ends[k]]))
    if final is None:
        return
    status = final["status"]
    closing: list[tuple[str, dict[str, Any]]] = [
        ("response.output_text.done", {**at, "text": text, "logprobs": _text_lps(lps)}),
        ("response.content_part.done", {**at, "part": _output_text(text, lps)}),
        ("response.output_item.done", {"output_index": 0, "item": final["output"][0]})] if opened else []
    for k, call in enumerate([] if opened else final["output"]):
        of = {"item_id": call["id"], "output_index": k}
        closing += [("response.output_item.added", {"output_index": k,
                                                    "item": {**call, "arguments": "", "status": "in_progress"}}),
                    ("response.function_call_arguments.delta", {**of, "delta": call["arguments"]}),
                    ("response.function_call_arguments.done", {**of, "arguments": call["arguments"]}),
                    ("response.output_item.done", {"output_index": k, "item": call})]
    closing.append((f"response.{'incomplete' if status == 'cancelled' else status}", {"response": final}))
    for j, (kind, fields) in enumerate(closing):
        if (seq := len(opening) + n + j) >= first:
            yield _event(kind, seq, **fields)


@dataclass(eq=False)
class _Live:
    """A response still being made that `GET /v1/responses/{id}` answers (`store: true`; a background one
    always is). Its `task` takes the engine's outputs in; its streams (the POST's, a resumed one: `_follow`)
    make their events afresh from its state (`_events`), so that a client that leaves a background
    response's stream leaves the work going, and a later one starts where it likes."""

    head: dict[str, Any]  # its object as created
    mid: str  # its output message's id
    choice: Choice
    items: tuple[Item, ...]  # the conversation it answers, as `input_items` lists it
    ends: list[int] = field(default_factory=list)  # the output text's length after each delta event
    lps: list[dict[str, Any]] = field(default_factory=list)  # its tokens' logprobs (with the include), `chat_lp`'s
    lp_ends: list[int] | None = None  # with the include: how many of them after each delta event
    tool_token: int | None = None  # [TOOL_CALLS]'s id where tools were rendered: a reply that begins with it is a call
    final: dict[str, Any] | None = None  # its object once finished
    body: bytes = b""  # ... as JSON
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set, and replaced, at each change

    @property
    def background(self) -> bool:
        return bool(self.head["background"])

    def now(self) -> dict[str, Any]:
        """Its object as `GET` answers it: the final one, else "queued" while its engine request waits for a
        slot, then "in_progress" with its output so far."""
        if self.final is not None:
            return self.final
        if getattr(self.choice.handle, "state", None) == "waiting":
            return {**self.head, "status": "queued"}
        return {**self.head, "status": "in_progress",
                "output": [_message_item(self.mid, "in_progress", self.choice.text, self.lps)] if self.opened() else []}

    def held(self) -> bool:
        """Whether its reply is a call (it began with [TOOL_CALLS]), which is held back to its end."""
        return self.tool_token is not None and self.choice.token_ids[:1] == [self.tool_token]

    def opened(self) -> bool:
        """Whether its output message has begun: at once, or where tools were rendered, at a first token that does
        not begin a call."""
        return self.tool_token is None or (bool(self.choice.token_ids) and not self.held())

    def events(self, first: int) -> Iterator[bytes]:
        return _events(self.head, self.mid, self.choice.text, self.ends, self.final, first, self.lps, self.lp_ends,
                       opened=self.opened())

    def wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


def _find(srv: Server, response_id: str) -> _Live | Stored:
    """A response still being made, or a stored one, else a 404 naming it."""
    live = srv.live.get(response_id)
    return live if isinstance(live, _Live) else srv.stored(response_id)


async def _follow(live: _Live, first: int, *, owned: bool) -> AsyncIterator[bytes]:
    """`live`'s events from sequence number `first` on, as they come. `owned`: the stream of the request that
    made it (not a background one's), whose client leaving cancels it."""
    sent = first
    try:
        while True:
            changed, done = live.changed, live.final is not None
            for event in live.events(sent):
                yield event
                sent += 1
            if done:
                return
            await changed.wait()
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 (the stream has started: report in-band, and log the traceback)
        log.exception("/v1/responses %s: the stream ended with an internal error", live.head["id"])
        yield _event("error", sent, code="internal_error", param=None,
                     message=f"internal error: {type(e).__name__}: {e}")
    finally:  # a client that disconnects lands here too
        if owned and live.final is None and live.task is not None:
            live.task.cancel()


async def _replay(events: Iterable[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event


def _item(i: Item) -> dict[str, Any]:
    """A stored item as an input item (OpenAI's `ResponseInputMessageItem`, or `ResponseOutputMessage`;
    `ResponseFunctionToolCallItem`, `ResponseFunctionToolCallOutputItem`)."""
    if i.type == "function_call":
        return {"id": i.id, "type": i.type, "call_id": i.call_id, "name": i.name, "arguments": i.text,
                "status": "completed"}
    if i.type == "function_call_output":
        return {"id": i.id, "type": i.type, "call_id": i.call_id, "output": i.text, "status": "completed"}
    part = _output_text(i.text) if i.role == "assistant" else {"type": "input_text", "text": i.text}
    return {"id": i.id, "type": "message", "role": i.role, "status": "completed", "content": [part]}


def _items(messages: Sequence[ChatMessage]) -> tuple[Item, ...]:
    """Chat messages as the items the store keeps: an assistant's calls one `function_call` each, a tool result a
    `function_call_output`."""
    out: list[Item] = []
    for m in messages:
        if m.tool_calls:
            out += [Item(f"fc_{uuid.uuid4().hex}", "assistant", c["function"]["arguments"], "function_call", c["id"],
                         c["function"]["name"]) for c in m.tool_calls]
        elif m.role == "tool":
            out.append(Item(f"fco_{uuid.uuid4().hex}", "tool", m.text(), "function_call_output", m.tool_call_id,
                            m.name))
        else:
            out.append(Item(f"msg_{uuid.uuid4().hex}", m.role, m.text()))
    return tuple(out)


def _messages(items: Sequence[Item]) -> list[ChatMessage]:
    """Stored items as chat messages (checked when they were stored): a run of function calls is one assistant
    message's `tool_calls`, as in `ResponsesRequest.input_messages`."""
    out: list[ChatMessage] = []
    for k, i in enumerate(items):
        if i.type == "function_call":
            call = {"id": i.call_id, "type": "function", "function": {"name": i.name, "arguments": i.text}}
            if k and items[k - 1].type == "function_call" and out[-1].tool_calls is not None:
                out[-1].tool_calls.append(call)
            else:
                out.append(ChatMessage.model_construct(role="assistant", content=None, tool_calls=[call]))
        elif i.type == "function_call_output":
            out.append(ChatMessage.model_construct(role="tool", content=i.text, tool_call_id=i.call_id, name=i.name))
        else:
            out.append(ChatMessage.model_construct(role=i.role, content=i.text))
    return out


def _input_messages(body: ResponsesRequest, calls: dict[str, str]) -> list[ChatMessage]:
    """`body.input_messages(calls)` (in the encoding thread), its 400s naming the item's field."""
    try:
        return body.input_messages(calls)
    except ValueError as e:  # protocol's field errors
        raise ApiError(400, str(e), param=getattr(e, "param", "input")) from None


def _check_call_ids(body: ResponsesRequest, version: int) -> None:
    """Function call items only where the template has tools (v2/v3), and call ids it can write: v3's, non-empty
    (the chat path's rule: an id other than 9 letters and digits, OpenAI's `call_...`, is written as the tokenizer's
    `template_call_id` maps it, a stored conversation's too)."""
    for where, kind, call_id in body.call_ids():
        if version == 1:
            raise ApiError(400, f"{where}.type={kind!r}: this model's chat template (Mistral's v1, Mixtral 8x7B "
                                "Instruct's) has no tool calls or results; serve a model with a v2/v3 tokenizer",
                           param=f"{where}.type")
        if not tool_call_id_ok(call_id, version):
            raise ApiError(400, f"invalid {where}.call_id={json.dumps(call_id)[:80]}: Mistral's v3 chat template "
                                "writes each call's id: send the call's id, a non-empty string",
                           param=f"{where}.call_id")
