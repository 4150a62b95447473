"""MoE training losses: hand-computed values, masking, uniform routing, gradients vs float64."""

from __future__ import annotations

import math

import pytest
import torch

from mixlab.config import MoEConfig, get_preset
from mixlab.model import Transformer
from mixlab.model.moe import Routing, apply_capacity, route
from mixlab.train.losses import IGNORE, expert_load, lm_loss, load_balancing_loss_layer, router_losses, z_loss_layer

LN3 = math.log(3.0)


def _fixed() -> tuple[torch.Tensor, torch.Tensor]:
    # Softmax rows: [.25, .75], [.25, .75], [.75, .25]; top-1 choices: 1, 1, 0.
    logits = torch.tensor([[0.0, LN3], [0.0, LN3], [LN3, 0.0]])
    return logits, logits.argmax(-1, keepdim=True)


def test_aux_loss_hand_computed() -> None:
    logits, idx = _fixed()
    # f = [1/3, 2/3]; P = [(.25+.25+.75)/3, (.75+.75+.25)/3]; aux = 2 * (1/3 * 1.25/3 + 2/3 * 1.75/3) = 9.5/9
    assert load_balancing_loss_layer(logits, idx).item() == pytest.approx(9.5 / 9, abs=1e-6)
    # z-loss: logsumexp of each row is ln 4.
    assert z_loss_layer(logits).item() == pytest.approx(math.log(4.0) ** 2, abs=1e-6)


def test_aux_loss_hand_computed_top2() -> None:
    # E=4, K=2, two tokens; uniform probabilities (P_e = 1/4) but choices {0,1} and {0,2}:
    # f = [2/4, 1/4, 1/4, 0]; aux = 4 * sum f_e / 4 = 1.
    logits = torch.zeros(2, 4)
    idx = torch.tensor([[0, 1], [0, 2]])
    assert load_balancing_loss_layer(logits, idx).item() == pytest.approx(1.0, abs=1e-6)
    # Peaked P on expert 0 (softmax [e^2, 1, 1, 1] / (e^2 + 3)) with the same choices.
    logits = torch.tensor([[2.0, 0, 0, 0], [2.0, 0, 0, 0]])
    p0 = math.exp(2) / (math.exp(2) + 3)
    p1 = 1 / (math.exp(2) + 3)
    want = 4 * (0.5 * p0 + 0.25 * p1 + 0.25 * p1)
    assert load_balancing_loss_layer(logits, idx).item() == pytest.approx(want, abs=1e-6)


def test_aux_loss_unchanged_by_masked_padding() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 8, generator=g)
    idx, _ = route(logits, 2)
    base_aux = load_balancing_loss_layer(logits, idx)
    base_z = z_loss_layer(logits)
    pad_logits = torch.randn(1000, 8, generator=g) * 5
    pad_idx = torch.zeros(1000, 2, dtype=torch.long)  # all padding "chooses" expert 0: would skew f
    all_logits = torch.cat([logits, pad_logits])
    all_idx = torch.cat([idx, pad_idx])
    mask = torch.cat([torch.ones(37, dtype=torch.bool), torch.zeros(1000, dtype=torch.bool)])
    torch.testing.assert_close(load_balancing_loss_layer(all_logits, all_idx, mask), base_aux, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z_loss_layer(all_logits, mask), base_z, rtol=1e-6, atol=1e-6)
    # ... and the padding would change it if it were counted.
    assert abs(load_balancing_loss_layer(all_logits, all_idx).item() - base_aux.item()) > 0.05


@pytest.mark.parametrize(("E", "K"), [(8, 2), (4, 1), (16, 4)])
def test_aux_loss_uniform_routing_is_one(E: int, K: int) -> None:
    T = E * 3
    logits = torch.zeros(T, E)  # P_e = 1/E exactly
    idx = (torch.arange(T * K) % E).view(T, K)  # every expert chosen equally often: f_e = 1/E
    assert load_balancing_loss_layer(logits, idx).item() == pytest.approx(1.0, abs=1e-6)


def test_fully_masked_batch_gives_zero() -> None:
    logits = torch.randn(5, 4, requires_grad=True)
    idx, _ = route(logits.detach(), 2)
    mask = torch.zeros(5, dtype=torch.bool)
    aux = load_balancing_loss_layer(logits, idx, mask)
    z = z_loss_layer(logits, mask)
    assert aux.item() == 0.0 and z.item() == 0.0
    (aux + z).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    targets = torch.full((1, 5), IGNORE)
    assert lm_loss(torch.randn(1, 5, 11), targets).item() == 0.0


