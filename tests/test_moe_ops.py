import pytest
import torch

from mixlab.model.moe import route
from mixlab.ops.moe import IMPLS, moe_ffn


def _weights(E=4, D=32, F=48, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(E, 2 * F, D, generator=g, dtype=dtype) * 0.1,
            torch.randn(E, D, F, generator=g, dtype=dtype) * 0.1)


@pytest.mark.parametrize("impl", [k for k in IMPLS if k != "reference"])
@pytest.mark.parametrize(("T", "E", "K"), [(1, 4, 2), (7, 4, 1), (64, 8, 2), (33, 8, 4)])
def test_fast_paths_equal_the_reference_loop(impl, T, E, K):
    w13, w2 = _weights(E=E)
    x = torch.randn(T, 32)
    logits = torch.randn(T, E)
    idx, weight = route(logits, K)
    ref = moe_ffn(x, w13, w2, idx, weight, impl="reference")
    got = moe_ffn(x, w13, w2, idx, weight, impl=impl)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_unused_experts_are_fine():
    w13, w2 = _weights(E=8)
    x = torch.randn(5, 32)
    idx = torch.zeros(5, 2, dtype=torch.long)
    idx[:, 1] = 3
    weight = torch.full((5, 2), 0.5)
    for impl in IMPLS:
        out = moe_ffn(x, w13, w2, idx, weight, impl=impl)
        assert out.shape == (5, 32) and torch.isfinite(out).all()


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
