"""The native engine step (`mx_decode_batch`, `torch.ops.mixlab.decode_batch`): one call for the items
of several sequences, each in its own slot of the engine's cache pool at its own positions, equals
the engine's PyTorch batched pass and separate single-sequence runs (float32: logits within 1e-4,
identical greedy tokens, experts and caches), for sequences of different lengths, across a sliding
window's boundary (rolling slots), dense and MoE models, float32, int8 and int4 weights, and B from
1 to past 16: pure decoding steps (one token per sequence) and mixed steps (decoding tokens next to
prompt chunks of random lengths, logits of the last row, of every row or of none)."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from mixlab.config import get_preset
from mixlab.engine import Engine, SamplingParams
from mixlab.engine.runner import Item, Result, Runner
from mixlab.model import Transformer
from mixlab.model.inference import prepare_for_inference
from mixlab.ops import native, registry

if native.load() is None:
    if native.enabled() and shutil.which("cc"):
        raise AssertionError("a C compiler is present but the native kernels did not build")
    pytest.skip("native kernels switched off (MIXLAB_NATIVE=0) or no C compiler", allow_module_level=True)
if not native.fast(torch.float32):
    pytest.skip("no AVX-512: mixlab keeps PyTorch's kernels here", allow_module_level=True)

_AMX = registry.amx  # torch's check on this CPU


@pytest.fixture(autouse=True)
def _native_steps_on_any_cpu(monkeypatch):
    """These tests are about the native step, which on a CPU with AMX the registry leaves to PyTorch's
    GEMMs for bf16 steps of more than AMX_MAX_STEP_TOKENS tokens: here it runs them on every CPU."""
    monkeypatch.setattr(registry, "amx", lambda: False)

CHUNK = 4  # prefill chunk: a windowed slot holds window + CHUNK - 1 positions


def _model(preset: str = "tiny-moe", quant: str | None = None, act: str = "float32", **kw) -> Transformer:
    cfg = get_preset(preset).replace(vocab_size=128, max_seq_len=128, **kw)
    model = Transformer(cfg).eval().requires_grad_(False)
    model.init_weights(std=0.5, seed=0)  # peaked, varied next-token distributions
    if quant is not None:
        prepare_for_inference(model, quant=quant, int4_activations=act if quant == "int4" else None,
                              int8_activations=act if quant == "int8" else None)
        assert model.native_decoder is not None and model.native_decoder.act8 == (act == "int8")
    return model


def _runner(model: Transformer, slots: int) -> Runner:
    return Runner(model, max_batch=slots, cache_bytes=None, prefill_chunk=CHUNK, max_seq_len=64, prefix_cache=False)


def _prefill(runner: Runner, prompts: list[list[int]]) -> list[int]:
    """Prefill prompt i into slot i (chunks of CHUNK, PyTorch's pass); each one's greedy next token."""
    nxt = []
    for s, prompt in enumerate(prompts):
        for a in range(0, len(prompt), CHUNK):
            (res,) = runner._batched([Item(s, prompt[a : a + CHUNK], a)])
        assert res.logits_TV is not None
        nxt.append(int(res.logits_TV[-1].argmax()))
    return nxt


def _decode(runner: Runner, tokens: list[int], starts: list[int], how: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    items = [Item(s, [t], p, experts=True) for s, (t, p) in enumerate(zip(tokens, starts, strict=True))]
    if how == "native":
        out = runner._native_batch(items)
        assert out is not None, "the registry did not choose the native batched step"
    elif how == "torch":
        out = runner._batched(items)
    else:  # each sequence alone: the batch-1 step (native mx_decode_step when available)
        out = [runner.forward([it])[0] for it in items]
    _check_argmax(out, native=how != "torch")
    logits = torch.cat([r.logits_TV for r in out if r.logits_TV is not None])
    found = [r.experts_LK for r in out if r.experts_LK is not None]
    experts = torch.stack(found) if found else None
    return logits, experts


def _check_argmax(out: list[Result], native: bool) -> None:
    """Each result's greedy token, which the native steps compute in C as they write the logits,
    is the first index of its last row's largest logit (NumPy's and PyTorch's argmax)."""
    for r in out:
        if r.logits_TV is not None and (native or r.argmax is not None):
            assert r.argmax == int(r.logits_TV[-1].numpy().argmax())


def _compare(model: Transformer, B: int, steps: int, lengths: list[int] | None = None, atol: float = 1e-4,
             peers: tuple[str, ...] = ("torch", "single")) -> None:
    g = torch.Generator().manual_seed(B)
    lengths = lengths or [int(n) for n in torch.randint(1, 20, (B,), generator=g)]
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]
    runners = {how: _runner(model, B) for how in ("native", *peers)}
    state = {how: (_prefill(r, prompts), [len(p) for p in prompts]) for how, r in runners.items()}
    for _ in range(steps):
        got = {}
        for how, r in runners.items():
            tokens, starts = state[how]
            got[how] = _decode(r, tokens, starts, how)
            state[how] = ([int(t) for t in got[how][0].argmax(-1)], [p + 1 for p in starts])
        for how in peers:
            torch.testing.assert_close(got["native"][0], got[how][0], atol=atol, rtol=1e-4)
            assert state["native"][0] == state[how][0], how
            if got["native"][1] is not None:
                assert torch.equal(got["native"][1], got[how][1]), how
    nat, ref = runners["native"], runners[peers[0]]
    assert torch.equal(nat.pos_SC, ref.pos_SC)
    for a, b in zip(nat.k + nat.v, ref.k + ref.v, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("B", [1, 3, 17])
def test_batched_step_equals_torch_and_single_runs(B):
    _compare(_model(), B, steps=4)


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dense"])
def test_rolling_slots_across_the_window_boundary(preset):
    """Window 6 (slots of 6 + CHUNK - 1 positions): prompts end before, at and after the boundary and
    decoding wraps every slot around."""
    model = _model(preset, sliding_window=6)
    assert _runner(model, 1).capacity == 9
    _compare(model, 5, steps=12, lengths=[2, 5, 6, 9, 14])


@pytest.mark.parametrize("window", [None, 20])
def test_four_query_heads_per_kv_head(window):
    """Mixtral's grouping (4 query heads per kv head: `attend4`, each cache row read once for the
    four) with slots of 20+ rows (the softmax's 16-row vector masks; with a window, rows that have
    left it and rolled slots) against the batch-1 steps, and against the PyTorch pass to its
    float32 summation order (2.5e-4 on these peaked logits: main's attention differed as much)."""
    model = _model(n_heads=8, n_kv_heads=2, head_dim=32, sliding_window=window)
    _compare(model, 4, steps=10, lengths=[3, 17, 22, 30], peers=("single",))
    _compare(model, 4, steps=10, lengths=[3, 17, 22, 30], atol=5e-4, peers=("torch",))


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantised_weights(quant):
    _compare(_model(quant=quant), 18, steps=3)


def test_int4_with_int8_activations_equals_single_runs():
    """int4 weights x int8-rounded activations (the default): the batched
    step rounds each row as the batch-1 step does."""
    _compare(_model(quant="int4", act="int8"), 17, steps=3, peers=("single",))


def test_int8_with_int8_activations_equals_single_runs():
    """int8 weights x int8-rounded activations (`int8_activations="int8"`, MX_I8_A8): the batched
    step rounds each row as the batch-1 step does."""
    _compare(_model(quant="int8", act="int8"), 17, steps=3, peers=("single",))


def test_bf16_batched_step_is_close_to_single_runs():
    """bf16 (weights and cache): the batched and the batch-1 native steps round the same way
    (float32 residual stream, bf16-rounded matmul inputs), so they agree to float32 summation order."""
    model = _model().to(torch.bfloat16)
    if not native.fast(torch.bfloat16):
        pytest.skip("no AVX512-BF16")
    runners = {how: _runner(model, 6) for how in ("native", "single")}
    prompts = [list(range(3, 3 + n)) for n in (1, 4, 7, 2, 9, 3)]
    toks = {how: _prefill(r, prompts) for how, r in runners.items()}
    starts = [len(p) for p in prompts]
    a, _ = _decode(runners["native"], toks["native"], starts, "native")
    b, _ = _decode(runners["single"], toks["single"], starts, "single")
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_engine_uses_it_and_equals_single_runs():
    """Through the engine: staggered requests (every step natively: prompt chunks next to decoding
    tokens, then decoding only) give the tokens of single-request runs."""
    model = _model()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (3, 11, 6, 17, 1)]
    params = SamplingParams(max_tokens=9, ignore_eos=True)
    singles = []
    for p in prompts:
        with Engine(model, max_batch=1, max_seq_len=64) as eng:
            singles.append([o.token_id for o in eng.submit(p, params) if o.token_id is not None])
    eng = Engine(model, max_batch=8, max_seq_len=64)
    calls = []
    run = eng.runner._native_batch
    eng.runner._native_batch = lambda items: calls.append(items) or run(items)  # type: ignore[method-assign]
    handles = []
    for p in prompts:
        handles.append(eng.submit(p, params))
        eng.step()
    eng.run_until_idle()
    assert [[o.token_id for o in h if o.token_id is not None] for h in handles] == singles
    assert max(len(items) for items in calls) == len(prompts)
    assert any(len(items) > 1 and any(len(it.tokens) > 1 for it in items) for items in calls)  # mixed steps


