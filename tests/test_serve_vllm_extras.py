"""vLLM's sampling extras that `mixlab serve` refused with a 400 and now honours as vLLM defines them:
`include_stop_str_in_output`, `allowed_token_ids`, `bad_words`, `truncate_prompt_tokens`, `prompt_logprobs`,
`return_tokens_as_token_ids`, `skip_special_tokens`. Each is checked streamed and not, against the same request
through the engine directly (the reference), and its bad values against a 400 naming it. The server is
test_serve.py's (a float32 tiny Mixtral with Mixtral's 32,000-token tokenizer)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import test_serve  # noqa: E402
from mixlab.engine import Engine, SamplingParams  # noqa: E402
from test_serve import CHAT, COMP, NAME, U, _continuation  # noqa: E402

# test_serve.py's fixtures: its tiny model and a server over it (this module's own, module-scoped)
ckpt, model_tok, server, client = test_serve.ckpt, test_serve.model_tok, test_serve.server, test_serve.client

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def engine(model_tok: tuple[Any, Any]) -> Iterator[Engine]:
    model, tok = model_tok
    yield Engine(model, tok, max_batch=4)  # driven here (`run_until_idle`): the reference


def _ref(engine: Engine, ids: list[int], **kw: Any) -> tuple[str, list[int], Any, list[float | None]]:
    """The engine's (text, token ids, stop_reason, logprobs) for one request with `SamplingParams(**kw)`."""
    h = engine.submit(ids, SamplingParams(**kw))
    engine.run_until_idle()
    outs = [o for o in h.result()]
    got = [o for o in outs if o.token_id is not None]
    return "".join(o.text for o in outs), [o.token_id for o in got], outs[-1].stop_reason, [o.logprob for o in got]


def _chat_ids(tok: Any) -> list[int]:
    return tok.encode_chat(U)


def _streamed(client: Any, chat: bool, **kw: Any) -> tuple[dict[int, str], dict[int, Any]]:
    """Each choice's streamed text and the stop_reason of its last chunk."""
    texts: dict[int, str] = {}
    reasons: dict[int, Any] = {}
    create = client.chat.completions.create if chat else client.completions.create
    for c in create(**kw, stream=True):
        for ch in c.model_dump()["choices"]:
            piece = (ch["delta"].get("content") or "") if chat else ch["text"]
            texts[ch["index"]] = texts.get(ch["index"], "") + piece
            if ch.get("finish_reason"):
                reasons[ch["index"]] = ch.get("stop_reason")
    return texts, reasons


def test_include_stop_str_in_output_keeps_the_stop_string(client: Any, engine: Engine,
                                                          model_tok: tuple[Any, Any]) -> None:
    """The matched stop string ends the text (what follows it in the same token is still dropped); stop_reason
    is the string as before; streamed (no text held back) equals unstreamed equals the engine's."""
    _, tok = model_tok
    the = tok.encode("The", bos=False)[-1]
    bias = {str(the): 100}
    ids = tok.encode("x")
    for stop, want in (("e T", " The T"), (" The", " The"), (["he", "q"], " The")):
        kw = dict(model=NAME, prompt="x", max_tokens=6, temperature=0, logit_bias=bias, stop=stop,
                  extra_body={"include_stop_str_in_output": True})
        r = client.completions.create(**kw).model_dump()["choices"][0]
        stops = [stop] if isinstance(stop, str) else stop
        assert (r["text"], r["finish_reason"]) == (want, "stop"), stop
        assert r["stop_reason"] in stops and want.endswith(r["stop_reason"])
        assert _streamed(client, False, **kw) == ({0: want}, {0: r["stop_reason"]})
        ref = _ref(engine, ids, max_tokens=6, logit_bias={the: 100}, stop=stops, include_stop_str_in_output=True)
        assert (ref[0], ref[2]) == (want, r["stop_reason"])
    # a chat reply (decoded alone: no leading space) too, n > 1 sampled with a seed
    kw = dict(model=NAME, messages=U, max_tokens=6, temperature=0.8, seed=5, n=2, logit_bias=bias, stop=" The",
              extra_body={"include_stop_str_in_output": True})
    r = client.chat.completions.create(**kw).model_dump()["choices"]
    assert [(c["message"]["content"], c["stop_reason"]) for c in r] == [("The The", " The")] * 2
    assert _streamed(client, True, **kw) == ({0: "The The", 1: "The The"}, {0: " The", 1: " The"})
    # a stop token (stop_token_ids) is decoded into the text, as vLLM's detokenizer does then; EOS has no text
    kw = dict(model=NAME, prompt="x", max_tokens=6, temperature=0, logit_bias=bias,
              extra_body={"stop_token_ids": [the], "include_stop_str_in_output": True})
    r = client.completions.create(**kw).model_dump()["choices"][0]
    assert (r["text"], r["stop_reason"], r["finish_reason"]) == (" The", the, "stop")
    plain = client.completions.create(**{**kw, "extra_body": {"stop_token_ids": [the]}}).choices[0]
    assert plain.text == ""
    assert _ref(engine, ids, max_tokens=6, logit_bias={the: 100}, stop_token_ids=[the],
                include_stop_str_in_output=True)[0] == " The"
    eos = client.completions.create(model=NAME, prompt="x", max_tokens=4, temperature=0,
                                    logit_bias={str(tok.eos_id): 100},
                                    extra_body={"include_stop_str_in_output": True}).choices[0]
    assert (eos.text, eos.finish_reason) == ("", "stop")


