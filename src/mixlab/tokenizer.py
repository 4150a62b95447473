"""Text <-> token ids: Mixtral's SentencePiece tokenizer (or a transformers `tokenizer.json`),
the Mixtral-Instruct chat template, and incremental decoding for streaming.

Sources, in the order `load_tokenizer` looks for them:
  - a `tokenizer.model` (SentencePiece, read with the `sentencepiece` library) or a
    `tokenizer.json` (transformers, read with the optional `tokenizers` library) in a folder;
  - by default, Mixtral's v1 tokenizer shipped inside `mistral-common`
    (`mistral_common/data/tokenizer.model.v1`: 32,000 pieces, byte fallback, BOS 1, EOS 2).

The chat template is mistral-common's instruct tokenizer of the tokenizer's version (`chat_version`):
v1 (Mixtral-8x7B-Instruct): `<s>[INST] user [/INST] assistant</s>[INST] user [/INST]`, where `[INST]` is
plain text (not a special token), each message is encoded separately (so each gets SentencePiece's
leading "▁"), and system messages are joined with a blank line and prepended to the *first* user message
(`InstructTokenizerV1.encode_user_message` in mistral-common 1.13; older releases used the last).
v2/v3 (Mixtral-8x22B-Instruct, Mistral-7B-Instruct-v0.3: `[INST]` is a control token): the same turns
with `[INST]` and `[/INST]` as control tokens around the user's text, the system prompt prepended to
the *last* user message, and assistant messages without their trailing spaces (`InstructTokenizerV2`).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import operator
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

from mixlab.config import as_path, suffix_of
from mixlab.errors import MixlabError

__all__ = ["TOKENIZER_NAMES", "ChatError", "TextError", "StreamDecoder", "Tokenizer", "check_text", "check_tokenizer",
           "TOKENIZER_FILES", "default_tokenizer_path", "load_tokenizer", "model_tokenizer", "template_call_id",
           "tokenizer_file", "tokenizer_files", "tool_call_id_ok"]

_REPLACEMENT = "\ufffd"  # what a byte sequence cut mid-character decodes to
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback piece


class TextError(MixlabError):
    """Text that is not valid Unicode (a lone surrogate, an undecodable byte from the terminal)."""


class ChatError(MixlabError):
    """A conversation that the Mixtral-Instruct template cannot encode."""


def check_text(text: str, what: str = "the text") -> None:
    """TextError when `text` cannot be UTF-8: a lone surrogate, which is how Python holds a byte it could
    not decode (a command-line argument or terminal input in another encoding)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        part = text[e.start:e.end]
        escaped = all(0xDC80 <= ord(c) <= 0xDCFF for c in part)  # bytes os.fsdecode could not decode
        shown = "bytes " + part.encode("utf-8", "surrogateescape").hex(" ") if escaped else ascii(part)
        raise TextError(f"{what} is not valid UTF-8: {shown} at character {e.start} (an undecodable byte "
                        "or a lone surrogate); pass UTF-8 text") from None


class _Backend(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...
    def id_to_piece(self, i: int) -> str: ...
    def special_id(self, piece: str) -> int | None: ...


class _SentencePiece:
    def __init__(self, path: Path, proto: bytes | None = None) -> None:
        import sentencepiece as spm

        try:
            self.sp = (spm.SentencePieceProcessor(model_file=str(path)) if proto is None
                       else spm.SentencePieceProcessor(model_proto=proto))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a readable SentencePiece model: {e}") from None
        self.vocab_size = int(self.sp.vocab_size())
        self.bos_id, self.eos_id = int(self.sp.bos_id()), int(self.sp.eos_id())

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        if skip_special:
            return str(self.sp.decode(list(ids)))  # control tokens (BOS, EOS) decode to ""
        # control tokens as their pieces, between the texts of the runs of other tokens, as transformers'
        # tokenizer.json of the same model decodes them: a run after one keeps its first "▁" as a space
        # (SentencePiece drops a text's first one; the Llama decoder's Strip, the whole text's alone)
        out: list[str] = []
        run: list[int] = []
        for i in [*ids, None]:
            if i is not None and not self.sp.IsControl(i):
                run.append(i)
                continue
            if run:
                text = str(self.sp.decode(run))
                out.append(" " + text if out and self.sp.id_to_piece(run[0]).startswith("\u2581") else text)
                run = []
            if i is not None:
                out.append(str(self.sp.id_to_piece(i)))
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        return str(self.sp.id_to_piece(i))

    def special_id(self, piece: str) -> int | None:
        i = int(self.sp.piece_to_id(piece))
        return i if i != self.sp.unk_id() and self.sp.IsControl(i) else None


class _HFTokenizers:
    """A transformers `tokenizer.json`, via the `tokenizers` library (installed with transformers)."""

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise ValueError(f"{path}: reading tokenizer.json needs the `tokenizers` package "
                             "(pip install tokenizers), or provide a SentencePiece tokenizer.model") from None
        try:
            self.tk = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            try:  # valid JSON of another kind (a config.json) got "expected `,` or `}` at line 2 column 18"
                other = not isinstance(json.loads(path.read_bytes()).get("model"), dict)
            except (ValueError, AttributeError, OSError):
                other = False
            why = ("a JSON file but not a tokenizer.json (no 'model' table): pass a tokenizer.json or a "
                   "SentencePiece tokenizer.model, or the folder holding one" if other
                   else f"not a readable tokenizer.json: {e}")
            raise ValueError(f"{path}: {why}") from None
        self.vocab_size = int(self.tk.get_vocab_size(with_added_tokens=True))
        # Text that spells "<s>" stays text, as with SentencePiece (no special tokens smuggled in by prompts).
        self.tk.encode_special_tokens = True
        names = {"bos": "<s>", "eos": "</s>"}
        config = path.with_name("tokenizer_config.json")
        if config.is_file():
            try:
                cfg = json.loads(config.read_text(encoding="utf-8"))
            except ValueError as e:  # it said "Expecting value: line 1 column 1 (char 0)", of no file
                raise ValueError(f"{config}: not valid UTF-8 JSON ({e})") from None
            if not isinstance(cfg, dict):
                raise ValueError(f"{config}: expected a JSON object of tokenizer settings, got {type(cfg).__name__}")
            for key in names:
                tok = cfg.get(f"{key}_token")
                if isinstance(tok, dict):  # older files store AddedToken dicts
                    tok = tok.get("content")
                if isinstance(tok, str):
                    names[key] = tok
        ids: dict[str, int] = {}
        for key, name in names.items():
            i = self.tk.token_to_id(name)
            if i is None:
                raise ValueError(f"{path}: no {key.upper()} token {name!r} in the vocabulary")
            ids[key] = int(i)
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]

    def encode(self, text: str) -> list[int]:
        # encode_batch lets go of the GIL while it works (encode holds it: 3 MB of text froze every other
        # thread, a server's event loop too, for 6 s); the same ids
        return list(self.tk.encode_batch([text], add_special_tokens=False)[0].ids)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return str(self.tk.decode(list(ids), skip_special_tokens=skip_special))

    def id_to_piece(self, i: int) -> str:
        return str(self.tk.id_to_token(i))

    def special_id(self, piece: str) -> int | None:
        i = self.tk.token_to_id(piece)
        return None if i is None else int(i)


