"""The tokenizer equals mistral-common: ids on varied text, chat encodings on multi-turn
conversations; decode inverts encode; streaming decode equals whole decode; tokenizer.json too."""

from __future__ import annotations

import functools
import json
import os
import random
import threading
import time
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CORPUS, hf_tokenizer_json
from mixlab.tokenizer import ChatError, TextError, load_tokenizer, template_call_id

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Unicode: naïve café, Ångström, Œuvre, ß, İstanbul, ǅ, ﬁ ligature, e\u0301 combining",
    "中文测试：你好，世界。日本語のテキスト、カタカナ。한국어 문장입니다.",
    "Emoji: 🤖🚀👩‍👩‍👧‍👦 🇫🇷 ❤️ 🏳️‍🌈",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\t\ttabs\n\nnew\n\n\nlines\r\nwindows\u00a0nbsp",
    " ",
    "\n",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nprint(f(3))\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }",
    "3.14159 2718281828 1,000,000 -42 1e-9 0x1F 12:30 2026-11-28",
    "Le cœur a ses raisons que la raison ne connaît point. L'été à Paris était très chaud.",
    "Die Straße ist schön, aber die Größe der Bäume überrascht. Äpfel, Öl, Übermut.",
    "El niño pequeño comió paella en la montaña. ¿Dónde está la biblioteca? ¡Olé!",
    "La città è bellissima; perché non andiamo là? Più tardi, forse.",
    "Здравствуй, мир! Ελληνικά κείμενα. עברית. العربية. हिन्दी",
    "[INST] not a special token [/INST] <s> </s> <unk>",
    "",
]


def _corpus_texts(n_per_domain: int = 3, max_chars: int = 1500) -> list[str]:
    if not CORPUS.is_dir():
        return []
    rng = random.Random(0)
    texts = []
    for f in sorted(CORPUS.glob("*/valid.jsonl")):
        lines = f.read_text(encoding="utf-8").splitlines()
        for line in rng.sample(lines, min(n_per_domain, len(lines))):
            text = json.loads(line)["text"]
            start = rng.randrange(max(1, len(text) - max_chars))
            texts.append(text[start : start + max_chars])  # may start mid-word: a harder case
    return texts


ALL_TEXTS = TEXTS + _corpus_texts()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def mistral_tok(tok):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(tok.path))


def test_defaults_are_mixtral_v1(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)


def test_ids_equal_mistral_common_and_roundtrip(tok, mistral_tok):
    ref = mistral_tok.instruct_tokenizer.tokenizer
    assert len(ALL_TEXTS) > len(TEXTS) or not CORPUS.is_dir()
    for text in ALL_TEXTS:
        for bos, eos in ((True, False), (False, False), (True, True)):
            assert tok.encode(text, bos=bos, eos=eos) == ref.encode(text, bos=bos, eos=eos), text[:60]
        ids = tok.encode(text)
        assert tok.decode(ids) == text == ref.decode(ids)


def test_byte_fallback_pieces(tok):
    ids = tok.encode("🤖", bos=False)
    assert [tok.id_to_piece(i) for i in ids][-4:] == ["<0xF0>", "<0x9F>", "<0xA4>", "<0x96>"]


def _check_stream(tok, ids, context=()):
    dec = tok.stream(context=context)
    pieces = [dec.push(i) for i in ids]
    out = "".join(pieces) + dec.flush()
    whole, before = tok.decode(list(context) + list(ids)), tok.decode(list(context))
    assert out == whole[len(os.path.commonprefix([whole, before])) :]  # = whole[len(before):] but mid-character
    return pieces


def test_stream_decoding_equals_decode(tok):
    for text in ALL_TEXTS:
        _check_stream(tok, tok.encode(text))
    pieces = _check_stream(tok, tok.encode("a 🤖 b", bos=False))
    assert "\ufffd" not in "".join(pieces)  # the emoji's four byte tokens are held back, then emitted whole
    assert "🤖" in pieces


def test_stream_keeps_leading_space_after_context(tok):
    prompt = tok.encode("The capital of France is")
    new = tok.encode(" Paris, of course.", bos=False)[1:]  # drop the lone "▁" SentencePiece prepends
    pieces = _check_stream(tok, new, context=prompt[-3:])
    assert pieces[0] == " Paris"


def test_stream_random_tokens(tok):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(3, tok.vocab_size, (30,), generator=g).tolist()
        bytes_ = torch.randint(3, 259, (10,), generator=g).tolist()  # raw byte pieces, often invalid UTF-8
        _check_stream(tok, ids[:15] + bytes_ + ids[15:])


def _byte_ids(tok):
    ids = {b: i for i in range(tok.vocab_size) if (b := tok.piece_byte(i)) is not None}
    assert len(ids) == 256 and tok.piece_byte(tok.encode("hello", bos=False)[-1]) is None
    return ids


