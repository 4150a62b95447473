"""OpenAI's request bodies as pydantic models, and OpenAI's error body.

Field names, types and ranges follow OpenAI's API reference (chat completions, the legacy completions, the
Responses API's text core and function tools); `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `min_tokens`,
`return_token_ids`, `include_stop_str_in_output`, `allowed_token_ids`, `bad_words`, `truncate_prompt_tokens`,
`return_tokens_as_token_ids`, `prompt_logprobs`, `skip_special_tokens` are vLLM's extras (`VLLM_EXTRAS`: chat
and completions only) and `return_experts` is mixlab's. Numbers are strict (no `"0.5"` strings, no booleans for
integers). Unknown fields are ignored, as OpenAI-compatible servers do; the ones whose meaning we do not implement
(suffixes, audio, web search and the Responses API's other hosted tools, OpenAI's deprecated `functions`; vLLM's
structural tags, beam search, logits processors...: `NOT_IMPLEMENTED`) are refused with a 400 naming them, where
they ask for something, rather than silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mixlab.engine.api import MAX_LOGPROBS  # the engine's bound on top alternatives

__all__ = ["ApiError", "ChatCompletionRequest", "CompletionRequest", "DetokenizeRequest", "ResponsesRequest",
           "TokenizeRequest", "Tool", "error_body", "not_supported"]

# Bounds on list sizes keep a single request from asking for unbounded work.
MAX_N = 16
MAX_STOP = 16
MAX_LOGIT_BIAS = 1024
MAX_BAD_WORDS = 256  # each costs every step of the request a comparison of its tokens with the output's
SEED_RANGE = (-(2**63), 2**63 - 1)


class ApiError(Exception):
    """An error answered with OpenAI's body `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# Parameters whose meaning this server does not implement, with the value that asks for nothing (so do null
# and []; OpenAI's web_search_options {} asks for a search): any other is refused with a 400 naming it, else
# the client got output it did not ask for, silently. vLLM's extras, then OpenAI's (audio out, web search).
NOT_IMPLEMENTED: dict[str, Any] = {
    "use_beam_search": False, "structural_tag": None, "logits_processors": None, "prompt_embeds": None,
    "audio": None, "web_search_options": None}
# vLLM's extras that chat and completions honour (`_Sampling`'s fields), with the value that asks for nothing: the
# Responses API, which vLLM gives none of them, refuses them as before
VLLM_EXTRAS: dict[str, Any] = {
    "include_stop_str_in_output": False, "allowed_token_ids": None, "bad_words": None,
    "truncate_prompt_tokens": None, "return_tokens_as_token_ids": False, "prompt_logprobs": None,
    "skip_special_tokens": True}
# a chat's own: vLLM's echo (the last message repeated before the reply), chat_template, documents (a RAG
# template's), add_special_tokens (a second BOS before the template's)
CHAT_NOT_IMPLEMENTED = {"echo": False, "chat_template": None, "documents": None, "add_special_tokens": False}

Temperature = Annotated[StrictFloat, Field(ge=0.0, le=2.0)]
TopP = Annotated[StrictFloat, Field(gt=0.0, le=1.0)]
Penalty = Annotated[StrictFloat, Field(ge=-2.0, le=2.0)]
Seed = Annotated[StrictInt, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])]
StopStr = Annotated[StrictStr, Field(min_length=1)]  # pydantic checks a constrained str's Unicode itself


def _unicode(text: str) -> str:
    # JSON's "\ud83d" escape decodes to a lone surrogate (half an emoji, as a client that cut a string by
    # UTF-16 units sends): no tokenizer can encode it, and the request failed with a bare 500
    try:
        text.encode()
    except UnicodeEncodeError as e:
        where = {"char": f"\\u{ord(text[e.start]):04x}", "at": e.start}
        raise PydanticCustomError("string_unicode", "a lone surrogate {char} at character {at}: half of a "
                                  "UTF-16 pair, not text", where) from None
    return text


