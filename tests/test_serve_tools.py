"""Tool calling in /v1/chat/completions for a v2/v3 model, driven with the official `openai` client. A random
model never writes [TOOL_CALLS] by itself, so the server runs over a scripted engine (`_Scripted`) that writes
a given reply token by token as the engine does (its stream decoder's deltas, EOS, finish "stop") and keeps
the prompts it was sent; prompts are checked against mistral-common's encoding. Forced calls (tool_choice
"required" or a named function) run on a real random tiny model over the v3 tokenizer (`forced`), where the
constraint alone makes its reply a call."""

from __future__ import annotations

import json
import re
import string
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("mistral_common")

from mixlab import load_tokenizer  # noqa: E402
from mixlab.engine import RequestOutput, SamplingParams  # noqa: E402
from mixlab.serve import ServerConfig, ServerThread, create_app  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                         "required": ["city"]}}}]
ASK = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "Weather in Zürich?"}]


class _Handle:
    def __init__(self, tok: Any, prompt: list[int], reply: list[int]) -> None:
        self.tok, self.prompt, self.reply = tok, prompt, reply

    def cancel(self) -> None:
        pass

    async def aiter(self) -> AsyncIterator[RequestOutput]:
        dec = self.tok.stream()  # a chat reply is decoded alone (SamplingParams.decode_alone)
        for k, i in enumerate(self.reply):
            last = k == len(self.reply) - 1
            text = dec.push(i) + (dec.flush() if last else "")
            yield RequestOutput("r", i, text, 0.0, [], None, "stop" if last else None, len(self.prompt), k + 1, 0,
                                None)


class _Scripted:
    """An engine that answers every request with `reply` (token ids, ending with EOS); `prompts`: what it got."""

    def __init__(self, tok: Any) -> None:
        self.tok, self.reply, self.prompts = tok, [tok.eos_id], []  # type: list[int], list[list[int]]
        self.params: list[SamplingParams] = []

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> _Handle:
        self.prompts.append(list(prompt_ids))
        self.params.append(params)
        return _Handle(self.tok, list(prompt_ids), self.reply)

    def stats(self) -> dict[str, Any]:
        return {}

    def writes(self, calls: str) -> None:
        """The next replies: [TOOL_CALLS] then the text `calls`, then EOS."""
        self.reply = [self.tok.special_id("[TOOL_CALLS]"), *self.tok.encode(calls, bos=False), self.tok.eos_id]


def _v3() -> Path:
    return next(load_tokenizer().path.parent.glob("mistral_instruct_tokenizer_*.model.v3"))


def _mistral_common(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    request = ChatCompletionRequest(messages=messages, tools=tools)
    return MistralTokenizer.from_file(str(_v3())).encode_chat_completion(request).tokens


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, _Scripted]]:
    folder = tmp_path_factory.mktemp("v3")
    (folder / "tokenizer.model.v3").write_bytes(_v3().read_bytes())
    tok = load_tokenizer(folder)
    engine = _Scripted(tok)
    cfg = ServerConfig(model_name="tiny", context_len=4096, prepare_structured=False, responses_store=0)
    with ServerThread(create_app(engine, tok, cfg)) as url:  # type: ignore[arg-type]
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30), engine


