"""The training step's fast paths equal their references: the `sorted` MoE path's hand-written
backward (every gradient, float32 and bf16 autocast, experts without tokens), the cat-free RoPE,
the float32 attention under bf16 training, fused AdamW, and a model that compiles as one graph.

Shape legend: T tokens, D width, F expert FFN width, E experts, K experts per token.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixlab.config import MoEConfig, get_preset
from mixlab.model import Transformer
from mixlab.model.layers import apply_rope, rope_cos_sin, training_sdpa
from mixlab.model.moe import route
from mixlab.ops.moe import SEGMENT_ROWS, _padded_segments, _sort_by_expert, moe_ffn
from mixlab.train.loop import TrainConfig, make_optimizer


def _moe_grads(impl: str, x_TD, w13, w2, logits_TE, K: int, g_TD, autocast: bool = False):
    """Output and gradients (x, w13, w2, router logits) of one MoE layer under `impl`."""
    leaves = [t.detach().clone().requires_grad_() for t in (x_TD, w13, w2, logits_TE)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        idx_TK, weight_TK = route(leaves[3], K)
        y_TD = moe_ffn(leaves[0], leaves[1], leaves[2], idx_TK, weight_TK, impl=impl)
    (y_TD.float() * g_TD).sum().backward()
    return [y_TD.detach()] + [t.grad for t in leaves]


def _case(T: int, D: int, F_: int, E: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, D, generator=g), torch.randn(E, 2 * F_, D, generator=g) * 0.1,
            torch.randn(E, D, F_, generator=g) * 0.1, torch.randn(T, E, generator=g),
            torch.randn(T, D, generator=g))


@pytest.mark.parametrize(("T", "E", "K"), [(64, 8, 2), (33, 4, 1), (40, 8, 4), (1, 4, 2)])
def test_sorted_backward_equals_the_reference_loop(T: int, E: int, K: int) -> None:
    x, w13, w2, logits, g = _case(T, 32, 48, E)
    ref = _moe_grads("reference", x, w13, w2, logits, K, g)
    got = _moe_grads("sorted", x, w13, w2, logits, K, g)
    for name, a, b in zip(("y", "dx", "dw13", "dw2", "dlogits"), got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_sorted_backward_with_segments_on_and_off_the_padding_boundary() -> None:
    """Experts with exactly SEGMENT_ROWS, SEGMENT_ROWS + 1, 1 and 0 pairs: padding rows are
    computed but reach neither the output nor any gradient."""
    T, E = 2 * SEGMENT_ROWS + 2, 4
    x, w13, w2, logits, g = _case(T, 32, 48, E, seed=3)
    logits.fill_(-30.0)
    logits[:SEGMENT_ROWS, 0] = logits[:, 1] = 30.0  # expert 1: every token; expert 0: exactly SEGMENT_ROWS
    logits[SEGMENT_ROWS:-1, 2] = 10.0  # expert 2: SEGMENT_ROWS + 1; expert 3: one token; none for 4th slot
    logits[-1, 3] = 10.0
    ref = _moe_grads("reference", x, w13, w2, logits, 2, g)
    got = _moe_grads("sorted", x, w13, w2, logits, 2, g)
    for name, a, b in zip(("y", "dx", "dw13", "dw2", "dlogits"), got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_padded_segments_place_each_pair_once_in_its_experts_aligned_segment() -> None:
    idx_TK = torch.randint(0, 8, (50, 2), generator=torch.Generator().manual_seed(0))
    order_N, _, counts_E = _sort_by_expert(idx_TK, 8)
    inv_N = torch.empty_like(order_N)
    inv_N[order_N] = torch.arange(len(order_N))
    padded, pos_N, pos_tok_N = _padded_segments(idx_TK.reshape(-1), order_N, counts_E.tolist(), counts_E, inv_N,
                                               SEGMENT_ROWS)
    for p, c in zip(padded, counts_E.tolist(), strict=True):
        assert p % SEGMENT_ROWS == 0 and c <= p < c + SEGMENT_ROWS
    assert pos_N.unique().numel() == len(pos_N) and int(pos_N.max()) < sum(padded)
    starts = torch.tensor([0, *padded]).cumsum(0)
    expert_N = idx_TK.reshape(-1)[order_N]
    assert ((pos_N >= starts[expert_N]) & (pos_N < starts[expert_N] + counts_E[expert_N])).all()
    torch.testing.assert_close(pos_tok_N, pos_N[inv_N])


def test_sorted_backward_gives_zero_gradient_to_experts_without_tokens() -> None:
    x, w13, w2, logits, g = _case(16, 32, 48, 8)
    logits[:, 2:] = -30.0  # every token picks experts 0 and 1
    ref = _moe_grads("reference", x, w13, w2, logits, 2, g)
    got = _moe_grads("sorted", x, w13, w2, logits, 2, g)
    assert not got[2][2:].any() and not got[3][2:].any()
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_sorted_backward_under_bf16_autocast_matches_the_reference() -> None:
    """Same bf16 casts (activations and weights rounded once, float32 accumulation of each token's
    K rows), so the two agree to bf16 rounding; gradients reach the float32 leaves in float32."""
    x, w13, w2, logits, g = _case(96, 64, 96, 8, seed=1)
    ref = _moe_grads("reference", x, w13, w2, logits, 2, g, autocast=True)
    got = _moe_grads("sorted", x, w13, w2, logits, 2, g, autocast=True)
    assert got[0].dtype == torch.float32 and all(t.dtype == torch.float32 for t in got[1:])
    for a, b in zip(got, ref, strict=True):
        assert (a - b).norm() / b.norm() < 1e-2
    exact = _moe_grads("reference", x, w13, w2, logits, 2, g)  # and both are close to float32
    for a, b in zip(got, exact, strict=True):
        assert (a - b).norm() / b.norm() < 2e-2


def _rotate_half_rope(x_BHTHd: torch.Tensor, pos_BT: torch.Tensor, theta: float) -> torch.Tensor:
    """transformers' formula: x * cos + cat(-x2, x1) * sin, tables [B, 1, T, Hd]."""
    Hd = x_BHTHd.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, Hd, 2, dtype=torch.float32) / Hd))
    freqs = pos_BT.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x_BHTHd.dtype)[:, None], emb.sin().to(x_BHTHd.dtype)[:, None]
    x1, x2 = x_BHTHd.chunk(2, dim=-1)
    return x_BHTHd * cos + torch.cat((-x2, x1), dim=-1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_without_cat_equals_rotate_half_bit_for_bit(dtype: torch.dtype) -> None:
    B, T, N, Hd = 2, 7, 3, 16
    x_BTNHd = torch.randn(B, T, N, Hd).to(dtype)
    pos_BT = torch.arange(5, 5 + T).expand(B, T)
    cos, sin = rope_cos_sin(pos_BT, Hd, 10000.0, dtype)
    got = apply_rope(x_BTNHd, cos, sin).transpose(1, 2)
    assert torch.equal(got, _rotate_half_rope(x_BTNHd.transpose(1, 2), pos_BT, 10000.0))


def test_bf16_training_attention_runs_in_float32_and_matches_float32_sdpa() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 16, 8, generator=g) for h in (4, 2, 2))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = training_sdpa(qb, kb, vb, None)
    assert y.dtype == torch.bfloat16
    # float32 attention of the bf16 inputs, rounded once at the end
    ref_b = F.scaled_dot_product_attention(qb.float(), kb.float(), vb.float(), is_causal=True, enable_gqa=True)
    assert torch.equal(y, ref_b.bfloat16())
    assert (y.float() - ref).norm() / ref.norm() < 1e-2
    y.float().sum().backward()
    assert qb.grad is not None and qb.grad.dtype == torch.bfloat16
    # in the model under autocast, RoPE leaves q and k in float32 and v in bf16: still float32 attention
    qf, kf = q.clone().requires_grad_(), k.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = training_sdpa(qf, kf, vb, None)
    ref2 = F.scaled_dot_product_attention(q, k, vb.float(), is_causal=True, enable_gqa=True)
    assert y2.dtype == torch.bfloat16 and torch.equal(y2, ref2.bfloat16())


