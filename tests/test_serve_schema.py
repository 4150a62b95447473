"""`mixlab serve`'s answers field for field against the `openai` package's own types, validated strictly: every
body, streamed chunk and event of every endpoint a client parses (chat completions, completions, the Responses
API with its events, models, errors) has the fields and types the type declares, and none it lacks but the
documented extensions (docs/serving.md, "OpenAI's schemas"): vLLM's, and mixlab's `experts` where asked for."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
_engine = pytest.importorskip("mixlab.engine")
openai_types = pytest.importorskip("openai.types")
responses_types = pytest.importorskip("openai.types.responses")
httpx = pytest.importorskip("httpx")

from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402
from openai.types.shared import ErrorObject  # noqa: E402

from conftest import completion_nulls, hf_mixtral, hf_tokenizer_json, openai_typed, until  # noqa: E402
from mixlab import load_model, load_tokenizer  # noqa: E402
from mixlab.serve import ServerConfig, ServerThread, create_app  # noqa: E402

CONTEXT = 256
NAME = "tiny"
U = [{"role": "user", "content": "Name a colour."}]
# the extensions a client may meet (docs/serving.md), by where they sit
STOP_REASON = {"$.choices[].stop_reason"}  # vLLM's, on every choice
EXPERTS = {"$.choices[].experts"}  # return_experts
CHAT_IDS = {"$.choices[].token_ids", "$.prompt_token_ids"}  # vLLM's return_token_ids
COMPLETION_IDS = {"$.choices[].token_ids", "$.choices[].prompt_token_ids"}
MODEL_CARD = {"$.root", "$.parent", "$.max_model_len", "$.mixlab"}  # vLLM's, then mixlab's model facts
STORE = {"$.store"}  # OpenAI's responses carry it; the package's Response has no field for it
OUTPUT_EXTRAS = {"$.output[].experts", "$.output[].token_ids"}  # return_experts, return_token_ids


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server whose engine takes at least 5 ms a step, so that a background response can be seen in progress
    and cancelled."""
    path = hf_mixtral(tmp_path_factory.mktemp("schema"), vocab_size=32000, hidden_size=32, intermediate_size=48,
                      max_position_embeddings=CONTEXT)
    hf_tokenizer_json(path)
    model, tok = load_model(path, dtype="float32"), load_tokenizer(path)
    info = {"layers": model.config.n_layers, "experts": model.config.moe.num_experts}
    with _engine.Engine(model, tok, max_batch=4) as engine:
        forward = engine.runner.forward
        engine.runner.forward = lambda items: (time.sleep(0.005), forward(items))[1]
        config = ServerConfig(model_name=NAME, context_len=CONTEXT, model_info=info, model_root=str(path))
        with ServerThread(create_app(engine, tok, config)) as url:
            yield url


