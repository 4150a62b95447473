"""The MoE block's parts: Router -> dispatch -> Experts -> combine equals the reference loop, the
Experts module shards on its expert dimension (what expert parallelism does), weight formats are
module types, and the model's forward has one return type."""

from __future__ import annotations

import copy

import pytest
import torch

from mixlab.cache import KVCache
from mixlab.config import get_preset
from mixlab.model import Experts, ModelOutput, MoEBlock, Transformer
from mixlab.model.formats import Int4Experts, Int8Experts, PackedExperts
from mixlab.model.inference import inference_format, prepare_for_inference
from mixlab.ops.linear import can_pack
from mixlab.ops.moe import SEGMENT_ROWS, combine, dispatch, moe_ffn


def _experts(E: int = 4, D: int = 32, F: int = 48) -> Experts:
    ex = Experts(E, D, F)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ex.w13.copy_(torch.randn(ex.w13.shape, generator=g) * 0.1)
        ex.w2.copy_(torch.randn(ex.w2.shape, generator=g) * 0.1)
    return ex


def _routing(T: int, E: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return idx, torch.softmax(torch.randn(T, K, generator=g), -1)


@pytest.mark.parametrize("pad_to", [1, SEGMENT_ROWS])
@pytest.mark.parametrize("grouped", [False, True])
def test_dispatch_experts_combine_equals_the_reference_loop(pad_to: int, grouped: bool) -> None:
    ex = _experts()
    x = torch.randn(13, 32)
    idx, w = _routing(13, 4, 2)
    ref = moe_ffn(x, ex.w13, ex.w2, idx, w, impl="reference")
    with torch.no_grad():
        xs, d = dispatch(x, idx, 4, pad_to=pad_to)
        assert all(c % pad_to == 0 for c in d.counts) and sum(d.counts) == xs.shape[0]
        got = combine(ex(xs, d.counts, grouped=grouped and pad_to == 1), w, d, x.dtype)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_experts_shard_on_the_expert_dimension() -> None:
    """Expert parallelism's view: two shards of `Experts` (experts [0, 2) and [2, 4)), each fed its
    own experts' rows, together give the whole layer's rows."""
    ex = _experts()
    x = torch.randn(11, 32)
    idx, w = _routing(11, 4, 2)
    with torch.no_grad():
        xs, d = dispatch(x, idx, 4)
        whole = ex(xs, d.counts)
        shards = []
        for lo, hi in ((0, 2), (2, 4)):
            shard = Experts(hi - lo, 32, 48)
            shard.w13.copy_(ex.w13[lo:hi])
            shard.w2.copy_(ex.w2[lo:hi])
            a, b = sum(d.counts[:lo]), sum(d.counts[:hi])
            shards.append(shard(xs[a:b], d.counts[lo:hi]))
    torch.testing.assert_close(torch.cat(shards), whole)


def test_moe_block_is_router_dispatch_experts_combine() -> None:
    block = MoEBlock(get_preset("tiny-moe"))
    assert type(block.experts) is Experts and block.experts.w13.shape[0] == block.gate.weight.shape[0]
    names = {n for n, _ in block.named_parameters()}
    assert names == {"gate.weight", "experts.w13", "experts.w2"}


def _model(preset: str = "tiny-moe") -> Transformer:
    model = Transformer(get_preset(preset))
    model.init_weights(seed=0, std=0.1)
    return model.eval()


def test_forward_returns_logits_and_forward_output_the_rest() -> None:
    model = _model()
    tokens = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        logits = model(tokens)
        out = model.forward_output(tokens)
        lean = model.forward_output(tokens, logits=False)
    assert isinstance(logits, torch.Tensor) and isinstance(out, ModelOutput)
    assert out.logits_BTV is not None
    torch.testing.assert_close(out.logits_BTV, logits)
    assert len(out.routing) == model.config.n_layers and out.routing[0].idx_TK.shape == (14, 2)
    assert lean.logits_BTV is None
    torch.testing.assert_close(lean.hidden_BTD, out.hidden_BTD)
    torch.testing.assert_close(model.output(out.hidden_BTD), logits)


@pytest.mark.parametrize(("args", "match"), [
    ((torch.tensor([1, 2, 3]),), "tokens must be"),  # 1-D: "not enough values to unpack"
    ((torch.tensor([[1.0, 2.0]]),), "tokens must be"),  # float ids: deep in the embedding
    (([[1, 2, 3]],), "tokens must be"),  # a list: "'list' object has no attribute 'shape'"
    ((torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1]])), "positions_BT"),  # deep in attention
    ((torch.tensor([[1, 2, 3]]), torch.tensor([0, 1, 2])), "positions_BT"),
    ((torch.tensor([[1, 256, 3]]),), r"token ids must be in \[0, 256\).*span \[1, 256\]"),  # "index out of range"
    ((torch.tensor([[-1, 2]]),), r"token ids must be in \[0, 256\).*span \[-1, 2\]"),
    # another device (meta stands for a GPU here): torch's "Expected all tensors to be on the same device"
    ((torch.tensor([[1, 2]], device="meta"),), r"^tokens is on meta but the model's weights are on cpu.*\.to\('cpu'\)"),
    ((torch.tensor([[1, 2]]), torch.tensor([[0, 1]], device="meta")), r"^positions_BT is on meta .*positions\.to"),
])
def test_forward_names_a_bad_argument(args: tuple, match: str) -> None:
    model = _model()
    with pytest.raises(ValueError, match=match):
        model(args[0], positions_BT=args[1] if len(args) > 1 else None)
    with pytest.raises(ValueError, match="segments_BT"):
        model(torch.tensor([[1, 2, 3]]), segments_BT=torch.zeros(1, 2, dtype=torch.long))
    assert model(torch.tensor([[1, 2, 3]], dtype=torch.int32)).shape == (1, 3, 256)


