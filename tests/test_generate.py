"""Generation: greedy equals transformers' generate token for token (batched, left-padded, sliding
window shorter than prompt + output); sampling filters equal transformers' logits processors, and seeded
samples its generate(do_sample=True) token for token; seeds; stop tokens and strings; expert records; every
bad input fails before any compute."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from conftest import hf_mistral, hf_mixtral
from mixlab import load_model
from mixlab.cache import KVCache
from mixlab.config import get_preset
from mixlab.generate import Sampler, generate, generate_stream
from mixlab.model import Transformer

LENGTHS = (5, 9, 14, 20)  # with 32 new tokens: up to 52 positions, far beyond the window of 8


def _prompts(vocab: int, lengths: tuple[int, ...] = LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_generate(path: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding, as transformers recommends for decoder-only models
        ids[b, T - len(p) :] = torch.tensor(p)
        mask[b, T - len(p) :] = 1
    ref.generation_config.eos_token_id = None  # a random model may emit EOS; compare all n tokens
    ref.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
    return out[:, T:].tolist()


@pytest.fixture(scope="module", params=["mixtral", "mistral-window"])
def hf_case(request, tmp_path_factory) -> tuple[Path, list[list[int]], list[list[int]]]:
    """A transformers checkpoint, 4 prompts, and transformers' 32 greedy tokens for each."""
    path = tmp_path_factory.mktemp(request.param)
    # initializer_range 0.1 (not 0.02): a random model that varies its output makes a stronger test.
    if request.param == "mixtral":
        hf_mixtral(path, num_local_experts=8, initializer_range=0.1)
    else:
        hf_mistral(path, sliding_window=8, initializer_range=0.1)
    prompts = _prompts(128)
    return path, prompts, _hf_generate(path, prompts, 32)


@pytest.mark.parametrize("prefill_chunk", [512, 3])
def test_greedy_equals_transformers(hf_case, prefill_chunk):
    path, prompts, theirs = hf_case
    model = load_model(path)
    ours = generate(model, prompts, max_new_tokens=32, stop_at_eos=False, prefill_chunk=prefill_chunk)
    assert ours == theirs
    assert all(len(set(row)) > 4 for row in ours), "degenerate output would make this test weak"


SAMPLING = [dict(temperature=1.0), dict(temperature=0.7, top_k=20), dict(temperature=1.0, top_p=0.9),
            dict(temperature=1.0, min_p=0.05), dict(temperature=1.0, repetition_penalty=1.3),
            dict(temperature=0.8, top_k=30, top_p=0.9, min_p=0.02, repetition_penalty=1.1)]


def test_seeded_sampling_equals_transformers(tmp_path):
    """One prompt, seed s: transformers' generate(do_sample=True) after torch.manual_seed(s), token for token
    (its processors in the same order, one multinomial draw per token from the same Mersenne Twister)."""
    from transformers import AutoModelForCausalLM

    path = hf_mixtral(tmp_path, num_local_experts=8, initializer_range=0.1)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id, ref.generation_config.pad_token_id = None, 0
    model = load_model(path)
    prompt = _prompts(128, (6,))[0]
    for kw in SAMPLING:
        torch.manual_seed(3)
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=True, **{"top_k": 0, **kw})
        theirs = out[0, len(prompt) :].tolist()
        assert generate(model, [prompt], max_new_tokens=24, seed=3, stop_at_eos=False, **kw)[0] == theirs, kw
        cache = KVCache(model.config, batch_size=1, max_len=64)
        assert generate(model, [prompt], max_new_tokens=24, seed=3, stop_at_eos=False, cache=cache, **kw)[0] == theirs
    assert len(set(theirs)) > 8, "degenerate output would make this test weak"


