"""`POST /v1/responses` (OpenAI's Responses API) through the official `openai` client: its text, status and
usage are the chat path's for the same messages and sampling; its stream is OpenAI's typed events; what it
does not do is a 400 naming the parameter. Stored responses: a chain of `previous_response_id`s is the chat
of the whole conversation; `GET` / `DELETE /v1/responses/{id}` and `input_items`; the store's bounds; and
without a store (`--responses-store 0`) the stateless server's answers. Background responses: polled to the
foreground's output, cancelled, their streams resumed; responses in progress answered by `GET`."""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

pytest.importorskip("fastapi")
_engine = pytest.importorskip("mixlab.engine")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pydantic = pytest.importorskip("pydantic")

from conftest import hf_mixtral, hf_tokenizer_json, metric, until  # noqa: E402
from mixlab import load_model, load_tokenizer  # noqa: E402
from mixlab.serve import ServerConfig, ServerThread, create_app  # noqa: E402
from test_serve import _serve_cli  # noqa: E402

Engine = _engine.Engine
CONTEXT = 256
NAME = "tiny"
SYSTEM = "Answer in one word."
TURNS = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "And another?"}]
EVENTS = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
BACKGROUND = [EVENTS[0], "response.queued", *EVENTS[1:]]  # as OpenAI's: `response.queued` after `response.created`
DONE = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path: Path = hf_mixtral(tmp_path_factory.mktemp("responses"), vocab_size=32000, hidden_size=32,
                            intermediate_size=48, max_position_embeddings=CONTEXT)
    hf_tokenizer_json(path)
    return path


@pytest.fixture(scope="module")
def model_tok(ckpt: Path) -> tuple[Any, Any]:
    return load_model(ckpt, dtype="float32"), load_tokenizer(ckpt)


@contextlib.contextmanager
def _serving(model_tok: tuple[Any, Any], **config: Any) -> Iterator[str]:
    """A server of its own, under `config` (ServerConfig's fields)."""
    model, tok = model_tok
    with Engine(model, tok, max_batch=2) as engine, \
            ServerThread(create_app(engine, tok, ServerConfig(**{"model_name": NAME, "context_len": CONTEXT,
                                                                 **config}))) as url:
        yield url


@pytest.fixture(scope="module")
def server(model_tok: tuple[Any, Any]) -> Iterator[str]:
    model, tok = model_tok
    with Engine(model, tok, max_batch=4) as engine, \
            ServerThread(create_app(engine, tok, ServerConfig(model_name=NAME, context_len=CONTEXT))) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client: Any, messages: list[dict[str, Any]], **kw: Any) -> Any:
    return client.chat.completions.create(model=NAME, messages=messages, **kw)