def _post(url: str, body: dict[str, Any]) -> Any:
    r = httpx.post(url, json={"model": NAME, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(url: str, body: dict[str, Any], method: str = "POST") -> list[dict[str, Any]]:
    """The data of each server-sent event, [DONE] left out."""
    with httpx.stream(method, url, json={"model": NAME, **body} if method == "POST" else None, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ") and x != "data: [DONE]"]


@pytest.mark.parametrize("asked,extensions", [
    ({}, set()), ({"logprobs": True, "top_logprobs": 2, "n": 2, "stop": ["."], "seed": 3, "temperature": 1.0}, set()),
    ({"return_experts": True, "return_token_ids": True}, EXPERTS | CHAT_IDS),
    # vLLM's sampling extras: prompt_logprobs (0: the prompt's own tokens; streamed, nothing) the one field they add
    ({"prompt_logprobs": 0, "logprobs": True, "return_tokens_as_token_ids": True, "include_stop_str_in_output": True,
      "stop": ["."], "seed": 3, "skip_special_tokens": False, "truncate_prompt_tokens": 6, "bad_words": ["blue"],
      "allowed_token_ids": list(range(100, 30000))}, {"$.prompt_logprobs"})])
def test_chat_completions_and_chunks_are_openai_s_types(server: str, asked: dict[str, Any],
                                                        extensions: set[str]) -> None:
    body = {"messages": U, "max_tokens": 6, "ignore_eos": True, **asked}
    whole = openai_typed(ChatCompletion, _post(server + "/v1/chat/completions", body), STOP_REASON | extensions)
    assert len(whole.choices) == asked.get("n", 1)
    usage = {"include_usage": True, "continuous_usage_stats": True}
    chunks = _stream(server + "/v1/chat/completions", {**body, "stream": True, "stream_options": usage})
    for c in chunks:
        openai_typed(ChatCompletionChunk, c, STOP_REASON | extensions)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == whole.usage.completion_tokens


@pytest.mark.parametrize("asked,extensions", [
    ({}, set()), ({"logprobs": 2, "echo": True, "n": 2}, set()),
    ({"return_experts": True, "return_token_ids": True}, EXPERTS | COMPLETION_IDS),
    ({"prompt_logprobs": 0, "logprobs": 2, "echo": True, "return_tokens_as_token_ids": True,
      "include_stop_str_in_output": True, "stop": ["."], "seed": 3, "skip_special_tokens": False,
      "truncate_prompt_tokens": 2, "bad_words": ["blue"], "allowed_token_ids": list(range(100, 30000))},
     {"$.choices[].prompt_logprobs"})])
def test_completions_and_chunks_are_openai_s_types(server: str, asked: dict[str, Any], extensions: set[str]) -> None:
    body = {"prompt": "The sky is", "max_tokens": 6, "ignore_eos": True, **asked}
    openai_typed(openai_types.Completion, completion_nulls(_post(server + "/v1/completions", body)),
                 STOP_REASON | extensions)
    chunks = _stream(server + "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    for c in chunks[:-1]:
        openai_typed(openai_types.Completion, completion_nulls(c), STOP_REASON | extensions)
    assert chunks[-1]["choices"] == [] and openai_typed(openai_types.CompletionUsage, chunks[-1]["usage"])


def test_models_and_errors_are_openai_s_types(server: str) -> None:
    listed = httpx.get(server + "/v1/models").json()
    assert set(listed) == {"object", "data"} and listed["object"] == "list"
    for card in [*listed["data"], httpx.get(f"{server}/v1/models/{NAME}").json()]:
        assert openai_typed(openai_types.Model, card, MODEL_CARD).id == NAME
    for r in (httpx.post(server + "/v1/chat/completions", json={"model": NAME, "messages": U, "max_tokens": -1}),
              httpx.post(server + "/v1/responses", json={"model": "nope", "input": "hi"}),
              httpx.get(server + "/v1/responses/resp_nope")):
        assert r.status_code in (400, 404) and set(r.json()) == {"error"}
        openai_typed(ErrorObject, r.json()["error"])


def _under(prefix: str, paths: set[str]) -> set[str]:
    return {prefix + p[1:] for p in paths}


def _check_events(events: list[dict[str, Any]], extensions: set[str]) -> None:
    """Each event OpenAI's: its response's extensions under `$.response`, its output message's under `$.item`."""
    allowed = _under("$.response", extensions) | {"$.item" + p.removeprefix("$.output[]")
                                                  for p in extensions if p.startswith("$.output[]")}
    assert events and [e["sequence_number"] for e in events] == list(range(len(events)))
    for e in events:
        openai_typed(responses_types.ResponseStreamEvent, e, allowed)


LOGPROBS = {"include": ["message.output_text.logprobs"], "top_logprobs": 2}


@pytest.mark.parametrize("asked,extensions", [({}, set()), (LOGPROBS, set()),
                                              ({"return_experts": True, "return_token_ids": True}, OUTPUT_EXTRAS)])
def test_responses_and_their_events_are_openai_s_types(server: str, asked: dict[str, Any],
                                                       extensions: set[str]) -> None:
    """A response, its stream (whose text events' logprobs have no `bytes`: the schema of those has none), the
    stored object and its input items."""
    body = {"input": "Name a colour.", "instructions": "Be brief.", "max_output_tokens": 6, "ignore_eos": True,
            "metadata": {"k": "v"}, **asked}
    made = openai_typed(responses_types.Response, _post(server + "/v1/responses", body), STORE | extensions)
    events = _stream(server + "/v1/responses", {**body, "stream": True})
    _check_events(events, STORE | extensions)
    assert events[-1]["type"] == "response.incomplete"
    if asked is LOGPROBS:  # the output part's entries keep theirs
        assert made.output[0].content[0].logprobs[0].bytes and events[-3]["part"]["logprobs"][0]["bytes"]
    stored = httpx.get(f"{server}/v1/responses/{made.id}").json()
    assert openai_typed(responses_types.Response, stored, STORE | extensions) == made
    items = httpx.get(f"{server}/v1/responses/{made.id}/input_items").json()
    assert len(openai_typed(responses_types.ResponseItemList, items).data) == 1


def test_background_responses_in_progress_and_cancelled_are_openai_s_types(server: str) -> None:
    """Queued, in progress (GET), cancelled (the cancel's answer, GET) and its stream replayed, ending with the
    cancelled response."""
    body = {"input": "Hi", "max_output_tokens": CONTEXT - 40, "ignore_eos": True, "background": True,
            "include": ["message.output_text.logprobs"], "top_logprobs": 1}
    made = openai_typed(responses_types.Response, _post(server + "/v1/responses", body), STORE)
    assert made.status in ("queued", "in_progress")
    url = f"{server}/v1/responses/{made.id}"
    seen: list[dict[str, Any]] = []

    def begun() -> bool:  # in progress, with its first tokens
        seen.append(httpx.get(url).json())
        return bool(seen[-1]["output"] and seen[-1]["output"][0]["content"][0]["logprobs"])

    assert until(begun)
    now = openai_typed(responses_types.Response, seen[-1], STORE)
    assert now.status == "in_progress" and now.usage is None
    gone = openai_typed(responses_types.Response, httpx.post(url + "/cancel").json(), STORE)
    assert gone.status == "cancelled" and openai_typed(responses_types.Response, httpx.get(url).json(), STORE) == gone
    events = _stream(url + "?stream=true", {}, method="GET")
    _check_events(events, STORE)
    assert events[-1]["type"] == "response.incomplete" and events[-1]["response"]["status"] == "cancelled"