def test_stream_emits_invalid_bytes_at_once_and_holds_a_character_being_spelled(tok):
    """A U+FFFD that no later byte can change (lone continuation bytes, a lead byte followed by a
    non-continuation) goes out with its token: a model emitting bad bytes does not stall the stream.
    A character still being spelled (a lead byte and fewer continuation bytes than it needs) is held."""
    b = _byte_ids(tok)
    pieces = _check_stream(tok, [b[0x8C]] * 5 + tok.encode("Night", bos=False))
    assert all(p for p in pieces[:5]), pieces  # each bad byte as it comes (was: all held until "Night")
    pieces = _check_stream(tok, [b[0xE4], b[0xB8], b[0xAD]])  # 中
    assert pieces == ["", "", "中"]
    pieces = _check_stream(tok, [b[0xF0], b[0x9F], b[0xA4], b[0x96], b[0x8C]])  # 🤖 then a stray byte
    assert pieces[:4] == ["", "", "", "🤖"] and pieces[4]
    pieces = _check_stream(tok, [b[0xE4], b[0x41]] + tok.encode("ok", bos=False))  # cut short by "A"
    assert pieces[0] == "" and pieces[1]
    # edge cases of UTF-8 validity (overlong, surrogate, past U+10FFFF, bad leads), with text around
    tricky = [[0xC0, 0x80], [0xE0, 0x80, 0x80], [0xED, 0xA0, 0x80], [0xF4, 0x90, 0x80, 0x80], [0xF5, 0x80],
              [0xFF], [0xC2], [0xE0, 0xA0], [0xF0, 0x90, 0x80], [0xED, 0x9F, 0xBF], [0xEF, 0xBF, 0xBD]]
    g = torch.Generator().manual_seed(1)
    for seq in tricky:
        for tail in ([], tok.encode("x", bos=False), [b[0x80]], [b[0xE4]]):
            _check_stream(tok, [b[x] for x in seq] + tail)
    for _ in range(200):
        raw = torch.randint(0, 256, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        _check_stream(tok, [b[x] for x in raw], context=tok.encode("a")[-1:])


def test_stream_after_a_context_that_ends_mid_character(tok):
    """A prompt whose last byte pieces start a character (cut by token count, a reply continued):
    the character the new tokens complete is the stream's text. It was lost: the window's text
    before and after had the same length (U+FFFD, then the character)."""
    b = _byte_ids(tok)
    assert _check_stream(tok, [b[0xB5]], context=[b[0xD2]]) == ["ҵ"]
    pieces = _check_stream(tok, [b[0xAD]] + tok.encode("ok", bos=False), context=tok.encode("a") + [b[0xE4], b[0xB8]])
    assert pieces[0] == "中"
    # not completed: the context's own U+FFFD is not sent again
    assert "".join(_check_stream(tok, tok.encode("j", bos=False)[-1:], context=[b[0x41], b[0xD2]])) == " j"
    g = torch.Generator().manual_seed(2)
    for _ in range(300):
        raw = torch.randint(0x80, 256, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
        tail = torch.randint(0, 256, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        _check_stream(tok, [b[x] for x in tail] + tok.encode("x", bos=False)[-1:],
                      context=tok.encode("a") + [b[x] for x in raw])


def test_decode_rejects_out_of_vocab(tok):
    with pytest.raises(ValueError, match="token id 32000 is outside the vocabulary"):
        tok.decode([5, 32000])


def test_decode_takes_integer_ids_only(tok):
    # "123" decoded as the ids 1, 2, 3 and 15359.9 as 15359, silently; generate's list of lists was a
    # TypeError from int().
    hi = tok.encode("Hi", bos=False)
    assert tok.decode(torch.tensor(hi)) == tok.decode([torch.tensor(hi[0])]) == "Hi"
    for bad, match in (("123", "not a str"), (b"12", "not a bytes"), ([15359.9], "integer token ids"),
                       ([hi], "tok.decode\\(out\\[0\\]\\)"), ([None], "integer token ids")):
        with pytest.raises(ValueError, match=match):
            tok.decode(bad)


CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me a joke."},
     {"role": "assistant", "content": "No."}, {"role": "user", "content": "Pourquoi ?"}],
    [{"role": "user", "content": "first"}, {"role": "system", "content": "late system"},
     {"role": "user", "content": "second"}, {"role": "assistant", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [{"role": "system", "content": "one"}, {"role": "system", "content": "two"},
     {"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"}],
    [{"role": "system", "content": "only a system prompt"}],
    [{"role": "user", "content": "Write code"}, {"role": "assistant", "content": "def f():", "prefix": True}],
    [{"role": "user", "content": "  spaces  \n\n"}, {"role": "assistant", "content": "émoji 🤖"},
     {"role": "user", "content": "中文"}],
    # empty system messages are skipped (mistral-common >= 1.x; mixlab refused them); empty user ones kept
    [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "a"}, {"role": "system", "content": ""}, {"role": "system", "content": "b"},
     {"role": "user", "content": ""}, {"role": "user", "content": "x"}],
    [{"role": "user", "content": "q"}, {"role": "system", "content": ""}],
]


def _corpus_chats(n: int = 20) -> list[list[dict[str, str]]]:
    path = CORPUS / "chat" / "sft.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    chats = [json.loads(line)["messages"] for line in random.Random(0).sample(lines, n)]
    out = []
    for i, msgs in enumerate(chats):
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]  # ask for the next reply
        if i % 2:
            msgs = [{"role": "system", "content": "Answer like a pirate."}, *msgs]
        out.append(msgs)
    return out


def test_chat_equals_mistral_common(tok, mistral_tok):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    for chat in CHATS + _corpus_chats():
        ref = mistral_tok.encode_chat_completion(ChatCompletionRequest(messages=chat)).tokens
        assert tok.encode_chat(chat) == ref, chat


def test_chat_layout(tok):
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    ids = tok.encode_chat(chat)
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 1
    # The system prompt goes into the first user turn (mistral-common >= 1.x, v1 template).
    assert tok.decode(ids) == "[INST] S\n\nQ1 [/INST] A1 [INST] Q2 [/INST]"


def test_a_chat_over_its_room_loses_its_oldest_whole_turns(tok):
    """`encode_chat_within` (`mixlab chat`'s forgetting, the Responses API's truncation "auto"): the fewest oldest
    turns dropped, found by bisection, equal to dropping them one at a time; system messages and the newest input
    kept, and the newest input alone returned when nothing else fits."""
    turns = [{"role": r, "content": f"{r} {k} " + "word " * (k % 4)} for k in range(5) for r in ("user", "assistant")]
    chat = [{"role": "system", "content": "Be brief."}, *turns, {"role": "user", "content": "last one"}]
    whole = len(tok.encode_chat(chat))
    for room in range(whole + 1, 0, -1):
        kept = turns[:]  # the reference: one exchange at a time, as `mixlab chat` did
        while len(tok.encode_chat([chat[0], *kept, chat[-1]])) > room and kept:
            del kept[:2]
        ids, dropped = tok.encode_chat_within(chat, room)
        assert ids == tok.encode_chat([chat[0], *kept, chat[-1]]) and dropped == len(turns) - len(kept), room
    # the newest input is several messages (`keep`); a turn is a user message and all that follows it
    odd = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"},
           {"role": "assistant", "content": "d"}, {"role": "user", "content": "e " * 20},
           {"role": "assistant", "content": "f"}, {"role": "user", "content": "g"}]
    assert tok.encode_chat_within(odd, 0, keep=3)[1] == 4  # all but the last 3
    room = len(tok.encode_chat(odd[1:]))
    assert tok.encode_chat_within(odd, room, keep=3) == (tok.encode_chat(odd[1:]), 1)
    assert tok.encode_chat_within(odd, room - 1, keep=3) == (tok.encode_chat(odd[4:]), 4)
