"""Perplexity, bits per byte and word perplexity of a model on text, with lm-evaluation-harness's
conventions (its `wikitext` task), so that numbers compare across tools.

Conventions (lm-eval's `loglikelihood_rolling` with `context_len=1`, and its `wikitext` metrics):
- A document is encoded without BOS; its first window is preceded by one prefix token (BOS), so the
  first token is predicted too. Each token is predicted exactly once.
- Windows hold at most `context` tokens. With `stride == context` (the default, lm-eval's) they are
  disjoint: each window predicts all of its tokens with no earlier context, except the last, which
  ends at the text's end and takes the `context` tokens before it. With a smaller stride, each
  window predicts `stride` new tokens, the first from `context - stride + 1` tokens (the sliding
  evaluation of transformers' perplexity guide with its `max_length = context + 1`, except a short
  last window, which sees a whole context here): lower perplexity, more compute.
- Bytes are the UTF-8 bytes of the original text, words its whitespace-separated pieces
  (`re.split(r"\\s+", text)`, as lm-eval counts them), tokens the predicted tokens.
  token perplexity = exp(NLL / tokens), word perplexity = exp(NLL / words),
  bits per byte = NLL / bytes / ln 2 (NLL in nats, summed over the text).

The trainer's validation (`mixlab.train.loop.evaluate`) scores its fixed token windows with
`score_windows` and reports `Score`s: one way to turn logits into a loss (`log_probs`, float32).

Shape legend: B windows in a batch, T tokens, D model width, V vocabulary, R the scored rows of a batch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from mixlab.model import Transformer, check_model


@dataclass
class Score:
    """Summed negative log-likelihood (nats) over some text, and what it is divided by."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    words: int = 0
    docs: int = 0

    @property
    def loss(self) -> float:
        """Mean NLL per predicted token (nats): the trainer's validation loss."""
        return self.nll / max(self.tokens, 1)

    def add(self, other: Score) -> None:
        self.nll += other.nll
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.words += other.words
        self.docs += other.docs

    def metrics(self) -> dict[str, float | int]:
        def exp(x: float) -> float:
            return math.exp(x) if x < 700 else math.inf

        return {
            "token_perplexity": exp(self.nll / max(self.tokens, 1)),
            "bits_per_byte": self.nll / max(self.bytes, 1) / math.log(2),
            "word_perplexity": exp(self.nll / max(self.words, 1)),
            "byte_perplexity": exp(self.nll / max(self.bytes, 1)),
            "nll": self.nll, "tokens": self.tokens, "bytes": self.bytes, "words": self.words, "docs": self.docs,
        }


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def rolling_windows(ids: Sequence[int], *, prefix: int, context: int, stride: int | None = None
                    ) -> list[tuple[list[int], int]]:
    """The windows that score `ids`: each is (input tokens, how many of its last targets to score).

    A window's targets are its inputs shifted by one, followed by the next token; the model scores
    the last `n` targets. With `stride == context` these are lm-eval's `get_rolling_token_windows(
    ..., context_len=1)` followed by `make_disjoint_window`."""
    stride = context if stride is None else stride
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and the context ({context}); got {stride}")
    seq = [prefix, *ids]  # seq[i] predicts seq[i + 1]
    out = []
    done = 0  # tokens of `ids` scored so far
    while done < len(ids):
        n = min(context if done == 0 else stride, len(ids) - done)
        end = done + n  # score ids[done:end], i.e. targets seq[done + 1 : end + 1]
        start = max(0, end - context)
        out.append((seq[start:end], n))
        done = end
    return out


def log_probs(logits_BTV: torch.Tensor) -> torch.Tensor:
    """Log-probabilities in float32: what every score here (and the trainer's validation loss) is
    summed from, whatever dtype the model computes in."""
    return torch.log_softmax(logits_BTV.float(), dim=-1)


@torch.no_grad()
def score_windows(logits_fn: Callable[[torch.Tensor], torch.Tensor], windows_BT: torch.Tensor, *,
                  batch_size: int, device: torch.device | str = "cpu") -> Score:
    """The summed NLL of token windows as a training step sees them: in each window of T tokens,
    tokens 1..T-1 are predicted from those before them (no prefix token, no context across
    windows). `logits_fn(inputs_BT) -> logits_BTV` runs the model (the trainer's forward under its
    autocast, also collecting the routing). Bytes and words are not known from tokens: 0."""
    s = Score()
    for i in range(0, len(windows_BT), batch_size):
        x_BT = windows_BT[i : i + batch_size].to(device)
        y_BT = x_BT[:, 1:]
        lp_BT = log_probs(logits_fn(x_BT[:, :-1])).gather(-1, y_BT[..., None])[..., 0]
        s.add(Score(nll=-float(lp_BT.sum()), tokens=y_BT.numel(), docs=len(x_BT)))
    return s


