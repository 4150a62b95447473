"""Structured outputs (engine/structured.py and the server's response_format / guided_* parameters): the
output satisfies its constraint, a constrained greedy run equals a reference masked independently (the
`regex` module's partial matches), and bad constraints are clear errors."""

from __future__ import annotations

import io
import json
import math
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("llguidance")
pytest.importorskip("fastapi")
regex = pytest.importorskip("regex")
jsonschema = pytest.importorskip("jsonschema")

from conftest import hf_mixtral, hf_tokenizer_json  # noqa: E402
from mixlab import generate_stream, load_model, load_tokenizer, save_model  # noqa: E402
from mixlab.cli import main  # noqa: E402
from mixlab.config import get_preset  # noqa: E402
from mixlab.engine import Engine, SamplingParams, Structured  # noqa: E402
from mixlab.engine.structured import Matcher, _token_bytes, lltokenizer  # noqa: E402
from mixlab.model import Transformer  # noqa: E402
from mixlab.serve import ServerThread, create_app  # noqa: E402
from test_serve import CHAT, COMP, CONTEXT, NAME, _config, httpx, openai  # noqa: E402

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "colour": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}},
          "required": ["n", "colour", "ok"], "additionalProperties": False}
# 500 objects of 20 integers: compiles, takes ~0.5 s to build over a vocabulary, and outgrows llguidance's parser
HUGE = {"type": "object", "properties": {f"k{i}": {"type": "object", "properties": {
    f"j{j}": {"type": "integer"} for j in range(20)}} for i in range(500)}}


@pytest.fixture(scope="module")
def byte_model() -> tuple[Transformer, Any]:
    """A tiny MoE over the bytes tokenizer: every token is one byte, so a mask can be checked by hand."""
    tok = load_tokenizer("bytes")
    model = Transformer(get_preset("tiny-moe").replace(vocab_size=tok.vocab_size, max_seq_len=512)).eval()
    model.init_weights(std=0.5, seed=0)
    return model, tok


def _run(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], str, Any]:
    handle = engine.submit(prompt, params)
    engine.run_until_idle()
    outs = handle.poll()
    return [o.token_id for o in outs if o.token_id is not None], "".join(o.text for o in outs), outs


@torch.no_grad()
def _masked_greedy(model: Transformer, tok: Any, prompt: list[int], pattern: str, max_tokens: int) -> list[int]:
    """Greedy decoding where a token is allowed when the text with its text (what the tokenizer decodes it
    to after another token: a piece's leading space kept; empty for BOS, EOS and control tokens) can still
    become a full match of `pattern` (the `regex` module's partial matching), EOS when the text is one; it
    ends after a token that nothing can follow. For an ASCII pattern: a piece of a character decodes to
    U+FFFD, which it never matches, as its bytes never match the pattern's."""
    head = tok.decode(tok.encode("a", bos=False))
    texts = [tok.decode([*tok.encode("a", bos=False), i])[len(head):] for i in range(tok.vocab_size)]
    ids, text, out = list(prompt), "", []
    for _ in range(max_tokens):
        logits_V = model(torch.tensor([ids]))[0, -1].float()
        allowed = torch.zeros_like(logits_V, dtype=torch.bool)
        for i, piece in enumerate(texts):
            allowed[i] = bool(piece) and regex.fullmatch(pattern, text + piece, partial=True) is not None
        allowed[tok.eos_id] = regex.fullmatch(pattern, text) is not None
        t = int(logits_V.masked_fill(~allowed, -math.inf).argmax())
        out.append(t)
        ids.append(t)
        if t == tok.eos_id:
            break
        text += texts[t]
        if not any(regex.fullmatch(pattern, text + chr(b), partial=True) for b in range(128)):
            break
    return out


@pytest.mark.parametrize("pattern", ["[a-c]{2,5}x?", "(yes|no|maybe)!", "[0-9]{3}-[0-9]{2}", "[ab]+c"])
def test_greedy_regex_equals_an_independently_masked_reference(byte_model: tuple[Transformer, Any],
                                                               pattern: str) -> None:
    model, tok = byte_model
    prompt = tok.encode("pick: ")
    got, text, outs = _run(Engine(model, tok), prompt, SamplingParams(max_tokens=12,
                                                                          structured=Structured("regex", pattern)))
    assert got == _masked_greedy(model, tok, prompt, pattern, 12)
    assert regex.fullmatch(pattern, text), text
    assert outs[-1].finish_reason == "stop"