BAD_CHATS = [
    ([], "non-empty list"),
    ([{"role": "assistant", "content": "hi"}], "must start with a user or system"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "last message must be a user"),
    ([{"role": "robot", "content": "x"}], "role 'robot'"),
    ([{"role": "user", "content": 5}], "str 'content'"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "system", "content": "s"},
      {"role": "user", "content": "q"}], "role 'system' cannot follow role 'assistant'"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "q"}],
     "message 1: an assistant message must have content"),
    # one of several in a row: they were merged and the empty one dropped (mistral-common refuses it)
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "assistant", "content": ""},
      {"role": "user", "content": "q"}], "message 2: an assistant message must have content"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "prefix": True}], "message 1"),
    ([{"role": "user", "content": "q", "prefix": True}, {"role": "assistant", "content": "a"}], "prefix=True"),
    ("hello", "non-empty list"),
]


@pytest.mark.parametrize("chat,message", BAD_CHATS, ids=[m for _, m in BAD_CHATS])
def test_bad_chats(tok, chat, message):
    with pytest.raises(ChatError, match=message):
        tok.encode_chat(chat)


def test_bad_text_in_a_chat_names_its_message(tok):
    # it said "the text is not valid UTF-8: '\\ud800' at character 12": the position in the template's
    # "[INST] ..." string, of no message
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "ab\ud800"}]
    with pytest.raises(TextError, match=r"message 1's content is not valid UTF-8: '\\ud800' at character 2"):
        tok.encode_chat(chat)


def test_tokenizer_json_equals_sentencepiece(tok, tmp_path):
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    hf_tokenizer_json(tmp_path)
    hf = load_tokenizer(tmp_path)
    assert hf.path.name == "tokenizer.json"
    assert (hf.vocab_size, hf.bos_id, hf.eos_id) == (32000, 1, 2)
    for text in ALL_TEXTS:
        assert hf.encode(text) == tok.encode(text), text[:60]
        assert hf.decode(tok.encode(text)) == text
    assert hf.encode_chat(CHATS[2]) == tok.encode_chat(CHATS[2])


