"""Model-level fast paths equal the reference: every MoE implementation, oneDNN-packed weights and
int8 weight-only quantisation, for prefill and for cached decoding."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import moe_impls
from mixlab.cache import KVCache
from mixlab.config import get_preset
from mixlab.model import Transformer
from mixlab.model.inference import inference_format, prepare_for_inference
from mixlab.ops import native
from mixlab.ops.linear import can_pack
from mixlab.ops.quant import dequantize_int8


def _model(dtype=torch.float32, preset="tiny-moe") -> Transformer:
    model = Transformer(get_preset(preset))
    model.init_weights(seed=0, std=0.1)
    return model.to(dtype).eval()


def _prefill_then_decode(model: Transformer, tokens_BT: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """Logits of a prompt prefilled at once, then of each further token decoded one at a time."""
    B, T = tokens_BT.shape
    cache = KVCache(model.config, batch_size=B, max_len=T, dtype=model.tok_embeddings.weight.dtype)
    with torch.inference_mode():
        outs = [model(tokens_BT[:, :n_prompt], cache=cache)]
        for t in range(n_prompt, T):
            outs.append(model(tokens_BT[:, t : t + 1], cache=cache))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("impl", moe_impls(auto=True))
def test_every_moe_impl_equals_the_reference_in_the_model(impl):
    if impl == "native" and not (native.load() is not None and native.fast(torch.float32)):
        pytest.skip("native kernels unavailable (no C compiler, MIXLAB_NATIVE=0) or not vectorised on this CPU")
    if impl == "triton" and not torch.cuda.is_available():
        pytest.skip("the Triton kernel needs CUDA (tests/test_triton_moe.py runs it in the interpreter on a CPU)")
    model = _model()
    tokens = torch.randint(0, 256, (2, 12))
    model.set_moe_impl("reference")
    ref = _prefill_then_decode(model, tokens, 8)
    model.set_moe_impl(impl)
    torch.testing.assert_close(_prefill_then_decode(model, tokens, 8), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not can_pack(torch.empty(2, 2)), reason="torch built without oneDNN")
@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dense"])
def test_packed_model_equals_the_plain_model(preset):
    model = _model(preset=preset)
    tokens = torch.randint(0, 256, (2, 12))
    ref = _prefill_then_decode(model, tokens, 8)
    for packed in (False, True):
        fast = prepare_for_inference(copy.deepcopy(model), packed=packed)
        assert not any(isinstance(m, torch.nn.Linear) for name, m in fast.named_modules() if not name.endswith("gate"))
        torch.testing.assert_close(_prefill_then_decode(fast, tokens, 8), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not (can_pack(torch.empty(2, 2)) and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    reason="no oneDNN bf16 on this CPU")
def test_packed_bf16_model_matches_plain_bf16_model():
    model = _model(torch.bfloat16)
    tokens = torch.randint(0, 256, (1, 10))
    ref = _prefill_then_decode(model, tokens, 6).float()
    got = _prefill_then_decode(prepare_for_inference(copy.deepcopy(model)), tokens, 6).float()
    assert (got - ref).norm() / ref.norm() < 1e-2  # same bf16 rounding, possibly another summation order


def _dequantised_copy(model: Transformer) -> Transformer:
    """The float model whose weights are exactly what the int8 model computes with."""
    from mixlab.ops.quant import quantize_int8

    deq = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in deq.named_parameters():
            if p.ndim >= 2 and "tok_embeddings" not in name and not name.endswith("gate.weight"):
                p.copy_(dequantize_int8(*quantize_int8(p), p.dtype))
    return deq


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dense"])
def test_int8_model_equals_its_dequantised_weights(preset):
    model = _model(preset=preset)
    tokens = torch.randint(0, 256, (2, 12))  # decode steps of 2 rows take the int8 GEMV, prefill the GEMM
    ref = _prefill_then_decode(_dequantised_copy(model), tokens, 8)
    int8 = prepare_for_inference(copy.deepcopy(model), quant="int8")
    assert int8.layers[0].attn.wqkv.weight.dtype == torch.int8
    got = _prefill_then_decode(int8, tokens, 8)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # And int8 stays close to the float model. Per position, as a median: in an MoE, rounding may
    # legitimately flip a near-tied expert choice for a few tokens.
    full = _prefill_then_decode(model, tokens, 8)
    assert ((got - full).norm(dim=-1) / full.norm(dim=-1)).median() < 0.03


def test_unknown_quantisation_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown quantisation .int3."):
        prepare_for_inference(_model(), quant="int3")
    model = _model()
    with pytest.raises(ValueError, match="packed must be True, False or None, not 'no'"):  # "no" packed them
        prepare_for_inference(model, packed="no")  # type: ignore[arg-type]
    assert inference_format(model) is None  # refused before any conversion


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("B", "H", "G", "S"), [(1, 4, 2, 7), (3, 8, 8, 33), (2, 8, 1, 1)])
def test_single_query_attention_equals_sdpa(dtype, B, H, G, S):
    from mixlab.ops.attention import single_query_attention

    q, k, v = torch.randn(B, H, 1, 16).to(dtype), torch.randn(B, G, S, 16).to(dtype), torch.randn(B, G, S, 16).to(dtype)
    mask = torch.rand(B, 1, 1, S) < 0.7
    mask[..., 0] = True
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                           enable_gqa=True).to(dtype)
    got = single_query_attention(q, k, v, mask)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got, ref, **tol)