def _byte_level_bpe(folder: Any) -> Any:
    """A GPT-2-style tokenizer.json (ByteLevel BPE, 400 tokens) trained on accented, euro-sign, CJK and emoji text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(["héllo wörld € naïve café 日本語 the cat sat on a mat " * 20], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.save(str(folder / "tokenizer.json"))
    return load_tokenizer(folder / "tokenizer.json")


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json", "gguf", "byte-level"])
def test_every_tokenizer_kind_s_greedy_run_equals_the_reference(kind: str, model_tok: tuple[Any, Any],
                                                                 tmp_path: Any) -> None:
    """Each tokenizer mixlab loads, with pieces of several characters and a space inside (Mixtral's '▁the',
    a byte-level BPE's 'Ġthe'): llguidance's table of their bytes gives the same tokens as a reference that
    masks by decoded text. No character of the pattern is ever forced: where one is, llguidance allows only its
    own spelling of it (the piece '.', not also <0x2E>: test_forced_text_is_spelled_...), which the reference
    does not model."""
    model = model_tok[0]
    if kind == "sentencepiece":
        tok = load_tokenizer()  # mistral-common's tokenizer.model.v1
    elif kind == "tokenizer.json":
        tok = model_tok[1]
    elif kind == "gguf":
        from mixlab.checkpoint.gguf import write_gguf

        tok = load_tokenizer(write_gguf(model, tmp_path / "m.gguf", quant="f32"))
    else:
        tok = _byte_level_bpe(tmp_path)
        model = Transformer(get_preset("tiny-moe").replace(vocab_size=tok.vocab_size)).eval()
        model.init_weights(std=0.5, seed=0)
    pattern = "[a-z]{1,6}([ ,][a-z]{1,6}){1,2}[.!]"
    prompt = tok.encode("The cat")
    got, text, outs = _run(Engine(model, tok), prompt, SamplingParams(max_tokens=12,
                                                                          structured=Structured("regex", pattern)))
    assert got == _masked_greedy(model, tok, prompt, pattern, 12)
    assert any(len(tok.decode([t])) > 1 for t in got), [tok.id_to_piece(t) for t in got]  # not byte by byte
    assert regex.fullmatch(pattern, text) and outs[-1].finish_reason == "stop", text


def test_outputs_satisfy_their_constraint(byte_model: tuple[Transformer, Any]) -> None:
    model, tok = byte_model
    with Engine(model, tok, max_batch=8) as engine:
        handles = {}
        for seed in (None, 1, 2):  # greedy and seeded sampling, side by side in one batch
            kw: dict[str, Any] = {"temperature": 1.0, "seed": seed} if seed is not None else {}
            handles[("schema", seed)] = engine.submit(tok.encode("hello"), SamplingParams(
                max_tokens=60, structured=Structured("json_schema", SCHEMA), **kw))
            handles[("choice", seed)] = engine.submit(tok.encode("hello"), SamplingParams(
                max_tokens=10, structured=Structured("choice", ["alpha", "beta", "gamma"]), **kw))
            handles[("grammar", seed)] = engine.submit(tok.encode("hello"), SamplingParams(
                max_tokens=20, structured=Structured("grammar", 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,2}/'),
                **kw))
        # any JSON object: this greedy run closes one within the cap
        handles[("object", None)] = engine.submit(tok.encode("hello"), SamplingParams(
            max_tokens=150, structured=Structured("json_object")))
        results = {k: h.result() for k, h in handles.items()}
    for (kind, seed), outs in results.items():
        text = "".join(o.text for o in outs)
        assert outs[-1].finish_reason == "stop", (kind, seed, text)
        if kind == "schema":
            jsonschema.validate(json.loads(text), SCHEMA)
        elif kind == "object":
            assert isinstance(json.loads(text), dict), text
        elif kind == "choice":
            assert text in ("alpha", "beta", "gamma"), text
        else:
            assert regex.fullmatch(r"\(\d{1,2}(,\d{1,2})*\)", text), text


def test_greedy_rows_keep_their_argmax_where_the_constraint_allows_it(byte_model: tuple[Transformer, Any],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A greedy constrained row whose argmax the mask allows takes it (one bit read, no [V] mask): the tokens
    are those of the masked rows (with logprobs, every row is masked), side by side with seeded rows, whose
    draws are unchanged."""
    model, tok = byte_model
    specs = [Structured("json_schema", SCHEMA), Structured("regex", "[a-z]{3,8}( [a-z]{2,5})*[.]"),
             Structured("choice", ["alpha", "beta", "gamma"]), Structured("json_object"),
             Structured("regex", "[^a]{30}")]
    calls = {"mask": 0, "kept": 0}
    mask, allows = Matcher.mask, Matcher.allows

    def counted_mask(self: Matcher, logits_1V: torch.Tensor) -> torch.Tensor:
        calls["mask"] += 1
        return mask(self, logits_1V)

    def counted_allows(self: Matcher, token: int) -> bool:
        ok = allows(self, token)
        calls["kept"] += ok
        return ok

    monkeypatch.setattr(Matcher, "mask", counted_mask)
    monkeypatch.setattr(Matcher, "allows", counted_allows)

    def run(logprobs: int | None) -> list[list[int]]:
        with Engine(model, tok, max_batch=10) as engine:
            handles = [engine.submit(tok.encode(f"hello {i}"), SamplingParams(
                max_tokens=40, structured=spec, logprobs=logprobs, **kw))
                for i, spec in enumerate(specs) for kw in ({}, {"temperature": 1.0, "seed": i})]
            return [[o.token_id for o in h.result() if o.token_id is not None] for h in handles]

    masked = run(0)
    assert calls == {"mask": sum(map(len, masked)), "kept": 0}  # every token of every row through the mask
    calls.update(mask=0, kept=0)
    assert run(None) == masked
    assert calls["mask"] + calls["kept"] == sum(map(len, masked)) and calls["kept"] >= 10, calls


def test_the_mask_is_the_allowed_set_s(byte_model: tuple[Transformer, Any]) -> None:
    """`Matcher.mask` sets exactly the tokens llguidance rules out to -inf, the model's tokens past the
    tokenizer's too; `allows` reads the same bits."""
    _, tok = byte_model
    m = Matcher(Structured("regex", "[b-d]x|é"), tok, tok.vocab_size + 5)
    logits_1V = torch.randn(1, tok.vocab_size + 5)
    allowed = {ord(c) + 3 for c in "bcd"} | {"é".encode()[0] + 3}
    expected = torch.full_like(logits_1V, -torch.inf)
    expected[0, sorted(allowed)] = logits_1V[0, sorted(allowed)]
    assert torch.equal(m.mask(logits_1V), expected)
    assert [i for i in range(tok.vocab_size + 5) if m.allows(i)] == sorted(allowed)


def test_json_is_written_without_whitespace_unless_its_schema_allows_it(byte_model: tuple[Transformer, Any]) -> None:
    """JSON's tokens follow one another without whitespace (`JSON_DEFAULTS`); a schema's
    `"x-guidance": {"whitespace_flexible": true}` allows it back (docs/serving.md, "Structured outputs")."""
    _, tok = byte_model
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    space, brace = ord(" ") + 3, ord("{") + 3  # the bytes tokenizer: byte b is token b + 3
    for extra, flexible in (({}, False), ({"x-guidance": {"whitespace_flexible": True}}, True)):
        m = Matcher(Structured("json_schema", {**schema, **extra}), tok, tok.vocab_size)
        assert m.allows(brace) and m.advance(brace)
        assert m.allows(space) == flexible, extra


def test_logprobs_are_the_masked_distribution_s(byte_model: tuple[Transformer, Any]) -> None:
    model, tok = byte_model
    spec = Structured("choice", ["yes", "no"])
    _, text, outs = _run(Engine(model, tok), tok.encode("ok? "), SamplingParams(
        max_tokens=5, temperature=1.0, seed=3, logprobs=5, structured=spec))
    first = outs[0]
    assert {t for t, _ in first.top_logprobs} == {ord("y") + 3, ord("n") + 3}  # the only ones allowed
    assert math.isclose(sum(math.exp(lp) for _, lp in first.top_logprobs), 1.0, rel_tol=1e-5)
    assert first.logprob == dict(first.top_logprobs)[first.token_id]
    # after the first letter, the word is forced: probability 1
    assert all(o.logprob == 0.0 and len(o.top_logprobs) == 1 for o in outs[1:] if o.token_id != tok.eos_id)
    assert text in ("yes", "no")


def test_seeded_samples_repeat_and_penalties_and_stop_strings_still_apply(byte_model: tuple[Transformer, Any]) -> None:
    model, tok = byte_model
    spec = Structured("regex", "[a-e]{8}")
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=5, structured=spec)
    engine = Engine(model, tok, max_batch=4)
    a, b = (_run(engine, tok.encode("x"), params)[1] for _ in range(2))
    assert a == b and regex.fullmatch("[a-e]{8}", a)
    # penalties move the choice among the letters the mask allows, never outside them
    _, text, _ = _run(engine, tok.encode("x"), SamplingParams(max_tokens=10, repetition_penalty=10.0,
                                                               presence_penalty=2.0, structured=spec))
    assert regex.fullmatch("[a-e]{8}", text), text
    greedy = _run(engine, tok.encode("x"), SamplingParams(max_tokens=10, structured=spec))[1]
    assert text != greedy  # the penalties changed the choice among the allowed letters
    stop = greedy[3]
    _, text, outs = _run(engine, tok.encode("x"), SamplingParams(max_tokens=10, stop=[stop], structured=spec))
    assert text == greedy[: greedy.index(stop)] and outs[-1].finish_reason == "stop"