def test_tokenizer_json_lets_other_threads_run_while_it_encodes(tmp_path):
    """tokenizers' encode holds the GIL: 3 MB of text froze every other thread (the server's event loop,
    which encodes in a worker thread) for 6 s."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    hf_tokenizer_json(tmp_path)
    hf = load_tokenizer(tmp_path)
    text = "alpha beta gamma 日本 foo.bar x1 " * 20_000  # 640 kB: about a second
    gaps, done = [], threading.Event()

    def tick():
        last = time.monotonic()
        while not done.is_set():
            time.sleep(0.005)
            gaps.append(time.monotonic() - last)
            last = time.monotonic()

    ticker = threading.Thread(target=tick)
    ticker.start()
    t0 = time.monotonic()
    hf.encode(text)
    took = time.monotonic() - t0
    done.set()
    ticker.join()
    assert max(gaps) < took / 3, (max(gaps), took)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such tokenizer file"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable SentencePiece model"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    # a checkpoint's config.json given as --tokenizer was called malformed ("expected `,` or `}`")
    (tmp_path / "config.json").write_text('{"model_type": "mixtral", "vocab_size": 32000}')
    with pytest.raises(ValueError, match=r"config.json: a JSON file but not a tokenizer.json \(no 'model' table\)"):
        load_tokenizer(tmp_path / "config.json")


def test_a_malformed_tokenizer_config_is_named(tmp_path):
    """tokenizer.json's BOS / EOS names come from tokenizer_config.json beside it: a broken one said only
    'Expecting value: line 1 column 1 (char 0)' (a list: 'list' object has no attribute 'get')."""
    hf_tokenizer_json(tmp_path)
    for text, message in ((b"", "not valid UTF-8 JSON"), (b'{"eos_token": "\xe9"}', "not valid UTF-8 JSON"),
                          (b"[]", "expected a JSON object of tokenizer settings, got list")):
        (tmp_path / "tokenizer_config.json").write_bytes(text)
        with pytest.raises(ValueError, match=f"tokenizer_config.json: {message}"):
            load_tokenizer(tmp_path)


def test_checkpoint_folder_tokenizer_model(tok, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(tok.path.read_bytes())
    assert load_tokenizer(tmp_path).encode("Grüß Gott") == tok.encode("Grüß Gott")


def test_a_folder_with_mistrals_versioned_tokenizer_uses_it(tok, tmp_path):
    # Mistral 7B v0.3's download holds tokenizer.model.v3 alone: the folder's model was given Mixtral's v1
    # (other ids for the same text: "Hello world" is [1, 22557, 1526] in v1, [1, 23325, 2294] in v3)
    from mixlab.analysis import load_analysis_tokenizer
    from mixlab.tokenizer import model_tokenizer

    v3 = next(tok.path.parent.glob("*.model.v3"))
    (tmp_path / "params.json").write_text("{}")
    (tmp_path / "tokenizer.model.v3").write_bytes(v3.read_bytes())
    want = load_tokenizer(v3).encode("Hello world")
    assert want != tok.encode("Hello world")
    for found in (model_tokenizer(tmp_path), load_tokenizer(tmp_path), load_analysis_tokenizer(tmp_path)):
        assert found.encode("Hello world") == want
    # a Tekken tokenizer (tekken.json) is not read as Mixtral's either
    (tmp_path / "tokenizer.model.v3").unlink()
    (tmp_path / "tekken.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tekken\.json: Mistral's Tekken tokenizer is not supported"):
        model_tokenizer(tmp_path)


def test_a_model_trained_on_mixtrals_tokenizer_elsewhere_finds_it_here(tok, tmp_path):
    # mixlab_data.json names Mixtral's tokenizer by the path of the venv that prepared the data: on another
    # machine generate, chat and serve said "no tokenizer.model or tokenizer.json in this folder"
    from mixlab.tokenizer import model_tokenizer

    spec = {"type": "file", "name": "mixtral", "path": "/elsewhere/mistral_common/data/tokenizer.model.v1"}
    (tmp_path / "mixlab_data.json").write_text(json.dumps({"tokenizer": spec}))
    assert model_tokenizer(tmp_path).path == tok.path
    # a tokenizer file of its own that is gone is named
    spec = {"type": "file", "name": "/gone/sp.model", "path": "/gone/sp.model"}
    (tmp_path / "mixlab_data.json").write_text(json.dumps({"tokenizer": spec}))
    with pytest.raises(FileNotFoundError, match=r"mixlab_data.json: the model's tokenizer, /gone/sp.model, is not"):
        model_tokenizer(tmp_path)
    # data prepared with --tokenizer FOLDER names the folder
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.model").write_bytes(tok.path.read_bytes())
    spec = {"type": "file", "name": str(tmp_path / "sp"), "path": str(tmp_path / "sp")}
    (tmp_path / "mixlab_data.json").write_text(json.dumps({"tokenizer": spec}))
    assert model_tokenizer(tmp_path).encode("Grüß Gott") == tok.encode("Grüß Gott")


def _mistral_file(version: str):
    return next(load_tokenizer().path.parent.glob(f"mistral_instruct_tokenizer_*.model.{version}"))


@functools.cache
def _mistral(path):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(path))


def _reference(path, chat, **request):
    """mistral-common's ids of `chat`, or the exception it refuses it with."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    try:
        return _mistral(path).encode_chat_completion(ChatCompletionRequest(messages=chat, **request)).tokens
    except Exception as e:  # noqa: BLE001 - its refusals are of several types
        return e


def _written_ids(chat):
    """`chat` with its tool call ids as v3 writes them (`template_call_id`: 9 letters and digits kept, any other
    non-empty string hashed); empty and non-string ids left for mistral-common to refuse."""
    def written(call_id):
        return template_call_id(call_id) if isinstance(call_id, str) and call_id else call_id

    out = []
    for m in chat:
        m = dict(m)
        if isinstance(m.get("tool_calls"), list):
            m["tool_calls"] = [{**c, "id": written(c.get("id"))} if isinstance(c, dict) and "id" in c else c
                               for c in m["tool_calls"]]
        if "tool_call_id" in m:
            m["tool_call_id"] = written(m["tool_call_id"])
        out.append(m)
    return out


