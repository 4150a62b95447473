"""The native decoding kernels (`mixlab/ops/native/decode.c`) equal the PyTorch model: the GEMV alone,
then whole decoding steps against a full recompute without cache, in float32 (tight), bf16 and int8."""

from __future__ import annotations

import copy
import ctypes
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mixlab.cache import KVCache
from mixlab.config import MoEConfig, get_preset
from mixlab.errors import GenerationError
from mixlab.generate import decode_step, generate, greedy_step, prefill
from mixlab.model import Transformer
from mixlab.model.inference import prepare_for_inference
from mixlab.ops import native
from mixlab.ops.quant import quantize_int8

if native.load() is None:
    if native.enabled() and shutil.which("cc"):
        raise AssertionError("a C compiler is present but the native kernels did not build")
    pytest.skip("native kernels switched off (MIXLAB_NATIVE=0) or no C compiler", allow_module_level=True)
if not (native.fast(torch.float32) and native.fast(torch.bfloat16)):
    pytest.skip("no AVX-512 / AVX512-BF16: mixlab keeps PyTorch's kernels here", allow_module_level=True)


def _model(dtype=torch.float32, preset="tiny-moe", **changes) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(get_preset(preset).replace(**changes))
    model.init_weights(seed=0, std=0.1)
    return model.to(dtype).eval().requires_grad_(False)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize(("X", "D"), [(40, 48), (37, 70), (129, 1000), (16, 32)])
