"""Several LoRA adapters served over one base (`adapter_factors`, `Engine(adapters=)`,
`SamplingParams(adapter=)`): a batch mixing base and adapter requests gives each what it gives alone
on the model with its adapter merged, and no request reuses keys computed under another adapter."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from mixlab.checkpoint import CheckpointError, adapter_factors, merge_adapter
from mixlab.config import get_preset
from mixlab.engine import Engine, SamplingParams
from mixlab.model import Transformer
from mixlab.train.lora import LoraConfig, apply_lora, save_peft

CFG = get_preset("tiny-moe").replace(vocab_size=128, max_seq_len=128)
GREEDY = dict(max_tokens=8, logprobs=0, ignore_eos=True)
# float32 logprobs of one request differ by up to ~3e-5 between a step of its own (the native kernels) and
# a batched PyTorch step, base rows as much as adapter rows
ATOL = 5e-5


def _base(cfg=CFG) -> Transformer:
    model = Transformer(cfg).eval()
    model.init_weights(std=0.5, seed=0)
    return model


def _adapter(base: Transformer, path: Path, *, rank: int, targets: tuple[str, ...], layout: str, seed: int) -> Path:
    """mixlab's own LoRA over `base` with random non-zero B, written as a PEFT folder."""
    m = apply_lora(copy.deepcopy(base), LoraConfig(rank=rank, alpha=2 * rank, targets=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_peft(m, path, expert_layout=layout if base.config.moe else None)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Transformer, dict[str, Path]]:
    """The base and two adapters: every target in transformers >= 5's fused layout, and attention +
    experts (no router) of another rank in the per-expert module layout."""
    root = tmp_path_factory.mktemp("lora")
    base = _base()
    return base, {"a": _adapter(base, root / "a", rank=4, targets=("attention", "experts", "router"),
                                layout="fused", seed=1),
                  "b": _adapter(base, root / "b", rank=2, targets=("attention", "experts"), layout="modules", seed=2)}


def _merged(base: Transformer, adapters: dict[str, Path]) -> dict[str | None, Transformer]:
    return {None: base, **{n: merge_adapter(copy.deepcopy(base), p) for n, p in adapters.items()}}


def _alone(model: Transformer, prompt: list[int], params: SamplingParams):
    """The request's outputs on an engine of its own (a step of one request at a time)."""
    with torch.inference_mode():
        engine = Engine(model, max_batch=1)
        h = engine.submit(prompt, params)
        engine.run_until_idle()
        return h.result()


def _tokens_and_logprobs(outs):
    return [o.token_id for o in outs if o.token_id is not None], [o.logprob for o in outs if o.token_id is not None]


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def test_factors_are_the_merged_update(setup) -> None:
    """y + (x A^T) B^T equals x times the merged weight, for every adapted weight and expert."""
    base, adapters = setup
    for name, path in adapters.items():
        merged = dict(merge_adapter(copy.deepcopy(base), path).named_parameters())
        plain = dict(base.named_parameters())
        factors = adapter_factors(base, path)
        assert any(".experts.w13" in k for k in factors) and any(".attn.wqkv" in k for k in factors)
        assert any(k.endswith("gate.weight") for k in factors) == (name == "a")
        for k, lr in factors.items():
            torch.testing.assert_close(plain[k] + lr.B @ lr.A, merged[k], rtol=0, atol=1e-6, msg=k)
        untouched = [k for k in plain if k not in factors]
        assert all(torch.equal(plain[k], merged[k]) for k in untouched)


def test_factors_refuse_what_merge_refuses(setup, tmp_path: Path) -> None:
    base, adapters = setup
    other = _base(CFG.replace(dim=32, n_heads=2, n_kv_heads=1))
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors.*do not fit"):
        adapter_factors(other, adapters["a"])
    with pytest.raises(CheckpointError, match="no such adapter folder"):
        Engine(base, adapters={"x": tmp_path / "missing"})


@pytest.mark.parametrize("window", [None, 6])
def test_a_mixed_batch_gives_each_request_its_merged_models_output(setup, window: int | None) -> None:
    """Base, adapter-a and adapter-b requests of different prompt lengths, prefilled in chunks beside
    each other's decoding steps, each equal its run alone on the model with its adapter merged (and
    with a sliding window: rolling cache slots)."""
    base, adapters = setup
    if window is not None:
        windowed = Transformer(CFG.replace(sliding_window=window)).eval()
        windowed.load_state_dict(base.state_dict())
        base = windowed
    merged = _merged(base, adapters)
    prompts = _prompts([5, 23, 40, 9, 31, 17])
    names = [None, "a", "b", "a", None, "b"]
    engine = Engine(base, max_batch=6, token_budget=24, prefill_chunk=8, adapters=adapters)
    handles = []
    for i, (prompt, name) in enumerate(zip(prompts, names, strict=True)):
        handles.append(engine.submit(prompt, SamplingParams(**GREEDY, adapter=name)))
        if i % 2:
            engine.step()  # later requests join while earlier ones prefill or decode
    engine.run_until_idle()
    outs = {}
    for prompt, name, h in zip(prompts, names, handles, strict=True):
        got, got_lp = _tokens_and_logprobs(h.result())
        want, want_lp = _tokens_and_logprobs(_alone(merged[name], prompt, SamplingParams(**GREEDY)))
        assert got == want, name
        torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(want_lp), rtol=0, atol=ATOL)
        outs[name, tuple(prompt)] = got
    # the adapters change the outputs: the test would notice them ignored
    for prompt in prompts[:3]:
        alone = {n: _tokens_and_logprobs(_alone(merged[n], prompt, SamplingParams(**GREEDY)))[1] for n in merged}
        assert alone[None] != alone["a"] and alone[None] != alone["b"] and alone["a"] != alone["b"]