@pytest.fixture(scope="module")
def tiny() -> Transformer:
    model = Transformer(get_preset("tiny-moe").replace(vocab_size=128, max_seq_len=64)).eval()
    model.init_weights(std=0.5, seed=0)  # large weights: peaked, varied next-token distributions
    return model


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dense", "tiny-moe capacity"])
def test_last_only_equals_the_last_position_of_the_full_pass(preset):
    """`forward_output(last_only=True)` (a prefill: the last layer's feed-forward block for the last
    position alone) gives that position's hidden state, logits and routing, and the same cache. With
    an expert capacity (tokens dropped by the whole batch) the whole block runs, then one row is kept."""
    import dataclasses

    from mixlab.cache import KVCache

    cfg = get_preset(preset.split()[0]).replace(vocab_size=128, max_seq_len=64)
    if preset.endswith("capacity"):
        cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, capacity_factor=0.5))
    model = Transformer(cfg).eval()
    model.init_weights(std=0.5, seed=0)
    tokens = torch.tensor(_prompts(128, (13, 13), seed=3))
    caches = [KVCache(model.config, batch_size=2, max_len=32, dtype=torch.float32) for _ in range(2)]
    with torch.no_grad():
        full = model.forward_output(tokens, cache=caches[0])
        last = model.forward_output(tokens, cache=caches[1], last_only=True)
    assert last.hidden_BTD.shape == (2, 1, model.config.dim) and last.logits_BTV.shape == (2, 1, 128)
    torch.testing.assert_close(last.hidden_BTD, full.hidden_BTD[:, -1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last.logits_BTV, full.logits_BTV[:, -1:], atol=1e-5, rtol=1e-5)
    assert len(last.routing) == len(full.routing)
    for i, (a, b) in enumerate(zip(last.routing, full.routing, strict=True)):
        got, want = a.idx_TK.view(2, -1, b.idx_TK.shape[-1]), b.idx_TK.view(2, 13, -1)
        assert torch.equal(got[:, -1], want[:, -1])
        assert torch.equal(got, want) or (i == len(full.routing) - 1 and got.shape[1] == 1)
    assert caches[0].t == caches[1].t == 13
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v, strict=True):
        assert torch.equal(a, b)


def test_batch_equals_one_by_one(tiny):
    prompts = _prompts(128, (3, 11, 7))
    batched = generate(tiny, prompts, max_new_tokens=12, stop_at_eos=False)
    alone = [generate(tiny, [p], max_new_tokens=12, stop_at_eos=False)[0] for p in prompts]
    assert batched == alone


def test_more_prompts_than_an_engine_queues_by_default(tiny):
    # 300 prompts raised QueueFull('256 requests are waiting (max_queue=256)'): the engine generate makes
    # kept the Engine's default queue, and every prompt waits before the first step.
    prompts = [[1, 3 + i % 100] for i in range(300)]
    out = generate(tiny, prompts, max_new_tokens=2, stop_at_eos=False)
    assert len(out) == 300 and out[299] == generate(tiny, [prompts[299]], max_new_tokens=2, stop_at_eos=False)[0]


def test_filters_equal_transformers_logits_processors():
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    input_ids = torch.randint(0, 50, (3, 10), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, input_ids, True)
    for t, k, p, m, r in [(0.7, 10, 0.9, 0.0, 1.3), (1.5, 0, 0.5, 0.0, 1.0), (1.0, 0, 1.0, 0.2, 0.8),
                          (0.9, 5, 0.8, 0.1, 1.1), (1.0, 0, 1e-300, 0.0, 1.0)]:
        ours = Sampler(temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=r).filter(logits, seen_BV=seen)
        theirs = logits
        procs = [RepetitionPenaltyLogitsProcessor(r), TemperatureLogitsWarper(t)]
        procs += [TopKLogitsWarper(k)] if k else []
        procs += [TopPLogitsWarper(p)] if p < 1 else []
        procs += [MinPLogitsWarper(m)] if m else []
        for proc in procs:
            theirs = proc(input_ids, theirs)
        assert torch.equal(ours.isinf(), theirs.isinf()), (t, k, p, m, r)
        torch.testing.assert_close(ours[~ours.isinf()], theirs[~theirs.isinf()])


def test_restrictive_filters_equal_greedy(tiny):
    prompts = _prompts(128, (6, 4))
    greedy = generate(tiny, prompts, max_new_tokens=8, stop_at_eos=False)
    # top_p=1e-300 is 0 in float32: it dropped every token (multinomial's RuntimeError)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}, {"top_p": 1e-300}, {"min_p": 1.0}):
        assert generate(tiny, prompts, max_new_tokens=8, stop_at_eos=False, temperature=1.0, seed=3, **kw) == greedy
    # below 1e-5 a temperature decodes greedily: 1e-45 made the logits inf (multinomial failed on NaN)
    for t in (1e-45, 1e-6):
        assert generate(tiny, prompts, max_new_tokens=8, stop_at_eos=False, temperature=t, seed=3) == greedy