def test_on_an_amx_cpu_bf16_steps_of_many_tokens_take_pytorchs_gemms(monkeypatch):
    """Where oneDNN's bf16 GEMMs run on AMX tiles, a step of more tokens than AMX_MAX_STEP_TOKENS gives its
    weights' dtype (bf16; int8, dequantised to bf16 there) runs the PyTorch pass (a 512-token prompt 4.4x /
    2x faster there), or than AMX_PANELS_MAX_STEP_TOKENS where the native step reads bf16 panels on the
    tiles too; elsewhere, and for int4 weights or float32 activations, the native call up to
    NATIVE_MAX_STEP_TOKENS."""
    kw = dict(device="cpu", fmt="plain", training=False, act_dtype=torch.bfloat16)
    monkeypatch.setattr(registry, "native_ready", lambda dtype: True)
    for dtype in (torch.bfloat16, torch.int8):
        for amx, most in ((True, registry.AMX_MAX_STEP_TOKENS[dtype]), (False, registry.NATIVE_MAX_STEP_TOKENS)):
            monkeypatch.setattr(registry, "amx", lambda amx=amx: amx)
            assert registry.choose("decode_batch", tokens=most, dtype=dtype, **kw) == "native"
            assert registry.choose("decode_batch", tokens=most + 1, dtype=dtype, **kw) == "torch"
        assert registry.AMX_MAX_STEP_TOKENS[dtype] < registry.NATIVE_MAX_STEP_TOKENS
    monkeypatch.setattr(registry, "amx", lambda: True)
    for other in ({"dtype": torch.uint8}, {"dtype": torch.float32, "act_dtype": torch.float32},
                  {"dtype": torch.int8, "act_dtype": torch.float32}):  # no AMX GEMM for them
        assert registry.choose("decode_batch", tokens=registry.NATIVE_MAX_STEP_TOKENS, **{**kw, **other}) == "native"
    assert registry.choose("decode_batch", tokens=65, dtype=torch.bfloat16, **{**kw, "act_dtype": None}) == "torch"
    assert isinstance(_AMX(), bool)  # torch's own check, as asked on this CPU
    # bf16 weights kept in panels that the native step reads on the tile unit too: up to
    # AMX_PANELS_MAX_STEP_TOKENS native; not without AMX in the native kernels, nor for int8
    amx_most = registry.AMX_MAX_STEP_TOKENS
    assert amx_most[torch.bfloat16] < registry.AMX_PANELS_MAX_STEP_TOKENS < registry.NATIVE_MAX_STEP_TOKENS
    for tiles, dtype, most in ((True, torch.bfloat16, registry.AMX_PANELS_MAX_STEP_TOKENS),
                               (False, torch.bfloat16, amx_most[torch.bfloat16]),
                               (True, torch.int8, amx_most[torch.int8])):
        monkeypatch.setattr(native, "amx", lambda on=None, tiles=tiles: tiles)
        assert registry.choose("decode_batch", tokens=most, dtype=dtype, panels=True, **kw) == "native"
        assert registry.choose("decode_batch", tokens=most + 1, dtype=dtype, panels=True, **kw) == "torch"


