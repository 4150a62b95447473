"""Function tools in the Responses API (`POST /v1/responses`) for a v3 model, driven with the official `openai`
client over the scripted engine of tests/test_serve_tools.py (`_Scripted`: it writes a given reply token by token
and keeps the prompts and sampling it was sent): a reply that is a call comes out as `function_call` items,
streamed as OpenAI's events and equal to the response made whole; `function_call` / `function_call_output` input
items (given again, or continued by `previous_response_id`) encode as the chat path's equivalent messages and as
mistral-common's; forced calls get the chat path's grammar, and on a real random tiny model (test_serve_tools'
`forced`) make calls that validate; what is wrong is a 400 naming the field."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("mistral_common")

from mixlab import load_tokenizer  # noqa: E402
from mixlab.serve import ServerConfig, ServerThread, create_app  # noqa: E402
from mixlab.tokenizer import template_call_id  # noqa: E402
from test_serve_tools import (  # noqa: E402
    ASK,
    FOLLOW_UP,
    FORCED_TOOLS,
    OTHER_IDS,
    TOOLS,
    _check_calls,
    _mistral_common,
    _Scripted,
    _v3,
    _written,
    forced,  # noqa: F401 (a fixture: a random tiny model over the v3 tokenizer)
)

# TOOLS in the Responses API's flat shape
RTOOLS = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
           "parameters": t["function"]["parameters"], "strict": False} for t in TOOLS]
ASKED = {"model": "tiny", "instructions": ASK[0]["content"], "input": ASK[1]["content"], "tools": RTOOLS}
TWO = ('[{"name": "get_weather", "arguments": {"city": "Zürich"}, "id": "abcDEF123"}, '
       '{"name": "get_weather", "arguments": {"city": "Bern"}}]')  # the second without an id: a random one
CALL_EVENTS = ["response.output_item.added", "response.function_call_arguments.delta",
               "response.function_call_arguments.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, _Scripted, str]]:
    folder = tmp_path_factory.mktemp("v3")
    (folder / "tokenizer.model.v3").write_bytes(_v3().read_bytes())
    tok = load_tokenizer(folder)
    engine = _Scripted(tok)
    cfg = ServerConfig(model_name="tiny", context_len=4096, prepare_structured=False)
    with ServerThread(create_app(engine, tok, cfg)) as url:  # type: ignore[arg-type]
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30), engine, url


def _says(engine: _Scripted, text: str) -> None:
    engine.reply = [*engine.tok.encode(text, bos=False), engine.tok.eos_id]


def _calls(output: list[Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(o.type, o.name, json.loads(o.arguments)) for o in output]


def test_a_call_is_function_call_items_streamed_as_openai_s_events(served: tuple[Any, _Scripted, str]) -> None:
    """The prompt is mistral-common's with the tools; a reply that is a call is `function_call` items (the chat
    path's ids as their call_id: the model's v3 id, else 9 random letters and digits), no text; streamed, each
    call as OpenAI sends one, in sequence, ending with the same response; the tools are echoed."""
    client, engine, url = served
    engine.writes(TWO)
    r = client.responses.create(**ASKED)
    assert engine.prompts[-1] == _mistral_common(ASK, TOOLS)
    assert engine.params[-1].structured is None  # "auto": the model's own choice
    assert r.status == "completed" and r.output_text == ""
    assert _calls(r.output) == [("function_call", "get_weather", {"city": "Zürich"}),
                                ("function_call", "get_weather", {"city": "Bern"})]
    assert r.output[0].call_id == "abcDEF123" and re.fullmatch(r"[a-zA-Z0-9]{9}", r.output[1].call_id)
    assert all(o.id.startswith("fc_") and o.status == "completed" for o in r.output)
    assert [(t.name, t.parameters, t.strict) for t in r.tools] == [("get_weather", TOOLS[0]["function"]["parameters"],
                                                                    False)]
    assert r.tool_choice == "auto"

    events = list(client.responses.create(**ASKED, stream=True))
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", *CALL_EVENTS * 2, "response.completed"], kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added, delta, done, item_done = events[2:6]
    assert (added.item.arguments, added.item.status, added.output_index) == ("", "in_progress", 0)
    assert delta.delta == done.arguments == item_done.item.arguments and delta.item_id == item_done.item.id
    assert [e.output_index for e in events[6:10]] == [1] * 4
    final = events[-1].response
    assert _calls(final.output) == _calls(r.output) and final.output[0].call_id == "abcDEF123"
    assert [e.item.model_dump() for e in (events[5], events[9])] == [o.model_dump() for o in final.output]

    # the JSON sent is OpenAI's schema (the client builds its objects without validating them)
    types = pytest.importorskip("openai.types.responses")
    raw = httpx.post(url + "/v1/responses", json=ASKED, timeout=30).json()
    assert [type(o).__name__ for o in types.Response.model_validate(raw).output] == ["ResponseFunctionToolCall"] * 2


def test_the_follow_up_encodes_as_the_chat_path_s_messages(served: tuple[Any, _Scripted, str]) -> None:
    """The calls' outputs, continuing the stored response or with the calls given again as input items, are the
    prompt of the chat path's equivalent messages, which is mistral-common's; the stored conversation lists them
    as OpenAI's items."""
    client, engine, _ = served
    engine.writes(TWO)
    r = client.responses.create(**ASKED)
    ids = [o.call_id for o in r.output]
    results = [{"type": "function_call_output", "call_id": i, "output": out} for i, out in
               zip(ids, ['{"temp": 21}', '{"temp": 19}'], strict=True)]
    chat = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": o.call_id, "type": "function", "function": {"name": o.name, "arguments": o.arguments}}
        for o in r.output]}, *[{"role": "tool", "content": x["output"], "tool_call_id": x["call_id"]} for x in results]]
    _says(engine, "21 °C in Zürich.")
    client.chat.completions.create(model="tiny", messages=chat, tools=TOOLS)
    expected = engine.prompts[-1]
    assert expected == _mistral_common(chat, TOOLS)

    later = client.responses.create(**{**ASKED, "input": results, "previous_response_id": r.id})
    assert engine.prompts[-1] == expected and later.output_text == "21 °C in Zürich."
    given = [{"role": "user", "content": ASK[1]["content"]}, *[o.model_dump(exclude_none=True) for o in r.output],
             *results]
    again = client.responses.create(**{**ASKED, "input": given, "store": False})
    assert engine.prompts[-1] == expected and again.output_text == later.output_text

    items = client.responses.input_items.list(later.id, order="asc").data
    assert [i.type for i in items] == ["message", "function_call", "function_call", "function_call_output",
                                       "function_call_output"]
    assert [(i.call_id, i.name, i.arguments) for i in items[1:3]] == [(o.call_id, o.name, o.arguments)
                                                                       for o in r.output]
    assert [(i.call_id, i.output) for i in items[3:]] == [(x["call_id"], x["output"]) for x in results]
    # the follow-up's follow-up: the whole chain is the chat's conversation (instructions are not carried over)
    _says(engine, "Anything else?")
    client.responses.create(model="tiny", input="Thanks.", previous_response_id=later.id, tools=RTOOLS)
    whole = [*chat[1:], {"role": "assistant", "content": later.output_text}, {"role": "user", "content": "Thanks."}]
    client.chat.completions.create(model="tiny", messages=whole, tools=TOOLS)
    assert engine.prompts[-2] == engine.prompts[-1] == _mistral_common(whole, TOOLS)