def test_prompt_logprobs_and_a_dense_model(tmp_path: Path) -> None:
    """A dense model's FFN adapters, and prompt logprobs (every row's logits) under an adapter."""
    base = _base(CFG.replace(moe=None))
    path = _adapter(base, tmp_path / "d", rank=3, targets=("attention", "experts"), layout="fused", seed=3)
    merged = merge_adapter(copy.deepcopy(base), path)
    prompt = _prompts([19])[0]
    params = dict(max_tokens=4, logprobs=2, prompt_logprobs=True, ignore_eos=True)
    engine = Engine(base, max_batch=2, prefill_chunk=8, adapters={"d": path})
    h = [engine.submit(prompt, SamplingParams(**params, adapter=a)) for a in ("d", None)]
    engine.run_until_idle()
    for handle, model in zip(h, (merged, base), strict=True):
        got, want = handle.result(), _alone(model, prompt, SamplingParams(**params))
        assert [o.token_id for o in got] == [o.token_id for o in want]
        lp = [x for x in got[0].prompt_logprobs[1:]]
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(want[0].prompt_logprobs[1:]), rtol=0, atol=ATOL)


def test_an_unknown_adapter_is_named_with_the_known_ones(setup) -> None:
    base, adapters = setup
    engine = Engine(base, adapters=adapters)
    with pytest.raises(ValueError, match=r"unknown adapter 'c': this engine's adapters are 'a', 'b'"):
        engine.submit([5, 6], SamplingParams(adapter="c"))
    with pytest.raises(ValueError, match=r"unknown adapter 'a': this engine's adapters are none"):
        Engine(base).submit([5, 6], SamplingParams(adapter="a"))
    with pytest.raises(ValueError, match=r"invalid adapter=''"):
        SamplingParams(adapter="")
    with pytest.raises(ValueError, match=r"adapter 'a': batch_invariant=True"):
        Engine(base, adapters={"a": adapters["a"]}, batch_invariant=True)


def test_offloaded_experts_are_refused_naming_the_adapter(setup, tmp_path: Path) -> None:
    from mixlab import load_model, save_model

    base, adapters = setup
    save_model(base, tmp_path / "base")
    offloaded = load_model(tmp_path / "base", max_memory="1MB")
    with pytest.raises(ValueError, match=r"adapter 'a': the model's experts are offloaded \(load_model\(max_memory"):
        Engine(offloaded, adapters=adapters)


# -- prefix reuse never crosses adapters ------------------------------------------------------------


def _one(engine: Engine, prompt: list[int], name: str | None, **kw):
    h = engine.submit(prompt, SamplingParams(**{**GREEDY, **kw}, adapter=name))
    engine.run_until_idle()
    return h.result()