def _streamed(client: Any, **kw: Any) -> tuple[str | None, list[dict[str, Any]], str | None]:
    """A streamed reply's content, its tool calls put together from their deltas, and its finish_reason."""
    content, calls, finish = None, {}, None  # type: str | None, dict[int, dict[str, Any]], str | None
    for chunk in client.chat.completions.create(**kw, stream=True):
        choice = chunk.choices[0]
        if choice.delta.content:
            content = (content or "") + choice.delta.content
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            call["id"] += d.id or ""
            call["function"]["name"] += d.function.name or ""
            call["function"]["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[k] for k in sorted(calls)], finish


def test_tool_calls_are_answered_as_openai_tool_calls(served: tuple[Any, _Scripted]) -> None:
    """tools are rendered as mistral-common renders them; a reply that begins with [TOOL_CALLS] is answered as
    `tool_calls` (the model's v3 id, or 9 random letters and digits), content null, finish "tool_calls",
    streamed as the same calls; the follow-up carrying the calls and their results is encoded as mistral-common
    encodes it."""
    client, engine = served
    kw: dict[str, Any] = dict(model="tiny", messages=ASK, tools=TOOLS, max_tokens=64)
    engine.writes('[{"name": "get_weather", "arguments": {"city": "Zürich"}, "id": "abcDEF123"}, '
                  '{"name": "get_weather", "arguments": {"city": "Bern"}}]')
    full = client.chat.completions.create(**kw)
    assert engine.prompts[-1] == _mistral_common(ASK, TOOLS)
    choice = full.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [c.model_dump() for c in choice.message.tool_calls]
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "get_weather", {"city": "Zürich"}), ("function", "get_weather", {"city": "Bern"})]
    assert calls[0]["id"] == "abcDEF123" and re.fullmatch(r"[a-zA-Z0-9]{9}", calls[1]["id"])

    content, streamed, finish = _streamed(client, **kw)
    assert content is None and finish == "tool_calls"
    # as OpenAI streams them: the calls' delta (no finish), then a last chunk with the finish alone
    last_two = [c.choices[0] for c in client.chat.completions.create(**kw, stream=True)][-2:]
    assert [(len(c.delta.tool_calls or []), c.finish_reason) for c in last_two] == [(2, None), (0, "tool_calls")]
    assert [{**c, "id": None} for c in streamed] == [{**c, "id": None} for c in calls]
    assert streamed[0]["id"] == "abcDEF123" and set(streamed[1]["id"]) <= set(string.ascii_letters + string.digits)

    follow = [*ASK, choice.message.model_dump(exclude_none=True),
              {"role": "tool", "content": '{"temp": 21}', "tool_call_id": calls[0]["id"]},
              {"role": "tool", "content": '{"temp": 19}', "tool_call_id": calls[1]["id"]}]
    engine.reply = [*engine.tok.encode("21 °C in Zürich.", bos=False), engine.tok.eos_id]
    answer = client.chat.completions.create(**{**kw, "messages": follow}).choices[0]
    assert engine.prompts[-1] == _mistral_common(follow, TOOLS)
    assert (answer.message.content, answer.message.tool_calls, answer.finish_reason) == ("21 °C in Zürich.", None,
                                                                                         "stop")
    assert _streamed(client, **{**kw, "messages": follow}) == ("21 °C in Zürich.", [], "stop")  # as usual


@pytest.mark.parametrize("written", ['[{"name": "get_weather", "arguments": {"city": "Zü', "not json",
                                     '{"name": "get_weather", "arguments": {}}', '[{"arguments": {}}]'])
def test_a_tool_call_that_does_not_parse_is_text(served: tuple[Any, _Scripted], written: str) -> None:
    """[TOOL_CALLS] followed by what is not a list of {"name", "arguments"} (cut off, not JSON, one object) is
    returned as the text it is, as vLLM's mistral parser returns it, streamed the same, finish "stop"."""
    client, engine = served
    engine.writes(written)
    kw: dict[str, Any] = dict(model="tiny", messages=ASK, tools=TOOLS)
    choice = client.chat.completions.create(**kw).choices[0]
    assert choice.message.content.strip() == written and choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert _streamed(client, **kw) == (choice.message.content, [], "stop")