def test_bad_constraints_are_value_errors_naming_them(byte_model: tuple[Transformer, Any]) -> None:
    for kind, value, named in [("regex", "[a-", "unclosed character class"), ("json_schema", {"type": "foo"}, "foo"),
                               ("json_schema", "{not json", "json_schema"), ("choice", [], "non-empty list"),
                               ("grammar", "start: (", "grammar"), ("yaml", "x", "yaml"), ("json_object", {}, "None"),
                               # NaN and Infinity (Python's json reads them) were read by llguidance as null
                               ("json_schema", {"enum": [float("inf")]}, "NaN or Infinity"),
                               ("json_schema", '{"type": "number", "maximum": NaN}', "NaN or Infinity")]:
        with pytest.raises(ValueError, match=r"(?s)structured.*" + named.replace("[", r"\[")):
            Structured(kind, value)
    with pytest.raises(ValueError, match="structured"):
        SamplingParams(structured={"type": "json_object"})  # type: ignore[arg-type]
    model, _ = byte_model
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(model).submit([1, 2], SamplingParams(structured=Structured("json_object")))


def test_gbnf_unicode_escapes_are_the_characters_they_name(byte_model: tuple[Transformer, Any]) -> None:
    """llama.cpp's GBNF `\\u00e9` / `\\U0001F600`: llguidance's conversion wrote `\\ue9`, which it then refused."""
    _, tok = byte_model
    spec = Structured("grammar", r'root ::= "caf\u00e9" | [\u3040-\u309f]{2} | "\U0001F600" | "\u0022q\u005D" | "\\u"')
    for text, ok in (("café", True), ("ぁゟ", True), ("\U0001F600", True), ('"q]', True), ("\\u", True),
                     ("cafe", False), ("ぁ", False), ("u0022", False)):
        m = Matcher(spec, tok, tok.vocab_size)
        consumed = all(m.m.consume_token(t) for t in tok.encode(text, bos=False))
        assert (consumed and m.m.is_accepting()) == ok, text


