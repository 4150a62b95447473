"""Int4 weight-only quantisation (`mixlab.ops.quant`): llama.cpp Q4_0's bytes and arithmetic at groups
of 32, the model equal to its dequantised weights in every path (prefill, cached decoding, every MoE
implementation), and `prepare_for_inference(quant="int4")`."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mixlab.cache import KVCache
from mixlab.config import get_preset
from mixlab.model import MoEBlock, Transformer
from mixlab.model.formats import Int4Experts
from mixlab.model.inference import inference_format, prepare_for_inference
from mixlab.ops.moe import IMPLS, moe_ffn
from mixlab.ops.quant import (
    Int4Linear,
    dequantize_int4,
    int4_linear,
    quantize_int4,
    round_activations_q8,
    unpack_int4,
)


def test_group_32_is_llama_cpp_q4_0_byte_for_byte():
    gguf = pytest.importorskip("gguf")
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    w[0, :32] = 0.0  # an all-zero block: scale 0, codes 8
    q, s = quantize_int4(w, 32)
    raw = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0).reshape(48, 8, 18)
    np.testing.assert_array_equal(np.ascontiguousarray(raw[..., :2]).view(np.float16)[..., 0], s.numpy())
    np.testing.assert_array_equal(raw[..., 2:].reshape(48, 128), q.numpy())
    deq = gguf.quants.dequantize(raw.reshape(48, -1), gguf.GGMLQuantizationType.Q4_0)
    np.testing.assert_array_equal(dequantize_int4(q, s, torch.float32).numpy(), deq)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantisation_error_is_bounded_by_half_a_step(group):
    w = torch.randn(3, 16, 512)  # stacked, as experts are
    q, s = quantize_int4(w, group)
    assert q.shape == (3, 16, 256) and s.shape == (3, 16, 512 // group) and q.dtype == torch.uint8
    codes = unpack_int4(q)
    assert int(codes.max()) <= 15
    err = (dequantize_int4(q, s, torch.float32) - w).abs().reshape(3, 16, -1, group)
    step = s.float().abs()[..., None]
    # Round to nearest: half a step, except that Q4_0 maps the extreme to -8, so the other sign's
    # largest values clamp at +7 (a whole step); plus the float16 rounding of the scale.
    assert bool((err <= step * 1.01).all())
    assert float((err <= step * 0.51).float().mean()) > 0.95


def test_bad_groups_are_clear_errors():
    with pytest.raises(ValueError, match="group size must be one of"):
        quantize_int4(torch.randn(4, 64), 16)
    with pytest.raises(ValueError, match="multiple of 64 inputs per row, not 96"):
        quantize_int4(torch.randn(4, 96), 64)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_int4_linear_equals_dequantise_then_matmul(rows):
    lin = torch.nn.Linear(256, 96, bias=False)
    m = Int4Linear(lin, group=64)
    x = torch.randn(rows, 256)
    ref = x @ dequantize_int4(m.weight, m.scale, torch.float32).T
    torch.testing.assert_close(m(x), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(int4_linear(x, m.weight, m.scale), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", [k for k in IMPLS if k != "triton"])  # int4 is a CPU weight format
def test_every_moe_impl_takes_int4_experts(impl):
    if impl == "native":
        _native()  # loads the kernels (or skips)
    E, F, D, T, K = 4, 64, 128, 5, 2
    w13, w2 = torch.randn(E, 2 * F, D) * 0.1, torch.randn(E, D, F) * 0.1
    (q13, s13), (q2, s2) = quantize_int4(w13, 32), quantize_int4(w2, 32)
    x = torch.randn(T, D)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    mix = torch.softmax(torch.randn(T, K), -1)
    ref = moe_ffn(x, dequantize_int4(q13, s13, torch.float32), dequantize_int4(q2, s2, torch.float32), idx, mix,
                  impl="reference")
    got = moe_ffn(x, q13, q2, idx, mix, impl=impl, w13_scale_E2F=s13, w2_scale_ED=s2)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def _model(preset: str) -> Transformer:
    model = Transformer(get_preset(preset))
    model.init_weights(seed=0, std=0.1)
    return model.eval()


def _prefill_then_decode(model: Transformer, tokens_BT: torch.Tensor, n_prompt: int) -> torch.Tensor:
    B, T = tokens_BT.shape
    cache = KVCache(model.config, batch_size=B, max_len=T, dtype=torch.float32)
    with torch.inference_mode():
        outs = [model(tokens_BT[:, :n_prompt], cache=cache)]
        for t in range(n_prompt, T):
            outs.append(model(tokens_BT[:, t : t + 1], cache=cache))
    return torch.cat(outs, dim=1)


def _dequantised_copy(model: Transformer, group: int) -> Transformer:
    deq = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in deq.named_parameters():
            if p.ndim >= 2 and "tok_embeddings" not in name and not name.endswith("gate.weight"):
                p.copy_(dequantize_int4(*quantize_int4(p, group), p.dtype))
    return deq


@pytest.mark.parametrize(("preset", "group"), [("tiny-moe", 32), ("tiny-moe", 64), ("tiny-dense", 32)])
@pytest.mark.parametrize("batch", [1, 2])
def test_int4_model_equals_its_dequantised_weights(preset, group, batch):
    """With exact activations (int4_activations="float32"; "int8" rounds them: the tests below)."""
    model = _model(preset)
    tokens = torch.randint(0, 256, (batch, 12), generator=torch.Generator().manual_seed(1))
    ref = _prefill_then_decode(_dequantised_copy(model, group), tokens, 8)
    int4 = prepare_for_inference(copy.deepcopy(model), quant="int4", group=group, int4_activations="float32")
    assert isinstance(int4.layers[0].attn.wqkv, Int4Linear) and int4.output.weight.dtype == torch.uint8
    if isinstance(int4.layers[0].ffn, MoEBlock):
        assert int4.layers[0].ffn.experts.w13.dtype == torch.uint8
    torch.testing.assert_close(_prefill_then_decode(int4, tokens, 8), ref, atol=1e-4, rtol=1e-4)


def test_int4_generate_through_the_public_api():
    import mixlab

    model = prepare_for_inference(_model("tiny-moe"), quant="int4")
    out = mixlab.generate(model, [[1, 5, 9]], max_new_tokens=5)
    assert len(out[0]) == 5


# ------------------------------------------------------------------------------------------------
# The native AVX-512 kernels (decode.c, MX_Q4_*) equal the reference dequantise-then-matmul.


def _native():
    from mixlab.ops import native

    if native.load() is None or not native.fast(torch.uint8):
        pytest.skip("native kernels unavailable or not vectorised here (no AVX-512)")
    return native


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_native_int4_linear_equals_dequantise_then_matmul(group, rows):
    native = _native()
    q, s = quantize_int4(torch.randn(80, 384), group)
    x = torch.randn(rows, 384)
    ref = x @ dequantize_int4(q, s, torch.float32).T
    torch.testing.assert_close(native.linear(x, q, s), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.ops.mixlab.linear(x, q, s), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(native.gemv(q, x[0], s), ref[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("T", [1, 5])
def test_native_int4_moe_equals_the_reference(T):
    _native()
    E, F, D, K = 4, 64, 128, 2
    q13, s13 = quantize_int4(torch.randn(E, 2 * F, D) * 0.1, 32)
    q2, s2 = quantize_int4(torch.randn(E, D, F) * 0.1, 32)
    x = torch.randn(T, D)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    mix = torch.softmax(torch.randn(T, K), -1)
    ref = moe_ffn(x, dequantize_int4(q13, s13, torch.float32), dequantize_int4(q2, s2, torch.float32), idx, mix,
                  impl="reference")
    got = moe_ffn(x, q13, q2, idx, mix, impl="native", w13_scale_E2F=s13, w2_scale_ED=s2)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("preset", "group"), [("tiny-moe", 32), ("tiny-moe", 64), ("tiny-dense", 32)])
def test_native_int4_decode_steps_equal_the_dequantised_model(preset, group):
    _native()
    model = _model(preset)
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    ref = _prefill_then_decode(_dequantised_copy(model, group), tokens, 6)
    int4 = prepare_for_inference(copy.deepcopy(model), quant="int4", group=group, int4_activations="float32")
    assert getattr(int4, "native_decoder", None) is not None
    dec = int4.native_decoder
    assert not dec.act8
    cache = KVCache(int4.config, batch_size=1, max_len=12, dtype=torch.float32)
    with torch.inference_mode():
        outs = [int4(tokens[:, :6], cache=cache)[0]]
        for t in range(6, 12):
            outs.append(dec.step(int(tokens[0, t]), t, cache))
    torch.testing.assert_close(torch.cat(outs)[None], ref, atol=1e-4, rtol=1e-4)


# int4 x int8 activations (MX_Q4_*_A8, `int4_activations="int8"`): activations rounded per block of
# 32 as llama.cpp's Q8_0 rounds them, then integer dot products. Compared with the reference
# dequantise-then-matmul on the same rounded activations (1e-4: only float summation order differs),
# and with the exact product within the rounding's worst case (half a step, max|x| / 254, per input).


def test_round_activations_q8_is_llama_cpp_q8_0():
    gguf = pytest.importorskip("gguf")
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(3)) * 3
    x[0, :32] = 0.0  # an all-zero block
    raw = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0)
    deq = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0)
    # Q8_0 stores d as float16; the kernels keep it in float32: equal codes, scales within f16 rounding
    torch.testing.assert_close(round_activations_q8(x), torch.from_numpy(deq), atol=0, rtol=2e-3)
    ours = round_activations_q8(x).reshape(6, 8, 32)
    step = x.reshape(6, 8, 32).abs().amax(-1, keepdim=True) / 127
    assert bool(((ours - x.reshape(6, 8, 32)).abs() <= step * 0.5001).all())


def test_native_int8_rounding_is_round_activations_q8_bit_for_bit():
    """decode.c's `quant_a8` rounds as `round_activations_q8` does, bit for bit: through an int4
    identity matrix (each row one weight 1, exact in int4) the kernel returns the rounded inputs,
    with ties (x * 127 / max|x| = k + 1/2) to even, an all-zero block and a partial block of 128."""
    native = _native()
    D = 352  # 2 blocks of 128 and a partial one
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, D, generator=g) * torch.rand(5, D // 32, 1, generator=g).repeat_interleave(32, 1)[..., 0]
    x[0, :32] = 0.0
    x[1, :32] = torch.arange(32) - 15.5  # with max|x| = 127 below: x * 127 / 127 at every k + 1/2
    x[1, 0] = 127.0
    q, s = quantize_int4(torch.eye(D), 32)
    assert torch.equal(dequantize_int4(q, s, torch.float32), torch.eye(D))
    assert torch.equal(native.linear(x, q, s, act8=True), round_activations_q8(x))
    assert torch.equal(native.gemv(q, x[2], s, act8=True), round_activations_q8(x[2:3])[0])


# 1120, 1664: batch 1's four-row kernel over several full blocks of 128, then a partial one
@pytest.mark.parametrize(("group", "D"), [(32, 352), (32, 384), (32, 1120), (32, 1664), (64, 320), (64, 512),
                                          (128, 384), (128, 640)])
@pytest.mark.parametrize("rows", [1, 3, 5, 17])
def test_native_int4_int8_activations_equal_the_rounded_reference(group, D, rows):
    native = _native()
    g = torch.Generator().manual_seed(rows * 1000 + D)
    q, s = quantize_int4(torch.randn(74, D, generator=g), group)  # 74: batch 1 runs rows 4 at a time, and the rest
    x = torch.randn(rows, D, generator=g) * torch.rand(rows, D // 32, 1, generator=g).repeat_interleave(32, 1)[..., 0]
    x[0, :32] = 0.0  # an all-zero block: scale 0
    w = dequantize_int4(q, s, torch.float32)
    ref = round_activations_q8(x) @ w.T
    torch.testing.assert_close(native.linear(x, q, s, act8=True), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(native.gemv(q, x[-1], s, act8=True), ref[-1], atol=1e-4, rtol=1e-4)
    # against the exact product: within the rounding's worst case, sum over blocks of d/2 * sum |w|
    exact = x @ w.T
    half_step = (x.reshape(rows, -1, 32).abs().amax(-1) / 254).repeat_interleave(32, 1)  # [rows, D]
    bound = half_step @ w.abs().T
    assert bool(((native.linear(x, q, s, act8=True) - exact).abs() <= bound * 1.001 + 1e-4).all())


# 64 tokens and more (24 for rows longer than 2048) run in panels (decode.c's `gemm_panels_a8`), fewer
# through `gemm_rows_a8`: each token's outputs must be the same bits either way (the bf16 panels
# before them, weights and activations rounded to bf16, were not: ~1e-3 apart), and the rounded
# reference's within float32 summation order.
@pytest.mark.parametrize(("group", "D", "rows", "tokens"), [(32, 1024, 70, 100), (64, 320, 40, 64),
                                                             (128, 640, 33, 130), (32, 3584, 50, 24),
                                                             (32, 1120, 48, 65)])
def test_native_int4_int8_activations_many_tokens_equal_one_at_a_time_bit_for_bit(group, D, rows, tokens):
    native = _native()
    g = torch.Generator().manual_seed(D + tokens)
    q, s = quantize_int4(torch.randn(rows, D, generator=g), group)  # rows: whole panels of 16 and the rest
    block_scales = torch.rand(tokens, D // 32, 1, generator=g).repeat_interleave(32, 1)[..., 0]
    x = torch.randn(tokens, D, generator=g) * block_scales
    x[0, :32] = 0.0
    many = native.linear(x, q, s, act8=True)
    assert torch.equal(many, torch.stack([native.gemv(q, x[j], s, act8=True) for j in range(tokens)]))
    assert torch.equal(many, torch.cat([native.linear(x[j:j + 3], q, s, act8=True) for j in range(0, tokens, 3)]))
    ref = round_activations_q8(x) @ dequantize_int4(q, s, torch.float32).T
    torch.testing.assert_close(many, ref, atol=1e-4 * D / 1024, rtol=1e-4)


def test_a_decoding_requests_logprobs_do_not_depend_on_a_prompt_chunk_in_its_steps(monkeypatch):
    """int4 weights x int8 activations (the default) in a float32 model: a request's tokens and
    logprobs are bit for bit its run alone's while a 100-token prompt chunk shares its step (whose
    products of 64 rows and more ran in bf16 panels: the decoding token got other numbers)."""
    from mixlab.engine import Engine, SamplingParams
    from mixlab.engine.runner import Runner

    _native()
    int4 = prepare_for_inference(_model("tiny-moe"), quant="int4")
    assert int4.native_decoder is not None and int4.native_decoder.act8
    g = torch.Generator().manual_seed(11)
    short, long = (torch.randint(3, 256, (n,), generator=g).tolist() for n in (10, 100))
    forward = Runner.forward
    steps: list[list[int]] = []  # each step's items' token counts

    def spy(self, items):
        steps.append([len(it.tokens) for it in items])
        return forward(self, items)

    monkeypatch.setattr(Runner, "forward", spy)

    def run(beside: bool):
        engine = Engine(int4, max_batch=2, prefill_chunk=128)
        h = engine.submit(short, SamplingParams(max_tokens=6, logprobs=0, ignore_eos=True))
        engine.step()  # its prompt
        engine.step()  # its first decoding step alone
        if beside:
            engine.submit(long, SamplingParams(max_tokens=2, ignore_eos=True))
        engine.run_until_idle()
        outs = [o for o in h.result() if o.token_id is not None]
        return [o.token_id for o in outs], [o.logprob for o in outs]

    with torch.inference_mode():
        alone = run(False)
        steps.clear()
        shared = run(True)
    assert [1, 100] in steps or [100, 1] in steps  # the chunk and a decoding token in one step
    assert shared == alone


@pytest.mark.parametrize(("preset", "group"), [("tiny-moe", 32), ("tiny-moe", 64), ("tiny-dense", 32)])
def test_native_int4_decode_with_int8_activations(preset, group):
    """A decode step with int8 activations equals the exact (float32) one within the activations'
    rounding: logits within 2% (relative Frobenius) and the same greedy tokens on a random model."""
    _native()
    model = _model(preset)
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    outs = {}
    for mode in ("float32", "int8"):
        int4 = prepare_for_inference(copy.deepcopy(model), quant="int4", group=group, int4_activations=mode)
        dec = int4.native_decoder
        assert dec is not None and dec.act8 == (mode == "int8")
        cache = KVCache(int4.config, batch_size=1, max_len=12, dtype=torch.float32)
        with torch.inference_mode():
            int4(tokens[:, :6], cache=cache)
            outs[mode] = torch.cat([dec.step(int(tokens[0, t]), t, cache) for t in range(6, 12)])
    a, b = outs["int8"], outs["float32"]
    assert float((a - b).norm() / b.norm()) < 0.02
    assert int((a.argmax(-1) == b.argmax(-1)).sum()) >= 5  # of 6 (a float32 mean of 5/6 is below 5 / 6)


# With int4_activations="int8", PyTorch's pass (the model's forward: `generate`'s prefill, an engine
# step of more tokens than the native call takes, adapters' steps) rounds each int4 product's input
# as the native steps do, so every path computes the same products: they differed by 0.1-0.2 in
# logprob. With "float32" neither rounds.


@pytest.mark.parametrize("mode", ["int8", "float32"])
@pytest.mark.parametrize(("preset", "group"), [("tiny-moe", 32), ("tiny-moe", 64), ("tiny-dense", 32)])
def test_pytorch_pass_equals_the_native_step(preset, group, mode):
    """The logits of PyTorch's pass over int4 weights (a prefill through the model's forward) equal
    the native decoding steps' at the same positions within float32 summation order."""
    _native()
    int4 = prepare_for_inference(_model(preset), quant="int4", group=group, int4_activations=mode)
    dec = int4.native_decoder
    assert dec is not None and dec.act8 == (mode == "int8")
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    caches = [KVCache(int4.config, batch_size=1, max_len=12, dtype=torch.float32) for _ in range(2)]
    with torch.inference_mode():
        want = int4(tokens, cache=caches[0])[0, 6:]  # PyTorch's pass over all 12 tokens
        int4(tokens[:, :6], cache=caches[1])
        got = torch.cat([dec.step(int(tokens[0, t]), t, caches[1]) for t in range(6, 12)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# A model's numerics are its `int4_activations` alone: PyTorch's pass rounded only once the native
# kernels were loaded and where they had AVX512-VNNI, so the same model's logits moved by ~1e-2 after
# anything in the process prepared a model, and differed between machines and with MIXLAB_NATIVE=0.


@pytest.mark.parametrize("mode", ["int8", "float32"])
def test_int4_linear_without_the_kernels_follows_the_mode(mode, monkeypatch):
    """Without the native kernels (MIXLAB_NATIVE=0) an int4 linear is PyTorch's matmul of the
    dequantised weight by x, rounded to int8 per block of 32 in mode "int8", bit for bit."""
    monkeypatch.setenv("MIXLAB_NATIVE", "0")
    g = torch.Generator().manual_seed(5)
    lin = Int4Linear(torch.nn.Linear(256, 40, bias=False), group=32)
    lin.act8 = mode == "int8"
    x = torch.randn(3, 256, generator=g)
    w = dequantize_int4(lin.weight, lin.scale, torch.float32)
    want = (round_activations_q8(x) if mode == "int8" else x) @ w.T
    assert torch.equal(lin(x), want)


@pytest.mark.parametrize("mode", ["int8", "float32"])
@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dense"])
@pytest.mark.parametrize("absent", ["not loaded", "MIXLAB_NATIVE=0"])
def test_int4_logits_do_not_depend_on_the_native_kernels_being_loaded(preset, mode, absent, monkeypatch):
    """The same int4 model's forward with the native kernels and without them (not loaded yet, as
    before anything prepared a model in the process, or turned off) gives the same logits within
    float32 summation order, in both modes; "int8" is not "float32" (the rounding is there). In
    "int8" the kernel sums integer products and PyTorch the rounded floats: a last-bit difference
    at a rounding tie (x * 127 / max|x| at k + 1/2) in a later layer moves one int8 step of one
    position (here position 10 of tiny-dense: 0.022), so 11 of the 12 positions are within 1e-4."""
    native = _native()
    int4 = prepare_for_inference(_model(preset), quant="int4", int4_activations=mode)
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        loaded = int4(tokens)
        with monkeypatch.context() as m:
            if absent == "not loaded":
                m.setattr(native, "_lib", None)
            else:
                m.setenv("MIXLAB_NATIVE", "0")
            assert native.library() is None
            without = int4(tokens)
        int4.int4_activations = "float32" if mode == "int8" else "int8"
        other = int4(tokens)
    apart = (without - loaded).abs().amax(-1)[0]  # per position
    assert int((apart <= 1e-4).sum()) >= (11 if mode == "int8" else 12) and float(apart.max()) < 0.05, apart
    assert float((other - loaded).abs().max()) > 1e-3


@pytest.mark.parametrize("mode", ["int8", "float32"])
def test_a_step_of_more_than_512_tokens_equals_each_requests_run_alone(mode, monkeypatch):
    """An engine step of more tokens than the native call takes (12 prompts of 48 tokens in one step
    under token_budget=1024) runs PyTorch's pass: each request's tokens and logprobs equal its run
    alone's (native steps only) within float32 summation order (they were 0.004-0.75 apart, one
    request's tokens parting). A last-bit difference between the kernels at a rounding tie (x * 127
    / max|x| at k + 1/2) moves one int8 step: rare, so nearly every request is within 1e-4."""
    from mixlab.engine import Engine, SamplingParams
    from mixlab.engine.runner import Runner

    _native()
    int4 = prepare_for_inference(_model("tiny-moe"), quant="int4", int4_activations=mode)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 256, (48,), generator=g).tolist() for _ in range(12)]
    params = SamplingParams(max_tokens=4, logprobs=0, ignore_eos=True)
    batched = Runner._batched
    steps: list[int] = []  # the tokens of each step PyTorch's pass ran

    def spy(self, items):
        steps.append(sum(len(it.tokens) for it in items))
        return batched(self, items)

    monkeypatch.setattr(Runner, "_batched", spy)
    with torch.inference_mode():
        engine = Engine(int4, max_batch=12, token_budget=1024, prefill_chunk=64)
        hs = [engine.submit(p, params) for p in prompts]
        engine.run_until_idle()
        assert steps == [12 * 48]  # the prompts' step; the decoding steps run natively
        apart = []
        for prompt, h in zip(prompts, hs, strict=True):
            alone = Engine(int4, max_batch=1, prefill_chunk=64)
            want = alone.submit(prompt, params)
            alone.run_until_idle()
            got_out, want_out = h.result(), want.result()
            assert [o.token_id for o in got_out] == [o.token_id for o in want_out]
            apart.append(max(abs(a.logprob - b.logprob) for a, b in zip(got_out, want_out, strict=True)
                             if a.token_id is not None))
        assert steps == [12 * 48]  # alone: native steps only
    assert sum(d <= 1e-4 for d in apart) >= 10 and max(apart) < 0.02, apart


