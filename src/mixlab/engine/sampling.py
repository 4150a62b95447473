"""Sampling: next-token logits to token ids, for a whole batch (`Sampler`) or one engine row with
its own settings and generator (`sample_row`), and the logprobs a request asks for.

Shape legend: B batch, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from mixlab.engine.api import GREEDY_TEMPERATURE, SamplingParams
from mixlab.errors import GenerationError

if TYPE_CHECKING:
    from mixlab.tokenizer import Tokenizer

__all__ = ["Sampler", "bad_words_ids", "banned_tokens", "check_logits", "greedy_token", "penalize", "row_argmax",
           "sample_row", "seed_generator", "top_logprobs"]


_NAN_MESSAGE = ("the model produced NaN logits; its weights or inputs hold NaN/Inf (loading warns with the "
                "tensor's name), or a float16 overflow: try --dtype float32")


def _host_array(t: torch.Tensor) -> np.ndarray | None:
    """A NumPy view of a CPU float32 tensor (no copy), or None. NumPy's reductions over one row of
    logits are ~10x cheaper than PyTorch's here (argmax over 32k floats: ~2 us against ~20 us, plus
    ~28 us for isnan().any()), which matters once per token in a decoding loop."""
    if t.device.type != "cpu" or t.dtype != torch.float32 or t.requires_grad:
        return None
    return t.numpy()


def check_logits(logits: torch.Tensor) -> None:
    """GenerationError when the model produced NaN logits (sampling from them is meaningless:
    multinomial fails, argmax returns an arbitrary token)."""
    a = _host_array(logits)
    nan = bool(np.isnan(a).any()) if a is not None else bool(torch.isnan(logits).any())
    if nan:
        raise GenerationError(_NAN_MESSAGE)


def row_argmax(logits_RV: torch.Tensor) -> list[int | None]:
    """Each row's argmax (the first index on ties) in one NumPy call; None for a row holding NaN
    (NumPy's argmax returns the first NaN's index, so checking the chosen value checks the row) and
    for every row of a tensor NumPy cannot view (not a CPU float32 one)."""
    a = _host_array(logits_RV)
    if a is None or not a.shape[0]:
        return [None] * logits_RV.shape[0]
    idx = a.argmax(axis=1)
    best = a[np.arange(a.shape[0]), idx]
    return [None if math.isnan(b) else int(i) for i, b in zip(idx.tolist(), best.tolist(), strict=True)]


def greedy_token(logits_1V: torch.Tensor) -> int:
    """argmax of one row of logits (the first index on ties); GenerationError when it holds NaN."""
    tok = row_argmax(logits_1V.reshape(1, -1))[0]
    if tok is not None:
        return tok
    check_logits(logits_1V)  # NaN: raises; else a tensor NumPy cannot view
    return int(logits_1V.reshape(-1).argmax())


@dataclass(frozen=True)
class Sampler:
    """Turns next-token logits into token ids, in transformers' order: repetition penalty,
    temperature, top-k, top-p, min-p (OpenAI's presence / frequency penalties, `penalize`, go between
    the first two). `temperature=0` (below `GREEDY_TEMPERATURE`, 1e-5) is greedy (argmax,
    first index on ties)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        def bad(name: str, value: object, expected: str) -> ValueError:
            return ValueError(f"invalid {name}={value!r}: expected {expected}")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, v, "a finite number")
        if self.temperature < 0:
            raise bad("temperature", self.temperature, "a number >= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", self.top_k, "an integer >= -1 (0 or -1 = off)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "a number in (0, 1] (1 = off)")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "a number in [0, 1] (0 = off)")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "a number > 0 (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def repeat(self, logits_BV: torch.Tensor, seen_BV: torch.Tensor | None) -> torch.Tensor:
        """The repetition penalty (CTRL, arXiv 1909.05858 §4.1): the logits of tokens `seen_BV` marks
        shrunk towards 0 (divided by it if positive, multiplied if not)."""
        if self.repetition_penalty == 1.0 or seen_BV is None:
            return logits_BV
        p = self.repetition_penalty
        return torch.where(seen_BV, torch.where(logits_BV > 0, logits_BV / p, logits_BV * p), logits_BV)

    def filter(self, logits_BV: torch.Tensor, *, seen_BV: torch.Tensor | None = None) -> torch.Tensor:
        """The logits sampling draws from (`-inf` where a token is ruled out); not for greedy."""
        logits_BV = self.repeat(logits_BV, seen_BV)
        if self.greedy:
            return logits_BV
        logits_BV = logits_BV / self.temperature
        if 0 < self.top_k < logits_BV.shape[-1]:
            kth_B1 = torch.topk(logits_BV, self.top_k, dim=-1).values[:, -1:]
            logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, -math.inf)
        if self.top_p < 1.0:
            # Nucleus sampling (arXiv 1904.09751): keep the smallest set whose mass reaches top_p.
            sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
            probs_BV = sorted_BV.softmax(dim=-1)
            drop_BV = probs_BV.cumsum(dim=-1) - probs_BV >= self.top_p
            # Never the most likely token: a top_p below float32's smallest number compares as 0, which
            # dropped every token (NaN probabilities, multinomial's RuntimeError); transformers keeps it too.
            drop_BV[:, 0] = False
            logits_BV = logits_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, -math.inf))
        if self.min_p > 0.0:
            # min-p (arXiv 2407.01082): drop tokens less likely than min_p times the most likely one.
            probs_BV = logits_BV.softmax(dim=-1)
            logits_BV = logits_BV.masked_fill(probs_BV < self.min_p * probs_BV.amax(-1, keepdim=True), -math.inf)
        return logits_BV

    def __call__(
        self, logits_BV: torch.Tensor, *, seen_BV: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Next token ids `[B]` from float logits `[B, V]`; `seen_BV` marks tokens to penalise."""
        check_logits(logits_BV)
        logits_BV = self.filter(logits_BV, seen_BV=seen_BV)
        if self.greedy:
            return logits_BV.argmax(dim=-1)
        return torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator)[:, 0]


def penalize(logits_BV: torch.Tensor, counts_BV: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence and frequency penalties: each token's logit minus `frequency` times its count
    in the output so far, minus `presence` once it has appeared. With a repetition penalty too, it comes
    first (`Sampler.repeat`), as vLLM and llama.cpp order them: a logit of 2 with repetition 2 and
    presence 1 is 2 / 2 - 1 = 0, not (2 - 1) / 2."""
    if not presence and not frequency:
        return logits_BV
    return logits_BV - counts_BV * frequency - (counts_BV > 0).float() * presence


def sample_row(
    logits_1V: torch.Tensor, params: SamplingParams, sampler: Sampler, *, seen_1V: torch.Tensor | None,
    counts_1V: torch.Tensor | None, generator: torch.Generator | None, bias_1V: torch.Tensor | None = None,
) -> int:
    """One row's next token: `bias_1V` (OpenAI's logit_bias) added to the logits, the repetition penalty
    over `seen`, presence/frequency penalties on its output counts (OpenAI's formula), then `sampler`
    (temperature, top-k, top-p, min-p). Each row is sampled alone with its own generator, so a
    seeded request draws the same numbers whatever else the engine runs."""
    if sampler.greedy and counts_1V is None and seen_1V is None and bias_1V is None:
        return greedy_token(logits_1V)  # the common case, once per token: one cheap pass
    check_logits(logits_1V)
    if bias_1V is not None:
        logits_1V = logits_1V + bias_1V
    logits_1V = sampler.repeat(logits_1V, seen_1V)
    if counts_1V is not None:
        logits_1V = penalize(logits_1V, counts_1V, params.presence_penalty, params.frequency_penalty)
    logits_1V = sampler.filter(logits_1V)
    if sampler.greedy:
        return int(logits_1V.argmax(dim=-1))
    return int(torch.multinomial(logits_1V.softmax(dim=-1), 1, generator=generator)[0, 0])


def seed_generator(generator: torch.Generator, seed: int) -> torch.Generator:
    """Seed `generator` with a 64-bit `seed` (a negative one read as two's complement, as torch reads
    it). The CPU generator (Mersenne Twister) keeps only a seed's low 32 bits, so seeds 2^32 apart (5
    and 5 + 2^32, -1 and 2^32 - 1) sampled alike; a seed outside [0, 2^32) is first mixed by
    SplitMix64's finaliser (a bijection of 64-bit integers), so that its high bits count. Seeds in
    [0, 2^32) seed the generator as they are: their samples stay what they were."""
    s = seed % 2**64
    if s >= 2**32:
        m = 2**64 - 1
        s = (s ^ (s >> 30)) * 0xBF58476D1CE4E5B9 & m
        s = (s ^ (s >> 27)) * 0x94D049BB133111EB & m
        s ^= s >> 31
    return generator.manual_seed(s)


def top_logprobs(logprobs_V: torch.Tensor, n: int) -> list[tuple[int, float]]:
    """The n most likely tokens and their logprobs, most likely first; tokens a structured output's
    mask rules out (-inf) are no alternatives, so fewer than n may come back."""
    if n <= 0:
        return []
    values, ids = torch.topk(logprobs_V, min(n, logprobs_V.shape[-1]))
    return [(i, v) for i, v in zip(ids.tolist(), values.tolist(), strict=True) if v != -math.inf]


def bad_words_ids(tok: Tokenizer, words: Sequence[str]) -> list[list[int]]:
    """vLLM's `bad_words` as token sequences (its `SamplingParams.update_from_tokenizer`): each word, its leading
    spaces stripped, encoded alone (no BOS); then with one space before it, kept where that spelling starts with
    another token and has as many tokens (a word-initial piece, "▁word", is another token than "word"), so that
    the word is banned at the start of a text and after a space alike."""
    out: list[list[int]] = []
    for word in words:
        alone = tok.encode(word.lstrip(), bos=False)
        if not alone:  # text the tokenizer encodes to nothing (a normaliser drops it) is never generated
            continue
        spaced = tok.encode(" " + word.lstrip(), bos=False)
        out.append(alone)
        if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
            out.append(spaced)
    return out


def banned_tokens(bad_ids: Sequence[Sequence[int]], out: Sequence[int]) -> list[int]:
    """The tokens `bad_ids` (`bad_words_ids`) ban next after the output `out`: each word's last token, where the
    output ends with the word's other tokens (a one-token word: always); vLLM's rule, over the output's tokens
    alone (not the prompt's)."""
    banned = []
    for ids in bad_ids:
        k = len(ids) - 1
        if k <= len(out) and list(out[len(out) - k:]) == list(ids[:k]):
            banned.append(ids[-1])
    return banned