@pytest.mark.parametrize("order", [(None, "a"), ("a", None), ("a", "b"), ("b", "a")])
def test_a_free_slots_prefix_is_reused_only_under_its_adapter(setup, order) -> None:
    """The same prompt under one adapter (or the base), then under another: the second computes its
    keys itself and gives its own merged model's output; under the same adapter again it reuses them."""
    base, adapters = setup
    merged = _merged(base, adapters)
    prompt = _prompts([30], seed=4)[0]
    engine = Engine(base, max_batch=2, adapters=adapters)
    first, second = order
    _one(engine, prompt, first)
    out = _one(engine, prompt, second)
    assert out[-1].cached_tokens == 0
    assert _tokens_and_logprobs(out)[0] == _tokens_and_logprobs(_alone(merged[second], prompt,
                                                                       SamplingParams(**GREEDY)))[0]
    again = _one(engine, prompt, second)
    assert again[-1].cached_tokens == len(prompt) - 1  # the control: reuse under one adapter still works
    assert _tokens_and_logprobs(again)[0] == _tokens_and_logprobs(out)[0]


@pytest.mark.parametrize("names", [(None, "a"), ("a", "b"), ("a", "a")])
def test_a_running_prompt_is_shared_only_under_its_adapter(setup, names) -> None:
    """Two requests of one long prompt submitted together: the second copies the first's keys
    (`copy_prefix`, waiting for them) only when both run under the same adapter."""
    base, adapters = setup
    merged = _merged(base, adapters)
    prompt = _prompts([60], seed=5)[0]
    engine = Engine(base, max_batch=2, prefill_chunk=16, adapters=adapters)
    hs = [engine.submit(prompt, SamplingParams(**GREEDY, adapter=n)) for n in names]
    engine.run_until_idle()
    outs = [h.result() for h in hs]
    assert outs[1][-1].cached_tokens == (len(prompt) - 1 if names[0] == names[1] else 0)
    for name, out in zip(names, outs, strict=True):
        want = _alone(merged[name], prompt, SamplingParams(**GREEDY))
        assert _tokens_and_logprobs(out)[0] == _tokens_and_logprobs(want)[0]


def test_scored_prompts_are_reused_only_under_their_adapter(setup) -> None:
    """prompt_logprobs requests take an ended request's logprobs with its keys: never another adapter's."""
    base, adapters = setup
    merged = _merged(base, adapters)
    context, ending = _prompts([20, 4], seed=6)
    engine = Engine(base, max_batch=2, adapters=adapters)
    kw = dict(max_tokens=1, prompt_logprobs=True)
    _one(engine, context + ending[:2], None, **kw)
    out = _one(engine, context + ending, "a", **kw)
    assert out[0].cached_tokens == 0
    want = _alone(merged["a"], context + ending, SamplingParams(**GREEDY, prompt_logprobs=True))
    torch.testing.assert_close(torch.tensor(out[0].prompt_logprobs[1:]), torch.tensor(want[0].prompt_logprobs[1:]),
                               rtol=0, atol=ATOL)


def test_a_peft_adapter_gives_peft_logprobs(tmp_path: Path) -> None:
    """The real peer: PEFT's LoRA (attention modules, fused experts and router as target_parameters) on the
    transformers model gives the engine's adapter rows' prompt logprobs."""
    from test_adapter import ATTN, EXPERTS_ROUTER, _hf_base, _peft

    hf = _hf_base(tmp_path)
    pm = _peft(hf, tmp_path / "adapter", target_modules=ATTN, target_parameters=EXPERTS_ROUTER)
    from mixlab import load_model

    base = load_model(tmp_path / "base")
    engine = Engine(base, max_batch=2, adapters={"p": tmp_path / "adapter"})
    prompt = _prompts([16], seed=7)[0]
    hs = [engine.submit(prompt, SamplingParams(max_tokens=1, prompt_logprobs=True, adapter=n)) for n in ("p", None)]
    engine.run_until_idle()
    got, plain = (torch.tensor(h.result()[0].prompt_logprobs[1:]) for h in hs)
    with torch.no_grad():
        lp = torch.log_softmax(pm(input_ids=torch.tensor([prompt])).logits[0].float(), dim=-1)
    want = lp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert (got - plain).abs().max() > 1e-2