def test_lm_loss_ignores_masked_targets() -> None:
    logits = torch.randn(2, 6, 11)
    targets = torch.randint(0, 11, (2, 6))
    masked = targets.clone()
    masked[1, 3:] = IGNORE
    keep = masked != IGNORE
    want = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(lm_loss(logits, masked), want)


def _tiny_model(aux: float = 0.02, z: float = 0.0) -> Transformer:
    cfg = get_preset("tiny-moe").replace(moe=MoEConfig(num_experts=4, top_k=2, aux_loss_coef=aux, z_loss_coef=z))
    m = Transformer(cfg)
    m.init_weights(seed=0)
    return m


def test_aux_loss_reaches_router_gradient() -> None:
    x = torch.randint(0, 256, (2, 16))
    for coef in (0.02, 0.0):
        m = _tiny_model(aux=coef)
        routings = m.forward_output(x).routing
        aux, _ = router_losses(routings)
        (coef * aux).backward()
        grad = m.layers[0].ffn.gate.weight.grad
        if coef > 0:
            assert grad is not None and grad.abs().sum() > 0
        else:
            assert grad is None or grad.abs().sum() == 0


def test_router_loss_gradcheck_float64() -> None:
    """The analytic gradient of aux + z w.r.t. the router weight equals finite differences (float64)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 6, dtype=torch.float64, generator=g)
    w = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    idx, _ = route((x @ w.T).detach(), 2)  # top-k is piecewise constant: fix it
    mask = torch.tensor([True] * 10 + [False] * 2)

    def f(w: torch.Tensor) -> torch.Tensor:
        logits = x @ w.T
        return load_balancing_loss_layer(logits, idx, mask) + 0.1 * z_loss_layer(logits, mask)

    assert torch.autograd.gradcheck(f, (w,), eps=1e-6, atol=1e-7)


def test_router_gradients_float32_match_float64() -> None:
    """Gradients of the router losses through a real model's float32 router match a float64
    recomputation from the same inputs and choices."""
    m = _tiny_model(aux=0.02, z=0.001)
    x = torch.randint(0, 256, (2, 24))
    captured: dict[str, torch.Tensor] = {}
    gate = m.layers[1].ffn.gate
    # The router's input: capture the normed hidden state fed to the MoE block.
    block_ffn = m.layers[1].ffn
    block_ffn.register_forward_pre_hook(lambda _mod, args: captured.__setitem__("x", args[0].detach()))
    routings = m.forward_output(x).routing
    r = routings[1]
    loss32 = 0.02 * load_balancing_loss_layer(r.logits_TE, r.idx_TK) + 0.001 * z_loss_layer(r.logits_TE)
    (g32,) = torch.autograd.grad(loss32, gate.weight)

    x64 = captured["x"].reshape(-1, captured["x"].shape[-1]).double()
    w64 = gate.weight.detach().double().requires_grad_(True)
    logits64 = x64 @ w64.T
    loss64 = 0.02 * load_balancing_loss_layer(logits64, r.idx_TK) + 0.001 * z_loss_layer(logits64)
    (g64,) = torch.autograd.grad(loss64, w64)
    assert g64.abs().max() > 0
    torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-5, atol=1e-7)


def test_router_losses_average_layers_and_expert_load() -> None:
    logits, idx = _fixed()
    r1 = Routing(logits, idx, torch.ones(3, 1))
    r2 = Routing(torch.zeros(3, 2), torch.tensor([[0], [1], [0]]), torch.ones(3, 1))
    aux, z = router_losses([r1, r2])
    # layer 2: f = [2/3, 1/3], P = [1/2, 1/2] -> 2 * (1/3 + 1/6) = 1.
    assert aux.item() == pytest.approx((9.5 / 9 + 1.0) / 2, abs=1e-6)
    assert z.item() == pytest.approx((math.log(4) ** 2 + math.log(2) ** 2) / 2, abs=1e-6)
    load = expert_load([r1, r2], 2)
    torch.testing.assert_close(load, torch.tensor([[1 / 3, 2 / 3], [2 / 3, 1 / 3]]))


def test_router_losses_and_expert_load_name_what_they_were_given() -> None:
    """transformers' router logits failed on "'Tensor' object has no attribute 'logits_TE'"; expert_load
    with a wrong expert count gave rows of the wrong length; a layer's experts and logits of different
    token counts gave a load-balancing loss from the wrong tokens' counts."""
    logits, idx = _fixed()
    r = Routing(logits, idx, torch.ones(3, 1))
    for f in (lambda: router_losses((logits,)), lambda: expert_load([logits], 2)):
        with pytest.raises(ValueError, match=r"each MoE layer's Routing .*not Tensor .*Routing\(logits_TE, \*route"):
            f()
    assert router_losses([Routing(logits, *route(logits, 1))])[0] == router_losses([r])[0]  # the hint works
    with pytest.raises(ValueError, match="num_experts=4, but the router chose among 2 experts"):
        expert_load([r], 4)  # was [[1/3, 2/3, 0, 0]]
    with pytest.raises(ValueError, match="idx_TK routes 2 tokens but logits_TE has 3"):
        load_balancing_loss_layer(logits, idx[:2])