def test_repr_shows_the_sizes() -> None:
    # print(model) showed "RMSNorm()", "Experts()" and "Router()": nothing of the MoE's shape.
    text = repr(_model())
    for part in ("RMSNorm(64, eps=1e-05)", "impl='auto'", "Experts(num_experts=4, dim=64, ffn_dim=128)",
                 "Router(dim=64, num_experts=4, top_k=2)"):
        assert part in text, text


def test_forward_names_a_cache_of_another_batch_size() -> None:
    # It was "shape '[1, 3, 64]' is invalid for input of size 384" from a reshape in attention.
    model = _model()
    with pytest.raises(ValueError, match=r"the cache holds 2 sequences but the tokens are 1"):
        model(torch.tensor([[1, 2, 3]]), cache=KVCache(model.config, batch_size=2, max_len=8))


def test_weight_formats_are_module_types() -> None:
    model = _model()
    assert inference_format(model) is None and model.native_decoder is None
    int8 = prepare_for_inference(copy.deepcopy(model), quant="int8")
    assert inference_format(int8) == "int8"
    assert all(type(b.ffn.experts) is Int8Experts for b in int8.layers)
    assert int8.layers[0].ffn.experts.w13.dtype == torch.int8
    assert set(dict(int8.layers[0].ffn.experts.named_buffers())) == {"w13", "w13_scale", "w2", "w2_scale"}
    assert prepare_for_inference(int8) is int8 and inference_format(int8) == "int8"  # kept, as held int4 is
    with pytest.raises(ValueError, match="int4_activations='float32' applies to int4 weights"):
        prepare_for_inference(int8, int4_activations="float32")  # a refusal leaves the model as it was
    with pytest.raises(ValueError, match="already prepared"):
        prepare_for_inference(int8, quant="int4")
    assert getattr(int8, "int4_activations", None) is None
    if can_pack(torch.empty(2, 2)):
        packed = prepare_for_inference(copy.deepcopy(model), packed=True)
        assert inference_format(packed) == "packed"
        assert all(type(b.ffn.experts) is PackedExperts for b in packed.layers)
    int4 = prepare_for_inference(copy.deepcopy(model), quant="int4")
    assert inference_format(int4) == "int4"
    assert all(type(b.ffn.experts) is Int4Experts for b in int4.layers)
    assert int4.layers[0].ffn.experts.w13.dtype == torch.uint8


def test_save_model_refuses_a_prepared_model(tmp_path) -> None:
    from mixlab.checkpoint import save_model

    model = prepare_for_inference(_model(), quant="int8")
    with pytest.raises(ValueError, match=r"int8 inference weights \(prepared for inference.*before prepare_for"):
        save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_freshly_built_model_is_initialised_like_pytorch_modules() -> None:
    """`Transformer(cfg)` holds usable weights before `init_weights` (as nn.Linear does): the experts
    and the router were `torch.empty` (garbage, sometimes NaN) until a checkpoint or init replaced them."""
    cfg = get_preset("tiny-moe")
    torch.manual_seed(0)
    model = Transformer(cfg)
    for name in ("layers.0.ffn.experts.w13", "layers.0.ffn.experts.w2", "layers.0.ffn.gate.weight"):
        p = dict(model.named_parameters())[name]
        fan_in = p.shape[-1]
        assert torch.isfinite(p).all() and p.abs().max() <= fan_in**-0.5 and p.std() > 0.3 * fan_in**-0.5, name
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]]))).all()
    with torch.device("meta"):  # the meta device stays free of work
        assert Transformer(get_preset("mixtral-8x7b")).layers[0].ffn.experts.w13.is_meta


def test_tied_router_logits_go_to_the_lowest_experts_as_in_the_native_router():
    """A router of equal rows (an upcycled model's `--router-init zeros`, its experts made distinct by
    `--noise`) ties every logit. torch.topk broke the ties its own way (experts 2 and 3 of 4), the
    native kernels' router takes the lowest indices: a native decoding step and the full forward pass
    disagreed by ~1 in the logits. Both take experts 0..k-1 now, with the rest in order."""
    from mixlab.model.moe import route

    idx, weight = route(torch.zeros(5, 4), 2)
    assert idx.tolist() == [[0, 1]] * 5 and torch.equal(weight, torch.full((5, 2), 0.5))
    logits = torch.tensor([[0.5, 2.0, 0.5, 2.0, 1.0, 2.0]])
    assert route(logits, 4)[0].tolist() == [[1, 3, 5, 4]]
    assert route(logits, 4)[0].is_contiguous()
