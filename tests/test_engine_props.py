"""Property-based tests of the engine (hypothesis, derandomized): random workloads on seeded tiny MoEs
(float32, with and without a sliding window smaller than the sequences; one whose greedy outputs
cycle, so that speculative drafts are accepted; int8 and int4 weights; experts offloaded; bf16 under
batch-invariant kernels; one over the bytes tokenizer whose requests may have structured outputs).
A workload is 1-8 requests (fresh prompts, empty ones, ones up to the context's end, copies of
another's and `n` samples of another request, another's prefix with tokens of its own, another's
prompt and greedy output with tokens of its own (a chat's next turn), prompts that repeat
themselves), each with random `SamplingParams` (greedy or seeded sampling, max/min tokens, stop
strings and ids, penalties, logit bias, logprobs and alternatives, prompt logprobs, experts,
speculative tokens, ignore_eos, decode_alone, a LoRA adapter, a constraint), an arrival step and
maybe a cancel step, run by `step()` from this thread on an engine with random settings (max_batch,
small prefill chunks and token budgets, fewer cache slots than max_batch, prefix reuse on or off,
batch-invariant kernels).

The property is the engine's promise: every request's outputs (token ids, text, finish and stop
reasons, logprobs, alternatives, prompt logprobs, experts, token counts) equal those of the same
request run alone in a fresh engine with max_batch 1; a cancelled request's, a prefix of them. Up to
float32 rounding (the kernels a step picks depend on its token count; TOLERANCE), bit for bit with
`batch_invariant=True`. Afterwards no slot, queue entry or request is left.
More examples search further: `MIXLAB_PROPS_EXAMPLES=500` (derandomized: the same ones each run), and
new ones at each run with `MIXLAB_PROPS_SEARCH=1`.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mixlab import load_model, load_tokenizer, save_model  # noqa: E402
from mixlab.config import get_preset  # noqa: E402
from mixlab.engine import Engine, RequestOutput, SamplingParams, Structured  # noqa: E402
from mixlab.engine.runner import bytes_per_token  # noqa: E402
from mixlab.model import Transformer  # noqa: E402
from mixlab.model.inference import prepare_for_inference  # noqa: E402
from mixlab.ops import native  # noqa: E402
from mixlab.ops.offload import SlotFormat  # noqa: E402
from mixlab.tokenizer import StreamDecoder  # noqa: E402
from mixlab.train.lora import LoraConfig, apply_lora, save_peft  # noqa: E402

V = 24  # a small vocabulary: greedy outputs repeat (drafts are accepted), EOS and stop ids come up
CTX = 64
WINDOW = 6
# each token's text: the special tokens none, the others one to three characters, so that stop
# strings begin, end and hide inside tokens
PIECES = ["", "", "", "a", "b", "c", "ab", "ba", " ", "x", "abc", "\n", "a b", "y", "bb", "ca", "z", ".",
          "b a", "c", "ac", "xy", " a", "q"]
STOPS = ["a", "b", "ab", "ba", "c a", "bb", "xy", ".", "q", "a b"]
# float32 logprobs of one row through the kernels of other token counts: this model (weights of std 0.5)
# moves its logprobs by ~1e-4 when its weights move by float32's rounding (6e-8 relative), so the same
# prompt differs by up to ~3e-4 between a prefill in chunks of 1 and in one piece
TOLERANCE = 1e-3


class PieceTokenizer:
    """A toy tokenizer (`Engine` needs `stream` and `vocab_size`): token i's text is PIECES[i]."""

    vocab_size = V

    def decode(self, ids: list[int]) -> str:
        return "".join(PIECES[i] for i in ids)

    def stream(self, *, context: tuple[int, ...] | list[int] = ()) -> StreamDecoder:
        return StreamDecoder(self, context=context)  # type: ignore[arg-type]


TOK = PieceTokenizer()


def _model(window: int | None, dtype: torch.dtype = torch.float32, tok: Any = TOK) -> tuple[Transformer, Any]:
    cfg = get_preset("tiny-moe").replace(vocab_size=tok.vocab_size, max_seq_len=CTX, sliding_window=window)
    model = Transformer(cfg).eval()
    model.init_weights(std=0.5, seed=0)  # peaked, varied next-token distributions
    return model.to(dtype), tok


