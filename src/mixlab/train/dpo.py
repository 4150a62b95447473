"""Direct Preference Optimisation: preference-pair data, sequence log-probabilities, the losses.

Shape legend: N pairs in a batch, T tokens, V vocabulary.

Data: one JSON object per line with `chosen` and `rejected` (a reply string, or a list holding one
assistant message) and the prompt as either `prompt` (a string: a Human:/Assistant: transcript such
as Anthropic HH's becomes chat turns, anything else one user turn; or chat turns, TRL's conversational
format) or `messages` (chat turns ending with a user turn); or no prompt, `chosen` and `rejected` whole
conversations (TRL's implicit prompt: `split_implicit_prompt`). Prompt and reply are rendered with the
Mixtral-Instruct template (sft.py); only the reply's tokens (and its `</s>`) count in a sequence's
log-probability. A reply message's mistral-finetune `"weight"` is 1 or refused (`_reply`); the prompt's
assistant turns are context whatever theirs, as in SFT's prompt-completion rows.

Losses, with pi/ref the policy/reference log-probabilities of the chosen (c) and rejected (r) reply
and h = (pi_c - pi_r) - (ref_c - ref_r) (Rafailov et al. 2023, arXiv 2305.18290, eq. 7):

    sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: label smoothing,
                                                                            cDPO, Mitchell 2023)
    ipo      (h - 1 / (2 beta))^2                                         (Azar et al. 2023, eq. 17)

`reference_free` sets ref = 0 (h = pi_c - pi_r). pi and ref are sums over the reply's tokens; with
`lengths` (n_c, n_r, the replies' token counts: `length_normalize`) the loss takes
h = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r instead, per-token log-ratios: TRL 1.16's `ipo` (which
always does; IPO's paper writes sums) and `sigmoid_norm`. The metrics are TRL's either way, from the
sums: rewards beta (pi - ref), detached, and logps pi.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mixlab.tokenizer import ChatError
from mixlab.train.data import DataError, TrainTokenizer
from mixlab.train.sft import _messages, prompt_turns, read_jsonl, render_turns, reply_text, transcript_turns

LOSSES = ("sigmoid", "ipo")


@dataclass
class Pair:
    prompt: list[int]  # rendered prompt, ending with [/INST]
    chosen: list[int]  # reply tokens with </s>
    rejected: list[int]
    where: str = ""


def split_implicit_prompt(obj: dict, where: str) -> dict[str, Any]:
    """A row of TRL's implicit-prompt format (`chosen` and `rejected` whole conversations: message lists,
    or Human:/Assistant: transcripts such as Anthropic HH's raw rows) as prompt, chosen and rejected: the
    turns both begin with are the prompt (at most all but the last, as `trl.extract_prompt`), and what
    follows must be one assistant reply in each."""
    convs = []
    for f in ("chosen", "rejected"):
        if not isinstance(obj[f], str | list):
            raise DataError(f"{where}: field '{f}' must be a string or a list of messages, got {type(obj[f]).__name__}")
        convs.append(transcript_turns(obj[f]) if isinstance(obj[f], str) else _messages(obj, where, f))
    c, r = convs
    k = 0  # turns both begin with
    while k < min(len(c), len(r)) - 1 and c[k] == r[k]:
        k += 1
    what = ("no field 'prompt' or 'messages', so 'chosen' and 'rejected' must be whole conversations that differ "
            "only in one last assistant reply (TRL's implicit prompt)")
    if k == 0:
        raise DataError(f"{where}: {what}; they share no first turn")
    for field, turns in zip(("chosen", "rejected"), convs, strict=True):
        if len(turns) != k + 1 or turns[k]["role"] != "assistant":
            raise DataError(f"{where}: {what}; after the {k} turn(s) they share, '{field}' has {len(turns) - k} "
                            f"turn(s), the first by {turns[k]['role']!r}")
    return {"prompt": c[:k], "chosen": [c[k]], "rejected": [r[k]]}


def read_pairs(path: str | Path, tok: TrainTokenizer) -> list[Pair]:
    """Every preference pair of a JSONL file, tokenized; errors name the file, line and field."""
    out = []
    for obj, where in read_jsonl(path):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with 'chosen', 'rejected' and 'prompt' or 'messages'")
        msgs = obj.get("messages")
        ends_in_reply = isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == \
            "assistant"  # an SFT conversation (a DPO prompt in `messages` ends with a user turn)
        if not {"chosen", "rejected"} & obj.keys() and ("completion" in obj or ends_in_reply):
            field = "completion" if "completion" in obj else "messages"
            raise DataError(f"{where}: a conversation to imitate ('{field}'), which mixlab sft trains on; dpo takes "
                            "'chosen' and 'rejected' replies to a prompt")
        if "prompt" not in obj and "messages" not in obj and "chosen" in obj and "rejected" in obj:
            obj = split_implicit_prompt(obj, where)
        msgs, field = prompt_turns(obj, where)
        chosen, rejected = _reply(obj, "chosen", where), _reply(obj, "rejected", where)
        try:
            prompt, _ = render_turns(msgs, tok, final_assistant=False)
        except ChatError as e:
            raise DataError(f"{where}: field '{field}': {e}") from None
        out.append(Pair(prompt, tok.encode(chosen, bos=False, eos=True), tok.encode(rejected, bos=False, eos=True),
                        where))
    return out


def _reply(obj: dict, field: str, where: str) -> str:
    """A pair's reply (`reply_text`). A reply message's mistral-finetune `"weight"` is checked as SFT
    checks it; 0 (context, not trained) is refused: a pair with an untrained reply is no preference, and
    its reply's log-probability summed over no token would leave the loss training the other reply alone."""
    text = reply_text(obj, field, where)
    if isinstance(obj[field], list) and _messages(obj, where, field)[0].get("weight") == 0:
        raise DataError(f"{where}: field '{field}' is a message of \"weight\": 0 (context, not trained, as in sft "
                        "data); DPO trains both replies of a pair: drop the weight, or the pair")
    return text


