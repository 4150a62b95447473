"""Every MoE implementation equals the reference loop (float32, bfloat16, int8 weights)."""

import pytest
import torch

from conftest import moe_impls
from mixlab.config import get_preset
from mixlab.model import Transformer
from mixlab.model.moe import route
from mixlab.ops import native
from mixlab.ops.moe import IMPLS, choose_impl, moe_ffn
from mixlab.ops.quant import quantize_int8

# The Triton kernel runs on CUDA; on a CPU, tests/test_triton_moe.py runs it in Triton's interpreter.
ON_CPU = [k for k in IMPLS if k != "triton"]
FAST = moe_impls()


def _need(impl: str, dtype: torch.dtype) -> None:
    """Skip, saying why, when `impl` cannot run here (the native kernels are built on request)."""
    if impl == "native" and not (native.load() is not None and native.fast(dtype)):
        pytest.skip(f"native kernels unavailable or not vectorised for {dtype} on this CPU")


def _weights(E=4, D=32, F=48, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(E, 2 * F, D, generator=g).to(dtype) * 0.1,
            torch.randn(E, D, F, generator=g).to(dtype) * 0.1)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize(("T", "E", "K"), [(1, 4, 2), (1, 8, 1), (7, 4, 1), (64, 8, 2), (33, 8, 4)])
def test_fast_paths_equal_the_reference_loop(impl, T, E, K):
    _need(impl, torch.float32)
    w13, w2 = _weights(E=E)
    x = torch.randn(T, 32)
    logits = torch.randn(T, E)
    idx, weight = route(logits, K)
    ref = moe_ffn(x, w13, w2, idx, weight, impl="reference")
    got = moe_ffn(x, w13, w2, idx, weight, impl=impl)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("T", [1, 5, 40])
def test_fast_paths_equal_the_reference_loop_in_bfloat16(impl, T):
    """Same math in the same order per token: bf16 results agree to bf16 rounding of the matmuls."""
    _need(impl, torch.bfloat16)
    w13, w2 = _weights(E=8, dtype=torch.bfloat16)
    x = torch.randn(T, 32).bfloat16()
    idx, weight = route(torch.randn(T, 8), 2)
    ref = moe_ffn(x, w13, w2, idx, weight, impl="reference")
    got = moe_ffn(x, w13, w2, idx, weight, impl=impl)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("impl", moe_impls(exclude=("triton",)))  # int8 is a CPU weight format
@pytest.mark.parametrize("T", [1, 3, 20])  # 1 and 3 rows take the int8 GEMV kernel, 20 the dequantised GEMM
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_fast_paths_equal_the_dequantised_reference(impl, T, dtype):
    _need(impl, torch.int8)
    w13, w2 = _weights(E=8, D=64, F=96)
    (q13, s13), (q2, s2) = quantize_int8(w13), quantize_int8(w2)
    x = torch.randn(T, 64).to(dtype)
    idx, weight = route(torch.randn(T, 8), 2)
    kw = dict(w13_scale_E2F=s13.to(dtype), w2_scale_ED=s2.to(dtype))
    ref = moe_ffn(x, q13, q2, idx, weight, impl="reference", **kw)
    got = moe_ffn(x, q13, q2, idx, weight, impl=impl, **kw)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    else:  # the dequantised weight is rounded to bf16 before the matmul in one, the output after in the other
        assert (got.float() - ref.float()).norm() / ref.float().norm() < 1e-2
    # and int8 is close to the float weights it came from (8 bits per row: < 1% relative error)
    full = moe_ffn(x.float(), w13, w2, idx, weight, impl="reference")
    assert (got.float() - full).norm() / full.norm() < 0.02


def test_unused_experts_are_fine():
    w13, w2 = _weights(E=8)
    x = torch.randn(5, 32)
    idx = torch.zeros(5, 2, dtype=torch.long)
    idx[:, 1] = 3
    weight = torch.full((5, 2), 0.5)
    for impl in ON_CPU:
        if impl == "native" and not native.fast(torch.float32):
            continue
        out = moe_ffn(x, w13, w2, idx, weight, impl=impl)
        assert out.shape == (5, 32) and torch.isfinite(out).all()


def test_fast_paths_are_differentiable_like_the_reference():
    w13, w2 = _weights(E=4)
    x = torch.randn(9, 32)
    idx, weight = route(torch.randn(9, 4), 2)
    grads = {}
    for impl in ("reference", "sorted", "decode"):
        a, b, xx = w13.clone().requires_grad_(), w2.clone().requires_grad_(), x.clone().requires_grad_()
        moe_ffn(xx, a, b, idx, weight, impl=impl).square().sum().backward()
        grads[impl] = (a.grad, b.grad, xx.grad)
    for impl in ("sorted", "decode"):
        for g, r in zip(grads[impl], grads["reference"], strict=True):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def test_auto_picks_decode_for_one_token():
    assert choose_impl(1) == "decode" and choose_impl(2) == "sorted"


def test_topk_then_softmax_equals_softmax_topk_renormalise():
    logits = torch.randn(100, 8, dtype=torch.float64)
    idx, weight = route(logits, 2)
    probs = torch.softmax(logits, dim=-1)
    top, idx2 = torch.topk(probs, 2, dim=-1)
    assert torch.equal(idx, idx2)
    torch.testing.assert_close(weight, top / top.sum(-1, keepdim=True))


def test_unknown_impl_is_a_clear_error():
    w13, w2 = _weights()
    with pytest.raises(ValueError, match="unknown MoE implementation 'nope'"):
        moe_ffn(torch.randn(2, 32), w13, w2, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), impl="nope")
    model = Transformer(get_preset("tiny-moe"))
    with pytest.raises(ValueError, match="unknown MoE implementation 'nope'; known: auto, reference"):
        model.set_moe_impl("nope")  # was accepted, and the next forward pass failed
    assert {b.ffn.impl for b in model.layers} == {"auto"}


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize(("D", "F", "dtype"), [(33, 17, torch.float32), (72, 100, torch.bfloat16)])
def test_fast_paths_at_widths_of_no_round_size(impl, D, F, dtype):
    """Widths that are not multiples of 16 bytes (33 and 17 floats; an ffn_dim of 100 in bf16):
    every implementation equals the reference loop. `grouped` failed ('strides should be multiple
    of 16 bytes' from torch._grouped_mm, also in training with moe_impl='grouped' and in the Triton
    kernel's bf16 backward on CUDA); it runs the sorted segments there now."""
    _need(impl, dtype)
    w13, w2 = _weights(E=4, D=D, F=F, dtype=dtype)
    x = torch.randn(9, D).to(dtype)
    idx, weight = route(torch.randn(9, 4), 2)
    ref = moe_ffn(x, w13, w2, idx, weight, impl="reference")
    got = moe_ffn(x, w13, w2, idx, weight, impl=impl)
    # bf16: each implementation rounds its products differently, ~2 bf16 steps at these sizes
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), ref.float(), **tol)