def _same_as_mistral_common(tok, path, chat, **request):
    """encode_chat equals mistral-common (v3: of the chat with its ids as the template writes them, `_written_ids`),
    or refuses (ChatError) what it refuses; whether it refused."""
    ref = _reference(path, _written_ids(chat) if tok.chat_version == 3 else chat, **request)
    if isinstance(ref, Exception):
        with pytest.raises(ChatError):
            tok.encode_chat(chat, **request)
        return True
    assert tok.encode_chat(chat, **request) == ref, chat
    return False


_TEXTS = ["hi", " spaced ", "", "中文 émoji 🤖", "a\n\nb", "trailing  ", "  ", "[INST] text [/INST] </s>"]
_CHATS = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]),
     "content": st.sampled_from(_TEXTS) | st.text(st.characters(codec="utf-8"), max_size=8)}),
    min_size=1, max_size=6)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_v2_v3_chats_equal_mistral_common(version):
    """Mixtral 8x22B's and Mistral 7B v0.3's template: [INST] [/INST] control tokens, the system prompt in the
    last user turn, replies' trailing spaces dropped; equal to mistral-common token for token, and refused
    (ChatError) where it refuses, on hand-picked conversations and hypothesis's (seeded)."""
    path = _mistral_file(version)
    tok = load_tokenizer(path)
    assert tok.chat_version == int(version[1])
    chats = CHATS + _corpus_chats(8) + [
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a  "}, {"role": "user", "content": ""}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}, {"role": "user", "content": "r"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],  # refused: no reply to write
    ]
    assert [_same_as_mistral_common(tok, path, chat) for chat in chats].count(True) == 1
    refused = []

    @settings(derandomize=True, max_examples=300, deadline=None, database=None)
    @given(chat=_CHATS, prefix=st.booleans())
    def check(chat, prefix):
        if chat[-1]["role"] == "assistant" and prefix:
            chat[-1]["prefix"] = True
        refused.append(_same_as_mistral_common(tok, path, chat))

    check()
    assert 0 < refused.count(True) < len(refused) // 2  # both kinds reached
    # the layout, in pieces: the system prompt joins the last user turn, not the first
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1 "}, {"role": "user", "content": "Q2"}]
    ids = tok.encode_chat(chat)
    assert [tok.id_to_piece(i) for i in ids] == [
        "<s>", "[INST]", "▁Q", "1", "[/INST]", "▁A", "1", "</s>", "[INST]", "▁S", "<0x0A>", "<0x0A>", "Q", "2",
        "[/INST]"]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, in °C",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                         "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "description": "", "parameters": {}}}]


def _call(call_id, name="get_weather", arguments='{"city": "Zürich"}'):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# the last four are not v3 ids: hashed (`template_call_id`), but "" refused
_IDS = st.sampled_from(["abcDEF123", "ZZZZZZZZ9", "call_1", "call_abc123XYZdefGHI456jkl789", "a-b_c", ""])
_TOOL_MESSAGES = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                           "content": st.sampled_from(_TEXTS)}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.sampled_from([None, "", "x"]),
                           "tool_calls": st.lists(st.builds(_call, _IDS, st.sampled_from(["get_weather", "add", "a b"]),
                                                            st.sampled_from(['{"a":1, "b" : [2]}', "", "not json"])),
                                                  min_size=1, max_size=2)}),
    st.fixed_dictionaries({"role": st.just("tool"), "content": st.sampled_from(['{"temp": 21}', "sunny", "", "中文"]),
                           "tool_call_id": _IDS}, optional={"name": st.sampled_from(["get_weather", "add"])}))


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_tool_calls_equal_mistral_common(version):
    """OpenAI's function calling in the v2/v3 template: `tools` in [AVAILABLE_TOOLS] before the last user turn,
    assistant `tool_calls` as [TOOL_CALLS] + JSON (v3: with the call's id), `role: "tool"` results in
    [TOOL_RESULTS] (v3: with `call_id`; v2: only after the last user turn); equal to mistral-common, refused
    where it refuses (empty ids, calls and results that do not pair up...); v3 ids that are not 9 letters and
    digits as `template_call_id` writes them."""
    path = _mistral_file(version)
    tok = load_tokenizer(path)
    chat = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "Weather in Zürich?"},
            {"role": "assistant", "content": None, "tool_calls": [_call("abcDEF123"), _call("ZZZZZZZZ9", "add", "")]},
            {"role": "tool", "content": '{"temp":  21}', "tool_call_id": "abcDEF123", "name": "get_weather"},
            {"role": "tool", "content": "3", "tool_call_id": "ZZZZZZZZ9", "name": "add"},
            {"role": "assistant", "content": "21 °C."}, {"role": "user", "content": "And Bern?"}]
    for tools in (TOOLS, None):  # v2 takes one result per turn of calls: the two results are refused
        assert [_same_as_mistral_common(tok, path, chat[:k], tools=tools) for k in (2, 4, 5, 7)] == [
            False, False, version == "v2", False]
    ids = tok.encode_chat(chat[:4], tools=TOOLS)
    marker = tok._b.special_id  # noqa: SLF001
    assert ids[1] == marker("[AVAILABLE_TOOLS]") and ids.count(marker("[TOOL_RESULTS]")) == 1
    assert tok.decode(ids[ids.index(marker("[TOOL_CALLS]")) + 1:ids.index(marker("[TOOL_RESULTS]"))]) == (
        '[{"name": "get_weather", "arguments": {"city": "Zürich"}' + ', "id": "abcDEF123"' * (version == "v3")
        + '}, {"name": "add", "arguments": {}' + ', "id": "ZZZZZZZZ9"' * (version == "v3") + "}]")
    outcomes = []

    @settings(derandomize=True, max_examples=300, deadline=None, database=None)
    @given(chat=st.lists(_TOOL_MESSAGES, min_size=1, max_size=6), with_tools=st.booleans())
    def check(chat, with_tools):
        outcomes.append(_same_as_mistral_common(tok, path, chat, tools=TOOLS if with_tools else None))

    check()
    assert 0 < outcomes.count(True) < len(outcomes)


