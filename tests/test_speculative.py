"""Speculative decoding by prompt lookup (`SamplingParams.speculative_tokens`): greedy outputs equal
plain greedy decoding's token for token (float32, several sequences, a sliding-window model whose
rolling slots wrap), drafts both accepted and rejected; stops, max_tokens, stop strings, logprobs
and penalties inside accepted drafts as without them; the cache after rejected drafts is plain
decoding's; sampled requests decode a token a step."""

from __future__ import annotations

import pytest
import torch

from mixlab.config import get_preset
from mixlab.engine import Engine, SamplingParams
from mixlab.engine.lookup import PromptLookup
from mixlab.generate import generate
from mixlab.model import Transformer


def _model(vocab: int = 8, seed: int = 0, markov: bool = False, **kw) -> Transformer:
    """A tiny float32 MoE. A vocabulary of 8 makes its greedy outputs repeat n-grams now and then,
    so some drafts are right; `markov`: attention's output zeroed, each token a function of the last
    one, so outputs fall into short cycles that drafts predict."""
    cfg = get_preset("tiny-moe").replace(vocab_size=vocab, max_seq_len=160, **kw)
    model = Transformer(cfg).eval()
    model.init_weights(std=0.5, seed=seed)
    if markov:
        with torch.no_grad():
            for block in model.layers:
                block.attn.wo.weight.zero_()
    return model


@torch.no_grad()
def _reference(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by recomputing the whole sequence at each step (no cache)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def _prompts(vocab: int, lengths: tuple[int, ...] = (5, 17, 30, 3)) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _outputs(engine: Engine, prompts, params: list[SamplingParams]):
    """Each request's outputs, submitted one step apart (so they join a running batch), and the
    number of outputs each step gave each request."""
    handles, per_step = [], [[] for _ in prompts]
    outs = [[] for _ in prompts]

    def step():
        engine.step()
        for b, h in enumerate(handles):
            got = h.poll()
            outs[b] += got
            if got:
                per_step[b].append(len(got))

    for p, sp in zip(prompts, params, strict=True):
        handles.append(engine.submit(p, sp))
        step()
    while engine.has_work():
        step()
    return outs, per_step


def _view(outs):
    """What a request streamed; logprobs to 1e-4 (a step's kernels, chosen by its token count, round
    float32 differently: the tokens are equal, the logprobs equal up to the last bits)."""
    def r(x):
        return None if x is None else round(x, 4)
    return [(o.token_id, o.text, r(o.logprob), o.top_logprobs and [(t, r(lp)) for t, lp in o.top_logprobs],
             o.finish_reason, o.stop_reason) for o in outs]


def test_lookup_drafts_the_latest_longest_match():
    lk = PromptLookup()
    # "1 2" occurs twice before the end; the latest occurrence's continuation is copied
    assert lk.draft([1, 2, 3, 4, 1, 2, 5, 6, 7, 1, 2], 3) == [5, 6, 7]
    assert lk.draft([1, 2, 3, 4, 1, 2, 5, 6, 7, 1, 2, 5], 2) == [6, 7]  # the index grows with the tokens
    assert PromptLookup().draft([1, 2, 3], 4) == []  # no earlier occurrence of any suffix
    assert PromptLookup().draft([9, 1, 2, 3, 8, 2, 3], 2) == [8, 2]  # "2 3" beats the longer miss "8 2 3"
    # a match that reaches the end continues the period: a cycle of 3 drafted past its copy
    assert PromptLookup().draft([5, 7, 8, 9, 7, 8, 9], 5) == [7, 8, 9, 7, 8]
    assert PromptLookup().draft([4, 4], 3) == [4, 4, 4]
    assert PromptLookup().draft([1, 2, 1], 0) == []


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_greedy_equals_plain_decoding(window, k):
    # several sequences at once, staggered; with a window of 6 and chunks of 5 each slot holds 10
    # positions and wraps around many times
    model = _model(sliding_window=window)
    prompts = _prompts(8)
    chunk = 5 if window else 128
    plain = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (60, 45, 50, 70)]
    spec = [SamplingParams(max_tokens=m, ignore_eos=True, speculative_tokens=k) for m in (60, 45, 50, 70)]
    want, _ = _outputs(Engine(model, max_batch=4, prefill_chunk=chunk), prompts, plain)
    eng = Engine(model, max_batch=4, prefill_chunk=chunk)
    got, per_step = _outputs(eng, prompts, spec)
    assert [_view(o) for o in got] == [_view(o) for o in want]
    assert [o.token_id for o in want[1]] == _reference(model, prompts[1], 45)
    st = eng.stats()
    assert 0 < st["accepted_tokens"] < st["draft_tokens"]  # drafts both kept and rejected
    assert max(max(n) for n in per_step) > 1  # some steps gave a request several tokens
    assert st["tokens_out"] == sum(p.max_tokens for p in plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batch_invariant_speculation_is_bitwise_plain_decoding(dtype):
    # batch_invariant=True: a row's numbers do not depend on the step's other rows, so a draft's
    # positions give the logits a lone decoding token gives, bit for bit, in bf16 too
    from mixlab.ops import native

    if native.load() is None or not native.fast(dtype):
        pytest.skip(f"needs the native kernels vectorised for {dtype} (AVX-512, AVX512-BF16 for bf16)")
    model = _model(sliding_window=6).to(dtype)
    prompts = _prompts(8)
    runs = []
    for k in (0, 4):
        eng = Engine(model, max_batch=4, prefill_chunk=5, batch_invariant=True)
        params = [SamplingParams(max_tokens=40, ignore_eos=True, logprobs=2, speculative_tokens=k) for _ in prompts]
        outs, _ = _outputs(eng, prompts, params)
        runs.append([[(o.token_id, o.logprob, o.top_logprobs) for o in h] for h in outs])
    assert runs[0] == runs[1]
    assert 0 < eng.stats()["accepted_tokens"] < eng.stats()["draft_tokens"]


def test_rejected_drafts_leave_the_cache_as_plain_decoding_does():
    # a request that ends on a stop token in a step that verified a longer draft: the positions
    # after it were written, and must read as plain decoding left them (empty)
    model = _model()
    prompt = _prompts(8)[2]
    toks = _reference(model, prompt, 40)
    stop = max(set(toks), key=toks.index)  # the token the output shows last
    n_out = toks.index(stop) + 1
    slots = []
    for k in (0, 8):
        eng = Engine(model, max_batch=1)
        h = eng.submit(prompt, SamplingParams(max_tokens=40, stop_token_ids=[stop], speculative_tokens=k,
                                              ignore_eos=True))
        eng.run_until_idle()
        assert [o.token_id for o in h] == toks[:n_out]
        r = eng.runner
        slots.append((r.pos_SC[0].clone(), [k[0].clone() for k in r.k], [v[0].clone() for v in r.v]))
        if k:
            assert eng.stats()["draft_tokens"] > eng.stats()["accepted_tokens"] > 0
    (pos0, k0, v0), (pos1, k1, v1) = slots
    n = len(prompt) + n_out - 1  # the stop token never ran
    assert torch.equal(pos0, torch.tensor([*range(n), *[-1] * (len(pos0) - n)]))
    assert torch.equal(pos1, pos0)  # every rejected draft position marked empty
    for a, b in zip(k0 + v0, k1 + v1, strict=True):
        torch.testing.assert_close(a[:, :n], b[:, :n], rtol=1e-4, atol=1e-4)  # kernels by token count


class _CharTok:
    """A toy tokenizer: token i is the character chr(ord('a') + i)."""

    vocab_size = 16

    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)

    def stream(self, *, context=()):
        from mixlab.tokenizer import StreamDecoder

        return StreamDecoder(self, context=context)  # type: ignore[arg-type]