def test_allowed_token_ids_are_the_only_tokens_sampled(client: Any, engine: Engine,
                                                       model_tok: tuple[Any, Any]) -> None:
    """Every other token's logit is -inf before sampling: each choice (n=2, seeded: choice i uses seed + i) holds
    allowed tokens alone and equals the engine's; the logprobs stay the model's (as logit_bias's)."""
    _, tok = model_tok
    allowed = [tok.encode(w, bos=False)[-1] for w in ("red", "green", "blue", "and")] + [tok.eos_id]
    ids = tok.encode(PROMPT)
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11, n=2, logprobs=1,
              extra_body={"allowed_token_ids": allowed, "return_token_ids": True, "ignore_eos": True})
    r = client.completions.create(**kw).model_dump()["choices"]
    for i, c in enumerate(r):
        assert c["token_ids"] and set(c["token_ids"]) <= set(allowed)
        ref = _ref(engine, ids, max_tokens=8, temperature=1.0, seed=11 + i, allowed_token_ids=allowed,
                   ignore_eos=True, logprobs=1)
        assert (c["text"], c["token_ids"]) == ref[:2]
        assert c["logprobs"]["token_logprobs"] == pytest.approx(ref[3], abs=1e-5)
        # the model's own logprobs, as vLLM's default reports them: not renormalised over the allowed tokens
        assert sum(2.718281828 ** v for v in ref[3]) < 0.9 * len(ref[3])
    assert _streamed(client, False, **kw)[0] == {c["index"]: c["text"] for c in r}
    unrestricted = client.completions.create(**{**kw, "extra_body": {"return_token_ids": True, "ignore_eos": True}})
    assert [c.model_dump()["token_ids"] for c in unrestricted.choices] != [c["token_ids"] for c in r]
    # greedy chat: the argmax among the allowed
    chat = client.chat.completions.create(model=NAME, messages=U, max_tokens=5, temperature=0,
                                          extra_body={"allowed_token_ids": allowed[:2], "return_token_ids": True})
    got = chat.model_dump()["choices"][0]
    assert set(got["token_ids"]) <= set(allowed[:2])
    assert got["token_ids"] == _ref(engine, _chat_ids(tok), max_tokens=5, allowed_token_ids=allowed[:2],
                                    decode_alone=True)[1]