@pytest.mark.parametrize("quant", ["int8", "int4", "packed"])
def test_a_quantised_base_serves_adapters(setup, quant: str) -> None:
    """--quant: the adapters' updates go on the quantised products (weights and experts in any resident
    format go through `ops.linear`): each request gets the dequantised weights with its adapter merged.
    The same for oneDNN-packed weights (`prepare_for_inference(packed=True)`), whose floats are the base's.
    (int4 with exact activations: by default the base's native steps round them to int8, the test below.)"""
    from mixlab.model.formats import Int4Experts, Int8Experts
    from mixlab.model.inference import inference_format, prepare_for_inference
    from mixlab.ops.quant import Int4Linear, Int8Linear, dequantize

    base, adapters = setup
    q = prepare_for_inference(copy.deepcopy(base), quant=None if quant == "packed" else quant,
                              packed=True if quant == "packed" else None,
                              int4_activations="float32" if quant == "int4" else None)
    assert inference_format(q) == quant
    deq = copy.deepcopy(base)  # the float model of q's weights
    held = dict(deq.named_modules())
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, Int8Linear | Int4Linear):
                held[name].weight.copy_(dequantize(m.weight, m.scale, torch.float32))
            elif isinstance(m, Int8Experts | Int4Experts):
                for w in ("w13", "w2"):
                    getattr(held[name], w).copy_(dequantize(getattr(m, w), getattr(m, w + "_scale"), torch.float32))
    merged = _merged(deq, adapters)
    prompts = _prompts([12, 21, 7], seed=8)
    names = [None, "a", "b"]
    engine = Engine(q, max_batch=3, prefill_chunk=8, adapters=adapters)
    hs = [engine.submit(p, SamplingParams(**GREEDY, adapter=n)) for p, n in zip(prompts, names, strict=True)]
    engine.run_until_idle()
    for prompt, name, h in zip(prompts, names, hs, strict=True):
        got, got_lp = _tokens_and_logprobs(h.result())
        want, want_lp = _tokens_and_logprobs(_alone(merged[name], prompt, SamplingParams(**GREEDY)))
        assert got == want, name
        # int4's native products (now also a base row's beside adapter rows) sum in another order than the
        # dequantised F.linear: test_int4's tolerance
        torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(want_lp), rtol=1e-4 if quant == "int4" else 0,
                                   atol=1e-4)


@pytest.mark.parametrize(("lengths", "chunk"), [([12, 21], 8), ([100, 90], 128)])
def test_base_rows_beside_adapter_rows_on_int4_weights_equal_their_runs_alone(setup, lengths, chunk) -> None:
    """int4 weights whose native steps round the activations to int8 (`int4_activations`, the default):
    a base request's outputs are its run alone's whatever adapter rows share its steps (they differed
    by ~0.05 in logprob: found by test_engine_props). The adapters' PyTorch pass, base rows included,
    rounds them as the native steps do at any row count (a 100-token chunk's native step multiplied
    bf16 panels: until decode.c's `gemm_panels_a8`, base rows took a native step of their own)."""
    from mixlab.model.inference import prepare_for_inference

    base, adapters = setup
    q = prepare_for_inference(copy.deepcopy(base), quant="int4")
    prompts = _prompts(lengths, seed=8)
    engine = Engine(q, max_batch=2, prefill_chunk=chunk, adapters=adapters)
    hs = [engine.submit(p, SamplingParams(**GREEDY, adapter=n)) for p, n in zip(prompts, [None, "a"], strict=True)]
    engine.run_until_idle()
    for prompt, name, h in zip(prompts, [None, "a"], hs, strict=True):
        alone = Engine(q, max_batch=1, prefill_chunk=chunk, adapters=adapters)
        want = alone.submit(prompt, SamplingParams(**GREEDY, adapter=name))
        alone.run_until_idle()
        got, got_lp = _tokens_and_logprobs(h.result())
        want, want_lp = _tokens_and_logprobs(want.result())
        assert got == want, name
        torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(want_lp), rtol=0, atol=ATOL)