# seed 5's Markov model continues [3, 4] with 9 13 6 12, then the cycle 2 8 1 10; a prompt holding
# them has drafts right from the first decoding step
CYCLE_PROMPT = [3, 4, 9, 13, 6, 12, 2, 8, 1, 10]


@pytest.mark.parametrize(("kw", "steps"), [
    (dict(max_tokens=30, stop_token_ids=[10]), [1, 3]),  # the stop token inside an accepted draft
    (dict(max_tokens=6), [1, 5]),  # max_tokens reached by a draft's tokens
    (dict(max_tokens=30, stop=["bkc"]), [1, 4]),  # a stop string (tokens 1 10 2: "bkc") inside one
    (dict(max_tokens=12, logprobs=3), [1, 5, 5, 1]),
    (dict(max_tokens=12, repetition_penalty=1.1, logprobs=0), None),
    (dict(max_tokens=12, logit_bias={8: 5.0}), None),
    (dict(max_tokens=12, min_tokens=8, stop_token_ids=[1]), None),
])
def test_stops_and_logprobs_inside_accepted_drafts(kw, steps):
    model = _model(vocab=16, seed=5, markov=True)
    tok = _CharTok()
    plain, _ = _outputs(Engine(model, tok), [CYCLE_PROMPT], [SamplingParams(ignore_eos=True, **kw)])  # type: ignore[arg-type]
    eng = Engine(model, tok)  # type: ignore[arg-type]
    got, per_step = _outputs(eng, [CYCLE_PROMPT], [SamplingParams(ignore_eos=True, speculative_tokens=4, **kw)])
    assert _view(got[0]) == _view(plain[0])
    assert "".join(o.text for o in got[0]) == "".join(o.text for o in plain[0])
    if steps is not None:
        assert per_step[0] == steps
        assert eng.stats()["accepted_tokens"] > 0