def _as_items(turns: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The turns as Responses message items with typed parts (`type: "message"` on every other one)."""
    items = []
    for k, t in enumerate(turns):
        part = "output_text" if t["role"] == "assistant" else "input_text"
        item: dict[str, Any] = {"role": t["role"], "content": [{"type": part, "text": t["content"]}]}
        items.append({"type": "message", **item} if k % 2 else item)
    return items


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.95, "seed": 1234}])
@pytest.mark.parametrize("form", ["string", "items"])
def test_output_text_and_usage_are_the_chat_path_s(client: Any, sampling: dict[str, Any], form: str) -> None:
    seed = {"seed": sampling["seed"]} if "seed" in sampling else {}
    args = {k: v for k, v in sampling.items() if k != "seed"}
    turns = TURNS[:1] if form == "string" else TURNS
    given = turns[0]["content"] if form == "string" else _as_items(turns)
    r = client.responses.create(model=NAME, input=given, instructions=SYSTEM, max_output_tokens=12, extra_body=seed,
                                **args)
    c = _chat(client, [{"role": "system", "content": SYSTEM}, *turns], max_tokens=12, **args, **seed)
    assert r.output_text == c.choices[0].message.content and r.output_text
    assert r.status == ("incomplete" if c.choices[0].finish_reason == "length" else "completed")
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == \
        (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens)
    assert r.usage.output_tokens_details.reasoning_tokens == 0 and r.usage.input_tokens_details.cached_tokens >= 0
    assert r.id.startswith("resp_") and r.object == "response" and r.model == NAME
    msg = r.output[0]
    assert len(r.output) == 1 and msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.content[0].type == "output_text" and msg.content[0].annotations == []
    assert r.instructions == SYSTEM and r.max_output_tokens == 12 and r.store is True and r.tools == []
    assert r.previous_response_id is None
    assert r.temperature == args["temperature"] and r.text.format.type == "text"


def _third_token(client: Any, text: str) -> int:
    """The third token of the greedy reply to `text`: sent as a stop token id (vLLM's extra), it ends the
    reply "completed" at three tokens."""
    return _chat(client, [{"role": "user", "content": text}], max_tokens=5, temperature=0,
                 extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0].token_ids[2]  # type: ignore


def test_max_output_tokens_ends_it_incomplete(client: Any) -> None:
    r = client.responses.create(model=NAME, input="Hi", max_output_tokens=5, temperature=0,
                                extra_body={"ignore_eos": True}, metadata={"k": "v"}, user="u1")
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5 and r.output[0].status == "incomplete"
    assert r.metadata == {"k": "v"} and r.user == "u1"
    done = client.responses.create(model=NAME, input="Hi", max_output_tokens=5, temperature=0,
                                   extra_body={"ignore_eos": True, "stop_token_ids": [_third_token(client, "Hi")]})
    assert done.status == "completed" and done.incomplete_details is None and done.usage.output_tokens == 3


def _check_events(events: list[Any], text: str, status: str) -> None:
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert kinds == [*EVENTS, *["response.output_text.delta"] * len(deltas), *DONE, f"response.{status}"], kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(deltas) == text == events[-4].text and len(deltas) > 1
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert events[-1].response.output_text == text and events[-1].response.status == status
    assert events[-2].item.content[0].text == text and events[-3].part.text == text


def test_streamed_events_come_in_openai_s_order_and_join_to_the_text(client: Any, server: str) -> None:
    kw = {"model": NAME, "input": "Hi there", "max_output_tokens": 10, "temperature": 0,
          "extra_body": {"ignore_eos": True}}
    whole = client.responses.create(**kw)
    _check_events(list(client.responses.create(**kw, stream=True)), whole.output_text, "incomplete")
    # the SDK's stream helper finishes on response.completed only (OpenAI's own incomplete one it does not)
    stop = {"ignore_eos": True, "stop_token_ids": [_third_token(client, "Hi there")]}
    done = client.responses.create(**{**kw, "extra_body": stop})
    with client.responses.stream(**{**kw, "extra_body": stop}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    _check_events(events, done.output_text, "completed")
    assert final.output_text == done.output_text and final.usage.output_tokens == done.usage.output_tokens == 3
    # typed SSE, as OpenAI sends them: each `data:` line after its `event:` line of the same type
    with httpx.stream("POST", server + "/v1/responses", json={**{k: v for k, v in kw.items() if k != "extra_body"},
                                                               "ignore_eos": True, "stream": True}) as r:
        lines = [x for x in r.iter_lines() if x]
    assert lines[0] == "event: response.created" and lines[-2] == "event: response.incomplete"
    for head, data in zip(lines[::2], lines[1::2], strict=True):
        assert head == f"event: {json.loads(data.removeprefix('data: '))['type']}"


class Answer(pydantic.BaseModel):  # type: ignore[misc,name-defined]
    direction: Literal["up", "down"]
    sure: bool


def test_parse_with_a_pydantic_model_is_the_chat_path_s_structured_output(client: Any) -> None:
    pytest.importorskip("llguidance")
    r = client.responses.parse(model=NAME, input="Which way?", text_format=Answer, max_output_tokens=40,
                               temperature=0)
    c = client.chat.completions.parse(model=NAME, messages=[{"role": "user", "content": "Which way?"}],
                                      response_format=Answer, max_tokens=40, temperature=0)
    assert isinstance(r.output_parsed, Answer) and r.status == "completed"
    assert r.output_text == c.choices[0].message.content and r.output_parsed == c.choices[0].message.parsed
    assert r.text.format.type == "json_schema"
    obj = client.responses.create(model=NAME, input="Hi", text={"format": {"type": "json_object"}},
                                  max_output_tokens=40, temperature=0)
    assert isinstance(json.loads(obj.output_text), dict)


def _ids(items: Any) -> list[str]:
    return [i.id for i in items]


def test_a_chain_of_previous_response_ids_is_the_chat_of_the_whole_conversation(client: Any) -> None:
    """Each turn continues the stored conversation: the previous response's input items and its output, with
    this turn's instructions (a previous response's are not carried over), as OpenAI defines it; a streamed
    turn is stored too. Greedy, float32: the chat path's text for the whole message list, exactly."""
    kw = {"model": NAME, "max_output_tokens": 8, "temperature": 0}
    first = client.responses.create(input="Name a colour.", instructions=SYSTEM, **kw)
    with client.responses.stream(input=[{"role": "user", "content": "And another?"}], instructions=SYSTEM,
                                 previous_response_id=first.id, **kw) as stream:
        second = list(stream)[-1].response  # response.completed or .incomplete
    third = client.responses.create(input="One more.", previous_response_id=second.id, **kw)
    turns = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": first.output_text},
             {"role": "user", "content": "And another?"}, {"role": "assistant", "content": second.output_text},
             {"role": "user", "content": "One more."}]
    system = [{"role": "system", "content": SYSTEM}]
    for r, messages in ((first, system + turns[:1]), (second, system + turns[:3]), (third, turns)):
        c = _chat(client, messages, max_tokens=8, temperature=0)
        assert r.output_text == c.choices[0].message.content and r.output_text
        assert r.usage.input_tokens == c.usage.prompt_tokens
    assert (second.previous_response_id, third.previous_response_id) == (first.id, second.id)
    assert second.store and third.store and third.instructions is None
    # input_items: the conversation each response answered, newest first (OpenAI's default), its instructions never
    listed = client.responses.input_items.list(third.id)
    assert [(i.role, i.content[0].text) for i in listed.data] == [(t["role"], t["content"]) for t in turns[::-1]]
    assert listed.data[1].id == second.output[0].id and listed.data[3].id == first.output[0].id
    assert listed.data[1].type == "message" and listed.data[1].content[0].type == "output_text"
    assert listed.data[0].content[0].type == "input_text" and listed.data[0].status == "completed"
    assert [i.content[0].text for i in client.responses.input_items.list(second.id, order="asc")] == \
        [t["content"] for t in turns[:3]]


def test_retrieve_is_the_created_object_and_delete_removes_it(client: Any, server: str) -> None:
    body = {"model": NAME, "input": "Hi", "instructions": SYSTEM, "max_output_tokens": 4, "temperature": 0,
            "metadata": {"k": "v"}}
    made = httpx.post(server + "/v1/responses", json=body, timeout=30)
    got = httpx.get(f"{server}/v1/responses/{made.json()['id']}", timeout=30)
    assert got.status_code == 200 and got.content == made.content  # the same JSON, byte for byte
    r = client.responses.create(**body)
    assert client.responses.retrieve(r.id) == r and r.status == "incomplete"
    with client.responses.stream(**{**body, "max_output_tokens": 40}) as stream:
        streamed = [e for e in stream][-1].response
    assert client.responses.retrieve(streamed.id) == streamed  # as its last event carried it
    replay = httpx.get(f"{server}/v1/responses/{r.id}?stream=true", timeout=30)  # its events are not kept
    assert replay.status_code == 400 and replay.json()["error"]["param"] == "stream"
    head = httpx.head(f"{server}/v1/responses/{r.id}", timeout=30)
    assert head.status_code == 200 and head.headers["content-type"] == "application/json" and not head.content
    # OpenAI's deleted object (the client itself returns None); then it is gone
    gone = httpx.delete(f"{server}/v1/responses/{r.id}", timeout=30)
    assert gone.status_code == 200 and gone.json() == {"id": r.id, "object": "response", "deleted": True}
    assert client.responses.delete(streamed.id) is None
    for rid in (r.id, streamed.id):
        with pytest.raises(openai.NotFoundError) as e:
            client.responses.retrieve(rid)
        assert e.value.status_code == 404 and rid in e.value.message and e.value.body["param"] == "response_id"
        with pytest.raises(openai.NotFoundError):
            client.responses.delete(rid)
        with pytest.raises(openai.NotFoundError) as e:
            client.responses.create(model=NAME, input="Hi", previous_response_id=rid)
        assert e.value.body["param"] == "previous_response_id" and rid in e.value.message
        assert e.value.body["code"] == "previous_response_not_found"