def test_int4_activations_is_checked():
    with pytest.raises(ValueError, match="int4_activations must be one of int8, float32, not 'int4'"):
        prepare_for_inference(_model("tiny-moe"), quant="int4", int4_activations="int4")


@pytest.mark.parametrize("mode", ["float32", "int8"])
def test_cli_int4_activations_flag(tmp_path, mode):
    import argparse

    from mixlab import save_model
    from mixlab.cli.run import _load, register

    model = Transformer(get_preset("tiny-moe").replace(vocab_size=32000, max_seq_len=128))  # Mixtral's vocabulary
    model.init_weights(seed=0, std=0.1)
    save_model(model, tmp_path)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["generate", "--model", str(tmp_path), "--prompt", "x", "--quant", "int4",
                              "--int4-activations", mode, "--dtype", "float32"])
    model, _ = _load(args)
    assert model.int4_activations == mode


def test_a_width_the_groups_do_not_divide_is_refused_before_any_conversion():
    """wo's input (6 heads x 8 = 48) is no multiple of 32, the experts' are: refused with the matrix
    named, and nothing converted (the experts used to be int4 already when wo failed)."""
    cfg = get_preset("tiny-moe").replace(n_heads=6, n_kv_heads=2, head_dim=8)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    with pytest.raises(ValueError, match=r"groups of 32 .* layers\.0\.attn\.wo has 48"):
        prepare_for_inference(model, quant="int4")
    assert all(type(m) is torch.nn.Linear for m in model.modules() if "Linear" in type(m).__name__)
    assert not any(isinstance(b.ffn.experts, Int4Experts) for b in model.layers)


