"""Property-based fuzzing of `mixlab serve` (hypothesis, derandomized): valid requests to every POST endpoint
with one field mutated (a wrong type, an out-of-range, huge, NaN or unicode value, a nested one, the field
left out), requests with several parameters in range at once, bodies that are not a JSON object, odd
headers, and random response ids and query parameters.
Whatever comes, the answer is never a 500, a hang or a traceback: a 4xx is OpenAI's error body naming the
mutated field, a 200 is what the `openai` package's models read. Then `SamplingParams` and `Engine.submit`,
in the same spirit, for Python users: a ValueError that names the parameter, or a request that runs to its end.
More examples, not derandomized, search further: edit SETTINGS (max_examples=1500, derandomize=False)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

pytest.importorskip("fastapi")
hypothesis = pytest.importorskip("hypothesis")
_engine = pytest.importorskip("mixlab.engine")
openai_types = pytest.importorskip("openai.types")
httpx = pytest.importorskip("httpx")
pydantic = pytest.importorskip("pydantic")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import completion_nulls, hf_mixtral, hf_tokenizer_json  # noqa: E402
from mixlab import load_model, load_tokenizer  # noqa: E402
from mixlab.serve import ServerConfig, ServerThread, create_app  # noqa: E402
from mixlab.serve.protocol import (  # noqa: E402
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ResponsesRequest,
    TokenizeRequest,
)

Engine, SamplingParams = _engine.Engine, _engine.SamplingParams
CONTEXT = 64  # small: a mutated max_tokens that is accepted generates little
NAME = "tiny"
CHAT, COMP, RESP = "/v1/chat/completions", "/v1/completions", "/v1/responses"
U = [{"role": "user", "content": "hi"}]
# a valid request per endpoint, and the model that reads it (its fields are the ones mutated)
VALID: dict[str, tuple[dict[str, Any], type[pydantic.BaseModel]]] = {
    CHAT: ({"model": NAME, "messages": U, "max_tokens": 2, "temperature": 0.0}, ChatCompletionRequest),
    COMP: ({"model": NAME, "prompt": "hi", "max_tokens": 2, "temperature": 0.0}, CompletionRequest),
    RESP: ({"model": NAME, "input": "hi", "max_output_tokens": 2, "temperature": 0.0}, ResponsesRequest),
    "/tokenize": ({"model": NAME, "prompt": "hi"}, TokenizeRequest),
    "/detokenize": ({"model": NAME, "tokens": [1, 15043]}, DetokenizeRequest),
}
# where a value inside a field is mutated (path below the body; ints index lists)
NESTED: dict[str, list[tuple[Any, ...]]] = {
    CHAT: [("messages", 0, "role"), ("messages", 0, "content"), ("messages", 0, "name"), ("messages", 0, "prefix"),
           ("messages", 0), ("stream_options",), ("response_format", "type"), ("response_format", "json_schema"),
           ("messages", 1), ("messages", 1, "content"), ("logit_bias", "15043"), ("structured_outputs", "regex"),
           ("structured_outputs", "json"), ("stop", 0), ("stop_token_ids", 0), ("guided_choice", 0), ("tools", 0)],
    COMP: [("prompt", 0), ("prompt", 1), ("logit_bias", "15043"), ("stream_options", "include_usage"),
           ("guided_json", "type"), ("guided_json", "properties"), ("response_format", "type"), ("stop", 1)],
    RESP: [("input", 0), ("input", 0, "role"), ("input", 0, "content"), ("input", 0, "content", 0),
           ("input", 0, "content", 0, "text"), ("input", 0, "type"), ("text", "format"), ("text", "format", "type"),
           ("text", "format", "schema"), ("metadata", "k"), ("reasoning", "effort"), ("tools", 0), ("tools", 0, "name"),
           ("tools", 0, "parameters"), ("tools", 0, "strict"), ("tool_choice", "name"), ("input", 1)],
    "/tokenize": [("messages", 0, "content"), ("messages", 0, "role")],
    "/detokenize": [("tokens", 0)],
}
# what a nested path is filled in with before its leaf is mutated
SEEDS: dict[str, Any] = {"messages": U, "input": [{"type": "message", "role": "user", "content": [
    {"type": "input_text", "text": "hi"}]}], "prompt": ["hi"], "tokens": [1], "stream_options": {},
    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string"}}},
    "stop": ["\n"], "stop_token_ids": [2], "guided_choice": ["yes", "no"], "guided_json": {"type": "object"},
    "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "string"}}},
    "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
    "tool_choice": {"type": "function", "name": "f"}}
UNKNOWN = ["foo", "", "__proto__", "constructor", "model_config", "\u00e9", "x" * 300]


class _Deep:
    """Lists in objects nested `depth` deep (`value()`), written as JSON by `_dumps` (Python's json.dumps goes
    past its recursion limit first) and shown short (hypothesis's printer recursed into them)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def json(self) -> str:
        return '[{"a":' * (self.depth // 2) + "0" + "}]" * (self.depth // 2)

    def value(self) -> Any:
        v: Any = 0
        for _ in range(self.depth // 2):
            v = [{"a": v}]
        return v

    def __repr__(self) -> str:
        return f"<{self.depth} deep>"


def _dumps(body: Any) -> str:
    """`body` as JSON, a `_Deep` value as its nesting, NaN and Infinity as Python writes them (JavaScript's
    JSON.stringify gives null)."""
    deep: list[_Deep] = []
    text = json.dumps(body, allow_nan=True, default=lambda d: f"@deep{deep.append(d) or len(deep) - 1}@")
    for k, d in enumerate(deep):
        text = text.replace(f'"@deep{k}@"', d.json(), 1)
    return text


ODD_STRINGS = ["", " ", "\x00", "\ud800", "a\udfff", "\u2581", "<s>", "</s>", "[INST]", "\U0001f642" * 3,
               "\u202e", "-1", "1e309", "NaN", "true", "null", "resp_", "x" * 5000]
ODD_NUMBERS = [0, -1, 1, 2, 16, 17, 21, 100, 101, 32000, 2**31, 2**63, -(2**63) - 1, 10**100, -(10**400), 0.5, -0.0,
               1e-320, 1e308, math.inf, -math.inf, math.nan]
leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(ODD_NUMBERS),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(ODD_STRINGS))
VALUES = st.one_of(
    leaves, leaves, leaves,
    st.lists(leaves, max_size=4),
    st.dictionaries(st.sampled_from(["type", "text", "role", "content", "", "0", "x"]), leaves, max_size=3),
    st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                      max_size=3), max_leaves=8),
    st.integers(1, 3000).map(_Deep),
    st.sampled_from([[7] * 100_000, ["x"] * 20_000, {str(i): 1 for i in range(5000)}]),  # big
)