def test_a_v3_tokenizer_json_chats_as_its_sentencepiece_file(tmp_path):
    """A transformers tokenizer.json of the v3 vocabulary ([INST] and the tool markers added special tokens, as
    on the Hub) takes the v3 template too: the same ids as mistral-common, text that spells a marker kept text."""
    pytest.importorskip("tokenizers")
    v3 = _mistral_file("v3")
    tok = load_tokenizer(hf_tokenizer_json(tmp_path, v3))
    assert tok.chat_version == 3
    chats = [[{"role": "system", "content": "S"}, {"role": "user", "content": "Hi [INST] there"},
              {"role": "assistant", "content": "A  "}, {"role": "user", "content": "émoji 🤖"}],
             [{"role": "user", "content": ""}],
             [{"role": "user", "content": "w"},
              {"role": "assistant", "content": None, "tool_calls": [_call("abcDEF123")]},
              {"role": "tool", "content": "21", "tool_call_id": "abcDEF123"}]]
    for chat in chats:
        assert not _same_as_mistral_common(tok, v3, chat, tools=TOOLS)



def test_a_mistral_folder_chats_with_its_sentencepiece_file_as_mistral_inference(tmp_path):
    """A converted Mistral folder (params.json) holding tokenizer.json beside tokenizer.model.v3: mistral-inference
    reads the .v3 file alone. mixlab took tokenizer.json, whose Metaspace layout (transformers' converter without
    `legacy`) writes a message that starts with a space or "▁" other than SentencePiece; equal on corpus chats."""
    pytest.importorskip("tokenizers")
    from mixlab.tokenizer import model_tokenizer

    v3 = _mistral_file("v3")
    hf_tokenizer_json(tmp_path, v3)
    table = json.loads((tmp_path / "tokenizer.json").read_text())
    table["normalizer"] = None
    table["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    (tmp_path / "tokenizer.json").write_text(json.dumps(table))
    (tmp_path / "tokenizer.model.v3").write_bytes(v3.read_bytes())
    assert model_tokenizer(tmp_path).path.name == "tokenizer.json"  # transformers' folder: transformers' file
    (tmp_path / "params.json").write_text("{}")
    tok = model_tokenizer(tmp_path)
    assert tok.path.name == "tokenizer.model.v3" and tok.chat_version == 3
    chats = [[{"role": "user", "content": "  two spaces"}], [{"role": "user", "content": "▁already"}],
             [{"role": "user", "content": "q"}, {"role": "assistant", "content": " a"},
              {"role": "user", "content": " "}]]
    for chat in chats + _corpus_chats():
        assert not _same_as_mistral_common(tok, v3, chat, tools=TOOLS)

def test_tools_are_refused_by_the_v1_template(tok):
    # mistral-common's v1 drops them without a word; Mixtral 8x7B Instruct was never shown tools
    with pytest.raises(ChatError, match=r"tools need a tokenizer with Mistral's v2/v3 template .* is v1"):
        tok.encode_chat([{"role": "user", "content": "hi"}], tools=TOOLS)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                                                "tool_calls": [_call("abcDEF123")]}, {"role": "user", "content": "q"}]
    with pytest.raises(ChatError, match=r"message 1: tool calls and results need .* v2/v3 template"):
        tok.encode_chat(chat)
    v3 = load_tokenizer(_mistral_file("v3"))
    for tools, message in (([{"type": "function", "function": {"name": "a b"}}], r"tools\[0\]: function name 'a b'"),
                           ("tools", "tools must be a list"), ([{"type": "web"}], r"tools\[0\] must be"),
                           ([{"function": {"name": "f", "parameters": {"a": {1, 2}}}}], "parameters are not JSON")):
        with pytest.raises(ChatError, match=message):
            v3.encode_chat([{"role": "user", "content": "hi"}], tools=tools)
    for bad in ("", 5, None):  # empty or not a string: refused, naming the message (a missing id too)
        with pytest.raises(ChatError, match=rf"message 1: tool call id {bad!r} must be a non-empty string"):
            v3.encode_chat([chat[0], {**chat[1], "tool_calls": [_call(bad)]}, chat[2]])
    result = [chat[0], {**chat[1], "tool_calls": [_call("abcDEF123")]}, {"role": "tool", "content": "1"}]
    for bad in ("", 5, None):
        with pytest.raises(ChatError, match=rf"message 2: a tool result's 'tool_call_id' must be .* got {bad!r}"):
            v3.encode_chat([*result[:2], {**result[2], "tool_call_id": bad}])


