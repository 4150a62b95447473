"""Evaluation the way the field does it: perplexity, bits per byte and word perplexity with
lm-evaluation-harness's conventions (`perplexity`), the corpus reader of `mixlab eval` (`data`), and
an lm-eval model on mixlab (`harness`, which needs the optional `lm-eval` package)."""

from mixlab.eval.perplexity import Report, Score, evaluate_texts, rolling_windows, score_batch

__all__ = ["Report", "Score", "evaluate_texts", "rolling_windows", "score_batch"]
