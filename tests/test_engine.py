"""The engine: staggered requests equal single runs and a plain full-recompute reference (float32),
per-request seeded sampling, logprobs equal log_softmax of the reference logits, prompt logprobs,
stop tokens and strings, cancel, a full cache queues, prefix reuse, threads and asyncio."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from mixlab.config import get_preset
from mixlab.engine import Engine, QueueFull, SamplingParams
from mixlab.engine.api import MAX_LOGPROBS
from mixlab.model import Transformer


def _model(**kw) -> Transformer:
    cfg = get_preset("tiny-moe").replace(vocab_size=128, max_seq_len=128, **kw)
    model = Transformer(cfg).eval()
    model.init_weights(std=0.5, seed=0)  # peaked, varied next-token distributions
    return model


@pytest.fixture(scope="module")
def tiny() -> Transformer:
    return _model()


@pytest.fixture(scope="module")
def windowed() -> Transformer:
    return _model(sliding_window=6)


def _prompts(lengths, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def _reference(model, prompt, n):
    """Greedy tokens and each step's logits by recomputing the whole sequence (no cache)."""
    ids, logits = list(prompt), []
    for _ in range(n):
        lg = model(torch.tensor([ids]))[0, -1].float()
        logits.append(lg)
        ids.append(int(lg.argmax()))
    return ids[len(prompt):], logits


def _run(engine, submissions, steps_between=1):
    """Submit (prompt, params) one after another with `steps_between` engine steps in between,
    then drain; the token ids of each request."""
    handles = []
    for prompt, params in submissions:
        handles.append(engine.submit(prompt, params))
        for _ in range(steps_between):
            engine.step()
    engine.run_until_idle()
    return [[o.token_id for o in h if o.token_id is not None] for h in handles]


PARAMS = [
    SamplingParams(max_tokens=10, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0.9, seed=3, ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=1.2, top_k=20, top_p=0.9, seed=7, ignore_eos=True),
    SamplingParams(max_tokens=11, ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.5,
                   frequency_penalty=0.2),
    SamplingParams(max_tokens=9, temperature=0.7, min_p=0.1, seed=11, ignore_eos=True),
]


@pytest.mark.parametrize("model_name", ["tiny", "windowed"])
def test_staggered_equals_single_runs(model_name, request):
    model = request.getfixturevalue(model_name)
    prompts = _prompts((5, 17, 3, 30, 9))
    subs = list(zip(prompts, PARAMS, strict=True))
    alone = [_run(Engine(model, max_batch=1), [s])[0] for s in subs]
    together = _run(Engine(model, max_batch=4, token_budget=8), subs, steps_between=2)
    assert together == alone
    for prompt, params, toks in zip(prompts, PARAMS, alone, strict=True):
        if params.greedy and params.repetition_penalty == 1.0:
            assert toks == _reference(model, prompt, params.max_tokens)[0]
    assert all(len(set(t)) > 3 for t in alone), "degenerate output would make this test weak"


def _reference_biased(model, prompt, n, bias):
    """Greedy tokens by full recompute with `bias` ({id: value}) added to every step's logits."""
    ids = list(prompt)
    for _ in range(n):
        lg = model(torch.tensor([ids]))[0, -1].float()
        for t, b in bias.items():
            lg[t] += b
        ids.append(int(lg.argmax()))
    return ids[len(prompt):]


def test_logit_bias_is_added_before_sampling(tiny):
    prompt = _prompts((6,), seed=4)[0]
    plain = _reference(tiny, prompt, 8)[0]
    ban = {plain[0]: -100.0, plain[1]: -100.0}  # OpenAI's "ban": the greedy path must change
    nudge = {t: 3.0 for t in range(40, 60)}
    cases = [SamplingParams(max_tokens=8, ignore_eos=True, logit_bias=b) for b in (ban, nudge)]
    eng = Engine(tiny, max_batch=2)
    got = _run(eng, [(prompt, c) for c in cases])  # batched together with the plain row below
    for toks, c in zip(got, cases, strict=True):
        assert toks == _reference_biased(tiny, prompt, 8, c.logit_bias)
    assert got[0][0] != plain[0] and plain[0] not in got[0] and plain[1] not in got[0]
    # +100 forces a token, sampled or not; the logprobs stay the model's own (vLLM's raw logprobs)
    forced = SamplingParams(max_tokens=5, temperature=0.8, seed=1, ignore_eos=True, logit_bias={123: 100},
                            logprobs=0)
    h = eng.submit(prompt, forced)
    eng.run_until_idle()
    outs = list(h)
    assert [o.token_id for o in outs] == [123] * 5
    with torch.no_grad():
        lp = torch.log_softmax(tiny(torch.tensor([prompt]))[0, -1].float(), -1)
    assert outs[0].logprob == pytest.approx(float(lp[123]), abs=1e-4) and outs[0].logprob < -1


def test_sync_token_decides_every_token(tiny):
    """`sync_token` (expert-parallel decoding: rank 0's token on every process) replaces each token,
    greedy (the step's argmax) or sampled, before it is used: the next step's input and the stop."""
    prompt = _prompts((6,), seed=4)[0]
    eos = tiny.config.eos_id
    for params in (SamplingParams(max_tokens=8), SamplingParams(max_tokens=8, temperature=0.9, seed=1)):
        seen: list[int] = []
        chosen = iter([40, 41, 42, eos, 43])

        def sync(t: int, seen: list[int] = seen, chosen: Iterator[int] = chosen) -> int:
            seen.append(t)
            return next(chosen)

        got = _run(Engine(tiny, sync_token=sync), [(prompt, params)])[0]
        assert got == [40, 41, 42, eos] and len(seen) == 4  # ended by the EOS sync_token gave
        if params.temperature == 0:  # what was sampled came from the replaced tokens
            with torch.no_grad():
                want = [int(tiny(torch.tensor([prompt + [40, 41, 42][:i]]))[0, -1].argmax()) for i in range(4)]
            assert seen == want


def test_with_sync_token_a_row_s_failure_is_the_step_s(tiny):
    """A failed sync_token (expert-parallel decoding: another process died in the broadcast) ended the
    request with "error", so `mixlab generate --ep` printed 'generation failed: RuntimeError: ...
    Connection closed by peer' instead of the CLI's line for a lost process; step() now raises it."""
    def lost(tok: int) -> int:
        raise RuntimeError("Connection closed by peer")

    eng = Engine(tiny, sync_token=lost)
    h = eng.submit(_prompts((6,), seed=4)[0], SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        while eng.step():
            pass
    outs = list(h)
    assert outs[-1].finish_reason == "error" and "Connection closed by peer" in (outs[-1].error or "")


def test_min_tokens_holds_back_stop_tokens(tiny):
    prompt = _prompts((6,), seed=5)[0]
    eos = tiny.config.eos_id
    eng = Engine(tiny)
    h = eng.submit(prompt, SamplingParams(max_tokens=8, min_tokens=3, logit_bias={eos: 100}, logprobs=0))
    eng.run_until_idle()
    outs = list(h)
    assert [o.token_id for o in outs][:3] == _reference_biased(tiny, prompt, 3, {eos: -1e9})
    assert [o.token_id for o in outs][3] == eos and outs[-1].finish_reason == "stop" and len(outs) == 4
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)


def test_seed_range_is_a_generator_s():
    SamplingParams(seed=2**64 - 1)
    SamplingParams(seed=-(2**63))
    with pytest.raises(ValueError, match=r"seed=.*\[-2\*\*63, 2\*\*64\)"):
        SamplingParams(seed=2**64)  # it was accepted, then failed in submit with torch's overflow message