def test_a_stored_call_is_answered_and_replayed_as_it_was_streamed(served: tuple[Any, _Scripted, str]) -> None:
    """A background response that is a call: its live stream and its replay from the store (`GET ...?stream=true`)
    are the same events, byte for byte."""
    _, engine, url = served
    engine.writes(TWO)
    with httpx.stream("POST", url + "/v1/responses", json={**ASKED, "background": True, "stream": True},
                      timeout=30) as s:
        live = [x for x in s.iter_lines() if x]
    rid = json.loads(live[1].removeprefix("data: "))["response"]["id"]
    with httpx.stream("GET", f"{url}/v1/responses/{rid}", params={"stream": "true"}, timeout=30) as s:
        replay = [x for x in s.iter_lines() if x]
    assert replay == live and "event: response.function_call_arguments.done" in live


def test_text_with_tools_and_a_call_that_does_not_parse_are_messages(served: tuple[Any, _Scripted, str]) -> None:
    """Where tools are offered, a text reply streams as one without them; [TOOL_CALLS] followed by what does not
    parse is that text (as the chat path answers it), one delta, streamed the same as made whole."""
    client, engine, _ = served
    _says(engine, "It is sunny.")
    kinds = [e.type for e in client.responses.create(**ASKED, stream=True)]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"] and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") > 1
    engine.writes('[{"name": "get_weather", "arguments": {"city": "Zü')
    r = client.responses.create(**ASKED)
    assert r.output[0].type == "message" and r.output_text.strip() == '[{"name": "get_weather", "arguments": ' \
                                                                      '{"city": "Zü'
    events = list(client.responses.create(**ASKED, stream=True))
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == [r.output_text]
    assert events[-1].response.output_text == r.output_text