def test_int4_of_a_model_holding_q4_0_keeps_its_group(tmp_path):
    """A GGUF Q4_0 file's int4 weights are in groups of 32: quant="int4" with group=64 for its float
    matrices (here the output, as llama.cpp's quantiser leaves it Q8_0) is refused; it gave a model of
    mixed groups, which the native decoder refuses, so decoding silently ran PyTorch's kernels."""
    pytest.importorskip("gguf")
    from mixlab.checkpoint import load_model
    from mixlab.checkpoint.gguf import write_gguf

    model = Transformer(get_preset("tiny-moe").replace(vocab_size=32000))
    model.init_weights(seed=0)
    path = write_gguf(model, tmp_path / "m.gguf", quant="q4_0")
    loaded = load_model(path)
    loaded.output = torch.nn.Linear(model.config.dim, model.config.vocab_size, bias=False)  # a float one, as Q8_0
    with pytest.raises(ValueError, match=r"holds int4 weights in groups of 32 .* not 64: pass group=32"):
        prepare_for_inference(loaded, quant="int4", group=64)
    assert isinstance(loaded.output, torch.nn.Linear)  # unchanged
    prepare_for_inference(loaded, quant="int4", group=32)
    assert isinstance(loaded.output, Int4Linear) and loaded.output.group == 32
    offloaded = load_model(path, max_memory="1MB")
    with pytest.raises(ValueError, match=r"groups of 32 .* pass group=32"):
        prepare_for_inference(offloaded, quant="int4", group=64)
    for quant in (None, "int8"):  # group= without int4 would be ignored
        with pytest.raises(ValueError, match=r"group=64 sets int4's inputs per scale: pass quant='int4'"):
            prepare_for_inference(copy.deepcopy(model), quant=quant, group=64)