def test_tool_choice_none_renders_no_tools_and_parses_no_calls(served: tuple[Any, _Scripted]) -> None:
    client, engine = served
    engine.writes('[{"name": "get_weather", "arguments": {}}]')
    choice = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none").choices[0]
    assert engine.prompts[-1] == _mistral_common(ASK, None)
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools[0].function.parameters"),
    ({"tool_choice": "required"}, "tool_choice"),  # no tools to call
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tools": TOOLS, "function_call": {"name": "get_weather"}}, "function_call"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "guided_regex": "a+"},
     "guided_regex"),
    ({"tools": [*TOOLS, {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools[1].function.parameters"),
    *[({"tools": [*TOOLS, {"type": "function", "function": {"name": "f", "parameters": bad}}]},
       "tools[1].function.parameters") for bad in ({"type": "nonsense"}, {"$ref": "#/$defs/missing"},
                                                   {"properties": {"a": {"type": "string", "pattern": "("}}},
                                                   {"type": "object", "required": "a"})],  # not schemas ("auto")
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": True}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),  # a keyword llguidance cannot force
    ({"tools": [{"type": "function", "function": {"name": f, "parameters": {"$ref": "#/$defs/a", "$defs": {"a": s}}}}
                for f, s in (("f", {"type": "object"}), ("g", {"type": "array"}))],
      "tool_choice": "required"}, "tools"),  # one $defs name, two meanings
    *[({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": bad, "type": "function",
                                                                  "function": {"name": "f", "arguments": "{}"}}]},
                                {"role": "tool", "content": "1", "tool_call_id": "abcDEF123"}]}, "messages")
      for bad in ("", 5)],  # an id must be a non-empty string (any other is hashed to a v3 one)
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "abcDEF123", "type": "function",
                                                                "function": {"name": "f", "arguments": "{}"}}]},
                   {"role": "tool", "content": "1", "tool_call_id": ""}]}, "messages"),
])
def test_bad_tools_are_400s_naming_the_field(served: tuple[Any, _Scripted], extra: dict[str, Any], param: str) -> None:
    client, _ = served
    extra = dict(extra)
    vllm = {k: extra.pop(k) for k in list(extra) if k.startswith("guided_")}  # not the openai client's own
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": "tiny", "messages": ASK, **extra}, extra_body=vllm)
    assert e.value.body["param"] == param, e.value.body


OTHER_IDS = ["call_abc123XYZdefGHI456jkl789", "call_Zz9"]  # OpenAI's, and an agent framework's
FOLLOW_UP = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
    {"id": i, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": c})}}
    for i, c in zip(OTHER_IDS, ["Zürich", "Bern"], strict=True)]},
             *[{"role": "tool", "content": t, "tool_call_id": i} for i, t in zip(OTHER_IDS, ["21", "19"], strict=True)]]