def test_forced_choices_get_the_chat_path_s_grammar(served: tuple[Any, _Scripted, str]) -> None:
    """tool_choice "required" or a named function ({"type": "function", "name"}) renders the tools as "auto" does
    and gives the engine the grammar of a call; "none" renders none and parses none."""
    pytest.importorskip("llguidance")
    client, engine, _ = served
    engine.writes('[{"name": "get_weather", "arguments": {"city": "Bern"}}]')
    for choice in ("required", {"type": "function", "name": "get_weather"}):
        r = client.responses.create(**ASKED, tool_choice=choice if isinstance(choice, str) else {**choice, "x": 1})
        assert engine.prompts[-1] == _mistral_common(ASK, TOOLS)
        spec = engine.params[-1].structured
        assert spec is not None and spec.kind == "grammar" and "get_weather" in spec.value
        assert _calls(r.output) == [("function_call", "get_weather", {"city": "Bern"})]
        assert r.tool_choice == choice if isinstance(choice, str) else r.tool_choice.model_dump() == choice
    r = client.responses.create(**ASKED, tool_choice="none")
    assert engine.prompts[-1] == _mistral_common(ASK, None) and r.output[0].type == "message"


CALL = {"type": "function_call", "call_id": "abcDEF123", "name": "get_weather", "arguments": '{"city": "Bern"}'}
OUT = {"type": "function_call_output", "call_id": "abcDEF123", "output": "21"}
USER = {"role": "user", "content": "Weather?"}


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [*RTOOLS, {"type": "mcp", "server_label": "x"}]}, "tools[1].type"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0].name"),  # chat's nested shape
    ({"tools": [{"type": "function", "name": "get weather"}]}, "tools[0].name"),
    ({"tools": [{"type": "function", "name": "f", "parameters": "{}"}]}, "tools[0].parameters"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "nonsense"}}]}, "tools[0].parameters"),
    *[({"tools": [{"type": "function", "name": "f", "strict": bad}]}, "tools[0].strict") for bad in ("yes", 1)],
    ({"tools": [{"type": "function", "name": "f", "parameters": {"maximum": float("inf")}}]}, "tools"),  # echoed
    ({"tools": RTOOLS, "tool_choice": {"type": "function", "name": "get_time"}}, "tool_choice"),
    ({"tools": RTOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": RTOOLS, "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "required", "text": {"format": {"type": "json_object"}}}, "text.format"),
    ({"input": [USER, {**OUT, "call_id": "zyxWVU987"}]}, "input[1].call_id"),  # answers no call
    ({"input": [USER, {**CALL, "call_id": ""}, {**OUT, "call_id": ""}]}, "input[1].call_id"),  # empty
    ({"input": [USER, {**CALL, "call_id": 5}, {**OUT, "call_id": 5}]}, "input[1].call_id"),  # not a string
    ({"input": [USER, CALL, {**OUT, "call_id": 5}]}, "input[2].call_id"),
    ({"input": [USER, {**CALL, "call_id": "call_1"}, {**CALL, "call_id": template_call_id("call_1")},
                {**OUT, "call_id": "call_1"}, {**OUT, "call_id": template_call_id("call_1")}]},
     "input"),  # two ids written as one
    *[({"max_tool_calls": bad}, "max_tool_calls") for bad in (0, "3", True, 1.5)],
    ({"input": [USER, {k: v for k, v in CALL.items() if k != "arguments"}, OUT]}, "input[1].arguments"),
    ({"input": [USER, CALL, {**OUT, "output": 5}]}, "input[2].output"),
    ({"input": [USER, CALL, {**OUT, "output": [{"type": "input_image", "image_url": "x"}]}]}, "input[2].output"),
    ({"input": [USER, CALL, OUT, {"type": "reasoning", "summary": []}]}, "input[3].type"),
])
def test_bad_requests_name_the_field(served: tuple[Any, _Scripted, str], body: dict[str, Any], param: str) -> None:
    _, _, url = served
    sent = json.dumps({k: v for k, v in {**ASKED, **body}.items() if v is not None})  # Infinity as Python writes it
    r = httpx.post(url + "/v1/responses", content=sent, headers={"Content-Type": "application/json"}, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param, err
    assert "\n" not in err["message"]


def test_another_server_s_call_ids_are_written_as_the_chat_path_writes_them(served: tuple[Any, _Scripted, str]
                                                                            ) -> None:
    """function_call / function_call_output items whose call_id is not v3's (OpenAI's `call_...`, carried over from
    another server) were a 400: their prompt is now the chat path's, mistral-common's of the ids the template writes,
    given as input and continued from the stored response (whose items keep the ids sent)."""
    client, engine, _ = served
    _says(engine, "21 and 19 °C.")
    calls = [{"type": "function_call", "call_id": c["id"], "name": c["function"]["name"],
              "arguments": c["function"]["arguments"]} for c in FOLLOW_UP[2]["tool_calls"]]
    outputs = [{"type": "function_call_output", "call_id": m["tool_call_id"], "output": m["content"]}
               for m in FOLLOW_UP[3:]]
    r = client.responses.create(**{**ASKED, "input": [ASK[1], *calls, *outputs]})
    assert engine.prompts[-1] == _mistral_common(_written(FOLLOW_UP), TOOLS) and r.output_text == "21 and 19 °C."
    items = client.responses.input_items.list(r.id, order="asc").data
    assert [i.call_id for i in items[1:]] == [*OTHER_IDS, *OTHER_IDS]  # kept as sent
    _says(engine, "Bye.")
    client.responses.create(**{**ASKED, "input": "Thanks.", "previous_response_id": r.id})
    whole = [*FOLLOW_UP, {"role": "assistant", "content": r.output_text}, {"role": "user", "content": "Thanks."}]
    assert engine.prompts[-1] == _mistral_common(_written(whole), TOOLS)  # the instructions: this request's


def test_max_tool_calls_is_accepted_and_echoed(served: tuple[Any, _Scripted, str]) -> None:
    """OpenAI's max_tool_calls caps calls to built-in tools, which this server has none of: it was a 400; it is
    now taken, echoed, and changes nothing (function calls are not built-in tools)."""
    client, engine, _ = served
    engine.writes(TWO)
    r = client.responses.create(**ASKED, max_tool_calls=1)
    assert r.max_tool_calls == 1 and len(r.output) == 2 and r.output[0].call_id == "abcDEF123"
    assert client.responses.create(**ASKED).max_tool_calls is None


def test_an_output_answers_a_call_of_the_stored_conversation_only(served: tuple[Any, _Scripted, str]) -> None:
    client, engine, _ = served
    engine.writes(TWO)
    r = client.responses.create(**ASKED)
    _says(engine, "Fine.")
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**{**ASKED, "input": [{**OUT, "call_id": "zyxWVU987"}], "previous_response_id": r.id})
    assert e.value.body["param"] == "input[0].call_id"
    ok = [{**OUT, "call_id": o.call_id} for o in r.output]
    assert client.responses.create(**{**ASKED, "input": ok, "previous_response_id": r.id}).output_text == "Fine."