class _Bytes:
    """UTF-8 bytes as tokens, as `mixlab train`'s default `bytes` tokenizer writes them: id = byte +
    offset, 1 BOS, 2 EOS (named by a model's `mixlab_data.json`)."""

    bos_id, eos_id = 1, 2

    def __init__(self, offset: int, vocab_size: int) -> None:
        self.offset, self.vocab_size = offset, vocab_size

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:  # BOS / EOS have no names: no text
        off = self.offset
        return bytes(i - off for i in ids if off <= i < off + 256).decode("utf-8", errors="replace")

    def id_to_piece(self, i: int) -> str:
        return f"<0x{i - self.offset:02X}>" if self.offset <= i < self.offset + 256 else f"<special {i}>"

    def special_id(self, piece: str) -> int | None:
        return None


def _from_mixlab_data(f: Path) -> Tokenizer | None:
    """The tokenizer a trained model's `mixlab_data.json` names (as `mixlab.corpus.get_tokenizer` reads
    it): the `bytes` one, Mixtral's (`mixtral`: this installation's file, wherever the data was
    prepared), or a tokenizer file."""
    try:
        spec = json.loads(f.read_text(encoding="utf-8"))["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise ChatError(f"{f}: no readable 'tokenizer' entry") from None
    if isinstance(spec, dict) and spec.get("type") == "bytes":
        return Tokenizer(_Bytes(int(spec.get("offset", 3)), int(spec.get("vocab_size", 259))), path=f)
    if isinstance(spec, dict) and spec.get("type") == "file":
        if spec.get("name") == "mixtral":  # its path is mistral-common's in the venv that prepared the data
            return load_tokenizer()
        if not Path(str(spec.get("path"))).exists():  # a file, or a folder holding one (data prepare takes both)
            raise FileNotFoundError(f"{f}: the model's tokenizer, {spec.get('path')}, is not there; copy it "
                                    "into this folder as tokenizer.model (or pass the tokenizer)")
        return load_tokenizer(spec["path"])
    return None


# A checkpoint folder's files that carry its tokenizer, chat template and generation defaults, copied beside the
# weights mixlab writes from it (upcycle's MoE folder, fine-tuning's hf/), so that transformers, vLLM or `mixlab
# serve` load that folder with them; Mistral's `tokenizer.model.v*` too (`tokenizer_file`).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


def tokenizer_files(folder: Path) -> list[Path]:
    """The files of `TOKENIZER_FILES` (and `tokenizer.model.v*`) that `folder` holds."""
    return [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()] + sorted(folder.glob("tokenizer.model.v*"))


def _other_chat_template(folder: Path) -> str | None:
    """The file of `folder` (a checkpoint's) that gives it a chat template other than Mixtral-Instruct's,
    one that writes no `[INST]` (ChatML's `<|im_start|>`, as Nous-Hermes-2-Mixtral's and Dolphin's
    fine-tunes): transformers' `chat_template.jinja`, `chat_template.json` or `tokenizer_config.json`'s
    `chat_template` (a string, or named templates of which "default" is used). None when there is none."""
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        f = folder / name
        try:
            text = f.read_text(encoding="utf-8")
            template = text if name.endswith(".jinja") else json.loads(text).get("chat_template")
        except (OSError, ValueError, AttributeError):  # absent or unreadable: not a template
            continue
        if isinstance(template, list):
            template = next((t.get("template") for t in template if isinstance(t, dict)
                             and t.get("name") == "default"), None)
        if isinstance(template, str):
            return None if "[INST]" in template else str(f)
    return None


class Tokenizer:
    """Encode and decode text, and encode chats with the Mixtral-Instruct template."""

    def __init__(self, backend: _Backend, *, path: Path) -> None:
        self._b = backend
        self.path = path
        self.vocab_size = backend.vocab_size
        self.bos_id = backend.bos_id
        self.eos_id = backend.eos_id
        # where the checkpoint gives a chat template other than the one encode_chat writes (warned once)
        self.other_template: str | None = None
        self.chat_version = _chat_version(backend, path)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS first (`bos=False`: without) and EOS last when `eos`."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        check_text(text)
        ids = self._b.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (one sequence); BOS/EOS and other control tokens are dropped (`skip_special_tokens`
        False: written as their names, `<s>`, `[INST]`, as transformers' `decode` writes them; the bytes
        tokenizer's have none)."""
        # Not int(i): that decoded "123" as the ids 1, 2, 3 and 15359.9 as 15359, silently.
        if isinstance(ids, str | bytes):
            raise ValueError(f"decode takes token ids, not a {type(ids).__name__}")
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError:
            raise ValueError("decode takes one sequence of integer token ids (for generate's output, one "
                             "prompt's: tok.decode(out[0]))") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self._b.decode(ids, skip_special_tokens)

    def id_to_piece(self, i: int) -> str:
        """The vocabulary's piece for id `i` (`▁the`, `<0xE4>`, `</s>`)."""
        return self._b.id_to_piece(i)

    def special_id(self, piece: str) -> int | None:
        """The id of the control token `piece` (`[TOOL_CALLS]`), or None where it is not one."""
        return self._b.special_id(piece)

    def piece_byte(self, i: int) -> int | None:
        """The byte a byte-fallback piece (`<0xE4>`) stands for; None for any other token."""
        m = _BYTE_PIECE.fullmatch(self._b.id_to_piece(i))
        return int(m.group(1), 16) if m else None

    def stream(self, *, context: Sequence[int] = (), skip_special_tokens: bool = True) -> StreamDecoder:
        """An incremental decoder; `context` (e.g. the prompt's last tokens) fixes leading spaces;
        `skip_special_tokens` False: control tokens are text too (`decode`'s)."""
        return StreamDecoder(self, context=context, skip_special_tokens=skip_special_tokens)

    def encode_chat(self, messages: Sequence[Mapping[str, object]], *,
                    tools: Sequence[Mapping[str, object]] | None = None) -> list[int]:
        """Token ids of a conversation, ready for the model to write the next assistant reply.

        `messages`: `{"role": "system" | "user" | "assistant", "content": str}` dicts; the last must
        be a user message, or an assistant message with `"prefix": True` (the reply continues it).
        With a v2/v3 tokenizer, OpenAI's function calling too: assistant messages with `tool_calls`
        (`[{"id", "type": "function", "function": {"name", "arguments"}}]`), `{"role": "tool", "content",
        "tool_call_id"}` results (the last message may be one), and `tools`, OpenAI's `[{"type": "function",
        "function": {"name", "description", "parameters"}}]`; v3 writes an id of 9 letters and digits as it is and
        any other as `template_call_id` maps it. Equal to mistral-common's `encode_chat_completion` with the
        instruct tokenizer of this tokenizer's version (`chat_version`), of the conversation with those ids.
        """
        return [self.bos_id] + [i for _, ids in self.chat_turns(messages, tools=tools) for i in ids]

    def chat_turns(self, messages: Sequence[Mapping[str, object]], *,
                   tools: Sequence[Mapping[str, object]] | None = None) -> list[tuple[str, list[int]]]:
        """`encode_chat(messages, tools=tools)` less its BOS, turn by turn: (role, ids) for each user turn
        (with its markers), assistant turn (with its `</s>`, unless it is a prefix) and tool result, as
        `sft` masks them."""
        if self.chat_version == 7:
            raise ChatError(f"{self.path} defines [SYSTEM_PROMPT] (Mistral's v7 chat template); the v1, v2 and v3 "
                            "templates are implemented: use mistral-common for this one")
        if tools and self.chat_version == 1:
            raise ChatError(f"tools need a tokenizer with Mistral's v2/v3 template (control tokens [AVAILABLE_TOOLS], "
                            f"[TOOL_CALLS]); {self.path}'s is v1 (Mixtral 8x7B Instruct was not trained on tools)")
        if self.other_template is not None:
            warnings.warn(f"{self.other_template} gives this model another chat template than Mixtral-Instruct's "
                          "(it writes no [INST]); chats are encoded with Mixtral-Instruct's, which the model may not "
                          "have been trained on", stacklevel=3)
            self.other_template = None  # once
        system, turns = _normalize_chat(messages, self.chat_version)
        out: list[tuple[str, list[int]]] = []
        if self.chat_version == 1:
            # [INST] is text; the system prompt goes into the first user turn
            first_user = next(k for k, t in enumerate(turns) if t.role == "user")
            for k, t in enumerate(turns):
                if t.role == "user":
                    content = system + "\n\n" + t.content if k == first_user and system else t.content
                    out.append(("user", self.encode(f"[INST] {content} [/INST]", bos=False)))
                else:
                    out.append(("assistant", self.encode(t.content, bos=False, eos=not t.prefix)))
            return out
        # v2/v3 (InstructTokenizerV2/V3): [INST] and [/INST] are control tokens around the text; the system
        # prompt and the tools go into the *last* user turn; an assistant reply loses its trailing spaces; v2
        # leaves out the tool calls and results before the last user turn, v3 writes their ids
        special = {name: self._b.special_id(name) for name in _V3_MARKERS}
        if None in special.values():
            missing = [name for name, i in special.items() if i is None]
            raise ChatError(f"{self.path} defines [INST] as a control token but not {', '.join(missing)}")
        c = {name: int(i) for name, i in special.items() if i is not None}
        last_user = max(k for k, t in enumerate(turns) if t.role == "user")
        v3 = self.chat_version == 3
        if self.chat_version == 2:  # as InstructTokenizerV2._validate_tool_results
            calls_made, results = False, 0
            for t in turns[last_user:]:
                calls_made, results = (bool(t.calls), 0) if t.role != "tool" else (calls_made, results + calls_made)
                if results > 1:
                    raise ChatError("Mistral's v2 template takes one tool result per assistant turn of tool calls "
                                    "after the last user message (v3 takes several)")
        for k, t in enumerate(turns):
            ids: list[int] = []
            if t.role == "user":
                content = system + "\n\n" + t.content if k == last_user and system else t.content
                if k == last_user and tools:
                    ids += [c["[AVAILABLE_TOOLS]"], *self.encode(_tools_json(tools), bos=False),
                            c["[/AVAILABLE_TOOLS]"]]
                ids += [c["[INST]"], *self.encode(content, bos=False), c["[/INST]"]]
            elif t.role == "tool" and (v3 or k > last_user):
                result = ({"content": _json_value(t.content), "call_id": t.call_id} if v3
                          else [{"name": t.name, "content": _json_value(t.content)}])
                ids += [c["[TOOL_RESULTS]"], *self.encode(json.dumps(result, ensure_ascii=False), bos=False),
                        c["[/TOOL_RESULTS]"]]
            elif t.calls and (v3 or k > last_user):
                calls = [{"name": f["name"], "arguments": _json_value(str(f["arguments"])),
                          **({"id": f["id"]} if v3 and f["id"] is not None else {})} for f in t.calls]
                ids += [c["[TOOL_CALLS]"], *self.encode(json.dumps(calls, ensure_ascii=False), bos=False,
                                                        eos=not t.prefix)]
            elif t.role == "assistant" and not t.calls:
                ids += self.encode(t.content.rstrip(" "), bos=False, eos=not t.prefix)
            out.append((t.role, ids))
        return out

    def encode_chat_within(self, messages: Sequence[Mapping[str, object]], room: int, keep: int = 1, *,
                           tools: Sequence[Mapping[str, object]] | None = None) -> tuple[list[int], int]:
        """`encode_chat(messages)` less the oldest whole turns (a user message and what follows it up to the
        next one) that it takes to fit in `room` tokens, as `mixlab chat` and the Responses API's truncation
        "auto" forget a long conversation's start. System messages and the last `keep` messages (the newest
        input) are never dropped, so the ids may still exceed `room`. Returns the ids and how many messages were
        dropped. The fewest turns are found by bisection (dropping more never lengthens the prompt): a few
        encodings of the conversation, however many turns it has. `tools`: as `encode_chat`'s (never dropped)."""
        ids = self.encode_chat(messages, tools=tools)
        if len(ids) <= room:
            return ids, 0
        end = len(messages) - keep
        # a cut at j drops every message before j but the system ones; cuts at turn starts, and at the kept tail
        cuts = [j for j in range(1, end) if messages[j]["role"] == "user"] + [end]

        def cut(j: int) -> list[Mapping[str, object]]:
            return [m for k, m in enumerate(messages) if k >= j or m["role"] == "system"]

        lo, hi, best = 0, len(cuts) - 1, None  # the first cut that fits, if one does: the last one otherwise
        while lo <= hi:
            mid = (lo + hi) // 2
            tried = self.encode_chat(cut(cuts[mid]), tools=tools)
            if len(tried) <= room:
                best, hi = (mid, tried), mid - 1
            else:
                lo = mid + 1
        j, ids = best if best is not None else (len(cuts) - 1, self.encode_chat(cut(cuts[-1]), tools=tools))
        return ids, sum(m["role"] != "system" for m in messages[:cuts[j]])


def _chat_version(backend: _Backend, path: Path) -> int:
    """Which of mistral-common's instruct templates a tokenizer's chats take: 1 (Mixtral 8x7B: `[INST]`
    is text), 2 or 3 (Mixtral 8x22B, Mistral 7B v0.3: `[INST]`, `[/INST]` and the tool markers are
    control tokens), or 7 (`[SYSTEM_PROMPT]` too: not implemented). v2 and v3 files define the same
    markers (their chats differ only in tool calls), so only a name ending in `.v2` (mistral-common's
    own name for its files) makes one v2: the open-weights models of this template are v3."""
    if backend.special_id("[INST]") is None:
        return 1
    if backend.special_id("[SYSTEM_PROMPT]") is not None:
        return 7
    return 2 if path.name.endswith(".v2") else 3


_V3_MARKERS = ("[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]",
               "[/TOOL_RESULTS]")


def _json_value(text: str) -> object:
    """A tool call's arguments or a tool's result as the template writes them: parsed when JSON, else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _tools_json(tools: Sequence[Mapping[str, object]]) -> str:
    """OpenAI's `tools` as mistral-common writes them in [AVAILABLE_TOOLS] (its `Tool.model_dump`)."""
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise ChatError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}}, not a "
                        f"{type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" or not isinstance(fn, Mapping):
            raise ChatError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name', 'description', "
                            f"'parameters'}}}}, got {tool!r}")
        name, params = fn.get("name"), fn.get("parameters", {})
        if not (isinstance(name, str) and _NAME.fullmatch(name)):
            raise ChatError(f"tools[{i}]: function name {name!r} must be 1 to 64 of a-z, A-Z, 0-9, _ and -")
        if not isinstance(params, Mapping) or not isinstance(fn.get("description", ""), str):
            raise ChatError(f"tools[{i}]: 'parameters' must be a JSON Schema object and 'description' a string")
        out.append({"type": "function", "function": {"name": name, "description": fn.get("description", ""),
                                                      "parameters": params}})
    try:
        return json.dumps(out, ensure_ascii=False)
    except (TypeError, ValueError) as e:  # a set or an object among the parameters: not JSON
        raise ChatError(f"tools: the parameters are not JSON ({e})") from None