Text = Annotated[StrictStr, AfterValidator(_unicode)]  # what the tokenizer encodes
TokenId = Annotated[StrictInt, Field(ge=0)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM's: with include_usage, the usage so far in every chunk


class _Sampling(BaseModel):
    """The parameters both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stop: StopStr | Annotated[list[StopStr], Field(max_length=MAX_STOP)] | None = None
    seed: Seed | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    # extras (vLLM's names)
    top_k: Annotated[StrictInt, Field(ge=-1)] = 0  # -1 and 0: off
    min_p: Annotated[StrictFloat, Field(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[StrictFloat, Field(gt=0.0, le=10.0)] = 1.0
    ignore_eos: StrictBool = False
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP)] | None = None
    # mixlab's extension: the experts every MoE layer sent each generated token to
    return_experts: StrictBool = False
    # vLLM's (>= 0.10.2): each choice's generated token ids (`token_ids`) and the prompt's (`prompt_token_ids`)
    return_token_ids: StrictBool = False
    # {token id as a string: bias in [-100, 100]}, added to those logits before sampling
    logit_bias: Annotated[dict[StrictStr, Annotated[StrictFloat, Field(ge=-100.0, le=100.0)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    best_of: StrictInt | None = None  # only equal to n: no extra choices sampled to pick the best from
    # structured outputs (`constraint`): OpenAI's response_format, or vLLM's guided_* / structured_outputs
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None
    structured_outputs: dict[str, Any] | None = None
    # vLLM's: the stop string that matched stays at the end of the text (and a stop token's text)
    include_stop_str_in_output: StrictBool = False
    # vLLM's: only these tokens are sampled (every other logit -inf); bad_words: never these words
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None
    bad_words: Annotated[list[Annotated[Text, Field(min_length=1)]], Field(max_length=MAX_BAD_WORDS)] | None = None
    # vLLM's: the prompt's last k tokens alone (left truncation); -1: the model's context; None: all of it
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=-1)] | None = None
    # vLLM's: logprob tokens written "token_id:123" (each token's `bytes` stay its own text's)
    return_tokens_as_token_ids: StrictBool = False
    # vLLM's: each prompt token's logprob and rank, with the N most likely tokens at its position (not streamed)
    prompt_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    # vLLM's: false writes control tokens (`<s>`, `[INST]`) into the text
    skip_special_tokens: StrictBool = True
    # accepted for compatibility, with no effect (a response echoes it)
    user: Text | None = None

    REFUSED: ClassVar[dict[str, Any]] = NOT_IMPLEMENTED

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        # OpenAI's schema makes n, stream, echo, logprobs, the penalties... nullable (null: the default),
        # as vLLM's fields are; clients that serialise every field send them as null
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if v is not None or k not in fields or fields[k].is_required() or fields[k].default is None}

    @model_validator(mode="before")
    @classmethod
    def _refuse_not_implemented(cls, data: Any) -> Any:
        for name, nothing in cls.REFUSED.items():
            if isinstance(data, dict) and data.get(name) not in (nothing, None, []):
                raise _field_error(name, not_supported(name, data[name], nothing))
        return data

    @model_validator(mode="after")
    def _check_common(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise _field_error("stream_options", "stream_options is only allowed when stream is true")
        if self.best_of is not None and self.best_of != self.n:
            raise _field_error("best_of", f"best_of={self.best_of} is not supported (only best_of equal to n)")
        self.constraint()
        if self.stream and self.prompt_logprobs:  # vLLM's rule (0 asks for nothing a stream could carry)
            raise _field_error("prompt_logprobs", "`prompt_logprobs` are not available when `stream=True`.")
        if self.truncate_prompt_tokens == 0:  # vLLM's SamplingParams refuses it too: it would leave no prompt
            raise _field_error("truncate_prompt_tokens", "invalid truncate_prompt_tokens=0: expected an integer "
                               ">= 1 (keep the prompt's last k tokens) or -1 (the model's context)")
        for w in self.bad_words or ():
            if not w.strip():  # vLLM encodes each (its leading spaces stripped) and bans its last token: none here
                raise _field_error("bad_words", f"invalid bad_words entry {json.dumps(w)[:80]}: a word needs a "
                                                "character other than spaces")
        for key in self.logit_bias or {}:
            if not (key.isascii() and key.isdigit()):
                raise _field_error("logit_bias", f"invalid logit_bias key {key[:80]!r}: expected a token id, "
                                   "a string of digits such as \"1234\"")
        return self

    def constraint(self) -> tuple[str, str, Any] | None:
        """What the output must be, as (the parameter that asks for it, a `Structured` kind, its value), or
        None; a 400 naming both when two parameters ask for one."""
        asked: list[tuple[str, str, Any]] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            if kind == "json_object":
                asked.append(("response_format", "json_object", None))
            elif kind == "json_schema":
                js = rf.get("json_schema")
                if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
                    raise _field_error("response_format.json_schema", "response_format {'type': 'json_schema'} "
                                       "needs 'json_schema': {'name': ..., 'schema': {a JSON schema}}")
                asked.append(("response_format.json_schema.schema", "json_schema", js.get("schema", {})))
            elif kind != "text":
                raise _field_error("response_format", f"invalid response_format type {json.dumps(kind)[:80]}: expected "
                                   "'text', 'json_object' or 'json_schema'")
        vllm = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
                "guided_grammar": "grammar"}
        asked += [(name, kind, v) for name, kind in vllm.items() if (v := getattr(self, name)) not in (None, [])]
        kinds = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                 "json_object": "json_object"}
        for key, v in (self.structured_outputs or {}).items():
            # vLLM's fallback to another backend, and its no-whitespace JSON (which this server always writes)
            ignored = key in ("disable_fallback", "disable_any_whitespace")
            if key not in kinds and not ignored and v not in (None, False):
                raise _field_error(f"structured_outputs.{key}", f"structured_outputs.{key} is not supported by this "
                                   f"server (only {', '.join(kinds)})")
            if key == "json_object" and v not in (None, False, True):
                raise _field_error("structured_outputs.json_object", "structured_outputs.json_object must be a boolean")
            if key in kinds and v not in (None, False):
                asked.append((f"structured_outputs.{key}", kinds[key], None if key == "json_object" else v))
        if len(asked) > 1:
            raise _field_error(asked[1][0], f"{asked[0][0]} and {asked[1][0]} both constrain the output: send one")
        return asked[0] if asked else None

    def biases(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def not_supported(name: str, value: Any, nothing: Any) -> str:
    """The refusal of a parameter this server does not implement, `nothing` being the value that asks for nothing."""
    return (f"{name}={json.dumps(value)[:80]} is not supported by this server (leave it out, or send "
            f"{json.dumps(nothing)})")


class _FieldError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _field_error(param: str, message: str) -> _FieldError:
    return _FieldError(param, message)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: Text


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Annotated[StrictStr, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]  # mistral-common's rule
    description: Text = ""
    parameters: dict[str, Any] = Field(default_factory=dict)  # a JSON Schema


class Tool(BaseModel):
    """One of OpenAI's `tools`: a function the model may call."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: ToolFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # "developer" is OpenAI's newer name for "system"; "tool": a tool call's result
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None (or left out): only an assistant message's, of tool calls (the template checks that it has them)
    content: Text | list[TextPart] | None = Field(default=None, validate_default=True)
    name: StrictStr | None = None
    # Mistral's API: the last message, an assistant one, that the reply continues
    prefix: StrictBool = False
    # an assistant's calls, OpenAI's [{"id", "type": "function", "function": {"name", "arguments"}}], and a
    # tool result's call (the template checks their shapes, as mistral-common does)
    tool_calls: list[Any] | None = None
    tool_call_id: StrictStr | None = None

    @field_validator("content")
    @classmethod
    def _content_required(cls, content: Any, info: ValidationInfo) -> Any:
        if content is None and info.data.get("role") != "assistant":
            raise PydanticCustomError("missing", "Field required")
        return content

    def text(self) -> str:
        # text parts joined with a blank line, empty ones skipped: mistral-common's v1 request normaliser
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n\n".join(p.text for p in self.content if p.text)

    def template(self) -> dict[str, Any]:
        """The message as `Tokenizer.encode_chat` takes it."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": None if self.content is None and self.tool_calls else self.text(),
                               "prefix": self.prefix}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.role == "tool":
            out |= {"tool_call_id": self.tool_call_id, "name": self.name}
        return out


def _continue_final(messages: list[ChatMessage], continue_final: bool, generation_prompt: bool | None) -> None:
    """vLLM's continue_final_message: the last message, an assistant one, is continued (Mistral's
    "prefix": true on it). Mistral's templates have no generation prompt to leave out, so
    add_generation_prompt matters only beside it (both true: refused, as vLLM refuses it)."""
    if not continue_final:
        return
    if generation_prompt:
        raise _field_error("add_generation_prompt", "continue_final_message and add_generation_prompt cannot both "
                           "be true")
    if messages[-1].role != "assistant":
        raise _field_error("continue_final_message", "continue_final_message continues the last message, which must "
                           f"be an assistant one; it is a {messages[-1].role!r} message")
    messages[-1].prefix = True


def _forced_tools(tools: Sequence[Tool], choice: Any, name: Any, shape: str) -> list[Tool] | None:
    """What a `tool_choice` forces, both APIs' (`name`: the function a dict choice names, in its API's `shape`):
    None for "none", "auto" or none sent (the model may answer in text); "required": any of `tools` (a 400
    without them); a named function: that one of `tools` (a 400 naming tool_choice when it is not among them,
    or when the choice is none of these)."""
    if choice in (None, "none", "auto"):
        return None
    if choice == "required":
        if not tools:
            raise _field_error("tool_choice", "tool_choice=\"required\" needs tools: the reply must call one of "
                                              "them, and none was sent")
        return list(tools)
    if not isinstance(name, str):
        raise _field_error("tool_choice", f"invalid tool_choice={json.dumps(choice)[:80]}: expected 'none', 'auto', "
                                          f"'required' or {shape}")
    named = [t for t in tools if t.function.name == name]
    if not named:
        sent = ", ".join(repr(t.function.name) for t in tools) or "none"
        raise _field_error("tool_choice", f"tool_choice names the function {name[:80]!r}, which is not one of "
                                          f"tools (sent: {sent[:200]})")
    return named[:1]


def _tool_constraint(asked: tuple[str, str, Any] | None, forced: list[Tool] | None, choice: Any,
                     parallel: bool) -> tuple[str, str, Any] | None:
    """`asked` (the request's other constraint), or a forced tool call's: ("tool_choice", "tool_calls", {"tools": the
    tools it may call, "parallel": whether it may be several calls (a named function's: one, as in OpenAI and
    vLLM)}), which the server turns into a grammar over its tokenizer (`serve.common.tool_calls_grammar`); a 400
    naming the other when both ask."""
    if forced is None:
        return asked
    if asked is not None:
        raise _field_error(asked[0], f"tool_choice={json.dumps(choice)[:80]} and {asked[0]} both constrain the "
                                     "output: send one")
    return ("tool_choice", "tool_calls", {"tools": forced, "parallel": choice == "required" and parallel})


def _rendered_tools(tools: Sequence[Tool] | None, choice: Any) -> list[dict[str, Any]] | None:
    """The tools the template shows the model (tool_choice "none": none, as vLLM does), as `Tokenizer.encode_chat`
    takes them."""
    if not tools or choice == "none":
        return None
    return [t.model_dump() for t in tools]


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, fail_fast=True)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    functions: list[Any] | None = None
    # with tools, "auto" (the default) renders them and the model may call one; "none" forbids calling them:
    # they are not rendered (as vLLM does); "required" or a named function {"type": "function", "function":
    # {"name": ...}} renders them all and forces a call (`forced_tools`, constrained decoding). Tools need a
    # v2/v3 template (the app checks the tokenizer's).
    tool_choice: Any = None
    # false: a forced reply is one call; with "auto", the first of the calls the model wrote (vLLM's rule)
    parallel_tool_calls: StrictBool = True
    function_call: Any = None
    modalities: list[StrictStr] | None = None  # only ["text"]
    continue_final_message: StrictBool = False  # see _continue_final
    add_generation_prompt: StrictBool | None = None

    REFUSED: ClassVar[dict[str, Any]] = NOT_IMPLEMENTED | CHAT_NOT_IMPLEMENTED

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        _continue_final(self.messages, self.continue_final_message, self.add_generation_prompt)
        if self.top_logprobs and not self.logprobs:  # 0 asks for nothing: accepted, as vLLM does
            raise _field_error("top_logprobs", "top_logprobs > 0 needs logprobs set to true")
        if self.max_tokens == 0:
            raise _field_error("max_tokens", "max_tokens must be at least 1")
        if self.functions and self.function_call != "none":
            raise _field_error("functions", "functions (OpenAI's deprecated function calling) are not supported by "
                                            "this server: send tools; function_call \"none\" is accepted")
        if self.function_call not in (None, "none", "auto"):
            raise _field_error("function_call", f"function_call={json.dumps(self.function_call)[:80]} is OpenAI's "
                               "deprecated function calling, which this server does not take: send tools and "
                               "tool_choice")
        self.forced_tools()
        if self.modalities not in (None, ["text"]):
            raise _field_error("modalities", f"modalities={json.dumps(self.modalities)[:80]} is not supported: this "
                                             "model writes text only (send [\"text\"] or leave it out)")
        return self

    def forced_tools(self) -> list[Tool] | None:
        """The tools the reply must call one of (tool_choice "required": any of `tools`; a named function: that
        one), or None where the model may answer in text; a 400 naming tool_choice when it is neither a choice
        nor a function of `tools` (`_forced_tools`)."""
        choice = self.tool_choice
        function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        return _forced_tools(self.tools or [], choice, name, "{'type': 'function', 'function': {'name': ...}}")

    def constraint(self) -> tuple[str, str, Any] | None:
        """`_Sampling.constraint`, or a forced tool call's (`_tool_constraint`)."""
        return _tool_constraint(super().constraint(), self.forced_tools(), self.tool_choice, self.parallel_tool_calls)

    def function_tools(self) -> list[Tool]:
        return list(self.tools or [])

    def tool_param(self, i: int, field: str) -> str:
        """The parameter that names tools[i]'s `field` (`name`, `parameters`) in this API's shape."""
        return f"tools[{i}].function.{field}"

    def rendered_tools(self) -> list[dict[str, Any]] | None:
        return _rendered_tools(self.tools, self.tool_choice)

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _prompt_kind(value: Any) -> str | None:
    """The one branch of `Prompt` a value is checked against, by its shape. Checked against all four
    (a plain union), a 4 MB list of token ids took a second, and one with a bad element failed every
    branch with an error per element: millions of them, a 30 s stall of the whole server."""
    if isinstance(value, str):
        return "str"
    if not isinstance(value, list):
        return None
    first = value[0] if value else 0
    return "list[str]" if isinstance(first, str) else "list[list[int]]" if isinstance(first, list) else "list[int]"


def _one_prompt_error(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # the whole prompt is what was wrong, as a union reports it (its message shows the value's start)
    try:
        return handler(value)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "string_unicode":
            raise PydanticCustomError("string_unicode", first["msg"]) from None
        raise PydanticCustomError("prompt_type", "not a prompt") from None


Ids = Annotated[list[TokenId], Field(min_length=1, fail_fast=True)]  # fail_fast: one error, not one per element
Prompt = Annotated[
    Annotated[Text, Tag("str")]
    | Annotated[list[Text], Field(min_length=1, fail_fast=True), Tag("list[str]")]
    | Annotated[Ids, Tag("list[int]")]
    | Annotated[list[Ids], Field(min_length=1, fail_fast=True), Tag("list[list[int]]")],
    Discriminator(_prompt_kind), WrapValidator(_one_prompt_error)]


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = 16
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    suffix: StrictStr | None = None
    add_special_tokens: StrictBool = True  # vLLM's: false, a text prompt without BOS

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.suffix:
            raise _field_error("suffix", "suffix (insertion) is not supported by this server")
        if self.max_tokens == 0 and not self.echo:
            raise _field_error("max_tokens", "max_tokens=0 is only allowed with echo (to score a prompt)")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        """The batch of prompts, each a str or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [[int(x) for x in p]]  # type: ignore[arg-type]
        return list(p)  # type: ignore[return-value]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, fail_fast=True)] | None = None
    add_special_tokens: StrictBool = True
    continue_final_message: StrictBool = False  # with messages, as in a chat request
    add_generation_prompt: StrictBool | None = None
    return_token_strs: StrictBool = False  # vLLM's: each token's piece too ("▁Hello", "<0xE4>")

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise _field_error("prompt", "give exactly one of prompt (a string) or messages (a chat)")
        if self.messages is not None:
            _continue_final(self.messages, self.continue_final_message, self.add_generation_prompt)
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    tokens: Annotated[list[TokenId], Field(max_length=1_000_000, fail_fast=True)]


# OpenAI's Responses API (`POST /v1/responses`): what would need a stored conversation or prompt or a hosted tool
# (any but functions: `_function_tools`), and what asks for reasoning or extra output, is refused (`max_tool_calls`,
# a cap on calls to hosted tools, has none to cap: accepted). `store`, `previous_response_id` and `background` are the
# app's (its response store, store.py; without one, `store` is answered false and `previous_response_id` and
# `background` refused in these words, `not_supported`)
RESPONSES_NOT_IMPLEMENTED = {"conversation": None, "prompt": None}
# what `include` may ask for: the output text's logprobs (OpenAI's `ResponseIncludable`; the others are tools',
# reasoning's or inputs' data this server has not)
RESPONSES_INCLUDABLE = ("message.output_text.logprobs",)


class ResponsesRequest(_Sampling):
    input: Text | Annotated[list[Any], Field(min_length=1)]
    instructions: Text | None = None  # the system prompt
    max_output_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    metadata: dict[Text, Text] | None = None  # echoed, as `text` is: no lone surrogate (a 500 as it was written)
    store: StrictBool = True
    background: StrictBool = False  # answered at once; the response is made in the engine and read back by GET
    previous_response_id: StrictStr | None = None
    parallel_tool_calls: StrictBool = True
    # OpenAI's cap on calls to *built-in* (hosted) tools, of which this server has none: accepted, echoed, no effect
    max_tool_calls: Annotated[StrictInt, Field(ge=1)] | None = None
    # flat function tools {"type": "function", "name", "description", "parameters", "strict"} (`function_tools`);
    # tool_choice as chat's (`_forced_tools`), a named function {"type": "function", "name": ...}
    tools: list[Any] | None = None
    tool_choice: Any = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["disabled", "auto"] | None = None  # "auto": the oldest turns go to fit
    include: list[StrictStr] | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # with the include's logprobs

    REFUSED: ClassVar[dict[str, Any]] = NOT_IMPLEMENTED | VLLM_EXTRAS | RESPONSES_NOT_IMPLEMENTED

    @model_validator(mode="after")
    def _check_responses(self) -> ResponsesRequest:
        if self.n != 1:
            raise _field_error("n", "n is not a Responses API parameter: a response has one output (send 1)")
        if self.max_tokens is not None:
            raise _field_error("max_tokens", "max_tokens is not a Responses API parameter: send max_output_tokens")
        self.forced_tools()  # and the tools' shapes
        if self.reasoning and any(v is not None for v in self.reasoning.values()):
            raise _field_error("reasoning", f"reasoning={json.dumps(self.reasoning)[:80]} is not supported: this model "
                                            "does not reason before it answers (leave it out)")
        for value in self.include or ():
            if value not in RESPONSES_INCLUDABLE:
                raise _field_error("include", f"include={json.dumps(value)[:80]} is not supported by this server (it "
                                              f"includes {json.dumps(RESPONSES_INCLUDABLE[0])} only)")
        if self.background and not self.store:  # OpenAI's and vLLM's rule
            raise _field_error("background", "background=true needs store=true: a background response is read "
                                             "back with GET /v1/responses/{id}")
        for name in ("text", "tools"):
            try:  # they are echoed: what JSON cannot write back was a 500 as the response was
                json.dumps(getattr(self, name), ensure_ascii=False, allow_nan=False).encode()
            except UnicodeEncodeError:
                raise _field_error(name, f"invalid {name}: a string in it has a lone surrogate (half of a UTF-16 pair, "
                                         "not text)") from None
            except ValueError:
                raise _field_error(name, f"invalid {name}: it holds NaN or Infinity, which JSON has no number "
                                         "for") from None
        # a function_call_output answers a call of `input` (checked here) or of the stored conversation (by the app)
        self.input_messages({} if self.previous_response_id is None else None)
        return self

    def wants_logprobs(self) -> bool:
        """Whether the output text's logprobs are asked for (`include`)."""
        return RESPONSES_INCLUDABLE[0] in (self.include or ())

    def function_tools(self) -> list[Tool]:
        """`tools` (Responses' flat function tools) as chat's `Tool`s (`_function_tools`: made again at each call,
        as the validators of both classes, run in pydantic's order, ask for them)."""
        return _function_tools(self.tools)

    def tool_param(self, i: int, field: str) -> str:
        return f"tools[{i}].{field}"

    def forced_tools(self) -> list[Tool] | None:
        choice = self.tool_choice
        name = choice.get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
        return _forced_tools(self.function_tools(), choice, name, "{'type': 'function', 'name': ...}")

    def rendered_tools(self) -> list[dict[str, Any]] | None:
        return _rendered_tools(self.function_tools(), self.tool_choice)

    def echoed_tool_choice(self) -> str | dict[str, Any]:
        """`tool_choice` as the response object shows it (a named function: its type and name alone)."""
        choice = self.tool_choice
        if isinstance(choice, dict):
            return {"type": "function", "name": choice["name"]}  # checked: `forced_tools`
        return choice or "auto"

    def echoed_tools(self) -> list[dict[str, Any]]:
        """`tools` as the response object shows them (OpenAI's `FunctionTool`)."""
        return [{"type": "function", "name": t.function.name, "description": t.function.description or None,
                 "parameters": t.function.parameters or None, "strict": raw.get("strict")}
                for t, raw in zip(self.function_tools(), self.tools or (), strict=True)]

    def messages(self, turns: Sequence[ChatMessage] | None = None) -> list[ChatMessage]:
        """`instructions` as a system message, then `turns`: `input`'s messages, or the app's (the conversation
        `previous_response_id` continues, then them: its own instructions are not carried over, as OpenAI defines)."""
        head = [ChatMessage(role="system", content=self.instructions)] if self.instructions is not None else []
        return [*head, *(self.input_messages() if turns is None else turns)]

    def input_messages(self, calls: Mapping[str, str] | None = None) -> list[ChatMessage]:
        """`input` (a user message, or message items) as chat messages: a run of `function_call` items is an
        assistant message's `tool_calls`, a `function_call_output` a tool result (its function's name from its
        call); a 400 naming the item or part that is none of these. `calls`: the calls (id -> function name) of the
        conversation before `input` (`previous_response_id`'s), which a `function_call_output` answers, or one in
        `input` before it (else a 400 naming its call_id); None: not checked."""
        if isinstance(self.input, str):
            return [ChatMessage(role="user", content=self.input)]
        known = None if calls is None else dict(calls)
        out: list[ChatMessage] = []
        for i, item in enumerate(self.input):
            where = f"input[{i}]"
            kind = item.get("type", "message") if isinstance(item, dict) else None
            if kind == "function_call":
                call = _function_call(item, where)
                if known is not None:
                    known[call["id"]] = call["function"]["name"]
                if i and _item_type(self.input[i - 1]) == "function_call":  # one assistant turn's calls
                    assert out[-1].tool_calls is not None
                    out[-1].tool_calls.append(call)
                else:
                    out.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
            elif kind == "function_call_output":
                call_id, output = _function_call_output(item, where)
                if known is not None and call_id not in known:
                    raise _field_error(f"{where}.call_id", f"invalid {where}.call_id={json.dumps(call_id)[:80]}: no "
                                       "function_call before it (in input, or in the response previous_response_id "
                                       "continues) has that call_id")
                out.append(ChatMessage(role="tool", content=output, tool_call_id=call_id,
                                       name=None if known is None else known[call_id]))
            else:
                out.append(_input_message(item, where))
        return out

    def call_ids(self) -> list[tuple[str, str, str]]:
        """Each function_call or function_call_output item of `input` as (where, its type, its call_id)."""
        if isinstance(self.input, str):
            return []
        return [(f"input[{i}]", str(_item_type(item)), item["call_id"]) for i, item in enumerate(self.input)
                if _item_type(item) in ("function_call", "function_call_output")]

    def text_format(self) -> dict[str, Any]:
        fmt = (self.text or {}).get("format")
        return fmt if isinstance(fmt, dict) else {"type": "text"}

    def constraint(self) -> tuple[str, str, Any] | None:
        """`text.format`'s constraint, mapped onto chat's `response_format` kinds (or vLLM's extras')."""
        fmt, mine = self.text_format(), None
        kind = fmt.get("type")
        if kind == "json_object":
            mine = ("text.format", "json_object", None)
        elif kind == "json_schema":
            if not isinstance(fmt.get("schema"), dict):
                raise _field_error("text.format.schema", "text.format {'type': 'json_schema'} needs 'name' and "
                                   "'schema': {a JSON schema}")
            mine = ("text.format.schema", "json_schema", fmt["schema"])
        elif kind != "text":
            raise _field_error("text.format.type", f"invalid text.format type {json.dumps(kind)[:80]}: expected "
                               "'text', 'json_object' or 'json_schema'")
        other = super().constraint()
        if mine and other:
            raise _field_error(other[0], f"text.format and {other[0]} both constrain the output: send one")
        return _tool_constraint(mine or other, self.forced_tools(), self.tool_choice, self.parallel_tool_calls)


def _function_tools(tools: list[Any] | None) -> list[Tool]:
    """The Responses API's `tools`, flat function tools `{"type": "function", "name", "description", "parameters",
    "strict"}`, as chat's `Tool`s; a 400 naming `tools[i].type` for another kind (OpenAI's hosted tools: web_search,
    file_search, mcp...), or the field that is wrong."""
    out = []
    for i, tool in enumerate(tools or ()):
        if not isinstance(tool, dict):
            raise _field_error(f"tools[{i}]", f"invalid tools[{i}]: expected a function tool {{'type': 'function', "
                                              "'name': ..., 'parameters': {a JSON Schema}}")
        kind = tool.get("type")
        if kind != "function":
            raise _field_error(f"tools[{i}].type", f"tools[{i}].type={json.dumps(kind)[:80]} is not supported by this "
                               "server: only 'function' tools (functions the client runs; no hosted tools such as "
                               "web_search, file_search, mcp or code_interpreter)")
        if not isinstance(tool.get("name"), str) and isinstance(tool.get("function"), dict):
            raise _field_error(f"tools[{i}].name", f"missing tools[{i}].name: the Responses API's function tools are "
                               "flat, {'type': 'function', 'name', 'description', 'parameters'}, not chat's "
                               "{'type': 'function', 'function': {...}}")
        if not isinstance(tool.get("strict"), (bool, type(None))):  # not `in (True, False)`: 1 == True
            raise _field_error(f"tools[{i}].strict", f"invalid tools[{i}].strict={json.dumps(tool['strict'])[:80]}: "
                                                     "expected a boolean")
        try:
            function = ToolFunction.model_validate({k: tool[k] for k in ("name", "description", "parameters")
                                                    if tool.get(k) is not None})
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(map(str, first["loc"][:1])) or "name"
            shown = json.dumps(tool.get(field))[:80] if field in tool else "missing"
            raise _field_error(f"tools[{i}].{field}", f"invalid tools[{i}].{field}={shown}: {first['msg']}") from None
        out.append(Tool(function=function))
    return out


def _item_type(item: Any) -> str | None:
    return item.get("type", "message") if isinstance(item, dict) else None


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A `function_call` input item (the assistant's earlier call: `{"type": "function_call", "call_id", "name",
    "arguments"}`) as chat's tool call `{"id", "type": "function", "function": {"name", "arguments"}}`."""
    for key in ("call_id", "name", "arguments"):
        if not isinstance(item.get(key), str):
            raise _field_error(f"{where}.{key}", f"invalid {where}.{key}: a function_call item needs 'call_id', 'name' "
                               "and 'arguments' (JSON text), each a string")
    try:
        _unicode(item["arguments"])
    except PydanticCustomError as e:
        raise _field_error(f"{where}.arguments", f"invalid {where}.arguments: {e}") from None
    return {"id": item["call_id"], "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]}}


def _function_call_output(item: dict[str, Any], where: str) -> tuple[str, str]:
    """A `function_call_output` input item's (call_id, output text): `output` a string or input_text parts."""
    call_id, output = item.get("call_id"), item.get("output")
    if not isinstance(call_id, str):
        raise _field_error(f"{where}.call_id", f"invalid {where}.call_id: a function_call_output item needs the "
                                               "'call_id' of the function_call it answers, a string")
    if isinstance(output, list):
        if not all(isinstance(p, dict) and p.get("type") == "input_text" and isinstance(p.get("text"), str)
                   for p in output):
            raise _field_error(f"{where}.output", f"invalid {where}.output: expected a string or a list of "
                               "{'type': 'input_text', 'text': str} parts (this model reads text only)")
        output = "\n\n".join(p["text"] for p in output if p["text"])
    if not isinstance(output, str):
        raise _field_error(f"{where}.output", f"invalid {where}.output: expected a string (the function's result)")
    try:
        return call_id, _unicode(output)
    except PydanticCustomError as e:
        raise _field_error(f"{where}.output", f"invalid {where}.output: {e}") from None


def _input_message(item: Any, where: str) -> ChatMessage:
    """One item of a Responses `input` list as a chat message: {"type": "message" (optional), "role",
    "content": a string or parts of type input_text (an assistant's: output_text)}."""
    if not isinstance(item, dict):
        raise _field_error(where, f"invalid {where}: expected a message item {{'role': ..., 'content': ...}}")
    if item.get("type", "message") != "message":
        raise _field_error(f"{where}.type", f"{where}.type={json.dumps(item['type'])[:80]} is not supported by this "
                           "server: only message, function_call and function_call_output items (no reasoning, "
                           "references or hosted tools' items)")
    role, content = item.get("role"), item.get("content")
    if role not in ("user", "assistant", "system", "developer"):
        raise _field_error(f"{where}.role", f"invalid {where}.role={json.dumps(role)[:80]}: expected 'user', "
                           "'assistant', 'system' or 'developer'")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text") or not isinstance(part.get("text"), str):
                raise _field_error(f"{where}.content[{j}]", f"{where}.content[{j}] is not supported: expected "
                                   "{'type': 'input_text' (an assistant's: 'output_text'), 'text': str} (this model "
                                   f"reads text only: no images, audio or files); got type {json.dumps(kind)[:40]}")
            texts.append(part["text"])
        content = "\n\n".join(t for t in texts if t)  # as ChatMessage.text joins a chat's parts
    if not isinstance(content, str):
        raise _field_error(f"{where}.content", f"invalid {where}.content: expected a string or a list of "
                           "{'type': 'input_text', 'text': str} parts")
    try:
        return ChatMessage(role=role, content=_unicode(content))
    except PydanticCustomError as e:
        raise _field_error(f"{where}.content", f"invalid {where}.content: {e}") from None