def test_bad_words_follow_vllms_rule(client: Any, engine: Engine, model_tok: tuple[Any, Any]) -> None:
    """vLLM's rule: a word's last token is banned where the output's last tokens are its others (a one-token
    word: always); the word is encoded alone and, where that spells it with another first token and as many
    tokens, with a leading space."""
    from mixlab.engine.sampling import bad_words_ids, banned_tokens

    _, tok = model_tok
    the = tok.encode("The", bos=False)[-1]
    alone, spaced = tok.encode("The", bos=False), tok.encode(" The", bos=False)
    want = [alone] + ([spaced] if spaced[0] != alone[0] and len(spaced) == len(alone) else [])
    assert bad_words_ids(tok, ["  The"]) == want  # leading spaces stripped, as vLLM does
    assert banned_tokens([[5, 6, 7]], [1, 5, 6]) == [7] and banned_tokens([[5, 6, 7]], [5, 6, 1]) == []
    assert banned_tokens([[5, 6, 7]], [6]) == [] and banned_tokens([[9]], []) == [9]
    bias = {str(the): 100}
    # one token: never, though logit_bias all but forces it
    kw = dict(model=NAME, prompt="x", max_tokens=6, temperature=0, logit_bias=bias,
              extra_body={"bad_words": ["The"], "return_token_ids": True})
    r = client.completions.create(**kw).model_dump()["choices"][0]
    assert the not in r["token_ids"] and len(r["token_ids"]) > 1
    ids = tok.encode("x")
    assert (r["text"], r["token_ids"]) == _ref(engine, ids, max_tokens=6, logit_bias={the: 100},
                                                bad_words=["The"])[:2]
    assert _streamed(client, False, **kw)[0] == {0: r["text"]}
    # two tokens ("The The"): the second never follows the first, which still comes
    kw = dict(model=NAME, messages=U, max_tokens=8, temperature=0, logit_bias=bias,
              extra_body={"bad_words": ["The The"], "return_token_ids": True, "ignore_eos": True})
    r = client.chat.completions.create(**kw).model_dump()["choices"][0]
    out = r["token_ids"]
    assert out.count(the) >= 3 and all(out[k:k + 2] != [the, the] for k in range(len(out) - 1)), out
    assert out == _ref(engine, _chat_ids(tok), max_tokens=8, logit_bias={the: 100}, bad_words=["The The"],
                       decode_alone=True, ignore_eos=True)[1]
    assert _streamed(client, True, **kw)[0] == {0: r["message"]["content"]}


def test_truncate_prompt_tokens_keeps_the_prompt_s_last_tokens(client: Any, engine: Engine,
                                                               model_tok: tuple[Any, Any]) -> None:
    _, tok = model_tok
    ids = tok.encode("Once upon a time there was a quick brown fox that jumped")
    kw = dict(model=NAME, prompt=ids, max_tokens=6, temperature=0, echo=True, logprobs=0)
    r = client.completions.create(**kw, extra_body={"truncate_prompt_tokens": 5})
    assert r.usage.prompt_tokens == 5
    new = _ref(engine, ids[-5:], max_tokens=6)[1]
    assert r.choices[0].text.endswith(_continuation(tok, ids[-5:], new))
    assert len(r.choices[0].logprobs.tokens) == 5 + 6  # the echoed prompt is the truncated one
    # -1: the model's context (the whole of this prompt); a text prompt too
    full = client.completions.create(**kw, extra_body={"truncate_prompt_tokens": -1})
    assert full.usage.prompt_tokens == len(ids)
    text = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0,
                                     extra_body={"truncate_prompt_tokens": 3})
    p = tok.encode(PROMPT)[-3:]
    assert text.usage.prompt_tokens == 3 and text.choices[0].text == _continuation(tok, p, _ref(engine, p,
                                                                                                  max_tokens=4)[1])
    # a chat: the template's ids, truncated
    chat = client.chat.completions.create(model=NAME, messages=U, max_tokens=4, temperature=0,
                                          extra_body={"truncate_prompt_tokens": 4})
    c = _chat_ids(tok)[-4:]
    assert chat.usage.prompt_tokens == 4
    assert chat.choices[0].message.content == _ref(engine, c, max_tokens=4, decode_alone=True)[0]