def _fields(kind: type[pydantic.BaseModel]) -> list[str]:
    """The body's fields, and the ones it refuses (`NOT_IMPLEMENTED`...) where it has them."""
    return sorted({*kind.model_fields, *getattr(kind, "REFUSED", {})})


def _set(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    """`value` at `path` in `body`, the containers on the way made from SEEDS (or empty) if absent."""
    node: Any = body
    for k, key in enumerate(path[:-1]):
        nxt = path[k + 1]
        if isinstance(node, dict) and not isinstance(node.get(key), (dict, list)):
            seed = SEEDS.get(key) if k == 0 else None
            node[key] = json.loads(json.dumps(seed)) if seed is not None else ([] if isinstance(nxt, int) else {})
        elif isinstance(node, list) and key >= len(node):
            node.append([] if isinstance(nxt, int) else {})
            key = len(node) - 1
        node = node[key]
    last = path[-1]
    if isinstance(node, list):
        if last >= len(node):
            node.append(value)
        else:
            node[last] = value
    else:
        node[last] = value


@st.composite
def mutated(draw: st.DrawFn, endpoint: str) -> tuple[dict[str, Any], str | None]:
    """A valid body with one field mutated, and the name of that field (None: no one field to blame)."""
    base, kind = VALID[endpoint]
    body = json.loads(json.dumps(base))
    how = draw(st.sampled_from(["set", "set", "set", "nested", "nested", "drop", "unknown"]))
    if how == "set":
        name = draw(st.sampled_from(_fields(kind)))
        body[name] = draw(VALUES)
        return body, name
    if how == "nested":
        path = draw(st.sampled_from(NESTED[endpoint]))
        _set(body, path, draw(VALUES))
        if endpoint == "/tokenize" and path[0] == "messages":
            body.pop("prompt")
        return body, path[0]
    if how == "drop":
        name = draw(st.sampled_from(sorted(base)))
        body.pop(name)
        return body, name
    body[draw(st.sampled_from(UNKNOWN))] = draw(VALUES)  # ignored, as OpenAI-compatible servers do
    return body, None


# -- the server ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_tok(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    path: Path = hf_mixtral(tmp_path_factory.mktemp("fuzz"), vocab_size=32000, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=1, max_position_embeddings=CONTEXT)
    hf_tokenizer_json(path)
    model, tok = load_model(path, dtype="float32"), load_tokenizer(path)
    with Engine(model, tok, max_batch=8) as engine:
        yield engine, tok


@pytest.fixture(scope="module")
def server(engine_tok: tuple[Any, Any]) -> Iterator[str]:
    engine, tok = engine_tok
    cfg = ServerConfig(model_name=NAME, context_len=CONTEXT, model_info={"vocab_size": 32000})
    with ServerThread(create_app(engine, tok, cfg)) as url:
        yield url


@pytest.fixture(scope="module")
def http(server: str) -> Iterator[Any]:
    with httpx.Client(base_url=server, timeout=30) as c:  # a hang fails here, in 30 s
        yield c


def _events(text: str) -> list[dict[str, Any]]:
    """The data of each server-sent event, [DONE] left out."""
    datas = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    return [json.loads(d) for d in datas if d != "[DONE]"]


def _check_ok(path: str, r: Any) -> None:
    """A 200 is what the `openai` package reads (streamed: each chunk or event), and never an in-band error."""
    if path in ("/tokenize", "/detokenize"):
        data = r.json()
        assert set(data) >= ({"tokens", "count"} if path == "/tokenize" else {"prompt"}), data
        return
    streamed = r.headers["content-type"].startswith("text/event-stream")
    if path == RESP:
        from openai.types.responses import Response, ResponseStreamEvent

        if not streamed:
            Response.model_validate(r.json())
            return
        events = _events(r.text)
        for e in events:
            pydantic.TypeAdapter(ResponseStreamEvent).validate_python(e)
        assert events and events[-1]["type"] in ("response.completed", "response.incomplete"), events[-1:]
        return
    chat = path == CHAT
    if not streamed:
        if chat:
            openai_types.chat.ChatCompletion.model_validate(r.json())
        else:
            _completion(r.json())
        return
    chunks = _events(r.text)
    assert chunks and r.text.endswith("data: [DONE]\n\n"), r.text[-200:]
    for c in chunks:
        assert "error" not in c, c
        if chat:
            openai_types.chat.ChatCompletionChunk.model_validate(c)
        else:
            _completion(c)


def _completion(obj: dict[str, Any]) -> None:
    """`obj` read as the openai package's Completion (its client builds the object unvalidated)."""
    openai_types.Completion.model_validate(completion_nulls(obj))


def _check(path: str, r: Any, field: str | None) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code == 200:
        _check_ok(path, r)
        return
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert "Traceback" not in err["message"] and len(err["message"]) < 1000, err
    if field is not None and not err["message"].startswith("There was an error parsing the body"):  # too deep
        param = err["param"] or ""
        assert param.split(".")[0].split("[")[0] == field, (field, err)


SETTINGS = settings(max_examples=120, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _post(http: Any, path: str, body: Any) -> Any:
    return http.post(path, content=_dumps(body), headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("path", list(VALID))
def test_a_request_with_one_field_mutated_is_answered_or_refused_naming_it(http: Any, path: str) -> None:
    @SETTINGS
    @given(mutated(path))
    def run(case: tuple[dict[str, Any], str | None]) -> None:
        body, field = case
        _check(path, _post(http, path, body), field)

    run()


def _sampling_fields() -> dict[str, Any]:
    """Each sampling parameter with values in its range (or at its edges), as strategies."""
    ids = st.integers(0, 31999)
    unit = st.floats(0, 1)
    return {
        "n": st.integers(1, 3), "temperature": st.sampled_from([0.0, 0.7, 2.0]) | st.floats(0, 2),
        "top_p": st.sampled_from([1e-9, 0.5, 1.0]), "top_k": st.integers(-1, 40), "min_p": unit,
        "repetition_penalty": st.sampled_from([1e-3, 0.5, 1.3, 10.0]), "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2), "seed": st.integers(-(2**63), 2**63 - 1),
        "stop": st.text(min_size=1, max_size=3) | st.lists(st.sampled_from(["\n", ".", " the", "é", "\U0001f642"]),
                                                          min_size=1, max_size=3),
        "stop_token_ids": st.lists(ids, max_size=3), "ignore_eos": st.booleans(), "min_tokens": st.integers(0, 3),
        "logit_bias": st.dictionaries(ids.map(str), st.floats(-100, 100), max_size=3),
        "stream": st.booleans(), "return_experts": st.booleans(), "return_token_ids": st.booleans(),
        "guided_choice": st.just(["yes", "no"]), "guided_regex": st.just("[a-c]{1,3}"),
        "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}]),
    }


@st.composite
def combined(draw: st.DrawFn, endpoint: str) -> dict[str, Any]:
    """A request with several parameters at once, each in its range: the engine paths they meet together."""
    fields = _sampling_fields()
    if endpoint == CHAT:
        fields |= {"logprobs": st.booleans(), "top_logprobs": st.integers(0, 20), "max_tokens": st.integers(1, 4),
                   "messages": st.sampled_from([U, [*U, {"role": "assistant", "content": "Hel", "prefix": True}]]),
                   "continue_final_message": st.booleans()}
        body: dict[str, Any] = {"messages": U, "max_tokens": 3}
    elif endpoint == COMP:
        fields |= {"logprobs": st.integers(0, 20), "echo": st.booleans(), "max_tokens": st.integers(0, 4),
                   "add_special_tokens": st.booleans(),
                   "prompt": st.sampled_from(["", "hi", ["a", "b"], [1, 15043], [[1], [15043, 29871]]])}
        body = {"prompt": "hi", "max_tokens": 3}
    else:
        fields = {k: v for k, v in fields.items() if k != "n"} | {
            "max_output_tokens": st.integers(1, 4), "instructions": st.text(max_size=5), "store": st.booleans(),
            "background": st.booleans(), "input": st.sampled_from(["hi", [{"role": "user", "content": "hi"}]])}
        body = {"input": "hi", "max_output_tokens": 3}
    names = draw(st.lists(st.sampled_from(sorted(fields)), min_size=2, max_size=8, unique=True))
    body |= {name: draw(fields[name]) for name in names}
    if body.get("stream"):
        body["stream_options"] = {"include_usage": draw(st.booleans()), "continuous_usage_stats": draw(st.booleans())}
    return body


@pytest.mark.parametrize("path", [CHAT, COMP, RESP])
def test_a_request_with_parameters_combined_is_answered_or_refused_naming_one(http: Any, path: str) -> None:
    @SETTINGS
    @given(combined(path))
    def run(body: dict[str, Any]) -> None:
        r = _post(http, path, body)
        _check(path, r, None)
        if r.status_code != 200:
            param = r.json()["error"]["param"] or ""
            assert param.split(".")[0].split("[")[0] in body, (body, r.text[:500])

    run()


RAW = [b"", b"null", b"[]", b"[{}]", b"1", b'"x"', b"{", b"{}}", b'{"a": 1,}', b"\xff\xfe{}", b'{"x": "\xc3"}', b"\x00",
       b"\xef\xbb\xbf{}", b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000,
       b'{"max_tokens": 1' + b"0" * 5000 + b"}", b'{"n": 1e999}']


@pytest.mark.parametrize("path", list(VALID))
def test_a_body_that_is_not_a_json_object_or_has_odd_headers_is_a_400(http: Any, path: str) -> None:
    base = VALID[path][0]
    # duplicate keys: the last one counts, as Python's json and JavaScript's JSON.parse read them
    dup = json.dumps(base)[:-1] + ', "model": 5, "model": "' + NAME + '"}'
    utf16 = json.dumps(base).encode("utf-16")  # Python's json reads UTF-16 and UTF-32 too (RFC 8259 8.1: UTF-8)
    for raw in [*RAW, dup.encode(), utf16]:
        r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
        _check(path, r, None)
        assert r.status_code == (200 if raw in (dup.encode(), utf16) else 400), (raw[:40], r.text[:300])

    odd = {"Content-Type": ["", "text/plain", "application/json; charset=latin-1", "application/json;;;",
                            "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/",
                            "APPLICATION/JSON", "application/vnd.api+json", "application/json-patch+json", "*/*",
                            "\u00e9/json"],
           "Content-Encoding": ["gzip", "br", "identity", "x"], "Accept-Encoding": ["gzip", "*;q=0", "\u00e9"],
           "Host": ["", "[::1]", "[::1", "127.0.0.1:99999", "localhost.", "evil.example", "\u00e9"],
           "X-Request-Id": ["", "\u00e9", "x" * 1000], "Authorization": ["Bearer", "Bearer \u00e9", "x"]}

    @SETTINGS
    @given(st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in odd.items()}),
           st.sampled_from([json.dumps(base).encode(), json.dumps(base).encode("utf-16"), b"a=1&b=2", b"\x1f\x8b"]))
    def run(headers: dict[str, str], raw: bytes) -> None:
        r = http.post(path, content=raw, headers={k: v.encode() for k, v in headers.items()})
        _check(path, r, None)

    run()


def test_responses_ids_and_query_parameters_are_answered_or_refused(http: Any) -> None:
    """GET / DELETE /v1/responses/{id}, its input_items and cancel, for ids that exist (in progress, finished,
    in the background) and ids that do not, with random query parameters."""
    made = [http.post(RESP, json={"input": "hi", "max_output_tokens": 2, **extra}).json()["id"]
            for extra in ({}, {"background": True}, {"store": False})]
    ids = st.one_of(st.sampled_from(made), st.text(max_size=20), st.sampled_from(ODD_STRINGS))
    params = st.dictionaries(st.sampled_from(["stream", "starting_after", "limit", "order", "after", "include",
                                              "include_obfuscation", "x"]),
                             st.one_of(st.text(max_size=8), st.sampled_from(["true", "false", "1", "0", "-1", "-2",
                                                                             "100", "101", "asc", "desc", "1e3",
                                                                             "99999999999999999999"])), max_size=3)

    @SETTINGS
    @given(ids, st.sampled_from(["GET", "DELETE", "POST cancel", "GET items", "HEAD"]), params)
    def run(rid: str, how: str, query: dict[str, str]) -> None:
        method, _, tail = how.partition(" ")
        url = f"{RESP}/{quote(rid.encode(errors='surrogatepass'), safe='')}" + {
            "": "", "cancel": "/cancel", "items": "/input_items"}[tail]
        r = http.request(method, url, params=query)
        assert r.status_code < 500, (r.status_code, r.text[:500])
        if r.status_code >= 400 and method != "HEAD":
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], err

    run()