# batch_invariant=True needs the native kernels vectorised for the dtype (it refuses to run otherwise)
INVARIANT = {dt: native.load() is not None and native.fast(dt) for dt in (torch.float32, torch.bfloat16)}
MODELS = {"plain": _model(None), "windowed": _model(WINDOW)}  # name -> (model, tokenizer)
if INVARIANT[torch.bfloat16]:  # bf16 rounds differently between batch sizes (core.py's docstring): invariant only
    MODELS["bf16"] = _model(WINDOW, torch.bfloat16)
MODELS["markov"] = _model(WINDOW)  # attention's output zeroed: each token a function of the last one, so greedy
with torch.no_grad():  # outputs fall into short cycles, which speculative drafts predict (and get accepted)
    for block in MODELS["markov"][0].layers:
        block.attn.wo.weight.zero_()
# The quantised formats' kernels. int4 with exact activations: by default its native steps round them to int8
# per block, which turns the last-bit differences between kernels (a prompt in chunks of 1 or in one piece)
# into a whole int8 step now and then: a logprob moved by 0.015 (test_engine_lora holds its base rows to
# their runs alone beside adapter rows)
MODELS["int8"] = prepare_for_inference(copy.deepcopy(MODELS["plain"][0]), quant="int8"), TOK
MODELS["int4"] = prepare_for_inference(copy.deepcopy(MODELS["plain"][0]), quant="int4", int4_activations="float32"), TOK
if find_spec("llguidance") is not None:  # structured outputs: over a real tokenizer, one token a byte
    MODELS["bytes"] = _model(None, tok=load_tokenizer("bytes"))
# the constraints a "bytes" request may have: finite ones, open ones, a JSON object (the outputs mostly
# end where max_tokens cuts them, or where the constraint is complete, or where it fails)
CONSTRAINTS = [("choice", ["yes", "no", "a b c"]), ("regex", "[ab]{2,6}x?"), ("regex", "(ab|c )+"),
               ("json_object", None), ("grammar", 'start: "x" ("a" | "b")* "."')]
ADAPTERS: dict[str, Path] = {}  # LoRA adapters over the float32 models (the `on_disk` fixture writes them)
NO_INVARIANT = {"int8", "int4", "offloaded"}  # formats batch_invariant=True refuses
NO_ADAPTERS = {"bytes", "offloaded"}  # (another vocabulary; an adapter's steps need resident experts)