def test_seed_reproducible(tiny):
    prompts = _prompts(128, (6, 4))
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, stop_at_eos=False)
    a = generate(tiny, prompts, seed=1, **kw)
    assert generate(tiny, prompts, seed=1, **kw) == a
    assert generate(tiny, prompts, seed=2, **kw) != a
    # prompt b samples with seed + b: one prompt three times was three copies of one sample
    hot = {**kw, "temperature": 2.0}  # varied draws: three samples that differ
    rows = generate(tiny, [prompts[0]] * 3, seed=1, **hot)
    assert rows == [generate(tiny, [prompts[0]], seed=s, **hot)[0] for s in (1, 2, 3)]
    assert len(set(map(tuple, rows))) == 3
    assert generate(tiny, [prompts[0]] * 2, seed=2**64 - 1, **hot)[1] == generate(tiny, [prompts[0]], seed=0, **hot)[0]
    # top_k -1 is off, as 0 is (vLLM's and the server's convention)
    assert generate(tiny, prompts, seed=1, top_k=-1, **kw) == a == generate(tiny, prompts, seed=1, top_k=0, **kw)


def test_repetition_penalty_discourages_repeats(tiny):
    prompt = [_prompts(128, (8,))[0]]
    plain = generate(tiny, prompt, max_new_tokens=24, stop_at_eos=False)[0]
    penalised = generate(tiny, prompt, max_new_tokens=24, stop_at_eos=False, repetition_penalty=1e6)[0]
    assert len(set(plain)) < len(plain), "the plain run should repeat something for this test to bite"
    assert len(set(penalised)) == len(penalised)
    assert not set(penalised) & set(prompt[0])


@torch.no_grad()
def test_presence_and_frequency_penalties_equal_openai_s_formula(tiny):
    # generate (and so mixlab generate / chat) had only repetition_penalty; the engine had these two
    from mixlab.cache import KVCache

    prompt = _prompts(128, (5,))[0]
    ids, counts = list(prompt), torch.zeros(128)
    for _ in range(12):  # a full recompute, the penalties over the output's token counts, greedy
        logits = tiny(torch.tensor([ids]))[0, -1].float() - counts * 0.5 - (counts > 0).float() * 0.8
        ids.append(int(logits.argmax()))
        counts[ids[-1]] += 1
    ref = ids[len(prompt) :]
    kw = dict(max_new_tokens=12, stop_at_eos=False, presence_penalty=0.8, frequency_penalty=0.5)
    assert generate(tiny, [prompt], **kw)[0] == ref != generate(tiny, [prompt], max_new_tokens=12, stop_at_eos=False)[0]
    assert generate(tiny, [prompt], cache=KVCache(tiny.config, batch_size=1, max_len=32), **kw)[0] == ref
    with pytest.raises(ValueError, match="frequency_penalty=nan"):
        generate(tiny, [prompt], max_new_tokens=2, frequency_penalty=float("nan"))


