"""Training losses: language-model cross-entropy and the two router losses of sparse MoE training.

Shape legend: B batch, T sequence (or B*T flattened tokens where noted), V vocabulary, E experts,
K experts chosen per token, L MoE layers.

All three losses take a boolean `mask` of the tokens that count (False = padding / ignored). A
masked token contributes nothing, and a batch with no valid token gives exactly 0 (not NaN):
averages divide by `max(n_valid, 1)`.

Load-balancing loss (Switch Transformer, arXiv 2101.03961 eq. 4; GShard arXiv 2006.16668), per layer:

    aux = E * sum_e f_e * P_e
    f_e = (number of (token, slot) choices of expert e among valid tokens) / (n_valid * K)
    P_e = mean over valid tokens of softmax(router_logits)_e       (the full E-way softmax)

then averaged over the MoE layers. `f` is a fraction over all T*K choices, so sum_e f_e = 1; with
perfectly uniform routing (f_e = P_e = 1/E) the loss is exactly 1.0 for any E and K, and it is
minimised at 1.0 over uniform P for any f. Only P carries a gradient (f comes from a top-k).
transformers' `load_balancing_loss_func` normalises f per slot instead (each of the K slots sums to
1), so its value is K times this one for a single layer, and it pools all layers' tokens before the
product instead of averaging per-layer losses; it also counted padding tokens before its
`attention_mask` argument (huggingface/transformers#28263).

Router z-loss (ST-MoE, arXiv 2202.08906 eq. 5): mean over valid tokens of logsumexp(logits)^2,
averaged over layers. It keeps router logits small, which keeps the float32 softmax well conditioned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from mixlab.model.moe import Routing

IGNORE = -100  # target id that cross-entropy skips (same convention as torch and transformers)


def lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in float32 over targets != IGNORE; 0 when all are ignored. The targets are
    already shifted, `targets_BT[b, t]` being the token after position t: for ids `[B, T+1]`,
    `lm_loss(model(ids[:, :-1]), ids[:, 1:])` (transformers' `labels=ids` shifts inside; this does not)."""
    if logits_BTV.shape[:-1].numel() != targets_BT.numel():  # (flat targets [B*T] are fine)
        raise ValueError(f"targets_BT {list(targets_BT.shape)} must have the logits' shape without the vocabulary "
                         f"{list(logits_BTV.shape[:-1])} (shifted targets: model(ids[:, :-1]), ids[:, 1:])")
    logits_NV = logits_BTV.reshape(-1, logits_BTV.shape[-1]).float()
    targets_N = targets_BT.reshape(-1)
    total = F.cross_entropy(logits_NV, targets_N, ignore_index=IGNORE, reduction="sum")
    n_valid = (targets_N != IGNORE).sum().clamp(min=1)
    return total / n_valid