def test_v3_writes_a_null_call_id_as_mistral_common_does_no_id():
    """"null" is mistral-common's id of a call without one (ToolCall's default; mistral-finetune's last assistant
    message): its v3 template writes the call with no "id" key. mixlab hashed it as any other id, "id": "Cz2GdKTAp",
    so an SFT example ending in such a call was trained on a prompt mistral-common never writes."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = _mistral_file("v3")
    v3 = load_tokenizer(path)
    chat = [{"role": "user", "content": "Weather in Zürich?"},
            {"role": "assistant", "content": None, "tool_calls": [_call("null")], "prefix": True}]
    ours = [v3.bos_id, *(i for _, ids in v3.chat_turns(chat, tools=TOOLS) for i in ids), v3.eos_id]
    ref = MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning).encode_chat_completion(
        ChatCompletionRequest(messages=[chat[0], {k: v for k, v in chat[1].items() if k != "prefix"}], tools=TOOLS))
    assert ours == ref.tokens
    calls = v3.decode(ours[ours.index(v3.special_id("[TOOL_CALLS]")) + 1:])
    assert json.loads(calls) == [{"name": "get_weather", "arguments": {"city": "Zürich"}}]
    # elsewhere no result could name it: refused, as mistral-common refuses it (it was hashed, then written as no id)
    followed = [{**chat[0]}, {**chat[1], "prefix": False}, {"role": "tool", "content": "21", "tool_call_id": "null"}]
    with pytest.raises(ChatError, match="message 1: tool call id 'null' .* is taken only on the last message"):
        v3.encode_chat(followed)
    assert isinstance(_reference(path, [{k: v for k, v in m.items() if k != "prefix"} for m in followed]), Exception)



def test_v3_refuses_a_tool_result_for_the_null_call_id_as_mistral_common_does():
    """A tool result whose tool_call_id is "null" (mistral-common's 'no id'): mistral-common's v3 refuses it in every
    mode (its ids are 9 letters and digits); mixlab hashed it as any other id and wrote a result that names no call
    (a call without an id is written with none, and only as the last message)."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = _mistral_file("v3")
    v3 = load_tokenizer(path)
    chat = [{"role": "user", "content": "Weather in Zürich?"},
            {"role": "assistant", "content": None, "tool_calls": [_call("abcDEF123")]},
            {"role": "tool", "content": "21", "tool_call_id": "null"}, {"role": "assistant", "content": "21 °C."},
            {"role": "user", "content": "Thanks"}]
    with pytest.raises(ChatError, match=r"^message 2: a tool result's 'tool_call_id' 'null' "
                                        r"\(mistral-common's 'no id'\) names no call"):
        v3.encode_chat(chat, tools=TOOLS)
    assert isinstance(_reference(path, chat, tools=TOOLS), Exception)
    finetuning = MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)
    with pytest.raises(Exception, match="Tool call id was null"):
        finetuning.encode_chat_completion(ChatCompletionRequest(messages=chat[:4], tools=TOOLS))
    named = [*chat[:2], {**chat[2], "tool_call_id": "abcDEF123"}, *chat[3:]]
    assert not _same_as_mistral_common(v3, path, named, tools=TOOLS)  # its call's id: written as it is

def test_v3_writes_other_servers_call_ids_hashed_and_paired():
    """A follow-up carried over from another server (OpenAI's `call_` + 24 ids, an agent framework's own) was
    refused on v3: its ids are now written as `template_call_id` maps them, the same map for a call and the result
    that names it, so the prompt is mistral-common's of the conversation with those ids; 9 letters and digits stay
    as they are; two ids one written id would stand for are refused, naming both."""
    path = _mistral_file("v3")
    v3 = load_tokenizer(path)
    openai_ids = ["call_abc123XYZdefGHI456jkl789", "call_Zz9"]
    chat = [{"role": "user", "content": "Weather in Zürich and Bern?"},
            {"role": "assistant", "content": None, "tool_calls": [_call(openai_ids[0]), _call(openai_ids[1], "add")]},
            {"role": "tool", "content": '{"temp": 21}', "tool_call_id": openai_ids[0]},
            {"role": "tool", "content": "3", "tool_call_id": openai_ids[1]}]
    written = [template_call_id(i) for i in openai_ids]
    assert all(len(w) == 9 and w.isascii() and w.isalnum() for w in written) and written[0] != written[1]
    assert template_call_id("call_1") == "oZgfGO2B8"  # the rule is fixed: a stored conversation encodes as before
    assert template_call_id("abcDEF123") == "abcDEF123"
    # vLLM's last 9 characters give these one id (and keep `_`); the hash does not
    assert template_call_id("run1_call_000000001") != template_call_id("run2_call_000000001")
    ids = v3.encode_chat(chat, tools=TOOLS)
    ref = _reference(path, _written_ids(chat), tools=TOOLS)
    assert not isinstance(ref, Exception) and ids == ref
    marker = v3.special_id
    calls_text = v3.decode(ids[ids.index(marker("[TOOL_CALLS]")) + 1:ids.index(marker("[TOOL_RESULTS]"))])
    results_text = v3.decode(ids[ids.index(marker("[TOOL_RESULTS]")):])
    assert [json.loads(calls_text)[k]["id"] for k in (0, 1)] == written  # each call and its result: one id
    assert results_text.index(f'"call_id": "{written[0]}"') < results_text.index(f'"call_id": "{written[1]}"')
    assert v3.chat_turns(chat) == v3.chat_turns(_written_ids(chat))  # turn by turn, too
    # an id sent as it is that another is hashed to: refused, both named, not merged
    clash = [*chat[:3], {"role": "tool", "content": "3", "tool_call_id": written[0]}]
    with pytest.raises(ChatError, match=rf"message 3: tool call ids '{openai_ids[0]}' and '{written[0]}' are both "
                                        rf"written '{written[0]}'"):
        v3.encode_chat(clash)
    # v2 writes no ids: any is taken as before
    v2 = load_tokenizer(_mistral_file("v2"))
    assert v2.encode_chat(chat[:3]) == _reference(_mistral_file("v2"), chat[:3])


