"""Structured outputs: a request's constraint (any JSON object, a JSON schema, a regex, one of some
strings, a Lark/GBNF grammar) as a mask over the next token, with llguidance (the library vLLM and
llama.cpp use; `pip install 'mixlab[serve]'`, imported only when a request asks for a constraint).

`Structured` is the spec a `SamplingParams` carries (compiled and checked when it is made); `Matcher` is
one sequence's state: `mask` sets the logits of the tokens the constraint rules out to -inf before the
row is sampled, `advance` consumes the chosen token and says when nothing more may follow. llguidance
sees the vocabulary through `lltokenizer`: the bytes of each of mixlab's token pieces.

A constraint can fail in the middle of an output: no token of the vocabulary spells what must come next
(a tokenizer without byte fallback), a parser limit of llguidance's is reached, llguidance refuses a token
its own mask allowed. The output then ends there, as in vLLM (whose llguidance backend masks all but EOS
once the matcher fails, and logs the reason): llguidance's mask in that state allows EOS alone, which ends
the output; a token the parser refused (`advance` is False) is dropped, so the output ends with the last
token the constraint accepted. `Matcher.failed` tells why (the engine warns; the finish reason is "stop").
A constraint that fails before its first token is refused by `Structured.prepare`, as invalid.

Shape legend: V vocabulary.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import llguidance

    from mixlab.tokenizer import Tokenizer

__all__ = ["KINDS", "Matcher", "Structured", "lltokenizer"]

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
# JSON without whitespace between its tokens (llguidance's default lets any run of it in, which a model
# can fill until max_tokens); a schema's "x-guidance" options can say otherwise
JSON_DEFAULTS = {"whitespace_flexible": False}


def _llg() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ImportError("structured outputs (JSON mode, schemas, regex, choice, grammars) need llguidance: "
                          "pip install 'mixlab[serve]'") from None
    return llguidance


@dataclass(frozen=True)
class Structured:
    """What a request's output must be: `kind` "json_object" (any JSON object; no `value`),
    "json_schema" (`value`: the schema, a dict or its JSON text), "regex" (`value`: a pattern the whole
    output matches; Rust's regex syntax), "choice" (`value`: a list of strings, the output is one of
    them) or "grammar" (`value`: a Lark grammar, or llama.cpp's GBNF). ValueError when the value is
    not one (its message names the kind and llguidance's reason)."""

    kind: str
    value: Any = None
    grammar: str = field(init=False, repr=False, compare=False)  # llguidance's grammar, compiled from value
    # the grammar built over a tokenizer's vocabulary (`prepare`), which each sequence's `Matcher` copies
    _built: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLMatcher] = field(init=False, repr=False, compare=False)
    _lock: threading.Lock = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"invalid structured kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        llg, v = _llg(), self.value
        shape = {"json_object": (v is None, "nothing (None)"),
                 "json_schema": (isinstance(v, (dict, str)), "a JSON schema (a dict or its JSON text)"),
                 "regex": (isinstance(v, str) and bool(v), "a non-empty regular expression"),
                 "choice": (isinstance(v, (list, tuple)) and bool(v) and all(isinstance(c, str) and c for c in v),
                            "a non-empty list of non-empty strings"),
                 "grammar": (isinstance(v, str) and bool(v.strip()), "a Lark (or GBNF) grammar")}
        ok, expected = shape[self.kind]
        if not ok:
            raise ValueError(f"invalid structured {self.kind}: expected {expected}, got {v!r:.80}")
        try:
            if self.kind in ("json_object", "json_schema"):
                schema = {"type": "object"} if v is None else json.loads(v) if isinstance(v, str) else v
                try:  # llguidance reads them as null: {"enum": [Infinity]} was {"enum": [null]}, silently
                    json.dumps(schema, allow_nan=False)
                except ValueError:
                    raise ValueError("it holds NaN or Infinity, which JSON has no number for") from None
                grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
            elif self.kind == "choice":
                grammar = llg.grammar_from("choice", list(v))
            elif self.kind == "grammar":
                grammar = llg.grammar_from("grammar", v if _is_lark(v) else _gbnf_escapes(v))
            else:
                grammar = llg.grammar_from("regex", v)
        except (ValueError, TypeError, RecursionError) as e:
            raise ValueError(f"invalid structured {self.kind}: {e}") from None
        error = llg.LLMatcher.validate_grammar(grammar)
        if error:
            raise ValueError(f"invalid structured {self.kind}: {' '.join(error.split())[:500]}")
        object.__setattr__(self, "grammar", grammar)
        object.__setattr__(self, "_built", weakref.WeakKeyDictionary())
        object.__setattr__(self, "_lock", threading.Lock())

    def prepare(self, tok: Tokenizer) -> None:
        """Build the grammar over `tok`'s vocabulary now, once (a 10,000-property schema: ~0.5 s, which
        `Engine.submit` then spent for each sequence, on a server's event loop): each sequence's `Matcher`
        copies it (~40 us). ValueError when llguidance cannot build it, or when no token of `tok` can begin
        the output (`choice: ["é"]` over a vocabulary without it)."""
        self._start(tok)

    def _start(self, tok: Tokenizer) -> llguidance.LLMatcher:
        """A matcher at the start of the output: a copy of the one `prepare` built."""
        with self._lock:
            built = self._built.get(tok)
            if built is None:
                llg = _llg()  # errors without the parser's state and the grammar (a page: not for one line)
                built = llg.LLMatcher(lltokenizer(tok), self.grammar, log_level=0,
                                      limits=llg.LLParserLimits(verbose_errors=False))
                if built.is_error():
                    raise ValueError(f"invalid structured {self.kind}: {_one_line(built.get_error())}")
                first = built.deep_copy()  # the first token's mask: an output no token can begin is refused now
                first.compute_bitmask()
                if first.is_error():
                    raise ValueError(f"invalid structured {self.kind}: {_reason(first)} at the start of the output")
                self._built[tok] = built
        return built.deep_copy()


def _is_lark(grammar: str) -> bool:
    from llguidance.gbnf_to_lark import is_lark_syntax  # how llguidance tells Lark from GBNF

    return bool(is_lark_syntax(grammar))


_GBNF_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|.)", re.DOTALL)