def test_return_tokens_as_token_ids_names_each_logprob_token_by_its_id(client: Any) -> None:
    """Each logprob `token` (chosen, alternatives, an echoed prompt's) is "token_id:<id>"; the text, the
    logprobs, `bytes` and `text_offset` are those without it."""
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2, echo=True)
    on = client.completions.create(**kw, extra_body={"return_tokens_as_token_ids": True,
                                                     "return_token_ids": True}).model_dump()["choices"][0]
    off = client.completions.create(**kw).model_dump()["choices"][0]
    lp, lp0 = on["logprobs"], off["logprobs"]
    assert on["text"] == off["text"] and lp["token_logprobs"] == lp0["token_logprobs"]
    assert lp["text_offset"] == lp0["text_offset"]
    assert lp["tokens"] == [f"token_id:{i}" for i in on["prompt_token_ids"] + on["token_ids"]]
    for top, top0 in zip(lp["top_logprobs"][1:], lp0["top_logprobs"][1:], strict=True):
        assert all(re.fullmatch(r"token_id:\d+", k) for k in top) and sorted(top.values()) == sorted(top0.values())
    streamed = [t for c in client.completions.create(**{**kw, "echo": False}, stream=True,
                                                     extra_body={"return_tokens_as_token_ids": True})
                for t in c.choices[0].logprobs.tokens]
    assert streamed == [f"token_id:{i}" for i in on["token_ids"]]
    # chat
    ckw = dict(model=NAME, messages=U, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    on = client.chat.completions.create(**ckw, extra_body={"return_tokens_as_token_ids": True,
                                                           "return_token_ids": True}).model_dump()["choices"][0]
    off = client.chat.completions.create(**ckw).model_dump()["choices"][0]
    assert [e["token"] for e in on["logprobs"]["content"]] == [f"token_id:{i}" for i in on["token_ids"]]
    assert [e["bytes"] for e in on["logprobs"]["content"]] == [e["bytes"] for e in off["logprobs"]["content"]]
    assert all(re.fullmatch(r"token_id:\d+", t["token"]) for e in on["logprobs"]["content"]
               for t in e["top_logprobs"])


def test_prompt_logprobs_are_vllms_with_ranks(client: Any, model_tok: tuple[Any, Any]) -> None:
    """vLLM's prompt_logprobs=N: None for the first prompt token, then {id: {"logprob", "rank", "decoded_token"}}
    of the prompt's token (first) and the N most likely; a completion choice's own, a chat response's at its top
    level; equal to a plain forward pass. With echo + logprobs=M, the echo keeps its M alternatives."""
    import torch

    model, tok = model_tok
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).float(), -1)[0]

    def check(got: list[Any], prompt: list[int], ref: torch.Tensor, n: int) -> None:
        assert got[0] is None and len(got) == len(prompt)
        for k in range(1, len(prompt)):
            row, entry = ref[k - 1], got[k]
            own = entry[str(prompt[k])]
            assert list(entry)[0] == str(prompt[k])  # the prompt's token first, as vLLM builds it
            assert own["logprob"] == pytest.approx(float(row[prompt[k]]), abs=1e-4)
            assert own["rank"] == int((row > row[prompt[k]]).sum()) + 1
            best = torch.topk(row, n).indices.tolist()
            assert set(entry) == {str(i) for i in best} | {str(prompt[k])}
            for r, i in enumerate(best):
                assert entry[str(i)]["rank"] == r + 1
                assert entry[str(i)]["logprob"] == pytest.approx(float(row[i]), abs=1e-4)

    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=2, temperature=0, n=2,
                                  extra_body={"prompt_logprobs": 3}).model_dump()
    for c in r["choices"]:
        check(c["prompt_logprobs"], ids, ref, 3)
        assert c["logprobs"] is None
    piece = tok.id_to_piece(ids[2])
    assert r["choices"][0]["prompt_logprobs"][2][str(ids[2])]["decoded_token"] == piece.replace("\u2581", " ")
    # with echo + logprobs=1: the echo's alternatives stay 1 (+ the token), prompt_logprobs has its 4
    e = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=2, temperature=0, echo=True, logprobs=1,
                                  extra_body={"prompt_logprobs": 4}).model_dump()["choices"][0]
    check(e["prompt_logprobs"], ids, ref, 4)
    assert all(len(t) <= 2 for t in e["logprobs"]["top_logprobs"][1:])
    # 0: the prompt's own tokens alone
    z = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=1,
                                  extra_body={"prompt_logprobs": 0}).model_dump()["choices"][0]
    assert [list(x) for x in z["prompt_logprobs"][1:]] == [[str(i)] for i in ids[1:]]
    # a chat: the response's, of the templated prompt
    chat_ids = tok.encode_chat(U)
    with torch.no_grad():
        cref = torch.log_softmax(model(torch.tensor([chat_ids])).float(), -1)[0]
    c = client.chat.completions.create(model=NAME, messages=U, max_tokens=2, extra_body={"prompt_logprobs": 2})
    check(c.model_dump()["prompt_logprobs"], chat_ids, cref, 2)
    # streamed: vLLM refuses N > 0; 0 asks for nothing a stream carries
    s = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=2, stream=True,
                                  extra_body={"prompt_logprobs": 0})
    assert len([x for x in s]) >= 1