def test_a_grammar_past_llguidance_s_limits_ends_its_output_there_with_a_warning(
        byte_model: tuple[Transformer, Any]) -> None:
    """A 10,000-property schema compiles, then its parser meets llguidance's row limit at `{` (a token its mask
    allowed): the output ends before it, "stop", as vLLM's llguidance backend ends it (EOS alone once the
    matcher fails), with a one-line warning naming the limit (it was a page of parser state, then a failed
    request); the others go on. The `{` it could not take is not part of the output (it was)."""
    model, tok = byte_model
    engine = Engine(model, tok, max_batch=2)
    bad = engine.submit(tok.encode("x"), SamplingParams(max_tokens=5, structured=Structured("json_schema", HUGE)))
    good = engine.submit(tok.encode("x"), SamplingParams(max_tokens=5))
    with pytest.warns(RuntimeWarning, match=r"^request 'req-0': structured output: .*max is 2000.*; the output ends "
                                            r"before its token 1, which it could not take \(finish_reason 'stop'\)$"
                      ) as caught:
        engine.run_until_idle()
    assert "\n" not in str(caught[0].message)
    outs = bad.poll()
    assert [(o.token_id, o.text, o.finish_reason, o.completion_tokens, o.error) for o in outs] == [
        (None, "", "stop", 0, None)]
    assert good.poll()[-1].finish_reason == "length"


def _ascii_tokenizer(folder: Any) -> Any:
    """A tokenizer.json of printable ASCII characters, without byte fallback: no token spells `é`."""
    from tokenizers import AddedToken, decoders
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {chr(c): c - 29 for c in range(32, 127)}
    t = HFTokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    t.decoder = decoders.Fuse()
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ("<unk>", "<s>", "</s>")])
    t.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def ascii_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Transformer, Any, Any]:
    """A tiny MoE over `_ascii_tokenizer`, and the folder holding both."""
    path = tmp_path_factory.mktemp("ascii") / "model"
    tok = _ascii_tokenizer(tmp_path_factory.mktemp("tok"))
    model = Transformer(get_preset("tiny-moe").replace(vocab_size=tok.vocab_size, max_seq_len=512)).eval()
    model.init_weights(std=0.5, seed=0)
    save_model(model, path)
    _ascii_tokenizer(path)  # the checkpoint's own
    return model, tok, path


# constraints whose output reaches a character no token of `_ascii_tokenizer` spells: (spec, what comes first)
UNSPELLABLE = [(Structured("regex", "ab[éè]"), "ab"), (Structured("grammar", 'start: "a" "é"'), "a"),
               (Structured("choice", ["aé", "bé"]), None)]
# llguidance's mask after `{"k":"` allows `"` (it cannot force bytes no token spells), which its parser refuses
REFUSING = {"type": "object", "properties": {"k": {"const": "é"}}, "required": ["k"]}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("ignore_eos,min_tokens", [(False, 0), (True, 0), (False, 6)])
def test_a_constraint_no_token_can_continue_ends_the_output_with_a_warning(
        ascii_model: tuple[Transformer, Any, Any], temperature: float, ignore_eos: bool, min_tokens: int) -> None:
    """The bytes the constraint needs next are no token's: llguidance's matcher fails ("NoExtensionBias"), which
    ended the request with "error" (a 500 through the server, a failed `mixlab generate`). Now the output ends
    there with "stop" and what came before, as vLLM ends it, and a warning says why; the others go on. Under
    min_tokens too, whose ban of EOS left no token (sampled: "probability tensor contains inf"; greedy: token 0
    at logprob -inf): the constraint comes first, as in vLLM."""
    model, tok, _ = ascii_model
    engine = Engine(model, tok, max_batch=4)
    params = {"max_tokens": 8, "temperature": temperature, "seed": 0, "ignore_eos": ignore_eos,
              "min_tokens": min_tokens, "logprobs": 1}
    handles = [engine.submit(tok.encode("x"), SamplingParams(**params, structured=spec)) for spec, _ in UNSPELLABLE]
    plain = engine.submit(tok.encode("x"), SamplingParams(max_tokens=8))
    with pytest.warns(RuntimeWarning) as caught:
        engine.run_until_idle()
    said = sorted(str(w.message) for w in caught)
    assert len(said) == 3 and all("no token of the vocabulary spells what the constraint needs next "
                                  "(NoExtensionBias); the output ends at its token" in w for w in said), said
    for (spec, first), h in zip(UNSPELLABLE, handles, strict=True):
        outs = h.poll()
        text = "".join(o.text for o in outs)
        assert outs[-1].finish_reason == "stop" and outs[-1].error is None, outs[-1]
        assert text == first if first is not None else text in ("a", "b"), (spec, text)
        assert outs[-1].token_id == tok.eos_id  # EOS: llguidance's mask once it has failed
        assert all(math.isfinite(o.logprob) for o in outs), [o.logprob for o in outs]
    assert plain.poll()[-1].finish_reason == "length"


@pytest.mark.parametrize("extra", [{}, {"logprobs": 1, "stop": ["zz"]}, {"return_experts": True}])
def test_a_token_llguidance_allows_then_refuses_ends_the_output_before_it(
        ascii_model: tuple[Transformer, Any, Any], extra: dict[str, Any]) -> None:
    """`{"k": "é"}`: llguidance's mask after `{"k":"` allows `"` (it cannot force bytes no token spells), then
    its parser refuses it ("the constraint failed at token 5", an error). The output ends before it, "stop":
    the refused `"` was kept (`{"k":""`, a token, its logprob and its count too many). A last output without a
    token ends it, with the text held back for a stop string; the tokens, counts, logprobs and experts are
    those of the six tokens the constraint took."""
    model, tok, _ = ascii_model
    with pytest.warns(RuntimeWarning, match=r"structured output: Parser Error: token .* doesn't satisfy the grammar"
                                            r".*; the output ends before its token 7, which it could not take"):
        ids, text, outs = _run(Engine(model, tok), tok.encode("x"), SamplingParams(
            max_tokens=20, structured=Structured("json_schema", REFUSING), **extra))
    assert text == '{"k":"' and ids == tok.encode('{"k":"', bos=False), (text, ids)
    *took, last = outs
    assert (last.token_id, last.logprob, last.finish_reason, last.error, last.completion_tokens) == (
        None, None, "stop", None, 6), last
    assert last.stop_reason.startswith("structured output failed: Parser Error: token "), last
    assert [o.completion_tokens for o in took] == [1, 2, 3, 4, 5, 6]
    assert last.text == ('"' if "stop" in extra else "")  # the last character, held back while "zz" might begin
    assert all((o.logprob is not None and math.isfinite(o.logprob)) == ("logprobs" in extra) for o in took), took
    assert all((o.experts is not None) == ("return_experts" in extra) for o in took) and last.experts is None