def test_the_chat_template_follows_the_control_tokens_not_the_file_name(tmp_path):
    # HF's Mixtral-8x22B-Instruct-v0.1 ships the v3 vocabulary as tokenizer.model too; Mixtral 8x7B's is v1
    v3, v1 = _mistral_file("v3"), load_tokenizer().path
    (tmp_path / "tokenizer.model").write_bytes(v3.read_bytes())
    (tmp_path / "x.model.v3").write_bytes(v1.read_bytes())
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert load_tokenizer(tmp_path).encode_chat(chat) == _reference(v3, chat)
    assert load_tokenizer(tmp_path / "x.model.v3").encode_chat(chat) == load_tokenizer().encode_chat(chat)
    v7 = next(v1.parent.glob("*.model.v7"))  # [SYSTEM_PROMPT]: another template, refused
    with pytest.raises(ChatError, match=r"\[SYSTEM_PROMPT\] \(Mistral's v7 chat template\)"):
        load_tokenizer(v7).encode_chat(chat)


def test_stream_gives_a_padded_vocabularys_ids_no_text(tok):
    # a model with 32768 rows over Mixtral's 32000 tokens: a sampled id 32569 failed the stream
    # ("token id 32569 is outside the vocabulary"); transformers decodes it as empty text
    ids = tok.encode("naïve café", bos=False)
    dec = tok.stream(context=[tok.bos_id, 32500])
    text = "".join(dec.push(i) for x in ids for i in (x, 32569)) + dec.flush()
    assert text == tok.decode(ids)


CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MIXTRAL = "{{ bos_token }}{% for m in messages %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endfor %}"


@pytest.mark.parametrize("name,write", [
    ("tokenizer_config.json", lambda t: json.dumps({"chat_template": t})),
    ("tokenizer_config.json", lambda t: json.dumps({"chat_template": [{"name": "tool_use", "template": MIXTRAL},
                                                                      {"name": "default", "template": t}]})),
    ("chat_template.jinja", lambda t: t),  # where transformers >= 4.50 saves it
    ("chat_template.json", lambda t: json.dumps({"chat_template": t})),
])
def test_a_checkpoint_with_another_chat_template_is_warned_once(tok, tmp_path, name, write):
    """A Mixtral fine-tune on ChatML (Nous-Hermes-2-Mixtral, Dolphin) was chatted with in [INST] prompts,
    silently: mixlab chat and serve's replies came from a format the model was not trained on."""
    chat = [{"role": "user", "content": "Hi"}]
    (tmp_path / "tokenizer.model").write_bytes(tok.path.read_bytes())
    (tmp_path / name).write_text(write(CHATML), encoding="utf-8")
    mine = load_tokenizer(tmp_path)
    with pytest.warns(UserWarning, match=f"{name} gives this model another chat template than Mixtral-Instruct's"):
        assert mine.encode_chat(chat) == tok.encode_chat(chat)  # the encoding itself is unchanged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mine.encode_chat(chat)  # once
        (tmp_path / name).write_text(write(MIXTRAL), encoding="utf-8")
        load_tokenizer(tmp_path).encode_chat(chat)  # Mixtral-Instruct's own: nothing to say
        assert load_tokenizer().other_template is None


def test_a_gguf_with_another_chat_template_is_warned_once(tok, tmp_path, monkeypatch):
    """llama.cpp's convert_hf_to_gguf.py copies the checkpoint's template into tokenizer.chat_template."""
    pytest.importorskip("gguf")
    import mixlab.checkpoint.gguf as gguf_module
    from conftest import gguf_test_model
    from mixlab.checkpoint.gguf import write_gguf

    real, chat = gguf_module.gguf_writer, [{"role": "user", "content": "Hi"}]
    for template in (CHATML, MIXTRAL):
        monkeypatch.setattr(gguf_module, "gguf_writer",
                            lambda *a, t=template, **k: (w := real(*a, **k)).add_chat_template(t) or w)
        path = write_gguf(gguf_test_model("dense"), tmp_path / "m.gguf", quant="f32", overwrite=True)
        mine = load_tokenizer(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert mine.encode_chat(chat) == tok.encode_chat(chat)
            mine.encode_chat(chat)  # once
        said = [str(w.message) for w in caught]
        assert said == ([f"{path}'s tokenizer.chat_template gives this model another chat template than "
                         "Mixtral-Instruct's (it writes no [INST]); chats are encoded with Mixtral-Instruct's, which "
                         "the model may not have been trained on"] if template is CHATML else [])