def test_capacity_factor_drops_over_capacity_pairs() -> None:
    # 4 tokens, K=1, E=2, capacity_factor 1.0 -> C = 2 per expert; 3 tokens want expert 0.
    idx = torch.tensor([[0], [0], [1], [0]])
    w, dropped = apply_capacity(idx, torch.ones(4, 1), 2, 1.0)
    assert dropped == 1
    assert w.squeeze(1).tolist() == [1.0, 1.0, 1.0, 0.0]  # the last arrival is dropped
    # Top-2: first choices are served before second choices.
    idx = torch.tensor([[0, 1], [1, 0], [0, 1]])  # C = ceil(0.5 * 3 * 2 / 2) = 2
    w, dropped = apply_capacity(idx, torch.ones(3, 2), 2, 0.5)
    # slot-0 arrivals: e0 from t0, e1 from t1, e0 from t2 -> expert 0 full; slot-1: e1 (t0) fits, e0 (t1), e1 (t2) drop.
    assert w.tolist() == [[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]] and dropped == 2


def test_capacity_in_model_counts_drops_and_large_capacity_is_dropless() -> None:
    m = _tiny_model()
    x = torch.randint(0, 256, (2, 32))
    ref = m(x)
    for cf, expect_drops in ((0.5, True), (100.0, False)):
        cfg = m.config.replace(moe=MoEConfig(num_experts=4, top_k=2, capacity_factor=cf))
        m2 = Transformer(cfg)
        m2.load_state_dict(m.state_dict())
        o = m2.forward_output(x)
        out, routings = o.logits_BTV, o.routing
        drops = sum(r.dropped for r in routings)
        assert (drops > 0) == expect_drops
        if not expect_drops:
            torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_lm_loss_names_unshifted_or_flat_targets() -> None:
    # Targets of the whole ids [B, T+1] failed inside cross_entropy with "Expected input batch_size
    # (12) to match target batch_size (14)"; the docstring did not say the targets are shifted.
    ids = torch.randint(0, 11, (2, 7))
    logits = torch.randn(2, 6, 11)
    with pytest.raises(ValueError, match=r"targets_BT \[2, 7\] must have the logits' shape.*\[2, 6\]"):
        lm_loss(logits, ids)
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(lm_loss(logits, ids[:, 1:]), want)
    torch.testing.assert_close(lm_loss(logits, ids[:, 1:].reshape(-1)), want)  # flat targets still work


def test_aux_loss_is_transformers_over_top_k_per_layer() -> None:
    """The documented difference from transformers' `load_balancing_loss_func` (docs/training.md), exactly:
    for one layer mixlab's loss is transformers' / K (f normalised over all T*K choices, not per slot);
    for several, the mean of those per-layer values (transformers pools the layers' tokens into one
    product); padding masked the same way as its `attention_mask`."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    E, K, B, T = 8, 2, 3, 10
    mask_BT = torch.ones(B, T, dtype=torch.bool)
    mask_BT[0, 6:] = False
    mask_BT[2, 3:] = False
    layers = [torch.randn(B * T, E, generator=g) * s for s in (0.5, 1.0, 2.0)]
    routings = [Routing(lg, route(lg, K)[0], torch.ones(B * T, K)) for lg in layers]

    def hf(lgs: list[torch.Tensor], mask: torch.Tensor | None) -> float:
        return float(load_balancing_loss_func(tuple(lgs), E, K, mask))

    for mask in (None, mask_BT):
        ours = [float(router_losses([r], mask)[0]) for r in routings]
        assert ours == pytest.approx([hf([lg], mask) / K for lg in layers], rel=1e-6)
        assert float(router_losses(routings, mask)[0]) == pytest.approx(sum(ours) / len(ours), rel=1e-6)
        assert abs(float(router_losses(routings, mask)[0]) - hf(layers, mask) / K) > 1e-3  # pooling differs