@pytest.fixture(scope="module", autouse=True)
def on_disk(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two PEFT adapters of the float32 models (random non-zero B): every target, and attention alone;
    and the plain model with its experts offloaded (`load_model(max_memory=)`: 3 of its 8 in memory)."""
    root = tmp_path_factory.mktemp("props")
    plain = MODELS["plain"][0]
    save_model(plain, root / "plain")
    cfg = plain.config
    budget = 3 * SlotFormat("plain", torch.float32).expert_bytes(cfg.dim, cfg.ffn_dim)
    MODELS["offloaded"] = prepare_for_inference(load_model(root / "plain", max_memory=budget)), TOK
    for name, targets, seed in (("a", ("attention", "experts", "router"), 1), ("b", ("attention",), 2)):
        m = apply_lora(copy.deepcopy(plain), LoraConfig(rank=2, alpha=4, targets=targets))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        save_peft(m, root / name, expert_layout="fused")
        ADAPTERS[name] = root / name


@dataclass
class Request:
    prompt: list[int]
    params: dict[str, Any]  # SamplingParams' fields (a fresh SamplingParams per engine)
    arrive: int  # the step before which it is submitted
    cancel: int | None  # the step before which it is cancelled (None: never)


@dataclass
class Workload:
    model: str
    max_batch: int
    slots: int  # cache slots (cache_bytes holds this many sequences): fewer than max_batch makes requests wait
    prefill_chunk: int
    token_budget: int
    prefix_cache: bool
    batch_invariant: bool
    requests: list[Request]

    def engine(self, *, alone: bool = False) -> Engine:
        model, tok = MODELS[self.model]
        served = ADAPTERS if any(r.params.get("adapter") for r in self.requests) else None
        if alone:  # the reference: the request by itself (with invariant kernels, its slots' layout too)
            kw: dict[str, Any] = dict(max_batch=1, prefix_cache=False)
            if self.batch_invariant:
                kw.update(prefill_chunk=self.prefill_chunk, token_budget=self.token_budget, batch_invariant=True)
            return Engine(model, tok, max_seq_len=CTX, adapters=served, **kw)
        window = model.config.sliding_window
        capacity = CTX if window is None else min(CTX, window + min(self.prefill_chunk, self.token_budget) - 1)
        return Engine(model, tok, max_batch=self.max_batch, max_seq_len=CTX,
                      cache_bytes=self.slots * capacity * bytes_per_token(model), prefill_chunk=self.prefill_chunk,
                      token_budget=self.token_budget, prefix_cache=self.prefix_cache,
                      batch_invariant=self.batch_invariant, adapters=served)


@torch.no_grad()
def greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """`prompt` and its n greedy tokens, recomputed from scratch (no cache)."""
    ids = list(prompt) or [model.config.bos_id]
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


@st.composite
def prompts(draw: st.DrawFn, earlier: list[list[int]], model: Transformer) -> list[int]:
    tokens = st.integers(3, model.config.vocab_size - 1)
    kinds = ["fresh", "repeats", "long", "empty"] + (["same", "prefix", "reply"] if earlier else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "empty":  # [bos], as generate reads it
        return []
    if kind == "long":  # up to the context's end (the output too): the last positions of a static slot
        return draw(st.lists(tokens, min_size=CTX - 17, max_size=CTX - 1))
    if kind == "same":  # one prompt again
        return list(draw(st.sampled_from(earlier)))
    if kind == "prefix":  # a shared system prompt, say: another's first tokens, then its own
        other = draw(st.sampled_from(earlier))
        return (other[: draw(st.integers(0, len(other)))] + draw(st.lists(tokens, max_size=12)))[: CTX - 1]
    if kind == "reply":  # a chat's next turn: another prompt, its greedy output, then tokens of its own
        other = greedy(model, draw(st.sampled_from(earlier)), draw(st.integers(1, 10)))
        return (other + draw(st.lists(tokens, max_size=6)))[: CTX - 1]
    if kind == "repeats":  # a motif repeated: prompt lookup's drafts find it
        motif = draw(st.lists(tokens, min_size=1, max_size=4))
        return (motif * 12)[: draw(st.integers(len(motif), 36))]
    return draw(st.lists(tokens, min_size=1, max_size=draw(st.sampled_from([4, 12, 24, 36]))))


@st.composite
def sampling(draw: st.DrawFn, prompt_len: int, vocab: int, adapters: bool, structured: bool) -> dict[str, Any]:
    max_tokens = draw(st.integers(1, min(16, CTX - max(prompt_len, 1))))
    p: dict[str, Any] = dict(max_tokens=max_tokens, ignore_eos=draw(st.booleans()))
    if draw(st.booleans()):  # seeded sampling (a request's own generator)
        p.update(temperature=draw(st.sampled_from([0.6, 1.0, 1.5])), seed=draw(st.integers(0, 2**63)),
                 top_k=draw(st.sampled_from([0, 0, 3])), top_p=draw(st.sampled_from([1.0, 1.0, 0.9])),
                 min_p=draw(st.sampled_from([0.0, 0.0, 0.05])))
    if draw(st.integers(0, 3)) == 0:
        p["min_tokens"] = draw(st.integers(0, max_tokens))
    if draw(st.integers(0, 2)) == 0:
        p["stop"] = draw(st.lists(st.sampled_from(STOPS), min_size=1, max_size=2, unique=True))
    if draw(st.integers(0, 3)) == 0:
        p["stop_token_ids"] = draw(st.lists(st.integers(3, vocab - 1), min_size=1, max_size=2))
    if draw(st.integers(0, 3)) == 0:
        p.update(repetition_penalty=draw(st.sampled_from([1.0, 1.3, 0.8])), presence_penalty=draw(st.sampled_from(
            [0.0, 0.5])), frequency_penalty=draw(st.sampled_from([0.0, 0.3])))
    if draw(st.integers(0, 4)) == 0:
        biases = st.sampled_from([-100.0, -2.0, 3.0])
        p["logit_bias"] = draw(st.dictionaries(st.integers(0, vocab - 1), biases, max_size=2))
    p["logprobs"] = draw(st.sampled_from([None, None, 0, 1, 3, 5]))
    p["prompt_logprobs"] = draw(st.integers(0, 3)) == 0
    p["return_experts"] = draw(st.integers(0, 3)) == 0
    p["speculative_tokens"] = draw(st.sampled_from([0, 0, 2, 4]))
    p["decode_alone"] = draw(st.integers(0, 4)) == 0
    if adapters:
        p["adapter"] = draw(st.sampled_from([None, "a", "b"]))
    if structured and draw(st.booleans()):
        p["structured"] = Structured(*draw(st.sampled_from(CONSTRAINTS)))
    return p


@st.composite
def workloads(draw: st.DrawFn, *, offloaded: bool = False) -> Workload:
    """`offloaded`: on the model whose experts are offloaded (its steps are slower: a test of its own),
    else on any other."""
    model = "offloaded" if offloaded else draw(st.sampled_from(sorted(set(MODELS) - {"offloaded"})))
    vocab, dtype = MODELS[model][1].vocab_size, MODELS[model][0].tok_embeddings.weight.dtype
    invariant = INVARIANT[dtype] and model not in NO_INVARIANT and (model == "bf16" or draw(st.integers(0, 4)) == 0)
    max_batch, chunk = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    w = Workload(model, max_batch, slots=draw(st.integers(1, max_batch)), prefill_chunk=chunk,
                 token_budget=draw(st.integers(max(chunk - 2, 1), 16)), prefix_cache=draw(st.integers(0, 3)) > 0,
                 batch_invariant=invariant, requests=[])
    adapters = not invariant and model not in NO_ADAPTERS and draw(st.integers(0, 3)) == 0  # (invariant: none)
    for _ in range(draw(st.integers(1, 8))):
        arrive = draw(st.integers(0, 12))
        cancel = arrive + draw(st.integers(0, 20)) if draw(st.integers(0, 5)) == 0 else None
        if w.requests and draw(st.integers(0, 5)) == 0:  # another sample of an earlier request (`n`, the server's
            other = draw(st.sampled_from(w.requests))  # seeds: seed + choice)
            seed = other.params.get("seed")
            params = {**other.params, "seed": None if seed is None else (seed + 1) % 2**63}
            w.requests.append(Request(list(other.prompt), params, arrive, cancel))
            continue
        prompt = draw(prompts([r.prompt for r in w.requests], MODELS[model][0]))
        params = draw(sampling(len(prompt), vocab, adapters, structured=model == "bytes"))
        w.requests.append(Request(prompt, params, arrive, cancel))
    return w


def run(w: Workload, *, thread: bool = False) -> list[list[RequestOutput]]:
    """Each request's outputs, the engine driven by `step()` from this thread, submissions and cancels
    between steps (`thread`: by its own thread, submissions and cancels ~1 ms per step apart, as they
    come); then the engine holds nothing."""
    eng = w.engine()
    handles: dict[int, Any] = {}
    if thread:
        with eng:
            events = sorted([(r.arrive, 0, i) for i, r in enumerate(w.requests)] +
                            [(r.cancel, 1, i) for i, r in enumerate(w.requests) if r.cancel is not None])
            start = time.monotonic()
            for at, cancel, i in events:
                time.sleep(max(0.0, start + at / 1000 - time.monotonic()))
                if cancel:
                    handles[i].cancel()
                else:
                    handles[i] = eng.submit(w.requests[i].prompt, SamplingParams(**w.requests[i].params))
            outs = [[] for _ in w.requests]
            while not all(h.finished for h in handles.values()):  # (bounded: a request that never ends fails)
                assert time.monotonic() < start + 120, "a request never finished"
                for i, h in handles.items():
                    outs[i] += h.poll()
                time.sleep(0.001)
    else:
        step = 0
        while len(handles) < len(w.requests) or eng.has_work():
            for i, r in enumerate(w.requests):
                if i not in handles and r.arrive <= step:
                    handles[i] = eng.submit(r.prompt, SamplingParams(**r.params))
                if r.cancel == step and i in handles:
                    handles[i].cancel()
            eng.step()
            step += 1
            assert step < 1000, "the engine stopped making progress"
        outs = [handles[i].poll() for i in range(len(w.requests))]
    stats = eng.stats()
    assert stats["running"] == stats["waiting"] == stats["cache_used_bytes"] == 0
    if stats["accepted_tokens"]:
        event("speculative tokens accepted")
    assert not eng._live and not eng.runner.n_slots - len(eng.runner.free_slots)
    return outs


def alone(w: Workload, r: Request) -> list[RequestOutput]:
    eng = w.engine(alone=True)
    h = eng.submit(r.prompt, SamplingParams(**r.params))
    eng.run_until_idle()
    return h.poll()


FIELDS = ("token_id", "text", "finish_reason", "stop_reason", "error", "prompt_tokens", "completion_tokens",
          "experts", "logprob", "top_logprobs", "prompt_logprobs", "prompt_top_logprobs")


def close(a: object, b: object, exact: bool) -> bool:
    """Equal, floats within TOLERANCE unless `exact` (lists and tuples element by element)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (not exact and math.isclose(a, b, rel_tol=0, abs_tol=TOLERANCE))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(close(x, y, exact) for x, y in zip(a, b, strict=True))
    return a == b


def differences(got: RequestOutput, want: RequestOutput, exact: bool, skip: tuple[str, ...] = ()) -> list[str]:
    return [f"{f}: {getattr(got, f)!r} != {getattr(want, f)!r}" for f in FIELDS
            if f not in skip and not close(getattr(got, f), getattr(want, f), exact)]


def check(w: Workload, together: list[RequestOutput], want: list[RequestOutput]) -> None:
    exact = w.batch_invariant
    assert together and together[-1].finish_reason is not None
    if together[-1].finish_reason != "cancelled":
        assert len(together) == len(want), (len(together), len(want))
        for j, (g, x) in enumerate(zip(together, want, strict=True)):
            assert not (d := differences(g, x, exact)), f"output {j}: {d}"
        return
    # cancelled: its outputs so far are a prefix of the request's alone (the last one's experts may be
    # missing: they come with the step that never ran), then an output without a token
    *body, last = together
    assert len(body) < len(want) or want[-1].finish_reason is not None
    for j, (g, x) in enumerate(zip(body, want, strict=False)):
        skip = ("experts",) if j == len(body) - 1 and g.experts is None else ()
        assert not (d := differences(g, x, exact, skip)), f"output {j}: {d}"
    assert last.token_id is None and last.completion_tokens == len(body)
    if last.prompt_logprobs is not None:  # cancelled before its first token: the prompt logprobs computed so far
        assert not body and close(last.prompt_logprobs, want[0].prompt_logprobs[: len(last.prompt_logprobs)], exact)


def check_workload(w: Workload, *, thread: bool = False) -> None:
    outs = run(w, thread=thread)
    for got in outs:  # what the workloads reach (pytest --hypothesis-show-statistics)
        event(f"finish {got[-1].finish_reason}")
        if got[-1].cached_tokens:
            event("prompt tokens from the cache")
        # prompt tokens taken from the cache: never all of them (the last one's logits are computed)
        assert {o.cached_tokens for o in got} <= {0} if not w.prefix_cache else set(range(got[0].prompt_tokens))
    if any("structured" in r.params for r in w.requests):
        event("structured outputs")
    for i, (r, got) in enumerate(zip(w.requests, outs, strict=True)):
        try:
            check(w, got, alone(w, r))
        except AssertionError as e:
            raise AssertionError(f"request {i} ({r}): {e}") from None


EXAMPLES = int(os.environ.get("MIXLAB_PROPS_EXAMPLES", "60"))
SEARCH = os.environ.get("MIXLAB_PROPS_SEARCH") == "1"  # new random workloads at each run, not the fixed ones
SETTINGS = settings(max_examples=EXAMPLES, derandomize=not SEARCH, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(workloads())
def test_every_request_equals_its_run_alone(w: Workload) -> None:
    check_workload(w)


@settings(SETTINGS, max_examples=max(EXAMPLES // 3, 1))
@given(workloads())
def test_every_request_equals_its_run_alone_from_the_engine_thread(w: Workload) -> None:
    """The same, the engine on its own thread: whatever the steps its submissions and cancels fall
    between (they differ from run to run), each request's outputs are its run alone's."""
    check_workload(w, thread=True)


@settings(SETTINGS, max_examples=max(EXAMPLES // 3, 1))
@given(workloads(offloaded=True))
def test_every_request_equals_its_run_alone_with_offloaded_experts(w: Workload) -> None:
    """The same with the experts offloaded (3 of 8 in the expert cache, read as the steps need them)."""
    check_workload(w)