def test_a_tokenizer_of_the_wrong_type_is_refused_by_the_constructor(tiny, tmp_path):
    # it was accepted, then every submit failed with "'str' object has no attribute 'stream'"
    with pytest.raises(ValueError, match=r"mixlab Tokenizer .* not str \(load it: mixlab.load_tokenizer\('tok'\)\)"):
        Engine(tiny, "tok")
    with pytest.raises(ValueError, match="not PosixPath"):
        Engine(tiny, tmp_path)
    with pytest.raises(ValueError, match="not dict"):
        Engine(tiny, {})
    Engine(tiny, _CharTok())  # type: ignore[arg-type]  # anything that streams as a Tokenizer does


def test_a_stop_string_that_is_not_utf8_is_refused():
    # a lone surrogate (an undecodable byte of a command line) was accepted and could never match
    with pytest.raises(ValueError, match="stop string .* is not valid UTF-8: bytes ff at character 0"):
        SamplingParams(stop=["ok", "\udcff"])


def test_a_field_set_after_the_params_were_made_is_checked_by_submit(tiny):
    """SamplingParams is a dataclass: a field set after it was made went unchecked (found by test_serve_fuzz.py):
    max_tokens=0 still generated, logit_bias {"a": 1} was a bare TypeError, and a penalty given as an int of 64
    bits overflowed in the engine's loop (an error every running request got)."""
    eng = Engine(tiny)
    for name, value in (("max_tokens", 0), ("logit_bias", {"a": 1}), ("logprobs", 100), ("min_tokens", 10)):
        params = SamplingParams(max_tokens=2)
        setattr(params, name, value)
        with pytest.raises(ValueError, match=name):
            eng.submit([1, 2, 3], params)
    h = eng.submit([1, 2, 3], SamplingParams(max_tokens=2, temperature=1.0, frequency_penalty=-(2**63) - 1))
    eng.run_until_idle()
    assert list(h)[-1].finish_reason == "length"


def test_a_flag_is_a_bool_and_a_token_id_no_bool(tiny):
    # ignore_eos="no" ignored EOS (a non-empty string is true); [1, True] prompted token 1
    for name in ("prompt_logprobs", "return_experts", "ignore_eos", "decode_alone"):
        with pytest.raises(ValueError, match=rf"invalid {name}='no': expected True or False"):
            SamplingParams(**{name: "no"})
    with pytest.raises(ValueError, match="prompt_ids contains a non-integer token id"):
        Engine(tiny).submit([1, True, 3], SamplingParams(max_tokens=1))


def test_a_batch_tensor_as_one_prompt_says_to_submit_each_row(tiny):
    """A [1, T] tensor, as the model's forward takes ids, was refused as 'must be a list of token ids,
    got Tensor', though a 1-D tensor is taken: the message now gives the shape and what to do."""
    eng = Engine(tiny)
    with pytest.raises(ValueError, match=r"got Tensor of shape \[1, 3\]; one request is one prompt: submit "
                                         r"each row of a batch on its own"):
        eng.submit(torch.tensor([[1, 2, 3]]), SamplingParams(max_tokens=1))
    h = eng.submit(torch.tensor([1, 2, 3]), SamplingParams(max_tokens=1))
    eng.run_until_idle()
    assert list(h)[-1].finish_reason == "length"


def test_a_bad_value_shows_as_its_start():
    # a list of a million ids made a message as long; one nested 2,000 deep raised RecursionError writing it
    deep: list = []
    for _ in range(2000):
        deep = [deep]
    for value in ([-1] * 10**6, deep, -(10**5000)):
        with pytest.raises(ValueError, match="stop_token_ids") as e:
            SamplingParams(stop_token_ids=value)  # type: ignore[arg-type]
        assert len(str(e.value)) < 200, str(e.value)[:300]


def test_stop_token_ids_are_token_ids():
    assert SamplingParams(stop_token_ids=(5, 0)).stop_token_ids == [5, 0]
    for bad in ([True], [-1], [1.5], "5"):  # [True] was token 1; [-1] could never stop
        with pytest.raises(ValueError, match="stop_token_ids"):
            SamplingParams(stop_token_ids=bad)


def test_logprobs_is_bounded_as_the_server_bounds_it():
    SamplingParams(logprobs=MAX_LOGPROBS)
    for bad in (MAX_LOGPROBS + 1, 10**6, -1, True, 2.0):  # 10**6 listed the whole vocabulary at every position
        with pytest.raises(ValueError, match=rf"logprobs=.*in \[0, {MAX_LOGPROBS}\]"):
            SamplingParams(logprobs=bad)


@pytest.mark.parametrize("bias,match", [({-1: 1.0}, "outside the vocabulary"), ({10**6: 1.0}, "outside"),
                                        ({"x": 1.0}, "integer token ids"), ({3: float("nan")}, "finite"),
                                        ({3: 1e300}, r"logit_bias\[3\]=1e\+300: expected a number in \[-100, 100\]"),
                                        ({3: -100.5}, r"\[-100, 100\]"),
                                        ([3], "dict")])
def test_logit_bias_refused_with_its_name(tiny, bias, match):
    with pytest.raises(ValueError, match=match) as e:
        Engine(tiny).submit([1, 2, 3], SamplingParams(max_tokens=2, logit_bias=bias))
    assert "logit_bias" in str(e.value)


def test_window_boundary_several_sequences(windowed):
    prompts = _prompts((4, 9, 13), seed=1)
    engine = Engine(windowed, max_batch=3, token_budget=5)
    got = _run(engine, [(p, SamplingParams(max_tokens=20, ignore_eos=True)) for p in prompts])
    assert got == [_reference(windowed, p, 20)[0] for p in prompts]