class _Turn(NamedTuple):
    """One turn of a normalized conversation: a run of user or assistant messages, or one tool result."""

    role: str
    content: str
    prefix: bool = False
    calls: tuple[Mapping[str, object], ...] = ()  # an assistant turn's tool calls: {"name", "arguments", "id"}
    call_id: str = ""  # a tool result's
    name: str | None = None  # a tool result's function (v2 writes it)


_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # a function's name, as mistral-common's validator takes it
_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")  # a v3 tool call's id
# mistral-common's id of a call that has none (ToolCall's default; mistral-finetune's last assistant message):
# InstructTokenizerV3 writes such a call without an "id" key, not as an id.
_NULL_CALL_ID = "null"
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def tool_call_id_ok(call_id: object, version: int) -> bool:
    """Whether a chat template of `version` takes `call_id` as a tool call's id: v3's, a non-empty string (written
    as `template_call_id` makes it); v2 writes none."""
    return version < 3 or isinstance(call_id, str) and call_id != ""


def template_call_id(call_id: str) -> str:
    """A tool call's id as Mistral's v3 template writes it: 9 letters and digits (mistral-common's rule, and what the
    model writes) stay as they are; any other id (OpenAI's `call_` + 24, an agent framework's own) becomes 9 base-62
    digits of its SHA-256, so a call and the result that names it keep matching, in every request that carries
    them. vLLM keeps the last 9 characters instead (`truncate_tool_call_ids`), which can leave a `_` or `-` (still
    not an id), keeps a short id short, and gives ids that share their tail (`run1_call_000000001`,
    `run2_call_000000001`) one id; two ids a hash maps to one are refused by `encode_chat`, not merged."""
    if _CALL_ID.fullmatch(call_id):
        return call_id
    n = int.from_bytes(hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).digest()[:16], "big")
    digits = []
    for _ in range(9):
        n, d = divmod(n, 62)
        digits.append(_BASE62[d])
    return "".join(digits)