def test_parallel_tool_calls_false_keeps_the_first_call_under_auto(served: tuple[Any, _Scripted, str]) -> None:
    client, engine, _ = served
    engine.writes(TWO)
    r = client.responses.create(**ASKED, parallel_tool_calls=False)
    assert [o.call_id for o in r.output] == ["abcDEF123"] and r.parallel_tool_calls is False
    events = list(client.responses.create(**ASKED, parallel_tool_calls=False, stream=True))
    assert [e.type for e in events][2:] == [*CALL_EVENTS, "response.completed"]
    assert [o.call_id for o in events[-1].response.output] == ["abcDEF123"]


@pytest.mark.parametrize("choice,names", [("required", {"get_weather", "get_time"}),
                                          ({"type": "function", "name": "get_time"}, {"get_time"})])
def test_a_random_model_forced_to_call_answers_function_calls_that_validate(
        forced: Any, choice: Any, names: set[str]) -> None:  # noqa: F811 (the fixture imported)
    """On a real random model only the constraint makes the reply a call: its function_call items name the
    allowed tools, their arguments validate against the tool's parameters (a named function: one call), and the
    stream, of the same seed, carries the same calls."""
    flat = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
            for t in FORCED_TOOLS]
    kw: dict[str, Any] = dict(model="tiny", instructions=ASK[0]["content"], input=ASK[1]["content"], tools=flat,
                              tool_choice=choice, max_output_tokens=300, temperature=1.0, extra_body={"seed": 3})
    r = forced.responses.create(**kw)
    assert r.status == "completed" and r.output and all(o.type == "function_call" for o in r.output), r.output
    _check_calls([{"id": o.call_id, "type": "function", "function": {"name": o.name, "arguments": o.arguments}}
                  for o in r.output], names)
    assert len(r.output) == 1 or choice == "required"
    final = list(forced.responses.create(**kw, stream=True))[-1].response
    assert [(o.name, o.arguments) for o in final.output] == [(o.name, o.arguments) for o in r.output]