def test_logprobs_equal_log_softmax_of_reference(tiny):
    prompt = _prompts((7,))[0]
    eng = Engine(tiny)
    h = eng.submit(prompt, SamplingParams(max_tokens=6, logprobs=3, prompt_logprobs=True, ignore_eos=True))
    eng.run_until_idle()
    outs = list(h)
    toks, ref_logits = _reference(tiny, prompt, 6)
    assert [o.token_id for o in outs] == toks
    for o, lg in zip(outs, ref_logits, strict=True):
        lp = torch.log_softmax(lg, -1)
        assert o.logprob == pytest.approx(float(lp[o.token_id]), abs=1e-4)
        top = torch.topk(lp, 3)
        assert [t for t, _ in o.top_logprobs] == top.indices.tolist()
        assert [v for _, v in o.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    with torch.no_grad():
        full = torch.log_softmax(tiny(torch.tensor([prompt]))[0].float(), -1)
    want = [None] + [float(full[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    assert outs[0].prompt_logprobs[0] is None
    assert outs[0].prompt_logprobs[1:] == pytest.approx(want[1:], abs=1e-4)
    assert all(o.prompt_logprobs is None for o in outs[1:])
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 6


def test_stop_tokens_and_finish_reasons(tiny):
    prompt = _prompts((6,))[0]
    toks, _ = _reference(tiny, prompt, 8)
    eng = Engine(tiny)
    h = eng.submit(prompt, SamplingParams(max_tokens=8, stop_token_ids=[toks[3]], ignore_eos=True))
    eng.run_until_idle()
    outs = list(h)
    cut = toks.index(toks[3]) + 1
    assert [o.token_id for o in outs] == toks[:cut]
    assert [o.finish_reason for o in outs] == [None] * (cut - 1) + ["stop"]


def test_one_request_s_failure_ends_that_request_only(tiny, monkeypatch):
    # a sampling error of one row (NaN logits, say) failed every request of the step, and an engine
    # driven by step() kept the failed request running: every later step raised again
    import mixlab.engine.core as core
    from mixlab.errors import GenerationError

    real = core.sample_row

    def sample_row(logits_1V, params, *a, **k):
        if params.seed == 13:
            raise GenerationError("the model produced NaN logits")
        return real(logits_1V, params, *a, **k)

    monkeypatch.setattr(core, "sample_row", sample_row)
    prompt = _prompts((6,))[0]
    for started in (True, False):
        eng = Engine(tiny).start() if started else Engine(tiny)
        ok = eng.submit(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
        bad = eng.submit(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=13, ignore_eos=True))
        if not started:
            eng.run_until_idle()
        assert [o.token_id for o in ok] == _reference(tiny, prompt, 8)[0]
        last = list(bad)[-1]
        assert (last.finish_reason, last.error) == ("error", "the model produced NaN logits")
        assert eng.stats()["running"] == 0 and eng.stats()["cache_used_bytes"] == 0
        eng.shutdown()

    def broken(items):  # a failing step (the forward pass) ends its requests with "error" before it raises
        raise RuntimeError("boom")

    eng = Engine(tiny)
    h = eng.submit(prompt, SamplingParams(max_tokens=4))
    monkeypatch.setattr(eng.runner, "forward", broken)
    with pytest.raises(RuntimeError, match="boom"):
        eng.step()
    assert list(h)[-1].error == "RuntimeError: boom" and not eng.has_work()


def test_a_failed_step_leaves_no_tokens_for_prefix_reuse(tiny, monkeypatch):
    """A step that raises may have written part of its chunk (over a rolling slot's oldest
    positions): the slots of its requests are freed without tokens to reuse (they kept the prompt)."""
    prompt = _prompts((9,), seed=4)[0]
    eng = Engine(tiny, max_batch=1)
    h = eng.submit(prompt, SamplingParams(max_tokens=4, ignore_eos=True))
    eng.step()  # the prompt is in the slot

    def broken(items):
        raise RuntimeError("the step failed")

    monkeypatch.setattr(eng.runner, "forward", broken)
    with pytest.raises(RuntimeError, match="the step failed"):
        eng.step()
    assert h.result()[-1].finish_reason == "error"
    assert all(kept == [] for kept in eng.runner.free_slots.values())


def test_a_request_whose_admission_fails_ends_with_error_and_frees_its_slot(tiny, monkeypatch):
    # Admission allocates per request (a penalty's [1, V] rows): out of memory there (a GPU under
    # load) lost the request, which was neither waiting nor running: its stream never ended and its
    # slot was never freed. A failing slot allocation kept it at the head of the queue, failing
    # every step after. Now it ends with "error"; the engine and the other requests go on.
    prompts = _prompts((5, 7, 6), seed=2)
    want = _reference(tiny, prompts[0], 4)[0]
    real_zeros = torch.zeros

    def zeros(*a, **k):
        if k.get("dtype") is torch.bool:
            raise RuntimeError("out of memory")
        return real_zeros(*a, **k)

    eng = Engine(tiny, max_batch=2)
    plain = SamplingParams(max_tokens=4, ignore_eos=True)
    ok = eng.submit(prompts[0], plain)
    bad = eng.submit(prompts[1], SamplingParams(max_tokens=4, ignore_eos=True, repetition_penalty=1.2))
    monkeypatch.setattr(torch, "zeros", zeros)
    eng.step()
    monkeypatch.setattr(torch, "zeros", real_zeros)
    allocate = eng.runner.allocate

    def failing(prompt, *a, **k):
        if prompt == prompts[2]:
            raise RuntimeError("no slot")
        return allocate(prompt, *a, **k)

    monkeypatch.setattr(eng.runner, "allocate", failing)
    bad2 = eng.submit(prompts[2], plain)
    eng.run_until_idle()
    assert [o.token_id for o in ok.poll()] == want
    assert [(o.finish_reason, o.error) for o in bad.poll()] == [("error", "RuntimeError: out of memory")]
    assert [(o.finish_reason, o.error) for o in bad2.poll()] == [("error", "RuntimeError: no slot")]
    st = eng.stats()
    assert st["running"] == st["waiting"] == st["cache_used_bytes"] == 0 and not eng.has_work()


class _CharTok:
    """A toy tokenizer: token i is the character chr(ord('a') + i % 26)."""

    vocab_size = 128  # the tiny model's: every id has text

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)

    def stream(self, *, context=()):
        from mixlab.tokenizer import StreamDecoder

        return StreamDecoder(self, context=context)  # type: ignore[arg-type]


def test_stop_strings_end_text_before_the_match(tiny):
    prompt = _prompts((6,))[0]
    toks, _ = _reference(tiny, prompt, 12)
    text = _CharTok().decode(toks)
    stop = text[5:8]
    eng = Engine(tiny, _CharTok())  # type: ignore[arg-type]
    h = eng.submit(prompt, SamplingParams(max_tokens=12, stop=[stop, "zzzzzzz"], ignore_eos=True))
    eng.run_until_idle()
    outs = list(h)
    end = text.index(stop)
    assert "".join(o.text for o in outs) == text[:end]
    assert outs[-1].finish_reason == "stop"
    assert [o.token_id for o in outs] == toks[: end + len(stop)]
    # Without a match the whole text streams.
    h = eng.submit(prompt, SamplingParams(max_tokens=12, stop=["@"], ignore_eos=True))
    eng.run_until_idle()
    assert "".join(o.text for o in h) == text


def test_min_tokens_holds_back_stop_strings_too(tiny):
    # vLLM's min_tokens (its PR 22014): a stop string in the text of the first min_tokens tokens does
    # not end the request; the first one that ends after that text does
    prompt = _prompts((6,))[0]
    toks, _ = _reference(tiny, prompt, 24)
    text = _CharTok().decode(toks)  # one character per token
    j = next(j for j, c in enumerate(text) if c in text[j + 1 : 20])
    stop, m = text[j], j + 1
    eng = Engine(tiny, _CharTok())  # type: ignore[arg-type]
    h = eng.submit(prompt, SamplingParams(max_tokens=24, min_tokens=m, stop=[stop], ignore_eos=True))
    eng.run_until_idle()
    outs = list(h)
    end = text.index(stop, m)
    assert "".join(o.text for o in outs) == text[:end] and outs[-1].finish_reason == "stop"
    assert [o.token_id for o in outs] == toks[: end + 1]
    # a stop string only in that text: the request runs to max_tokens
    only = next(text[k : k + 2] for k in range(5) if text[k : k + 2] not in text[5:])
    h = eng.submit(prompt, SamplingParams(max_tokens=24, min_tokens=6, stop=[only], ignore_eos=True))
    eng.run_until_idle()
    outs = list(h)
    assert "".join(o.text for o in outs) == text and outs[-1].finish_reason == "length"


def test_cancel_frees_cache(tiny):
    eng = Engine(tiny, max_batch=2)
    p1, p2 = _prompts((5, 8))
    h1 = eng.submit(p1, SamplingParams(max_tokens=50, ignore_eos=True))
    h2 = eng.submit(p2, SamplingParams(max_tokens=4, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.stats()["cache_used_bytes"] > 0
    h1.cancel()
    eng.run_until_idle()
    outs = list(h1)
    assert outs[-1].finish_reason == "cancelled" and outs[-1].token_id is None
    assert 0 < outs[-1].completion_tokens < 50
    assert list(h2)[-1].finish_reason == "length"
    st = eng.stats()
    assert st["running"] == 0 and st["waiting"] == 0
    assert st["cache_used_bytes"] == 0


def test_cancel_reaches_only_the_request_it_was_meant_for(tiny):
    """A request id can be used again once its request ended: the old handle's cancel(), or a
    cancel of the old request that arrived while its last step ran, must not stop the new one."""
    eng = Engine(tiny)
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    old = eng.submit([1, 2, 3], params, request_id="chat")
    forward = eng.runner.forward

    def cancel_during_step(items):  # another thread's cancel while the old request's last step runs
        eng.cancel("chat")
        return forward(items)

    eng.runner.forward = cancel_during_step
    eng.step()  # the old request's only step: it ends, and its id is free again
    eng.runner.forward = forward
    assert old.result()[-1].finish_reason == "length"
    new = eng.submit([1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True), request_id="chat")
    old.cancel()
    eng.run_until_idle()
    assert [o.finish_reason for o in new.result()] == [None, None, "length"]


def test_submit_after_shutdown_raises_instead_of_waiting_forever(tiny):
    eng = Engine(tiny).start()
    eng.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        eng.submit([1, 2, 3], SamplingParams(max_tokens=2))
    with eng:  # started again: it serves
        outs = eng.submit([1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True)).result()
    assert outs[-1].finish_reason == "length"


def test_full_cache_queues_then_serves(tiny):
    prompts = _prompts((10, 12, 9, 11))
    per_seq = (12 + 6) * Engine(tiny).runner.per_token
    eng = Engine(tiny, max_batch=4, cache_bytes=2 * per_seq, max_seq_len=18)  # room for two sequences
    handles = [eng.submit(p, SamplingParams(max_tokens=6, ignore_eos=True)) for p in prompts]
    eng.step()
    st = eng.stats()
    assert st["running"] == 2 and st["waiting"] == 2
    assert st["cache_used_bytes"] <= st["cache_total_bytes"]
    eng.run_until_idle()
    got = [[o.token_id for o in h] for h in handles]
    assert got == [_reference(tiny, p, 6)[0] for p in prompts]


def test_queue_full_and_bad_input(tiny):
    eng = Engine(tiny, max_queue=2)
    eng.submit([1, 2], SamplingParams(max_tokens=2))
    eng.submit([1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(QueueFull):
        eng.submit([1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="exceeds the context"):
        eng.submit([1] * 100, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="vocabulary"):
        eng.submit([1, 500], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="stop strings"):
        eng.submit([1, 2], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="non-integer"):
        eng.submit(np.array([1.0, 2.0]), SamplingParams())
    with pytest.raises(ValueError, match=r"of token ids, got ndarray of shape \[1, 2\]"):
        eng.submit(np.array([[1, 2]]), SamplingParams())


def test_prompts_as_arrays_equal_lists(tiny):
    eng = Engine(tiny)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    hs = [eng.submit(p, params) for p in ([1, 5, 9], np.array([1, 5, 9]), torch.tensor([1, 5, 9]))]
    eng.run_until_idle()
    toks = [[o.token_id for o in h] for h in hs]
    assert toks[0] == toks[1] == toks[2] and len(toks[0]) == 3


def test_an_empty_prompt_starts_from_bos_as_in_generate(tiny):
    # generate turned [] into [bos]; Engine.submit([]) raised "start it with the BOS token"
    from mixlab import generate

    eng = Engine(tiny)
    hs = [eng.submit(p, SamplingParams(max_tokens=3, ignore_eos=True)) for p in ([], [tiny.config.bos_id])]
    eng.run_until_idle()
    outs = [list(h) for h in hs]
    toks = [[o.token_id for o in out] for out in outs]
    assert toks[0] == toks[1] == generate(tiny, [[]], max_new_tokens=3, stop_at_eos=False)[0]
    assert outs[0][-1].prompt_tokens == 1


def _own_routing(model, prompt, outs):
    """Each generated token's experts as it runs through the model: a full forward over the prompt and
    every generated token."""
    ids = prompt + [o.token_id for o in outs]
    with torch.no_grad():
        routings = model.forward_output(torch.tensor([ids])).routing
    return [[r.idx_TK[len(prompt) + j].tolist() for r in routings] for j in range(len(outs))]


def test_experts_and_stats(tiny):
    prompt = _prompts((6,))[0]
    eng = Engine(tiny)
    h = eng.submit(prompt, SamplingParams(max_tokens=4, return_experts=True, ignore_eos=True))
    eng.run_until_idle()
    outs = list(h)
    L, K = tiny.config.n_layers, tiny.config.moe.top_k
    # Each token's own experts, the last token's too (it runs once more after the request finished).
    assert [o.experts for o in outs] == _own_routing(tiny, prompt, outs)
    assert len(outs[0].experts) == L and len(outs[0].experts[0]) == K
    assert outs[-1].finish_reason == "length"
    st = eng.stats()
    assert st["tokens_out"] == 4 and st["steps"] >= 5
    assert sum(st["expert_load"][0]) == K * st["tokens_in"]
    assert st["running"] == 0 and st["cache_used_bytes"] == 0


def test_experts_are_each_token_s_own_beside_other_requests(tiny):
    """return_experts beside requests without it, finishes on stop tokens and at max_tokens, a cancel:
    the tokens are those of the same requests without return_experts, each token carries its own
    experts, and a cancelled request still gets the token it generated."""
    prompts = _prompts((5, 9, 3, 7), seed=4)
    params = [SamplingParams(max_tokens=12, return_experts=True, stop_token_ids=[124]),  # ends on its 4th token
              SamplingParams(max_tokens=7, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=1.0, seed=5, return_experts=True),  # EOS, 2nd token
              SamplingParams(max_tokens=40, return_experts=True, ignore_eos=True)]
    plain = [SamplingParams(**{**p.__dict__, "return_experts": False}) for p in params]
    eng = Engine(tiny, max_batch=4)
    want = _run(eng, list(zip(prompts, plain, strict=True)))
    eng = Engine(tiny, max_batch=4)
    handles = [eng.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
    for _ in range(6):
        eng.step()
    handles[3].cancel()
    eng.run_until_idle()
    for i, (prompt, h) in enumerate(zip(prompts, handles, strict=True)):
        outs = list(h)
        toks = [o for o in outs if o.token_id is not None]
        if i == 3:  # cancelled: every token it generated came out; the last one without experts
            assert outs[-1].finish_reason == "cancelled" and toks
            assert [o.token_id for o in toks] == want[3][: len(toks)]
            assert toks[-1].experts is None
            toks = toks[:-1]
        else:
            assert [o.token_id for o in toks] == want[i]
            assert outs[-1].finish_reason == ("length" if i == 1 else "stop")
        if params[i].return_experts:
            assert [o.experts for o in toks] == _own_routing(tiny, prompt, toks)
        else:
            assert all(o.experts is None for o in toks)
    assert eng.stats()["cache_used_bytes"] == 0


def test_a_cancel_after_the_last_token_keeps_its_experts(tiny):
    """A request that has ended but whose last token still runs for its experts (return_experts) is not
    cancelled: its last output keeps its experts, as alone (they were dropped: found by test_engine_props)."""
    prompt = _prompts((1,))[0]
    eng = Engine(tiny, max_batch=1)
    h = eng.submit(prompt, SamplingParams(max_tokens=1, ignore_eos=True, return_experts=True))
    eng.step()  # the prompt and its one token: the request has ended, its token's experts come with the next step
    h.cancel()
    eng.run_until_idle()
    outs = list(h)
    assert [o.finish_reason for o in outs] == ["length"]
    assert [o.experts for o in outs] == _own_routing(tiny, prompt, outs)
    assert eng.stats()["cache_used_bytes"] == 0


def test_thread_and_asyncio(tiny):
    prompts = _prompts((5, 7, 9))
    want = [_reference(tiny, p, 5)[0] for p in prompts]
    with Engine(tiny, max_batch=2) as eng:
        hs = [eng.submit(p, SamplingParams(max_tokens=5, ignore_eos=True)) for p in prompts]
        assert [[o.token_id for o in h] for h in hs] == want

        async def main():
            async def one(p):
                return [o.token_id async for o in eng.submit(p, SamplingParams(max_tokens=5, ignore_eos=True)).aiter()]

            return await asyncio.gather(*(one(p) for p in prompts))

        assert asyncio.run(main()) == want
    # After shutdown nothing is left running.
    assert eng.stats()["running"] == 0


def test_asyncio_outputs_of_a_step_wake_the_loop_once(tiny):
    # A step that streams to several requests hands all their outputs to the event loop in one
    # call_soon_threadsafe (one self-pipe write), in order; what each request receives is unchanged.
    prompts = _prompts((5, 7, 9), seed=3)
    want = [_reference(tiny, p, 6)[0] for p in prompts]
    wakeups = 0
    with Engine(tiny, max_batch=3) as eng:

        async def main():
            nonlocal wakeups
            loop = asyncio.get_running_loop()
            plain = loop.call_soon_threadsafe

            def counted(*a, **k):
                nonlocal wakeups
                wakeups += 1
                return plain(*a, **k)

            loop.call_soon_threadsafe = counted

            async def one(p):
                return [o.token_id async for o in eng.submit(p, SamplingParams(max_tokens=6, ignore_eos=True)).aiter()]

            return await asyncio.gather(*(one(p) for p in prompts))

        assert asyncio.run(main()) == want
        steps = eng.stats()["steps"]
    outputs = 3 * (6 + 1)  # six tokens and the end of each stream
    assert wakeups <= steps + 2 < outputs, (wakeups, steps)


@pytest.mark.parametrize("model_name", ["tiny", "windowed"])
def test_prefix_reuse_equals_full_prefill(model_name, request):
    model = request.getfixturevalue(model_name)
    base, extra = _prompts((9, 4), seed=5)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    eng = Engine(model, max_batch=2, token_budget=64)
    first = [o.token_id for o in _handles_run(eng, [(base, params)])[0]]
    follow = base + first + extra  # the next turn of a chat
    outs = _handles_run(eng, [(follow, SamplingParams(max_tokens=8, ignore_eos=True))])[0]
    assert outs[0].cached_tokens == len(base) + len(first) - 1  # the last sampled token was never fed
    again = SamplingParams(max_tokens=8, ignore_eos=True)
    fresh = _handles_run(Engine(model, prefix_cache=False), [(follow, again)])[0]
    assert fresh[0].cached_tokens == 0
    assert [o.token_id for o in outs] == [o.token_id for o in fresh] == _reference(model, follow, 8)[0]
    # A prompt sharing nothing reuses nothing.
    other = _handles_run(eng, [(extra + base, params)])[0]
    assert other[0].cached_tokens == 0


@pytest.mark.parametrize("model_name", ["tiny", "windowed"])
def test_running_prefixes_are_copied_not_recomputed(model_name, request):
    """n samples of one prompt, and requests sharing a long system prompt, submitted together: the
    later ones wait for the first's prefill and copy its keys and values (one prefill, not n), and
    each request's tokens equal its run alone. A sliding-window slot that wraps shares nothing."""
    model = request.getfixturevalue(model_name)
    system = _prompts((40,), seed=11)[0]
    tails = _prompts((3, 5), seed=12)
    subs = [(system, SamplingParams(max_tokens=6, temperature=1.0, seed=i, ignore_eos=True)) for i in range(3)]
    subs += [(system + t, SamplingParams(max_tokens=6, ignore_eos=True)) for t in tails]
    eng = Engine(model, max_batch=8, token_budget=64, prefill_chunk=16)
    outs = _handles_run(eng, subs)
    alone = Engine(model, max_batch=1, prefix_cache=False)
    for (p, params), o in zip(subs, outs, strict=True):
        assert [x.token_id for x in o if x.token_id is not None] == _run(alone, [(p, params)])[0]
    cached = [o[-1].cached_tokens for o in outs]
    if model.config.sliding_window is None:
        assert cached == [0, 39, 39, 40, 40]  # the first prefilled; the rest copied (a last token runs)
        assert eng.stats()["tokens_in"] == 40 + 1 + 1 + 3 + 5 + 5 * 5  # prompts' own tokens, then 5 fed each
    else:  # 40 tokens wrap a slot of window 6 + chunk 16 - 1 positions: nothing to copy
        assert cached == [0] * 5


@pytest.mark.parametrize("model_name", ["tiny", "windowed"])
def test_scored_prompts_share_a_running_context_and_its_logprobs(model_name, request):
    """An evaluation harness scores one context with several endings (prompt logprobs, `echo`):
    the endings copy the first's keys and values and its logprobs up to the context's end instead of
    prefilling it again, and every prompt logprob and alternative equals the request's run alone. A
    source that computes no prompt logprobs, or other alternatives, is not shared."""
    model = request.getfixturevalue(model_name)
    context = _prompts((40,), seed=11)[0]
    endings = _prompts((2, 3, 4), seed=13)
    scored = SamplingParams(max_tokens=1, logprobs=2, prompt_logprobs=True, ignore_eos=True)
    subs = [(context + e, scored) for e in endings]
    subs += [(context + endings[0], SamplingParams(max_tokens=1, logprobs=3, prompt_logprobs=True))]
    eng = Engine(model, max_batch=8, token_budget=64, prefill_chunk=16)
    outs = _handles_run(eng, subs)
    alone = Engine(model, max_batch=1, prefix_cache=False)
    for (p, params), o in zip(subs, outs, strict=True):
        want = _handles_run(alone, [(p, params)])[0][0]
        assert o[0].prompt_logprobs[0] is None and len(o[0].prompt_logprobs) == len(p)
        assert o[0].prompt_logprobs[1:] == pytest.approx(want.prompt_logprobs[1:], rel=1e-5)
        for got_top, want_top in zip(o[0].prompt_top_logprobs[1:], want.prompt_top_logprobs[1:], strict=True):
            assert [t for t, _ in got_top] == [t for t, _ in want_top]
            assert [v for _, v in got_top] == pytest.approx([v for _, v in want_top], rel=1e-5)
        assert o[0].token_id == want.token_id
    cached = [o[0].cached_tokens for o in outs]
    if model.config.sliding_window is None:
        assert cached == [0, 39, 39, 0]  # the context minus its last token; other alternatives: none
    else:
        assert cached == [0] * 4
    # Keys and values alone are not enough: a source that computes no prompt logprobs is not used.
    plain = Engine(model, max_batch=4, token_budget=64, prefill_chunk=16)
    outs = _handles_run(plain, [(context, SamplingParams(max_tokens=3, ignore_eos=True)), subs[1]])
    assert outs[1][0].cached_tokens == 0


def test_a_waiting_request_whose_source_is_cancelled_prefills_itself(tiny):
    system = _prompts((40,), seed=11)[0]
    eng = Engine(tiny, max_batch=4, prefill_chunk=8)
    first = eng.submit(system, SamplingParams(max_tokens=4, ignore_eos=True))
    second = eng.submit(system + [5], SamplingParams(max_tokens=4, ignore_eos=True))
    eng.step()  # the first prefills 8 tokens; the second waits for the rest
    assert eng.stats()["running"] == 1 and eng.stats()["waiting"] == 1
    first.cancel()
    eng.run_until_idle()
    out = list(second)
    assert out[-1].cached_tokens == 8  # what the cancelled one had written, kept in its freed slot
    assert [x.token_id for x in out if x.token_id is not None] == _reference(tiny, system + [5], 4)[0]


def test_a_request_whose_prefix_copy_fails_ends_with_error_and_frees_its_slot(tiny, monkeypatch):
    # The copy ran after the slot was allocated but before the request was running: a failing copy
    # (a device error) ended the request with "error" and its slot was never freed.
    system = _prompts((40,), seed=11)[0]
    eng = Engine(tiny, max_batch=2, prefill_chunk=8)
    first = eng.submit(system, SamplingParams(max_tokens=3, ignore_eos=True))

    def failing(*a):
        raise RuntimeError("copy failed")

    monkeypatch.setattr(eng.runner, "copy_prefix", failing)
    second = eng.submit(system + [5], SamplingParams(max_tokens=3, ignore_eos=True))
    eng.run_until_idle()
    assert [(o.finish_reason, o.error) for o in second.poll()] == [("error", "RuntimeError: copy failed")]
    assert [o.token_id for o in first.poll()] == _reference(tiny, system, 3)[0]
    st = eng.stats()
    assert st["running"] == st["waiting"] == st["cache_used_bytes"] == 0 and not eng.has_work()


@pytest.mark.parametrize("model_name", ["tiny", "windowed"])
def test_many_requests_under_load_equal_single_runs_and_free_everything(model_name, request):
    """Requests of mixed lengths (some filling the context, some sharing a long prefix or the same
    prompt, so that free slots are reused) submitted to a running engine while others run, a few
    cancelled on the way: each greedy stream equals the request's run alone (a cancelled one, a
    prefix of it), and afterwards no slot, queue entry or thread is left."""
    model = request.getfixturevalue(model_name)
    g = torch.Generator().manual_seed(4)
    base = _prompts((60,), seed=8)[0]
    subs = []
    for i in range(24):
        if i % 4 == 0:  # the same long prefix, then tokens of its own
            p = base[: 20 + 5 * (i % 7)] + _prompts((i % 5,), seed=i)[0]
        elif i % 4 == 1:  # near the context limit (128)
            p = _prompts((90 + i,), seed=i)[0]
        else:
            p = _prompts((1 + 3 * i,), seed=i)[0]
        subs.append((p, min(int(torch.randint(1, 24, (1,), generator=g)), 128 - len(p))))
    threads = threading.active_count()
    with Engine(model, max_batch=4, token_budget=12, prefill_chunk=8) as eng:
        handles = []
        for i, (p, n) in enumerate(subs):
            handles.append(eng.submit(p, SamplingParams(max_tokens=n, ignore_eos=True)))
            if i % 6 == 5:
                handles[i - 2].cancel()  # waiting, prefilling or decoding by now: whichever it is
            time.sleep(0.002)
        outs = [h.result() for h in handles]
        stats = eng.stats()
        assert stats["running"] == stats["waiting"] == stats["cache_used_bytes"] == 0 and not eng.has_work()
        if model.config.sliding_window is None:  # (a rolling slot of 13 positions holds no such prefix)
            assert stats["cached_tokens"] > 0  # free slots' prefixes were reused
    assert threading.active_count() == threads
    alone = Engine(model, max_batch=1, prefix_cache=False)  # each request by itself (== _reference: tests above)
    for (p, n), o in zip(subs, outs, strict=True):
        toks = [x.token_id for x in o if x.token_id is not None]
        want = _run(alone, [(p, SamplingParams(max_tokens=n, ignore_eos=True))])[0]
        assert toks == (want[: len(toks)] if o[-1].finish_reason == "cancelled" else want)


def _handles_run(engine, submissions):
    hs = [engine.submit(p, s) for p, s in submissions]
    engine.run_until_idle()
    return [list(h) for h in hs]


def test_batched_logprobs_equal_reference(tiny):
    prompts = _prompts((4, 8, 6, 11), seed=9)
    eng = Engine(tiny, max_batch=4)
    outs = _handles_run(eng, [(p, SamplingParams(max_tokens=5, logprobs=2, ignore_eos=True)) for p in prompts])
    for p, o in zip(prompts, outs, strict=True):
        toks, logits = _reference(tiny, p, 5)
        assert [x.token_id for x in o] == toks
        for x, lg in zip(o, logits, strict=True):
            assert x.logprob == pytest.approx(float(torch.log_softmax(lg, -1)[x.token_id]), abs=1e-4)


def test_greedy_tokens_from_numpy_equal_torch_argmax_and_nan_rows_raise():
    """The greedy fast path (`row_argmax`: one NumPy call for a step's rows; `greedy_token`): the
    first index on ties, as torch.argmax; a row with NaN gives None / GenerationError naming NaN;
    tensors NumPy cannot view (float64 here, as a GPU tensor would be) go through PyTorch."""
    from mixlab.engine.sampling import greedy_token, row_argmax
    from mixlab.errors import GenerationError

    x = torch.tensor([[0.0, 3.0, 3.0, -1.0], [1.0, float("nan"), 5.0, 0.0], [-2.0, -1.0, -3.0, -1.0]])
    assert row_argmax(x) == [1, None, 1]
    assert [greedy_token(x[i : i + 1]) for i in (0, 2)] == [int(x[0].argmax()), int(x[2].argmax())] == [1, 1]
    with pytest.raises(GenerationError, match="NaN logits"):
        greedy_token(x[1:2])
    assert row_argmax(x.double()) == [None, None, None]
    assert greedy_token(x[2:].double()) == 1
    with pytest.raises(GenerationError, match="NaN logits"):
        greedy_token(x[1:2].double())
    g = torch.Generator().manual_seed(0)
    y = torch.randn(16, 32000, generator=g)
    assert row_argmax(y) == y.argmax(-1).tolist()


def test_prefill_chunk_default_cap_and_bad_values(tiny):
    assert Engine(tiny).prefill_chunk == 128  # under the default token budget of 512
    assert Engine(tiny, token_budget=64).prefill_chunk == 64
    assert Engine(tiny, prefill_chunk=16).prefill_chunk == 16
    for bad in (0, -3, True, None, 2.5):
        with pytest.raises(ValueError, match=rf"invalid prefill_chunk={bad!r}: expected an integer >= 1"):
            Engine(tiny, prefill_chunk=bad)


def test_long_prompt_in_chunks_beside_a_decoding_stream(tiny):
    """A long prompt arrives while another request decodes: each step carries at most
    `prefill_chunk` of its tokens and a token for the decoding one, and both equal the reference."""
    short, long = _prompts((5, 70), seed=9)
    eng = Engine(tiny, max_batch=2, prefill_chunk=16)
    seen = []
    forward = eng.runner.forward
    eng.runner.forward = lambda items: seen.append([len(it.tokens) for it in items]) or forward(items)
    h_short = eng.submit(short, SamplingParams(max_tokens=12, ignore_eos=True))
    eng.step()  # the short prompt prefilled: it decodes from now on
    h_long = eng.submit(long, SamplingParams(max_tokens=3, ignore_eos=True))
    eng.run_until_idle()
    mixed = [s for s in seen[1:] if len(s) == 2]
    assert [s[1] for s in mixed[:5]] == [16, 16, 16, 16, 6] and all(s[0] == 1 for s in mixed)
    assert [o.token_id for o in h_short if o.token_id is not None] == _reference(tiny, short, 12)[0]
    assert [o.token_id for o in h_long if o.token_id is not None] == _reference(tiny, long, 3)[0]


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "none"
    return text.split("[")[1].split("]")[0] if "[" in text else "none"


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="needs Linux transparent huge pages")
def test_kv_cache_is_advised_onto_huge_pages(tiny):
    """The slot pool's keys and values are madvise(MADV_HUGEPAGE)d before they are first written:
    decoding attention streams them, and on 4 KiB pages the page walks slow each thread's stream
    (BENCHMARKS.md, "Attention at long contexts")."""
    eng = Engine(tiny, max_batch=512, cache_bytes=1 << 30)
    t = eng.runner.k[0]
    assert t.numel() * t.element_size() >= 4 << 20
    start = (t.data_ptr() + (2 << 20) - 1) & ~((2 << 20) - 1)  # the first whole 2 MiB page inside
    flags = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= start < hi
            elif line.startswith("VmFlags:") and inside:
                flags = line.split()[1:]
                break
    assert flags is not None and "hg" in flags, flags


def test_waiting_on_an_engine_nobody_runs_warns(tiny, monkeypatch):
    """Iterating a request of an engine that was never started (and whose step() nobody calls) used
    to block forever without a word: it now warns once, and still finishes once steps run."""
    import threading

    import mixlab.engine.api as api

    monkeypatch.setattr(api, "STALL_WARNING_S", 0.05)
    eng = Engine(tiny)
    h = eng.submit([1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    got: list = []
    with pytest.warns(RuntimeWarning, match=r"never started .* `engine\.step\(\)`"):
        t = threading.Thread(target=lambda: got.extend(h))
        t.start()
        t.join(0.5)
        assert t.is_alive()  # still waiting, warned
    eng.run_until_idle()  # the caller drives the steps: the request finishes
    t.join(10)
    assert not t.is_alive() and len([o for o in got if o.token_id is not None]) == 3


def test_async_waiting_on_an_engine_nobody_runs_warns(tiny, monkeypatch):
    """The same for `aiter()` (it waited without a word), and the request still finishes once steps run."""
    import asyncio

    import mixlab.engine.api as api

    monkeypatch.setattr(api, "STALL_WARNING_S", 0.05)
    eng = Engine(tiny)
    h = eng.submit([1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))

    async def consume() -> list:
        async def drive() -> None:
            await asyncio.sleep(0.3)  # long enough to warn
            await asyncio.to_thread(eng.run_until_idle)
        stepper = asyncio.create_task(drive())
        got = [o async for o in h.aiter()]
        await stepper
        return got

    with pytest.warns(RuntimeWarning, match=r"never started .* `engine\.step\(\)`"):
        got = asyncio.run(consume())
    assert len([o for o in got if o.token_id is not None]) == 3


# -- batch invariance ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, 6])
def test_batch_invariant_outputs_are_bitwise_those_of_each_request_alone(dtype, window):
    """`batch_invariant=True`: each request's logprobs are bit for bit those of its run alone, whatever
    runs beside it and however its prompt is cut into chunks, in bf16 too, where the default kernels
    round differently between batch sizes (vLLM #23138: temperature 0 changing under load)."""
    from mixlab.ops import native

    if native.load() is None or not native.fast(dtype):  # batch_invariant refuses unvectorised kernels
        pytest.skip(f"needs the native kernels vectorised for {dtype} (AVX-512, AVX512-BF16 for bf16)")
    model = _model(sliding_window=window).to(dtype)
    prompts = _prompts((3, 9, 17, 30, 41, 12), seed=21)
    params = SamplingParams(max_tokens=12, logprobs=2, ignore_eos=True)

    def run(engine, ps):
        outs = _handles_run(engine, [(p, params) for p in ps])
        return [[(o.token_id, o.logprob, o.top_logprobs) for o in h] for h in outs]

    first = None
    for max_batch, chunk in ((6, 128), (3, 5)):
        kw = dict(token_budget=24, prefill_chunk=chunk, batch_invariant=True)
        alone = [run(Engine(model, max_batch=1, **kw), [p])[0] for p in prompts]
        together = run(Engine(model, max_batch=max_batch, **kw), prompts)  # prompts cut by the budget left too
        assert together == alone  # exact: token ids, logprobs and alternatives
        if window is None:  # without a sliding window, whatever the chunk size (with one, it sizes the
            first = first or alone  # rolling slots, so the order of a query's keys)
            assert alone == first
    # and they are the model's: greedy tokens of a full recompute (float32, where no near-tie flips)
    if dtype == torch.float32:
        assert [[t for t, _, _ in o] for o in alone] == [_reference(model, p, 12)[0] for p in prompts]


def _invariant_stress(model, seed, invariant, **kw):
    """Seeded load on one engine: prompts from 1 token to near the context, duplicates and shared
    prefixes (copied from running and freed slots), prompts that continue another request's own
    tokens, greedy and seeded sampling with alternatives, late arrivals and cancels; the requests
    that ran to the end, and each one's outputs alone in a fresh engine with the same settings."""
    import random

    rng = random.Random(seed)
    V, ctx = model.config.vocab_size, model.config.max_seq_len

    def alone(p, sp):
        return _handles_run(Engine(model, batch_invariant=invariant, **kw), [(p, sp)])[0]

    reqs = []
    for i in range(14):
        r = rng.random()
        if reqs and r < 0.12:
            pj, spj, _ = rng.choice(reqs)
            toks = [o.token_id for o in alone(pj, SamplingParams(max_tokens=spj.max_tokens, ignore_eos=True))]
            p = (pj + toks[: rng.randint(1, len(toks))])[: ctx - 2]
        elif reqs and r < 0.3:
            p = list(rng.choice(reqs)[0])
            if rng.random() < 0.5:
                p = p[: rng.randint(1, len(p))] + [rng.randrange(3, V) for _ in range(rng.randint(0, 12))]
        else:
            n = rng.randint(ctx - 30, ctx - 5) if r < 0.4 else rng.randint(1, 45)
            p = [rng.randrange(3, V) for _ in range(n)]
        greedy = rng.random() < 0.5
        sp = SamplingParams(max_tokens=rng.randint(1, min(24, ctx - len(p))), temperature=0.0 if greedy else 1.0,
                            top_k=0 if greedy else rng.choice([0, 5]), seed=None if greedy else rng.randrange(1 << 30),
                            logprobs=rng.choice([None, 0, 3, 5]), ignore_eos=rng.random() < 0.7,
                            prompt_logprobs=rng.random() < 0.15, return_experts=rng.random() < 0.2)
        reqs.append((p, sp, rng.randint(0, 12) if i < 7 else rng.randint(5, 40)))
    eng = Engine(model, batch_invariant=invariant, **kw)
    handles: dict[int, object] = {}
    step = 0
    while len(handles) < len(reqs) or eng.has_work():
        for i, (p, sp, at) in enumerate(reqs):
            if i not in handles and at <= step:
                handles[i] = eng.submit(p, sp)
        if handles and rng.random() < 0.04:
            eng.cancel(handles[rng.choice(list(handles))])
        eng.step()
        step += 1

    def key(outs):
        return [(o.token_id, o.logprob, o.top_logprobs, o.experts, o.finish_reason, o.prompt_logprobs) for o in outs]

    together = {i: key(h) for i, h in handles.items()}
    done = [i for i in together if together[i][-1][4] != "cancelled"]
    return [together[i] for i in done], [key(alone(*reqs[i][:2])) for i in done]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, 8])
def test_batch_invariant_holds_under_a_randomized_load(dtype, window):
    """Odd shapes (rows of 72 and 88: K % 32 tails; 131 logits: row counts no multiple of 4), a
    small token budget cutting prompts, fewer cache slots than max_batch (requests wait for one),
    prefix reuse: every request that ran to the end has the outputs of its run alone, bit for bit;
    the same load without batch_invariant does not (the test can tell)."""
    from mixlab.engine.runner import bytes_per_token
    from mixlab.ops import native

    if native.load() is None or not native.fast(dtype):  # batch_invariant refuses unvectorised kernels
        pytest.skip(f"needs the native kernels vectorised for {dtype} (AVX-512, AVX512-BF16 for bf16)")
    cfg = get_preset("tiny-moe").replace(vocab_size=131, dim=72, head_dim=18, ffn_dim=88, max_seq_len=128,
                                         sliding_window=window)
    model = Transformer(cfg).eval()
    model.init_weights(std=0.5, seed=0)
    model = model.to(dtype)
    kw = dict(max_batch=5, token_budget=7, prefill_chunk=4, max_seq_len=128,
              cache_bytes=bytes_per_token(model) * 128 * 3)
    together, alone = _invariant_stress(model, 3, True, **kw)
    assert len(together) >= 8 and together == alone
    together, alone = _invariant_stress(model, 3, False, **kw)
    assert together != alone


def test_batch_invariant_refuses_what_has_no_invariant_kernels(tiny):
    from mixlab.model.inference import prepare_for_inference
    from mixlab.ops import native

    if native.load() is None:
        pytest.skip("needs the native kernels")
    with pytest.raises(ValueError, match="pack_weights"):
        Engine(tiny, batch_invariant=True, pack_weights=True)
    with pytest.raises(ValueError, match="batch_invariant"):
        Engine(tiny, batch_invariant="yes")
    int8 = prepare_for_inference(_model(), quant="int8")
    with pytest.raises(ValueError, match="int8/int4"):
        Engine(int8, batch_invariant=True)


def test_batch_invariant_on_a_cpu_without_the_instructions_says_so(monkeypatch):
    # a CPU without AVX512-BF16 (the library built, its bf16 kernels refused as unvectorised) was
    # told "native kernels unavailable", as if nothing had been built
    from mixlab.model import native as model_native
    from mixlab.ops import native

    if native.load() is None:
        pytest.skip("needs the native kernels")
    model = _model().to(torch.bfloat16)
    monkeypatch.setattr(native, "fast", lambda dtype: dtype != torch.bfloat16)
    model_native.forget_shared(model)
    why = "not vectorised for torch.bfloat16 on this CPU: they need AVX-512 and AVX512-BF16"
    with pytest.raises(ValueError, match=why):
        Engine(model, batch_invariant=True)


def test_a_padded_vocabularys_id_streams_no_text():
    # tiny-moe over Mixtral's tokenizer with a vocabulary padded to 32768: the first sampled id the
    # tokenizer lacks ended the request with "token id 32500 is outside the vocabulary [0, 32000)"
    from mixlab.tokenizer import load_tokenizer

    model = Transformer(get_preset("tiny-moe").replace(vocab_size=32768, max_seq_len=64)).eval()
    tok = load_tokenizer()
    x = tok.encode("x", bos=False)[-1]
    engine = Engine(model, tok)
    h = engine.submit([tok.bos_id, x], SamplingParams(max_tokens=3, logit_bias={32500: 100}))
    engine.run_until_idle()
    outs = list(h)
    assert [o.token_id for o in outs] == [32500] * 3 and "".join(o.text for o in outs) == ""
    assert outs[-1].finish_reason == "length" and outs[-1].error is None


def test_engine_and_handle_reprs_say_their_state(tiny):
    # both printed Python's default '<mixlab.engine.core.Engine object at 0x...>'
    eng = Engine(tiny, max_batch=2)
    h = eng.submit([1, 5, 9], SamplingParams(max_tokens=2, ignore_eos=True), request_id="r1")
    assert repr(eng) == "Engine(running=0, waiting=1, max_batch=2, thread=False)"
    assert repr(h) == "Handle(request_id='r1', state='waiting')"
    eng.step()
    assert repr(eng) == "Engine(running=1, waiting=0, max_batch=2, thread=False)"
    assert repr(h) == "Handle(request_id='r1', state='decoding')"
    eng.run_until_idle()
    assert repr(h) == "Handle(request_id='r1', state='finished', finish_reason='length')"
    eng.shutdown()
    assert repr(eng) == "Engine(running=0, waiting=0, max_batch=2, thread=False, closed=True)"


def test_a_handle_read_to_its_end_does_not_wait_again(tiny):
    # a second result(), or a loop over a handle already read, waited forever for outputs that never come
    with Engine(tiny, max_batch=2) as eng:
        h = eng.submit([1, 5, 9], SamplingParams(max_tokens=3, ignore_eos=True), request_id="r1")
        assert len(h.result()) == 3 and h.finished
        again: list = []
        reader = threading.Thread(target=lambda: again.append(list(h)), daemon=True)
        reader.start()
        reader.join(5)
        assert again == [[]] and h.poll() == []

        async def rest() -> list:
            return [o async for o in h.aiter()]

        assert asyncio.run(asyncio.wait_for(rest(), 5)) == []
        with pytest.raises(RuntimeError, match="request 'r1': its outputs were read already"):
            h.result()


def test_handle_state_tells_waiting_from_prefilling_from_decoding(tiny):
    # both a request in the queue and one running said state='in progress'
    eng = Engine(tiny, max_batch=1, token_budget=2)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    a, b = eng.submit([1, 5, 9, 7, 3], params), eng.submit([1, 4], params)
    assert (a.state, b.state) == ("waiting", "waiting")
    eng.step()  # a: the first 2 of its 5 prompt tokens; b: no slot (max_batch=1)
    assert (a.state, b.state) == ("prefilling", "waiting") and "state='prefilling'" in repr(a)
    eng.step()
    eng.step()  # a's prompt is in: its first token
    assert (a.state, b.state) == ("decoding", "waiting") and "state='decoding'" in repr(a)
    eng.step()  # a's last token
    eng.step()
    assert (a.state, b.state) == ("finished", "decoding")
    eng.run_until_idle()
    assert b.state == "finished" and [o.finish_reason for o in a][-1] == "length"


def test_cancelling_the_task_reading_aiter_cancels_the_request(tiny):
    """A task awaiting `aiter()` that is cancelled (here by `asyncio.wait_for`'s timeout) cancels its
    request, as vLLM's AsyncLLM.generate aborts it: the request decoded on to max_tokens, unread."""
    eng = Engine(tiny)  # not started: nothing runs until the test steps it
    h = eng.submit([1, 2, 3], SamplingParams(max_tokens=40, ignore_eos=True))

    async def main() -> None:
        async def read() -> list:
            return [o async for o in h.aiter()]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(read(), 0.05)

    asyncio.run(main())
    eng.run_until_idle()
    assert "cancelled" in repr(h) and eng.stats()["tokens_out"] == 0