def test_registry_and_bad_input():
    kw = dict(device="cpu", fmt="plain", dtype=torch.float32, training=False)
    assert registry.choose("decode_batch", tokens=16, **kw) == "native"
    assert registry.choose("decode_batch", tokens=registry.NATIVE_MAX_STEP_TOKENS + 1, **kw) == "torch"
    assert registry.choose("decode_batch", tokens=4, **{**kw, "training": True}) == "torch"
    runner = _runner(_model(), 2)
    dec = runner._native_decoder()
    assert dec is not None
    t = torch.tensor

    def call(tokens, pos, seq, rows=(0,)):
        torch.ops.mixlab.decode_batch(dec.handle, t(tokens), t(pos), t(seq), t(list(rows), dtype=torch.long),
                                      runner.pos_SC, runner.k, runner.v)

    with pytest.raises(ValueError, match="one run of consecutive positions"):
        call([1, 2], [0, 0], [0, 0])  # one slot, the same position twice
    with pytest.raises(ValueError, match="one run of consecutive positions"):
        call([1, 2, 3], [0, 0, 1], [0, 1, 0])  # slot 0 split in two runs
    with pytest.raises(ValueError, match="tokens in"):
        call([1, 999], [0, 0], [0, 1])
    with pytest.raises(ValueError, match="logit rows"):
        call([1, 2], [0, 1], [0, 0], rows=(2,))
    with pytest.raises(ValueError, match="slots in"):
        call([1], [0], [5])
    # the eager entry point (lists) also checks the buffers C writes into
    with pytest.raises(ValueError, match="writes float32 logits"):
        dec.batch([1], [0], [0], [0], runner.pos_SC, runner.k, runner.v,
                  torch.empty(1, 3), torch.empty(dec.n_layers, 1, dec.top_k, dtype=torch.int32))
    with pytest.raises(ValueError, match="one run of consecutive positions"):
        dec.batch([1, 2], [0, 2], [0, 0], [0], runner.pos_SC, runner.k, runner.v,
                  torch.empty(1, dec.vocab_size), torch.empty(dec.n_layers, 2, dec.top_k, dtype=torch.int32))