def _tiny_model(seed: int = 0) -> Transformer:
    cfg = get_preset("tiny-moe").replace(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                         ffn_dim=48, max_seq_len=32, moe=MoEConfig(num_experts=4, top_k=2))
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    return model


def test_model_gradients_with_the_sorted_path_equal_the_reference_path() -> None:
    tokens = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    grads = {}
    for impl in ("reference", "sorted"):
        model = _tiny_model()
        model.set_moe_impl(impl)
        logits = model(tokens)
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters()}
    for name, ref in grads["reference"].items():
        torch.testing.assert_close(grads["sorted"][name], ref, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_trainer_uses_fused_adamw_on_cpu() -> None:
    model = _tiny_model()
    opt = make_optimizer(model, TrainConfig())
    assert all(g["fused"] for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_training_forward_compiles_as_one_graph() -> None:
    """No graph break in forward + losses: the router losses have static shapes, and the sorted
    path's per-expert row counts are captured as symbolic sizes (what `mixlab train --compile` sets)."""
    from mixlab.train.losses import lm_loss, router_losses

    model = _tiny_model()
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))

    def step(x_BT: torch.Tensor) -> torch.Tensor:
        o = model.forward_output(x_BT[:, :-1])
        logits, routings = o.logits_BTV, o.routing
        aux, z = router_losses(routings)
        return lm_loss(logits, x_BT[:, 1:]) + 0.02 * aux + 0.001 * z

    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        explained = torch._dynamo.explain(step)(tokens)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons


def test_compiled_training_equals_eager_and_evaluates(tmp_path) -> None:
    """`mixlab train --compile`: the same losses as eager, and evaluation runs (it once failed on
    `forward or model`: a compiled module has no truth value)."""
    import json

    from mixlab.train.data import prepare, read_documents
    from mixlab.train.loop import load_train_config, train

    src = tmp_path / "src" / "prose"
    src.mkdir(parents=True)
    for split, n in (("train", 30), ("valid", 3)):
        lines = [json.dumps({"text": f"The {i}th cat sat on the mat and looked around. " * 4}) for i in range(n)]
        (src / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare(read_documents([tmp_path / "src"]), tmp_path / "ds")
    tiny = {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "ffn_dim": 48,
            "max_seq_len": 64, "moe": {"num_experts": 4, "top_k": 2}}
    losses = {}
    for compiled in (False, True):
        cfg = load_train_config(None, data=str(tmp_path / "ds"), out=str(tmp_path / f"out{compiled}"),
                                model="tiny-moe", model_overrides=tiny, seq_len=16, batch_size=2, steps=2,
                                warmup=1, eval_every=2, ckpt_every=0, progress=False, tensorboard=False,
                                export_hf=False, threads=1, compile=compiled)
        result = train(cfg)
        losses[compiled] = [r["loss"] for r in result.history]
    torch._dynamo.reset()
    torch.testing.assert_close(losses[True], losses[False], atol=1e-5, rtol=1e-5)