def test_gemv_equals_matmul(dtype, X, D, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w = torch.randn(D), torch.randn(X, D)
        if dtype == torch.int8:
            q, s = quantize_int8(w)
            got, ref = native.gemv(q, x, s), (q.float() @ x) * s
        elif dtype == torch.bfloat16:  # bf16 weights multiply bf16-rounded activations
            wb = w.bfloat16()
            got, ref = native.gemv(wb, x), wb.float() @ x.bfloat16().float()
        else:
            got, ref = native.gemv(w, x), w @ x
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def _native_decode(model: Transformer, tokens_T: torch.Tensor, n_prompt: int, **cache_kw) -> torch.Tensor:
    """Logits of each position after the prompt: PyTorch prefill, then native steps."""
    T = tokens_T.shape[0]
    dtype = model.tok_embeddings.weight.dtype
    cache = KVCache(model.config, batch_size=1, max_len=T, dtype=dtype, **cache_kw)
    dec = model.native_decoder
    with torch.inference_mode():
        pos = torch.arange(T)[None]
        outs = [prefill(model, tokens_T[None, :n_prompt], pos[:, :n_prompt], cache, chunk=cache_kw.get(
            "prefill_chunk", 512))[0]]
        for t in range(n_prompt, T - 1):
            outs.append(dec.step(int(tokens_T[t]), t, cache))
    return torch.cat(outs)


def _recompute(model: Transformer, tokens_T: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """The same logits from full forward passes without a cache (the plain reference)."""
    with torch.inference_mode():
        return model(tokens_T[None, :-1])[0, n_prompt - 1 :].float()


CASES = {
    "moe": {},
    "dense-sliding-window": dict(preset="tiny-dense"),
    "top-1": dict(moe=MoEConfig(num_experts=4, top_k=1)),
    "8-experts-top-3": dict(moe=MoEConfig(num_experts=8, top_k=3)),
    "mha-odd-head-dim": dict(n_heads=2, n_kv_heads=2, head_dim=24),
    "head-dim-48": dict(n_heads=4, n_kv_heads=1, head_dim=48),  # attention's values: 32 + 16 per pass
    "head-dim-128": dict(n_heads=2, n_kv_heads=2, head_dim=128),  # values: 128 per pass, Mixtral's
    # four query heads per kv head (Mixtral's grouping): attend4, values 64 per pass (+ 16 at 80)
    "gqa-4-head-dim-80": dict(n_heads=8, n_kv_heads=2, head_dim=80),
    "gqa-4-head-dim-128-sliding-window": dict(n_heads=8, n_kv_heads=2, head_dim=128, sliding_window=16),
    "tied-embeddings": dict(tie_embeddings=True),
}


def test_swapping_the_library_swaps_the_batch1_step():
    """In-process A/Bs (benchmarks/kernels_ab.py) assign `decoder.lib`: the batch-1 step, bound at
    init for speed, must follow, or every variant would run the first library's step."""
    model = _model()
    prepare_for_inference(model)
    dec = model.native_decoder
    assert dec is not None and dec._c_step is dec.lib.mx_decode_step
    tokens = torch.randint(0, 256, (12,))
    ref = _native_decode(model, tokens, 5)
    calls = []
    real = dec.lib

    class Spy:  # the same kernels, counting batch-1 steps
        def __getattr__(self, name):
            return getattr(real, name)

        def mx_decode_step(self, *args):
            calls.append(1)
            return real.mx_decode_step(*args)

    dec.lib = Spy()
    try:
        torch.testing.assert_close(_native_decode(model, tokens, 5), ref, atol=0, rtol=0)
    finally:
        dec.lib = real
    assert len(calls) == 12 - 1 - 5 and dec._c_step is real.mx_decode_step


@pytest.mark.parametrize("case", list(CASES))
def test_native_decoding_equals_full_recompute_float32(case):
    model = _model(**CASES[case])
    prepare_for_inference(model)
    assert model.native_decoder is not None
    tokens = torch.randint(0, 256, (40,))
    torch.testing.assert_close(_native_decode(model, tokens, 9), _recompute(model, tokens, 9), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quant", [None, "bf16", "int8", "int4", "int4-exact"])
def test_native_step_is_the_same_with_any_thread_count(quant):
    """Each thread computes whole rows (and its own copy of the norms, the router and the int8
    roundings), so the logits and experts do not depend on how many threads share a step: 3 threads
    do not divide tiny-moe's 2 kv heads (the split that puts a barrier between the qkv product and
    attention), 2 do (each thread attends with the heads whose rows it computed)."""
    model = _model(torch.bfloat16 if quant == "bf16" else torch.float32)
    kw = {} if quant in (None, "bf16") else {"quant": quant.removesuffix("-exact")}
    if quant == "int4-exact":
        kw["int4_activations"] = "float32"
    prepare_for_inference(model, **kw)
    assert model.native_decoder is not None
    tokens = torch.randint(0, 256, (14,))
    old = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            cache = KVCache(model.config, batch_size=1, max_len=14, dtype=model.tok_embeddings.weight.dtype)
            dec = model.native_decoder
            with torch.inference_mode():
                got.append([dec.step_experts(int(t), i, cache) for i, t in enumerate(tokens)])
    finally:
        torch.set_num_threads(old)
    for other in got[1:]:
        for (logits, experts), (ref_logits, ref_experts) in zip(other, got[0], strict=True):
            assert torch.equal(logits, ref_logits) and torch.equal(experts, ref_experts)


def test_huge_pages_keep_the_weights():
    """`huge_pages` (MADV_COLLAPSE on the 2 MiB pages inside each weight) changes only the page size."""
    from mixlab.pages import huge_pages

    t = torch.randn(3 << 20)  # 12 MiB: at least four whole 2 MiB pages
    before = t.clone()
    assert huge_pages([t, torch.randn(10)]) in (0, 1)  # 0 where refused (THP off, not Linux); the small one never
    assert torch.equal(t, before)
    model = _model()
    prepare_for_inference(model)
    assert model.native_decoder is not None and model.native_decoder.huge_pages == 0  # tiny: no 4 MiB weight


def test_native_steps_grow_a_reserved_cache():
    """A cache made with `reserve` (as `mixlab chat` makes) grows during native steps; the decoder
    follows its new buffers and the logits stay those of a full recompute."""
    model = _model()
    prepare_for_inference(model)
    tokens = torch.randint(0, 256, (40,))
    got = _native_decode(model, tokens, 9, reserve=10)
    torch.testing.assert_close(got, _recompute(model, tokens, 9), atol=1e-5, rtol=1e-5)


def test_rolling_cache_wraps_around():
    """A sliding-window model with a small rolling cache: native steps overwrite the oldest slots."""
    model = _model(preset="tiny-dense", sliding_window=8)
    prepare_for_inference(model)
    tokens = torch.randint(0, 256, (50,))
    got = _native_decode(model, tokens, 5, prefill_chunk=4)  # capacity 8 + 4 - 1 = 11 slots
    torch.testing.assert_close(got, _recompute(model, tokens, 5), atol=1e-5, rtol=1e-5)


def test_native_step_writes_the_cache_as_pytorch_does():
    model = _model()
    torch_model = copy.deepcopy(model)
    prepare_for_inference(model)
    tokens = torch.randint(0, 256, (1, 12))
    caches = [KVCache(model.config, batch_size=1, max_len=12) for _ in range(2)]
    with torch.inference_mode():
        for m, cache in zip((model, torch_model), caches, strict=True):
            prefill(m, tokens[:, :6], torch.arange(6)[None], cache, chunk=512)
            for t in range(6, 12):
                decode_step(m, tokens[:, t : t + 1], torch.tensor([[t]]), cache)
    for layer in range(model.config.n_layers):
        torch.testing.assert_close(caches[0].k[layer], caches[1].k[layer], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(caches[0].v[layer], caches[1].v[layer], atol=1e-6, rtol=1e-6)
    assert torch.equal(caches[0].pos_BC, caches[1].pos_BC) and caches[0].t == caches[1].t == 12


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dense"])
def test_bf16_native_decoding_is_as_close_to_float32_as_pytorch_bf16(preset):
    model = _model(preset=preset)
    tokens = torch.randint(0, 256, (30,))
    ref = _recompute(model, tokens, 6)
    bf16 = model.to(torch.bfloat16)
    pytorch = _recompute(bf16, tokens, 6)
    native_ = _native_decode(prepare_for_inference(bf16), tokens, 6)

    def err(x: torch.Tensor) -> float:  # median over positions: a bf16 near-tie may flip one expert choice
        return float(((x - ref).norm(dim=-1) / ref.norm(dim=-1)).median())

    assert err(native_) < 0.05 and err(native_) <= 1.1 * err(pytorch)


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dense"])
def test_int8_native_decoding_equals_the_dequantised_model(preset):
    from mixlab.ops.quant import dequantize_int8

    model = _model(preset=preset)
    deq = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in deq.named_parameters():
            if p.ndim >= 2 and "tok_embeddings" not in name and not name.endswith("gate.weight"):
                p.copy_(dequantize_int8(*quantize_int8(p), p.dtype))
    prepare_for_inference(model, quant="int8")
    assert model.native_decoder is not None
    tokens = torch.randint(0, 256, (24,))
    torch.testing.assert_close(_native_decode(model, tokens, 5), _recompute(deq, tokens, 5), atol=1e-4, rtol=1e-4)


# int8 weights x int8 activations (`int8_activations="int8"`, decode.c MX_I8_A8): the activations
# rounded per block of 32 as int4's are (`round_activations_q8`), integer dot products, then the row scale.


def _block_scaled(rows: int, D: int, g: torch.Generator) -> torch.Tensor:
    """Activations whose blocks of 32 have different magnitudes, the first block of row 0 all zero
    (unless it is the only one)."""
    x = torch.randn(rows, D, generator=g) * torch.rand(rows, D // 32, 1, generator=g).repeat_interleave(32, 1)[..., 0]
    if D > 32:
        x[0, :32] = 0.0
    return x


# 1024, 1056: batch 1's four-row kernel over whole blocks of 64 and a last block of 32; 74 rows: four
# at a time and the rest; 17 vectors: the 4-vector tiles and a partial one, past MX_A8_ROWS (16)
@pytest.mark.parametrize("D", [32, 96, 1024, 1056])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_native_int8_int8_activations_equal_the_rounded_reference(D, rows):
    g = torch.Generator().manual_seed(rows * 1000 + D)
    q, s = quantize_int8(torch.randn(74, D, generator=g))
    q[0, :5] = -128  # a code quantize_int8 never makes: the kernels' sums still exact
    x = _block_scaled(rows, D, g)
    from mixlab.ops.quant import round_activations_q8

    ref = (round_activations_q8(x).double() @ q.double().T * s.double()).float()
    got = native.linear(x, q, s, act8=True)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(native.gemv(q, x[-1], s, act8=True), ref[-1], atol=1e-4, rtol=1e-4)
    assert float((got - native.linear(x, q, s)).abs().max()) > 1e-4  # the rounding is there


@pytest.mark.parametrize(("D", "rows", "tokens"), [(1024, 70, 100), (3584, 50, 24), (96, 9, 5)])
def test_native_int8_int8_activations_many_tokens_equal_one_at_a_time_bit_for_bit(D, rows, tokens):
    """A token's outputs are the same bits alone (batch 1's kernel), in groups of 3 and among many (a
    prompt chunk): what lets batched steps equal single-request runs."""
    g = torch.Generator().manual_seed(D + tokens)
    q, s = quantize_int8(torch.randn(rows, D, generator=g))
    x = _block_scaled(tokens, D, g)
    many = native.linear(x, q, s, act8=True)
    assert torch.equal(many, torch.stack([native.gemv(q, x[j], s, act8=True) for j in range(tokens)]))
    assert torch.equal(many, torch.cat([native.linear(x[j:j + 3], q, s, act8=True) for j in range(0, tokens, 3)]))


def test_int8_linear_follows_the_mode_with_and_without_the_kernels(monkeypatch):
    """An `Int8Linear` with `act8` (its model's int8_activations="int8") multiplies x rounded to int8 per
    block of 32, natively (MX_I8_A8) or, without the kernels (MIXLAB_NATIVE=0), in PyTorch: the same
    products within float32 summation order; without `act8` the exact ones."""
    from mixlab.ops.quant import Int8Linear, dequantize_int8, round_activations_q8

    g = torch.Generator().manual_seed(5)
    lin = Int8Linear(torch.nn.Linear(256, 40, bias=False))
    x = torch.randn(3, 256, generator=g)
    w = dequantize_int8(lin.weight, lin.scale, torch.float32)
    for act8 in (True, False):
        lin.act8 = act8
        want = (round_activations_q8(x) if act8 else x) @ w.T
        with_kernels = lin(x)
        with monkeypatch.context() as m:
            m.setenv("MIXLAB_NATIVE", "0")
            without = lin(x)
        torch.testing.assert_close(with_kernels, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(without, want, atol=1e-5, rtol=1e-5)
    assert float((round_activations_q8(x) @ w.T - x @ w.T).abs().max()) > 1e-3


def test_many_int8_rows_with_int8_activations_run_natively_against_float32_ones(monkeypatch):
    """A prompt's rows (100) through an `Int8Linear` with `act8`: float32 activations take the native
    integer tiles (faster than a float32 GEMM of the dequantised weight), never `F.linear`, within
    float32 summation order of the rounded reference; bf16 ones keep dequantise-then-GEMM (AVX512-BF16
    GEMMs are as fast there)."""
    from mixlab.ops import quant, registry
    from mixlab.ops.quant import Int8Linear, dequantize_int8, round_activations_q8

    if not native.fast(torch.int8):
        pytest.skip("native int8 kernels not vectorised here")
    lin = Int8Linear(torch.nn.Linear(256, 40, bias=False))
    lin.act8 = True
    x = torch.randn(100, 256, generator=torch.Generator().manual_seed(6))
    assert registry.linear_impl(x, lin.weight, lin.scale, act8=True) == "native"
    assert registry.linear_impl(x.bfloat16(), lin.weight, lin.scale, act8=True) == "int8"

    def refuse(*args, **kwargs):
        raise AssertionError("F.linear ran")

    want = round_activations_q8(x) @ dequantize_int8(lin.weight, lin.scale, torch.float32).T
    with torch.inference_mode(), monkeypatch.context() as m:
        m.setattr(quant.F, "linear", refuse)
        got = lin(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [2, 30, 100])
def test_int8_rows_times_bf16_activations_run_natively_as_bf16(rows, monkeypatch):
    """int8 weights times exact bf16 activations (a bf16 model's `Int8Linear`, int8_activations
    "float32") up to INT8_A16_MAX_ROWS rows: the native kernel multiplies the rows as bf16 (decode.c's
    `act16`, panels from 64 rows at this width), never building a bf16 copy of the weight, as a bf16
    model's engine step does: within bf16's rounding of the weights (the panels hold code x scale in
    bf16; fewer rows multiply the exact codes) and of the output."""
    from mixlab.ops import quant, registry
    from mixlab.ops.quant import Int8Linear

    if not (native.fast(torch.int8) and native.fast(torch.bfloat16)):
        pytest.skip("native int8 x bf16 kernels need AVX512-BF16")
    lin = Int8Linear(torch.nn.Linear(256, 72, bias=False), scale_dtype=torch.bfloat16)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(7)).bfloat16()
    assert rows <= registry.INT8_A16_MAX_ROWS and registry.linear_impl(x, lin.weight, lin.scale) == "native"

    def refuse(*args, **kwargs):
        raise AssertionError("F.linear ran")

    with torch.inference_mode(), monkeypatch.context() as m:
        m.setattr(quant.F, "linear", refuse)
        got = lin(x)
    w = lin.weight.float() * lin.scale.float()[:, None]
    exact = x.float() @ w.T
    bound = (x.float().abs() @ w.abs().T + exact.abs()) * 2 ** -8  # bf16 weights, bf16 output
    assert got.dtype == torch.bfloat16
    assert bool(((got.float() - exact).abs() <= bound).all())
    assert float((got.float() - exact).abs().max()) > 0  # not compared with itself


def test_int8_activations_need_rows_of_a_multiple_of_32():
    q, s = quantize_int8(torch.randn(8, 48))
    with pytest.raises(ValueError, match="int8 activations need a multiple of 32 inputs per row, not 48"):
        native.linear(torch.randn(2, 48), q, s, act8=True)


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dense"])
def test_int8_int8_activations_native_steps_equal_the_pytorch_pass(preset):
    """With int8_activations="int8" the native batch-1 steps and PyTorch's pass (a prefill through the
    model's forward, which rounds each int8 product's input: `rounds_activations`) compute the same
    products: logits within float32 summation order, the same greedy tokens. They are not "float32"'s."""
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    out = {}
    for mode in ("int8", "float32"):
        m = prepare_for_inference(_model(preset=preset), quant="int8", int8_activations=mode)
        dec = m.native_decoder
        assert dec is not None and dec.act8 == (mode == "int8") and m.int8_activations == mode
        caches = [KVCache(m.config, batch_size=1, max_len=12, dtype=torch.float32) for _ in range(2)]
        with torch.inference_mode():
            want = m(tokens, cache=caches[0])[0, 6:]  # PyTorch's pass over all 12 tokens
            m(tokens[:, :6], cache=caches[1])
            got = torch.cat([dec.step(int(tokens[0, t]), t, caches[1]) for t in range(6, 12)])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        out[mode] = got
    assert float((out["int8"] - out["float32"]).abs().max()) > 1e-3
    # the default is exact float32 activations, today's behaviour
    default = prepare_for_inference(_model(preset=preset), quant="int8")
    assert default.native_decoder is not None and not default.native_decoder.act8


def test_int8_activations_is_checked():
    with pytest.raises(ValueError, match="int8_activations must be one of int8, float32, not 'int4'"):
        prepare_for_inference(_model(), quant="int8", int8_activations="int4")
    for quant in (None, "int4"):  # it would do nothing
        model = _model()
        with pytest.raises(ValueError, match=r"int8_activations='int8' applies to int8 weights: pass quant='int8'"):
            prepare_for_inference(model, quant=quant, int8_activations="int8")
        assert model.int8_activations is None
    with pytest.raises(ValueError, match=r"int8_activations='int8' .* multiples of 32, not dim 48"):
        prepare_for_inference(_model(dim=48, head_dim=16), quant="int8", int8_activations="int8")


def test_cli_int8_activations_flag(tmp_path):
    import argparse

    from mixlab import save_model
    from mixlab.cli.run import _load, register
    from mixlab.errors import UsageError

    model = Transformer(get_preset("tiny-moe").replace(vocab_size=32000, max_seq_len=128))  # Mixtral's vocabulary
    model.init_weights(seed=0, std=0.1)
    save_model(model, tmp_path)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    base = ["generate", "--model", str(tmp_path), "--prompt", "x", "--dtype", "float32"]
    loaded, _ = _load(parser.parse_args([*base, "--quant", "int8", "--int8-activations", "int8"]))
    assert loaded.int8_activations == "int8" and loaded.native_decoder is not None and loaded.native_decoder.act8
    with pytest.raises(UsageError, match="--int8-activations int8 applies to int8 weights: pass --quant int8"):
        _load(parser.parse_args([*base, "--quant", "int4", "--int8-activations", "int8"]))


def test_generate_takes_the_native_path_and_agrees_with_pytorch():
    model = _model()
    reference = copy.deepcopy(model)
    prepare_for_inference(model)
    calls = []
    step = model.native_decoder.step_top
    model.native_decoder.step_top = lambda *a: calls.append(1) or step(*a)
    prompt = torch.randint(3, 256, (7,)).tolist()
    experts, ref_experts = [], []
    got = generate(model, [prompt], max_new_tokens=12, stop_at_eos=False, experts_out=experts)
    ref = generate(reference, [prompt], max_new_tokens=12, stop_at_eos=False, experts_out=ref_experts)
    assert len(calls) == 12  # every step after the prefill, and the last token's for its experts
    assert got == ref
    assert torch.equal(experts[0], ref_experts[0])


@pytest.mark.parametrize("prepared", [True, False])
def test_greedy_step_equals_decode_step_and_argmax(prepared):
    """`greedy_step` (the native step's own argmax when prepared) gives the tokens `decode_step` plus
    an argmax gives, and refuses NaN logits as the samplers do."""
    model = _model()
    reference = copy.deepcopy(model)
    if prepared:
        prepare_for_inference(model)
        assert model.native_decoder is not None
    prompt = torch.randint(3, 256, (1, 6))
    caches = [KVCache(m.config, batch_size=1, max_len=20) for m in (model, reference)]
    with torch.inference_mode():
        for m, cache in zip((model, reference), caches, strict=True):
            prefill(m, prompt, torch.arange(6)[None], cache, chunk=6)
        tok = ref = 7
        for t in range(6, 16):
            tok = greedy_step(model, tok, t, caches[0])
            logits, _ = decode_step(reference, torch.tensor([[ref]]), torch.tensor([[t]]), caches[1])
            ref = int(logits.argmax())
            assert tok == ref
        with torch.no_grad():
            model.output.weight[3] = float("nan")
        with pytest.raises(GenerationError, match="NaN"):
            greedy_step(model, tok, 16, caches[0])
        if prepared:  # out-of-range ids are refused before C reads the embedding
            for bad_tok, bad_pos in ((-1, 16), (256, 16), (3, -2)):
                with pytest.raises(ValueError, match=r"token in \[0, 256\) and a position >= 0"):
                    greedy_step(model, bad_tok, bad_pos, caches[0])


def test_greedy_step_decodes_an_unprepared_model_natively(monkeypatch):
    """`greedy_step` on a model as loaded (not prepared, trainable, grad mode on: what a user's own
    decoding loop holds) ran PyTorch's forward pass, ~10x slower than the native step `generate`
    runs for the same model. It now steps natively over the model's own weights (the engine's
    `shared_decoder`), which follows a weight changed in place between steps."""
    from mixlab.model.native import NativeDecoder

    model = _model().requires_grad_(True)
    reference = copy.deepcopy(model)
    calls = []
    real = NativeDecoder.step_top
    monkeypatch.setattr(NativeDecoder, "step_top", lambda self, *a: calls.append(1) or real(self, *a))
    caches = [KVCache(m.config, batch_size=1, max_len=16) for m in (model, reference)]
    for m, cache in zip((model, reference), caches, strict=True):
        prefill(m, torch.tensor([[5, 6, 7]]), torch.arange(3)[None], cache, chunk=4)
    tok = ref = 9
    for t in range(3, 8):
        if t == 6:  # a weight changed in place (a training step) shows in the very next token
            with torch.no_grad():
                for m in (model, reference):
                    m.output.weight.neg_()  # the argmax becomes the argmin
        tok = greedy_step(model, tok, t, caches[0])
        ref = int(decode_step(reference, torch.tensor([[ref]]), torch.tensor([[t]]), caches[1])[0].argmax())
        assert tok == ref
    assert len(calls) == 5 and torch.is_grad_enabled() and model.native_decoder is None


def test_a_model_made_under_inference_mode_decodes():
    """A model built (or loaded) inside `torch.inference_mode()` holds inference tensors, which keep no
    version counter: `shared_decoder`'s check of each parameter's version raised "Inference tensors do
    not track version counter" from every `generate` call. Its tokens now equal those of the same
    weights made outside inference mode, one sequence (the lone-token native step) and several."""
    reference = _model()
    with torch.inference_mode():
        model = copy.deepcopy(reference)
    assert model.output.weight.is_inference()
    for prompts in ([[5, 6, 7]], [[5, 6, 7], [9, 3]]):
        assert generate(model, prompts, max_new_tokens=6) == generate(reference, prompts, max_new_tokens=6)


def test_batches_fall_back_to_pytorch():
    model = _model()
    reference = copy.deepcopy(model)
    prepare_for_inference(model)
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (5, 9)]
    assert generate(model, prompts, max_new_tokens=6) == generate(reference, prompts, max_new_tokens=6)


def test_prepared_model_refuses_deepcopy_and_switch_off(monkeypatch):
    model = prepare_for_inference(_model())
    with pytest.raises(TypeError, match="copy the model before prepare_for_inference"):
        copy.deepcopy(model)
    monkeypatch.setenv("MIXLAB_NATIVE", "0")
    off = prepare_for_inference(_model())
    assert getattr(off, "native_decoder", None) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("T", [1, 3, 9, 32])
def test_native_moe_equals_the_reference_loop(dtype, T):
    from mixlab.ops.moe import moe_ffn

    E, D, F, K = 6, 40, 72, 2
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, D, generator=g)
    w13, w2 = torch.randn(E, 2 * F, D, generator=g) / 6, torch.randn(E, D, F, generator=g) / 8
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weight = torch.softmax(torch.randn(T, K, generator=g), -1)
    scales: dict[str, torch.Tensor] = {}
    if dtype == torch.int8:
        (w13, s13), (w2, s2) = quantize_int8(w13), quantize_int8(w2)
        scales = dict(w13_scale_E2F=s13, w2_scale_ED=s2)
    elif dtype == torch.bfloat16:
        x, w13, w2 = x.bfloat16(), w13.bfloat16(), w2.bfloat16()
    ref = moe_ffn(x, w13, w2, idx, weight, impl="reference", **scales)
    got = moe_ffn(x, w13, w2, idx, weight, impl="native", **scales)
    assert got.dtype == x.dtype
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, ref, **tol)


def test_auto_picks_native_for_few_tokens_only_without_grad():
    from mixlab.ops.moe import choose_impl
    from mixlab.ops.registry import NATIVE_MAX_TOKENS

    w, x = torch.randn(4, 8, 8), torch.randn(3, 8)
    assert choose_impl(3, w, x) == "native"
    assert choose_impl(NATIVE_MAX_TOKENS + 1, w, torch.randn(NATIVE_MAX_TOKENS + 1, 8)) == "sorted"
    assert choose_impl(3, w.requires_grad_(), x) == "sorted"  # training needs autograd
    with torch.no_grad():
        assert choose_impl(3, w, x) == "native"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("M", [1, 2, 5, 16])
def test_native_linear_equals_matmul(dtype, M):
    x, w = torch.randn(M, 70), torch.randn(33, 70)
    if dtype == torch.int8:
        q, s = quantize_int8(w)
        got, ref = native.linear(x, q, s), x @ (q.float() * s[:, None]).T
    elif dtype == torch.bfloat16:
        x, w = x.bfloat16(), w.bfloat16()
        got, ref = native.linear(x, w).float(), (x.float() @ w.float().T)
    else:
        got, ref = native.linear(x, w), x @ w.T
    torch.testing.assert_close(got.float(), ref, atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=1e-2)


@pytest.mark.parametrize("K", [64, 100, 1056, 2867])
def test_native_bf16_tiles_equal_matmul(K):
    """bf16 weights through the 4-row x 1-4 token tiles and the row-by-row kernels for 2-5 tokens
    (every token count up to 17, row counts that leave 1-3 rows for the plain loop, K with and
    without a tail past the last 32 (K = 64, 1056: 4-token tiles through the inlined `tile4x4k32_bf16`);
    K = 2867: 5 tokens the last count the row kernels take) == the
    float32 product of the bf16-rounded activations, tightly (float32 outputs)."""
    g = torch.Generator().manual_seed(K)
    for N in (4, 7, 9):
        w = torch.randn(N, K, generator=g).bfloat16()
        for M in (1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17):
            x = torch.randn(M, K, generator=g)
            ref = x.bfloat16().float() @ w.float().T
            # float32 sums in another order: the rounding grows with K
            torch.testing.assert_close(native.linear(x, w), ref, atol=1e-5 * max(1.0, K / 1056), rtol=1e-5)


@pytest.mark.parametrize("K", [1024, 2080, 2100])
def test_native_bf16_panels_equal_matmul(K):
    """bf16 weights against many tokens (prompt chunks): the packed 32-row panels (`gemm_panels_bf16`,
    from 64 tokens at K <= 2048 and from 24 above), last token tiles of every width 1-12 (token
    counts around the thresholds and past several tiles), row counts that leave 16 or 1-3 rows to
    the tiles and the plain loop (and a panel with no next one to prefetch), and K = 2100 (not a
    multiple of 32: the tiles instead) == the float32 product of the bf16-rounded activations."""
    g = torch.Generator().manual_seed(K)
    for N in (32, 48, 67):
        w = torch.randn(N, K, generator=g).bfloat16()
        for M in (23, 24, 25, 26, 27, 31, 32, 33, 34, 35, 36, 40, 41, 42, 43, 45, 46, 63, 64, 65, 70, 71, 72, 130):
            x = torch.randn(M, K, generator=g)
            ref = x.bfloat16().float() @ w.float().T
            # float32 sums in other orders (each lane sums its pairs in sequence); |y| ~ sqrt(K) ~ 32-46
            torch.testing.assert_close(native.linear(x, w), ref, atol=4e-5 * K / 1024, rtol=1e-5)


@pytest.mark.parametrize("amx", [False, True], ids=["avx512", "amx"])
@pytest.mark.parametrize("K", [64, 1024, 3584])
def test_bf16_weights_kept_in_panels_equal_matmul(K, amx):
    """bf16 weights kept a second time in 32-row panels (`pack_bf16`, what `NativeDecoder.pack`
    makes): the layout is mixlab.h's (checked element by element), and `linear_packed` (whole panels
    from them: the streaming kernels, tokens in even chunks of at most 12, or on AMX's tile unit in
    groups of 32 per panel, then the rest as one or two tiles of tokens; the rows outside whole panels from the plain
    rows) == the float32 product of the bf16-rounded activations, for every token count 1-17 and
    past several tiles, with 1 and 2 threads (row ranges that start and end inside a panel: 2
    threads split 96 rows at 48, 160 at 80). On AMX each token's outputs from the panels are the
    same bits alone and among others."""
    was = native.amx()
    try:
        if native.amx(amx) != amx:
            pytest.skip("no AMX tile unit (or no permission for it)")
        _panels_equal_matmul(K, amx)
    finally:
        native.amx(was)


def test_amx_switch():
    """`native.amx()` asks, `amx(False)` / `amx(True)` switch (True only where the CPU and Linux allow
    the tile unit), anything else is refused by name; `MIXLAB_AMX=0` keeps a fresh process off it."""
    was = native.amx()
    try:
        assert native.amx(False) is False and native.amx() is False
        assert native.amx(True) == was or not was
    finally:
        native.amx(was)
    with pytest.raises(TypeError, match=r"amx\(on='yes'\): expected True, False or None"):
        native.amx("yes")  # type: ignore[arg-type]
    code = "from mixlab.ops import native; native.load(); print(native.amx())"
    for env, want in (("0", "False"), ("1", str(was))):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MIXLAB_AMX": env},
                             capture_output=True, text=True, timeout=120, check=True)
        assert out.stdout.strip() == want, (env, out.stderr)


def _panels_equal_matmul(K: int, amx: bool) -> None:
    g = torch.Generator().manual_seed(K)
    w = torch.randn(64, K, generator=g).bfloat16()
    P = native.pack_bf16(w)
    r, k = torch.meshgrid(torch.arange(64), torch.arange(K), indexing="ij")
    at = (r // 32) * 32 * K + (k // 2) * 64 + 2 * (r % 32) + k % 2  # mixlab.h, mx_pack_bf16
    assert torch.equal(P.view(torch.int16).flatten()[at.flatten()], w.view(torch.int16).flatten())
    threads = torch.get_num_threads()
    try:
        for nt, N in ((1, 64), (2, 96), (2, 160)):
            torch.set_num_threads(nt)
            w = torch.randn(N, K, generator=g).bfloat16()
            P = native.pack_bf16(w)
            for M in (*range(1, 18), 24, 25, 32, 33, 40, 65):
                x = torch.randn(M, K, generator=g)
                ref = x.bfloat16().float() @ w.float().T
                got = native.linear_packed(x, w, P)
                torch.testing.assert_close(got, ref, atol=4e-5 * max(1.0, K / 1024), rtol=1e-5)
                if amx and nt == 1 and M in (5, 17, 33):  # every row in a whole panel
                    for i in (0, M // 2, M - 1):
                        assert torch.equal(native.linear_packed(x[i : i + 1], w, P)[0], got[i])
    finally:
        torch.set_num_threads(threads)


def test_panels_refuse_what_they_cannot_hold():
    for w in (torch.randn(32, 64), torch.randn(40, 64).bfloat16(), torch.randn(32, 48).bfloat16()):
        assert not native.packable(w)
        with pytest.raises(ValueError, match="pack_bf16 needs a bf16 matrix with rows and row length multiples of 32"):
            native.pack_bf16(w)
    w = torch.randn(3, 32, 64).bfloat16()  # a stack of experts: 96 rows
    assert native.packable(w) and native.pack_bf16(w).shape == w.shape
    for x, P in ((torch.randn(2, 64), torch.empty(64, 32, dtype=torch.bfloat16)),  # panels of another shape
                 (torch.randn(2, 96), native.pack_bf16(w[0]))):  # activations of another width
        with pytest.raises(ValueError, match=r"linear_packed needs a bf16 matrix \[X, \d+\] and its panels"):
            native.linear_packed(x, w[0], P)


def _compile_stub(tmp_path, source: str):
    (tmp_path / "stub.c").write_text(source)
    out = tmp_path / "stub.so"
    cc = native.command(native.compiler())
    subprocess.run([*cc, "-shared", "-fPIC", str(tmp_path / "stub.c"), "-o", str(out)], check=True)
    return out


def test_a_library_of_another_abi_version_is_refused(tmp_path):
    """decode.c itself, built with a different MX_ABI_VERSION: refused with a message, never called."""
    out = native.compile_library(native.compiler(), tmp_path / "old.so", defines=("MX_ABI_VERSION=1",))
    expects = rf"ABI version 1, but this mixlab expects {native.ABI_VERSION}; rebuild"
    with pytest.raises(native.NativeABIError, match=expects):
        native.load_library(out)


_ENTRY = "long long mx_sizeof(int w) { long long s[] = {136, 152, 120, 176, 272}; return s[w]; }\n"
_ABI = f"int mx_abi_version(void) {{ return {native.ABI_VERSION}; }}\n"
_SIMD = "int mx_simd(void) { return 0; }\nint mx_cpu_features(void) { return 0; }\n"


@pytest.mark.parametrize(("source", "message"), [
    ("int mx_gemv(void) { return 0; }", r"no mx_abi_version; a library from an older decode.c"),
    (_ABI + _ENTRY, rf"ABI {native.ABI_VERSION} but an entry point is missing"),
    (_ABI + "int mx_simd(void) { return 3; }\nint mx_cpu_features(void) "
     "{ return 1; }\nlong long mx_sizeof(int w) { return 0; }\nlong long mx_offsetof(int w, int f) { return -1; }",
     r"built with SIMD bits 3 but this CPU has 1"),
    (_ABI + _SIMD + "long long mx_sizeof(int w) { return w == 0 ? 96 : 0; }"
     "\nlong long mx_offsetof(int w, int f) { return -1; }", r"structure Layer is 96 bytes in the native library "
     r"but 136 in Python"),
    (_ABI + _SIMD + _ENTRY + "long long mx_offsetof(int w, int f) "
     "{ return f < 17 ? (f == 3 ? 999 : f * 8) : -1; }",
     r"structure Layer field 3 \(wo\) is at offset 999 in the native library but 24 in Python"),
])
def test_a_mismatched_library_is_refused(tmp_path, source, message):
    with pytest.raises(native.NativeABIError, match=message):
        native.load_library(_compile_stub(tmp_path, source))


def test_struct_sizes_agree_with_the_library():
    lib = native.library()
    assert lib is not None
    sizes = [ctypes.sizeof(s) for s in native.STRUCTS]
    assert [lib.mx_sizeof(i) for i in range(6)] == sizes == [136, 152, 120, 176, 312, 24]
    assert lib.mx_offsetof(1, 10) == native.Model.eps.offset == 80 and lib.mx_offsetof(0, 17) == -1


def _prefilled(model: Transformer, n: int = 6) -> tuple[KVCache, torch.Tensor]:
    cache = KVCache(model.config, batch_size=1, max_len=32)
    tokens = torch.randint(0, 256, (1, n + 1))
    with torch.inference_mode():
        prefill(model, tokens[:, :n], torch.arange(n)[None], cache, chunk=512)
    return cache, tokens[:, n:]


@pytest.mark.parametrize("quant", [None, "int8"])
def test_torch_compile_fullgraph_of_a_native_decode_step_equals_eager(quant):
    """generate's decode step of a prepared model (one `torch.ops.mixlab.decode_step`) compiles
    with fullgraph=True (no graph break) and gives eager's logits and cache."""
    model = prepare_for_inference(_model(), quant=quant)
    cache, token = _prefilled(model)
    cache2 = copy.deepcopy(cache)
    pos = torch.tensor([[cache.t]])
    step = torch.compile(lambda tok, p, c: decode_step(model, tok, p, c)[0], fullgraph=True)
    with torch.inference_mode():
        ref = decode_step(model, token, pos, cache)[0]
        got = step(token, pos, cache2)
    assert torch.equal(got, ref)
    assert cache2.t == cache.t and torch.equal(cache2.pos_BC, cache.pos_BC)
    assert all(torch.equal(a, b) for a, b in zip(cache.k + cache.v, cache2.k + cache2.v, strict=True))


def test_torch_compile_fullgraph_of_a_batched_decode_step_equals_eager():
    """Two sequences (PyTorch's forward, whose linears and experts are `torch.ops.mixlab.linear` and
    `.moe`) compile with fullgraph=True and equal eager."""
    model = prepare_for_inference(_model())
    cache = KVCache(model.config, batch_size=2, max_len=32)
    tokens = torch.randint(0, 256, (2, 7))
    with torch.inference_mode():
        prefill(model, tokens[:, :6], torch.arange(6).expand(2, 6), cache, chunk=512)
    cache2 = copy.deepcopy(cache)
    pos = torch.full((2, 1), 6)
    fn = torch.compile(lambda tok, p, c: model(tok, positions_BT=p, cache=c), fullgraph=True)
    with torch.inference_mode():
        ref = model(tokens[:, 6:], positions_BT=pos, cache=cache)
        got = fn(tokens[:, 6:], pos, cache2)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_torch_compile_runs_the_native_operators():
    """The compiled graph calls the native kernels as opaque operators (no escape to PyTorch's)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = prepare_for_inference(_model())
    tokens = torch.randint(0, 256, (1, 5))  # few tokens: the native MoE and linears
    backend = CompileCounterWithBackend("eager")
    seen: set[str] = set()

    def record(gm: torch.fx.GraphModule, inputs: list) -> object:
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return backend(gm, inputs)

    with torch.inference_mode():
        ref = model(tokens)
        got = torch.compile(model, backend=record, fullgraph=True)(tokens)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert {"mixlab.moe", "mixlab.linear"} <= seen, sorted(seen)


def test_a_model_whose_tensors_disagree_with_its_config_is_refused_not_read_past_the_end():
    """Expert parallelism keeps E / ep experts per process while the config still says E: a native
    decoder over such a model would read past the expert tensors (C trusts the shapes). It is
    refused with the tensor's name, and the engine's shared decoder falls back to PyTorch."""
    from torch import nn

    from mixlab.model import native as native_decoding

    model = _model()
    native.load()
    experts = model.layers[1].ffn.experts
    with torch.no_grad():
        experts.w13 = nn.Parameter(experts.w13[:2].clone())
    with pytest.raises(ValueError, match=r"layer 1 w13 has shape \(2, "):
        native_decoding.NativeDecoder(model, native.library())
    assert native_decoding.shared_decoder(model) is None


def _assert_generate_equals_recompute(model: Transformer, prompts: list[list[int]], n: int = 4) -> None:
    """`generate`'s greedy tokens (the engine: native steps where it can) equal a full recompute's."""
    got = generate(model, prompts, max_new_tokens=n, stop_at_eos=False)
    for p, new in zip(prompts, got, strict=True):
        ids = list(p)
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert new == ids[len(p):]


def test_more_experts_than_the_kernels_hold_run_through_pytorch():
    """decode.c's stack arrays hold `native.MAX_EXPERTS` experts: a model with more (the config
    allows 4096) decodes and runs engine steps through PyTorch's experts, with the same tokens as a
    full recompute; it used to fail with 'native MoE supports up to 256 experts' on its first
    step of several tokens (the registry chose the native MoE kernel for any stack). Preparing it
    says why it decodes without the native step."""
    model = _model(n_layers=1, dim=32, ffn_dim=16, moe=MoEConfig(num_experts=native.MAX_EXPERTS + 1, top_k=2))
    _assert_generate_equals_recompute(model, [[5, 9, 2, 7], [1, 3]])
    with pytest.warns(UserWarning, match=r"no native decoding \(native decoding supports up to 256 experts .* not "
                                         r"257 and 16\): this model decodes with PyTorch's kernels"):
        prepare_for_inference(model, quant="int8")  # it fell back without a word
    assert model.native_decoder is None  # the experts' int8 kernels still run
    with torch.inference_mode():
        model(torch.tensor([[5, 9, 2, 7]]))


@pytest.mark.parametrize("window", [2**31, 2**32 + 3])
def test_a_window_longer_than_32_bits_is_no_window(window):
    """A sliding window longer than the context hides nothing. The engine step's chunk attention
    compared positions in 32 bits: a window of 2**31 hid every key (NaN logits), one of 2**32 + 3
    attended to 3 tokens. Now the tokens equal a full recompute's."""
    model = _model(sliding_window=window, max_seq_len=64)
    _assert_generate_equals_recompute(model, [list(range(3, 23)), list(range(40, 49))])


def test_a_cache_made_for_another_model_is_refused():
    """A KVCache of another model's shape (4 kv heads of 8 where the model has 2 of 16: the same
    bytes) was taken by the native step, which read and wrote it with this model's strides; a
    smaller one was written past its end (heap corruption: 'malloc(): unaligned tcache chunk').
    Every step refuses it, naming both shapes; the decoder itself checks the buffers it binds."""
    model = _model()
    prepare_for_inference(model)
    other = model.config.replace(n_kv_heads=4, head_dim=8)
    cache = KVCache(other, batch_size=1, max_len=16)
    with pytest.raises(ValueError, match=r"cache was made for another model: 2 layers of 4 kv heads of 8, where this "
                                         r"one has 2 of 2 of 16"):
        greedy_step(model, 1, 0, cache)
    with pytest.raises(ValueError, match="another model"):
        decode_step(model, torch.tensor([[1]]), torch.tensor([[0]]), cache)
    with pytest.raises(ValueError, match="another model"):
        prefill(model, torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), cache, chunk=4)
    with pytest.raises(ValueError, match=r"needs this model's cache: 2 layers of keys and values \(1, 2, 16, 16\)"):
        model.native_decoder.step(1, 0, cache)
    assert cache.t == 0


def test_the_kernel_operators_refuse_shapes_that_disagree():
    """torch.ops.mixlab.linear / moe with activations wider than the weights' rows read past the
    weights and returned numbers (F.linear raises); now a ValueError naming both."""
    x, w = torch.randn(2, 64), torch.randn(8, 32)
    with pytest.raises(ValueError, match=r"linear: weights \(8, 32\) \(32 inputs per row\) do not take activations "
                                         r"of width 64"):
        torch.ops.mixlab.linear(x, w)
    q, s = quantize_int8(w)
    with pytest.raises(ValueError, match=r"with scales \(7,\)"):
        torch.ops.mixlab.linear(x[:, :32], q, s[:7])
    w13, w2 = torch.randn(4, 32, 32), torch.randn(4, 32, 16)
    idx, weight = torch.tensor([[0, 1]] * 3), torch.full((3, 2), 0.5)
    with pytest.raises(ValueError, match=r"moe w13: weights \(4, 32, 32\)"):
        torch.ops.mixlab.moe(torch.randn(3, 64), w13, w2, idx, weight)
    with pytest.raises(ValueError, match=r"moe w2: weights \(4, 32, 8\)"):
        torch.ops.mixlab.moe(torch.randn(3, 32), w13, w2[..., :8], idx, weight)
    with pytest.raises(ValueError, match=r"idx and weight \[T=3, K\]"):
        torch.ops.mixlab.moe(torch.randn(3, 32), w13, w2, idx[:2], weight[:2])
    assert torch.ops.mixlab.moe(torch.randn(3, 32), w13, w2, idx, weight).shape == (3, 32)


def test_native_decoding_of_a_router_of_tied_logits_equals_full_recompute():
    """Zero router rows (upcycling's --router-init zeros) tie every logit: the native router and the
    forward pass take the same experts (the lowest indices), so the logits agree."""
    model = _model()
    with torch.no_grad():
        for block in model.layers:
            block.ffn.gate.weight.zero_()
    prepare_for_inference(model)
    tokens = torch.randint(0, 256, (16,))
    torch.testing.assert_close(_native_decode(model, tokens, 5), _recompute(model, tokens, 5), atol=1e-5, rtol=1e-5)


def test_a_prepared_model_refuses_copy_and_pickle_by_name():
    """pickle.dumps / torch.save of a prepared model failed on "Can't pickle local object
    'CDLL.__init__.<locals>._FuncPtr'" (deepcopy was refused already); before preparing, both work."""
    import io
    import pickle

    model = _model(vocab_size=64)
    assert pickle.loads(pickle.dumps(model)).config == model.config
    prepared = prepare_for_inference(copy.deepcopy(model))
    assert prepared.native_decoder is not None
    with pytest.raises(TypeError, match="cannot be copied: copy the model before prepare_for_inference"):
        copy.deepcopy(prepared)
    for dump in (pickle.dumps, lambda m: torch.save(m, io.BytesIO())):
        with pytest.raises(TypeError, match=r"^a model prepared for inference cannot be pickled .*before "
                                            r"prepare_for_inference"):
            dump(prepared)