def test_a_model_with_an_expert_capacity_stays_on_pytorch():
    """The native kernels run every chosen expert; a model that drops tokens over an expert capacity
    is not given to them (PyTorch's pass applies the capacity), so its engine steps equal it."""
    import dataclasses

    from mixlab.model.native import NativeDecoder, attach, shared_decoder

    cfg = get_preset("tiny-moe").replace(vocab_size=128, max_seq_len=128)
    model = Transformer(cfg.replace(moe=dataclasses.replace(cfg.moe, capacity_factor=0.5))).eval()
    model.init_weights(std=0.5, seed=0)
    with pytest.raises(ValueError, match=r"capacity \(moe.capacity_factor=0.5\)"):
        NativeDecoder(model, native.library())
    assert shared_decoder(model) is None and not attach(model) and model.native_decoder is None
    runner = _runner(model, 2)
    assert runner._native_batch([Item(0, [5, 6, 7], 0), Item(1, [9], 0)]) is None


def test_decoder_copy_refused_and_model_unchanged():
    """The batched step reads the weights in place: the model's parameters are untouched."""
    model = _model()
    before = copy.deepcopy(model.state_dict())
    _compare(model, 2, steps=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", ["all equal", "tie in one thread's rows", "tie across threads", "nan"])
def test_greedy_token_from_c_breaks_ties_and_refuses_nan(case):
    """The greedy token the native steps (batch 1 and batched) find as their threads write the
    logits: the first index of the largest logit, also when the tied logits are in different
    threads' rows; none for a row holding NaN (the engine then reports it from the logits)."""
    model = _model()
    with torch.no_grad():
        w = model.output.weight  # [128, D]: two threads write rows 0-63 and 64-127
        if case == "all equal":
            w[:] = w[5]
        elif case == "tie in one thread's rows":  # the largest of +/- 10 w[5] . h is in 70/90 or 80/100
            w[70], w[90], w[80], w[100] = 10 * w[5], 10 * w[5], -10 * w[5], -10 * w[5]
        elif case == "tie across threads":
            w[40], w[110], w[41], w[111] = 10 * w[5], 10 * w[5], -10 * w[5], -10 * w[5]
        else:
            w[77] = float("nan")
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runner = _runner(model, 3)
        prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
        nxt = _prefill(runner, prompts)
        items = [Item(s, [t], len(p)) for s, (t, p) in enumerate(zip(nxt, prompts, strict=True))]
        batched = runner._native_batch(items)
        assert batched is not None
        single = [runner.forward([it])[0] for it in items]
    finally:
        torch.set_num_threads(old)
    for res in batched + single:
        assert res.logits_TV is not None
        if case == "nan":
            assert res.argmax is None
            continue
        assert res.argmax == int(res.logits_TV[-1].numpy().argmax())
        assert res.argmax in {"all equal": (0,), "tie in one thread's rows": (70, 80),
                              "tie across threads": (40, 41)}[case]


# ---- mixed steps: decoding tokens next to prompt chunks ----

def _token_by_token(runner: Runner, it: Item) -> Result:
    """An item run one token at a time (the batch-1 step), with the logits and experts it asks for."""
    outs = [runner.forward([Item(it.slot, [tok], it.start + j, experts=it.experts)])[0]
            for j, tok in enumerate(it.tokens)]
    logits = [o.logits_TV for o in outs if o.logits_TV is not None]
    want = {"none": None, "last": logits[-1:], "all": logits}[it.logits]
    return Result(torch.cat(want) if want is not None else None, outs[-1].experts_LK)


def _mixed(model: Transformer, B: int, steps: int, *, seed: int = 0, lengths: list[int] | None = None,
           max_chunk: int = CHUNK, atol: float = 1e-4, rtol: float = 1e-4, of_scale: float | None = None,
           peers: tuple[str, ...] = ("torch", "single")) -> int:
    """B sequences through `steps` engine-like steps of a random schedule (each step, each sequence
    sits out, prefills a chunk of 1..max_chunk prompt tokens asking for no, the last or every row's
    logits, or decodes its last greedy token), natively in one call per step against `peers`: the
    PyTorch pass over the same items ("torch") and each item alone, token by token through the
    batch-1 native step ("single"). Every runner feeds back its own
    greedy tokens; they must agree, and so must the logits (`atol` / `rtol`, or with `of_scale`
    within that fraction of each row's largest logit), experts, positions and caches. Returns how
    many steps mixed a prompt chunk with other items."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [int(n) for n in torch.randint(1, 24, (B,), generator=g)]
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]
    runners = {how: _runner(model, B) for how in ("native", *peers)}
    done = [0] * B  # prompt tokens run so far (the schedule is shared)
    gen: dict[str, list[list[int]]] = {how: [[] for _ in range(B)] for how in runners}
    mixed = 0
    for _ in range(steps):
        spec = []  # (slot, chunk length or 0 for a decoding token, logits mode, experts)
        for s in range(B):
            r = torch.rand(3, generator=g).tolist()
            if r[0] < 0.15:
                continue
            if done[s] < len(prompts[s]):
                n = min(int(torch.randint(1, max_chunk + 1, (1,), generator=g)), len(prompts[s]) - done[s])
                ends = done[s] + n == len(prompts[s])
                mode = ("last" if r[1] < 0.6 else "all") if ends else ("none" if r[1] < 0.6 else "all")
                spec.append((s, n, mode, r[2] < 0.5))
            else:
                spec.append((s, 0, "last", r[2] < 0.5))
        if not spec:
            continue
        mixed += any(n > 1 for _, n, _, _ in spec) and len(spec) > 1
        got = {}
        for how, runner in runners.items():
            items = []
            for s, n, mode, experts in spec:
                if n:
                    items.append(Item(s, prompts[s][done[s] : done[s] + n], done[s], logits=mode, experts=experts))
                else:
                    items.append(Item(s, gen[how][s][-1:], len(prompts[s]) + len(gen[how][s]) - 1, experts=experts))
            if how == "native":
                out = runner._native_batch(items)
                assert out is not None, "the registry did not choose the native step"
            elif how == "torch":
                out = runner._batched(items)
            else:
                out = [_token_by_token(runner, it) for it in items]
            got[how] = out
            if how == "native":
                _check_argmax(out, native=True)
            for (s, n, mode, _), res in zip(spec, out, strict=True):
                if (n == 0 or done[s] + n == len(prompts[s])):
                    assert res.logits_TV is not None
                    gen[how][s].append(int(res.logits_TV[-1].argmax()))
                assert (res.logits_TV is None) == (mode == "none")
                if res.logits_TV is not None:
                    assert res.logits_TV.shape[0] == (n if mode == "all" else 1)
        for s, n, _, _ in spec:
            done[s] += n
        for how in peers:
            for (s, _, _, experts), a, b in zip(spec, got["native"], got[how], strict=True):
                if a.logits_TV is not None and of_scale is not None:
                    scale = b.logits_TV.float().abs().amax(-1, keepdim=True)
                    assert ((a.logits_TV.float() - b.logits_TV.float()).abs() / scale).max() <= of_scale, (how, s)
                elif a.logits_TV is not None:
                    torch.testing.assert_close(a.logits_TV, b.logits_TV, atol=atol, rtol=rtol)
                if experts and model.config.moe is not None:
                    assert a.experts_LK is not None and torch.equal(a.experts_LK, b.experts_LK), (how, s)
            assert gen["native"] == gen[how], how
    nat = runners["native"]
    for how in peers:
        ref = runners[how]
        assert torch.equal(nat.pos_SC, ref.pos_SC), how
        for a, b in zip(nat.k + nat.v, ref.k + ref.v, strict=True):
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    return mixed


@pytest.mark.parametrize(("B", "seed"), [(1, 0), (4, 1), (9, 2)])
def test_mixed_steps_equal_torch_and_single_runs(B, seed):
    """Random prompt lengths and chunk splits, decoding next to prefilling, float32."""
    mixed = _mixed(_model(), B, steps=14, seed=seed, max_chunk=8)
    assert B == 1 or mixed >= 3


def test_mixed_steps_use_the_expert_counts_of_every_token():
    """The expert load the engine records counts every token of the step, chunks included."""
    model = _model()
    runners = [_runner(model, 3) for _ in range(2)]
    items = [Item(0, [5, 6, 7, 8], 0), Item(1, [9], 0), Item(2, [10, 11], 0, logits="all")]
    runners[0]._native_batch(items)
    runners[1]._batched(items)
    assert runners[0].last_counts_LE is not None and runners[1].last_counts_LE is not None
    assert torch.equal(runners[0].last_counts_LE, runners[1].last_counts_LE)
    assert int(runners[0].last_counts_LE.sum()) == 7 * model.config.n_layers * model.config.moe.top_k


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dense"])
def test_mixed_steps_across_the_window_boundary(preset):
    """Window 6, slots of 6 + CHUNK - 1 positions: prefill chunks cross the window and wrap the
    rolling slots while other sequences decode."""
    model = _model(preset, sliding_window=6)
    _mixed(model, 5, steps=18, seed=3, lengths=[3, 7, 11, 17, 22])


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_mixed_steps_quantised(quant):
    _mixed(_model(quant=quant), 6, steps=8, seed=4)


def test_mixed_steps_int4_int8_activations_equal_single_runs():
    _mixed(_model(quant="int4", act="int8"), 5, steps=8, seed=5, peers=("single",))


def test_mixed_steps_int8_int8_activations_equal_single_runs():
    _mixed(_model(quant="int8", act="int8"), 5, steps=8, seed=5, peers=("single",))


@pytest.mark.parametrize("amx", [False, True], ids=["avx512", "amx"])
def test_mixed_steps_bf16_close_to_single_runs(amx):
    """bf16 weights and cache: the native mixed step and the batch-1 native step keep a float32
    residual stream and round the same matmul inputs to bf16, so they agree to float32 summation
    order (the PyTorch pass keeps a bf16 residual stream: further off, ~0.7 on these logits). On
    AMX's tile unit the mixed step's panels sum each tile's products in the hardware's own way, so a
    bf16 rounding of an activation or a cached key can land one unit (2^-8) apart further on: logits
    within 1e-2 of each row's scale (measured 3.5e-3), the same experts and greedy tokens."""
    if not native.fast(torch.bfloat16):
        pytest.skip("no AVX512-BF16")
    was = native.amx()
    try:
        if native.amx(amx) != amx:
            pytest.skip("no AMX tile unit (or no permission for it)")
        _mixed(_model().to(torch.bfloat16), 4, steps=8, seed=6, lengths=[5, 9, 3, 12], atol=2e-2, rtol=2e-2,
               of_scale=1e-2 if amx else None, peers=("single",))
    finally:
        native.amx(was)


def test_weights_kept_in_panels_equal_the_rows_in_mixed_steps():
    """A bf16 model's engine steps reading the weights' 32-row panels (`pack_weights=True`) against
    the same model's steps reading the rows (a copy, `pack_weights=False`): prompt chunks of 1-40
    tokens next to decoding tokens (experts with 1 to 12 and more tokens; the 64-row dense matrices
    and the output split inside a panel by 2 threads), logits of none, the last or every row. They
    differ in float32 summation order only, which can move a bf16 rounding of an activation or a
    cached key by one unit (2^-8) further on: logits within 1e-2 of each row's scale (1e-3 at the
    first step, which meets a fresh cache), identical experts and greedy tokens, caches within bf16's
    rounding."""
    if not native.fast(torch.bfloat16):
        pytest.skip("no AVX512-BF16")
    model = _model().to(torch.bfloat16)
    models = {"panels": model, "rows": copy.deepcopy(model)}
    runners = {how: Runner(m, max_batch=6, cache_bytes=None, prefill_chunk=64, max_seq_len=128, prefix_cache=False,
                           pack_weights=how == "panels") for how, m in models.items()}
    for r in runners.values():
        r.prepare()
    assert runners["panels"].packed_bytes > 0 and runners["rows"].packed_bytes == 0
    assert runners["rows"]._native_decoder() is not runners["panels"]._native_decoder()
    g = torch.Generator().manual_seed(7)
    lengths = [1, 12, 40, 7, 25, 3]
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]
    done = [0] * 6
    gen: dict[str, list[list[int]]] = {how: [[] for _ in range(6)] for how in runners}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for step in range(10):
            spec = []
            for s in range(6):
                if done[s] < len(prompts[s]):
                    n = min(int(torch.randint(1, 17, (1,), generator=g)) if step else 40, len(prompts[s]) - done[s])
                    mode = "last" if done[s] + n == len(prompts[s]) else ("none", "all")[step % 2]
                    spec.append((s, n, mode))
                else:
                    spec.append((s, 0, "last"))
            got = {}
            for how, runner in runners.items():
                items = [Item(s, prompts[s][done[s]:done[s] + n], done[s], logits=mode, experts=True) if n else
                         Item(s, gen[how][s][-1:], len(prompts[s]) + len(gen[how][s]) - 1, experts=True)
                         for s, n, mode in spec]
                out = runner._native_batch(items)
                assert out is not None
                got[how] = out
                for (s, n, _), res in zip(spec, out, strict=True):
                    if n == 0 or done[s] + n == len(prompts[s]):
                        gen[how][s].append(int(res.logits_TV[-1].argmax()))
            for a, b in zip(got["panels"], got["rows"], strict=True):
                assert (a.logits_TV is None) == (b.logits_TV is None)
                if a.logits_TV is not None:
                    scale = b.logits_TV.float().abs().amax(-1, keepdim=True)
                    assert ((a.logits_TV.float() - b.logits_TV.float()).abs() / scale).max() <= (1e-2 if step else 1e-3)
                assert torch.equal(a.experts_LK, b.experts_LK)
            assert gen["panels"] == gen["rows"]
            for s, n, _ in spec:
                done[s] += n
    finally:
        torch.set_num_threads(threads)
    pa, ro = runners["panels"], runners["rows"]
    assert torch.equal(pa.pos_SC, ro.pos_SC)
    for a, b in zip(pa.k + pa.v, ro.k + ro.v, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2)