@torch.no_grad()
def test_repetition_penalty_comes_before_presence_and_frequency(tiny):
    # vLLM (apply_penalties) and llama.cpp (its penalties sampler) divide a seen token's logit by the
    # repetition penalty first, then subtract presence / frequency: 2 / 2 - 1 = 0. mixlab subtracted
    # first, (2 - 1) / 2 = 0.5, so with both set it picked other tokens than those servers.
    from mixlab.cache import KVCache
    from mixlab.engine import SamplingParams
    from mixlab.engine.sampling import Sampler, sample_row

    logits = torch.tensor([[2.0, 0.25, -1.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0)
    seen, counts = torch.tensor([[True, False, False]]), torch.tensor([[1.0, 0.0, 0.0]])
    assert sample_row(logits, params, Sampler(repetition_penalty=2.0), seen_1V=seen, counts_1V=counts,
                      generator=None) == 1  # 0 < 0.25 (was token 0: 0.5 > 0.25)
    prompt = _prompts(128, (5,))[0]
    ids, counts_V = list(prompt), torch.zeros(128)
    for _ in range(12):  # a full recompute in that order, greedy
        logits_V = tiny(torch.tensor([ids]))[0, -1].float()
        seen_V = torch.zeros(128, dtype=torch.bool)
        seen_V[ids] = True
        logits_V = torch.where(seen_V, torch.where(logits_V > 0, logits_V / 1.5, logits_V * 1.5), logits_V)
        logits_V = logits_V - counts_V * 0.5 - (counts_V > 0).float() * 0.8
        ids.append(int(logits_V.argmax()))
        counts_V[ids[-1]] += 1
    kw = dict(max_new_tokens=12, stop_at_eos=False, repetition_penalty=1.5, presence_penalty=0.8, frequency_penalty=0.5)
    assert generate(tiny, [prompt], **kw)[0] == ids[len(prompt):]
    assert generate(tiny, [prompt], cache=KVCache(tiny.config, batch_size=1, max_len=32), **kw)[0] == ids[len(prompt):]


def test_stop_tokens_and_eos(tiny):
    prompts = _prompts(128, (6, 4))
    full = generate(tiny, prompts, max_new_tokens=16, stop_at_eos=False)
    stop = full[0][5]
    out = generate(tiny, prompts, max_new_tokens=16, stop=[stop], stop_at_eos=False)
    assert out[0] == full[0][: full[0].index(stop) + 1]  # stops after the stop token, which is kept
    assert out[1] == (full[1][: full[1].index(stop) + 1] if stop in full[1] else full[1])
    eos_model = Transformer(tiny.config.replace(eos_id=stop)).eval()
    eos_model.load_state_dict(tiny.state_dict())
    assert generate(eos_model, prompts, max_new_tokens=16)[0] == out[0]


def test_stream_yields_the_same_tokens(tiny):
    prompts = _prompts(128, (6, 4))
    full = generate(tiny, prompts, max_new_tokens=10, stop_at_eos=False)
    steps = []
    for step in generate_stream(tiny, prompts, max_new_tokens=10, stop_at_eos=False):
        assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()  # nothing leaks into the loop
        steps.append(step)
    assert len(steps) == 10
    assert [[s.tokens[b] for s in steps] for b in range(2)] == full


def test_stop_strings(tmp_path):
    from mixlab.tokenizer import load_tokenizer

    tok = load_tokenizer()
    model = Transformer(get_preset("tiny-moe").replace(vocab_size=tok.vocab_size, max_seq_len=64)).eval()
    model.init_weights(std=0.3, seed=1)
    prompt = tok.encode("Once upon a time")
    full = generate(model, [prompt], max_new_tokens=20, stop_at_eos=False)[0]
    text = tok.decode(full)
    needle = text[len(text) // 2 : len(text) // 2 + 3]
    out = generate(model, [prompt], max_new_tokens=20, stop_at_eos=False, stop=[needle], tokenizer=tok)[0]
    assert out == full[: len(out)]
    assert needle in tok.decode(prompt[-4:] + out) and needle not in tok.decode(prompt[-4:] + out[:-1])
    # Step.text: the text the tokens complete, ending before the stop string (what the CLI prints)
    steps = list(generate_stream(model, [prompt], max_new_tokens=20, stop_at_eos=False, stop=[needle], tokenizer=tok))
    shown = "".join(s.text[0] for s in steps if s.text is not None)
    whole = tok.decode(prompt + out)[len(tok.decode(prompt)) :]
    assert len(steps) == len(out) and shown == whole[: whole.index(needle)]
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, [prompt], max_new_tokens=4, stop=["x"])


@pytest.mark.parametrize("cached", [False, True])
def test_recorded_experts_equal_full_forward(tiny, cached):
    """Each new token's own experts (its position in a full forward), the last token's too, through
    the engine and through a caller's cache."""
    prompts = _prompts(128, (5, 9))[: 1 if cached else 2]
    experts: list[torch.Tensor] = []
    cache = KVCache(tiny.config, batch_size=1, max_len=32) if cached else None
    tokens = generate(tiny, prompts, max_new_tokens=6, stop_at_eos=False, experts_out=experts, cache=cache)
    L, K = tiny.config.n_layers, tiny.config.moe.top_k
    for p, new, e in zip(prompts, tokens, experts, strict=True):
        assert e.shape == (len(new), L, K)
        seq = torch.tensor([p + new])
        with torch.no_grad():
            routings = tiny.forward_output(seq).routing
        for layer, r in enumerate(routings):
            assert torch.equal(e[:, layer], r.idx_TK[len(p) : len(p) + len(new)])


def test_empty_prompt_is_bos(tiny):
    a = generate(tiny, [[], [5, 6]], max_new_tokens=5, stop_at_eos=False)
    b = generate(tiny, [[tiny.config.bos_id], [5, 6]], max_new_tokens=5, stop_at_eos=False)
    assert a == b


def test_truncate_keeps_bos_and_the_end(tiny):
    ctx = tiny.config.max_seq_len
    long = [1] + _prompts(128, (ctx + 10,))[0]
    with pytest.raises(ValueError, match=rf"{len(long)} tokens.*{len(long) + 8} positions.*context is {ctx}"):
        generate(tiny, [long], max_new_tokens=8)
    out = generate(tiny, [long], max_new_tokens=8, truncate=True, stop_at_eos=False)
    kept = [1] + long[len(long) - (ctx - 8) + 1 :]
    assert len(kept) == ctx - 8
    assert out == generate(tiny, [kept], max_new_tokens=8, stop_at_eos=False)


BAD = [
    (dict(temperature=math.nan), "temperature=nan"),
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(temperature=math.inf), "temperature=inf"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_p=math.nan), "top_p=nan"),
    (dict(top_k=-2), "top_k=-2"),
    (dict(top_k=2.5), "top_k=2.5"),
    (dict(min_p=-0.1), "min_p=-0.1"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_new_tokens=-3), "max_new_tokens=-3"),
    (dict(max_new_tokens=64), "max_new_tokens=64 leaves no room"),
    (dict(seed="x"), "seed='x'"),
    (dict(prompts=[[5, 128]]), "token id 128 outside the model's vocabulary"),
    (dict(prompts=[[-1]]), "token id -1 outside"),
    (dict(prompts=[5, 6]), "prompt 0 must be a list"),
    (dict(prompts=[]), "non-empty list"),
    (dict(prompts="hello"), "tokenize text first"),
    (dict(prompts=[[1.5]]), "non-integer"),
    (dict(prompts=[list(range(60))]), "prompt 0 has 60 tokens.*68 positions.*context is 64"),
    (dict(stop=[500]), "stop item 500"),
    (dict(stop=[""]), "must not be empty"),
    (dict(prefill_chunk=0), "prefill_chunk=0"),
    (dict(tokenizer="tok", stop=["x"]), "takes a mixlab Tokenizer"),
    (dict(stop=["a\udce4"]), "stop string .* is not valid UTF-8: bytes e4 at character 1"),
]


