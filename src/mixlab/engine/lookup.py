"""Drafts for speculative decoding by prompt lookup (Saxena's prompt lookup decoding; transformers'
`prompt_lookup_num_tokens`, vLLM's `ngram` method, llama.cpp's `--lookup`): the next tokens are
guessed by finding the sequence's last n tokens earlier in it (prompt + output) and copying what
followed them there. The engine verifies a draft in one forward pass (`Engine._verify`).

An index per sequence maps every n-gram (n = 1..`MAX_NGRAM`) to where the token after its latest
occurrence sits, extended as tokens arrive, so a draft costs O(k) whatever the sequence's length;
the longest n that matches wins (a longer match is a better guess), its latest occurrence first.
A match that reaches the end (the sequence repeats with a short period) continues the period.
"""

from __future__ import annotations

__all__ = ["MAX_NGRAM", "PromptLookup"]

MAX_NGRAM = 3  # the longest suffix looked up (transformers' max_matching_ngram_size is 2, vLLM's default 4)


class PromptLookup:
    """One sequence's n-gram index; `draft(tokens, k)` with its growing token list."""

    def __init__(self) -> None:
        self._next: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence
        self._indexed = 0  # n-grams ending before this index are in `_next`

    def draft(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix of
        `tokens` (at most `MAX_NGRAM` long) that occurred before; [] when none did. `tokens` only
        grows between calls (the engine's prompt + output)."""
        n_tok = len(tokens)
        # index every n-gram ending before the last token (whose successor is now known)
        for end in range(self._indexed, n_tok - 1):
            for n in range(1, min(MAX_NGRAM, end + 1) + 1):
                self._next[tuple(tokens[end - n + 1 : end + 1])] = end + 1
        self._indexed = max(self._indexed, n_tok - 1)
        if k < 1:
            return []
        for n in range(min(MAX_NGRAM, n_tok), 0, -1):
            at = self._next.get(tuple(tokens[n_tok - n :]))
            if at is not None:  # copied as LZ77 copies: past the end, the draft repeats its own tokens
                out: list[int] = []
                for i in range(at, at + k):
                    out.append(tokens[i] if i < n_tok else out[i - n_tok])
                return out
        return []