def test_return_experts_under_an_adapter_are_its_merged_models(setup) -> None:
    """Adapter a adapts the router: a request under it reports the experts its merged model chooses."""
    base, adapters = setup
    merged = _merged(base, adapters)
    prompt = _prompts([11], seed=9)[0]
    params = dict(max_tokens=5, ignore_eos=True, return_experts=True)
    engine = Engine(base, max_batch=2, adapters=adapters)
    hs = [engine.submit(prompt, SamplingParams(**params, adapter=n)) for n in ("a", None)]
    engine.run_until_idle()
    got = {n: [o.experts for o in h.result() if o.token_id is not None] for n, h in zip(("a", None), hs, strict=True)}
    for name in ("a", None):
        assert got[name] == [o.experts for o in _alone(merged[name], prompt, SamplingParams(**params))
                             if o.token_id is not None]
    assert got["a"] != got[None]


def test_a_bf16_bases_adapter_steps_read_the_weights_panels(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 base whose engine keeps the weights in panels (`pack_weights=True`): the adapter steps'
    few-row products read the panels (`native.linear_packed`) and give what the same steps reading
    the rows give (a copy, `pack_weights=False`): the same greedy tokens, logprobs within float32
    summation order moving a bf16 rounding. (The PyTorch pass: the native step that runs adapter
    steps here is refused their table, as where it cannot hold an adapter.)"""
    from mixlab.model.native import NativeDecoder
    from mixlab.ops import native

    if native.load() is None or not native.fast(torch.bfloat16):
        pytest.skip("no native bf16 kernels here (no AVX512-BF16, no compiler, or MIXLAB_NATIVE=0)")
    monkeypatch.setattr(NativeDecoder, "lora_table", lambda self, factors: None)
    base, adapters = setup
    models = {"panels": copy.deepcopy(base).to(torch.bfloat16)}
    models["rows"] = copy.deepcopy(models["panels"])
    read: set[tuple[int, ...]] = set()  # the shapes of the weights read from panels
    real = native.linear_packed
    monkeypatch.setattr(native, "linear_packed", lambda x, w, P: read.add(tuple(w.shape)) or real(x, w, P))
    prompts = _prompts([6, 13, 9, 4], seed=10)
    names = [None, "a", "b", "a"]
    got = {}
    for how, model in models.items():
        engine = Engine(model, max_batch=4, prefill_chunk=8, adapters=adapters, pack_weights=how == "panels")
        hs = [engine.submit(p, SamplingParams(**GREEDY, adapter=n)) for p, n in zip(prompts, names, strict=True)]
        engine.run_until_idle()
        assert (engine.runner.packed_bytes > 0) == (how == "panels")
        got[how] = [_tokens_and_logprobs(h.result()) for h in hs]
        # the experts' w13 and w2, wqkv and the output, wo
        assert read == ({(256, 64), (64, 128), (128, 64), (64, 64)} if how == "panels" else set())
        read.clear()
    for (tok_p, lp_p), (tok_r, lp_r) in zip(got["panels"], got["rows"], strict=True):
        assert tok_p == tok_r
        torch.testing.assert_close(torch.tensor(lp_p), torch.tensor(lp_r), rtol=0, atol=2e-2)


def _native_or_skip(dtype: torch.dtype) -> None:
    from mixlab.ops import native

    if native.load() is None or not native.fast(dtype):
        pytest.skip(f"no native {dtype} kernels here (no AVX-512, no compiler, or MIXLAB_NATIVE=0)")


def _no_native_adapters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adapter steps through the PyTorch pass (the reference): the native step refused their table."""
    from mixlab.model.native import NativeDecoder

    monkeypatch.setattr(NativeDecoder, "lora_table", lambda self, factors: None)


def _native_steps_equal_the_pytorch_pass(base: Transformer, factors: dict, steps: list[list]) -> set[str]:
    """Runs each step's items through the native adapter step and the PyTorch pass (float32 logits within
    1e-5; the PyTorch pass never runs natively, the native runner never in PyTorch) and the same items on
    the base; returns the adapters whose rows' logits moved from the base's by more than 1e-2."""
    from mixlab.engine.runner import Item, Runner

    def runner() -> Runner:
        return Runner(base, max_batch=5, cache_bytes=None, prefill_chunk=16, max_seq_len=64, prefix_cache=False,
                      adapters=factors)

    native, ref, plain = runner(), runner(), runner()
    ref._native_batch = lambda items, **kw: None  # type: ignore[method-assign]
    native._batched = lambda items: pytest.fail("an adapter step ran the PyTorch pass")  # type: ignore[method-assign]
    moved = set()
    for step in steps:
        base_items = [Item(it.slot, it.tokens, it.start, it.logits) for it in step]
        for it, got, want, b in zip(step, native.forward(step), ref.forward(step), plain.forward(base_items),
                                    strict=True):
            assert (got.logits_TV is None) == (want.logits_TV is None) == (it.logits == "none")
            if got.logits_TV is not None:
                torch.testing.assert_close(got.logits_TV, want.logits_TV, rtol=0, atol=1e-5)
                if it.adapter is not None and (got.logits_TV - b.logits_TV).abs().max() > 1e-2:
                    moved.add(it.adapter)
    return moved


@pytest.mark.parametrize(("dense", "threads", "quant"), [(False, None, None), (True, None, None), (False, 3, None),
                                                    (False, None, "int4"), (False, 3, "int4"), (False, None, "int8")])
def test_native_adapter_steps_equal_the_pytorch_pass(tmp_path: Path, dense: bool, threads: int | None,
                                                     quant: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps with rows under adapters run in the one native call (`mx_decode_batch` with the LoRA
    table; the PyTorch pass never runs) and give the PyTorch pass's float32 logits within 1e-5:
    base rows beside four adapters (every target with the router, attention + experts of another
    rank, experts alone, attention alone), prompt chunks beside decoding tokens, logits of every row,
    the last or none. A dense model's FFN too, and 3 threads (each thread's own rows of the work
    buffer). And an int4 base whose activations are rounded to int8 (the default `int4_activations`),
    whose PyTorch pass rounds them as the native step does; an int8 base with int8_activations="int8"
    likewise. The adapters move the logits far more than that."""
    from mixlab.engine.runner import Item

    _native_or_skip(torch.float32)
    if threads is not None:
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # what the native call is given
    cfg = CFG.replace(moe=None) if dense else CFG
    base = Transformer(cfg).eval()
    base.init_weights(seed=0)  # small logits: 1e-5 is float32's rounding, not the model's chaos
    targets = {"a": ("attention", "experts", "router"), "b": ("attention", "experts"), "c": ("experts",),
               "d": ("attention",)}
    if dense:
        targets["a"] = targets["b"]
    factors = {n: adapter_factors(base, _adapter(base, tmp_path / n, rank=r, targets=targets[n], layout="fused",
                                                     seed=i))
               for i, (n, r) in enumerate(zip("abcd", (4, 2, 5, 3), strict=True))}
    g = torch.Generator().manual_seed(0)

    def toks(n: int) -> list[int]:
        return torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()

    steps = [
        [Item(0, toks(6), 0, "all"), Item(1, toks(5), 0, "last", adapter="a"), Item(2, toks(4), 0, "all", adapter="b")],
        [Item(0, toks(1), 6), Item(1, toks(1), 5, adapter="a"), Item(2, toks(3), 4, "all", adapter="b"),
         Item(3, toks(7), 0, "none", adapter="c")],
        [Item(3, toks(1), 7, adapter="c"), Item(1, toks(1), 6, adapter="a"), Item(4, toks(5), 0, "all", adapter="d"),
         Item(0, toks(1), 7)],
        [Item(4, toks(1), 5, adapter="d")],  # one decoding token alone
        [Item(1, toks(1), 7, adapter="a"), Item(2, toks(1), 7, adapter="b"), Item(3, toks(1), 8, adapter="c")],
    ]
    if quant is not None:
        from mixlab.model.inference import prepare_for_inference

        base = prepare_for_inference(base, quant=quant, int8_activations="int8" if quant == "int8" else None)
        assert base.native_decoder is not None and base.native_decoder.act8
    assert _native_steps_equal_the_pytorch_pass(base, factors, steps) == set("abcd")


@pytest.mark.parametrize("threads", [1, 3])
def test_native_updates_of_long_prompt_chunks_equal_the_pytorch_pass(tmp_path: Path, threads: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt chunk's rows under one adapter take their updates together, in tiles of 4 rows by 4 of
    A's rows (decode.c `lora_down`, `lora_up`): chunks of 9 to 13 tokens (whole tiles and the rows after
    them), two sequences' chunks under one adapter side by side, ranks 6 and 8 (a last tile of A's rows
    past R, and none), beside base rows and decoding tokens, at 1 and 3 threads, give the PyTorch pass's float32
    logits within 1e-5."""
    from mixlab.engine.runner import Item

    _native_or_skip(torch.float32)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # what the native call is given
    base = Transformer(CFG).eval()
    base.init_weights(seed=0)
    factors = {n: adapter_factors(base, _adapter(base, tmp_path / n, rank=r, targets=t, layout="fused", seed=i))
               for i, (n, r, t) in enumerate([("a", 6, ("attention", "experts", "router")),
                                              ("b", 8, ("attention", "experts"))])}
    g = torch.Generator().manual_seed(0)

    def toks(n: int) -> list[int]:
        return torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist()

    steps = [
        [Item(0, toks(13), 0, "all", adapter="a"), Item(1, toks(9), 0, "all", adapter="a"), Item(2, toks(6), 0, "all"),
         Item(3, toks(11), 0, "all", adapter="b")],
        [Item(0, toks(1), 13, adapter="a"), Item(3, toks(1), 11, adapter="b"), Item(1, toks(1), 9, adapter="a"),
         Item(4, toks(12), 0, "all", adapter="b"), Item(2, toks(10), 6, "last")],
    ]
    assert _native_steps_equal_the_pytorch_pass(base, factors, steps) == {"a", "b"}


def test_a_bf16_batch_under_adapters_runs_natively_token_for_token(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16: an engine whose adapter steps run natively gives each request the greedy tokens of the
    PyTorch pass (the same engine with the native step refused the adapters), logprobs within bf16's
    rounding of the products (the PyTorch pass rounds each product to bf16, the native step keeps
    float32). A model of small weights: on one of std 0.1 or more, near-ties flip base requests'
    tokens between the two passes as well."""
    _native_or_skip(torch.bfloat16)
    base = Transformer(CFG).eval()
    base.init_weights(seed=0)
    adapters = {"a": _adapter(base, tmp_path / "a", rank=4, targets=("attention", "experts", "router"),
                              layout="fused", seed=1),
                "b": _adapter(base, tmp_path / "b", rank=2, targets=("attention", "experts"), layout="modules",
                              seed=2)}
    model = base.to(torch.bfloat16)
    prompts = _prompts([6, 13, 9], seed=11)
    names = [None, "a", "b"]
    got = {}
    for how in ("native", "torch"):
        if how == "torch":
            _no_native_adapters(monkeypatch)
        engine = Engine(model, max_batch=9, prefill_chunk=8, adapters=adapters)
        hs = [engine.submit(p, SamplingParams(**GREEDY, adapter=n)) for p in prompts for n in names]
        engine.run_until_idle()
        got[how] = [_tokens_and_logprobs(h.result()) for h in hs]
    for (tok_n, lp_n), (tok_t, lp_t) in zip(got["native"], got["torch"], strict=True):
        assert tok_n == tok_t
        torch.testing.assert_close(torch.tensor(lp_n), torch.tensor(lp_t), rtol=0, atol=1e-2)
    # each prompt's three requests (base, a, b) differ: the adapters are not ignored
    assert all(len({tuple(got["native"][3 * i + j][0]) for j in range(3)}) == 3 for i in range(3))


def test_the_native_step_refuses_what_it_cannot_update(setup) -> None:
    """`lora_table` gives None, so the PyTorch pass runs those adapter steps, for a weight the native
    step does not update, factors that are not float32, or an expert's factors named as a dense FFN's;
    the adapters it takes lay out as they are."""
    from mixlab.checkpoint.adapter import LowRank
    from mixlab.model.native import shared_decoder

    _native_or_skip(torch.float32)
    base, adapters = setup
    dec = shared_decoder(base)
    assert dec is not None
    f = adapter_factors(base, adapters["a"])
    table = dec.lora_table([f, adapter_factors(base, adapters["b"])])
    assert table is not None and table.J == 2 and table.rank == max(lr.A.shape[-2] for lr in f.values())
    D, V = CFG.dim, CFG.vocab_size
    out = LowRank(torch.zeros(2, D), torch.zeros(V, 2))
    assert dec.lora_table([f, {"output.weight": out}]) is None
    half = {k: LowRank(lr.A.bfloat16(), lr.B.bfloat16()) for k, lr in f.items()}
    assert dec.lora_table([half]) is None
    assert dec.lora_table([{"layers.0.ffn.w13.weight": f["layers.0.ffn.experts.w13"]}]) is None