@pytest.mark.parametrize("kw,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_fails_before_compute(tiny, kw, message, monkeypatch):
    def boom(*a, **k):  # any forward pass would mean validation came too late
        raise AssertionError("the model ran before the arguments were checked")

    monkeypatch.setattr(tiny, "forward", boom)
    args = dict(prompts=[[1, 5, 6]], max_new_tokens=8)
    args.update(kw)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        generate_stream(tiny, **args)  # eager: no iteration needed


def test_a_kept_cache_of_another_dtype_or_type_is_named(tiny):
    # A float32 KVCache (the default) with a bf16 model failed deep in attention on mixed dtypes.
    from mixlab.cache import KVCache

    bf16 = copy.deepcopy(tiny).to(torch.bfloat16)
    with pytest.raises(ValueError, match="torch.float32 keys.*dtype=torch.bfloat16"):
        generate(bf16, [[1, 5, 6]], max_new_tokens=4, cache=KVCache(bf16.config, batch_size=1, max_len=32))
    with pytest.raises(ValueError, match="KVCache, not str"):
        generate(tiny, [[1, 5, 6]], max_new_tokens=4, cache="cache")
    kept = KVCache(bf16.config, batch_size=1, max_len=32, dtype=torch.bfloat16)
    assert generate(bf16, [[1, 5, 6]], max_new_tokens=4, cache=kept) == generate(bf16, [[1, 5, 6]], max_new_tokens=4)


def test_a_kept_engine_without_a_tokenizer_and_stop_strings_fail_before_iterating():
    from mixlab.engine import Engine
    from mixlab.tokenizer import load_tokenizer

    model = Transformer(get_preset("tiny-moe").replace(vocab_size=32000))  # the tokenizer's vocabulary
    with pytest.raises(ValueError, match="need an engine made with a tokenizer"):  # it was raised by next()
        generate_stream(model, [[1, 5]], max_new_tokens=3, stop=["x"], tokenizer=load_tokenizer(), engine=Engine(model))


def test_another_models_tokenizer_is_refused(tiny):
    # Mixtral's 32000-token tokenizer over a 128-token model was accepted (the CLI refuses it): its text
    # of the model's ids is not the model's.
    from mixlab.engine import Engine
    from mixlab.tokenizer import load_tokenizer

    tok = load_tokenizer()
    for call in (lambda: Engine(tiny, tok), lambda: generate(tiny, [[1, 5]], max_new_tokens=2, tokenizer=tok)):
        with pytest.raises(ValueError, match="tokenizer= has 32000 tokens but the model's vocabulary has 128"):
            call()
    padded = Transformer(get_preset("tiny-moe").replace(vocab_size=32064))  # more: a padded vocabulary, fine
    assert len(generate(padded, [[1, 5]], max_new_tokens=2, stop_at_eos=False, tokenizer=tok)[0]) == 2


def test_record_experts_needs_moe():
    dense = Transformer(get_preset("tiny-dense")).eval()
    with pytest.raises(ValueError, match="needs a MoE model"):
        generate(dense, [[1]], max_new_tokens=2, experts_out=[])


def test_something_else_passed_as_the_model_is_named(tiny, tmp_path):
    # A path, a state dict or a transformers model as `model` failed with an AttributeError inside.
    from transformers import MixtralConfig, MixtralForCausalLM

    from mixlab.analysis import analyze
    from mixlab.engine import Engine
    from mixlab.eval import evaluate_texts, score_batch
    from mixlab.model.inference import prepare_for_inference

    hf = MixtralForCausalLM(MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, num_local_experts=2))
    calls = [lambda m: generate(m, [[1, 5]], max_new_tokens=2), lambda m: Engine(m), prepare_for_inference,
             lambda m: score_batch(m, [[1, 5]], [[5]]), lambda m: evaluate_texts(m, list, [], prefix=1),
             lambda m: analyze(m, None, tmp_path, out=tmp_path / "r")]
    for call in calls:
        for model, hint in (("runs/x", r"not str \(load it: mixlab.load_model\('runs/x'\)\)"),
                            (tiny.state_dict(), r"not OrderedDict \(a state dict: mixlab.from_state_dict\(state, conf"),
                            (hf, r"not MixtralForCausalLM \(a transformers model: mixlab.from_state_dict\(hf.state_")):
            with pytest.raises(ValueError, match=f"model must be a mixlab Transformer, {hint}"):
                call(model)
    with pytest.raises(ValueError, match=r"Transformer takes a mixlab ModelConfig, not str \(a preset: mixlab.get_pr"):
        Transformer("tiny-moe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weights are on the meta device"):  # was "unknown device type for autocast"
        generate(copy.deepcopy(tiny).to("meta"), [[1, 5]], max_new_tokens=2)
    compiled = torch.compile(tiny)  # forwards `config`: still accepted (the engine runs the module it wraps)
    assert generate(compiled, [[1, 5]], max_new_tokens=2) == generate(tiny, [[1, 5]], max_new_tokens=2)