def test_skip_special_tokens_false_writes_control_tokens_into_the_text(client: Any, engine: Engine, ckpt: Any,
                                                                      model_tok: tuple[Any, Any]) -> None:
    """Control tokens decode to their names, as transformers' tokenizer.json decodes them (and Mixtral's
    SentencePiece model now too, alike); a stop token still adds none, unless include_stop_str_in_output."""
    from mixlab import load_tokenizer

    _, tok = model_tok
    sp = load_tokenizer()  # Mixtral's tokenizer.model, whose tokenizer.json the server's is
    for ids in ([1, 22557, 28725, 2, 1, 22557], [22557, 1], [1, 28705, 22557], [1, 13, 2], [28705, 1]):
        assert sp.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False), ids
        assert sp.decode(ids) == tok.decode(ids) and "<s>" not in tok.decode(ids)
    bos = {str(tok.bos_id): 100}
    kw = dict(model=NAME, prompt="x", max_tokens=3, temperature=0, logit_bias=bos,
              extra_body={"skip_special_tokens": False})
    r = client.completions.create(**kw).choices[0]
    assert r.text == "<s><s><s>" and client.completions.create(**{**kw, "extra_body": {}}).choices[0].text == ""
    assert _streamed(client, False, **kw)[0] == {0: "<s><s><s>"}
    assert _ref(engine, tok.encode("x"), max_tokens=3, logit_bias={tok.bos_id: 100},
                skip_special_tokens=False)[0] == "<s><s><s>"
    chat = client.chat.completions.create(model=NAME, messages=U, max_tokens=2, temperature=0, logit_bias=bos,
                                          extra_body={"skip_special_tokens": False})
    assert chat.choices[0].message.content == "<s><s>"
    # EOS ends the output without text, unless it is to be kept (vLLM's detokenizer then decodes it too)
    eos = dict(model=NAME, prompt="x", max_tokens=3, temperature=0, logit_bias={str(tok.eos_id): 100})
    assert client.completions.create(**eos, extra_body={"skip_special_tokens": False}).choices[0].text == ""
    kept = client.completions.create(**eos, extra_body={"skip_special_tokens": False,
                                                        "include_stop_str_in_output": True}).choices[0]
    assert (kept.text, kept.finish_reason) == ("</s>", "stop")


BAD = [
    (COMP, {"prompt": "x", "include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
    (COMP, {"prompt": "x", "allowed_token_ids": [5, 32000]}, "allowed_token_ids"),
    (CHAT, {"messages": U, "allowed_token_ids": []}, "allowed_token_ids"),
    (CHAT, {"messages": U, "allowed_token_ids": [-1]}, "allowed_token_ids"),
    (COMP, {"prompt": "x", "bad_words": [" "]}, "bad_words"),
    (COMP, {"prompt": "x", "bad_words": "The"}, "bad_words"),
    (CHAT, {"messages": U, "bad_words": ["x"] * 257}, "bad_words"),
    (COMP, {"prompt": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    (COMP, {"prompt": "x", "truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    (CHAT, {"messages": U, "truncate_prompt_tokens": 513}, "truncate_prompt_tokens"),
    (CHAT, {"messages": U, "return_tokens_as_token_ids": 1}, "return_tokens_as_token_ids"),
    (COMP, {"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    (CHAT, {"messages": U, "prompt_logprobs": -1}, "prompt_logprobs"),
    (COMP, {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    (CHAT, {"messages": U, "skip_special_tokens": "no"}, "skip_special_tokens"),
    # the Responses API, which vLLM gives none of them, still refuses them
    ("/v1/responses", {"input": "hi", "bad_words": ["a"]}, "bad_words"),
    ("/v1/responses", {"input": "hi", "skip_special_tokens": False}, "skip_special_tokens"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_values_are_a_400_naming_the_parameter(server: str, path: str, body: dict[str, Any], param: str) -> None:
    r = httpx.post(server + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].startswith(param) and param in err["message"], err  # allowed_token_ids[0]: its element
    # what was wrong with the value, not the refusal of the parameter that this server gave before
    assert ("is not supported" in err["message"]) == (path == "/v1/responses"), err


def test_truncate_prompt_tokens_over_the_context_is_vllms_400(server: str) -> None:
    r = httpx.post(server + COMP, json={"prompt": "x", "truncate_prompt_tokens": 600}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == ("truncate_prompt_tokens value (600) is greater than max_model_len (512). "
                                            "Please, select a smaller truncation size.")