def _gbnf_escapes(gbnf: str) -> str:
    """GBNF's `\\u00e9` and `\\U0001F600` escapes (llama.cpp's grammars write them) in a form llguidance's
    GBNF-to-Lark conversion keeps: it wrote `\\ue9`, which its Lark refuses. An ASCII character becomes
    `\\xNN` (it may be a quote or a bracket), any other the character itself (never special in GBNF)."""

    def one(m: re.Match[str]) -> str:
        code = int(m[1] or m[2] or "-1", 16)
        if code < 0 or 0xD800 <= code < 0xE000 or code > 0x10FFFF:  # another escape, or not a character
            return m[0]
        return f"\\x{code:02x}" if code < 0x80 else chr(code)

    return _GBNF_ESCAPE.sub(one, gbnf)


_LLTOKENIZERS: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()
_LLTOKENIZERS_LOCK = threading.Lock()


def _byte_level() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (its `bytes_to_unicode`), character -> byte: printable bytes stand
    for themselves, the others for the characters from U+0100 on, in order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(moved)}


def _token_bytes(tok: Tokenizer) -> tuple[list[bytes], list[int]]:
    """Each token's bytes as llguidance needs them, and the special tokens (no text: BOS, EOS,
    <unk>, control tokens). A byte-fallback piece `<0xNN>` is that byte, SentencePiece's '▁' a space;
    a piece that decodes to other text is its decoded text, or, where that is part of a character (a
    byte-level BPE's piece, `Ã`), the bytes its characters stand for."""
    byte_level = _byte_level()
    pieces: list[bytes] = []
    special: list[int] = []
    for i in range(tok.vocab_size):
        b = tok.piece_byte(i)
        if b is not None:
            pieces.append(bytes([b]))
            continue
        piece = tok.id_to_piece(i)
        text, decoded = piece.replace("▁", " "), tok.decode([i])
        if decoded in (text, text[1:] if text.startswith(" ") else text):  # decoding drops a first space
            pieces.append(text.encode())
        elif i in (tok.bos_id, tok.eos_id) or not decoded or (piece.startswith("<") and piece.endswith(">")):
            pieces.append(piece.encode())  # never text: llguidance marks it special
            special.append(i)
        elif "\ufffd" in decoded and all(c in byte_level for c in piece):
            pieces.append(bytes(byte_level[c] for c in piece))
        else:
            pieces.append(decoded.encode())
    return pieces, special