def test_tensor_prompts(tiny):
    t = torch.tensor([[5, 6, 7], [8, 9, 10]])
    kw = dict(max_new_tokens=4, stop_at_eos=False)
    assert generate(tiny, t, **kw) == generate(tiny, t.tolist(), **kw) == generate(tiny, list(t), **kw)


def test_a_kept_cache_prefills_only_what_follows_the_shared_prefix(monkeypatch):
    """A chat's cache across turns: same tokens as generating from scratch, far fewer prefilled."""
    import importlib

    from mixlab.cache import KVCache
    from mixlab.config import get_preset
    from mixlab.model import Transformer

    gen = importlib.import_module("mixlab.generate")  # the module (mixlab.generate is also the function)
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny-moe"))
    model.init_weights(seed=0, std=0.1)
    model.eval()
    prefilled: list[int] = []
    real_prefill = gen.prefill
    monkeypatch.setattr(gen, "prefill",
                        lambda m, t, *a, **k: prefilled.append(t.shape[1]) or real_prefill(m, t, *a, **k))
    cache = KVCache(model.config, batch_size=1, max_len=64, reserve=4)  # grows as mixlab chat's does
    p1 = torch.randint(3, 256, (10,)).tolist()
    out1 = gen.generate(model, [p1], max_new_tokens=6, stop_at_eos=False, cache=cache)[0]
    p2 = p1 + out1 + torch.randint(3, 256, (5,)).tolist()
    out2 = gen.generate(model, [p2], max_new_tokens=6, stop_at_eos=False, cache=cache)[0]
    assert prefilled == [10, 6]  # the cache held p1 and the 5 generated tokens fed back; 1 + 5 new
    assert out2 == gen.generate(model, [p2], max_new_tokens=6, stop_at_eos=False)[0]
    p3 = p1[:4] + torch.randint(3, 256, (3,)).tolist()  # a different turn: only the first 4 are shared
    assert gen.generate(model, [p3], max_new_tokens=4, stop_at_eos=False, cache=cache) == \
        gen.generate(model, [p3], max_new_tokens=4, stop_at_eos=False)
    assert prefilled[-1] == 3  # (the runs without cache= go through the engine)
    assert 4 < cache.capacity < 64