def _written(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with each tool call id as the v3 template writes it (`template_call_id`)."""
    from mixlab.tokenizer import template_call_id

    return [{**m, **({"tool_calls": [{**c, "id": template_call_id(c["id"])} for c in m["tool_calls"]]}
                     if m.get("tool_calls") else {}),
             **({"tool_call_id": template_call_id(m["tool_call_id"])} if "tool_call_id" in m else {})}
            for m in messages]


def test_a_follow_up_with_another_server_s_call_ids_is_encoded(served: tuple[Any, _Scripted]) -> None:
    """A conversation carried over from another server, whose call ids are not v3's 9 letters and digits, was a
    400: its prompt is now mistral-common's of the conversation with the ids the template writes (each call and
    its result one hashed id), on /v1/chat/completions and /tokenize alike; an id that a hashed one would equal
    is a 400 naming both."""
    client, engine = served
    engine.reply = [*engine.tok.encode("21 and 19 °C.", bos=False), engine.tok.eos_id]
    written = _written(FOLLOW_UP)
    assert [c["id"] for c in written[2]["tool_calls"]] == [m["tool_call_id"] for m in written[3:]]  # still paired
    answer = client.chat.completions.create(model="tiny", messages=FOLLOW_UP, tools=TOOLS)
    assert answer.choices[0].message.content == "21 and 19 °C."
    assert engine.prompts[-1] == _mistral_common(written, TOOLS)
    base = str(client.base_url).removesuffix("/v1/")
    tokens = httpx.post(base + "/tokenize", json={"model": "tiny", "messages": FOLLOW_UP}, timeout=30).json()["tokens"]
    assert tokens == _mistral_common(written, None)
    clash = [*FOLLOW_UP[:-1], {**FOLLOW_UP[-1], "tool_call_id": written[3]["tool_call_id"]}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=clash, tools=TOOLS)
    assert e.value.body["param"] == "messages" and OTHER_IDS[0] in e.value.body["message"]


def test_a_forced_call_is_constrained_and_rendered_as_auto_s(served: tuple[Any, _Scripted]) -> None:
    """tool_choice "required" or a named function renders every tool, as "auto" does (mistral-common's prompt),
    and gives the engine the grammar of a call (`tool_calls_grammar`); "auto" gives it none. A scripted reply
    that is a call is answered as one: finish "tool_calls" for "required", "stop" for a named function (OpenAI's
    and vLLM's), streamed the same."""
    client, engine = served
    engine.writes('[{"name": "get_weather", "arguments": {"city": "Bern"}}]')
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice, finish in (("required", "tool_calls"), (named, "stop"), ("auto", "tool_calls")):
        kw: dict[str, Any] = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice)
        reply = client.chat.completions.create(**kw).choices[0]
        assert engine.prompts[-1] == _mistral_common(ASK, TOOLS)
        spec = engine.params[-1].structured
        assert (spec is not None and spec.kind == "grammar") == (choice != "auto"), spec
        assert reply.finish_reason == finish and reply.message.content is None
        assert [json.loads(c.function.arguments) for c in reply.message.tool_calls] == [{"city": "Bern"}]
        content, streamed, streamed_finish = _streamed(client, **kw)
        assert (content, streamed_finish) == (None, finish)
        assert [c["function"]["name"] for c in streamed] == ["get_weather"]


def test_forcing_two_constraints_names_both(served: tuple[Any, _Scripted]) -> None:
    client, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                       response_format={"type": "json_object"})
    assert "tool_choice" in e.value.body["message"] and "response_format" in e.value.body["message"], e.value.body


def test_schemas_llguidance_cannot_force_are_offered_with_auto(served: tuple[Any, _Scripted]) -> None:
    """JSON Schema that llguidance leaves out (`not`, `uniqueItems`, an unknown `format`) or cannot fetch (a `$ref`
    to another document) is no 400 where the model only reads it; the prompt is mistral-common's."""
    client, engine = served
    params = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True},
                                               "mail": {"type": "string", "format": "x-mail"},
                                               "geo": {"$ref": "https://example.com/geo.json"}},
              "not": {"required": ["tags", "mail"]}}
    tools = [{"type": "function", "function": {"name": "tag", "parameters": params}}]
    engine.reply = [*engine.tok.encode("No.", bos=False), engine.tok.eos_id]
    reply = client.chat.completions.create(model="tiny", messages=ASK, tools=tools).choices[0]
    assert reply.message.content == "No." and engine.prompts[-1] == _mistral_common(ASK, tools)


def test_without_llguidance_a_forced_call_says_what_to_install(served: tuple[Any, _Scripted],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    client, engine = served
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required")
    assert e.value.body["param"] == "tool_choice" and "pip install 'mixlab[serve]'" in e.value.body["message"]
    engine.writes('[{"name": "get_weather", "arguments": {"city": "Bern"}}]')  # "auto" needs no llguidance
    assert client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS).choices[0].message.tool_calls


# ---- forced calls on a real random model (v3 tokenizer): only the constraint makes its reply a call ----

# arguments a random model can finish: no free strings (it hardly ever closes one), no other keys
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Zürich", "Bern"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                            "unit": {"$ref": "#/$defs/unit"}},
           "required": ["city", "days", "unit"], "additionalProperties": False,
           "$defs": {"unit": {"enum": ["c", "f"]}}}  # pydantic's shape: a $ref to the parameters' own $defs
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}, "exact": {"type": "boolean"}},
         "required": ["zone"], "additionalProperties": False}
FORCED_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
                {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}}]