def test_a_constraint_no_token_can_begin_is_refused_up_front(ascii_model: tuple[Transformer, Any, Any]) -> None:
    """An output that fails at its first token is an invalid constraint for this vocabulary (a 400 from the
    server, a usage error from the CLI), not a request that ends at once."""
    model, tok, _ = ascii_model
    for spec in (Structured("choice", ["é", "è"]), Structured("regex", "[éè]+")):
        with pytest.raises(ValueError, match=rf"^invalid structured {spec.kind}: no token of the vocabulary spells "
                                             r"what the constraint needs next \(NoExtensionBias\) at the start of"):
            spec.prepare(tok)
        with pytest.raises(ValueError, match="at the start of the output"):
            Engine(model, tok).submit(tok.encode("x"), SamplingParams(structured=spec))
    Structured("choice", ["é", "e"]).prepare(tok)  # one that some token begins is fine


def test_without_llguidance_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(ImportError, match=r"pip install 'mixlab\[serve\]'"):
        Structured("json_object")


def test_token_bytes_come_from_mixlab_s_tokenizer(tmp_path: Any) -> None:
    """SentencePiece pieces: '▁' is a space, <0xNN> a byte, BOS/EOS/<unk> special; a tokenizer.json of the
    same vocabulary gives the same table; llguidance's view is made once per tokenizer."""
    sp = load_tokenizer()
    pieces, special = _token_bytes(sp)
    assert sorted(special) == [0, 1, 2]
    the = sp.encode("the", bos=False)[0]
    assert pieces[the] == b" the" and pieces[sp.encode("\n", bos=False)[-1]] == b"\n"
    assert all(len(pieces[i]) == 1 for i in range(3, 259))  # Mixtral's byte-fallback pieces
    hf = load_tokenizer(hf_tokenizer_json(tmp_path))
    assert _token_bytes(hf) == (pieces, special)
    assert lltokenizer(sp) is lltokenizer(sp) and lltokenizer(sp).eos_token == sp.eos_id


def test_forced_text_is_spelled_with_the_tokenizer_s_pieces_not_byte_fallback() -> None:
    """What a constraint forces (a schema's key, a tool's name) llguidance spells with the tokenizer's pieces:
    "_" was <0x5F> (the byte piece, whose id comes first), which the model never wrote there."""
    sp = load_tokenizer()
    for text in ("get_weather", '{"first_name": ', "a.b,c"):
        ids = lltokenizer(sp).tokenize_bytes(text.encode())
        assert [sp.piece_byte(i) for i in ids] == [None] * len(ids), [sp.id_to_piece(i) for i in ids]
        assert sp.decode([sp.encode("x", bos=False)[-1], *ids])[1:] == text
    bytes_only = load_tokenizer("bytes")  # a byte tokenizer still spells everything
    assert lltokenizer(bytes_only).tokenize_bytes(b"a_b") == bytes_only.encode("a_b", bos=False)


def test_a_byte_level_bpe_s_tokens_spell_the_text_s_bytes(tmp_path: Any) -> None:
    """A GPT-2-style tokenizer.json (ByteLevel): a piece that is part of a character (`Ã`) decoded to
    U+FFFD, and llguidance read a token whose bytes were EF BF BD."""
    tok = _byte_level_bpe(tmp_path)
    pieces, special = _token_bytes(tok)
    assert special == [0, 1, 2]
    for text in ("héllo wörld € naïve 日本語 x", "ÿ\x7f🙂"):
        assert b"".join(pieces[i] for i in tok.encode(text, bos=False)) == text.encode()


# ---- mixlab generate / chat --json, --json-schema, --regex, --grammar-file ----