def lltokenizer(tok: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of `tok` (made once per tokenizer: ~0.2 s for 32k pieces), EOS its end token."""
    with _LLTOKENIZERS_LOCK:
        cached = _LLTOKENIZERS.get(tok)
        if cached is not None:
            return cached
        llg = _llg()
        pieces, special = _token_bytes(tok)
        ids: dict[bytes, int] = {}
        # a byte-fallback piece last: "_" is the piece "_" (as the tokenizer writes it), not <0x5F>, where
        # llguidance spells what the constraint forces (a schema's keys, a tool call's name)
        for i, b in sorted(enumerate(pieces), key=lambda ib: tok.piece_byte(ib[0]) is not None):
            if b and i not in special:
                ids.setdefault(b, i)
        longest = max(map(len, ids), default=1)

        class _Vocab:  # what llguidance.TokenizerWrapper reads
            eos_token_id, bos_token_id = tok.eos_id, tok.bos_id
            tokens, special_token_ids = pieces, special

            def __call__(self, text: bytes) -> list[int]:
                # Tokens spelling exactly `text` (longest match first). Not tok.encode: SentencePiece's
                # adds a space before the text, which llguidance reads as more bytes than it asked for.
                out, i = [], 0
                while i < len(text):
                    for n in range(min(longest, len(text) - i), 0, -1):
                        t = ids.get(text[i : i + n])
                        if t is not None:
                            out.append(t)
                            i += n
                            break
                    else:  # a byte no token spells (a tokenizer without byte fallback)
                        i += 1
                return out

        lt = _LLTOKENIZERS[tok] = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab()))
        return lt


class Matcher:
    """One sequence's constraint: the tokens allowed next (`mask`) and the tokens chosen (`advance`)."""

    def __init__(self, spec: Structured, tok: Tokenizer, vocab_size: int) -> None:
        self.m = spec._start(tok)
        self.vocab_size = vocab_size  # the model's (its logits' width; may exceed the tokenizer's)

    def _bits(self) -> bytes:
        """llguidance's mask: bit `i` of it (little-endian within each byte) says whether token `i` may come
        next; computed once per token (llguidance keeps it until the next `advance`). EOS alone once the
        constraint has `failed`: the output ends."""
        return self.m.compute_bitmask()

    def allows(self, token: int) -> bool:
        """Whether `token` may come next: one bit of the mask (a greedy row whose argmax it allows needs no
        more: the masked row's argmax is the same token)."""
        bits = self._bits()
        return token < 8 * len(bits) and bool(bits[token >> 3] >> (token & 7) & 1)

    def allowed(self) -> torch.Tensor:
        """`[V]` bool: the tokens that may come next (EOS once the output is complete)."""
        bits = self._bits()
        n = min(self.vocab_size, 8 * len(bits))  # the model's tokens past the tokenizer's: never
        allowed_V = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=n, bitorder="little").view(bool)
        if n < self.vocab_size:
            allowed_V = np.concatenate([allowed_V, np.zeros(self.vocab_size - n, dtype=bool)])
        return torch.from_numpy(allowed_V)

    def mask(self, logits_1V: torch.Tensor) -> torch.Tensor:
        """`logits_1V` with the tokens the constraint rules out at -inf."""
        return torch.where(self.allowed().to(logits_1V.device), logits_1V, -torch.inf)

    def advance(self, token: int) -> bool:
        """Consume the chosen token; False where the constraint refused it: llguidance's parser refused a
        token its mask allowed, or reached one of its limits at it. The constraint has then `failed`, and
        the output ends before that token. (The EOS a failed constraint's mask allows alone is taken.)"""
        was_failed = self.m.is_error()
        return bool(self.m.consume_token(token)) or was_failed

    @property
    def complete(self) -> bool:
        """Whether nothing more may follow: the output is complete, or the constraint has `failed`."""
        return bool(self.m.is_stopped())

    @property
    def ending(self) -> bool:
        """Whether the mask allows EOS alone as the constraint has failed: min_tokens then lets EOS be (the
        constraint comes first, as in vLLM; its ban left no token to sample)."""
        self._bits()
        return bool(self.m.is_error())

    @property
    def failed(self) -> str | None:
        """Why the constraint could not go on (llguidance's reason, on one line), or None."""
        return _reason(self.m) if self.m.is_error() else None


# llguidance's stop reasons that are no sentence: what they mean here
REASONS = {"NoExtensionBias": "no token of the vocabulary spells what the constraint needs next"}


def _reason(m: llguidance.LLMatcher) -> str:
    error = _one_line(m.get_error())
    return f"{REASONS[error]} ({error})" if error in REASONS else error


def _one_line(error: str) -> str:
    """llguidance's reason, on one line (a grammar beyond its limits: "Parser Error: Current row has 2007
    items; max is 2000; ...", after a token its mask allowed)."""
    return " ".join(error.split("\n<", 1)[0].split())