def test_v2_writes_the_result_s_function_name_from_its_call(tmp_path: Any) -> None:
    """Mistral's v2 template names a tool result's function (v3 writes its call id): a function_call_output has
    no name, so its call's is given, which makes the prompt mistral-common's for the chat with that name."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    src = next(load_tokenizer().path.parent.glob("mistral_instruct_tokenizer_*.model.v2"))
    (tmp_path / src.name).write_bytes(src.read_bytes())
    tok = load_tokenizer(tmp_path / src.name)
    engine = _Scripted(tok)
    engine.writes('[{"name": "get_weather", "arguments": {"city": "Bern"}}]')
    cfg = ServerConfig(model_name="tiny", prepare_structured=False)
    with ServerThread(create_app(engine, tok, cfg)) as url:  # type: ignore[arg-type]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        call = client.responses.create(**ASKED).output[0]
        _says(engine, "21 °C.")
        given = [{"role": "user", "content": ASK[1]["content"]}, call.model_dump(exclude_none=True),
                 {**OUT, "call_id": call.call_id}]
        client.responses.create(**{**ASKED, "input": given})
    chat = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{"id": call.call_id, "type": "function",
                                                                         "function": {"name": call.name,
                                                                                      "arguments": call.arguments}}]},
            {"role": "tool", "content": OUT["output"], "tool_call_id": call.call_id, "name": "get_weather"}]
    request = ChatCompletionRequest(messages=chat, tools=TOOLS)
    assert engine.prompts[-1] == MistralTokenizer.from_file(str(src)).encode_chat_completion(request).tokens


def test_truncation_auto_keeps_the_tools(served: tuple[Any, _Scripted, str]) -> None:
    """truncation "auto" measures the prompt with its tools, and keeps them (they were dropped)."""
    client, engine, _ = served
    _says(engine, "Sunny.")
    client.responses.create(**ASKED, truncation="auto")
    assert engine.prompts[-1] == _mistral_common(ASK, TOOLS)
