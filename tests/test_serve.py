"""`mixlab serve`: the OpenAI-compatible server, driven with the official `openai` client on a free
loopback port (float32 tiny Mixtral with Mixtral's 32,000-token tokenizer). Outputs are checked
against `mixlab.generate` and a plain forward pass; bad requests against OpenAI's error body."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
_engine = pytest.importorskip("mixlab.engine")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from conftest import hf_mixtral, hf_tokenizer_json, metric, until  # noqa: E402
from mixlab import generate, load_model, load_tokenizer  # noqa: E402
from mixlab.serve import ServerConfig, ServerThread, create_app  # noqa: E402

Engine, SamplingParams = _engine.Engine, _engine.SamplingParams
ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 512
NAME = "tiny"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = hf_mixtral(tmp_path_factory.mktemp("serve"), vocab_size=32000, hidden_size=32, intermediate_size=48,
                      max_position_embeddings=CONTEXT)
    hf_tokenizer_json(path)
    return path


@pytest.fixture(scope="module")
def model_tok(ckpt: Path) -> tuple[Any, Any]:
    return load_model(ckpt, dtype="float32"), load_tokenizer(ckpt)


def _config(model: Any, **kw: Any) -> ServerConfig:
    moe = model.config.moe
    info = {"layers": model.config.n_layers, "experts": moe.num_experts, "experts_per_token": moe.top_k,
            "vocab_size": model.config.vocab_size}
    return ServerConfig(model_name=NAME, context_len=CONTEXT, model_info=info, **kw)


ENGINES: dict[str, Engine] = {}  # the module server's engine, by URL (a test slows its steps down)


@pytest.fixture(scope="module")
def server(model_tok: tuple[Any, Any]) -> Iterator[str]:
    model, tok = model_tok
    with Engine(model, tok, max_batch=8) as engine, ServerThread(create_app(engine, tok, _config(model))) as url:
        ENGINES[url] = engine
        yield url
        del ENGINES[url]


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def _reference(model: Any, tok: Any, ids: list[int], n: int, temperature: float, seed: int | None) -> list[int]:
    out = generate(model, [ids], max_new_tokens=n, temperature=temperature, seed=seed)[0]
    return out


def _continuation(tok: Any, prompt: list[int], new: list[int]) -> str:
    """The text `new` adds after `prompt` (what the engine's stream decoder emits)."""
    ctx = prompt[-4:]
    return tok.decode(ctx + new)[len(tok.decode(ctx)):]


# -- outputs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature,seed", [(0.0, None), (0.9, 1234)])
def test_chat_streamed_equals_unstreamed_equals_generate(client: Any, model_tok: tuple[Any, Any],
                                                         temperature: float, seed: int | None) -> None:
    model, tok = model_tok
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    kw = dict(model=NAME, messages=messages, max_tokens=24, temperature=temperature, seed=seed)
    full = client.chat.completions.create(**kw)
    text = full.choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]

    ids = tok.encode_chat(messages)
    new = _reference(model, tok, ids, 24, temperature, seed)
    assert full.usage.prompt_tokens == len(ids) and full.usage.completion_tokens == len(new)
    assert text == tok.decode(new)
    assert full.choices[0].finish_reason == ("stop" if new[-1] == tok.eos_id else "length")


def test_chat_with_a_v3_tokenizer_uses_its_template(tmp_path: Path) -> None:
    """/v1/chat/completions on a model with Mixtral 8x22B Instruct's tokenizer.model.v3 (vocabulary 32,768):
    the prompt is mistral-common's v3 encoding, the reply generate's continuation of it."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from mixlab import save_model
    from mixlab.config import get_preset
    from mixlab.model import Transformer

    v3 = next(load_tokenizer().path.parent.glob("mistral_instruct_tokenizer_*.model.v3"))
    m = Transformer(get_preset("tiny-moe").replace(vocab_size=32768, max_seq_len=CONTEXT))
    m.init_weights(std=0.3, seed=0)
    save_model(m, tmp_path)
    (tmp_path / "tokenizer.model.v3").write_bytes(v3.read_bytes())
    model, tok = load_model(tmp_path, dtype="float32"), load_tokenizer(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]
    ids = MistralTokenizer.from_file(str(v3)).encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    new = _reference(model, tok, ids, 12, 0.0, None)
    with Engine(model, tok, max_batch=2) as engine, ServerThread(create_app(engine, tok, _config(model))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        full = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    assert full.usage.prompt_tokens == len(ids) and full.usage.completion_tokens == len(new)
    assert full.choices[0].message.content == tok.decode(new)


def test_speculative_tokens_stream_the_same_completion(ckpt: Path, model_tok: tuple[Any, Any]) -> None:
    """serve --speculative-tokens: a greedy completion whose drafts are accepted streams, several tokens a
    step, the text, token ids and logprobs a server without it gives (and generate's tokens)."""
    _, tok = model_tok
    model = load_model(ckpt, dtype="float32")
    with torch.no_grad():  # attention's output zeroed: each token a function of the last, so a prompt
        for block in model.layers:  # holding the model's own continuation has drafts that are right
            block.attn.wo.weight.zero_()
    ref = generate(model, [tok.encode("The quick brown fox")], max_new_tokens=30, stop_at_eos=False)[0]
    prompt = tok.encode("The quick brown fox") + ref + ref[:1]
    kw = dict(model=NAME, prompt=prompt, max_tokens=20, temperature=0, logprobs=2,
              extra_body={"return_token_ids": True})
    answers = []
    for k in (0, 4):
        with Engine(model, tok, max_batch=2) as engine, \
                ServerThread(create_app(engine, tok, _config(model, speculative_tokens=k))) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            full = client.completions.create(**kw).choices[0]
            chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True) if c.choices]
            answers.append((full, chunks))
            drafted, accepted = engine.stats()["draft_tokens"], engine.stats()["accepted_tokens"]
            assert metric(url, "mixlab_speculative_draft_tokens_total") == drafted
            assert metric(url, "mixlab_speculative_accepted_tokens_total") == accepted
        assert "".join(c.text for c in chunks) == full.text
        assert [i for c in chunks for i in c.token_ids or []] == full.token_ids == ref[1:21]
        # every draft right: 4 + 4 + 4 + 3 tokens after the first (the prefill's), in 5 steps a request
        assert drafted == accepted == (0 if k == 0 else 2 * 15)
    (plain, plain_chunks), (spec, spec_chunks) = answers
    assert spec.text == plain.text and len(spec_chunks) == len(plain_chunks)
    assert spec.logprobs.tokens == plain.logprobs.tokens
    assert spec.logprobs.token_logprobs == pytest.approx(plain.logprobs.token_logprobs, abs=1e-4)


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 7)])
def test_completion_streamed_equals_unstreamed_equals_generate(client: Any, model_tok: tuple[Any, Any],
                                                               temperature: float, seed: int | None) -> None:
    model, tok = model_tok
    prompt = "The quick brown fox"
    kw = dict(model=NAME, prompt=prompt, max_tokens=20, temperature=temperature, seed=seed)
    full = client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert streamed == full.choices[0].text
    ids = tok.encode(prompt)
    new = _reference(model, tok, ids, 20, temperature, seed)
    assert full.choices[0].text == _continuation(tok, ids, new)
    # a prompt given as token ids is the same request
    by_ids = client.completions.create(**{**kw, "prompt": ids})
    assert by_ids.choices[0].text == full.choices[0].text