def test_pack_weights_automatic_and_checked():
    """None packs a bf16 model whose panels fit in half the memory available when several
    sequences share the steps, never for one sequence (the batch-1 step reads the rows) nor float32
    weights (nothing to pack); anything but a bool or None is refused."""
    if not native.fast(torch.bfloat16):
        pytest.skip("no AVX512-BF16")
    for dtype, slots, packed in ((torch.bfloat16, 2, True), (torch.bfloat16, 1, False), (torch.float32, 2, False)):
        r = Runner(_model().to(dtype), max_batch=slots, cache_bytes=None, prefill_chunk=CHUNK, max_seq_len=64,
                   prefix_cache=False)
        r.prepare()
        assert (r.packed_bytes > 0) == packed, (dtype, slots)
    with pytest.raises(ValueError, match="invalid pack_weights='yes': expected True, False or None"):
        Runner(_model(), max_batch=2, cache_bytes=None, prefill_chunk=CHUNK, max_seq_len=64, prefix_cache=False,
               pack_weights="yes")


def test_no_memory_for_the_panels_leaves_the_rows(monkeypatch):
    """When the panels cannot be allocated, the engine warns and its steps read the rows."""
    if not native.fast(torch.bfloat16):
        pytest.skip("no AVX512-BF16")

    def no_memory(w, P):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(native, "pack_into", no_memory)
    model = _model().to(torch.bfloat16)
    r = Runner(model, max_batch=2, cache_bytes=None, prefill_chunk=CHUNK, max_seq_len=64, prefix_cache=False,
               pack_weights=True)
    with pytest.warns(UserWarning, match=r"no memory for the weights' panels \(\d+ bytes\).*read the rows instead"):
        r.prepare()
    dec = r._native_decoder()
    assert r.packed_bytes == 0 and dec._packed is None and dec.c_model.out_p is None
    out = r._native_batch([Item(0, [5, 6, 7], 0), Item(1, [9], 0)])
    assert out is not None and all(o.logits_TV is not None and torch.isfinite(o.logits_TV).all() for o in out)


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_long_chunk_through_the_panels_equals_short_chunks(quant):
    """A 160-token prompt chunk in one native step of a bf16 model, whose products of >= 64 tokens
    take the packed panels (bf16; int8 and int4 dequantised to bf16, the activations rounded to
    bf16), against the same prompt in native chunks of 16 (the tiles and the int8/int4 kernels):
    every row's logits agree to the roundings that differ (as closely as PyTorch's pass agrees with
    the short chunks: median 2.5e-3 and 6e-3 of each row's largest logit for int8 and int4, against
    4e-3 and 7e-3 for the PyTorch pass, measured)."""
    if not native.fast(torch.bfloat16):
        pytest.skip("no AVX512-BF16")
    cfg = get_preset("tiny-moe").replace(vocab_size=128, max_seq_len=256)
    model = Transformer(cfg).eval().requires_grad_(False)
    model.init_weights(std=0.02, seed=0)
    model = model.to(torch.bfloat16)
    if quant is not None:
        prepare_for_inference(model, quant=quant, int4_activations="int8" if quant == "int4" else None)
    prompt = torch.randint(3, 128, (160,), generator=torch.Generator().manual_seed(1)).tolist()
    got = {}
    for chunk in (160, 16):
        runner = Runner(model, max_batch=1, cache_bytes=None, prefill_chunk=256, max_seq_len=256, prefix_cache=False)
        rows = []
        for a in range(0, len(prompt), chunk):
            (res,) = runner.forward([Item(0, prompt[a : a + chunk], a, logits="all")])
            rows.append(res.logits_TV.float())
        got[chunk] = torch.cat(rows)
    err = (got[160] - got[16]).abs().amax(-1) / got[16].abs().amax(-1)
    median, worst = (1e-5, 5e-3) if quant is None else (1e-2, 3e-2)  # bf16: the same roundings, other sums
    assert err.median() <= median and err.max() <= worst, (err.median(), err.max())
    assert (got[160].argmax(-1) == got[16].argmax(-1)).float().mean() >= 0.97


def test_int8_batched_step_of_a_bf16_model_is_close_to_single_runs():
    """int8 weights in a bf16 model: a batched step's few-token products convert the int8 rows to bf16
    in registers (exact) and round the activations to bf16 (`gemm_rows_i8_bf16`); the batch-1 steps
    keep float32 activations. They agree to that rounding."""
    if not native.fast(torch.bfloat16):
        pytest.skip("no AVX512-BF16")
    model = _model().to(torch.bfloat16)
    prepare_for_inference(model, quant="int8")
    runners = {how: _runner(model, 6) for how in ("native", "single")}
    prompts = [list(range(3, 3 + n)) for n in (1, 4, 7, 2, 9, 3)]
    toks = {how: _prefill(r, prompts) for how, r in runners.items()}
    assert toks["native"] == toks["single"]
    starts = [len(p) for p in prompts]
    a, _ = _decode(runners["native"], toks["native"], starts, "native")
    b, _ = _decode(runners["single"], toks["single"], starts, "single")
    err = (a.float() - b.float()).abs().amax(-1) / b.float().abs().amax(-1)
    assert err.max() <= 3e-2, err
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 5 / 6