def test_store_false_stores_nothing(client: Any) -> None:
    r = client.responses.create(model=NAME, input="Hi", max_output_tokens=2, store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=NAME, input="Hi", max_output_tokens=2, previous_response_id=r.id)
    assert e.value.body["param"] == "previous_response_id" and f"'{r.id}'" in e.value.message
    # a response that continues another may itself be left unstored
    kept = client.responses.create(model=NAME, input="Hi", max_output_tokens=2)
    after = client.responses.create(model=NAME, input="Go on", max_output_tokens=2, previous_response_id=kept.id,
                                    store=False)
    assert after.previous_response_id == kept.id and after.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(after.id)


@pytest.mark.parametrize("query,param", [("limit=0", "limit"), ("limit=101", "limit"), ("limit=x", "limit"),
                                         ("order=up", "order"), ("after=msg_nope", "after")])
def test_input_items_pages_and_refuses_bad_queries(client: Any, server: str, query: str, param: str) -> None:
    r = client.responses.create(model=NAME, input=_as_items(TURNS), max_output_tokens=2)
    every = _ids(client.responses.input_items.list(r.id, order="asc").data)
    assert len(every) == len(TURNS) == len(set(every))
    page = client.responses.input_items.list(r.id, limit=2)
    assert _ids(page.data) == every[::-1][:2] and page.has_more
    assert _ids(page.get_next_page().data) == every[::-1][2:]  # the client pages with `after`
    raw = httpx.get(f"{server}/v1/responses/{r.id}/input_items?limit=2&order=asc&after={every[0]}").json()
    assert [i["id"] for i in raw["data"]] == every[1:3] and raw["first_id"] == every[1] and raw["has_more"] is False
    bad = httpx.get(f"{server}/v1/responses/{r.id}/input_items?{query}")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.json()


def test_the_store_is_an_lru_bounded_by_count_behind_the_api_key(model_tok: tuple[Any, Any]) -> None:
    with _serving(model_tok, responses_store=2, api_key="k") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=60)
        a, b = (client.responses.create(model=NAME, input=t, max_output_tokens=2) for t in ("a", "b"))
        client.responses.retrieve(a.id)  # a is now the more recently used
        c = client.responses.create(model=NAME, input="c", max_output_tokens=2)
        with pytest.raises(openai.NotFoundError) as e:
            client.responses.retrieve(b.id)  # evicted: the least recently used
        assert "keeps the last 2 (--responses-store)" in e.value.message
        assert client.responses.retrieve(a.id) == a and client.responses.retrieve(c.id) == c
        # a chain that continues an evicted response is refused, naming it
        client.responses.create(model=NAME, input="d", max_output_tokens=2)  # a goes: c was read after it
        with pytest.raises(openai.NotFoundError) as e:
            client.responses.create(model=NAME, input="e", previous_response_id=a.id)
        assert e.value.body["param"] == "previous_response_id" and a.id in e.value.message
        assert metric(url, "mixlab_responses_stored") == 2 and metric(url, "mixlab_responses_stored_bytes") > 0
        for method in ("GET", "DELETE"):  # the API key guards them as every /v1 endpoint
            assert httpx.request(method, f"{url}/v1/responses/{c.id}").status_code == 401
        assert httpx.get(f"{url}/v1/responses/{c.id}/input_items").status_code == 401
        assert client.responses.retrieve(c.id) == c


def test_the_response_store_is_bounded_by_count_and_by_bytes() -> None:
    from mixlab.serve.store import Item, ResponseStore, Stored

    def _stored(text: str, items: int = 0) -> Stored:
        conversation = tuple(Item(f"msg_{k}", "user", text) for k in range(items))
        return Stored(b"{}", conversation, (Item("out", "assistant", text),))

    store = ResponseStore(3, 100)
    assert store.put("a", _stored("x" * 10, items=2)) and store.nbytes == 2 + 30  # its JSON, conversation, output
    assert store.put("b", _stored("é" * 10)) and store.nbytes == 32 + 22  # bytes of UTF-8, not characters
    assert store.get("a") is not None  # a is now the more recently used: b goes first
    assert store.put("c", _stored("y" * 50)) and store.get("b") is None and len(store) == 2  # by bytes
    assert store.nbytes == 32 + 52 and store.put("d", _stored("")) and len(store) == 3
    assert store.put("e", _stored("z")) and len(store) == 3 and store.get("a") is None  # by count: a, the oldest
    assert not store.put("f", _stored("w" * 99)) and store.get("f") is None and len(store) == 3  # alone over the bound
    assert store.pop("c") is not None and store.pop("c") is None and store.nbytes == 2 + 3
    # a background response's delta ends are charged too, 4 bytes each
    back = Stored(b"{}", (), (Item("out", "assistant", "ab"),), array("I", [1, 2]))
    assert back.background and back.size == 2 + 2 + 8 and not _stored("x").background
    with pytest.raises(ValueError, match="at least 1 response"):
        ResponseStore(0, 100)


def test_without_a_store_the_api_is_stateless_as_before(model_tok: tuple[Any, Any]) -> None:
    with _serving(model_tok, responses_store=0) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.responses.create(model=NAME, input="Hi", max_output_tokens=2, store=True)
        assert r.store is False
        for method in ("GET", "DELETE"):
            got = httpx.request(method, f"{url}/v1/responses/{r.id}")
            assert got.status_code == 404 and got.json()["error"]["message"] == (
                f"no response {r.id!r}: this server stores no responses (POST /v1/responses is stateless; its "
                "`store` is answered false)")
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=NAME, input="Hi", previous_response_id=r.id)
        assert e.value.body["param"] == "previous_response_id" and e.value.body["message"] == (
            f'previous_response_id="{r.id}" is not supported by this server (leave it out, or send null)')
        assert "mixlab_responses_stored" not in httpx.get(url + "/metrics").text