@pytest.mark.parametrize("kernels", ["native", "pytorch"])
@pytest.mark.parametrize("case", ["staggered", "stop in a draft"])
def test_expert_load_counts_the_tokens_kept(case, kernels, monkeypatch):
    """/metrics' expert load (`Engine.stats()['expert_load']`, `Runner.expert_load`) counted the routing
    of every draft position, rejected ones too: speculation changed the load of the same output. It
    counts the tokens kept, equal to plain decoding's: each request's prompt (less a prefix another
    request's keys gave it) and outputs but the last (which never runs), K experts a token in each
    layer. Both step kernels: the native batch, and PyTorch's pass (the GPU's, and every step with a
    LoRA adapter)."""
    from mixlab.engine.runner import Runner

    if kernels == "pytorch":
        monkeypatch.setattr(Runner, "_native_batch", lambda self, items, invariant=False: None)
    if case == "staggered":  # four sequences joining a running batch, rolling slots that wrap
        model, prompts, chunk = _model(sliding_window=6), _prompts(8), 5
        kw = [dict(max_tokens=m) for m in (30, 20, 25, 35)]
    else:  # the stop token inside an accepted draft: the draft's tokens after it are dropped
        model, prompts, chunk = _model(vocab=16, seed=5, markov=True), [CYCLE_PROMPT], 128
        kw = [dict(max_tokens=30, stop_token_ids=[10])]
    runs = []
    for k in (0, 4):
        eng = Engine(model, max_batch=4, prefill_chunk=chunk)
        outs, _ = _outputs(eng, prompts, [SamplingParams(ignore_eos=True, speculative_tokens=k, **a) for a in kw])
        runs.append(([[o.token_id for o in h] for h in outs], eng.stats()))
    (plain, st0), (spec, st1) = runs
    assert spec == plain
    assert st1["draft_tokens"] > st1["accepted_tokens"] > 0  # drafts both kept and rejected
    K = model.config.moe.top_k  # plain decoding's load: K experts for every token it ran, in each layer
    assert [sum(layer) for layer in st0["expert_load"]] == [st0["tokens_in"] * K] * model.config.n_layers
    assert st1["expert_load"] == st0["expert_load"]
    assert st1["tokens_in"] > st0["tokens_in"]  # the rejected drafts ran, uncounted


def test_sampled_requests_decode_a_token_a_step():
    model = _model()
    prompts = _prompts(8)[:2]
    params = [SamplingParams(max_tokens=30, temperature=0.8, seed=s, ignore_eos=True) for s in (1, 2)]
    want, _ = _outputs(Engine(model, max_batch=2), prompts, params)
    eng = Engine(model, max_batch=2)
    for p in params:
        p.speculative_tokens = 4
    got, per_step = _outputs(eng, prompts, params)
    assert [_view(o) for o in got] == [_view(o) for o in want]
    assert eng.stats()["draft_tokens"] == 0 and all(n == 1 for s in per_step for n in s)


def test_generate_takes_speculative_tokens():
    model = _model(sliding_window=6)
    prompts = _prompts(8)[:3]
    want = generate(model, prompts, max_new_tokens=40, stop_at_eos=False)
    assert generate(model, prompts, max_new_tokens=40, stop_at_eos=False, speculative_tokens=4) == want
    assert want[0] == _reference(model, prompts[0], 40)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4"])
def test_bad_speculative_tokens_are_named(bad):
    with pytest.raises(ValueError, match=r"invalid speculative_tokens=.*: expected an integer >= 0"):
        SamplingParams(speculative_tokens=bad)
    with pytest.raises(ValueError, match=r"invalid speculative_tokens=.*: expected an integer >= 0"):
        generate(_model(), [[3, 4]], max_new_tokens=2, speculative_tokens=bad)


def test_speculative_tokens_with_a_cache_is_refused():
    from mixlab.cache import KVCache

    model = _model()
    cache = KVCache(model.config, batch_size=1, max_len=20)
    with pytest.raises(ValueError, match="speculative_tokens= decodes through the engine; it excludes cache="):
        generate(model, [[3, 4]], max_new_tokens=2, cache=cache, speculative_tokens=2)