@pytest.fixture(scope="module")
def forced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    pytest.importorskip("llguidance")
    from mixlab.config import get_preset
    from mixlab.engine import Engine
    from mixlab.model import Transformer

    folder = tmp_path_factory.mktemp("forced")
    (folder / "tokenizer.model.v3").write_bytes(_v3().read_bytes())
    tok = load_tokenizer(folder)
    model = Transformer(get_preset("tiny-moe").replace(vocab_size=tok.vocab_size, max_seq_len=1024)).eval()
    model.init_weights(std=0.5, seed=0)
    cfg = ServerConfig(model_name="tiny", context_len=1024, responses_store=0)
    with Engine(model, tok, max_batch=4) as engine, ServerThread(create_app(engine, tok, cfg)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _check_calls(calls: list[dict[str, Any]], names: set[str]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in FORCED_TOOLS}
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["function"]["name"] in names, call
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
        assert re.fullmatch(r"[a-zA-Z0-9]{9}", call["id"]), call


@pytest.mark.parametrize("choice,names,finish", [
    ("required", {"get_weather", "get_time"}, "tool_calls"),
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}, "stop"),
])
def test_a_random_model_forced_to_call_writes_calls_that_validate(forced: Any, choice: Any, names: set[str],
                                                                   finish: str) -> None:
    """Every sampled reply of a random model is a parsable call of the allowed tools whose arguments validate
    against that tool's parameters (a named function: one call), finish as OpenAI's; streamed, the same calls
    (ids aside where the model wrote none: those are random)."""
    kw: dict[str, Any] = dict(model="tiny", messages=ASK, tools=FORCED_TOOLS, tool_choice=choice, max_tokens=300,
                              temperature=1.0, seed=3)
    r = forced.chat.completions.create(**kw, n=4)
    for reply in r.choices:
        assert reply.finish_reason == finish and reply.message.content is None, reply
        calls = [c.model_dump() for c in reply.message.tool_calls]
        _check_calls(calls, names)
        if finish == "stop":
            assert len(calls) == 1
    first = [c.model_dump() for c in r.choices[0].message.tool_calls]
    content, streamed, streamed_finish = _streamed(forced, **kw)
    assert (content, streamed_finish) == (None, finish)
    assert [c["function"] for c in streamed] == [c["function"] for c in first]


def test_parallel_tool_calls_false_forces_one_call(forced: Any) -> None:
    """The same seeds that write several calls write their first one alone with parallel_tool_calls false."""
    kw: dict[str, Any] = dict(model="tiny", messages=ASK, tools=FORCED_TOOLS, tool_choice="required", max_tokens=300,
                              temperature=1.0, seed=3, n=4)
    several = forced.chat.completions.create(**kw).choices
    one = forced.chat.completions.create(**kw, parallel_tool_calls=False).choices
    assert max(len(r.message.tool_calls) for r in several) > 1
    for reply, other in zip(one, several, strict=True):
        assert reply.finish_reason == "tool_calls" and len(reply.message.tool_calls) == 1, reply
        assert reply.message.tool_calls[0].function == other.message.tool_calls[0].function
        _check_calls([reply.message.tool_calls[0].model_dump()], {"get_weather", "get_time"})


def test_a_forced_call_cut_off_by_max_tokens_is_its_text(forced: Any) -> None:
    kw: dict[str, Any] = dict(model="tiny", messages=ASK, tools=FORCED_TOOLS, tool_choice="required", max_tokens=6,
                              seed=3)
    reply = forced.chat.completions.create(**kw).choices[0]
    assert (reply.finish_reason, reply.message.tool_calls) == ("length", None)
    assert reply.message.content == '[{"name": "'  # six tokens: [TOOL_CALLS] and what is forced
    assert _streamed(forced, **kw) == (reply.message.content, [], "length")