def test_return_token_ids_are_generates_and_the_tokenizers(client: Any, model_tok: tuple[Any, Any]) -> None:
    """vLLM's return_token_ids (it was a 400): each choice's generated ids (`token_ids`, a stop token's
    included) and the prompt's (`prompt_token_ids`: the chat response's, each completion choice's);
    streamed, the prompt's on a choice's first chunk and each chunk's token_ids those of its delta."""
    model, tok = model_tok
    messages = [{"role": "user", "content": "Name three colours."}]
    prompt = tok.encode_chat(messages)
    new = _reference(model, tok, prompt, 24, 0.0, None)
    kw: dict[str, Any] = dict(model=NAME, messages=messages, max_tokens=24, temperature=0.0,
                              extra_body={"return_token_ids": True})
    full = client.chat.completions.create(**kw).model_dump()
    assert full["prompt_token_ids"] == prompt and full["choices"][0]["token_ids"] == new
    chunks = [c.model_dump() for c in client.chat.completions.create(**kw, stream=True)]
    assert chunks[0]["prompt_token_ids"] == prompt and all(c.get("prompt_token_ids") is None for c in chunks[1:])
    assert [i for c in chunks for i in c["choices"][0].get("token_ids") or []] == new
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == tok.decode(new)

    texts = ["The quick brown fox", "Once upon"]  # a batch of prompts, two choices each (greedy: equal)
    prompts = [tok.encode(t) for t in texts]
    news = [_reference(model, tok, p, 12, 0.0, None) for p in prompts]
    kw = dict(model=NAME, prompt=texts, max_tokens=12, temperature=0.0, n=2, echo=True,
              extra_body={"return_token_ids": True})
    full = client.completions.create(**kw).model_dump()
    assert [(c["prompt_token_ids"], c["token_ids"]) for c in full["choices"]] == [
        (p, n) for p, n in zip(prompts, news, strict=True) for _ in range(2)]
    firsts: dict[int, list[int]] = {}
    got: dict[int, list[int]] = {i: [] for i in range(4)}
    for c in client.completions.create(**kw, stream=True):
        ch = c.model_dump()["choices"][0]
        assert (ch.get("prompt_token_ids") is not None) == (ch["index"] not in firsts), ch
        firsts.setdefault(ch["index"], ch.get("prompt_token_ids"))
        got[ch["index"]] += ch.get("token_ids") or []
    assert firsts == {k: prompts[k // 2] for k in range(4)} and got == {k: news[k // 2] for k in range(4)}
    # not asked for: not there
    plain = client.completions.create(model=NAME, prompt="x", max_tokens=2).model_dump()
    assert plain["choices"][0].get("token_ids") is None and plain.get("prompt_token_ids") is None


def test_tools_with_tool_choice_none_are_accepted_and_not_rendered(client: Any) -> None:
    """tools with tool_choice "none" (no tool may be called) was a 400, where vLLM accepts it: Mixtral-Instruct
    v0.1's template has no tools, so the reply is the one without them. Tools that could be called
    (tool_choice "auto", left out, or forced: "required") are refused naming tools (a v1 template has none; tool
    calling with a v3 one: test_serve_tools.py)."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    kw: dict[str, Any] = dict(model=NAME, messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=8,
                              temperature=0.0)
    with_tools = client.chat.completions.create(**kw, tools=tools, tool_choice="none")
    without = client.chat.completions.create(**kw)
    assert with_tools.choices[0].message.content == without.choices[0].message.content
    assert with_tools.usage.prompt_tokens == without.usage.prompt_tokens
    for choice in ("auto", None, "required"):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**kw, tools=tools, **({"tool_choice": choice} if choice else {}))
        assert e.value.body["param"] == "tools" and 'none' in e.value.body["message"], e.value.body


def test_seeds_2_to_the_32_apart_sample_differently(client: Any, model_tok: tuple[Any, Any]) -> None:
    """torch's CPU generator keeps a seed's low 32 bits, so seed 5 and 5 + 2^32 (or -1 and 2^32 - 1)
    gave one text; a seed outside [0, 2^32) is mixed first. Seeds in [0, 2^32) seed as before, and a
    large seed still gives streamed == non-streamed == mixlab.generate."""
    from mixlab.engine.sampling import seed_generator

    model, tok = model_tok
    prompt = "The quick brown fox"
    kw = dict(model=NAME, prompt=prompt, max_tokens=12, temperature=1.0)
    text = {s: client.completions.create(**kw, seed=s).choices[0].text for s in (5, 5 + 2**32, 2**32 - 1, -1)}
    assert text[5] != text[5 + 2**32] and text[2**32 - 1] != text[-1], text
    assert seed_generator(torch.Generator(), 5).initial_seed() == 5  # as manual_seed(5): samples unchanged
    ids = tok.encode(prompt)
    for s in (5, 5 + 2**32, -1):
        streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, seed=s, stream=True))
        assert streamed == text[s] == _continuation(tok, ids, _reference(model, tok, ids, 12, 1.0, s))
    # n > 1: choice i uses seed + i, so choice 1 of seed 2^32 - 1 (2^32) is not seed 0's stream
    two = client.completions.create(**kw, seed=2**32 - 1, n=2).choices
    assert two[0].text == text[2**32 - 1] and two[1].text != client.completions.create(**kw, seed=0).choices[0].text


def test_chat_continues_an_assistant_prefix(client: Any, server: str, model_tok: tuple[Any, Any]) -> None:
    """Mistral's `"prefix": true` on a last assistant message: the reply continues it (the 400 for a last
    assistant message asked for prefix=True, which the server dropped)."""
    model, tok = model_tok
    messages = [{"role": "user", "content": "Name three colours."}, {"role": "assistant", "content": "Red,",
                                                                      "prefix": True}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    ids = tok.encode_chat(messages)
    assert ids[-1] != tok.eos_id and r.usage.prompt_tokens == len(ids)
    new = _reference(model, tok, ids, 8, 0.0, None)
    r_content = r.choices[0].message.content
    assert r_content == _continuation(tok, ids, new)  # its leading space kept
    assert httpx.post(server + "/tokenize", json={"messages": messages}).json()["tokens"] == ids
    r = httpx.post(server + CHAT, json={"messages": [{**messages[1], "role": "user"}, messages[0]]})
    assert r.status_code == 400 and "prefix" in r.json()["error"]["message"], r.text
    # vLLM's continue_final_message says the same of a last assistant message without "prefix" (it got a 400)
    plain = [messages[0], {"role": "assistant", "content": "Red,"}]
    v = client.chat.completions.create(model=NAME, messages=plain, max_tokens=8, temperature=0,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert v.choices[0].message.content == r_content and v.usage.prompt_tokens == len(ids)
    r = httpx.post(server + "/tokenize", json={"messages": plain, "continue_final_message": True})
    assert r.json()["tokens"] == ids, r.text  # as vLLM's /tokenize takes it too
    for extra, param in (({"continue_final_message": True, "add_generation_prompt": True}, "add_generation_prompt"),
                         ({"continue_final_message": True}, "continue_final_message")):
        body = {"messages": plain if param == "add_generation_prompt" else [messages[0]], **extra}
        r = httpx.post(server + CHAT, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_chat_reply_that_begins_with_a_space_token_drops_one_space(client: Any, model_tok: tuple[Any, Any]) -> None:
    """A reply whose first token is "▁" alone, then "▁Hello", is " Hello" (tokenizer.decode drops the
    first piece's space only); the server dropped the next token's space too: "Hello"."""
    _, tok = model_tok
    space, hello = tok.encode(" Hello", bos=False)[0], tok.encode("Hello", bos=False)[-1]
    assert tok.id_to_piece(space) == "\u2581" and tok.id_to_piece(hello) == "\u2581Hello"
    # the space first (bias 100), then Hello (99, over the space's 100 - 2 once it appeared)
    kw = dict(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0,
              logit_bias={str(space): 100, str(hello): 99}, presence_penalty=2.0, logprobs=True)
    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.content == tok.decode([space, hello]) == " Hello"
    assert "".join(e.token for e in r.choices[0].logprobs.content) == " Hello"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True))
    assert streamed == " Hello"


def test_a_chat_reply_s_stop_strings_match_the_text_the_client_gets(client: Any, model_tok: tuple[Any, Any]) -> None:
    """A chat reply drops its first word's leading space, but the stop strings were matched on the text
    with it: a reply "The The ..." with stop " The" came back empty (the dropped space matched), and
    stop " " cut it before its first word. They now match the text the client gets (the reply decoded
    alone); a completion, which keeps the space, still stops at once."""
    _, tok = model_tok
    the = tok.encode("The", bos=False)[-1]
    assert tok.id_to_piece(the) == "\u2581The"
    kw = dict(model=NAME, messages=U, max_tokens=6, temperature=0, logit_bias={str(the): 100})
    assert client.chat.completions.create(**kw).choices[0].message.content == "The The The The The The"
    for stop, want in ((" The", "The"), (" ", "The"), ("The", ""), (["e T", " The"], "Th")):
        r = client.chat.completions.create(**kw, stop=stop)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, "stop"), stop
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stop=stop,
                                                                                                    stream=True))
        assert streamed == want, stop
    c = client.completions.create(model=NAME, prompt="x", max_tokens=6, temperature=0, logit_bias={str(the): 100},
                                  stop=" The")
    assert (c.choices[0].text, c.choices[0].finish_reason) == ("", "stop")


def test_logit_bias_through_the_openai_client(client: Any, model_tok: tuple[Any, Any]) -> None:
    _, tok = model_tok
    kw = dict(model=NAME, prompt="The quick brown fox", max_tokens=6, temperature=0)
    ids = tok.encode("The quick brown fox")
    plain = client.completions.create(**kw).choices[0].text
    x = tok.encode("x")[-1]
    forced = client.completions.create(**kw, logit_bias={str(x): 100}).choices[0].text
    assert forced == _continuation(tok, ids, [x] * 6) != plain
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          logit_bias={str(x): 100}, temperature=0.9, seed=3)
    assert chat.choices[0].message.content.strip() == _continuation(tok, ids, [x] * 4).strip()
    # vLLM's min_tokens: no EOS before it, even one that logit_bias all but forces
    held = client.completions.create(**{**kw, "max_tokens": 8}, logit_bias={str(tok.eos_id): 100},
                                     extra_body={"min_tokens": 2})
    assert held.usage.completion_tokens == 3 and held.choices[0].finish_reason == "stop"


def test_logprobs_concatenate_to_the_text_and_match_the_model(client: Any, model_tok: tuple[Any, Any]) -> None:
    model, tok = model_tok
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=16,
                                       temperature=0.8, seed=3, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True) and t.logprob <= tops[0] + 1e-6
        assert bytes(t.bytes) == t.token.encode()

    prompt = "Consecutive tokens often share"
    c = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=2, echo=True)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and c.choices[0].text.startswith(prompt)
    assert lp.text_offset == [sum(map(len, lp.tokens[:k])) for k in range(len(lp.tokens))]
    # streamed, the chunks' logprobs add up to the same lists (each text_offset in the choice's whole text)
    got: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=2,
                                           echo=True, stream=True):
        for key, values in got.items():
            values += getattr(chunk.choices[0].logprobs, key)
    assert got["tokens"] == lp.tokens and got["text_offset"] == lp.text_offset
    assert got["token_logprobs"][1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    # the prompt's logprobs (echo) and the greedy tokens' equal a plain forward pass
    ids = tok.encode(prompt)
    new = _reference(model, tok, ids, 12, 0.0, None)
    seq = torch.tensor([ids + new])
    with torch.no_grad():
        ref = torch.log_softmax(model(seq).float(), -1)[0]
    expect = [float(ref[i, seq[0, i + 1]]) for i in range(seq.shape[1] - 1)]
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expect, abs=1e-4)
    # every position's alternatives, the prompt's included (lm-eval's is_greedy compares with their best)
    best = ref.max(-1).values.tolist()
    assert lp.top_logprobs[0] is None
    assert [max(t.values()) for t in lp.top_logprobs[1:]] == pytest.approx(best[: len(lp.tokens) - 1], abs=1e-4)
    assert all(len(t) <= 3 for t in lp.top_logprobs[1:])  # the top 2, then the token itself if it is not among them
    assert all(v in t.values() for t, v in zip(lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True))
    # logprobs=0 asks for no alternatives: each entry still names its token (it was {})
    z = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0, logprobs=0, echo=True)
    zl = z.choices[0].logprobs
    assert zl.top_logprobs[0] is None
    assert [list(t.values()) for t in zl.top_logprobs[1:]] == [[v] for v in zl.token_logprobs[1:]]
    assert [next(iter(t)).strip() for t in zl.top_logprobs[1:]] == [s.strip() for s in zl.tokens[1:]]
    for k in range(len(ids), len(lp.tokens)):  # greedy: the chosen token is the most likely one
        assert max(lp.top_logprobs[k].values()) == pytest.approx(lp.token_logprobs[k], abs=1e-6)
    # scoring only (max_tokens=0 with echo), a batch of token-id prompts, as evaluation harnesses send
    s = client.completions.create(model=NAME, prompt=[ids, ids[:3]], max_tokens=0, echo=True, logprobs=1)
    assert [ch.index for ch in s.choices] == [0, 1]
    assert s.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expect[: len(ids) - 1], abs=1e-4)
    assert len(s.choices[1].logprobs.token_logprobs) == 3 and s.usage.completion_tokens == 0
    # streamed too (it was a 400): each prompt's chunk, then one that finishes it, as vLLM streams it
    chunks = list(client.completions.create(model=NAME, prompt=[ids, ids[:3]], max_tokens=0, echo=True, logprobs=1,
                                            stream=True, stream_options={"include_usage": True}))
    for ch in s.choices:
        mine = [x.choices[0] for x in chunks if x.choices and x.choices[0].index == ch.index]
        assert "".join(x.text for x in mine) == ch.text and [x.finish_reason for x in mine] == [None, "length"]
        assert sum((x.logprobs.tokens for x in mine), []) == ch.logprobs.tokens
        assert sum((x.logprobs.top_logprobs for x in mine), []) == ch.logprobs.top_logprobs
    assert chunks[-1].usage.completion_tokens == 0 and chunks[-1].usage.prompt_tokens == s.usage.prompt_tokens


def test_top_logprobs_at_the_start_of_a_text_lose_its_leading_space(client: Any, model_tok: tuple[Any, Any]) -> None:
    """The first token of a chat reply or an echoed prompt is reported without its leading space ("The"),
    but its top_logprobs kept theirs (" The", " patches"), so the chosen token's key was not its token.
    There the alternatives are now shown as the text would begin with them: decode([alternative])."""
    from mixlab.serve.common import token_piece

    model, tok = model_tok
    ids = tok.encode_chat(U)
    r = client.chat.completions.create(model=NAME, messages=U, max_tokens=2, temperature=0, logprobs=True,
                                       top_logprobs=5)
    with torch.no_grad():
        logits = model(torch.tensor([ids + [tok.encode("The", bos=False)[-1]]]))[0]
        top = logits[-2].topk(5).indices.tolist()
    first = r.choices[0].logprobs.content[0]
    assert [t.token for t in first.top_logprobs] == [tok.decode([a]) for a in top]
    assert first.token == first.top_logprobs[0].token  # greedy
    # a reply forced to begin with "The": the same alternatives, and the next token's are their own pieces
    r = client.chat.completions.create(model=NAME, messages=U, max_tokens=2, temperature=0, logprobs=True,
                                       top_logprobs=5, logit_bias={str(tok.encode("The", bos=False)[-1]): 100})
    first, second = r.choices[0].logprobs.content
    assert first.token == "The" and [t.token for t in first.top_logprobs] == [tok.decode([a]) for a in top]
    alternatives = logits[-1].topk(5).indices.tolist()
    assert [t.token for t in second.top_logprobs] == [token_piece(tok, a)[0] for a in alternatives]
    prompt = "The quick brown fox"
    for logprobs in (0, 5):
        c = client.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=logprobs)
        lp = c.choices[0].logprobs
        assert lp.tokens[:3] == ["", "The", " quick"] and "".join(lp.tokens) == c.choices[0].text == prompt
        assert all(token in top for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:], strict=True)), lp
    with torch.no_grad():
        top = model(torch.tensor([tok.encode(prompt)]))[0, 0].topk(5).indices.tolist()
    assert set(lp.top_logprobs[1]) == {tok.decode([a]) for a in top} | {"The"}
    # a completion of an empty prompt (BOS alone): its first token begins the text too
    for stream in (False, True):
        r = client.completions.create(model=NAME, prompt=["", "x"], max_tokens=1, temperature=0, logprobs=5,
                                      stream=stream)
        choices = [ch.choices[0] for ch in r if ch.choices[0].logprobs.tokens] if stream else r.choices
        first = {ch.index: ch.logprobs for ch in choices}  # (streamed: one chunk a token)
        assert set(first[0].top_logprobs[0]) == {tok.decode([a]) for a in top}
        assert first[0].tokens[0] in first[0].top_logprobs[0]
        assert set(first[1].top_logprobs[0]) != set(first[0].top_logprobs[0])


def test_scoring_endings_of_one_context_prefills_it_once(client: Any, model_tok: tuple[Any, Any]) -> None:
    """lm-eval's multiple choice: one request scores a context with each ending (echo, logprobs=1,
    max_tokens=0). The endings take the context's keys, values and logprobs from the first prompt
    (usage counts them as cached) and every logprob equals a plain forward pass."""
    model, _ = model_tok
    g = torch.Generator().manual_seed(21)
    context = torch.randint(3, 32000, (40,), generator=g).tolist()
    prompts = [context + torch.randint(3, 32000, (k,), generator=g).tolist() for k in (2, 3, 4)]
    r = client.completions.create(model=NAME, prompt=prompts, max_tokens=0, echo=True, logprobs=1)
    assert r.usage.prompt_tokens_details.cached_tokens == 2 * 39
    for p, ch in zip(prompts, r.choices, strict=True):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([p])).float(), -1)[0]
        lp = ch.logprobs
        assert lp.token_logprobs[1:] == pytest.approx([float(ref[i, p[i + 1]]) for i in range(len(p) - 1)], abs=1e-4)
        assert [max(t.values()) for t in lp.top_logprobs[1:]] == pytest.approx(ref.max(-1).values[:-1].tolist(),
                                                                              abs=1e-4)


def test_top_logprob_bytes_of_a_byte_piece(model_tok: tuple[Any, Any]) -> None:
    """A byte-fallback alternative reports its own byte (as OpenAI's `bytes` do), not U+FFFD's."""
    from mixlab.serve.common import token_piece

    _, tok = model_tok
    i = next(i for i in range(tok.vocab_size) if tok.id_to_piece(i) == "<0x8C>")
    assert token_piece(tok, i) == ("\ufffd", [0x8C])
    j = tok.encode("hello", bos=False)[-1]
    text = tok.id_to_piece(j).replace("\u2581", " ")
    assert token_piece(tok, j) == (text, list(text.encode()))
    assert token_piece(tok, tok.vocab_size + 5) == ("", [])  # a padded vocabulary's id: no text, as streamed


def test_n_choices_and_experts(client: Any, server: str, model_tok: tuple[Any, Any]) -> None:
    model, tok = model_tok
    before = metric(server, "mixlab_prompt_tokens_total")
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
                                       n=3, temperature=1.0, seed=11, extra_body={"return_experts": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    # the prompt counts once, in `usage` and in /metrics (it counted once per choice there)
    assert r.usage.prompt_tokens == len(tok.encode_chat([{"role": "user", "content": "Hello"}]))
    assert metric(server, "mixlab_prompt_tokens_total") - before == r.usage.prompt_tokens
    texts = {c.message.content for c in r.choices}
    assert len(texts) > 1  # each choice samples its own stream
    for c in r.choices:
        experts = c.model_extra["experts"]
        assert "".join(e["text"] for e in experts) == c.message.content
        for e in experts:
            assert len(e["experts"]) == model.config.n_layers
            assert all(len(k) == 2 and len(set(k)) == 2 and all(0 <= x < 4 for x in k) for k in e["experts"])
    # streamed: each chunk carries its token's experts
    with httpx.stream("POST", server + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0,
            "stream": True, "return_experts": True}, timeout=60) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    got = [e for ev in events for ch in ev["choices"] for e in ch.get("experts", [])]
    assert len(got) == 6 and all(len(e["experts"]) == 2 for e in got)
    # the same experts as the engine reports for the same greedy request
    engine_out = Engine(model, tok, max_batch=1)
    h = engine_out.submit(tok.encode_chat([{"role": "user", "content": "Hello"}]),
                          SamplingParams(max_tokens=6, return_experts=True))
    engine_out.run_until_idle()
    assert [e["experts"] for e in got] == [o.experts for o in h.result() if o.token_id is not None]


def test_concurrent_clients_get_their_single_request_output(client: Any) -> None:
    jobs = [dict(prompt=f"Request number {i} says", max_tokens=10 + i, temperature=0.0 if i % 2 else 0.9, seed=i)
            for i in range(8)]
    alone = [client.completions.create(model=NAME, **j).choices[0].text for j in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda j: client.completions.create(model=NAME, **j).choices[0].text, jobs))
    assert together == alone
    chats = [dict(messages=[{"role": "user", "content": f"Tell me about {w}"}], max_tokens=12, temperature=0.7,
                  seed=100 + i) for i, w in enumerate(["cats", "dogs", "rain", "tea", "rust", "maps", "jazz", "moss"])]
    alone = [client.chat.completions.create(model=NAME, **c).choices[0].message.content for c in chats]

    def streamed(c: dict[str, Any]) -> str:
        return "".join(ch.choices[0].delta.content or "" for ch in
                       client.chat.completions.create(model=NAME, stream=True, **c) if ch.choices)

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(streamed, chats)) == alone


@pytest.mark.parametrize("invariant", [True, False])
def test_batch_invariant_bf16_server_gives_each_client_its_single_request_output(
        tmp_path: Path, model_tok: tuple[Any, Any], invariant: bool) -> None:
    """In bf16, `--batch-invariant`: eight concurrent clients get, bit for bit, the logprobs and text each
    gets alone; without it the default kernels round differently between batch sizes (this checks the
    test can tell)."""
    from mixlab.ops import native

    if native.load() is None or not native.fast(torch.bfloat16):  # batch_invariant refuses unvectorised kernels
        pytest.skip("needs the native bf16 kernels vectorised (AVX512-BF16)")
    path = hf_mixtral(tmp_path, vocab_size=32000, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                      num_key_value_heads=1, max_position_embeddings=CONTEXT)
    model, tok = load_model(path, dtype="bfloat16"), model_tok[1]
    jobs = [dict(prompt=f"Request number {i} says" + " more" * (3 * i), max_tokens=10 + i, logprobs=2,
                 temperature=0.0 if i % 2 else 0.9, seed=i) for i in range(8)]
    with Engine(model, tok, max_batch=8, batch_invariant=invariant) as engine, \
            ServerThread(create_app(engine, tok, _config(model))) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def run(j: dict[str, Any]) -> tuple[str, list[float]]:
            ch = c.completions.create(model=NAME, **j).choices[0]
            return ch.text, ch.logprobs.token_logprobs

        alone = [run(j) for j in jobs]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(run, jobs))
    assert (together == alone) == invariant


def test_prompts_are_encoded_off_the_event_loop(server: str, model_tok: tuple[Any, Any]) -> None:
    """A long text takes seconds to encode (3 MB: 4-6 s), and it was encoded on the event loop: every
    stream and /health waited for it. Here a tokenizer takes a second on a marked text."""
    model, tok = model_tok

    class Slow:
        def __getattr__(self, name: str) -> Any:
            return getattr(tok, name)

        def encode(self, text: str, **kw: Any) -> list[int]:
            time.sleep(1.0 if "SLOW" in text else 0)
            return tok.encode(text, **kw)

        def encode_chat(self, messages: list[dict[str, Any]], **kw: Any) -> list[int]:
            time.sleep(1.0 if any("SLOW" in m["content"] for m in messages) else 0)
            return tok.encode_chat(messages, **kw)

        def decode(self, ids: list[int]) -> str:  # /detokenize decoded on the event loop too (1M ids: 0.4 s)
            time.sleep(1.0 if ids == [7, 7, 7] else 0)
            return tok.decode(ids)

    with ServerThread(create_app(ENGINES[server], Slow(), _config(model))) as url:
        for path, body in ((COMP, {"prompt": "SLOW", "max_tokens": 1}), ("/tokenize", {"prompt": "SLOW"}),
                           (CHAT, {"messages": [{"role": "user", "content": "SLOW"}], "max_tokens": 1}),
                           ("/detokenize", {"tokens": [7, 7, 7]})):
            with ThreadPoolExecutor(1) as pool:
                slow = pool.submit(httpx.post, url + path, json=body, timeout=30)
                time.sleep(0.3)  # being encoded
                t0 = time.monotonic()
                assert httpx.get(url + "/health", timeout=30).status_code == 200
                assert time.monotonic() - t0 < 0.5, path
                assert slow.result().status_code == 200
        # the time to first token counts from the request's arrival: its encoding too (it began after it)
        ttft = re.search(r"^mixlab_time_to_first_token_seconds_sum (\S+)$", httpx.get(url + "/metrics").text, re.M)
        assert ttft is not None and float(ttft.group(1)) >= 2.0, ttft  # two requests took a second to encode
        # more prompts than the queue holds are refused before they are encoded (a second each here)
        queue = ENGINES[server].max_queue
        r = httpx.post(url + COMP, json={"prompt": ["SLOW"] * (queue + 1), "max_tokens": 1}, timeout=5)
        assert r.status_code == 400 and "--max-queue" in r.json()["error"]["message"], r.text


def test_a_large_bad_body_does_not_stall_the_server(server: str) -> None:
    """A 4 MB body (under the default limit) with one bad element among 1.3M token ids failed each
    branch of the prompt's union with an error per element: 30 s in which nothing else was answered.
    Each prompt shape is now checked against its own branch, up to its first error; a 300,000-entry
    logit_bias (1.6 s: all of it written out for the error's first 80 characters) and 120,000 bad
    messages (1.3 s: an error each) too."""
    bodies = [(COMP, {"prompt": [5] * 1_299_999 + ["x"]}, "prompt", "invalid prompt=[5, 5, 5"),
              (COMP, {"prompt": "a", "logit_bias": {str(i): 1 for i in range(300_000)}}, "logit_bias",
               'invalid logit_bias={"0": 1, "1": 1'),
              (CHAT, {"messages": [{"role": "x", "content": "a"}] * 120_000}, "messages[0].role",
               'invalid messages[0].role="x"')]
    for path, body, param, message in bodies:
        raw = json.dumps(body).encode()
        with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=60) as health:
            bad = pool.submit(httpx.post, server + path, content=raw, timeout=60,
                              headers={"Content-Type": "application/json"})
            worst = 0.0
            while not bad.done():
                t0 = time.monotonic()
                assert health.get(server + "/health").status_code == 200
                worst = max(worst, time.monotonic() - t0)
                time.sleep(0.005)
            r = bad.result()
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text[:200]
        assert r.json()["error"]["message"].startswith(message), r.text[:200]
        assert worst < 1.0, (param, worst)


def test_a_prompt_of_token_ids_is_gone_through_off_the_event_loop(server: str, model_tok: tuple[Any, Any],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4 MB prompt of 1.3M token ids was gone through three times on the event loop (its shape, a
    copy, each id against the vocabulary: 0.1 s of the server's whole stall), then refused as longer than
    the context. The first two run in the encoding thread now, and the ids are checked once the prompt
    is known to fit (at most the context's length)."""
    from mixlab.serve.protocol import ChatMessage, CompletionRequest

    model, tok = model_tok
    app = create_app(ENGINES[server], tok, _config(model))
    threads: list[str] = []
    scanned: list[int] = []
    prompts, check_ids = CompletionRequest.prompts, app.state.server.check_ids
    monkeypatch.setattr(CompletionRequest, "prompts",
                        lambda self: threads.append(threading.current_thread().name) or prompts(self))
    monkeypatch.setattr(app.state.server, "check_ids", lambda ids, param: scanned.append(len(ids)) or
                        check_ids(ids, param))
    template = ChatMessage.template  # a chat's messages too (110,000 of them: 0.06 s)
    monkeypatch.setattr(ChatMessage, "template",
                        lambda self: threads.append(threading.current_thread().name) or template(self))
    with ServerThread(app) as url:
        r = httpx.post(url + COMP, json={"prompt": [5] * 100_000 + [99999]}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        r = httpx.post(url + COMP, json={"prompt": [5, 99999], "max_tokens": 1}, timeout=30)
        assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"], r.text
        assert httpx.post(url + COMP, json={"prompt": [[5, 6], [7]], "max_tokens": 1}, timeout=30).status_code == 200
        assert httpx.post(url + CHAT, json={"messages": U, "max_tokens": 1}, timeout=30).status_code == 200
        assert httpx.post(url + "/tokenize", json={"messages": U}, timeout=30).status_code == 200
    assert scanned == [2, 2, 1]
    assert len(threads) == 5 and all(t.startswith("mixlab-encode") for t in threads), threads


def test_request_bodies_are_validated_off_the_event_loop(server: str, model_tok: tuple[Any, Any],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """FastAPI parsed and validated a body on the event loop: a 4 MB chat of 90,000 short messages took
    pydantic 1-2 s, in which no stream got a token. Each endpoint's body is read in the encoding thread
    now, with the same answers: the value, or OpenAI's 400 naming the parameter."""
    from mixlab.serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

    model, tok = model_tok
    threads: list[str] = []
    for kind in (ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest):
        monkeypatch.setattr(kind, "model_validate", lambda *a, _validate=kind.model_validate, **kw:
                            threads.append(threading.current_thread().name) or _validate(*a, **kw))
    with ServerThread(create_app(ENGINES[server], tok, _config(model))) as url:
        for path, good, bad, param in ((CHAT, {"messages": U, "max_tokens": 1}, {"messages": U, "n": 0}, "n"),
                                       (COMP, {"prompt": "x", "max_tokens": 1}, {"prompt": []}, "prompt"),
                                       ("/tokenize", {"prompt": "x"}, {}, "prompt"),
                                       ("/detokenize", {"tokens": [5]}, {"tokens": [-1]}, "tokens[0]")):
            assert httpx.post(url + path, json=good, timeout=30).status_code == 200, path
            r = httpx.post(url + path, json=bad, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert len(threads) == 8 and all(t.startswith("mixlab-encode") for t in threads), threads


def test_the_startup_heap_is_frozen_while_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full garbage collection walked the whole startup heap (torch, the model, the tokenizer) holding the
    GIL, ~0.25 s in which no stream moved, several times while a 4 MB chat body was validated. run_server
    freezes that heap while it serves (collections skip it), as vLLM's API server does, and gives it back."""
    import gc

    from mixlab.serve import run_server
    from mixlab.serve.server import _Server

    frozen: list[int] = []
    monkeypatch.setattr(_Server, "run", lambda self: frozen.append(gc.get_freeze_count()))
    before = gc.get_freeze_count()
    async def app(scope: Any, receive: Any, send: Any) -> None: ...

    run_server(app, port=0)
    assert before == 0 and frozen[0] > 10_000 and gc.get_freeze_count() == 0, (before, frozen)


def test_models_health_tokenize_metrics(server: str, model_tok: tuple[Any, Any]) -> None:
    model, tok = model_tok
    m = httpx.get(server + "/v1/models").json()
    assert m["data"][0]["id"] == NAME and m["data"][0]["max_model_len"] == CONTEXT
    assert m["data"][0]["mixlab"]["experts"] == 4
    assert abs(m["data"][0]["created"] - time.time()) < 3600  # a Unix time (it was 0: 1970 in some UIs)
    assert httpx.get(server + f"/v1/models/{NAME}").status_code == 200
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    t = httpx.post(server + "/tokenize", json={"prompt": "Hello world"}).json()
    assert t["tokens"] == tok.encode("Hello world") and t["count"] == len(t["tokens"])
    chat = [{"role": "user", "content": "Hi"}]
    assert httpx.post(server + "/tokenize", json={"messages": chat}).json()["tokens"] == tok.encode_chat(chat)
    assert httpx.post(server + "/detokenize", json={"tokens": t["tokens"]}).json()["prompt"] == "Hello world"
    # vLLM's return_token_strs: each token's piece (it was ignored: no token_strs)
    t = httpx.post(server + "/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert t["token_strs"] == ["<s>", "\u2581Hello", "\u2581world"] and "token_strs" not in \
        httpx.post(server + "/tokenize", json={"prompt": "Hello world"}).json()
    info = httpx.get(server + "/tokenizer_info").json()
    assert info["bos_token"] == "<s>" and info["eos_token"] == "</s>"
    assert httpx.post(server + "/tokenize", json={"prompt": "<s>", "add_special_tokens": False}).json()["tokens"] \
        == [tok.bos_id]
    text = httpx.get(server + "/metrics").text
    for name in ("mixlab_requests_total", "mixlab_prompt_tokens_total", "mixlab_generation_tokens_total",
                 "mixlab_queue_depth", "mixlab_running_requests", "mixlab_time_to_first_token_seconds_bucket",
                 "mixlab_inter_token_latency_seconds_bucket", 'mixlab_expert_load_tokens_total{expert="3",layer="1"}'):
        assert name in text, name
    assert re.search(r"^mixlab_weight_panels_bytes 0\.0$", text, re.M)  # float32 weights: no panels
    # CORS is off unless asked for
    r = httpx.options(server + "/v1/models", headers={"Origin": "http://evil.example",
                                                      "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers



def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics parsed as Prometheus parses it, each sample by (name, labels), its families held to the naming
    conventions: a counter's samples end in _total (or _created), a histogram has its +Inf bucket, _sum, _count."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        assert fam.name.startswith("mixlab_"), fam.name
        names = {x.name for x in fam.samples}
        if fam.type == "counter":
            assert names <= {fam.name + "_total", fam.name + "_created"}, (fam.name, names)
        if fam.type == "histogram" and fam.samples:
            assert {fam.name + "_sum", fam.name + "_count"} <= names and fam.name.endswith("_seconds"), fam.name
            assert any(x.labels.get("le") == "+Inf" for x in fam.samples), fam.name
        out.update({(x.name, tuple(sorted(x.labels.items()))): x.value for x in fam.samples})
    return out


def test_metrics_after_a_known_traffic(server: str, client: Any) -> None:
    """An operator's check of /metrics: after 2 completions, a chat and a stream its client closed, every counter
    moved by what was sent and answered, and the gauges are back at 0."""
    before = _scrape(server)
    usage = [client.completions.create(model=NAME, prompt=[1, 5, 6, 7], max_tokens=4,
                                       extra_body={"ignore_eos": True}).usage for _ in range(2)]
    usage.append(client.chat.completions.create(model=NAME, messages=U, max_tokens=3,
                                                extra_body={"ignore_eos": True}).usage)
    with _slow_steps(ENGINES[server], 0.02):
        stream = client.chat.completions.create(model=NAME, messages=U, max_tokens=400, stream=True,
                                                extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks), next(chunks), next(chunks)  # the role's chunk, then 2 tokens
        stream.response.close()
        gauges = ("mixlab_running_requests", "mixlab_queue_depth", "mixlab_http_requests_in_progress",
                  "mixlab_kv_cache_used_bytes")
        assert until(lambda: all(_scrape(server)[(g, ())] == 0 for g in gauges))
    after = _scrape(server)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert moved("mixlab_requests_total", endpoint="/v1/completions", status="200") == 2
    assert moved("mixlab_requests_total", endpoint="/v1/chat/completions", status="200") == 2
    assert moved("mixlab_requests_cancelled_total") == 1
    stream_prompt = len(httpx.post(server + "/tokenize", json={"messages": U}).json()["tokens"])
    assert moved("mixlab_prompt_tokens_total") == sum(u.prompt_tokens for u in usage) + stream_prompt
    answered = sum(u.completion_tokens for u in usage)
    assert answered == 11
    generated = moved("mixlab_generation_tokens_total")
    assert answered + 2 <= generated < answered + 400  # the closed stream's: at least the 2 it read
    assert moved("mixlab_time_to_first_token_seconds_count") == 4
    assert moved("mixlab_inter_token_latency_seconds_count") == generated - 4
    assert moved("mixlab_time_to_first_token_seconds_bucket", le="+Inf") == 4


def test_text_parts_are_joined_as_mistral_common_joins_them() -> None:
    # parts were joined with nothing: [a, b] was "[INST] ab [/INST]", mistral-common's "[INST] a\n\nb [/INST]"
    from mistral_common.protocol.instruct.request import ChatCompletionRequest as Reference
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from mixlab.serve.protocol import ChatCompletionRequest

    tok = load_tokenizer()
    parts = [{"type": "text", "text": "a "}, {"type": "text", "text": ""}, {"type": "text", "text": "b"}]
    messages = [{"role": "system", "content": parts}, {"role": "user", "content": parts},
                {"role": "assistant", "content": parts}, {"role": "user", "content": [{"type": "text", "text": "c"}]}]
    ours = tok.encode_chat([m.template() for m in ChatCompletionRequest(messages=messages).messages])
    reference = MistralTokenizer.from_file(str(tok.path)).encode_chat_completion(Reference(messages=messages))
    assert ours == reference.tokens


def test_head_is_answered_wherever_get_is(server: str) -> None:
    """HEAD (`curl -I`, uptime checks, link checkers) answered 405 on every GET route but `/` and
    `/health`: each now gives GET's status and headers, without the body."""
    for path in ("/v1/models", f"/v1/models/{NAME}", "/health", "/metrics", "/tokenizer_info", "/",
                 "/static/chat.js"):
        got, head = httpx.get(server + path), httpx.head(server + path)
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"], path
    assert httpx.head(server + "/v1/models/other").status_code == 404
    # a 405 names the methods that are (RFC 9110: it must): its Allow header was dropped
    for method, path, allow in (("HEAD", CHAT, "POST"), ("GET", COMP, "POST"), ("POST", "/health", "GET, HEAD"),
                                ("DELETE", "/v1/models", "GET, HEAD")):
        r = httpx.request(method, server + path)
        assert r.status_code == 405 and set(r.headers.get("allow", "").split(", ")) == set(allow.split(", ")), \
            (method, path, r.headers)


def test_repeated_slashes_in_the_path_are_merged(server: str) -> None:
    """A client's base URL with a trailing slash (`http://host:8000/` + `/v1/models`) got 404s."""
    r = httpx.get(server + "//v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == NAME
    r = httpx.post(server + "/v1//completions", json={"prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert httpx.get(server + "//static//chat.js").status_code == 200

# -- errors -----------------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
U = [{"role": "user", "content": "hi"}]

BAD = [  # (endpoint, body, status, param); ideas from llama.cpp's tools/server/tests and TGI's validation.rs
    (CHAT, {"messages": U, "temperature": -0.1}, 400, "temperature"),
    (CHAT, {"messages": U, "temperature": 2.5}, 400, "temperature"),
    (CHAT, {"messages": U, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": U, "top_p": 0}, 400, "top_p"),
    (CHAT, {"messages": U, "top_p": 1.5}, 400, "top_p"),
    (CHAT, {"messages": U, "top_k": -2}, 400, "top_k"),
    (CHAT, {"messages": U, "top_k": 1.5}, 400, "top_k"),
    (CHAT, {"messages": U, "min_p": 1.1}, 400, "min_p"),
    (CHAT, {"messages": U, "repetition_penalty": 0}, 400, "repetition_penalty"),
    (CHAT, {"messages": U, "presence_penalty": 3}, 400, "presence_penalty"),
    (CHAT, {"messages": U, "frequency_penalty": -2.5}, 400, "frequency_penalty"),
    (CHAT, {"messages": U, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": U, "max_tokens": -5}, 400, "max_tokens"),
    (CHAT, {"messages": U, "max_tokens": True}, 400, "max_tokens"),
    (CHAT, {"messages": U, "max_tokens": 10**6}, 400, "max_tokens"),
    (CHAT, {"messages": U, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (CHAT, {"messages": U, "max_completion_tokens": 10**6}, 400, "max_completion_tokens"),  # it said max_tokens
    (CHAT, {"messages": U, "max_tokens": 1, "max_completion_tokens": CONTEXT}, 400, "max_completion_tokens"),
    (CHAT, {"messages": U, "max_tokens": CONTEXT}, 400, "max_tokens"),  # prompt + max_tokens > context
    (CHAT, {"messages": U, "n": 0}, 400, "n"),
    (CHAT, {"messages": U, "n": 100}, 400, "n"),
    (CHAT, {"messages": U, "stop": 5}, 400, "stop"),
    (CHAT, {"messages": U, "stop": [""]}, 400, "stop"),
    (CHAT, {"messages": U, "stop": ["x"] * 17}, 400, "stop"),
    (CHAT, {"messages": U, "seed": 2**70}, 400, "seed"),
    (CHAT, {"messages": U, "seed": "abc"}, 400, "seed"),
    (CHAT, {"messages": U, "stream": "yes"}, 400, "stream"),
    (CHAT, {"messages": U, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (CHAT, {"messages": U, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": U, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (CHAT, {"messages": U, "logit_bias": {"5": 101}}, 400, "logit_bias.5"),
    (CHAT, {"messages": U, "logit_bias": {"five": 1}}, 400, "logit_bias"),
    (CHAT, {"messages": U, "logit_bias": {"-3": 1}}, 400, "logit_bias"),
    (CHAT, {"messages": U, "logit_bias": {"32000": 1}}, 400, "logit_bias"),
    (COMP, {"prompt": "x", "logit_bias": [5, 10]}, 400, "logit_bias"),
    (COMP, {"prompt": "x", "max_tokens": 2, "min_tokens": 3}, 400, "min_tokens"),
    (COMP, {"prompt": "x", "min_tokens": -1}, 400, "min_tokens"),
    (CHAT, {"messages": U, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    (CHAT, {"messages": U, "functions": [{"name": "f"}], "function_call": "auto"}, 400, "functions"),
    (CHAT, {"messages": U, "response_format": {"type": "yaml"}}, 400, "response_format"),
    (CHAT, {"messages": U, "tool_choice": "required"}, 400, "tool_choice"),  # a call it would not make: was ignored
    (CHAT, {"messages": U, "tool_choice": {"type": "function", "function": {"name": "f"}}}, 400, "tool_choice"),
    (CHAT, {"messages": U, "function_call": {"name": "f"}}, 400, "function_call"),
    (CHAT, {"messages": U, "return_experts": "please"}, 400, "return_experts"),
    (CHAT, {"messages": U, "stop_token_ids": [-1]}, 400, "stop_token_ids[0]"),
    (CHAT, {"messages": U, "stop_token_ids": [32000]}, 400, "stop_token_ids"),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),  # template: ends with a user turn
    (CHAT, {"messages": U * 2000}, 400, "messages"),  # longer than the context
    (CHAT, {"messages": U, "model": "gpt-4"}, 404, "model"),
    (COMP, {}, 400, "prompt"),
    (COMP, {"prompt": []}, 400, "prompt"),
    (COMP, {"prompt": [[]]}, 400, "prompt"),
    (COMP, {"prompt": {"text": "x"}}, 400, "prompt"),
    (COMP, {"prompt": [1, -3]}, 400, "prompt"),
    (COMP, {"prompt": [1, 99999]}, 400, "prompt"),
    (COMP, {"prompt": [[1, 2], [1, 99999]]}, 400, "prompt[1]"),
    (COMP, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    (COMP, {"prompt": "x", "logprobs": True}, 400, "logprobs"),
    (COMP, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),  # 0 only to score a prompt (echo)
    (COMP, {"prompt": "x", "echo": "no"}, 400, "echo"),
    (COMP, {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    (COMP, {"prompt": "x", "best_of": 3}, 400, "best_of"),
    (COMP, {"prompt": "x " * 600}, 400, "prompt"),  # longer than the context
    (COMP, {"prompt": ["x", "x " * 600]}, 400, "prompt[1]"),  # one of a batch: named (it said "prompt")
    (COMP, {"prompt": "x", "model": "nope"}, 404, "model"),
    # vLLM's extras that ask for what this server does not do (they were ignored: other output, silently; the ones
    # it does: tests/test_serve_vllm_extras.py)
    (CHAT, {"messages": U, "guided_choice": ["yes", ""]}, 400, "guided_choice"),  # structured output: a bad one
    (COMP, {"prompt": "x", "use_beam_search": True}, 400, "use_beam_search"),
    # ... and more of them, OpenAI's too; each was ignored: output the client did not ask for, silently
    (CHAT, {"messages": U, "logits_processors": ["m.f"]}, 400, "logits_processors"),
    (COMP, {"prompt": "x", "return_token_ids": "yes"}, 400, "return_token_ids"),
    (COMP, {"prompt": "x", "prompt_embeds": "AAAA"}, 400, "prompt_embeds"),
    (CHAT, {"messages": U, "structural_tag": "{}"}, 400, "structural_tag"),
    (CHAT, {"messages": U, "echo": True}, 400, "echo"),  # vLLM's chat echo: the last message before the reply
    (CHAT, {"messages": U, "chat_template": "{{ messages }}"}, 400, "chat_template"),
    (CHAT, {"messages": U, "documents": [{"text": "x"}]}, 400, "documents"),
    (CHAT, {"messages": U, "add_special_tokens": True}, 400, "add_special_tokens"),  # a second BOS
    (CHAT, {"messages": U, "n": 2, "best_of": 3}, 400, "best_of"),
    (COMP, {"prompt": "x", "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema"),
    (CHAT, {"messages": U, "modalities": ["text", "audio"]}, 400, "modalities"),
    (CHAT, {"messages": U, "audio": {"voice": "alloy", "format": "wav"}}, 400, "audio"),
    (CHAT, {"messages": U, "web_search_options": {}}, 400, "web_search_options"),
    (COMP, {"prompt": "", "add_special_tokens": False}, 400, "prompt"),  # no tokens at all
    ("/detokenize", {"tokens": [5, 40000]}, 400, "tokens"),
    ("/tokenize", {}, 400, "prompt"),
    # found by tests/test_serve_fuzz.py: a value nested 600 deep (JSON parses it) was a 500 as its error was written
    (CHAT, {"messages": U, "temperature": json.loads("[" * 600 + "]" * 600)}, 400, "temperature"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_name_the_parameter(server: str, path: str, body: dict[str, Any], status: int,
                                         param: str) -> None:
    r = httpx.post(server + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert param.split("[")[0].split(".")[0] in err["message"], err


def test_null_parameters_take_their_defaults(server: str) -> None:
    """OpenAI's schema makes these nullable (vLLM's fields are Optional); clients that serialise every
    field send null for the ones not set. A required one stays required."""
    nulls = dict.fromkeys(("n", "stream", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                           "repetition_penalty", "min_tokens", "ignore_eos", "return_experts", "seed", "stop"))
    r = httpx.post(server + CHAT, json={"messages": U, "max_tokens": 2, "logprobs": None, **nulls}, timeout=30)
    assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text
    r = httpx.post(server + COMP, json={"prompt": "x", "max_tokens": 2, "echo": None, **nulls}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None, r.text
    # what clients send with no tools: a plain reply
    for extra in ({"tool_choice": "none"}, {"tool_choice": "auto"}, {"function_call": "none"}, {"tools": []},
                  {"parallel_tool_calls": False}, {"response_format": {"type": "text"}},
                  {"include_stop_str_in_output": False, "use_beam_search": False, "guided_json": None},
                  {"skip_special_tokens": True, "bad_words": [], "return_token_ids": False, "echo": False,
                   "add_special_tokens": False, "chat_template": None, "modalities": ["text"], "best_of": 1,
                   "audio": None, "web_search_options": None}):
        r = httpx.post(server + CHAT, json={"messages": U, "max_tokens": 2, **extra}, timeout=30)
        assert r.status_code == 200, (extra, r.text)
    # top_logprobs 0 without logprobs asks for nothing (vLLM accepts it; it was a 400), and gets nothing
    for extra in ({"top_logprobs": 0}, {"top_logprobs": 0, "logprobs": False}):
        r = httpx.post(server + CHAT, json={"messages": U, "max_tokens": 2, **extra}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None, (extra, r.text)
    r = httpx.post(server + CHAT, json={"messages": None}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def test_a_completion_s_add_special_tokens_false_leaves_out_bos(server: str, model_tok: tuple[Any, Any]) -> None:
    """vLLM's add_special_tokens (default true) was ignored: a text prompt sent with false still began with
    BOS, another prompt than the client's, and another continuation."""
    model, tok = model_tok
    ids = tok.encode("The quick brown fox", bos=False)
    kw = {"max_tokens": 6, "temperature": 0, "logprobs": 0}
    plain = httpx.post(server + COMP, json={"prompt": "The quick brown fox", "add_special_tokens": False, **kw}).json()
    by_ids = httpx.post(server + COMP, json={"prompt": ids, **kw}).json()
    with_bos = httpx.post(server + COMP, json={"prompt": "The quick brown fox", **kw}).json()
    assert plain["usage"]["prompt_tokens"] == len(ids) == with_bos["usage"]["prompt_tokens"] - 1, plain["usage"]
    assert plain["choices"][0]["logprobs"] == by_ids["choices"][0]["logprobs"], (plain, by_ids)
    assert plain["choices"][0]["logprobs"] != with_bos["choices"][0]["logprobs"]


def test_continuous_usage_stats_gives_the_usage_so_far_in_every_chunk(client: Any) -> None:
    """vLLM's stream_options.continuous_usage_stats was ignored: every chunk's usage was null."""
    chunks = list(client.completions.create(model=NAME, prompt="Hi", max_tokens=4, n=2, stream=True,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True}))
    done = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for c in chunks), chunks
    assert done == sorted(done) and done[0] >= 1 and done[-1] == 8, done
    chunks = list(client.chat.completions.create(model=NAME, messages=U, max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}))  # without: as before
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].usage.completion_tokens == 3


def test_request_id_header(server: str, client: Any) -> None:
    """X-Request-Id: the caller's comes back (vLLM's header), else each response gets its own (as
    OpenAI's do; the openai client reads it as `_request_id`)."""
    r = httpx.post(server + CHAT, json={"messages": U, "max_tokens": 1}, headers={"X-Request-Id": "trace-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    assert httpx.get(server + "/nothing", headers={"X-Request-Id": "trace-43"}).headers["x-request-id"] == "trace-43"
    a = client.chat.completions.create(model=NAME, messages=U, max_tokens=1)
    b = client.completions.create(model=NAME, prompt="x", max_tokens=1)
    assert a._request_id and b._request_id and a._request_id != b._request_id


def test_bad_request_messages_say_what_was_expected(server: str) -> None:
    err = httpx.post(server + CHAT, json={"messages": U, "max_tokens": CONTEXT}).json()["error"]
    assert re.search(rf"\(\d+ tokens\) \+ max_tokens={CONTEXT} = \d+ exceeds the model's context of {CONTEXT}",
                     err["message"]), err
    err = httpx.post(server + COMP, json={"prompt": ["x", "x " * 300], "max_tokens": 300}).json()["error"]
    assert err["message"].startswith("the prompt[1] (302 tokens) + max_tokens=300 = 602 exceeds"), err
    err = httpx.post(server + CHAT, json={"messages": U, "temperature": 7}).json()["error"]
    assert err["message"] == "invalid temperature=7: expected a number in [0, 2]"
    # an image part: the message said only "input should be a valid string", though text parts are taken
    image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    err = httpx.post(server + CHAT, json={"messages": [{"role": "user", "content": image}]}).json()["error"]
    assert err["param"] == "messages[0].content" and "list of {'type': 'text'" in err["message"], err
    assert "text only" in err["message"], err
    r = httpx.post(server + CHAT, content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    # a body that is not UTF-8 (PowerShell 5's Invoke-RestMethod sends Latin-1) or nested too deep to parse
    # got FastAPI's {"detail": ...}, not OpenAI's body that clients read the message from
    latin1 = '{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1")
    for bad, why in ((latin1, "not UTF-8"), (b"[" * 100_000, "error parsing")):
        r = httpx.post(server + CHAT, content=bad, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
    # JSON's "\ud83d" is a lone surrogate (half an emoji: a client cut a string by UTF-16 units); text the
    # tokenizer cannot encode was a bare 500
    half = "ab\ud83d"
    for path, body, param in ((CHAT, {"messages": [{"role": "user", "content": half}]}, "messages[0].content"),
                              (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": half}]}]},
                               "messages[0].content"),
                              (COMP, {"prompt": ["x", half]}, "prompt"), ("/tokenize", {"prompt": half}, "prompt")):
        r = httpx.post(server + path, content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert "lone surrogate \\ud83d at character 2" in r.json()["error"]["message"], r.text
    assert httpx.get(server + "/v1/nothing").status_code == 404
    assert httpx.get(server + CHAT).status_code == 405
    # a value shows in a message as its first 80 characters (a 4 MB model name came back whole), an integer of
    # too many digits for Python to read is named as that
    for path, body, shown in ((CHAT, {"messages": U, "model": "m" * 5000}, "'" + "m" * 80 + "'"),
                              (COMP, {"prompt": "x", "response_format": {"type": [[[["y" * 5000]]]]}}, '"yyy'),
                              (CHAT, {"messages": U, "logit_bias": {"k" * 5000: 1}}, "'" + "k" * 80 + "'")):
        err = httpx.post(server + path, json=body).json()["error"]
        assert shown in err["message"] and len(err["message"]) < 300, err
    r = httpx.post(server + CHAT, content=b'{"max_tokens": 1' + b"0" * 5000 + b"}",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "an integer in it has over 4300 digits" in r.json()["error"]["message"], r.text


def test_auth_body_limit_queue_full_and_cors(model_tok: tuple[Any, Any]) -> None:
    model, tok = model_tok
    engine = Engine(model, tok, max_batch=1, max_queue=1)  # never started: submitted requests wait
    app = create_app(engine, tok, _config(model, api_key="s3cret", max_body_bytes=2000,
                                          cors_origins=["http://allowed.example"]))
    with ServerThread(app) as url:
        body = {"messages": U, "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(url + CHAT, json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "//v1/models").status_code == 401  # merged before the key is asked for
        assert httpx.get(url + "/health").status_code == 200  # probes need no key
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(url + "/v1/models", headers=auth).status_code == 200
        big = {"messages": [{"role": "user", "content": "x" * 5000}]}
        r = httpx.post(url + CHAT, json=big, headers=auth)
        assert r.status_code == 413 and "2000 bytes" in r.json()["error"]["message"]

        def chunked() -> Iterator[bytes]:  # no Content-Length: counted while read
            yield json.dumps(big).encode()

        assert httpx.post(url + CHAT, content=chunked(), headers=auth).status_code == 413
        # more completions (prompts x n) than the queue holds could never be queued: 400, not a 429 retried forever
        r = httpx.post(url + CHAT, json={**body, "n": 2}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "--max-queue" in r.text, r.text
        r = httpx.post(url + "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        engine.submit([1, 2, 3], SamplingParams(max_tokens=2))  # fills the queue (max_queue=1)
        r = httpx.post(url + CHAT, json=body, headers=auth)
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["code"] == "queue_full"
        r = httpx.options(url + "/v1/models", headers={"Origin": "http://allowed.example",
                                                       "Access-Control-Request-Method": "GET"})
        assert r.headers["access-control-allow-origin"] == "http://allowed.example"
        # the openai JavaScript client in a browser sends its own headers: the preflight refused them (400)
        stainless = "authorization,content-type,x-stainless-os,x-stainless-retry-count,openai-organization"
        r = httpx.options(url + CHAT, headers={"Origin": "http://allowed.example", "Access-Control-Request-Method":
                                               "POST", "Access-Control-Request-Headers": stainless})
        assert r.status_code == 200 and r.headers["access-control-allow-headers"] == stainless, r.text
        # client.responses.delete from a page: its preflight was refused ("Disallowed CORS method")
        r = httpx.options(url + "/v1/responses/resp_1", headers={"Origin": "http://allowed.example",
                                                                 "Access-Control-Request-Method": "DELETE"})
        assert r.status_code == 200 and "DELETE" in r.headers["access-control-allow-methods"], r.text
        r = httpx.get(url + "/v1/models", headers={**auth, "Origin": "http://allowed.example"})
        assert r.headers["access-control-expose-headers"].lower() == "x-request-id"  # its page can read the id
        # openai's client sends the key as a bearer token
        c = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
    engine.shutdown()


def test_a_body_over_the_limit_closes_the_connection(server: str) -> None:
    """A 413 kept the connection open, so the server went on reading the refused body to its end (a
    100 MB upload: all of it, for nothing) before the client could use it again; now it is closed."""
    port = int(server.rsplit(":", 1)[1])
    for head, first in ((f"Content-Length: {100 << 20}", b"x" * 1000),  # refused on its Content-Length
                        ("Transfer-Encoding: chunked", b"%x\r\n%s\r\n" % (5 << 20, b"x" * (5 << 20)))):  # counted
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"POST {COMP} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{head}"
                      "\r\n\r\n".encode())
            try:
                s.sendall(first)
            except ConnectionResetError:  # refused before all of it was sent
                pass
            got = b""
            try:
                while chunk := s.recv(4096):  # to the end: the server closes the connection (it waited for more)
                    got += chunk
            except ConnectionResetError:
                pass
        assert got.startswith(b"HTTP/1.1 413") and b"body_too_large" in got, (head, got[:200])


def test_connections_over_the_cap_are_refused_and_the_server_serves_on(server: str,
                                                                        model_tok: tuple[Any, Any]) -> None:
    """There was no cap on open connections (each may buffer a body up to max_body_bytes); a request on
    a connection over max_connections gets OpenAI's 503 before its body is read, and the connection is
    closed; /metrics still answers, and once connections close the server serves again."""
    import http.client

    model, tok = model_tok
    app = create_app(ENGINES[server], tok, _config(model, max_connections=2))
    with ServerThread(app) as url:
        port = int(url.rsplit(":", 1)[1])
        held = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(2)]
        for conn in held:  # two connections kept open (keep-alive) after a request each
            conn.request("GET", "/health")
            r = conn.getresponse()
            assert r.status == 200 and r.read() == b'{"status":"ok"}'
        body = json.dumps({"messages": U, "max_tokens": 2}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            got = b""
            while chunk := s.recv(4096):  # to the end: the server closes the connection
                got += chunk
        head, _, rest = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower(), got
        error = json.loads(rest)["error"]
        assert error["code"] == "too_many_connections" and "limit of 2 connections" in error["message"], error
        assert httpx.get(url + "/metrics").status_code == 200  # over the cap too: the overload must be seen
        for conn in held:  # the held connections still work
            conn.request("GET", "/v1/models")
            assert conn.getresponse().read().startswith(b'{"object":"list"')
            conn.close()
        assert until(lambda: httpx.get(url + "/health").status_code == 200)
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        assert c.chat.completions.create(model=NAME, messages=U, max_tokens=2).choices[0].message.role == "assistant"
        refused = 'mixlab_requests_total{endpoint="/v1/chat/completions",status="503"} 1.0'
        assert refused in httpx.get(url + "/metrics").text


@contextmanager
def _slow_steps(engine: Any, seconds: float) -> Iterator[None]:
    """Each of `engine`'s steps held up `seconds`: its requests outlast what a test waits for."""
    runner = engine.runner
    forward = runner.forward

    def slow(items: Any) -> Any:
        time.sleep(seconds)
        return forward(items)

    runner.forward = slow  # type: ignore[method-assign]
    try:
        yield
    finally:
        del runner.forward  # the class's method again


def test_disconnect_cancels_and_frees_the_slot(server: str) -> None:
    before = metric(server, "mixlab_requests_cancelled_total")
    body = {"messages": U, "max_tokens": CONTEXT - 40, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", server + CHAT, json={**body, "stream": True}, timeout=30) as resp:
        lines = resp.iter_lines()
        next(lines), next(lines)  # the stream has started
        assert metric(server, "mixlab_running_requests") == 1
    # the client left after a few tokens: the engine request is cancelled and its cache freed
    assert until(lambda: metric(server, "mixlab_running_requests") == 0)
    assert metric(server, "mixlab_kv_cache_used_bytes") == 0
    assert metric(server, "mixlab_requests_cancelled_total") == before + 1
    # not streamed: a client that times out is a disconnect too. Each step is held up 5 ms so the
    # ~470 tokens cannot finish inside the client's 0.3 s (the tiny model's native steps could).
    with _slow_steps(ENGINES[server], 0.005):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server + CHAT, json=body, timeout=0.3)
        assert until(lambda: metric(server, "mixlab_requests_cancelled_total") == before + 2)
        assert until(lambda: metric(server, "mixlab_running_requests") == 0)


def test_many_requests_some_abandoned_leave_nothing_behind(server: str) -> None:
    """48 requests from 12 threads, a third streamed to the end, a third streamed and abandoned
    after the first chunk: the completed ones get their single-request text, and afterwards the
    engine runs and queues nothing, holds no cache, and no connection or thread is left open."""
    jobs = [{"model": NAME, "prompt": f"Request {k} " * (1 + k % 5), "max_tokens": 6 + k % 9, "temperature": 0,
             "ignore_eos": True} for k in range(12)] * 4
    with httpx.Client(base_url=server, timeout=60) as c:
        alone = [c.post(COMP, json=j).json()["choices"][0]["text"] for j in jobs[:12]]
        threads, before = threading.active_count(), metric(server, "mixlab_requests_cancelled_total")

        def one(i: int) -> str | None:
            if i % 3 == 0:
                return str(c.post(COMP, json=jobs[i]).json()["choices"][0]["text"])
            with c.stream("POST", COMP, json={**jobs[i], "stream": True}) as resp:
                text = ""
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        if i % 3 == 2:
                            return None  # the client leaves mid-stream
                        text += json.loads(line[6:])["choices"][0]["text"]
                return text

        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(one, range(48)))
    for i, text in enumerate(got):
        assert text is None or text == alone[i % 12]
    assert until(lambda: metric(server, "mixlab_running_requests") == 0)
    for gauge in ("mixlab_queue_depth", "mixlab_kv_cache_used_bytes", "mixlab_http_requests_in_progress"):
        assert metric(server, gauge) == 0, gauge
    assert 0 < metric(server, "mixlab_requests_cancelled_total") - before <= 16  # the abandoned ones still running
    assert until(lambda: threading.active_count() <= threads)


def test_sigterm_drain_answers_503_with_cors_on(server: str, model_tok: tuple[Any, Any]) -> None:
    """With --allowed-origins the app is wrapped in CORS middleware, where the SIGTERM handler did not
    find the server: requests on open connections were still served while draining, /health said ok."""
    model, tok = model_tok
    thread = ServerThread(create_app(ENGINES[server], tok, _config(model, cors_origins=["http://a.example"])))
    with thread as url, httpx.Client(base_url=url, timeout=10) as c:
        assert c.get("/health").status_code == 200  # the connection stays open
        thread.server.handle_exit(signal.SIGTERM, None)
        r = c.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "draining"}
        r = c.post(COMP, json={"prompt": "hi", "max_tokens": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"


@pytest.mark.parametrize("signals", [1, 2])
def test_requests_left_at_the_drain_s_deadline_are_answered_not_cut_off(server: str, model_tok: tuple[Any, Any],
                                                                         signals: int) -> None:
    """At --drain-timeout (or at once on a second signal) uvicorn cancelled the handlers: a stream in flight
    was cut off mid-body (no error event, no [DONE]; the client saw 'incomplete chunked read'), with a
    traceback per stream in the log, and a second Ctrl-C did the same at once. Now what is left is ended
    by the app: a stream gets an error event and [DONE], an unstreamed request a 503, its slot freed."""
    model, tok = model_tok
    engine = ENGINES[server]
    thread = ServerThread(create_app(engine, tok, _config(model)), drain_timeout=0.5 if signals == 1 else 60)
    body = {"messages": U, "max_tokens": CONTEXT - 40, "ignore_eos": True, "temperature": 0}
    streams: dict[int, list[str]] = {}
    answers: list[httpx.Response] = []

    def stream(i: int) -> None:
        with httpx.stream("POST", url + CHAT, json={**body, "stream": True}, timeout=30) as r:
            streams[i] = [x for x in r.iter_lines() if x]

    with _slow_steps(engine, 0.02), thread as url, ThreadPoolExecutor(3) as pool:
        jobs = [pool.submit(stream, i) for i in range(2)] + [pool.submit(lambda: answers.append(
            httpx.post(url + CHAT, json=body, timeout=30)))]
        assert until(lambda: metric(url, "mixlab_running_requests") == 3)
        start = time.monotonic()
        for _ in range(signals):
            thread.server.handle_exit(signal.SIGTERM, None)
        thread.thread.join(20)
        assert not thread.thread.is_alive() and time.monotonic() - start < 4  # not the steps' 9 s, nor 60
        for job in jobs:
            job.result()
    for lines in streams.values():
        assert lines[-1] == "data: [DONE]", lines[-3:]
        error = json.loads(lines[-2][6:])["error"]
        assert error["code"] == "shutting_down" and "--drain-timeout" in error["message"], error
        assert len(lines) > 3  # it had streamed tokens before
    (r,) = answers
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    assert r.headers["retry-after"] == "1"
    assert until(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0)


def test_an_unexpected_error_answers_500_with_openai_s_body(server: str, model_tok: tuple[Any, Any]) -> None:
    """A bug (here a tokenizer that raises) answered a plain-text 'Internal Server Error', which the
    openai client cannot read a message from."""
    model, tok = model_tok

    class Broken:
        def __getattr__(self, name: str) -> Any:
            return getattr(tok, name)

        def encode(self, *a: Any, **kw: Any) -> list[int]:
            raise RuntimeError("tokenizer exploded")

    with ServerThread(create_app(ENGINES[server], Broken(), _config(model))) as url:
        r = httpx.post(url + "/tokenize", json={"prompt": "Hello"}, timeout=10)
        assert r.status_code == 500
        assert r.json()["error"] == {"message": "internal server error: RuntimeError: tokenizer exploded",
                                     "type": "server_error", "param": None, "code": "internal_error"}
        with pytest.raises(openai.InternalServerError, match="tokenizer exploded"):
            openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).completions.create(
                model=NAME, prompt="Hello", max_tokens=1)


def test_an_api_key_no_client_can_send_is_refused(ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """--api-key "" let every request in (a missing header compared equal to it) and silenced the
    warning for a non-loopback --host; a key with a space or a non-ASCII character never matched."""
    for key, why in (("", "is empty"), ("two words", "space"), (" k", "space"), ("ключ", "not printable ASCII")):
        code, srv, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--api-key", key)
        assert code == 2 and srv is None and "--api-key " in err and why in err, (key, err)
        assert key not in err or not key.strip()  # the secret is not printed
        with pytest.raises(ValueError, match="ServerConfig.api_key .*" + why):
            ServerConfig(api_key=key)
    code, srv, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--api-key", "sk-A1/b+c=", "--host", "::1")
    assert code == 0 and srv.cfg.api_key == "sk-A1/b+c="
    assert "on http://[::1]:8000 (chat page" in err and srv.cfg.allowed_hosts == []  # a URL one can open; loopback
    # the key from the environment (vLLM's VLLM_API_KEY, llama-server's LLAMA_API_KEY): not in `ps`
    monkeypatch.setenv("MIXLAB_API_KEY", "from-env")
    code, srv, _ = _serve_cli(monkeypatch, capsys, "--model", str(ckpt))
    assert code == 0 and srv.cfg.api_key == "from-env"
    code, srv, _ = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--api-key", "flag")
    assert code == 0 and srv.cfg.api_key == "flag"
    # a key file's newline kept in the environment: the error named --api-key, which had not been given
    monkeypatch.setenv("MIXLAB_API_KEY", "from-file\n")
    code, srv, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt))
    assert code == 2 and srv is None and "error: $MIXLAB_API_KEY (the environment's key; --api-key not given) has a " \
        "space or a character that is not printable ASCII" in err, err
    monkeypatch.setenv("MIXLAB_API_KEY", "")  # set but empty: no key, as unset
    code, srv, _ = _serve_cli(monkeypatch, capsys, "--model", str(ckpt))
    assert code == 0 and srv.cfg.api_key is None


def test_a_body_that_arrives_too_slowly_is_answered_408(server: str, model_tok: tuple[Any, Any], ckpt: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A client that sends part of its body and then nothing, or trickles it (slowloris), held its
    connection and what it had sent for ever; now the whole body must arrive within read_timeout_s."""
    model, tok = model_tok
    app = create_app(ENGINES[server], tok, _config(model, read_timeout_s=0.5))
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n")

    def answer(s: socket.socket) -> bytes:
        got = b""
        while chunk := s.recv(4096):  # to the end: the server closes the connection
            got += chunk
        return got

    with ServerThread(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            t0 = time.monotonic()
            s.sendall(head + b"Content-Length: 100\r\n\r\n{\"prompt\": ")
            got = answer(s)
            assert 0.4 < time.monotonic() - t0 < 5
        assert got.startswith(b"HTTP/1.1 408 ") and b"body_timeout" in got and b"within 0.5 s" in got, got
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # chunked, a byte every 0.1 s
            s.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
            t0 = time.monotonic()
            with pytest.raises(OSError):  # the server closed the connection
                for _ in range(100):
                    s.sendall(b"1\r\n \r\n")
                    time.sleep(0.1)
            assert time.monotonic() - t0 < 5
        # a body that arrives in time is answered as before
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert r.status_code == 200, r.text
    for bad in ("0", "-1", "nan", "inf"):
        code, srv, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--read-timeout", bad)
        assert code == 2 and srv is None and "--read-timeout must be a number of seconds > 0" in err, err


def test_serve_refuses_a_drain_timeout_that_is_not_seconds(ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """--drain-timeout nan failed once the model had loaded with 'cannot convert float NaN to integer', and
    inf with an OverflowError's traceback; -1 drained for a second."""
    for bad in ("nan", "inf", "-1"):
        code, srv, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--drain-timeout", bad)
        assert code == 2 and srv is None and f"--drain-timeout must be a number of seconds >= 0, got {bad}" in err, err


def test_serve_says_it_cannot_listen_before_loading_the_model(ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A port in use (a server still running) or a host name that does not resolve failed only once the
    model had loaded (minutes for Mixtral 8x7B), with uvicorn's message and exit status 3."""
    import mixlab.cli.serve

    def load(args: Any) -> Any:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mixlab.cli.serve, "_load", load)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        code, srv, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--port", str(port), bind=True)
    assert code == 1 and srv is None, err
    assert f"cannot listen on --host 127.0.0.1 --port {port}: Address already in use" in err, err
    code, srv, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--host", "no-such-host.invalid",
                                "--port", "0", bind=True)
    assert code == 1 and "cannot listen on --host no-such-host.invalid --port 0" in err, err


def test_a_request_head_that_arrives_too_slowly_closes_the_connection(server: str,
                                                                      model_tok: tuple[Any, Any]) -> None:
    """uvicorn waited for ever for a connection's request line and headers (and for the next
    request's, once its first byte came): a client that sends none, or trickles them (slowloris),
    held a connection for ever. Now they must come within read_timeout_s; a reply that takes longer
    is not cut."""
    model, tok = model_tok
    app = create_app(ENGINES[server], tok, _config(model, read_timeout_s=0.5))
    with ServerThread(app) as url:
        port = int(url.rsplit(":", 1)[1])
        for first, then in ((b"", b""), (b"GET /health HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n"),
                            (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"GET /health HT")):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                t0 = time.monotonic()
                s.sendall(first)
                time.sleep(0.2)
                s.sendall(then)  # a trickle: the keep-alive timeout stopped at the first byte
                got = b""
                while chunk := s.recv(4096):  # to the end: the server closes the connection
                    got += chunk
                assert 0.4 < time.monotonic() - t0 < 5, first
                assert got.count(b"HTTP/1.1 200") == (1 if first.endswith(b"\r\n\r\n") else 0), got
        # a streamed reply that lasts longer than the timeout runs to its end
        runner = ENGINES[server].runner
        forward = runner.forward
        runner.forward = lambda items: (time.sleep(0.05), forward(items))[1]  # type: ignore[method-assign]
        try:
            body = {"prompt": "hi", "max_tokens": 20, "ignore_eos": True, "stream": True}
            t0 = time.monotonic()
            with httpx.stream("POST", url + COMP, json=body, timeout=30) as r:
                lines = [x for x in r.iter_lines() if x]
            # (a chunk per token, but a token whose text is held back, part of a character, sends none)
            assert time.monotonic() - t0 > 0.5 and lines[-1] == "data: [DONE]", lines
            assert json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length", lines
        finally:
            del runner.forward


def test_a_client_that_stops_reading_its_stream_is_disconnected(server: str, model_tok: tuple[Any, Any]) -> None:
    """A client that keeps its connection open but reads nothing of its stream: the engine is not held up
    (each request's outputs queue in the server, at most max_tokens of them) and other streams keep
    their pace; but the handler, the connection and those outputs were held for ever (until the client
    read or left). Once nothing could be sent to it for read_timeout_s, it is disconnected."""
    model, tok = model_tok
    app = create_app(ENGINES[server], tok, _config(model, read_timeout_s=1.0))
    body = json.dumps({"prompt": "hi", "max_tokens": CONTEXT - 10, "ignore_eos": True, "temperature": 0,
                       "stream": True, "logprobs": 20, "return_experts": True, "n": 16}).encode()  # ~16 MB
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with ServerThread(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's buffers fill
            s.connect(("127.0.0.1", port))
            s.sendall(head + body)
            assert until(lambda: metric(url, "mixlab_http_requests_in_progress") == 1)
            t0 = time.monotonic()
            other = httpx.post(url + COMP, json={"prompt": "hi", "max_tokens": 40, "ignore_eos": True,
                                                 "stream": True}, timeout=30)
            assert other.status_code == 200 and other.text.endswith("data: [DONE]\n\n")
            assert time.monotonic() - t0 < 20  # the stalled stream held nobody up (held, it ends at the 30 s timeout)
            # the handler lets go without the client having read a byte (it held on for ever)
            assert until(lambda: metric(url, "mixlab_http_requests_in_progress") == 0, timeout=30)
            s.settimeout(10)
            got = b""
            try:
                while chunk := s.recv(1 << 16):
                    got += chunk
            except ConnectionResetError:
                pass
        assert got.startswith(b"HTTP/1.1 200") and b"data: [DONE]" not in got  # cut off: the client was gone


def test_host_header_checked_against_dns_rebinding(server: str, ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A page at a name an attacker points at 127.0.0.1 is same-origin with a loopback server: such
    names get 403 (they got 200: the page could use the model and read every answer); IP addresses,
    localhost and the names given are answered."""
    port = server.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "EVIL.example.", "localhost.evil.example"):
        r = httpx.get(server + "/v1/models", headers={"Host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", (host, r.text)
    assert "--allowed-hosts localhost.evil.example" in r.text
    r = httpx.post(server + CHAT, json={"messages": U, "max_tokens": 1}, headers={"Host": "evil.example"})
    assert r.status_code == 403
    # what a page on another site may send without CORS's consent (a form, text/plain) does no work
    before = metric(server, "mixlab_prompt_tokens_total")
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        r = httpx.post(server + CHAT, content=json.dumps({"messages": U, "max_tokens": 1}),
                       headers={"Content-Type": kind})
        assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"], kind
    assert metric(server, "mixlab_prompt_tokens_total") == before
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST.", "app.localhost", f"[::1]:{port}", "::1",
                 "10.1.2.3"):
        assert httpx.get(server + "/health", headers={"Host": host}).status_code == 200, host
    # mixlab serve: on a loopback --host no other names unless --allowed-hosts; elsewhere any
    for argv, allowed in ((), []), (("--allowed-hosts", "chat.example"), ["chat.example"]), \
            (("--allowed-hosts", "*"), None), (("--host", "0.0.0.0", "--api-key", "k"), None), \
            (("--host", "0.0.0.0", "--api-key", "k", "--allowed-hosts", "a.example"), ["a.example"]):
        code, srv, _ = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), *argv)
        assert code == 0 and srv.cfg.allowed_hosts == allowed, argv
    app = create_app(ENGINES[server], srv.tok, ServerConfig(allowed_hosts=["a.example", "B.example.:8000"]))
    with ServerThread(app) as url:
        assert httpx.get(url + "/health", headers={"Host": "A.example:80"}).status_code == 200
        assert httpx.get(url + "/health", headers={"Host": "b.example"}).status_code == 200  # given with a port
        assert httpx.get(url + "/health", headers={"Host": "c.example"}).status_code == 403


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str,
               bind: bool = False) -> tuple[int, Any, str]:
    """`mixlab serve ARGV` in this process, up to the point where it would listen: (exit code, its
    server's state, what it printed). Its address is taken as free unless `bind` (8000 may be taken here)."""
    import mixlab.cli.serve
    import mixlab.serve
    from mixlab.cli import main

    seen: list[Any] = []
    def run_server(app: Any, **kw: Any) -> None:  # as if it had bound its port
        seen.append(app)
        kw["on_start"](kw["port"])

    monkeypatch.setattr(mixlab.serve, "run_server", run_server)
    if not bind:
        monkeypatch.setattr(mixlab.cli.serve, "check_address", lambda host, port: None)
    code = main(["serve", *argv, "--dtype", "float32", "--threads", "1"])
    return code, seen[0].state.server if seen else None, capsys.readouterr().err


def test_serve_batch_invariant_flag(ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from mixlab.ops import native

    if native.load() is None:
        pytest.skip("needs the native kernels")
    code, srv, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--batch-invariant")
    assert code == 0 and srv.engine.runner.batch_invariant and "batch-invariant steps" in err
    code, _, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--batch-invariant", "--pack-weights", "yes")
    assert code != 0 and "--pack-weights yes has no use with --batch-invariant" in err
    code, _, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--batch-invariant", "--quant", "int8")
    assert code == 2 and "--batch-invariant does not combine with --quant int8: its steps run the native" in err


def test_serve_s_startup_line_says_the_weights_it_serves(ckpt: Path, model_tok: tuple[Any, Any], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The line that says where the server listens said the model's name alone: not what it loaded nor in
    which dtype or quantisation; and a Q4_0 GGUF's int4 matrices were reported as quant "none" (/v1/models)."""
    code, srv, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--quant", "int8")
    assert code == 0 and f"mixlab serve: {ckpt.name} (float32, int8 matrices, from {ckpt}) on http://" in err, err
    assert srv.cfg.model_info["quant"] == "int8"
    srv.engine.shutdown()
    from mixlab.checkpoint.gguf import write_gguf

    gguf = tmp_path / "m-q4_0.gguf"
    with pytest.warns(UserWarning, match="stored as f16"):  # the tiny model's 48-wide w2: f16, the rest Q4_0
        write_gguf(model_tok[0], gguf, quant="q4_0")
    code, srv, err = _serve_cli(monkeypatch, capsys, "--model", str(gguf))
    assert code == 0 and f"mixlab serve: m-q4_0.gguf (float32, int4 matrices, from {gguf}) on http://" in err, err
    assert srv.cfg.model_info == {**srv.cfg.model_info, "quant": "int4", "dtype": "float32"}
    srv.engine.shutdown()


def test_serve_says_what_the_kv_cache_holds_and_takes_max_model_len(ckpt: Path, model_tok: tuple[Any, Any],
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from mixlab.engine.runner import bytes_per_token

    per_token = bytes_per_token(model_tok[0])  # float32, as the CLI loads it here
    model = str(ckpt)
    # the budget holds 4 sequences of 128 tokens: the context shrinks from 512 to 128, and says so
    code, srv, err = _serve_cli(monkeypatch, capsys, "--model", model, "--max-batch", "4",
                                "--cache-bytes", str(4 * 128 * per_token), "--max-connections", "3")
    assert code == 0 and srv.cfg.context_len == 128 and srv.cfg.max_connections == 3
    assert f"4 sequences of up to 128 tokens (the model's context is {CONTEXT}" in err
    # --max-model-len: the whole context per request, and fewer sequences at once
    code, srv, err = _serve_cli(monkeypatch, capsys, "--model", model, "--max-batch", "4",
                                "--cache-bytes", str(4 * 128 * per_token), "--max-model-len", str(CONTEXT))
    assert code == 0 and srv.cfg.context_len == CONTEXT
    assert f"1 sequences of up to {CONTEXT} tokens (--max-batch 4" in err
    code, srv, err = _serve_cli(monkeypatch, capsys, "--model", model, "--max-model-len", str(CONTEXT + 1))
    assert code == 2 and srv is None and f"--max-model-len must be in [2, {CONTEXT}]" in err
    code, srv, err = _serve_cli(monkeypatch, capsys, "--model", model, "--cache-bytes", str(100 * per_token),
                                "--max-model-len", "200")
    assert code == 2 and srv is None and "cannot hold one sequence of 200 tokens" in err and "--cache-bytes" in err
    # sizes read as every mixlab flag reads them (--max-memory, --device-mem): GB = 10^9, GiB = 2^30
    from mixlab.cli.serve import _bytes

    assert _bytes("2GB") == 2 * 10**9 and _bytes("2GiB") == 2 << 30 and _bytes("4MiB") == 4 << 20
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'1XB' is not a size; expected"):
        _bytes("1XB")


def test_a_training_runs_export_is_served_by_the_runs_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`mixlab serve --model runs/demo/hf` (the demo's and a training run's export) served the model as "hf":
    the chat page's header and /v1/models said "hf". A run's hf/ now takes the run's name; another folder,
    a GGUF file (suffix kept, a link not followed) and `.` keep their own."""
    from mixlab.cli.serve import served_name

    run = tmp_path / "demo"
    (run / "hf").mkdir(parents=True)
    assert served_name(str(run / "hf")) == "hf"  # not a run: no hf/config.json, no checkpoints/
    (run / "hf" / "config.json").write_text("{}")
    assert served_name(str(run / "hf")) == served_name(str(run / "hf") + "/") == "demo"
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "3f2a").write_text("")
    (tmp_path / "m.Q4_0.gguf").symlink_to(tmp_path / "blobs" / "3f2a")
    assert served_name(str(tmp_path / "m.Q4_0.gguf")) == "m.Q4_0.gguf"
    monkeypatch.chdir(run)
    assert served_name(".") == "demo" and served_name("hf") == "demo"


def test_serve_refuses_a_batch_or_cache_that_cannot_fit(ckpt: Path, model_tok: tuple[Any, Any],
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--max-batch 1000000000 started a server of 4 million sequences of 2 tokens, which no request
    fits, with a note; a --cache-bytes beyond the memory zeroed it until the machine swapped. Both
    are refused before the server starts, naming the value and the limit."""
    from mixlab.config import format_bytes
    from mixlab.engine import runner

    per_token = runner.bytes_per_token(model_tok[0])
    budget = 2 * 4 * per_token  # 4 sequences of 2 tokens
    code, srv, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--cache-bytes", str(budget),
                                "--max-batch", "5")
    assert code == 2 and srv is None
    assert (f"error: max_batch=5 sequences cannot fit in the KV cache's {format_bytes(budget)} (cache_bytes), "
            "even of 2 tokens each: at most 4 (the flags: --cache-bytes, --max-model-len, --max-batch)") in err
    code, srv, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--cache-bytes", str(budget),
                                "--max-batch", "4")
    assert code == 0 and srv.cfg.context_len == 2
    monkeypatch.setattr(runner, "available_memory", lambda: 100 * per_token)
    from mixlab.cli import run  # (the weights' own check would refuse first at this size: tests/test_quant_load.py)

    monkeypatch.setattr(run, "check_memory", lambda *a, **k: None)
    code, srv, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--max-batch", "1",
                                "--max-model-len", "128")
    assert code == 2 and srv is None
    assert (f"a KV cache of {format_bytes(128 * per_token)} (1 sequences of 128 positions, cache_bytes="
            f"{runner.DEFAULT_CACHE_BYTES}) cannot fit: {format_bytes(100 * per_token)} of memory is available; at "
            f"most cache_bytes={100 * per_token}") in err
    code, srv, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--max-batch", "1",
                                "--max-model-len", "64")
    assert code == 0


@pytest.mark.slow
def test_sigterm_drains_and_exits_0(ckpt: Path) -> None:
    """Started with --port 0, the server says the port the system chose once it listens; SIGTERM lets
    the stream in flight finish and exits 0. At --log-level info (the default) each request has a line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "mixlab", "serve", "--model", str(ckpt), "--port", "0",
                             "--dtype", "float32", "--threads", "1", "--drain-timeout", "60", "--log-level", "info"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    listening = threading.Event()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if " on http://127.0.0.1:" in line:
                listening.set()

    threading.Thread(target=read_stderr, daemon=True).start()
    try:
        assert listening.wait(120), "the server did not say where it listens: " + "".join(lines)
        port = int(next(x for x in lines if " on http://" in x).split("http://127.0.0.1:")[1].split()[0])
        assert port != 0
        url = f"http://127.0.0.1:{port}"
        assert _healthy(url) and httpx.head(url + "/health", timeout=5).status_code == 200
        head = httpx.head(url + "/", timeout=5)
        assert head.status_code == 200 and head.headers["content-type"].startswith("text/html") and not head.content
        got: list[str] = []
        body = {"messages": U, "max_tokens": 150, "ignore_eos": True, "temperature": 0, "stream": True}
        first = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", url + CHAT, json=body, timeout=60) as resp:
                for line in resp.iter_lines():
                    if line:
                        got.append(line)
                        first.set()

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(60)
        proc.send_signal(signal.SIGTERM)
        t.join(90)
        assert proc.wait(90) == 0, "".join(lines)
        # the in-flight stream was finished, not cut
        events = [json.loads(x[6:]) for x in got if x.startswith("data: {")]
        assert got[-1] == "data: [DONE]"
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for e in events if e["choices"] and e["choices"][0]["delta"].get("content") is not None) > 1
        with pytest.raises(httpx.ConnectError):  # and it no longer accepts
            httpx.get(url + "/health", timeout=2)
        # the access log (the help said "one line per request" where uvicorn's was turned off)
        assert any('"POST /v1/chat/completions HTTP/1.1" 200' in x for x in lines), "".join(lines)
        assert any('"HEAD /health HTTP/1.1" 200' in x for x in lines), "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# -- lm-evaluation-harness through the server (issue 18, point 3) -----------------------------------

@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_eval import TASKS, TEXTS

    d = tmp_path_factory.mktemp("tasks")
    mc = [{"question": q, "choices": c, "answer": a} for q, c, a in [
        ("What is two plus two?", ["four", "five", "twenty two"], 0),
        ("Which colour is the sky?", [" blue", " green"], 1),
        ("Capital of France", ["Paris", "Rome", "Berlin", "Madrid"], 2),
        ("Pick the even number", ["3", "8", "11"], 1),
    ]]
    (d / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in mc) + "\n")
    (d / "ppl.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    gen = [{"question": "Count: one, two,", "answer": " three"}, {"question": "Hello", "answer": " world"},
           {"question": "The sky is", "answer": " blue"}]
    (d / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in gen) + "\n")
    for name, text in TASKS.items():
        (d / f"{name}.yaml").write_text(text.format(data=d))
    return d


def _evaluate(lm: Any, tasks: Path, names: list[str], **kw: Any) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    # include_defaults=False: only these tasks are indexed, not lm-eval's thousands of YAML files (~15 s each time)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, log_samples=True, verbosity="ERROR",
                                   **kw)


@pytest.mark.slow
def test_lm_eval_local_completions_equals_the_native_model(server: str, ckpt: Path, tasks: Path) -> None:
    pytest.importorskip("lm_eval")
    pytest.importorskip("aiohttp")
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from mixlab.eval.harness import MixlabLM

    names = ["mx_gen", "mx_mc", "mx_ppl"]
    # lm-eval's API models keep one token of max_length for the reply and send the scored tokens in the
    # prompt: max_length=N scores as the native (and hf) model's max_length=N - 2 (docs/serving.md).
    # N = 24 is shorter than the first text, so rolling windows and their context are compared too.
    native = _evaluate(MixlabLM(pretrained=str(ckpt), dtype="float32", batch_size=2, max_length=22), tasks, names)
    # lm-eval finds the server's tokenizer through /tokenizer_info and /tokenize (its "remote" backend)
    api = LocalCompletionsAPI(base_url=server + "/v1/completions", model=NAME, batch_size=2, num_concurrent=4,
                              max_length=24, max_retries=1)
    assert api.tokenizer_backend == "remote"
    served = _evaluate(api, tasks, names)
    for task in names:
        for key, value in native["results"][task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert served["results"][task][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (task, key)
        for a, b in zip(native["samples"][task], served["samples"][task], strict=True):
            if task == "mx_gen":
                # the same tokens; the server's text keeps the first word's leading space (OpenAI's and
                # vLLM's convention: decoded after the prompt), the hf and mixlab models drop it
                # (transformers' decode of the continuation alone)
                (ta,), (tb,) = a["resps"][0], b["resps"][0]
                assert tb in (ta, " " + ta), (ta, tb)
            else:
                for x, y in zip(a["resps"], b["resps"], strict=True):
                    lx = x[0][0] if isinstance(x[0], (tuple, list)) else x[0]
                    ly = y[0][0] if isinstance(y[0], (tuple, list)) else y[0]
                    assert ly == pytest.approx(lx, abs=1e-4)
    assert served["results"]["mx_mc"]["acc,none"] == native["results"]["mx_mc"]["acc,none"]


@pytest.mark.slow
def test_lm_eval_local_chat_completions(server: str, client: Any, tasks: Path) -> None:
    pytest.importorskip("lm_eval")
    pytest.importorskip("aiohttp")
    from lm_eval.models.openai_completions import LocalChatCompletion

    api = LocalChatCompletion(base_url=server + "/v1/chat/completions", model=NAME, max_retries=1, num_concurrent=2)
    res = _evaluate(api, tasks, ["mx_gen"], apply_chat_template=True)
    for s in res["samples"]["mx_gen"]:
        # the same request through the openai client: greedy, cut at the task's stop strings
        r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": s["doc"]["question"]}],
                                           max_tokens=6, temperature=0, stop=["\n", "."])
        assert s["resps"][0][0] == r.choices[0].message.content
    assert "exact_match,none" in res["results"]["mx_gen"]


@contextmanager
def _server_log() -> Iterator[list[logging.LogRecord]]:
    """The records of mixlab's loggers ("mixlab.serve": what the access log cannot show; "mixlab.engine")."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("mixlab")  # mixlab.serve's and mixlab.engine's
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_error_mid_stream_sends_an_error_event_then_done(model_tok: tuple[Any, Any]) -> None:
    """... and says it in the server's log: the access log had said 200 as the stream began, and nothing
    else was logged (an operator saw a success)."""
    model, tok = model_tok
    engine = Engine(model, tok, max_batch=2).start()
    with ServerThread(create_app(engine, tok, _config(model))) as url, _server_log() as records:
        body = {"messages": U, "max_tokens": CONTEXT - 40, "ignore_eos": True, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + CHAT, json=body, timeout=30, headers={"X-Request-Id": "proxy-7"}) as resp:
            lines = (x for x in resp.iter_lines() if x)
            first, _ = next(lines), next(lines)
            engine.shutdown()  # the engine fails its running requests
            rest = list(lines)
        rid = json.loads(first[6:])["id"]
        (record,) = records
        assert record.levelno == logging.WARNING and f"{rid} (X-Request-Id proxy-7)" in record.getMessage(), \
            record.getMessage()
        assert "/v1/chat/completions" in record.getMessage() and "the engine shut down" in record.getMessage()
        # a request after that: OpenAI's error body, 503 (it was a plain-text 500 and a traceback)
        late = httpx.post(url + COMP, json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        health = httpx.get(url + "/health", timeout=30)  # it said 200 "ok"
    assert rest[-1] == "data: [DONE]"
    err = json.loads(rest[-2][6:])["error"]
    assert err["type"] == "server_error" and "shut down" in err["message"]
    assert late.status_code == 503 and late.json()["error"]["code"] == "engine_unavailable"
    assert health.status_code == 503 and health.json() == {"status": "engine stopped"}
    assert "shut down" in late.json()["error"]["message"]


def test_a_bug_mid_stream_is_logged_with_its_traceback(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug of the server's after a stream began was answered in-band (an error event, [DONE]) and never
    logged: the traceback was lost, and the access log said 200."""
    from mixlab.serve.common import Choice

    def broken(*a: Any, **kw: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Choice, "take", broken)
    with _server_log() as records:
        r = httpx.post(server + COMP, json={"prompt": "hi", "max_tokens": 3, "stream": True}, timeout=30)
    lines = [x for x in r.text.splitlines() if x]
    assert lines[-1] == "data: [DONE]" and "internal error: RuntimeError: a bug" in lines[-2]
    (record,) = records
    assert record.levelno == logging.ERROR and "/v1/completions" in record.getMessage()
    assert record.exc_info is not None and str(record.exc_info[1]) == "a bug"


def test_a_failed_engine_step_is_logged_with_its_traceback(server: str) -> None:
    """A step that raised failed its requests (a 500 naming the exception) and the engine went on, but its
    traceback was dropped and nothing but the access log's '500' was logged."""
    runner = ENGINES[server].runner
    forward = runner.forward
    calls = iter(range(10**9))

    def broken(items: Any) -> Any:
        if next(calls) == 0:
            raise RuntimeError("a broken step")
        return forward(items)

    runner.forward = broken  # type: ignore[method-assign]
    try:
        with _server_log() as records:
            r = httpx.post(server + COMP, json={"prompt": "hi", "max_tokens": 3}, timeout=30)
            assert r.status_code == 500 and "RuntimeError: a broken step" in r.json()["error"]["message"], r.text
            assert httpx.post(server + COMP, json={"prompt": "hi", "max_tokens": 3}, timeout=30).status_code == 200
    finally:
        del runner.forward  # the class's method again
    (step,), (request,) = ([r for r in records if r.name == name] for name in ("mixlab.engine", "mixlab.serve"))
    assert step.name == "mixlab.engine" and step.exc_info is not None and str(step.exc_info[1]) == "a broken step"
    assert request.name == "mixlab.serve" and request.levelno == logging.WARNING
    assert re.search(r"/v1/completions cmpl-\S+ \(X-Request-Id req-[0-9a-f]{32}\)", request.getMessage())
    assert "a broken step" in request.getMessage()


def test_the_page_is_self_contained_and_not_framable(server: str) -> None:
    """The page's files: its own scripts and styles alone (CSP), no other site may frame it (it could:
    clickjacking), no URL to anywhere else, no text put in as HTML, no path to the filesystem."""
    static = ROOT / "src" / "mixlab" / "serve" / "static"
    for f in static.iterdir():
        text = f.read_text()
        assert not re.search(r"https?:|//[a-z]|@import|url\(", text, re.I), f.name
        assert not re.search(r"innerHTML\s*=(?!\s*\"\")|outerHTML|insertAdjacentHTML|document\.write|eval\(",
                             text), f.name
    for path in ("/", "/static/chat.js", "/static/chat.css"):
        r = httpx.get(server + path)
        assert r.status_code == 200
        csp = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
        assert csp["default-src"] == csp["script-src"] == csp["connect-src"] == "'self'"
        assert csp["frame-ancestors"] == "'none'"
    for name in ("../app.py", "..%2fapp.py", "index.htm", "chat.js.map"):
        assert httpx.get(server + "/static/" + name).status_code == 404


# -- the chat page ------------------------------------------------------------------------------------

def _chromium() -> tuple[str, str] | None:
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextmanager
def _browser() -> Iterator[Any]:
    """A headless chromium (a fresh profile: storage of its own) through selenium; skips without one."""
    webdriver = pytest.importorskip("selenium.webdriver")
    found = _chromium()
    if found is None:
        pytest.skip("no chromium + chromedriver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,800"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(found[1]), options=opts)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


def _contrast(fg: str, bg: str) -> float:
    """WCAG's contrast ratio of two CSS colours as the browser gives them, 'rgb(r, g, b)'."""

    def luminance(colour: str) -> float:
        c = [int(x) / 255 for x in re.findall(r"\d+", colour)[:3]]
        r, g, b = (x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4 for x in c)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    hi, lo = sorted((luminance(fg), luminance(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


@pytest.mark.slow
def test_chat_page_streams_and_colours_tokens_by_expert(model_tok: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = model_tok
    with Engine(model, tok, max_batch=2) as engine, ServerThread(app := create_app(engine, tok, _config(model))) as url:
        with _browser() as driver:
            from selenium.webdriver.common.by import By
            from selenium.webdriver.common.keys import Keys
            from selenium.webdriver.support.ui import WebDriverWait

            driver.get(url + "/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: "experts" in d.find_element(By.ID, "model").text)
            assert len(driver.find_elements(By.CSS_SELECTOR, "#layer option")) == model.config.n_layers
            # the page asks for its own files alone, and each is there (a 404 for /favicon.ico was logged)
            loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
            assert loaded and all(u.startswith(url + "/") for u in loaded), loaded
            assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
            # a new chat says what to do (its box was blank), and no more once a message is there
            hint = "return getComputedStyle(document.getElementById('log'), '::before').content"
            assert "Write a message below" in driver.execute_script(hint)
            temperature = driver.find_element(By.ID, "temperature")
            temperature.clear()
            temperature.send_keys("0")
            limit = driver.find_element(By.ID, "max_tokens")
            limit.clear()
            limit.send_keys("40")
            driver.find_element(By.ID, "colour").click()
            driver.find_element(By.ID, "layer").send_keys("layer 1")
            driver.find_element(By.ID, "input").send_keys("Which experts do you use for this sentence?")
            # Enter that ends an input method's composition does not send (it sent half-composed text)
            assert driver.execute_script(
                "const e = new KeyboardEvent('keydown', {key: 'Enter', isComposing: true, bubbles: true});"
                "arguments[0].dispatchEvent(e); return document.querySelectorAll('.msg').length",
                driver.find_element(By.ID, "input")) == 0
            driver.find_element(By.ID, "send").click()
            # streamed: tokens appear one span at a time, and the send button comes back at the end
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant .tok")) > 0)
            wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
            assert driver.execute_script(hint) == "none"
            spans = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .tok")
            reply = driver.find_element(By.CSS_SELECTOR, ".msg.assistant .body").text
            messages = [{"role": "user", "content": "Which experts do you use for this sentence?"}]
            ids = generate(model, [tok.encode_chat(messages)], max_new_tokens=40)[0]
            expected = tok.decode(ids)
            assert reply == expected.strip("\n") or reply.strip() == expected.strip()
            # a reply cut at max tokens says so beside it (it looked finished)
            notes = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .note")]
            assert notes == (["(cut at max tokens)"] if len(ids) == 40 and tok.eos_id not in ids else [])
            # every token coloured by its own experts (the last one's too), several experts
            colours = {s.value_of_css_property("background-color") for s in spans}
            assert len(colours) > 1 and "rgba(0, 0, 0, 0)" not in colours
            assert spans[0].get_attribute("title").startswith("layer 0: experts ")
            # every field has a name a screen reader says (the message box had only a placeholder), and all
            # text shown stands out from its background by WCAG AA's 4.5:1 (grey notes were 4.4:1)
            assert driver.execute_script("return [...document.querySelectorAll('input, textarea, select, button')]"
                                         ".filter(e => !e.labels.length && !e.ariaLabel && !e.textContent.trim())"
                                         ".map(e => e.id)") == []
            texts = driver.execute_script(
                "const bg = (e) => { for (; e; e = e.parentElement) { const c = getComputedStyle(e).backgroundColor;"
                "  if (c !== 'rgba(0, 0, 0, 0)') return c; } return 'rgb(255, 255, 255)'; };"
                "return [...document.querySelectorAll('body *')].filter(e => e.offsetParent && !e.matches(':disabled')"
                "  && [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim()))"
                ".map(e => [e.textContent.slice(0, 30), getComputedStyle(e).color, bg(e)])")
            low = [(text, round(_contrast(fg, bg), 2)) for text, fg, bg in texts if _contrast(fg, bg) < 4.5]
            assert len(texts) > 20 and low == [], low
            # The screenshot in docs/ is refreshed only when asked: a test run leaves the tree as it was.
            shot = ROOT / "docs" / "serve-chat.png" if os.environ.get("MIXLAB_UPDATE_DOCS") else tmp_path / "chat.png"
            driver.execute_script("document.getElementById('settings').scrollTop = 0")  # the typing scrolled it
            driver.save_screenshot(str(shot))
            assert shot.stat().st_size > 10_000
            # another layer recolours the tokens already there; the legend names each expert's colour
            legend = driver.find_elements(By.CSS_SELECTOR, "#legend span")
            assert [e.text for e in legend] == [f"expert {e}" for e in range(model.config.moe.num_experts)]
            # the legend is in sight beside the coloured reply, not below the fold of a laptop's window under
            # the settings (it was at 698 of 657 pixels: which colour is which expert was hidden)
            assert driver.execute_script("return document.getElementById('legend').getBoundingClientRect().bottom"
                                         " <= innerHeight")
            palette = driver.execute_script(
                "return [...document.querySelectorAll('#legend span')].map(s => getComputedStyle(s).backgroundColor)")

            def painted(layer: int) -> tuple[list[str], list[str]]:  # each token's colour, its expert's in the legend
                seen, titles = driver.execute_script(
                    "const t = [...document.querySelectorAll('.msg.assistant .tok[title]')];"
                    "return [t.map(s => getComputedStyle(s).backgroundColor), t.map(s => s.title)]")
                first = [int(t.split("\n")[layer].split("experts ")[1].split(",")[0]) for t in titles]
                return seen, [palette[e] for e in first]

            seen, expected = painted(1)
            assert seen == expected
            # entering an API key reloads the model's description and keeps the chosen layer (the list
            # went back to layer 0 while the tokens stayed painted by layer 1)
            driver.execute_script("document.getElementById('model').textContent = ''")
            api_key = driver.find_element(By.ID, "api_key")
            api_key.send_keys("unused\t")
            wait.until(lambda d: "experts" in d.find_element(By.ID, "model").text)
            assert driver.find_element(By.ID, "layer").get_attribute("value") == "1"
            assert painted(1) == (seen, expected)
            api_key.send_keys(Keys.CONTROL, "a", Keys.DELETE, "\t")
            driver.find_element(By.ID, "layer").send_keys("layer 0")
            assert painted(0)[0] == painted(0)[1] != seen
            # without a mouse (the title shows on hover alone): Tab reaches the reply, ←/→ go from token to
            # token, and the status (a live region) says the token's experts
            body = driver.find_element(By.CSS_SELECTOR, ".msg.assistant .body")
            body.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
            on = driver.execute_script("const t = document.activeElement; return [t.parentElement === arguments[0] "
                                       "&& [...arguments[0].children].indexOf(t), t.title]", body)
            assert body.get_attribute("tabindex") == "0" and on == [1, spans[1].get_attribute("title")]
            status = driver.find_element(By.ID, "status")
            token = json.dumps(spans[1].get_attribute("textContent"), ensure_ascii=False)
            said = f'{token}: {on[1].replace(chr(10), "; ")}'
            assert status.get_attribute("role") == "status" and status.get_attribute("textContent") == said
            # a second turn: multi-turn history is sent, the reply streams again
            driver.find_element(By.ID, "input").send_keys("And now?")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
                       and d.find_element(By.ID, "send").is_enabled())
            # the message box keeps the focus after a click on a button (the next message was typed into nothing)
            focused = "return document.activeElement.id"
            assert driver.execute_script(focused) == "input"
            # HTML in a question or in a reply is shown as text, never run (the reply is served here by
            # the page's own fetch, as a model could write it)
            html = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script><b>bold</b>'
            driver.execute_script(
                "window.realFetch = window.fetch; const ev = (c) => 'data: ' + JSON.stringify("
                "{choices: [{index: 0, delta: {content: c}}]}) + '\\n\\n';"
                "window.fetch = async () => new Response(ev(arguments[0]) + 'data: [DONE]\\n\\n');", html)
            driver.find_element(By.ID, "input").send_keys(html + "\n")
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 3
                       and d.find_element(By.ID, "send").is_enabled())
            driver.execute_script("window.fetch = window.realFetch")
            assert driver.find_elements(By.CSS_SELECTOR, ".msg.user .body")[-1].text == html
            assert driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .body")[-1].text == html
            assert driver.find_elements(By.CSS_SELECTOR, "#log img, #log script, #log b") == []
            assert driver.execute_script("return window.pwned") is None
            # a reload keeps the conversation, its tokens coloured as they were, and the settings (all lost)
            driver.find_element(By.ID, "system").send_keys("Be brief.")
            shown = ("return [messages,"
                     "[...document.querySelectorAll('#log .msg')].map(m => [m.className, m.textContent]),"
                     "[...document.querySelectorAll('.tok')].map(s => [getComputedStyle(s).backgroundColor, s.title]),"
                     "['system', 'temperature', 'max_tokens', 'layer'].map(id => document.getElementById(id).value),"
                     "document.getElementById('colour').checked]")
            before = driver.execute_script(shown)
            assert len(before[0]) == 6 and before[3] == ["Be brief.", "0", "40", "0"] and before[4] is True
            driver.refresh()
            wait.until(lambda d: "experts" in d.find_element(By.ID, "model").text)
            assert driver.execute_script(shown) == before
            temperature, limit = driver.find_element(By.ID, "temperature"), driver.find_element(By.ID, "max_tokens")
            # Regenerate: the last reply is asked for again, with the conversation before it, and replaced
            driver.execute_script(
                "window.sent = []; window.realFetch = window.fetch; window.fetch = async (u, o) => { sent.push(o.body);"
                "return new Response('data: ' + JSON.stringify({choices: [{index: 0, delta: {content: 'Again.'}}]})"
                " + '\\n\\ndata: [DONE]\\n\\n'); }")
            driver.find_element(By.ID, "regenerate").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .body")[-1].text == "Again."
                       and d.find_element(By.ID, "regenerate").is_enabled())
            driver.execute_script("window.fetch = window.realFetch")
            asked = json.loads(driver.execute_script("return sent[0]"))
            assert asked["model"] == NAME
            asked = asked["messages"]
            assert asked == [{"role": "system", "content": "Be brief."}] + [
                {"role": m["role"], "content": m["content"]} for m in before[0][:5]]
            assert driver.execute_script("return messages.map(m => m.content)") == [
                m["content"] for m in before[0][:5]] + ["Again."]
            assert len(driver.find_elements(By.CSS_SELECTOR, ".msg")) == 6
            # Copy puts a message's text on the clipboard; where there is none (a page on http:// from
            # another machine), it selects the text for Ctrl+C
            driver.execute_script("navigator.clipboard.writeText = async (t) => { window.copied = t; }")
            copy = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .copy")[0]
            copy.click()
            first = driver.execute_script("return document.querySelector('.msg.assistant .body').textContent")
            wait.until(lambda d: copy.text == "Copied")
            assert driver.execute_script("return window.copied") == first == before[0][1]["content"]
            driver.execute_script("Object.defineProperty(navigator, 'clipboard', {value: undefined})")
            driver.find_elements(By.CSS_SELECTOR, ".msg.user .copy")[1].click()
            wait.until(lambda d: d.execute_script("return getSelection().toString()") == "And now?")
            # From here each engine step is held up 20 ms, so that a reply is still streaming when clicked at.
            forward = engine.runner.forward
            engine.runner.forward = lambda items: (time.sleep(0.02), forward(items))[1]  # type: ignore[method-assign]
            limit.clear()
            limit.send_keys("300")

            def streaming(k: int) -> Any:  # the k-th reply has a few tokens
                return lambda d: (len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == k and len(
                    d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].find_elements(By.CLASS_NAME, "tok")) > 3)

            # "New chat" during a reply: the new conversation starts empty (the stopped reply was
            # appended to it, and sent as its first message with the next question)
            driver.find_element(By.ID, "input").send_keys("Tell me a long story.")
            driver.find_element(By.ID, "send").click()
            wait.until(streaming(4))
            driver.find_element(By.ID, "reset").click()
            wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
            assert driver.execute_script("return messages") == [] and driver.execute_script(focused) == "input"
            assert driver.find_elements(By.CSS_SELECTOR, ".msg") == []
            assert not driver.find_element(By.ID, "regenerate").is_enabled()  # nothing to write again
            # Stop during a reply cancels it in the engine; a reader who scrolled up is not pulled
            # back down by each new token (the log jumped to its end on every one)
            cancelled = metric(url, "mixlab_requests_cancelled_total")
            driver.execute_script("document.getElementById('input').value = arguments[0]", "A long question.\n" * 40)
            driver.find_element(By.ID, "send").click()
            wait.until(streaming(1))
            log = driver.find_element(By.ID, "log")
            assert driver.execute_script("return arguments[0].scrollHeight > arguments[0].clientHeight", log)
            driver.execute_script("arguments[0].scrollTop = 0", log)
            count = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .tok"))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant .tok")) > count + 3)
            assert driver.execute_script("return arguments[0].scrollTop", log) == 0
            assert log.get_attribute("aria-busy") == "true"  # read out once whole, not token by token
            driver.find_element(By.ID, "stop").click()
            wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
            assert log.get_attribute("aria-busy") == "false" and driver.execute_script(focused) == "input"
            assert until(lambda: metric(url, "mixlab_running_requests") == 0)
            assert metric(url, "mixlab_requests_cancelled_total") == cancelled + 1
            # the stopped reply is kept, as far as it went
            kept = driver.execute_script("return JSON.parse(localStorage.getItem('mixlab.chat')).messages")
            assert [m["role"] for m in kept] == ["user", "assistant"]
            assert kept[1]["content"] == driver.execute_script(
                "return [...document.querySelectorAll('.msg.assistant .body')].pop().textContent")
            # and says it was stopped (it looked finished), after a reload too
            notes = "return [...document.querySelectorAll('.msg .note')].map(n => n.textContent)"
            assert kept[1]["stopped"] is True and driver.execute_script(notes) == ["(stopped)"]
            driver.refresh()
            wait.until(lambda d: "experts" in d.find_element(By.ID, "model").text)
            assert driver.execute_script(notes) == ["(stopped)"]
            # a reload while a reply streams keeps the question and the reply as far as it went (both were lost)
            driver.find_element(By.ID, "reset").click()
            driver.find_element(By.ID, "input").send_keys("Another long one.\n")
            wait.until(streaming(1))
            driver.refresh()
            wait.until(lambda d: "experts" in d.find_element(By.ID, "model").text)
            kept = driver.execute_script("return messages")
            assert [m["role"] for m in kept] == ["user", "assistant"] and kept[0]["content"] == "Another long one."
            assert kept[1]["interrupted"] == "the page was left" and len(kept[1]["tokens"]) > 3
            assert kept[1]["content"] == "".join(t for t, _ in kept[1]["tokens"])
            assert driver.execute_script(notes) == ["(interrupted: the page was left)"]
            assert until(lambda: metric(url, "mixlab_running_requests") == 0)
            temperature, limit = driver.find_element(By.ID, "temperature"), driver.find_element(By.ID, "max_tokens")
            # a conversation too big for localStorage is kept without its tokens' experts, else not at all
            # (the conversation stored before it came back on a reload)
            full = ("const refused = arguments[0], set = Storage.prototype.setItem;"
                    "Storage.prototype.setItem = function (k, v) {"
                    "  if (v.includes(refused)) throw new DOMException('full', 'QuotaExceededError');"
                    "  return set.call(this, k, v); }; saveChat(); Storage.prototype.setItem = set;"
                    "return JSON.parse(localStorage.getItem('mixlab.chat'))")
            assert driver.execute_script(full, '"tokens"') == {"version": 1, "messages": [
                {k: m[k] for k in ("role", "content", "model") if k in m} for m in kept]}
            assert kept[1]["model"] == NAME
            assert driver.execute_script(full, '"messages"') is None
            del engine.runner.forward  # full speed again
            # Temperature and Max tokens left empty are left out (the server's defaults); they were sent as 0:
            # greedy, and a 400 for max_tokens
            driver.execute_script("window.sent = []; const f = window.fetch;"
                                  "window.fetch = (u, o) => { sent.push(o && o.body); return f(u, o); }")
            driver.find_element(By.ID, "reset").click()
            temperature.clear()
            limit.clear()
            driver.find_element(By.ID, "input").send_keys("Your defaults?\n")
            wait.until(lambda d: streaming(1)(d) or d.find_elements(By.CSS_SELECTOR, ".msg.error"))
            driver.find_element(By.ID, "stop").click()
            wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
            sent = json.loads(driver.execute_script("return sent[0]"))
            assert "temperature" not in sent and "max_tokens" not in sent and sent["stream"] is True, sent
            assert driver.find_elements(By.CSS_SELECTOR, ".msg.error") == []
            # Errors say what happened; the question leaves the conversation and goes back into the box
            driver.find_element(By.ID, "reset").click()
            limit.clear()
            limit.send_keys(str(CONTEXT + 1))
            driver.find_element(By.ID, "input").send_keys("Too long?")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.error"))
            wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
            error = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text
            assert f"invalid max_tokens={CONTEXT + 1}: this server allows at most {CONTEXT}" in error
            assert driver.find_elements(By.CSS_SELECTOR, ".msg.user")[-1].get_attribute("class") == "msg user unsent"
            assert driver.find_element(By.ID, "input").get_attribute("value") == "Too long?"
            assert driver.execute_script("return messages") == []
            driver.execute_cdp_cmd("Network.enable", {})

            def offline(on: bool) -> None:
                driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
                    "offline": on, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})

            offline(True)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.error")) == 2
                       and d.find_element(By.ID, "send").is_enabled())
            assert "[cannot reach the server (" in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text
            offline(False)
            # a server with a key: the page says to enter it (it said "cannot reach the server: missing or
            # wrong API key (send 'Authorization: Bearer KEY')"), and works once it is entered
            app.state.server.cfg.api_key = "k3y"
            driver.refresh()
            wait.until(lambda d: "API key" in d.find_element(By.ID, "model").text)
            assert driver.find_element(By.ID, "model").text == "the server needs its API key: enter it under Settings"
            def with_the_key(message: str) -> None:  # enter the key, then one short exchange without an error
                driver.find_element(By.ID, "api_key").send_keys("k3y\t")
                wait.until(lambda d: "experts" in d.find_element(By.ID, "model").text)
                limit = driver.find_element(By.ID, "max_tokens")
                limit.clear()
                limit.send_keys("3")
                driver.find_element(By.ID, "input").send_keys(message + "\n")
                wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .tok")
                           and d.find_element(By.ID, "send").is_enabled())
                assert driver.find_elements(By.CSS_SELECTOR, ".msg.error") == []

            with_the_key("With the key.")
            # the key is kept for this tab alone (sessionStorage), never in localStorage; a stored
            # conversation or settings that are not what the page writes are ignored, not fatal
            driver.get_log("browser")  # the 400 and 401 above were logged
            driver.execute_script(
                "localStorage.setItem('mixlab.settings', '{'); const bad = JSON.stringify({version: 1, messages: "
                "[{role: 'assistant', content: 'x', tokens: [['x', [[0, 'one']]]]}]});"
                "localStorage.setItem('mixlab.chat', bad); sessionStorage.setItem('mixlab.chat', bad)")
            driver.refresh()
            wait.until(lambda d: "experts" in d.find_element(By.ID, "model").text)
            assert driver.find_element(By.ID, "api_key").get_attribute("value") == "k3y"
            assert "k3y" not in driver.execute_script("return JSON.stringify({...localStorage})")
            assert driver.find_elements(By.CSS_SELECTOR, ".msg") == []
            assert driver.find_element(By.ID, "temperature").get_attribute("value") == "0.7"
            assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
            # a narrow window (a phone): the chat keeps the width, the settings go below it (the chat
            # was squeezed to 58 of 420 pixels beside them)
            driver.set_window_size(420, 800)
            widths = driver.execute_script("return [document.getElementById('log').clientWidth, "
                                           "document.documentElement.scrollWidth, window.innerWidth]")
            assert widths[0] > 300 and widths[1] <= widths[2], widths

            async def under_chat(scope: dict[str, Any], receive: Any, send: Any) -> None:  # a proxy's /chat/ alone
                if not scope["path"].startswith("/chat/"):
                    await send({"type": "http.response.start", "status": 404, "headers": []})
                    await send({"type": "http.response.body", "body": b""})
                    return
                await app({**scope, "path": scope["path"][5:], "raw_path": scope["path"][5:].encode()}, receive, send)

            # behind a reverse proxy that serves the server under a path (code-server's /proxy/PORT/,
            # JupyterHub), the page asks for its files and the API under its own address (it asked for
            # /static/... and /v1/... at the proxy's root)
            with ServerThread(under_chat) as proxy:
                driver.get(proxy + "/chat/")
                wait.until(lambda d: "API key" in d.find_element(By.ID, "model").text)
                with_the_key("Under a path.")
                loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
                assert loaded and all(u.startswith(proxy + "/chat/") for u in loaded), loaded


def _page(driver: Any, url: str) -> None:
    """Open the chat page and wait until it has the model's description."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 60).until(lambda d: "experts" in d.find_element(By.ID, "model").text)


def _ask(driver: Any, question: str, *pieces: str, done: bool = True, lost: bool = False,
         events: tuple[dict[str, Any], ...] = ()) -> None:
    """Send `question` from the page, its reply streamed as these pieces by the page's own fetch (as a server
    writes them), then these `events`, then `data: [DONE]` unless not `done`, then a network error if `lost`;
    wait for its end."""
    from selenium.webdriver.support.ui import WebDriverWait

    sent = [{"choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces] + list(events)
    stream = "".join("data: " + json.dumps(e) + "\n\n" for e in sent) + ("data: [DONE]\n\n" if done else "")
    driver.execute_script(
        "const [events, lost] = arguments, real = window.fetch; let n = 0;"
        "const body = new ReadableStream({pull(c) { if (n++ === 0) c.enqueue(new TextEncoder().encode(events));"
        "  else if (lost) c.error(new TypeError('network error')); else c.close(); }});"
        "window.fetch = (u, o) => String(u).endsWith('chat/completions') ? Promise.resolve(new Response(body,"
        "  {headers: {'Content-Type': 'text/event-stream'}})) : real(u, o);"
        "window.replies = document.querySelectorAll('.msg.assistant').length;"
        "document.getElementById('input').value = arguments[2]; document.getElementById('send').click()",
        stream, lost, question)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return !controller && document.querySelectorAll('.msg.assistant').length > replies"))


SHOWN = "return [...document.querySelectorAll('#log .msg .body')].map(b => b.textContent)"


@pytest.mark.slow
def test_chat_page_two_tabs_keep_two_conversations(server: str) -> None:
    # one conversation was kept per server address (localStorage): a reload of one tab showed the other's
    with _browser() as driver:
        _page(driver, server + "/")
        first = driver.current_window_handle
        _ask(driver, "From A", "A's reply.")
        driver.switch_to.new_window("tab")
        second = driver.current_window_handle
        _page(driver, server + "/")
        assert driver.execute_script(SHOWN) == ["From A", "A's reply."]  # a new tab starts from the last one saved
        driver.execute_script("document.getElementById('reset').click()")
        _ask(driver, "From B", "B's reply.")
        driver.switch_to.window(first)
        _page(driver, server + "/")
        assert driver.execute_script(SHOWN) == ["From A", "A's reply."]
        _ask(driver, "More from A", "Yes.")
        driver.switch_to.window(second)
        _page(driver, server + "/")
        assert driver.execute_script(SHOWN) == ["From B", "B's reply."]
        assert driver.execute_script("return messages.map(m => m.content)") == ["From B", "B's reply."]


@pytest.mark.slow
def test_chat_page_marks_a_reply_whose_stream_was_cut_off(server: str) -> None:
    # a stream that ended without [DONE] (a proxy's timeout) looked like a finished reply; one that failed
    # (a server killed: chromium's network error) lost the reply and took the question back
    notes = "return [...document.querySelectorAll('.msg .note')].map(n => [n.textContent, n.className])"
    with _browser() as driver:
        _page(driver, server + "/")
        _ask(driver, "Hi", "Half", " a reply", done=False)
        cut = "the server closed the stream before the reply ended"
        kept = driver.execute_script("return messages")
        assert [m["content"] for m in kept] == ["Hi", "Half a reply"] and kept[1]["interrupted"] == cut
        assert driver.execute_script(notes) == [[f"(interrupted: {cut})", "note error"]]
        assert driver.execute_script("return document.getElementById('regenerate').disabled") is False
        assert driver.execute_script("return document.querySelectorAll('.msg.unsent').length") == 0
        _page(driver, server + "/")  # a reload still says so
        assert driver.execute_script(notes) == [[f"(interrupted: {cut})", "note error"]]
        _ask(driver, "Again", "Some", " of it", lost=True)
        kept = driver.execute_script("return messages")
        lost = "the connection to the server was lost (network error)"
        assert [m["content"] for m in kept] == ["Hi", "Half a reply", "Again", "Some of it"]
        assert kept[3]["interrupted"] == lost and driver.execute_script(notes)[1] == [f"(interrupted: {lost})",
                                                                                     "note error"]
        # with nothing shown yet, the question goes back into the box, as for any failed request
        _ask(driver, "Once more", done=False)
        assert len(driver.execute_script("return messages")) == 4
        assert driver.execute_script(SHOWN)[-1] == f" [{cut}]"
        assert driver.execute_script("return document.getElementById('input').value") == "Once more"


@pytest.mark.slow
def test_chat_page_leaves_out_the_oldest_exchanges_that_no_longer_fit(server: str) -> None:
    # once a conversation outgrew the context, every send failed with the server's 400
    # (context_length_exceeded); the page now sends it without its oldest exchanges, as `mixlab chat` does
    error = {"error": {"message": "the messages (274 tokens) + max_tokens=300 = 574 exceeds the model's context of "
                                  "512 tokens", "type": "invalid_request_error", "param": "max_tokens",
                       "code": "context_length_exceeded"}}
    events = "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": "Short."}}]}) + "\n\ndata: [DONE]\n\n"
    with _browser() as driver:
        _page(driver, server + "/")
        driver.execute_script(  # the server's answers: a context holds a question and one exchange before it
            "const [events, error] = arguments; window.sent = [];"
            "window.fetch = (u, o) => { const m = JSON.parse(o.body).messages; window.sent.push(m.map(x => x.content));"
            "  return Promise.resolve(m.length > 3 ? new Response(JSON.stringify(error), {status: 400,"
            "  headers: {'Content-Type': 'application/json'}}) : new Response(events,"
            "  {headers: {'Content-Type': 'text/event-stream'}})); };", events, error)
        for q in ("One", "Two", "Three", "Four"):
            driver.execute_script("window.replies = document.querySelectorAll('.msg.assistant').length;"
                                  "document.getElementById('input').value = arguments[0];"
                                  "document.getElementById('send').click()", q)
            from selenium.webdriver.support.ui import WebDriverWait

            WebDriverWait(driver, 30).until(lambda d: d.execute_script(
                "return !controller && document.querySelectorAll('.msg.assistant').length > replies"))
        sent = driver.execute_script("return window.sent")
        assert sent == [["One"], ["One", "Short.", "Two"], ["One", "Short.", "Two", "Short.", "Three"],
                        ["Two", "Short.", "Three"], ["One", "Short.", "Two", "Short.", "Three", "Short.", "Four"],
                        ["Two", "Short.", "Three", "Short.", "Four"], ["Three", "Short.", "Four"]]
        assert driver.execute_script(SHOWN) == ["One", "Short.", "Two", "Short.", "Three", "Short.", "Four", "Short."]
        notes = "return [...document.querySelectorAll('.msg .note')].map(n => n.textContent)"
        left_out = "left out: the conversation outgrew the model's context)"
        said = [f"(the oldest exchange {left_out}", f"(the 2 oldest exchanges {left_out}"]
        assert driver.execute_script(notes) == said
        _page(driver, server + "/")  # kept with the conversation
        assert driver.execute_script(notes) == said


def test_chat_page_says_which_token_a_new_line_is(server: str) -> None:
    # a token read out by its experts (Tab to a reply, then the arrow keys) was written between quotes as
    # it is: a new line showed as a space, `" ": layer 0: ...`, as a space token does
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    events = tuple({"choices": [{"index": 0, "delta": {"content": p}, "experts": [{"experts": [[0, 1], [1, 2]]}]}]}
                   for p in ("Hi", "\n", " ", '"'))
    with _browser() as driver:
        _page(driver, server + "/")
        _ask(driver, "Q", events=events)
        body = driver.find_element(By.CSS_SELECTOR, ".msg.assistant .body")
        body.send_keys(Keys.ARROW_RIGHT)  # to the first token
        said = [driver.find_element(By.ID, "status").get_attribute("textContent")]
        for _ in events[1:]:
            driver.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
            said.append(driver.find_element(By.ID, "status").get_attribute("textContent"))
        assert said == [f"{t}: layer 0: experts 0, 1; layer 1: experts 1, 2" for t in ('"Hi"', '"\\n"', '" "', '"\\""')]


def test_chat_page_says_it_waits_for_the_first_token(server: str) -> None:
    # until the first token came (seconds, for a large model's prompt on a CPU), the reply was an empty
    # line under "assistant": nothing said that the page was waiting rather than stuck
    hint = ("const b = [...document.querySelectorAll('.msg.assistant .body')].at(-1);"
            "return getComputedStyle(b, '::before').content")
    with _browser() as driver:
        _page(driver, server + "/")
        driver.execute_script(  # a server that has not answered yet
            "const real = window.fetch; window.fetch = (u, o) => String(u).endsWith('chat/completions') ? "
            "new Promise((_, fail) => o.signal.addEventListener('abort',"
            "  () => fail(new DOMException('', 'AbortError')))) "
            " : real(u, o); document.getElementById('input').value = 'Hi'; document.getElementById('send').click()")
        assert "waiting for the model" in driver.execute_script(hint)
        driver.execute_script("document.getElementById('stop').click()")
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(driver, 10).until(lambda d: d.execute_script("return !controller"))
        assert driver.execute_script(hint) == "none"  # stopped: "(stopped)" beside it, no longer waiting


def test_chat_page_keeps_a_run_of_spaces_inside_the_reply(server: str) -> None:
    # on a phone, a reply with a run of space tokens (a small model writes them) ran out of its box:
    # spaces at the end of a line "hang" in white-space: pre-wrap, and coloured by expert they were seen
    # over the border, off the screen
    with _browser() as driver:
        driver.set_window_size(390, 844)
        _page(driver, server + "/")
        driver.execute_script("document.getElementById('colour').click()")
        experts = [{"experts": [[0, 1], [1, 2]]}]
        pieces = ["Some", " words"] + [" "] * 120 + ["end"]
        _ask(driver, "Q", events=tuple({"choices": [{"index": 0, "delta": {"content": p}, "experts": experts}]}
                                       for p in pieces))
        right, edge = driver.execute_script(
            "const b = document.querySelector('.msg.assistant .body');"
            "return [Math.max(...[...b.querySelectorAll('.tok')].map(t => t.getBoundingClientRect().right)),"
            "        document.getElementById('log').getBoundingClientRect().right]")
        assert right <= edge, (right, edge)


@pytest.mark.slow
def test_chat_page_lowers_max_tokens_that_do_not_fit_the_context(server: str) -> None:
    # the page's default max tokens (256) on a model of 256 tokens (`mixlab demo`'s): the first question
    # failed with the server's context_length_exceeded, struck out, and so did every one after it
    error = {"error": {"message": "the messages (52 tokens) + max_tokens=256 = 308 exceeds the model's context of "
                                  "256 tokens", "type": "invalid_request_error", "param": "max_tokens",
                       "code": "context_length_exceeded"}}
    filled = {"choices": [{"index": 0, "delta": {"content": "Short."}, "finish_reason": "length"}]}  # the context
    events = "data: " + json.dumps(filled) + "\n\ndata: [DONE]\n\n"
    from selenium.webdriver.support.ui import WebDriverWait

    with _browser() as driver:
        _page(driver, server + "/")
        driver.execute_script(  # the server's answers: any max_tokens is too many, none is the rest of the context
            "const [events, error] = arguments; window.sent = []; const real = window.fetch;"
            "window.fetch = (u, o) => { if (!String(u).endsWith('chat/completions')) return real(u, o);"
            "  const b = JSON.parse(o.body); window.sent.push([b.messages.map(x => x.content), b.max_tokens ?? null]);"
            "  return Promise.resolve(b.max_tokens ? new Response(JSON.stringify(error), {status: 400,"
            "  headers: {'Content-Type': 'application/json'}}) : new Response(events,"
            "  {headers: {'Content-Type': 'text/event-stream'}})); };", events, error)
        for q, limit in (("One", CONTEXT), ("Two", CONTEXT), ("Three", 5)):
            driver.execute_script("window.replies = document.querySelectorAll('.msg.assistant').length;"
                                  "document.getElementById('max_tokens').value = arguments[1];"
                                  "document.getElementById('input').value = arguments[0];"
                                  "document.getElementById('send').click()", q, str(limit))
            WebDriverWait(driver, 30).until(lambda d: d.execute_script(
                "return !controller && document.querySelectorAll('.msg.assistant').length > replies"))
        sent = driver.execute_script("return window.sent")
        # max tokens that no question leaves room for: the rest of the context at once, the conversation
        # kept; fewer, which the question alone does not leave: the oldest exchanges go first
        assert sent == [[["One"], CONTEXT], [["One"], None], [["One", "Short.", "Two"], CONTEXT],
                        [["One", "Short.", "Two"], None], [["One", "Short.", "Two", "Short.", "Three"], 5],
                        [["Two", "Short.", "Three"], 5], [["Three"], 5], [["Three"], None]]
        assert driver.execute_script(SHOWN) == ["One", "Short.", "Two", "Short.", "Three", "Short."]
        notes = "return [...document.querySelectorAll('.msg .note')].map(n => n.textContent)"
        capped = "did not fit in the model's context: the reply had what was left of it)"
        full = "(cut: the model's context is full)"  # not at max tokens, which were left out
        said = [full, f"(max tokens {CONTEXT} {capped}", full, f"(max tokens {CONTEXT} {capped}", full,
                f"(max tokens 5 {capped}", "(the 2 oldest exchanges left out: the conversation outgrew the model's "
                "context)"]
        assert driver.execute_script(notes) == said
        _page(driver, server + "/")  # kept with the conversation
        assert driver.execute_script(notes) == said


@pytest.mark.slow
def test_chat_page_refuses_a_setting_that_is_not_a_number(server: str) -> None:
    # "1e" or "-" in a number field is an empty value to the script, so it was sent as the server's
    # default (temperature 1, max_tokens the rest of the context) while the field still showed it
    from selenium.webdriver.common.by import By

    with _browser() as driver:
        _page(driver, server + "/")
        for field, typed, label in (("temperature", "-", "Temperature"), ("max_tokens", "1e", "Max tokens")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(typed)
            assert driver.execute_script("return arguments[0].validity.badInput", box) is True
            _ask(driver, "Hi", "Hello.")  # not sent: no reply
            shown = driver.execute_script(SHOWN)
            assert shown[-1] == f" [{label} is not a number: correct it under Settings]", shown
            state = driver.execute_script("return [messages.length, document.getElementById('input').value]")
            assert state == [0, "Hi"]
            box.clear()
            box.send_keys("1")


def test_chat_page_keeps_a_select_s_setting_changed_by_either_event(server: str) -> None:
    # the settings were saved on `input` alone, which some browsers and automation tools do not fire on a
    # select or a checkbox (only `change`): the layer chosen was gone after a reload
    with _browser() as driver:
        _page(driver, server + "/")
        for kind, layer, colour in (("change", "1", True), ("input", "0", False)):
            driver.execute_script(
                "const [kind, layer, colour] = arguments, l = document.getElementById('layer'),"
                "  c = document.getElementById('colour');"
                "l.value = layer; c.checked = colour;"
                "for (const e of [l, c]) e.dispatchEvent(new Event(kind, {bubbles: true}))", kind, layer, colour)
            driver.refresh()
            _page(driver, server + "/")
            assert driver.execute_script("return [document.getElementById('layer').value, "
                                         "document.getElementById('colour').checked]") == [layer, colour], kind


@pytest.mark.slow
def test_chat_page_colours_each_token_by_its_own_experts(server: str, model_tok: tuple[Any, Any]) -> None:
    # each token is shown with its own experts (paper Figure 8, and `mixlab analyze`'s token view), the
    # last one's too: the server runs a finished reply's last token once more for them
    model, tok = model_tok
    question, n = "Colour me.", 12
    with _browser() as driver:
        _page(driver, server + "/")
        driver.execute_script("document.getElementById('temperature').value = '0';"
                              "document.getElementById('max_tokens').value = arguments[0];"
                              "document.getElementById('input').value = arguments[1];"
                              "document.getElementById('send').click()", str(n), question)
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(driver, 60).until(lambda d: d.execute_script("return messages.length === 2"))
        shown = driver.execute_script("return messages[1].tokens")
        titles = driver.execute_script("return [...document.querySelectorAll('.msg.assistant .tok')].map(s => s.title)")
    ids = tok.encode_chat([{"role": "user", "content": question}])
    new = generate(model, [ids], max_new_tokens=n)[0]
    chosen: dict[int, torch.Tensor] = {}
    hooks = [b.ffn.gate.register_forward_hook(lambda m, i, o, layer=layer: chosen.__setitem__(layer, o.idx_TK))
             for layer, b in enumerate(model.layers)]
    try:
        with torch.no_grad():
            model(torch.tensor([ids + new]))
    finally:
        for h in hooks:
            h.remove()
    own = [[chosen[layer].reshape(len(ids) + len(new), -1)[len(ids) + i].tolist() for layer in chosen]
           for i in range(len(new))]
    assert "".join(t for t, _ in shown) == tok.decode(new) and len(shown) == len(new) == n  # a token a span
    assert [ex for _, ex in shown] == own
    assert titles == ["\n".join(f"layer {layer}: experts {', '.join(map(str, k))}" for layer, k in enumerate(ex))
                      for ex in own]


@pytest.mark.slow
def test_chat_page_on_a_touch_screen_enter_is_a_new_line(server: str) -> None:
    # Enter always sent: on a phone's keyboard (no Shift+Enter) a message could not have two lines
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with _browser() as driver:
        driver.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": True, "maxTouchPoints": 5})
        _page(driver, server + "/")
        assert driver.execute_script("return matchMedia('(pointer: coarse)').matches")
        box = driver.find_element(By.ID, "input")
        assert "Enter: new line" in box.get_attribute("placeholder")
        driver.execute_script("document.getElementById('max_tokens').value = '3'")
        box.send_keys("first line\nsecond line")
        assert box.get_attribute("value") == "first line\nsecond line"
        assert driver.execute_script("return messages.length") == 0  # nothing sent
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 60).until(lambda d: d.execute_script("return messages.length === 2 && !controller"))
        assert driver.execute_script("return messages[0].content") == "first line\nsecond line"


@pytest.mark.slow
def test_chat_page_follows_a_server_restarted_with_another_model(server: str) -> None:
    # a page left open while its server was restarted with another model sent the name it had loaded
    # (each request names it) and got "404: the model ... does not exist" on every send until reloaded
    from selenium.webdriver.support.ui import WebDriverWait

    with _browser() as driver:
        _page(driver, server + "/")
        # one model served: no model to choose (the selector is hidden), each reply named all the same
        assert driver.execute_script("return document.getElementById('choose_model').offsetParent") is None
        served = driver.execute_script("const m = model; model = 'the-model-before'; "
                                       "document.getElementById('served').options[0].value = 'the-model-before';"
                                       "document.getElementById('model').textContent = 'the-model-before'; return m")
        driver.execute_script("document.getElementById('max_tokens').value = '4';"
                              "document.getElementById('input').value = 'Hello?';"
                              "document.getElementById('send').click()")
        WebDriverWait(driver, 60).until(lambda d: d.execute_script("return messages.length === 2 && !controller"))
        assert driver.execute_script("return [model, messages[1].role, messages[1].tokens.length]") == \
            [served, "assistant", 4]
        assert driver.execute_script("return document.getElementById('model').textContent").startswith(served + " ·")
        assert not driver.execute_script("return document.querySelectorAll('.msg.error').length")
        assert driver.execute_script("return [messages[1].model, document.querySelector('.msg.assistant .by')"
                                     ".textContent, document.getElementById('served_note').textContent]") == \
            [served, served, f"(the-model-before is no longer served: {served} answers)"]


@pytest.mark.slow
def test_chat_page_breaks_a_long_word_in_a_narrow_window(server: str) -> None:
    # a word longer than the log is wide (a URL, base64) widened the question's bubble past it: the log
    # scrolled sideways, the question's other lines too
    with _browser() as driver:
        driver.set_window_size(360, 740)
        _page(driver, server + "/")
        _ask(driver, "see " + "x" * 300 + " and more words", "y" * 300)
        widths = driver.execute_script("const log = document.getElementById('log');"
                                       "return [log.scrollWidth, log.clientWidth]")
        assert widths[0] <= widths[1], widths


@pytest.mark.slow
def test_chat_page_tells_a_wrong_api_key_from_a_missing_one(model_tok: tuple[Any, Any]) -> None:
    # with a key entered, a 401 still said "the server needs its API key: enter it under Settings"
    from selenium.webdriver.support.ui import WebDriverWait

    model, tok = model_tok
    said = "return document.getElementById('model').textContent"
    with Engine(model, tok, max_batch=1) as engine, ServerThread(
            create_app(engine, tok, _config(model, api_key="k3y"))) as url, _browser() as driver:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.execute_script(said) == "the server needs its API key: enter it under Settings")
        driver.execute_script("const key = document.getElementById('api_key'); key.value = 'wrong';"
                              "key.dispatchEvent(new Event('change'))")
        wait.until(lambda d: d.execute_script(said) == "the server refused this API key: check it under Settings")
        driver.execute_script("document.getElementById('input').value = 'Hi'; document.getElementById('send').click()")
        wait.until(lambda d: d.execute_script("return !controller && document.querySelectorAll('.msg.error').length"))
        assert driver.execute_script(SHOWN) == ["Hi", " [the server refused this API key: check it under Settings]"]
        driver.execute_script("const key = document.getElementById('api_key'); key.value = 'k3y';"
                              "key.dispatchEvent(new Event('change'))")
        wait.until(lambda d: "experts" in d.execute_script(said))


@pytest.mark.slow
def test_chat_page_describes_the_model_once_the_server_answers(server: str) -> None:
    # a page loaded while the server could not be reached kept saying so after it answered replies, which
    # came without experts (the page asked for none: it knew of no experts, nor layers)
    from selenium.webdriver.support.ui import WebDriverWait

    said = "return document.getElementById('model').textContent"
    with _browser() as driver:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/v1/models"]})
        driver.get(server + "/")
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(said).startswith("cannot reach the server"))
        driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
        driver.execute_script("document.getElementById('max_tokens').value = '4';"
                              "document.getElementById('input').value = 'Hi'; document.getElementById('send').click()")
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return messages.length === 2"))
        assert "experts" in driver.execute_script(said)
        assert driver.execute_script("return document.querySelectorAll('#layer option').length") == 2
        assert driver.execute_script("return document.querySelectorAll('.msg.assistant .tok[title]').length") > 0


@pytest.mark.slow
def test_chat_page_esc_stops_a_reply(server: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with _browser() as driver:
        _page(driver, server + "/")
        # a reply that streams one token, then waits until the page gives up on it
        driver.execute_script(
            "const real = window.fetch; window.fetch = (u, o) => String(u).endsWith('chat/completions') ?"
            "  Promise.resolve(new Response(new ReadableStream({start(c) {"
            "    c.enqueue(new TextEncoder().encode('data: ' + JSON.stringify({choices: [{index: 0, delta: "
            "      {content: 'Once'}}]}) + '\\n\\n'));"
            "    o.signal.addEventListener('abort', () => c.error(new DOMException('aborted', 'AbortError'))); }}))) :"
            "  real(u, o)")
        box = driver.find_element(By.ID, "input")
        box.send_keys("Tell me a story.\n")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .tok"))
        driver.find_element(By.ID, "system").send_keys(Keys.ESCAPE)  # the focus elsewhere: still stops it
        wait.until(lambda d: d.execute_script("return !controller"))
        assert driver.execute_script("return messages[1]") == {"role": "assistant", "content": "Once", "model": NAME,
                                                               "tokens": [["Once", None]], "stopped": True}
        assert driver.execute_script("return document.activeElement.id") == "input"


@pytest.mark.slow
def test_chat_page_shows_the_error_event_that_ends_a_stream(model_tok: tuple[Any, Any]) -> None:
    # the server ends a streamed reply with an error event (then [DONE]) when generation fails (here the
    # engine shut down under it): the reply is kept as far as it went, the error's text beside it; an
    # error before the first token is the reply, and the question goes back into the box
    from selenium.webdriver.support.ui import WebDriverWait

    model, tok = model_tok
    failed = "generation failed: the engine shut down"
    notes = "return [...document.querySelectorAll('.msg .note')].map(n => [n.textContent, n.className])"
    with Engine(model, tok, max_batch=1) as engine, ServerThread(create_app(engine, tok, _config(model))) as url, \
            _browser() as driver:
        forward = engine.runner.forward  # each step held up 20 ms: the reply still streams when the engine stops
        engine.runner.forward = lambda items: (time.sleep(0.02), forward(items))[1]  # type: ignore[method-assign]
        _page(driver, url + "/")
        driver.execute_script("document.getElementById('temperature').value = '0';"
                              "document.getElementById('max_tokens').value = '300';"
                              "document.getElementById('input').value = 'Tell me a long story.';"
                              "document.getElementById('send').click()")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.execute_script("return document.querySelectorAll('.msg.assistant .tok').length > 3"))
        engine.shutdown()
        wait.until(lambda d: d.execute_script("return !controller"))
        kept = driver.execute_script("return messages")
        assert [m["role"] for m in kept] == ["user", "assistant"] and kept[1]["interrupted"] == failed
        assert kept[1]["content"] == "".join(t for t, _ in kept[1]["tokens"]) and len(kept[1]["tokens"]) > 3
        assert driver.execute_script(notes) == [[f"(interrupted: {failed})", "note error"]]
        # before the first token: the server's error event, as above, and nothing else
        error = {"error": {"message": failed, "type": "server_error", "param": None, "code": "engine_error"}}
        _ask(driver, "Again", events=(error,))
        assert driver.execute_script(SHOWN)[-2:] == ["Again", f" [{failed}]"]
        assert len(driver.execute_script("return messages")) == 2
        assert driver.execute_script("return document.getElementById('input').value") == "Again"


def _stop_reasons(client: Any, chat: bool, **kw: Any) -> list[tuple[str | None, Any]]:
    """(finish_reason, stop_reason) of the non-streamed choice and of the streamed chunk that ends it, as
    the openai client gets them (stop_reason is a pydantic extra: a KeyError where the server has none)."""
    create = client.chat.completions.create if chat else client.completions.create
    kw = dict(model=NAME, temperature=0, **({"messages": U} if chat else {"prompt": "x"}), **kw)
    full = create(**kw).choices[0]
    ends = [c.choices[0] for c in create(**kw, stream=True) if c.choices and c.choices[0].finish_reason]
    assert len(ends) == 1
    return [(ch.finish_reason, ch.model_extra["stop_reason"]) for ch in (full, ends[0])]


@pytest.mark.parametrize("chat", [False, True])
def test_stop_reason_names_the_stop_string_or_token_that_ended_a_choice(client: Any, model_tok: tuple[Any, Any],
                                                                        chat: bool) -> None:
    """vLLM's stop_reason, on each choice and on the streamed chunk with its finish_reason: the stop string
    that matched (which of several), the `stop_token_ids` id that ended it, else null (EOS, the length
    limit), as vLLM checks EOS before stop_token_ids."""
    _, tok = model_tok
    the = tok.encode("The", bos=False)[-1]  # the output is "The The The ..." (" The The ..." for a completion)
    kw = dict(max_tokens=6, logit_bias={str(the): 100})
    assert _stop_reasons(client, chat, **kw, stop=["zz", "e T", "qq"]) == [("stop", "e T")] * 2
    assert _stop_reasons(client, chat, **kw, stop=["zz", " The"]) == [("stop", " The")] * 2
    assert _stop_reasons(client, chat, **kw, extra_body={"stop_token_ids": [5, the]}) == [("stop", the)] * 2
    assert _stop_reasons(client, chat, **kw) == [("length", None)] * 2
    eos = dict(max_tokens=6, logit_bias={str(tok.eos_id): 100})
    assert _stop_reasons(client, chat, **eos) == [("stop", None)] * 2
    assert _stop_reasons(client, chat, **eos, extra_body={"stop_token_ids": [tok.eos_id]}) == [("stop", None)] * 2
    # with ignore_eos, EOS ends the output only as one of the stop_token_ids: then it is the stop_reason
    assert _stop_reasons(client, chat, **eos, extra_body={"stop_token_ids": [tok.eos_id], "ignore_eos": True}) \
        == [("stop", tok.eos_id)] * 2
