"""Tool calling in /v1/chat/completions for a v2/v3 model, driven with the official `openai` client. A random
model never writes [TOOL_CALLS] by itself, so the server runs over a scripted engine (`_Scripted`) that writes
a given reply token by token as the engine does (its stream decoder's deltas, EOS, finish "stop") and keeps
the prompts it was sent; prompts are checked against mistral-common's encoding."""

from __future__ import annotations

import json
import re
import string
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
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

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> _Handle:
        self.prompts.append(list(prompt_ids))
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
    ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                                "function": {"name": "f", "arguments": "{}"}}]},
                              {"role": "tool", "content": "1", "tool_call_id": "call_1"}]}, "messages"),  # not a v3 id
])
def test_bad_tools_are_400s_naming_the_field(served: tuple[Any, _Scripted], extra: dict[str, Any], param: str) -> None:
    client, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": "tiny", "messages": ASK, **extra})
    assert e.value.body["param"] == param, e.value.body