def _json_text(text: str) -> str:
    """mistral-common's normalized JSON text: re-dumped when it parses, `{}` when empty, else as is."""
    try:
        return json.dumps(json.loads(text), ensure_ascii=False) if text else "{}"
    except ValueError:
        return text


def _written_id(call_id: str, i: int, written: dict[str, str]) -> str:
    """`template_call_id(call_id)` of message `i`; `written`: the conversation's so far (written id -> id), where two
    ids that one id would stand for are a ChatError naming both (their calls and results would pair wrongly)."""
    out = template_call_id(call_id)
    other = written.setdefault(out, call_id)
    if other != call_id:
        raise ChatError(f"message {i}: tool call ids {other!r} and {call_id!r} are both written {out!r} (Mistral's v3 "
                        "template writes 9 letters and digits; other ids are hashed to them): rename one")
    return out


def _tool_calls(m: Mapping[str, object], i: int, version: int, written: dict[str, str], *,
                last: bool = False) -> tuple[Mapping[str, object], ...]:
    """An assistant message's OpenAI `tool_calls` as the template writes them (arguments normalized, v3's ids as
    `_written_id` makes them)."""
    calls = m.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ChatError(f"message {i}: 'tool_calls' must be a list of calls, got {type(calls).__name__}")
    out = []
    for c in calls:
        fn = c.get("function") if isinstance(c, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ChatError(f"message {i}: each tool call must be {{'id': ..., 'type': 'function', 'function': "
                            f"{{'name': str, 'arguments': str}}}}, got {c!r}")
        assert isinstance(c, Mapping)
        name, args, call_id = str(fn["name"]), fn.get("arguments", ""), c.get("id")
        if not _NAME.fullmatch(name):
            raise ChatError(f"message {i}: tool call name {name!r} must be 1 to 64 of a-z, A-Z, 0-9, _ and -")
        if not tool_call_id_ok(call_id, version):
            raise ChatError(f"message {i}: tool call id {call_id!r} must be a non-empty string (Mistral's v3 template "
                            "writes each call's id)")
        if version >= 3 and call_id == _NULL_CALL_ID:
            if not last:  # a result could not name it: mistral-common refuses it there in every mode
                raise ChatError(f"message {i}: tool call id 'null' (mistral-common's 'no id') is taken only on the "
                                "last message; give the call an id its tool result can name")
            call_id = None  # mistral-common's ToolCall default: the call is written without an id
        elif version >= 3:
            assert isinstance(call_id, str)
            call_id = _written_id(call_id, i, written)
        try:
            args = json.dumps(args, ensure_ascii=False) if isinstance(args, Mapping) else args
        except (TypeError, ValueError) as e:
            raise ChatError(f"message {i}: tool call arguments are not JSON ({e})") from None
        if not isinstance(args, str):
            raise ChatError(f"message {i}: tool call arguments must be a JSON string, got {type(args).__name__}")
        out.append({"name": name, "arguments": _json_text(args), "id": call_id})
    return tuple(out)


def _normalize_chat(messages: Sequence[Mapping[str, object]], version: int = 1) -> tuple[str, list[_Turn]]:
    """Validate a conversation as mistral-common does and return (system prompt, merged turns).

    Consecutive messages of one role are joined with a blank line (an assistant run's tool calls too); each
    tool result is a turn of its own; system messages are collected into one prompt (empty ones skipped); a
    conversation that does not start with a user turn gets an empty one. Every assistant message must have
    content or tool calls, not both. `version`: the template's (tool calls and results need 2 or 3).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ChatError("a chat is a non-empty list of {'role': ..., 'content': ...} messages")
    allowed_next = {"system": {"user", "assistant", "system"}, "user": {"user", "assistant", "system"},
                    "assistant": {"user", "assistant", "tool"}, "tool": {"user", "assistant", "tool"}}
    previous, pending = None, 0  # tool results still owed to the last assistant turn's calls
    calls: list[tuple[Mapping[str, object], ...]] = []
    written: dict[str, str] = {}  # v3: each call id written (`template_call_id`) -> the id sent
    result_ids: dict[int, str] = {}  # v3: each tool result's written call id, by message
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, Mapping) else None
        tool_calls = role == "assistant" and isinstance(m, Mapping) and m.get("tool_calls")
        if (not isinstance(m, Mapping) or not isinstance(role, str)
                or not (isinstance(m.get("content"), str) or tool_calls and m.get("content") is None)):
            raise ChatError(f"message {i} must be a dict with a str 'role' and a str 'content', got {m!r}")
        content = str(m.get("content") or "")
        check_text(content, f"message {i}'s content")  # its own position, not the template's
        if role not in allowed_next:
            raise ChatError(f"message {i} has role {role!r}; expected 'system', 'user', 'assistant' or 'tool'")
        if (role == "tool" or tool_calls) and version == 1:
            raise ChatError(f"message {i}: tool calls and results need a tokenizer with Mistral's v2/v3 template "
                            "(control tokens [TOOL_CALLS], [TOOL_RESULTS]); this one's is v1")
        if role == "assistant" and bool(content) == bool(tool_calls):  # an empty system or user message is fine
            raise ChatError(f"message {i}: an assistant message must have content" +
                            (" or tool_calls, not both" if version > 1 else ""))
        calls.append(_tool_calls(m, i, version, written, last=i == len(messages) - 1) if tool_calls else ())
        if role == "tool":
            call_id, name = m.get("tool_call_id"), m.get("name")
            if not tool_call_id_ok(call_id, version):
                raise ChatError(f"message {i}: a tool result's 'tool_call_id' must be its call's id, a non-empty "
                                f"string (Mistral's v3 template writes it), got {call_id!r}")
            if version >= 3 and call_id == _NULL_CALL_ID:  # refused by mistral-common's v3 in every mode
                raise ChatError(f"message {i}: a tool result's 'tool_call_id' 'null' (mistral-common's 'no id') names "
                                "no call: a call without an id is taken only as the last message; give the call "
                                "and its result an id")
            if version >= 3:
                assert isinstance(call_id, str)
                result_ids[i] = _written_id(call_id, i, written)
            if name is not None and not (isinstance(name, str) and _NAME.fullmatch(name)):
                raise ChatError(f"message {i}: tool name {name!r} must be 1 to 64 of a-z, A-Z, 0-9, _ and -")
        if m.get("prefix") and (role != "assistant" or i != len(messages) - 1):
            raise ChatError(f"message {i}: only the last message, an assistant one, may have prefix=True")
        if previous is not None and role not in allowed_next[previous]:
            raise ChatError(f"message {i}: role {role!r} cannot follow role {previous!r}")
        if previous is not None and role == "tool":
            pending -= 1
        elif previous is not None and role == "assistant":
            if pending:
                raise ChatError(f"message {i}: the tool calls before it and the tool results after them differ in "
                                "number (each call takes one 'tool' message before the next assistant message)")
            pending = len(calls[i])
        previous = role
    last = messages[-1]
    if len(messages) == 1 and last["role"] not in ("user", "system"):
        raise ChatError("a conversation must start with a user or system message")
    if len(messages) > 1 and last["role"] not in ("user", "system", "tool") and not last.get("prefix"):
        raise ChatError(f"the last message must be a user message (or an assistant one with prefix=True), "
                        f"got role {last['role']!r}")

    system = "\n\n".join(str(m["content"]) for m in messages if m["role"] == "system" and m["content"])
    turns: list[_Turn] = []
    run: list[int] = []  # indices of a run of messages of one role
    for j in [*range(len(messages)), -1]:
        role = str(messages[j]["role"]) if j >= 0 else "<end>"
        if run and (role != messages[run[0]]["role"] or role == "tool"):
            first = messages[run[0]]
            if first["role"] == "tool":
                turns.append(_Turn("tool", _json_text(str(first["content"])),
                                   call_id=result_ids.get(run[0], str(first.get("tool_call_id"))),
                                   name=first.get("name")))  # type: ignore[arg-type]  # str or None: checked
            elif first["role"] != "system":  # system runs leave the turns untouched
                text = "\n\n".join(str(messages[k]["content"]) for k in run if messages[k]["content"])
                if text and any(calls[k] for k in run):
                    raise ChatError(f"messages {run[0]} to {run[-1]}: consecutive assistant messages are one turn, "
                                    "which cannot have both content and tool calls")
                turns.append(_Turn(str(first["role"]), text, any(bool(messages[k].get("prefix")) for k in run),
                                   tuple(c for k in run for c in calls[k])))
            run = []
        run.append(j)
    if not turns or turns[0].role != "user":
        turns.insert(0, _Turn("user", ""))
    return system, turns


class StreamDecoder:
    """Turns tokens into text as they arrive, never emitting half a character.

    Decoding token by token is wrong twice over: SentencePiece drops the leading space of the
    first piece it decodes, and byte-fallback pieces (`<0xE4>`) carry a fraction of a UTF-8
    character. So, like text-generation-inference's incremental detokenizer, we decode a short
    window twice (before and after the new token) and emit the difference once it no longer ends
    in U+FFFD, or once that U+FFFD is final: the byte pieces the window ends with are invalid
    UTF-8 whatever follows (a lone continuation byte, say), not the start of a character still
    being spelled. Holding those too would stall a stream for as long as a model emits bad
    bytes (and decode an ever longer window). `"".join(pushes) + flush()` equals
    `decode(context + tokens)` minus the context's text (minus the part they share, when the context
    ends mid-character: the character the tokens complete is theirs). An id past the tokenizer's
    vocabulary (a model's padded one: 32768 rows over Mixtral's 32000 tokens) has no text, as
    transformers decodes it: it is skipped, here and in the context.
    """

    def __init__(self, tokenizer: Tokenizer, *, context: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids = [int(i) for i in context if int(i) < tokenizer.vocab_size]
        self.prefix = 0  # window start: the text of ids[prefix:read] has been emitted
        # A context that ends mid-character (a prompt cut by token count, a reply continued): its last
        # byte pieces are not text yet, so the character the new tokens complete is theirs (it was
        # lost); `shown`, the context's own text with its U+FFFD, keeps that U+FFFD from being sent twice.
        shown = self._decode(self.ids)
        pending = self._pending_bytes() if shown.endswith(_REPLACEMENT) else None
        self.read = len(self.ids) - (pending or 0)
        self.shown = shown if pending else None

    def _decode(self, ids: Sequence[int]) -> str:
        # the keyword only when asked: StreamDecoder also serves tokenizer-like objects whose decode takes ids alone
        return self.tok.decode(ids) if self.skip else self.tok.decode(ids, skip_special_tokens=False)

    def push(self, token: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        if int(token) >= self.tok.vocab_size:  # a padded vocabulary's row: no text
            return ""
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and (not after.endswith(_REPLACEMENT) or self._pending_bytes() == 0):
            self.prefix, self.read = self.read, len(self.ids)
            return self._new_text(before, after)
        return ""

    def _pending_bytes(self) -> int | None:
        """How many of the byte pieces ending the window start a character still being spelled (0-3;
        0: the bytes are settled, whatever follows cannot change their text); None when the window
        does not end in byte pieces (a U+FFFD of some other origin stays held, as before). A pending
        character starts at a lead byte among the last three bytes, so those decide."""
        tail = bytearray()
        for i in reversed(self.ids[self.prefix :]):
            b = self.tok.piece_byte(i)
            if b is None:
                break
            tail.insert(0, b)
            if len(tail) == 3:
                break
        if not tail:
            return None
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        dec.decode(bytes(tail), final=False)
        return len(dec.getstate()[0])  # the bytes kept back for a character still to come

    def _new_text(self, before: str, after: str) -> str:
        start = len(before)
        if self.shown is not None:  # the first text after a context that ended mid-character
            start = max(start, len(os.path.commonprefix([after, self.shown])))
            self.shown = None
        return after[start:]

    def flush(self) -> str:
        """Text still held back (e.g. an incomplete byte sequence at the end)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return self._new_text(before, after)