@pytest.mark.parametrize("version", [2, 3])
def test_the_grammar_of_a_forced_call_takes_what_the_template_writes(tmp_path: Path, version: int) -> None:
    """The tokens the v2/v3 template writes for an assistant's calls (Tokenizer.chat_turns, as mistral-common)
    follow `tool_calls_grammar` to its end, EOS then allowed: v3 with its ids, v2 without (an id is refused
    there, as are a tool not allowed, arguments off the schema, compact JSON, and a second call when not
    `parallel`)."""
    pytest.importorskip("llguidance")
    from mixlab.engine import Structured
    from mixlab.engine.structured import Matcher
    from mixlab.serve.common import tool_calls_grammar
    from mixlab.serve.protocol import Tool

    src = next(load_tokenizer().path.parent.glob(f"mistral_instruct_tokenizer_*.model.v{version}"))
    (tmp_path / src.name).write_bytes(src.read_bytes())
    tok = load_tokenizer(tmp_path / src.name)
    assert tok.chat_version == version
    tools = [Tool.model_validate(t) for t in FORCED_TOOLS]
    ids = ["abcDEF123", "x1y2z3w4v"] if version == 3 else ["null", "null"]  # v2's calls have no ids
    made = [("get_weather", {"city": "Zürich", "days": 2, "unit": "f"}), ("get_time", {"zone": "UTC"})]
    calls = [{"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
             for i, (n, a) in zip(ids, made, strict=True)]

    def written(calls: list[dict[str, Any]]) -> list[int]:
        chat = [*ASK, {"role": "assistant", "content": None, "tool_calls": calls},  # a result after it: the
                {"role": "tool", "content": "1", "tool_call_id": calls[0]["id"]}]  # template's last turn
        return [ids for role, ids in tok.chat_turns(chat, tools=FORCED_TOOLS) if role == "assistant"][-1][:-1]

    def takes(tokens: list[int], tools: list[Any], parallel: bool = True) -> bool:
        m = Matcher(Structured("grammar", tool_calls_grammar(tok, tools, parallel=parallel)), tok, tok.vocab_size)
        return all(m.advance(t) for t in tokens) and m.allows(tok.eos_id) and not m.failed

    both = written(calls)
    assert both[0] == tok.special_id("[TOOL_CALLS]") and ('"id"' in tok.decode(both)) == (version == 3)
    assert takes(both, tools) and takes(written(calls[1:]), tools[1:])
    assert not takes(both, tools[1:]) and not takes(both, tools, parallel=False)
    wrong = [{**calls[1], "function": {"name": "get_time", "arguments": '{"zone": "PST"}'}}]
    assert not takes(written(wrong), tools)
    compact = [tok.special_id("[TOOL_CALLS]"), *tok.encode('[{"name":"get_time","arguments":{"zone":"UTC"}}]',
                                                            bos=False)]
    assert not takes(compact, tools)
    if version == 2:
        with_id = [tok.special_id("[TOOL_CALLS]"), *tok.encode(
            '[{"name": "get_time", "arguments": {"zone": "UTC"}, "id": "abcDEF123"}]', bos=False)]
        assert not takes(with_id, tools)


def test_parallel_tool_calls_false_keeps_the_first_call_under_auto(served: tuple[Any, _Scripted]) -> None:
    """Under "auto" the model may write several calls; parallel_tool_calls false answers the first alone (vLLM's
    rule), streamed the same; true (the default) answers them all."""
    client, engine = served
    engine.writes('[{"name": "get_weather", "arguments": {"city": "Bern"}, "id": "abcDEF123"}, '
                  '{"name": "get_weather", "arguments": {"city": "Basel"}, "id": "xyzXYZ789"}]')
    kw: dict[str, Any] = dict(model="tiny", messages=ASK, tools=TOOLS)
    assert len(client.chat.completions.create(**kw).choices[0].message.tool_calls) == 2
    one = client.chat.completions.create(**kw, parallel_tool_calls=False).choices[0]
    assert [(c.id, json.loads(c.function.arguments)) for c in one.message.tool_calls] == [("abcDEF123",
                                                                                          {"city": "Bern"})]
    assert one.finish_reason == "tool_calls" and engine.params[-1].structured is None
    _, streamed, finish = _streamed(client, **kw, parallel_tool_calls=False)
    assert [c["id"] for c in streamed] == ["abcDEF123"] and finish == "tool_calls"