def test_the_flag_sets_the_store(ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, srv, _ = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--responses-store", "7")
    assert code == 0 and srv.store.max_count == 7
    code, srv, _ = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--responses-store", "0")
    assert code == 0 and srv.store is None
    code, srv, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--responses-store", "-1")
    assert code == 2 and srv is None and "--responses-store must be an integer >= 0" in err


def test_stored_endpoints_are_counted(server: str, client: Any) -> None:
    def count(endpoint: str, status: str) -> float:
        m = re.search(rf'^mixlab_requests_total\{{endpoint="{re.escape(endpoint)}",status="{status}"\}} (\S+)$',
                      httpx.get(server + "/metrics").text, re.M)
        return float(m.group(1)) if m else 0.0

    before = count("/v1/responses", "200"), count("/v1/responses/{id}", "200"), count("/v1/responses/{id}", "404")
    r = client.responses.create(model=NAME, input="Hi", max_output_tokens=2)
    client.responses.retrieve(r.id)
    assert httpx.get(f"{server}/v1/responses/resp_nope").status_code == 404
    assert (count("/v1/responses", "200"), count("/v1/responses/{id}", "200"),
            count("/v1/responses/{id}", "404")) == (before[0] + 1, before[1] + 1, before[2] + 1)


def test_the_json_sent_is_openai_s_schema(server: str) -> None:
    """Validated by the openai package's own models (the client itself builds them without validating)."""
    types = pytest.importorskip("openai.types.responses")
    body = {"model": NAME, "input": "hi", "instructions": "x", "max_output_tokens": 4, "metadata": {"a": "b"}}
    r = httpx.post(server + "/v1/responses", json=body, timeout=30).json()
    assert types.Response.model_validate(r).output_text == r["output"][0]["content"][0]["text"]
    chained = {**body, "input": _as_items(TURNS), "previous_response_id": r["id"], "instructions": None}
    later = httpx.post(server + "/v1/responses", json=chained, timeout=30).json()
    assert types.Response.model_validate(later).previous_response_id == r["id"]
    items = httpx.get(f"{server}/v1/responses/{later['id']}/input_items", timeout=30).json()
    assert len(types.ResponseItemList.model_validate(items).data) == 1 + 1 + len(TURNS)
    event = pydantic.TypeAdapter(types.ResponseStreamEvent)
    with httpx.stream("POST", server + "/v1/responses", json={**body, "stream": True}, timeout=30) as s:
        events = [event.validate_python(json.loads(x[6:])) for x in s.iter_lines() if x.startswith("data: ")]
    assert events[-1].type == "response.incomplete" and events[-1].response.usage.output_tokens == 4




@pytest.mark.parametrize("body,param", [
    ({"input": "hi", "previous_response_id": 5}, "previous_response_id"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
    ({"input": "hi", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": "hi", "include": ["message.output_text.logprobs", "reasoning.encrypted_content"]}, "include"),
    ({"input": "hi", "background": True, "store": False}, "background"),
    ({"input": "hi", "truncation": "sometimes"}, "truncation"),
    ({"input": "hi", "top_logprobs": 21}, "top_logprobs"),
    ({"input": "hi", "top_logprobs": -1}, "top_logprobs"),
    ({"input": "hi", "n": 2}, "n"),
    ({"input": "hi", "max_tokens": 5}, "max_tokens"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input[0].call_id"),  # no call
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": "hi"}, {"type": "function_call", "call_id": "abcDEF123", "name": "f",
                                                      "arguments": "{}"},
                {"type": "function_call_output", "call_id": "abcDEF123", "output": "1"}]}, "input[1].type"),  # v1
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     "input[0].content[0]"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "\ud83d"}]}]}, "input[0].content"),
    ({"input": "\ud83d"}, "input"),
    ({"input": []}, "input"),
    ({"input": 5}, "input"),
    ({}, "input"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": CONTEXT}, "max_output_tokens"),
    ({"input": "hi", "temperature": 3.0}, "temperature"),
    ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"input": "hi", "text": {"format": {"type": "json_object"}}, "guided_regex": "a"}, "guided_regex"),
    # text the response echoes, with a lone surrogate: a 500 as the response was written
    ({"input": "hi", "metadata": {"k": "\ud83d"}}, "metadata.k"),
    ({"input": "hi", "user": "\ud83d"}, "user"),
    ({"input": "hi", "text": {"format": {"type": "text", "name": "\ud83d"}}}, "text"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"x": math.inf}}}}, "text"),
])
def test_bad_requests_name_the_parameter(server: str, body: dict[str, Any], param: str) -> None:
    # json.dumps: ASCII, so a lone surrogate goes as its escape (httpx's json= cannot encode it)
    r = httpx.post(server + "/v1/responses", content=json.dumps({"model": NAME, **body}),
                   headers={"Content-Type": "application/json"}, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param, (r.status_code, err)
    assert "\n" not in err["message"] and err["type"] == "invalid_request_error"
    assert "should be a valid" not in err["message"], err  # what was expected, not pydantic's union branch


def test_a_client_that_leaves_cancels_its_request(server: str, model_tok: tuple[Any, Any]) -> None:
    before = metric(server, "mixlab_requests_cancelled_total")
    body = {"model": NAME, "input": "Hi", "max_output_tokens": CONTEXT - 40, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", server + "/v1/responses", json={**body, "stream": True}, timeout=30) as resp:
        lines = resp.iter_lines()
        rid = json.loads(next(x for x in lines if x.startswith("data: "))[6:])["response"]["id"]
        while "output_text.delta" not in next(lines):  # the reply has begun
            pass
    # the engine request is cancelled and its cache freed; streamed or not (a client's timeout is a disconnect)
    assert until(lambda: metric(server, "mixlab_running_requests") == 0)
    assert metric(server, "mixlab_requests_cancelled_total") == before + 1
    assert metric(server, "mixlab_kv_cache_used_bytes") == 0
    assert httpx.get(f"{server}/v1/responses/{rid}").status_code == 404  # a cancelled response is not stored
    model, tok = model_tok
    with Engine(model, tok, max_batch=2) as engine, \
            ServerThread(create_app(engine, tok, ServerConfig(model_name=NAME, context_len=CONTEXT))) as url:
        forward = engine.runner.forward
        engine.runner.forward = lambda items: (time.sleep(0.005), forward(items))[1]  # ~200 steps: over 0.3 s
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/v1/responses", json=body, timeout=0.3)
        assert until(lambda: metric(url, "mixlab_requests_cancelled_total") == 1)
        assert until(lambda: metric(url, "mixlab_running_requests") == 0)


def test_an_engine_failure_mid_stream_ends_it_with_response_failed(model_tok: tuple[Any, Any]) -> None:
    model, tok = model_tok
    engine = Engine(model, tok, max_batch=2).start()
    with ServerThread(create_app(engine, tok, ServerConfig(model_name=NAME, context_len=CONTEXT))) as url:
        body = {"input": "Hi", "max_output_tokens": CONTEXT - 40, "ignore_eos": True, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", url + "/v1/responses", json=body, timeout=30) as resp:
            lines = (x for x in resp.iter_lines() if x)
            rid = json.loads(next(x for x in lines if x.startswith("data: "))[6:])["response"]["id"]
            while "output_text.delta" not in next(lines):
                pass
            engine.shutdown()  # the engine fails its running requests
            rest = list(lines)
        assert httpx.get(f"{url}/v1/responses/{rid}").status_code == 404  # a failed response is not stored
    # OpenAI's last event for a failed response: the response itself, its error and its output so far
    assert rest[-2] == "event: response.failed", rest[-4:]
    failed = _valid(json.loads(rest[-1].removeprefix("data: "))["response"])
    assert failed.status == "failed" and failed.error.code == "server_error" and "shut down" in failed.error.message
    assert failed.output[0].status == "incomplete" and rest[-4] == "event: response.output_item.done"


# -- background responses, and responses in progress ------------------------------------------------------------

LONG = {"model": NAME, "input": "Hi", "max_output_tokens": CONTEXT - 40, "temperature": 0,
        "extra_body": {"ignore_eos": True}}  # ~200 steps of 5 ms on the slow server: over a second


@pytest.fixture(scope="module")
def slow(model_tok: tuple[Any, Any]) -> Iterator[tuple[str, Any]]:
    """A server whose engine takes at least 5 ms a step, so that a long response is still being made when a
    test looks at it; and its app's server state."""
    model, tok = model_tok
    with Engine(model, tok, max_batch=2) as engine:
        forward = engine.runner.forward
        engine.runner.forward = lambda items: (time.sleep(0.005), forward(items))[1]
        app = create_app(engine, tok, ServerConfig(model_name=NAME, context_len=CONTEXT))
        with ServerThread(app) as url:
            yield url, app.state.server


def _client(url: str) -> Any:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _poll(client: Any, rid: str) -> Any:
    """The response once it has finished."""
    deadline = time.monotonic() + 60
    while (r := client.responses.retrieve(rid)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, r
        time.sleep(0.02)
    return r


def _valid(obj: dict[str, Any]) -> Any:
    """`obj` validated by the openai package's own model (the client builds its objects without validating)."""
    return pytest.importorskip("openai.types.responses").Response.model_validate(obj)


def test_a_background_response_is_polled_to_the_foreground_s_output(client: Any, server: str) -> None:
    kw = {"model": NAME, "input": "Hi there", "temperature": 0}
    stop = {"ignore_eos": True, "stop_token_ids": [_third_token(client, "Hi there")]}
    for limit, extra in ((12, {"ignore_eos": True}), (12, stop)):  # ended by max_output_tokens, then by a stop token
        fore = client.responses.create(**kw, max_output_tokens=limit, extra_body=extra)
        back = client.responses.create(**kw, max_output_tokens=limit, extra_body=extra, background=True)
        assert back.background is True and back.status in ("queued", "in_progress") and back.usage is None
        done = _poll(client, back.id)
        assert done.output_text == fore.output_text and done.output_text and done.status == fore.status
        assert done.usage.output_tokens == fore.usage.output_tokens <= limit and done.background is True
        assert done.usage.input_tokens == fore.usage.input_tokens and done.id == back.id
        assert client.responses.retrieve(back.id) == done  # stored as any other
    assert fore.status == "completed" and done.status == "completed"
    # it continues a conversation, lists its items, and validates as OpenAI's objects
    later = client.responses.create(model=NAME, input="Go on", previous_response_id=done.id, max_output_tokens=4)
    assert later.previous_response_id == done.id
    items = client.responses.create(**{**kw, "input": _as_items(TURNS)}, max_output_tokens=4, background=True)
    assert len(client.responses.input_items.list(items.id).data) == len(TURNS)  # at once, and once done
    assert len(client.responses.input_items.list(_poll(client, items.id).id).data) == len(TURNS)
    raw = httpx.post(server + "/v1/responses", json={**kw, "max_output_tokens": 4, "background": True})
    assert _valid(raw.json()).status in ("queued", "in_progress")
    assert _valid(httpx.get(f"{server}/v1/responses/{raw.json()['id']}").json()).background is True


def test_get_answers_a_response_in_progress_and_cancel_stops_a_background_one(slow: tuple[str, Any]) -> None:
    url, srv = slow
    client = _client(url)
    cancelled, steps = metric(url, "mixlab_requests_cancelled_total"), metric(url, "mixlab_engine_steps_total")
    # a stored response being streamed (not in the background): GET says in_progress, with its output so far
    with httpx.stream("POST", url + "/v1/responses", json={**LONG, "ignore_eos": True, "stream": True,
                                                             "extra_body": None}, timeout=60) as s:
        lines = (x for x in s.iter_lines() if x.startswith("data: "))
        rid = json.loads(next(lines)[6:])["response"]["id"]
        begun = [json.loads(next(x for x in lines if "output_text.delta" in x)[6:])]
        now = httpx.get(f"{url}/v1/responses/{rid}").json()
        assert now["status"] == "in_progress" and now["background"] is False and now["usage"] is None
        assert _valid(now).output[0].status == "in_progress"
        with pytest.raises(openai.BadRequestError) as e:  # OpenAI's words
            client.responses.cancel(rid)
        assert e.value.body["message"] == "Cannot cancel a synchronous response."
        for method in ("DELETE", "POST"):  # not deleted, nor continued, while it is being made
            r = httpx.request(method, url + ("/v1/responses" if method == "POST" else f"/v1/responses/{rid}"),
                              json={"input": "x", "previous_response_id": rid} if method == "POST" else None)
            assert r.status_code == 400 and "still in progress" in r.json()["error"]["message"], r.json()
        events = begun + [json.loads(x[6:]) for x in lines]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text.startswith(now["output"][0]["content"][0]["text"]) and events[-1]["type"] == "response.incomplete"
    assert client.responses.retrieve(rid).output_text == text
    # a background one: running, counted in the engine's gauges and the server's, until cancelled
    back = client.responses.create(**LONG, background=True)
    assert until(lambda: client.responses.retrieve(back.id).status == "in_progress")
    assert metric(url, "mixlab_running_requests") == 1 and metric(url, "mixlab_http_requests_in_progress") == 1
    assert metric(url, "mixlab_kv_cache_used_bytes") > 0 and back.id in srv.live
    gone = client.responses.cancel(back.id)
    assert gone.status == "cancelled" and gone.output[0].status == "incomplete" and gone.usage.output_tokens < 200
    assert until(lambda: metric(url, "mixlab_running_requests") == 0)  # its slot and cache freed
    for gauge in ("mixlab_kv_cache_used_bytes", "mixlab_http_requests_in_progress", "mixlab_queue_depth"):
        assert metric(url, gauge) == 0, gauge
    assert metric(url, "mixlab_requests_cancelled_total") == cancelled + 1
    assert metric(url, "mixlab_engine_steps_total") - steps < 2 * (CONTEXT - 40)  # it stopped
    assert client.responses.retrieve(back.id) == gone and client.responses.cancel(back.id) == gone  # unchanged
    finished = client.responses.create(model=NAME, input="Hi", max_output_tokens=2, background=True)
    assert client.responses.cancel(_poll(client, finished.id).id) == client.responses.retrieve(finished.id)
    assert client.responses.retrieve(finished.id).status == "incomplete"
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_nope")
    assert not srv.live


def _stream_events(lines: Iterator[str]) -> list[dict[str, Any]]:
    return [json.loads(x[6:]) for x in lines if x.startswith("data: ")]


def test_a_background_stream_outlives_its_client_and_resumes_where_it_left(slow: tuple[str, Any],
                                                                          client: Any) -> None:
    url, _ = slow
    slow_client = _client(url)
    body = {**LONG, "ignore_eos": True, "stream": True, "background": True, "extra_body": None}

    def lines(query: str) -> list[str]:  # a resumed stream's lines, `event:` and `data:` in pairs
        with httpx.stream("GET", f"{url}/v1/responses/{rid}?stream=true{query}", timeout=60) as s:
            return [x for x in s.iter_lines() if x]

    with httpx.stream("POST", url + "/v1/responses", json=body, timeout=60) as s:
        sent, first = s.iter_lines(), []
        while len(first) < 2 * 8:  # the four opening events, then deltas; then the client leaves
            if x := next(sent):
                first.append(x)
    head = json.loads(first[1][6:])["response"]
    rid = head["id"]
    assert head["status"] == "queued" and head["background"] is True
    assert slow_client.responses.retrieve(rid).status == "in_progress"  # the client left; the work goes on
    every = first + lines("&starting_after=7")  # resumed after the 8th event, while it is being made
    events = [json.loads(x[6:]) for x in every[1::2]]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.incomplete" and len(events) > CONTEXT - 40
    final = slow_client.responses.retrieve(rid)
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == final.output_text
    assert final.status == "incomplete" and final.usage.output_tokens == CONTEXT - 40
    # the same greedy reply as in the foreground, on another server
    assert final.output_text == client.responses.create(**LONG).output_text
    # after it finished, a replay is the very stream, byte for byte: whole, or from any event on (past the end:
    # nothing); and the openai client resumes it too
    event = pydantic.TypeAdapter(pytest.importorskip("openai.types.responses").ResponseStreamEvent)
    assert lines("") == every and all(event.validate_python(e) for e in events)
    for after in (0, 20, len(events) - 2, len(events) + 5):
        assert lines(f"&starting_after={after}") == every[2 * (after + 1):]
    resumed = slow_client.responses.retrieve(rid, stream=True, starting_after=20)
    assert [e.sequence_number for e in resumed] == list(range(21, len(events)))
    for query, param in (("stream=true&starting_after=x", "starting_after"),
                         ("stream=true&starting_after=-2", "starting_after")):
        bad = httpx.get(f"{url}/v1/responses/{rid}?{query}")
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param


def test_a_failed_background_response_is_stored_as_failed(model_tok: tuple[Any, Any]) -> None:
    model, tok = model_tok
    engine = Engine(model, tok, max_batch=2).start()
    with ServerThread(create_app(engine, tok, ServerConfig(model_name=NAME, context_len=CONTEXT))) as url:
        client = _client(url)
        back = client.responses.create(**LONG, background=True)
        assert until(lambda: client.responses.retrieve(back.id).status == "in_progress")
        engine.shutdown()  # the engine fails its running requests
        failed = _poll(client, back.id)
        assert failed.status == "failed" and failed.error.code == "server_error"
        assert "the engine shut down" in failed.error.message
        assert _valid(httpx.get(f"{url}/v1/responses/{back.id}").json()).status == "failed"
        with httpx.stream("GET", f"{url}/v1/responses/{back.id}?stream=true&starting_after=3", timeout=60) as s:
            events = _stream_events(s.iter_lines())
        assert events[-1]["type"] == "response.failed" and _valid(events[-1]["response"]).error == failed.error


def test_a_cancelled_background_stream_ends_with_the_cancelled_response(slow: tuple[str, Any]) -> None:
    """OpenAI's stream events have no `response.cancelled`: the cancelled response comes whole (status "cancelled",
    its output so far) as the last event, `response.incomplete` (the union's event for a response that ended
    before its output did), after its text's done events, as the openai client reads it live and replayed."""
    url, _ = slow
    client = _client(url)
    events, gone = [], None
    for e in client.responses.create(**LONG, background=True, stream=True):
        events.append(e)
        if len(events) == len(BACKGROUND) + 3:  # three deltas in: cancelled from another request, as a user would
            gone = client.responses.cancel(events[0].response.id)
    assert gone is not None and gone.status == "cancelled"
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert kinds == [*BACKGROUND, *["response.output_text.delta"] * len(deltas), *DONE, "response.incomplete"], kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    last = events[-1].response
    assert last.status == "cancelled" and last.error is None and last.output[0].status == "incomplete"
    assert last.output_text == "".join(deltas) == gone.output_text and 3 <= last.usage.output_tokens < CONTEXT - 40
    assert last.usage == gone.usage and last.id == gone.id
    event = pydantic.TypeAdapter(pytest.importorskip("openai.types.responses").ResponseStreamEvent)
    replayed = list(client.responses.retrieve(gone.id, stream=True))  # the same stream, from the store
    assert [e.model_dump() for e in replayed] == [e.model_dump() for e in events]
    assert all(event.validate_python(e.model_dump()) for e in replayed)


def test_a_queued_background_response_is_cancelled_and_a_drain_cancels_the_rest(model_tok: tuple[Any, Any]) -> None:
    """One slot: the second background response waits, `queued`, until cancelled. SIGTERM cancels the first: a
    background response's result would live only in this process, which is ending."""
    import signal

    model, tok = model_tok
    with Engine(model, tok, max_batch=1) as engine:
        forward = engine.runner.forward
        engine.runner.forward = lambda items: (time.sleep(0.005), forward(items))[1]
        app = create_app(engine, tok, ServerConfig(model_name=NAME, context_len=CONTEXT))
        thread = ServerThread(app)
        with thread as url:
            srv, client = app.state.server, _client(url)
            running = client.responses.create(**LONG, background=True)
            assert until(lambda: client.responses.retrieve(running.id).status == "in_progress")
            waiting = client.responses.create(**LONG, background=True)
            assert waiting.status == "queued" and metric(url, "mixlab_queue_depth") == 1
            assert client.responses.retrieve(waiting.id).status == "queued"
            assert client.responses.cancel(waiting.id).status == "cancelled"
            assert until(lambda: metric(url, "mixlab_queue_depth") == 0)
            assert client.responses.retrieve(running.id).status == "in_progress"
            thread.server.handle_exit(signal.SIGTERM, None)
            assert until(lambda: running.id not in srv.live) and until(lambda: engine.stats()["running"] == 0)
            assert json.loads(srv.store.get(running.id).body)["status"] == "cancelled"


def test_background_needs_the_store(model_tok: tuple[Any, Any], client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=NAME, input="Hi", background=True, store=False)
    assert e.value.body["param"] == "background" and "store=true" in e.value.message
    with _serving(model_tok, responses_store=0) as url:
        with pytest.raises(openai.BadRequestError) as e:
            _client(url).responses.create(model=NAME, input="Hi", background=True)
        assert e.value.body["param"] == "background" and "--responses-store 0" in e.value.message
        got = httpx.post(f"{url}/v1/responses/resp_x/cancel")
        assert got.status_code == 404 and "stores no responses" in got.json()["error"]["message"]


def test_finished_background_responses_leave_by_the_store_s_bounds(model_tok: tuple[Any, Any]) -> None:
    with _serving(model_tok, responses_store=2) as url:
        client = _client(url)
        back = _poll(client, client.responses.create(model=NAME, input="a", max_output_tokens=3, background=True).id)
        # charged its JSON, its conversation and output, and its stream's delta ends (4 bytes each)
        with httpx.stream("GET", f"{url}/v1/responses/{back.id}?stream=true", timeout=60) as s:
            deltas = sum(e["type"] == "response.output_text.delta" for e in _stream_events(s.iter_lines()))
        size = len(httpx.get(f"{url}/v1/responses/{back.id}").content) + 1 + len(back.output_text.encode()) + 4 * deltas
        assert metric(url, "mixlab_responses_stored") == 1 and deltas > 0
        assert metric(url, "mixlab_responses_stored_bytes") == size
        for text in ("b", "c"):
            client.responses.create(model=NAME, input=text, max_output_tokens=3)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(back.id)
        assert metric(url, "mixlab_responses_stored") == 2


# ------------------------------------------------------------------------------------------------
# logprobs (include: ["message.output_text.logprobs"], top_logprobs) and truncation "auto"

LOGPROBS = ["message.output_text.logprobs"]


def _lps(entries: Any, with_bytes: bool = True) -> list[Any]:
    """Logprob entries (the openai package's objects) as plain tuples, alternatives included."""
    return [(e.token, e.logprob, e.bytes if with_bytes else None,
             [(t.token, t.logprob, t.bytes if with_bytes else None) for t in e.top_logprobs]) for e in entries]


@pytest.mark.parametrize("ending", ["length", "stop"])
def test_logprobs_are_the_chat_path_s_token_by_token(client: Any, server: str, ending: str) -> None:
    """Greedy, float32: each token's logprob and its top alternatives are the chat path's for the same
    conversation (a stop token's entry included, whose text is empty), and the tokens join to the text."""
    if ending == "length":
        given, messages, extra = _as_items(TURNS), [{"role": "system", "content": SYSTEM}, *TURNS], {"ignore_eos": True}
    else:
        given, messages = "Hi there", [{"role": "user", "content": "Hi there"}]
        extra = {"ignore_eos": True, "stop_token_ids": [_third_token(client, "Hi there")]}
    kw = {"model": NAME, "input": given, "instructions": SYSTEM if ending == "length" else None,
          "max_output_tokens": 10, "temperature": 0, "extra_body": extra}
    r = client.responses.create(**kw, include=LOGPROBS, top_logprobs=3)
    c = _chat(client, messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3, extra_body=extra)
    got = r.output[0].content[0].logprobs
    assert _lps(got) == _lps(c.choices[0].logprobs.content) and len(got) == r.usage.output_tokens
    assert all(len(e.top_logprobs) == 3 for e in got) and r.top_logprobs == 3
    assert "".join(e.token for e in got) == r.output_text and r.output_text == c.choices[0].message.content
    assert r.status == ("incomplete" if ending == "length" else "completed")
    assert client.responses.retrieve(r.id) == r  # stored with them
    # without the include: none (top_logprobs alone asks for nothing); with it and no top_logprobs: no alternatives
    assert client.responses.create(**kw, top_logprobs=3).output[0].content[0].logprobs == []
    bare = client.responses.create(**kw, include=LOGPROBS).output[0].content[0].logprobs
    assert _lps(bare) == [(*e[:3], []) for e in _lps(got)]
    # the JSON is OpenAI's schema (the client builds its objects without validating)
    raw = httpx.post(server + "/v1/responses", json={**{k: v for k, v in kw.items() if k != "extra_body"}, **extra,
                                                      "include": LOGPROBS, "top_logprobs": 3}, timeout=30).json()
    assert _lps(_valid(raw).output[0].content[0].logprobs) == _lps(got)


def test_streamed_deltas_carry_their_tokens_logprobs_and_a_background_replay_the_same(client: Any,
                                                                                      server: str) -> None:
    extra = {"ignore_eos": True, "stop_token_ids": [_third_token(client, "Hi there")]}
    body = {"model": NAME, "input": "Hi there", "max_output_tokens": 10, "temperature": 0, "include": LOGPROBS,
            "top_logprobs": 2}
    whole = client.responses.create(**body, extra_body=extra).output[0].content[0].logprobs
    events = list(client.responses.create(**body, extra_body={**extra, "stop_token_ids": []}, stream=True))
    final = events[-1].response
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert final.status == "incomplete" and len(final.output[0].content[0].logprobs) == 10
    # each delta's logprobs are its tokens': they join to its text, and all of them to the final ones
    assert [lp for d in deltas for lp in _lps(d.logprobs, with_bytes=False)] == \
        _lps(final.output[0].content[0].logprobs, with_bytes=False) == _lps(events[-4].logprobs, with_bytes=False)
    assert all("".join(lp.token for lp in d.logprobs) == d.delta for d in deltas)
    assert _lps(events[-3].part.logprobs) == _lps(final.output[0].content[0].logprobs)
    assert client.responses.retrieve(final.id) == final
    # a background stream: the stop token's empty text comes as its own delta, with its logprob; replayed after
    # it finished from the stored JSON, byte for byte, whole or resumed; every event OpenAI's schema
    with httpx.stream("POST", server + "/v1/responses", json={**body, **extra, "stream": True, "background": True},
                      timeout=60) as s:
        live = [x for x in s.iter_lines() if x]
    sent = [json.loads(x[6:]) for x in live[1::2]]
    rid = sent[0]["response"]["id"]
    for after in (-1, 5):
        with httpx.stream("GET", f"{server}/v1/responses/{rid}?stream=true&starting_after={after}", timeout=60) as s:
            assert [x for x in s.iter_lines() if x] == live[2 * (after + 1):]
    event = pydantic.TypeAdapter(pytest.importorskip("openai.types.responses").ResponseStreamEvent)
    parsed = [event.validate_python(e) for e in sent]
    got = [lp for e in parsed if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert [(lp.token, lp.logprob) for lp in got] == [(e.token, e.logprob) for e in whole] and len(got) == 3
    assert sent[-1]["type"] == "response.completed" and _lps(_poll(client, rid).output[0].content[0].logprobs) == \
        _lps(whole)
    assert sent[-5]["type"] == "response.output_text.delta" and [lp["token"] for lp in sent[-5]["logprobs"]] == [""]


def test_a_background_stream_resumed_while_it_is_made_carries_its_logprobs(slow: tuple[str, Any]) -> None:
    """Its logprobs so far in GET, and in the events of a stream resumed mid-way, which join to the final ones."""
    url, srv = slow
    body = {**LONG, "ignore_eos": True, "stream": True, "background": True, "extra_body": None, "include": LOGPROBS,
            "top_logprobs": 1}
    with httpx.stream("POST", url + "/v1/responses", json=body, timeout=60) as s:
        sent, first = s.iter_lines(), []
        while len(first) < 2 * 8:
            if x := next(sent):
                first.append(x)
    rid = json.loads(first[1][6:])["response"]["id"]
    now = httpx.get(f"{url}/v1/responses/{rid}").json()
    assert now["status"] == "in_progress" and rid in srv.live
    part = now["output"][0]["content"][0]
    assert part["logprobs"] and "".join(e["token"] for e in part["logprobs"]) == part["text"]
    with httpx.stream("GET", f"{url}/v1/responses/{rid}?stream=true&starting_after=7", timeout=60) as s:
        events = [json.loads(x[6:]) for x in first[1::2]] + _stream_events(s.iter_lines())
    final = _valid(httpx.get(f"{url}/v1/responses/{rid}").json())
    streamed = [e for ev in events if ev["type"] == "response.output_text.delta" for e in ev["logprobs"]]
    assert [(e["token"], e["logprob"], [t["token"] for t in e["top_logprobs"]]) for e in streamed] == \
        [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in final.output[0].content[0].logprobs]
    assert len(streamed) == final.usage.output_tokens == CONTEXT - 40 and events[-1]["type"] == "response.incomplete"
def test_a_stored_response_is_charged_its_logprobs(model_tok: tuple[Any, Any]) -> None:
    with _serving(model_tok, responses_store=2) as url:
        client = _client(url)
        back = _poll(client, client.responses.create(model=NAME, input="a", max_output_tokens=3, background=True,
                                                     include=LOGPROBS, top_logprobs=5).id)
        with httpx.stream("GET", f"{url}/v1/responses/{back.id}?stream=true", timeout=60) as s:
            deltas = sum(e["type"] == "response.output_text.delta" for e in _stream_events(s.iter_lines()))
        body = httpx.get(f"{url}/v1/responses/{back.id}").content
        assert len(json.loads(body)["output"][0]["content"][0]["logprobs"]) == 3 and deltas > 0
        # its JSON (logprobs and all), conversation, output, and its deltas' ends and logprob ends (4 bytes each)
        size = len(body) + 1 + len(back.output_text.encode()) + 8 * deltas
        assert metric(url, "mixlab_responses_stored_bytes") == size


def _turns(tok: Any, messages: list[dict[str, str]], room: int) -> list[dict[str, str]]:
    """The reference truncation: the system message, then the newest whole turns (from a user message on) that
    fit in `room` tokens with it, the last one always."""
    system, rest = messages[:1], messages[1:]
    starts = [k for k, m in enumerate(rest) if m["role"] == "user"]
    for k in starts:
        if len(tok.encode_chat(system + rest[k:])) <= room or k == starts[-1]:
            return system + rest[k:]
    raise AssertionError("no user message")


def test_truncation_auto_drops_the_oldest_turns_to_fit_the_context(model_tok: tuple[Any, Any]) -> None:
    """A chain of turns longer than a small context (--max-model-len 64): "auto" answers with the newest turns
    that fit with max_output_tokens, as the chat path does for those; "disabled" (the default) is a 400 with the
    numbers; and with the newest input alone over the context, "auto" is a 400 too."""
    _, tok = model_tok
    context, out = 64, 6
    with _serving(model_tok, context_len=context) as url:
        client = _client(url)
        kw = {"model": NAME, "max_output_tokens": out, "temperature": 0, "instructions": SYSTEM,
              "extra_body": {"ignore_eos": True}}
        messages, previous, dropped = [{"role": "system", "content": SYSTEM}], None, False
        for k in range(8):
            text = f"Tell me about colour number {k}."
            messages.append({"role": "user", "content": text})
            if previous is not None and len(tok.encode_chat(messages)) + out > context:
                with pytest.raises(openai.BadRequestError) as e:  # disabled: today's 400, naming the numbers
                    client.responses.create(input=text, previous_response_id=previous, **kw)
                n = len(tok.encode_chat(messages))
                assert e.value.body["code"] == "context_length_exceeded" and f"{n} tokens" in e.value.message
                assert str(context) in e.value.message
            r = client.responses.create(input=text, previous_response_id=previous, truncation="auto", **kw)
            sent = _turns(tok, messages, context - out)
            dropped |= sent != messages
            c = _chat(client, sent, max_tokens=out, temperature=0, extra_body={"ignore_eos": True})
            assert r.output_text == c.choices[0].message.content and r.truncation == "auto"
            assert r.usage.input_tokens == c.usage.prompt_tokens <= context - out
            messages.append({"role": "assistant", "content": r.output_text})
            previous = r.id
        assert dropped
        # the stored conversation stays whole (all but the instructions and the last output): each later request
        # truncates it anew
        assert len(client.responses.input_items.list(previous, limit=100).data) == len(messages) - 2
        long = "colour " * 60
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(input=long, previous_response_id=previous, truncation="auto", **kw)
        n = len(tok.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": long}]))
        assert e.value.body["param"] == "input" and f"takes {n} tokens" in e.value.message