def fit(prompt: list[int], reply: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Cut to `max_len` tokens: the reply to at most half, then the prompt from the left (keeping
    BOS), as TRL before 1.0 kept the end of a long prompt (`truncation_mode="keep_end"`). TRL 1.16 cuts
    the concatenation instead (docs/instruct.md)."""
    if len(prompt) + len(reply) <= max_len:
        return prompt, reply
    reply = reply[: max(max_len // 2, max_len - len(prompt))]
    keep = max_len - len(reply)
    return ([prompt[0]] + prompt[len(prompt) - keep + 1:]) if keep > 1 else prompt[:keep], reply


@dataclass
class PairBatch:
    """2N sequences (the N chosen, then the N rejected), right-padded: tokens, targets, positions
    (-1 = padding) and a mask of the reply tokens whose log-probs count, each `[2N, T]`."""

    tokens: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    reply: torch.Tensor
    index: torch.Tensor  # [N] the pairs' indices in the dataset (for the stored reference log-probs)


def collate_pairs(pairs: Sequence[Pair], index: Sequence[int], max_len: int) -> PairBatch:
    seqs = []
    for which in ("chosen", "rejected"):
        for p in pairs:
            prompt, reply = fit(p.prompt, getattr(p, which), max_len + 1)
            seqs.append((prompt, reply))
    T = max(len(a) + len(b) for a, b in seqs) - 1
    n = len(seqs)
    tokens = torch.zeros(n, T, dtype=torch.long)
    targets = torch.zeros(n, T, dtype=torch.long)
    positions = torch.full((n, T), -1, dtype=torch.long)
    reply_mask = torch.zeros(n, T, dtype=torch.bool)
    for i, (a, b) in enumerate(seqs):
        ids = torch.tensor(a + b)
        L = len(ids) - 1
        tokens[i, :L], targets[i, :L] = ids[:-1], ids[1:]
        positions[i, :L] = torch.arange(L)
        reply_mask[i, len(a) - 1: L] = True  # targets that are reply tokens
    return PairBatch(tokens, targets, positions, reply_mask, torch.tensor(list(index)))


def sequence_logps(logits_NTV: torch.Tensor, targets_NT: torch.Tensor, mask_NT: torch.Tensor) -> torch.Tensor:
    """Sum over masked positions of log softmax(logits)[target], in float32: `[N]`."""
    logp_NT = torch.log_softmax(logits_NTV.float(), dim=-1).gather(-1, targets_NT[..., None]).squeeze(-1)
    return (logp_NT * mask_NT.to(logp_NT.dtype)).sum(-1)


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    lengths: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean DPO loss over the N pairs of summed sequence log-probs `[N]`, and TRL's metrics (see the
    module docstring for the formulas; `lengths`: the chosen and rejected replies' token counts `[N]`,
    to compare per-token log-ratios)."""
    if loss_type not in LOSSES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {', '.join(LOSSES)}")
    ref_c = torch.zeros_like(ref_chosen) if reference_free else ref_chosen
    ref_r = torch.zeros_like(ref_rejected) if reference_free else ref_rejected
    if lengths is None:
        h = (chosen - rejected) - (ref_c - ref_r)
    else:
        n_c, n_r = (n.to(chosen.dtype).clamp(min=1) for n in lengths)
        h = (chosen - ref_c) / n_c - (rejected - ref_r) / n_r
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    rc = beta * (chosen - ref_c).detach()
    rr = beta * (rejected - ref_r).detach()
    metrics = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
               "rewards/accuracies": (rc > rr).float().mean(), "rewards/margins": (rc - rr).mean(),
               "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean()}
    return losses.mean(), metrics


def reference_fingerprint(pairs: Sequence[Pair], settings: dict[str, Any]) -> str:
    """A hash of the tokenized pairs and the settings the reference log-probs depend on."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for p in pairs:
        h.update(repr((p.prompt, p.chosen, p.rejected)).encode())
    return h.hexdigest()