@torch.no_grad()
def score_batch(model: Transformer, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
                ) -> list[tuple[float, bool]]:
    """For each (inputs, targets) pair, where `targets` continues the last `len(targets)` positions of
    `inputs` shifted by one: the summed log-probability of the targets and whether each is the
    greedy choice. Inputs are right-padded into one batch (causal attention: padding after a
    sequence never reaches it)."""
    check_model(model)
    # Checked here: a target longer than its input, or outside the vocabulary, failed in torch's gather.
    if len(inputs) != len(targets):
        raise ValueError(f"score_batch takes one target list per input; got {len(inputs)} inputs and "
                         f"{len(targets)} targets")
    V = model.config.vocab_size
    for b, (x, y) in enumerate(zip(inputs, targets, strict=True)):
        if len(y) > len(x):
            raise ValueError(f"targets[{b}] has {len(y)} tokens but inputs[{b}] only {len(x)}: each target is "
                             "scored at one of the inputs' last positions")
        bad = [t for t in y if not 0 <= t < V]
        if bad:
            raise ValueError(f"targets[{b}] has token id {bad[0]} outside the model's vocabulary [0, {V})")
    if not inputs:
        return []
    dev = next(model.parameters()).device
    T = max(len(x) for x in inputs)
    tokens_BT = torch.zeros(len(inputs), T, dtype=torch.long, device=dev)
    for b, x in enumerate(inputs):
        tokens_BT[b, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
    # The output layer on the target rows alone: a harness request's context, a strided window's
    # earlier tokens and the padding need no logits (R rows x V, not B x T x V, and no log-softmax).
    h_BTD = model.forward_output(tokens_BT, logits=False).hidden_BTD
    h_RD = torch.cat([h_BTD[b, len(x) - len(y) : len(x)] for b, (x, y) in enumerate(zip(inputs, targets, strict=True))])
    lp_RV = log_probs(model.output(h_RD))
    y_R = torch.as_tensor([t for y in targets for t in y], dtype=torch.long, device=dev)
    lp_R, greedy_R = lp_RV.gather(-1, y_R[:, None])[:, 0], lp_RV.argmax(-1) == y_R
    out, r = [], 0
    for y in targets:
        out.append((float(lp_R[r : r + len(y)].sum()), bool(greedy_R[r : r + len(y)].all())))
        r += len(y)
    return out


def _check_scoring(model: Transformer, *, prefix: int, batch_size: int) -> None:
    # batch_size < 1 put every window of a document into one batch; a prefix outside the vocabulary
    # failed deep in the embedding with an IndexError.
    check_model(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"invalid batch_size={batch_size!r}: expected an integer >= 1")
    vocab = model.config.vocab_size
    if isinstance(prefix, bool) or not isinstance(prefix, int) or not 0 <= prefix < vocab:
        raise ValueError(f"invalid prefix={prefix!r}: expected a token id in [0, {vocab}) (the BOS id)")


def score_ids(model: Transformer, ids: Sequence[int], *, prefix: int, context: int, stride: int | None = None,
              batch_size: int = 8) -> float:
    """Summed NLL (nats) of every token of `ids`, each predicted once (see `rolling_windows`)."""
    _check_scoring(model, prefix=prefix, batch_size=batch_size)
    windows = rolling_windows(ids, prefix=prefix, context=context, stride=stride)
    seq = [prefix, *ids]
    nll = 0.0
    pos = 0
    batch_in: list[list[int]] = []
    batch_tg: list[list[int]] = []
    for x, n in windows:
        batch_in.append(x)
        batch_tg.append(seq[pos + 1 : pos + 1 + n])
        pos += n
        if len(batch_in) == batch_size:
            nll -= sum(lp for lp, _ in score_batch(model, batch_in, batch_tg))
            batch_in, batch_tg = [], []
    if batch_in:
        nll -= sum(lp for lp, _ in score_batch(model, batch_in, batch_tg))
    return nll


@dataclass
class Report:
    """Scores per domain and overall, with the settings that produced them."""

    domains: dict[str, Score] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)

    def overall(self) -> Score:
        total = Score()
        for s in self.domains.values():
            total.add(s)
        return total

    def to_json(self) -> dict[str, object]:
        """JSON-ready: a perplexity past float's range (inf, e.g. the word perplexity of text with
        hardly any whitespace) is null, as JSON has no infinity (json.dumps wrote `Infinity`, which
        JSON.parse and other strict readers refuse)."""
        def finite(m: dict[str, float | int]) -> dict[str, float | int | None]:
            return {k: v if math.isfinite(v) else None for k, v in m.items()}

        return {"settings": self.settings, "overall": finite(self.overall().metrics()),
                "domains": {d: finite(s.metrics()) for d, s in self.domains.items()}}


def evaluate_texts(
    model: Transformer,
    encode: Callable[[str], Sequence[int]],
    docs: Iterable[tuple[str, str]],
    *,
    prefix: int,
    context: int = 2048,
    stride: int | None = None,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> Report:
    """Score `(domain, text)` documents. `encode` turns text into ids without BOS; `prefix` is the
    token before each document (BOS). `progress(tokens)` is called after each document."""
    check_model(model)
    if context > model.config.max_seq_len:
        raise ValueError(f"context {context} exceeds the model's context length {model.config.max_seq_len}")
    if context < 1:
        raise ValueError(f"context must be at least 1; got {context}")
    _check_scoring(model, prefix=prefix, batch_size=batch_size)
    report = Report(settings={"context": context, "stride": stride or context, "prefix_token": prefix})
    was_training = model.training
    model.eval()
    try:
        for domain, text in docs:
            ids = encode(text)
            s = report.domains.setdefault(domain, Score())
            s.add(Score(nll=score_ids(model, ids, prefix=prefix, context=context, stride=stride,
                                      batch_size=batch_size),
                        tokens=len(ids), bytes=len(text.encode("utf-8")), words=count_words(text), docs=1))
            if progress is not None:
                progress(len(ids))
    finally:
        model.train(was_training)
    return report