@pytest.fixture(scope="module")
def byte_dir(byte_model: tuple[Transformer, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("bytes")
    save_model(byte_model[0], path)
    return path


def test_the_cli_flags_constrain_what_generate_and_chat_print(byte_model: tuple[Transformer, Any], byte_dir: Any,
                                                              tmp_path: Any, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = byte_model
    common = ["--model", str(byte_dir), "--tokenizer", "bytes", "--dtype", "float32", "--quiet"]
    flags = ["generate", "--prompt", "pick: ", "--max-new-tokens", "12", *common]
    assert main([*flags, "--regex", "[a-c]{2,5}x?"]) == 0
    expected = _run(Engine(model, tok), tok.encode("pick: "), SamplingParams(
        max_tokens=12, structured=Structured("regex", "[a-c]{2,5}x?")))[1]
    assert capsys.readouterr().out == expected + "\n"
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "pairs.lark").write_text('start: pair ("," pair)*\npair: /[a-z]/ "=" /[0-9]/\n')
    for flag, check in ((["--json-schema", str(tmp_path / "schema.json")], lambda t: jsonschema.validate(
            json.loads(t), SCHEMA) is None), (["--grammar-file", str(tmp_path / "pairs.lark")],
                                              lambda t: regex.fullmatch("[a-z]=[0-9](,[a-z]=[0-9])*", t))):
        assert main(["generate", "--prompt", "hello", "--max-new-tokens", "60", *common, *flag]) == 0
        out = capsys.readouterr().out
        assert check(out[:-1]), (flag, out)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nAgain\n"))
    assert main(["chat", "--max-new-tokens", "60", "--seed", "0", *common, "--json-schema",
                 str(tmp_path / "schema.json")]) == 0
    replies = capsys.readouterr().out.splitlines()
    assert len(replies) == 2 and all(jsonschema.validate(json.loads(r), SCHEMA) is None for r in replies), replies


def test_generate_prints_a_failing_constraint_s_output_and_warns(ascii_model: tuple[Transformer, Any, Any],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`mixlab generate --regex 'ab[éè]'` over a vocabulary without é failed ("generation failed: structured
    output: NoExtensionBias", exit 1): it prints what came before, warns why on one line, and exits 0; a
    constraint none of the model's tokens can begin is the flag's error (exit 2), before anything is generated."""
    common = ["generate", "--model", str(ascii_model[2]), "--prompt", "x", "--max-new-tokens", "8", "--quiet"]
    assert main([*common, "--regex", "ab[éè]"]) == 0
    out, err = capsys.readouterr()
    assert out == "ab\n", out
    assert [ln for ln in err.splitlines() if ln] == [
        "mixlab generate: warning: request 'req-0': structured output: no token of the vocabulary spells what the "
        "constraint needs next (NoExtensionBias); the output ends at its token 3 (finish_reason 'stop')"], err
    assert main([*common, "--regex", "[éè]+"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixlab generate: error: --regex: no token of the vocabulary spells what the constraint "
                          "needs next (NoExtensionBias) at the start of the output"), err
    assert "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("schema,printed", [(REFUSING, '{"k":"'), (HUGE, "")])
def test_generate_prints_the_tokens_a_constraint_took_before_one_it_refused(
        schema: dict[str, Any], printed: str, ascii_model: tuple[Transformer, Any, Any], tmp_path: Any,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A token llguidance's mask allowed and its parser then refused (`"` where `é` must come) is dropped: the
    text held back for --stop comes without a token, and generate and chat print it (they printed the refused
    `"` too); refused at the first token (a schema past llguidance's limits), nothing is printed (generate's
    AssertionError once the refused `{` was dropped: no step came)."""
    model, tok, path = ascii_model
    (tmp_path / "s.json").write_text(json.dumps(schema))
    assert main(["generate", "--model", str(path), "--prompt", "x", "--max-new-tokens", "10", "--json-schema",
                 str(tmp_path / "s.json"), "--stop", "zz"]) == 0
    out, err = capsys.readouterr()
    assert out == printed + "\n" and "which it could not take (finish_reason 'stop')" in err, (out, err)
    assert f"decode: {max(len(printed) - 1, 0)} tokens" in err, err
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    assert main(["chat", "--model", str(path), "--max-new-tokens", "10", "--json-schema", str(tmp_path / "s.json"),
                 "--stop", "zz", "--quiet"]) == 0
    assert capsys.readouterr().out == printed + "\n"
    with pytest.warns(RuntimeWarning, match="which it could not take"):
        steps = list(generate_stream(model, [tok.encode("x")], max_new_tokens=10, tokenizer=tok, stop=["zz"],
                                     structured=Structured("json_schema", schema)))
    assert [s.tokens[0] for s in steps] == ([*tok.encode(printed, bos=False), None] if printed else [])
    assert "".join(s.text[0] for s in steps if s.text) == printed


def test_the_cli_s_bad_constraints_are_one_line_naming_the_flag(tmp_path: Any, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bad_schema.json").write_text('{"type": "nope"}')
    base = ["generate", "--model", str(tmp_path / "absent"), "--prompt", "x"]  # checked before the model loads
    for flags, said, code in ((["--regex", "(a"], "--regex: ", 2),
                              (["--json-schema", str(tmp_path / "bad.json")],
                               f"--json-schema {tmp_path / 'bad.json'}: not a JSON file", 2),
                              (["--json-schema", str(tmp_path / "bad_schema.json")], "nope", 2),
                              (["--grammar-file", str(tmp_path / "absent.lark")],
                               f"--grammar-file {tmp_path / 'absent.lark'}: No such file", 1),
                              (["--json-schema", str(tmp_path)], f"--json-schema {tmp_path}: Is a directory", 1)):
        assert main([*base, *flags]) == code, flags  # a wrong value: usage (2); a missing file: failure (1)
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1 and "Traceback" not in err, err
    with pytest.raises(SystemExit):
        main([*base, "--json", "--regex", "a"])
    assert "not allowed with" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "llguidance", None)
    assert main([*base, "--json"]) == 1  # a missing package: the run failed
    assert "--json: " in (err := capsys.readouterr().err) and "pip install 'mixlab[serve]'" in err, err


# ---- the server (test_serve.py's model: a float32 tiny Mixtral with Mixtral's 32,000-token tokenizer) ----

U = [{"role": "user", "content": "Give me the data"}]


@pytest.fixture(scope="module")
def model_tok(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    path = hf_mixtral(tmp_path_factory.mktemp("structured"), vocab_size=32000, hidden_size=32, intermediate_size=48,
                      max_position_embeddings=CONTEXT)
    hf_tokenizer_json(path)
    return load_model(path, dtype="float32"), load_tokenizer(path)


@pytest.fixture(scope="module")
def server(model_tok: tuple[Any, Any]) -> Iterator[str]:
    model, tok = model_tok
    with Engine(model, tok, max_batch=8) as engine, ServerThread(create_app(engine, tok, _config(model))) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_response_format_json_schema(server: str) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "data", "schema": SCHEMA, "strict": True}}
    r = httpx.post(server + CHAT, json={"messages": U, "response_format": rf, "max_tokens": 40, "n": 2,
                                        "temperature": 1.0, "seed": 4}, timeout=60)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


@pytest.mark.parametrize("extra,check", [
    ({"guided_regex": r"[0-9]{2}-[a-z]{3}"}, lambda t: regex.fullmatch(r"[0-9]{2}-[a-z]{3}", t)),
    ({"guided_choice": ["north", "south", "east"]}, lambda t: t in ("north", "south", "east")),
    ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
    ({"structured_outputs": {"regex": "[a-z]{4}"}}, lambda t: regex.fullmatch("[a-z]{4}", t)),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
     lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ({"structured_outputs": {"grammar": 'root ::= "a" [0-9] | "b"'}}, lambda t: regex.fullmatch("a[0-9]|b", t)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"enum": [1, 22]}}}},
     lambda t: json.loads(t) in (1, 22)),
    ({"guided_grammar": 'start: "x=" /[1-9]/ (";" "x=" /[1-9]/)?'}, lambda t: regex.fullmatch(r"x=\d(;x=\d)?", t)),
    ({"guided_json": json.dumps(SCHEMA)}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
])
def test_completions_follow_vllm_s_guided_parameters(server: str, extra: dict[str, Any], check: Any) -> None:
    body = {"prompt": "Answer:", "max_tokens": 40, "temperature": 0, **extra}
    r = httpx.post(server + COMP, json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and check(choice["text"]), choice


def test_json_mode_gives_an_object(server: str, model_tok: tuple[Any, Any]) -> None:
    """A random model over 32k tokens hardly ever closes a string; a logit_bias towards '"' and '}' (which
    the mask leaves to the grammar's places) lets this one finish within the cap."""
    _, tok = model_tok
    bias = {str(i): 5.0 for i in range(tok.vocab_size) if tok.id_to_piece(i) in ('"', "}")}
    for path, body in ((COMP, {"prompt": "Answer:"}), (CHAT, {"messages": U})):
        r = httpx.post(server + path, json={**body, "response_format": {"type": "json_object"}, "logit_bias": bias,
                                            "max_tokens": 40, "temperature": 0}, timeout=60)
        choice = r.json()["choices"][0]
        text = choice["text"] if path == COMP else choice["message"]["content"]
        assert choice["finish_reason"] == "stop" and isinstance(json.loads(text), dict), choice


def test_the_openai_client_s_response_format_streams(client: Any) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "data", "schema": SCHEMA}}
    chunks = list(client.chat.completions.create(model=NAME, messages=U, response_format=rf, max_tokens=40,
                                                 temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    whole = client.chat.completions.create(model=NAME, messages=U, response_format=rf, max_tokens=40, temperature=0)
    assert whole.choices[0].message.content == text and whole.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("path,body,param,says", [
    (CHAT, {"messages": U, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
     "response_format.json_schema.schema", "nope"),
    (CHAT, {"messages": U, "response_format": {"type": "json_schema"}}, "response_format.json_schema", "schema"),
    (CHAT, {"messages": U, "response_format": {"type": "yaml"}}, "response_format", "yaml"),
    (COMP, {"prompt": "x", "guided_regex": "(a"}, "guided_regex", "regex"),
    (COMP, {"prompt": "x", "guided_json": "{no"}, "guided_json", "guided_json"),
    (COMP, {"prompt": "x", "guided_grammar": "start: ("}, "guided_grammar", "guided_grammar"),
    (COMP, {"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}, "guided_choice",
     "guided_regex and guided_choice"),
    (CHAT, {"messages": U, "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs.regex", "response_format and structured_outputs.regex"),
    (COMP, {"prompt": "x", "structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag",
     "not supported"),
])
def test_bad_constraints_are_400s_naming_the_parameter(server: str, path: str, body: dict[str, Any], param: str,
                                                       says: str) -> None:
    r = httpx.post(server + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"], err


@pytest.fixture(scope="module")
def ascii_server(ascii_model: tuple[Transformer, Any, Any]) -> Iterator[str]:
    model, tok, _ = ascii_model
    with Engine(model, tok, max_batch=4) as engine, ServerThread(create_app(engine, tok, _config(model))) as url:
        yield url


@pytest.mark.parametrize("stream", [False, True])
def test_the_server_ends_a_failing_constraint_s_output_with_stop(ascii_server: str, stream: bool) -> None:
    """A constraint that fails mid-output (no token spells `é`; a token llguidance allows, then refuses) was a
    500 ("generation failed: structured output: NoExtensionBias"), or an error event in the stream: the choice
    now ends with what came before and finish_reason "stop", as vLLM's, through the openai client; its
    stop_reason (mixlab's string where vLLM's has only stop strings and tokens) tells it from a finished output.
    A token the constraint refused is not part of it (`{"k":""` was): one logprob per token counted in the usage
    (the EOS that ends an unspellable constraint's output included), the same through /v1/responses."""
    client = openai.OpenAI(base_url=ascii_server + "/v1", api_key="unused", max_retries=0, timeout=60)
    rf = {"type": "json_schema", "json_schema": {"name": "k", "schema": REFUSING}}
    unspellable = "structured output failed: no token of the vocabulary spells what the constraint needs next " \
        "(NoExtensionBias)"
    usage = {"stream_options": {"include_usage": True}} if stream else {}
    for kind, extra, expected, why in (
            ("completion", {"guided_regex": "ab[éè]"}, "ab", unspellable),
            ("completion", {"guided_grammar": 'start: "a" "é"'}, "a", unspellable),
            ("chat", {"response_format": rf}, '{"k":"', "structured output failed: Parser Error: token ")):
        if kind == "chat":
            made = client.chat.completions.create(model=NAME, messages=U, max_tokens=20, temperature=0, stream=stream,
                                                  logprobs=True, **usage, **extra)
        else:
            made = client.completions.create(model=NAME, prompt="x", max_tokens=8, temperature=0, stream=stream,
                                             logprobs=0, **usage, extra_body=extra)
        chunks = list(made) if stream else [made]
        choices = [c.choices[0] for c in chunks if c.choices]
        text = "".join((ch.delta.content or "") if stream and kind == "chat" else
                       ch.message.content if kind == "chat" else ch.text for ch in choices)
        assert text == expected and [ch.finish_reason for ch in choices if ch.finish_reason] == ["stop"], (kind, extra)
        assert choices[-1].model_extra["stop_reason"].startswith(why), (kind, extra, choices[-1])
        lps = [t for ch in choices if ch.logprobs for t in (
            [c.token for c in ch.logprobs.content or []] if kind == "chat" else ch.logprobs.tokens or [])]
        assert "".join(lps) == expected and len(lps) == chunks[-1].usage.completion_tokens, (kind, lps)
    r = client.responses.create(model=NAME, input="x", max_output_tokens=20, temperature=0, stream=stream,
                                text={"format": {"type": "json_schema", "name": "k", "schema": REFUSING}})
    done = [e.response for e in r if e.type == "response.completed"][0] if stream else r
    assert (done.status, done.output_text, done.usage.output_tokens) == ("completed", '{"k":"', 6), done
    # a constraint that completes is a finished output: no stop_reason
    done = client.completions.create(model=NAME, prompt="x", max_tokens=8, temperature=0,
                                     extra_body={"guided_regex": "ab"}).choices[0]
    assert (done.text, done.finish_reason, done.model_extra["stop_reason"]) == ("ab", "stop", None)


@pytest.mark.parametrize("path,body,param", [
    (COMP, {"prompt": "x", "guided_choice": ["é", "è"]}, "guided_choice"),
    (COMP, {"prompt": "x", "guided_regex": "[éè]+"}, "guided_regex"),
    (CHAT, {"messages": U, "structured_outputs": {"regex": "é"}}, "structured_outputs.regex"),
])
def test_a_constraint_no_token_can_begin_is_a_400_naming_the_parameter(ascii_server: str, path: str,
                                                                        body: dict[str, Any], param: str) -> None:
    r = httpx.post(ascii_server + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "no token of the vocabulary spells what the constraint needs next" \
        in err["message"] and "at the start of the output" in err["message"], err


def test_the_server_builds_llguidance_s_tokenizer_as_it_starts(model_tok: tuple[Any, Any], tmp_path: Any) -> None:
    """Not in the first constrained request's time (~0.2 s for Mixtral's 32,000 tokens); not when told not to."""
    from mixlab.engine import structured

    model, _ = model_tok
    for prepare in (True, False):
        tok = load_tokenizer(hf_tokenizer_json(tmp_path))  # a tokenizer no llguidance view was made for
        app = create_app(Engine(model, tok), tok, _config(model, prepare_structured=prepare))
        app.state.server.encoder.submit(lambda: None).result()  # what it was given to do before is done
        assert (tok in structured._LLTOKENIZERS) == prepare


def test_a_constraint_is_built_over_the_vocabulary_once_not_per_sequence(model_tok: tuple[Any, Any]) -> None:
    """Building a 10,000-property schema over Mixtral's vocabulary takes ~0.5 s, which Engine.submit spent for
    every choice, on the server's event loop (every stream waited): the server builds it once in its encoding
    thread (`Structured.prepare`), and each sequence's Matcher starts from a copy."""
    from mixlab.serve.protocol import CompletionRequest

    model, tok = model_tok
    srv = create_app(Engine(model, tok), tok, _config(model)).state.server
    spec = srv.structured(CompletionRequest(prompt="x", guided_json=HUGE))
    t = time.perf_counter()
    for _ in range(4):
        Matcher(spec, tok, tok.vocab_size)
    assert time.perf_counter() - t < 0.2
    small = Structured("choice", ["ab", "cd"])  # copies are independent: one's tokens are not the other's
    first, second = Matcher(small, tok, tok.vocab_size), Matcher(small, tok, tok.vocab_size)
    a, c = (lltokenizer(tok).tokenize_str(x)[0] for x in "ac")
    first.advance(a)
    assert second.allows(c) and not first.allows(c)


def test_a_server_without_llguidance_says_what_to_install(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llguidance", None)
    r = httpx.post(server + CHAT, json={"messages": U, "response_format": {"type": "json_object"}}, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "response_format", err
    assert "pip install 'mixlab[serve]'" in err["message"], err
    r = httpx.post(server + CHAT, json={"messages": U, "max_tokens": 2}, timeout=30)  # the rest still works
    assert r.status_code == 200, r.text