def test_a_kept_rolling_cache_that_wrapped_starts_over():
    from mixlab.cache import KVCache
    from mixlab.config import get_preset
    from mixlab.generate import generate
    from mixlab.model import Transformer

    model = Transformer(get_preset("tiny-dense").replace(sliding_window=8))
    model.init_weights(seed=0, std=0.1)
    model.eval()
    cache = KVCache(model.config, batch_size=1, max_len=100, prefill_chunk=4)  # 11 slots
    p1 = torch.randint(3, 256, (9,)).tolist()
    out1 = generate(model, [p1], max_new_tokens=8, stop_at_eos=False, cache=cache, prefill_chunk=4)[0]
    assert cache.t > cache.capacity
    p2 = p1 + out1 + [5, 6]
    assert generate(model, [p2], max_new_tokens=5, stop_at_eos=False, cache=cache, prefill_chunk=4) == \
        generate(model, [p2], max_new_tokens=5, stop_at_eos=False, prefill_chunk=4)
    with pytest.raises(ValueError, match="single prompt"):
        generate(model, [p1, p1], max_new_tokens=2, cache=cache)
    with pytest.raises(ValueError, match="need"):
        generate(model, [p1], max_new_tokens=95, cache=cache)


def test_a_decoding_loop_of_ones_own_keeps_no_autograd_graph(tiny):
    # With grad mode on (the default) and a trainable model, each step's cache writes chained onto the
    # last: 400 greedy_step calls on a 2-layer model held ~100 MB of activations and ran 2x slower.
    from mixlab.cache import KVCache
    from mixlab.generate import decode_step, greedy_step, prefill

    assert torch.is_grad_enabled() and tiny.output.weight.requires_grad
    cache = KVCache(tiny.config, batch_size=1, max_len=32)
    logits, _ = prefill(tiny, torch.tensor([[1, 5, 6]]), torch.arange(3)[None], cache, chunk=2)
    token = greedy_step(tiny, int(logits.argmax()), 3, cache)
    logits, _ = decode_step(tiny, torch.tensor([[token]]), torch.tensor([[4]]), cache)
    assert not logits.requires_grad
    assert not any(t.requires_grad for t in cache.k + cache.v)
    assert torch.is_grad_enabled()


def test_numpy_prompts(tiny):
    import numpy as np

    ids = np.array([[5, 6, 7], [8, 9, 10]], dtype=np.int64)
    kw = dict(max_new_tokens=4, stop_at_eos=False)
    assert generate(tiny, ids, **kw) == generate(tiny, ids.tolist(), **kw) == generate(tiny, list(ids), **kw)
    with pytest.raises(ValueError, match="non-integer"):
        generate(tiny, [np.array([1.5, 2.0])], **kw)