def _mask_T(mask: torch.Tensor | None, n_tokens: int, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(n_tokens, dtype=torch.bool, device=device)
    m = mask.reshape(-1).to(device=device, dtype=torch.bool)
    if m.numel() != n_tokens:
        raise ValueError(f"mask has {m.numel()} entries but the router saw {n_tokens} tokens")
    return m


def _choice_counts(logits_TE: torch.Tensor, idx_TK: torch.Tensor, w_T: torch.Tensor) -> torch.Tensor:
    """`[E + 1]`: the K choices of each token per expert, counted with weight 1 for valid tokens and 0
    for masked ones (no gradient), then the number of valid tokens. Static shapes and no host sync,
    so torch.compile keeps it in-graph."""
    T, E = logits_TE.shape
    K = idx_TK.shape[1]
    counts_E = torch.zeros(E, dtype=logits_TE.dtype, device=logits_TE.device)
    counts_E.scatter_add_(0, idx_TK.reshape(-1), w_T[:, None].expand(T, K).reshape(-1))
    return torch.cat([counts_E, w_T.sum()[None]])


def load_balancing_loss_layer(
    logits_TE: torch.Tensor, idx_TK: torch.Tensor, mask_T: torch.Tensor | None = None, *,
    counts_E1: torch.Tensor | None = None,
) -> torch.Tensor:
    """E * sum_e f_e * P_e for one layer (see the module docstring); 1.0 for uniform routing.
    `counts_E1`: the choice counts and valid tokens `f` comes from (default: these tokens')."""
    T, E = logits_TE.shape
    K = idx_TK.shape[1]
    if idx_TK.shape[0] != T:  # else the counts took the first T*K weights of the wrong tokens, silently
        raise ValueError(f"idx_TK routes {idx_TK.shape[0]} tokens but logits_TE has {T}: one layer's Routing")
    m_T = _mask_T(mask_T, T, logits_TE.device)
    w_T = m_T.to(logits_TE.dtype)
    n_valid = w_T.sum().clamp(min=1)
    probs_TE = torch.softmax(logits_TE, dim=-1)
    P_E = (probs_TE * w_T[:, None]).sum(0) / n_valid
    c_E1 = _choice_counts(logits_TE, idx_TK, w_T) if counts_E1 is None else counts_E1
    f_E = c_E1[:E] / (c_E1[E].clamp(min=1) * K)
    return E * (f_E * P_E).sum()


def z_loss_layer(logits_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over valid tokens of logsumexp(router logits)^2 (ST-MoE eq. 5)."""
    T = logits_TE.shape[0]
    w_T = _mask_T(mask_T, T, logits_TE.device).to(logits_TE.dtype)
    z_T = torch.logsumexp(logits_TE, dim=-1)
    return (z_T.square() * w_T).sum() / w_T.sum().clamp(min=1)


def _check_routings(routings: Sequence[Routing], num_experts: int | None = None) -> None:
    """Each item a layer's `Routing` (transformers' router logits failed on 'no attribute logits_TE'),
    of `num_experts` experts (a smaller number gave rows of the wrong length, a larger one zeros)."""
    for r in routings:
        if not isinstance(r, Routing):
            raise ValueError(f"routings must hold each MoE layer's Routing (model.forward_output(tokens).routing), "
                             f"not {type(r).__name__} (router logits alone: Routing(logits_TE, *route(logits_TE, "
                             "top_k)), route from mixlab.model)")
        if num_experts is not None and r.logits_TE.shape[-1] != num_experts:
            raise ValueError(f"num_experts={num_experts}, but the router chose among {r.logits_TE.shape[-1]} experts")


def router_losses(
    routings: Sequence[Routing], mask: torch.Tensor | None = None, *,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss), each averaged over the MoE layers; zeros for a dense model.

    `mask` (`[B, T]` or flat `[B*T]`, True = counts) is flattened the way the model flattens tokens
    for routing (batch-major), so it lines up with each `Routing`'s T axis.

    `reduce` (training over several processes, each with its share of the batch): sums a tensor over
    them. The fractions f then count the whole batch's choices, while P stays this process's mean;
    averaging the processes' losses (and gradients) gives exactly the one-process loss on the whole
    batch, since it is linear in P (with equal valid tokens per process).
    """
    _check_routings(routings)
    if not routings:
        zero = torch.zeros(())
        return zero, zero
    counts: list[torch.Tensor | None] = [None] * len(routings)
    if reduce is not None:
        with torch.no_grad():
            c_LE1 = torch.stack([_choice_counts(r.logits_TE, r.idx_TK, _mask_T(mask, r.logits_TE.shape[0],
                                                                                r.logits_TE.device).float())
                                 for r in routings])
            counts = list(reduce(c_LE1).unbind(0))
    aux = torch.stack([load_balancing_loss_layer(r.logits_TE, r.idx_TK, mask, counts_E1=c)
                       for r, c in zip(routings, counts, strict=True)]).mean()
    z = torch.stack([z_loss_layer(r.logits_TE, mask) for r in routings]).mean()
    return aux, z


@torch.no_grad()
def expert_load(routings: Sequence[Routing], num_experts: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`[L, E]` fraction of (valid token, slot) choices each expert received in each layer."""
    _check_routings(routings, num_experts)
    rows = []
    for r in routings:
        m_T = _mask_T(mask, r.idx_TK.shape[0], r.idx_TK.device)
        counts_E = torch.bincount(r.idx_TK[m_T].reshape(-1), minlength=num_experts).float()
        rows.append(counts_E / counts_E.sum().clamp(min=1))
    return torch.stack(rows) if rows else torch.zeros(0, num_experts)