def check_tokenizer(tokenizer: object, vocab_size: int | None = None) -> None:
    """ValueError unless `tokenizer` is None or streams text as a `Tokenizer` does: a path, or a
    transformers tokenizer, passed as `tokenizer=` fails here with what to pass, not with an
    AttributeError at the first request. `vocab_size`: the model's; a tokenizer with more tokens is
    another model's (as the CLI says; its text of the model's ids is not the model's, and was
    streamed without a word). Fewer is fine: checkpoints pad their vocabularies."""
    if tokenizer is not None and not callable(getattr(tokenizer, "stream", None)):
        hint = f" (load it: mixlab.load_tokenizer({str(tokenizer)!r}))" if isinstance(tokenizer, str | Path) else ""
        raise ValueError(f"tokenizer= takes a mixlab Tokenizer (mixlab.load_tokenizer()) or None, not "
                         f"{type(tokenizer).__name__}{hint}")
    n = getattr(tokenizer, "vocab_size", None)
    if vocab_size is not None and isinstance(n, int) and n > vocab_size:
        raise ValueError(f"tokenizer= has {n} tokens but the model's vocabulary has {vocab_size}: it is another "
                         f"model's tokenizer (mixlab.load_tokenizer(checkpoint) loads the checkpoint's own)")


def default_tokenizer_path() -> Path:
    """Mixtral's v1 SentencePiece model inside the installed mistral-common package."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def tokenizer_file(folder: Path) -> Path | None:
    """The tokenizer file of a checkpoint folder: its `tokenizer.model`, `tokenizer.model.v1` or
    `tokenizer.json`, else a versioned SentencePiece file of Mistral's (`tokenizer.model.v3`, the only
    one in Mistral 7B v0.3's download: its vocabulary is not Mixtral's); None when there is none.
    In a Mistral-format folder (`params.json`) a SentencePiece file comes before `tokenizer.json`, as
    mistral-inference reads that file alone: a converted folder's tokenizer.json (transformers' Metaspace
    layout) encodes a message that starts with a space other than it. Mistral's Tekken tokenizer
    (`tekken.json`, Mistral NeMo and later) is refused: Mixtral's in its place would give the model other
    text's ids."""
    sentencepiece = [folder / "tokenizer.model", folder / "tokenizer.model.v1"]
    newest = sorted(f for f in folder.glob("tokenizer.model.v*") if f.is_file())[-1:]
    hf = [folder / "tokenizer.json"]
    order = [*sentencepiece, *newest, *hf] if (folder / "params.json").is_file() else [*sentencepiece, *hf, *newest]
    for f in order:
        if f.is_file():
            return f
    if (folder / "tekken.json").is_file():
        raise ValueError(f"{folder / 'tekken.json'}: Mistral's Tekken tokenizer is not supported (SentencePiece "
                         "and tokenizer.json are); pass a tokenizer that is")
    return None