# -- the engine, for Python users --------------------------------------------------------------------------

SAMPLING = {"max_tokens": 2, "temperature": 0.0}
FIELDS = sorted(set(SamplingParams.__dataclass_fields__) - {"structured"})


def _refused_naming(name: str, e: ValueError) -> None:
    message = str(e)
    assert name in message and len(message) < 500 and "\n" not in message, (name, message[:1000])


@settings(max_examples=300, derandomize=True, deadline=None, database=None)
@given(st.sampled_from(FIELDS), VALUES)
def test_sampling_params_refuse_a_bad_value_naming_it(name: str, value: Any) -> None:
    value = value.value() if isinstance(value, _Deep) else value
    try:
        SamplingParams(**{**SAMPLING, name: value})
    except ValueError as e:
        _refused_naming(name, e)


def test_engine_submit_refuses_a_field_set_after_naming_it_or_runs_it(engine_tok: tuple[Any, Any]) -> None:
    """A field set on SamplingParams after it was made (a dataclass: nothing stops it) is checked by submit, or
    the request runs to its end: never an error in the engine's loop, which every running request would share."""
    engine, _ = engine_tok

    @SETTINGS
    @given(st.sampled_from(FIELDS), VALUES)
    def run(name: str, value: Any) -> None:
        params = SamplingParams(**SAMPLING)
        setattr(params, name, value.value() if isinstance(value, _Deep) else value)
        try:
            handle = engine.submit([1, 15043], params)
        except ValueError as e:
            _refused_naming(name, e)
            return
        outs = list(handle)
        assert outs[-1].finish_reason in ("stop", "length"), (name, value, outs[-1])
        assert len(outs) <= params.max_tokens, (name, value, len(outs))

    run()


def test_engine_submit_refuses_a_bad_prompt_or_request_id_or_runs_it(engine_tok: tuple[Any, Any]) -> None:
    engine, _ = engine_tok

    @SETTINGS
    @given(VALUES | st.lists(st.integers(-2, 32001), max_size=4), st.none() | VALUES)
    def run(prompt: Any, request_id: Any) -> None:
        prompt = prompt.value() if isinstance(prompt, _Deep) else prompt
        try:
            handle = engine.submit(prompt, SamplingParams(**SAMPLING), request_id=request_id)
        except ValueError as e:
            assert "prompt" in str(e) or "request_id" in str(e), e
            return
        assert list(handle)[-1].finish_reason in ("stop", "length"), (prompt, request_id)

    run()