def test_int4_and_float_matrices_mixed_warn_that_native_decoding_is_off(tmp_path):
    """llama.cpp's Q4_0 files keep output.weight at Q6_K / Q8_0 (read as floats): the native step takes
    one weight format, so such a model decoded with PyTorch's kernels without a word."""
    pytest.importorskip("gguf")
    import warnings

    from mixlab.checkpoint import load_model
    from mixlab.checkpoint.gguf import write_gguf
    from mixlab.ops import registry

    if not registry.prepare_native():
        pytest.skip("no native kernels here: no native decoding to miss")

    model = Transformer(get_preset("tiny-moe").replace(vocab_size=32000))
    model.init_weights(seed=0)
    path = write_gguf(model, tmp_path / "m.gguf", quant="q4_0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_for_inference(load_model(path))  # all int4: no warning
    mixed = load_model(path)
    mixed.output = torch.nn.Linear(model.config.dim, model.config.vocab_size, bias=False)
    with pytest.warns(UserWarning, match=r"no native decoding: this model mixes int4 and float matrices \(output is"):
        prepare_for_inference(mixed)
    assert getattr(mixed, "native_decoder", None) is None


def test_int4_activations_without_int4_weights_are_refused():
    """int4_activations (--int4-activations) on a model that gets no int4 weights did nothing, silently."""
    for quant in (None, "int8"):
        model = _model("tiny-moe")
        with pytest.raises(ValueError, match=r"int4_activations='float32' applies to int4 weights: pass quant='int4'"):
            prepare_for_inference(model, quant=quant, int4_activations="float32")
        assert model.int4_activations is None and inference_format(model) is None


# With int4_activations="int8" and the kernels loaded, every int4 product of PyTorch's pass runs the
# native int4 x int8 kernel, whatever its rows (a prompt's: integer tiles over panels from 64 rows),
# instead of dequantising the weight to float per call (0.12-0.39x llama.cpp's prefill at Mixtral's
# widths). Without act8 the float-activation kernel has no panels: many rows dequantise.


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dense"])
def test_a_prompts_forward_runs_the_native_int4_kernel_and_equals_the_native_steps(preset, monkeypatch):
    """A prepared int4 model's forward over a 100-token prompt never dequantises a weight (the
    registry picks `native` for every int4 product) and its logits equal the native batch-1 steps'
    at every position within float32 summation order (a rounding tie may move one position)."""
    from mixlab.ops import quant

    _native()
    int4 = prepare_for_inference(_model(preset), quant="int4")
    dec = int4.native_decoder
    assert dec is not None and dec.act8
    T = 100
    tokens = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(9))

    def refuse(*args, **kwargs):
        raise AssertionError("an int4 weight was dequantised")

    caches = [KVCache(int4.config, batch_size=1, max_len=T, dtype=torch.float32) for _ in range(2)]
    with torch.inference_mode():
        with monkeypatch.context() as m:
            m.setattr(quant, "dequantize_int4", refuse)
            got = int4(tokens, cache=caches[0])[0]  # PyTorch's pass over all 100 tokens
        want = torch.cat([dec.step(int(tokens[0, t]), t, caches[1]) for t in range(T)])
    apart = (got - want).abs().amax(-1)
    assert int((apart <= 1e-4).sum()) >= T - 2 and float(apart.max()) < 0.05, apart


def test_many_int4_rows_with_float_activations_still_dequantise(monkeypatch):
    """int4_activations="float32": the native int4 kernel for float activations has no many-row
    tiles, so 100 rows take dequantise-then-GEMM (exact activations), equal to it bit for bit."""
    native = _native()
    from mixlab.ops import registry

    lin = Int4Linear(torch.nn.Linear(256, 40, bias=False), group=32)
    x = torch.randn(100, 256, generator=torch.Generator().manual_seed(3))
    assert registry.linear_impl(x, lin.weight, lin.scale) == "int4"
    want = "native" if native.fast(torch.uint8) else "int4"
    assert registry.linear_impl(x, lin.weight, lin.scale, act8=True) == want
    with torch.inference_mode():
        assert torch.equal(lin(x), x @ dequantize_int4(lin.weight, lin.scale, torch.float32).T)
