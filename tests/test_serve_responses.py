"""`POST /v1/responses` (OpenAI's Responses API, stateless) through the official `openai` client: its text,
status and usage are the chat path's for the same messages and sampling; its stream is OpenAI's typed events;
what it does not do is a 400 naming the parameter."""

from __future__ import annotations

import json
import re
import time
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

Engine = _engine.Engine
CONTEXT = 256
NAME = "tiny"
SYSTEM = "Answer in one word."
TURNS = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "And another?"}]
EVENTS = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
DONE = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def model_tok(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    path: Path = hf_mixtral(tmp_path_factory.mktemp("responses"), vocab_size=32000, hidden_size=32,
                            intermediate_size=48, max_position_embeddings=CONTEXT)
    hf_tokenizer_json(path)
    return load_model(path, dtype="float32"), load_tokenizer(path)


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
    assert r.instructions == SYSTEM and r.max_output_tokens == 12 and r.store is False and r.tools == []
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


def test_nothing_is_stored_and_the_endpoint_is_counted(server: str, client: Any) -> None:
    def count() -> float:
        m = re.search(r'^mixlab_requests_total\{endpoint="/v1/responses",status="200"\} (\S+)$',
                      httpx.get(server + "/metrics").text, re.M)
        return float(m.group(1)) if m else 0.0

    before = count()
    r = client.responses.create(model=NAME, input="Hi", max_output_tokens=2, store=True)
    assert r.store is False and count() == before + 1
    got = httpx.get(f"{server}/v1/responses/{r.id}")
    assert got.status_code == 404 and "stores no responses" in got.json()["error"]["message"]


def test_the_json_sent_is_openai_s_schema(server: str) -> None:
    """Validated by the openai package's own models (the client itself builds them without validating)."""
    types = pytest.importorskip("openai.types.responses")
    body = {"model": NAME, "input": "hi", "instructions": "x", "max_output_tokens": 4, "metadata": {"a": "b"}}
    r = httpx.post(server + "/v1/responses", json=body, timeout=30).json()
    assert types.Response.model_validate(r).output_text == r["output"][0]["content"][0]["text"]
    event = pydantic.TypeAdapter(types.ResponseStreamEvent)
    with httpx.stream("POST", server + "/v1/responses", json={**body, "stream": True}, timeout=30) as s:
        events = [event.validate_python(json.loads(x[6:])) for x in s.iter_lines() if x.startswith("data: ")]
    assert events[-1].type == "response.incomplete" and events[-1].response.usage.output_tokens == 4




@pytest.mark.parametrize("body,param", [
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
    ({"input": "hi", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": "hi", "include": ["message.output_text.logprobs"]}, "include"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": "hi", "truncation": "auto"}, "truncation"),
    ({"input": "hi", "top_logprobs": 3}, "top_logprobs"),
    ({"input": "hi", "n": 2}, "n"),
    ({"input": "hi", "max_tokens": 5}, "max_tokens"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input[0].type"),
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
        while "output_text.delta" not in next(lines):  # the reply has begun
            pass
    # the engine request is cancelled and its cache freed; streamed or not (a client's timeout is a disconnect)
    assert until(lambda: metric(server, "mixlab_running_requests") == 0)
    assert metric(server, "mixlab_requests_cancelled_total") == before + 1
    assert metric(server, "mixlab_kv_cache_used_bytes") == 0
    model, tok = model_tok
    with Engine(model, tok, max_batch=2) as engine, \
            ServerThread(create_app(engine, tok, ServerConfig(model_name=NAME, context_len=CONTEXT))) as url:
        forward = engine.runner.forward
        engine.runner.forward = lambda items: (time.sleep(0.005), forward(items))[1]  # ~200 steps: over 0.3 s
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/v1/responses", json=body, timeout=0.3)
        assert until(lambda: metric(url, "mixlab_requests_cancelled_total") == 1)
        assert until(lambda: metric(url, "mixlab_running_requests") == 0)


def test_an_engine_failure_mid_stream_is_an_error_event(model_tok: tuple[Any, Any]) -> None:
    model, tok = model_tok
    engine = Engine(model, tok, max_batch=2).start()
    with ServerThread(create_app(engine, tok, ServerConfig(model_name=NAME, context_len=CONTEXT))) as url:
        body = {"input": "Hi", "max_output_tokens": CONTEXT - 40, "ignore_eos": True, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", url + "/v1/responses", json=body, timeout=30) as resp:
            lines = (x for x in resp.iter_lines() if x)
            while "output_text.delta" not in next(lines):
                pass
            engine.shutdown()  # the engine fails its running requests
            rest = list(lines)
    assert rest[-2] == "event: error", rest[-4:]
    err = json.loads(rest[-1].removeprefix("data: "))
    assert err["type"] == "error" and err["code"] == "engine_error" and "shut down" in err["message"]
    assert isinstance(err["sequence_number"], int)
