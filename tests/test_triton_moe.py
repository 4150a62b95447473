"""The Triton MoE kernel against the reference loop.

On a machine without a GPU these tests run the kernel in Triton's interpreter (TRITON_INTERPRET=1,
set here before triton is imported), in float32 only: the interpreter computes with NumPy, which
has no bfloat16. The bfloat16 test runs where CUDA exists.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="the Triton kernel needs the optional 'gpu' extra (triton)")

from mixlab.ops import triton_moe as tm  # noqa: E402
from mixlab.ops.moe import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not tm.interpreted():
    pytest.skip("no GPU and TRITON_INTERPRET was set to something other than 1", allow_module_level=True)

# Small tiles keep the interpreter fast; the GPU uses the table's.
SMALL = tm.Config(16, 16, 16)


def _layer(T: int, D: int = 32, Fd: int = 48, E: int = 8, K: int = 2, *, seed: int = 0,
           skew: bool = False, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w13 = torch.randn(E, 2 * Fd, D, generator=g) * D ** -0.5
    w2 = torch.randn(E, D, Fd, generator=g) * Fd ** -0.5
    logits = torch.randn(T, E, generator=g)
    if skew:  # most tokens to expert 3, none to several experts
        logits[:, 3] += 4.0
        logits[:, 5] -= 8.0
        logits[:, 6] -= 8.0
    wt, idx = torch.topk(logits, K, dim=-1)
    wt = torch.softmax(wt, dim=-1)
    return [t.to(DEVICE) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), idx, wt)]


@pytest.mark.parametrize("T", [1, 3, 17, 40])
def test_equals_reference_float32(T):
    x, w13, w2, idx, wt = _layer(T, seed=T)
    got = tm.triton_moe(x, w13, w2, idx, wt, config=SMALL)
    want = reference(x, w13, w2, idx, wt)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_uneven_loads_and_idle_experts():
    x, w13, w2, idx, wt = _layer(33, seed=7, skew=True)
    assert (torch.bincount(idx.flatten().cpu(), minlength=8) == 0).any(), "the case must leave experts idle"
    torch.testing.assert_close(tm.triton_moe(x, w13, w2, idx, wt, config=SMALL), reference(x, w13, w2, idx, wt),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [tm.Config(16, 32, 16), tm.Config(32, 16, 32)])
def test_tile_shapes_that_do_not_divide_the_dims(cfg):
    x, w13, w2, idx, wt = _layer(9, D=40, Fd=24, seed=3)  # D and F not multiples of the tiles
    torch.testing.assert_close(tm.triton_moe(x, w13, w2, idx, wt, config=cfg), reference(x, w13, w2, idx, wt),
                               rtol=1e-5, atol=1e-5)


def test_align_pads_each_expert_to_whole_tiles():
    idx = torch.tensor([[0, 2], [2, 0], [2, 1]], device=DEVICE)
    rows, expert, P = tm._align(idx, 4, 4)
    N = idx.numel()
    assert P % 4 == 0 and P >= N + 4 * 3
    rows, expert = rows.cpu(), expert.cpu()
    # tile 0: expert 0 (pairs 0, 3), tile 1: expert 1 (pair 5), tile 2: expert 2 (pairs 1, 2, 4)
    assert expert[:3].tolist() == [0, 1, 2] and (expert[3:] == -1).all()
    assert rows[:4].tolist() == [0, 3, N, N]
    assert rows[4:8].tolist() == [5, N, N, N]
    assert rows[8:12].tolist() == [1, 2, 4, N]
    assert sorted(r for r in rows.tolist() if r < N) == list(range(N))


def test_config_table_is_ordered_and_total():
    limits = list(tm.CONFIGS)
    assert limits == sorted(limits)
    assert tm.config_for(1) == tm.CONFIGS[limits[0]] and tm.config_for(10**9) is not None


def test_gradients_equal_the_reference():
    x, w13, w2, idx, wt = _layer(11, seed=5)
    leaves = [t.clone().requires_grad_() for t in (x, w13, w2, wt)]
    ref = [t.clone().requires_grad_() for t in (x, w13, w2, wt)]
    g = torch.randn(11, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (tm.triton_moe(leaves[0], leaves[1], leaves[2], idx, leaves[3], config=SMALL) * g).sum().backward()
    (reference(ref[0], ref[1], ref[2], idx, ref[3]) * g).sum().backward()
    for a, b in zip(leaves, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_refuses_int8_scales_and_mismatched_shapes():
    x, w13, w2, idx, wt = _layer(2)
    with pytest.raises(ValueError, match="plain float"):
        tm.triton_moe(x, w13, w2, idx, wt, w13_scale_E2F=torch.ones(8, 96), w2_scale_ED=torch.ones(8, 32))
    with pytest.raises(ValueError, match="shapes do not agree"):
        tm.triton_moe(x[:, :16], w13, w2, idx, wt)
    # other ids / weights were read past their ends (or left rows out), with no error
    for bad_idx, bad_wt in ((idx[:1], wt), (idx, wt[:, :1]), (idx[:, :, None], wt)):
        with pytest.raises(ValueError, match=r"expects idx and weight \[T, K\] for x \[T, D\]"):
            tm.triton_moe(x, w13, w2, bad_idx, bad_wt)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU without Triton's interpreter")
def test_cpu_tensors_outside_the_interpreter_are_refused(monkeypatch):
    """Triton said '0 active drivers ([]). There should only be one.'"""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="triton_moe runs on CUDA tensors .* got x on cpu"):
        tm.triton_moe(*_layer(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 needs a GPU (the interpreter has no bf16)")
def test_bfloat16_on_gpu_close_to_float32():
    x, w13, w2, idx, wt = _layer(64, D=256, Fd=512, seed=2)
    want = reference(x, w13, w2, idx, wt)
    got = tm.triton_moe(x.bfloat16(), w13.bfloat16(), w2.bfloat16(), idx, wt)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_compiles_fullgraph_on_gpu():
    x, w13, w2, idx, wt = _layer(16, D=64, Fd=128, seed=4)
    fn = torch.compile(lambda *a: tm.triton_moe(*a), fullgraph=True)
    torch.testing.assert_close(fn(x, w13, w2, idx, wt), tm.triton_moe(x, w13, w2, idx, wt))