def model_tokenizer(model: str | Path) -> Tokenizer:
    """The tokenizer that goes with the checkpoint `model` loads from: a GGUF file's vocabulary, a
    folder's own tokenizer (as `load_tokenizer` finds it), else Mixtral's v1 (a folder that
    transformers or `mixlab convert` wrote without tokenizer files)."""
    p = Path(model)
    own = suffix_of(p) == ".gguf" or (p.is_dir() and (tokenizer_file(p) or (p / "mixlab_data.json").is_file()))
    return load_tokenizer(p if own else None)


# The tokenizers named rather than given by a path, as every `--tokenizer` takes them (`data prepare`'s
# names: `mixlab.corpus.get_tokenizer`); a file of that name is passed as ./mixtral.
TOKENIZER_NAMES = ("bytes", "mixtral")


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Load a tokenizer from a file (`*.model`, `*.model.v1`, `tokenizer.json`, or a GGUF file's
    metadata) or a checkpoint folder (its tokenizer file, `tokenizer_file`, else the tokenizer its
    `mixlab_data.json` names: a model `mixlab train` exported), or by name (`TOKENIZER_NAMES`):
    "mixtral" (the default: Mixtral's v1 tokenizer) or "bytes" (UTF-8 bytes, as `mixlab data
    prepare`'s default tokenizer writes them)."""
    if path == "bytes":
        from mixlab.corpus import ByteTokenizer

        return Tokenizer(_Bytes(ByteTokenizer.OFFSET, ByteTokenizer.vocab_size), path=Path("bytes"))
    p = default_tokenizer_path() if path in (None, "mixtral") else as_path(path, what="load_tokenizer's path")
    if p.is_dir():
        if (f := tokenizer_file(p)) is not None:
            p = f
        else:
            if (p / "mixlab_data.json").is_file() and (tok := _from_mixlab_data(p / "mixlab_data.json")):
                return tok
            raise FileNotFoundError(f"{p}: no tokenizer.model or tokenizer.json in this folder")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such tokenizer file")
    if suffix_of(p) == ".gguf":
        from mixlab.checkpoint.gguf_read import read_header, sentencepiece_proto

        header = read_header(p)  # once: the vocabulary and the chat template (~70 ms a read)
        tok = Tokenizer(_SentencePiece(p, sentencepiece_proto(p, header)), path=p)
        template = header.metadata.get("tokenizer.chat_template")  # as convert_hf_to_gguf.py copies it
        if isinstance(template, str) and "[INST]" not in template:
            tok.other_template = f"{p}'s tokenizer.chat_template"
        return tok
    backend: _Backend = _HFTokenizers(p) if suffix_of(p) == ".json" else _SentencePiece(p)
    tok = Tokenizer(backend, path=p)
    if path not in (None, "mixtral"):  # a checkpoint's tokenizer file: its folder may say how it chats
        tok.other_template = _other_chat_template(p.parent)
    return tok
