"""Routing analysis (Mixtral paper §5): which experts each domain, layer and token is sent to.

    from mixlab.analysis import analyze
    report = analyze(model, tokenizer, "../shared/corpus", out="report/", layers=[0, 15, 31])

`stats` holds the pure statistics, `collect` runs a model over a corpus in bounded memory,
`report` writes JSON, HTML, Markdown and PNG figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mixlab.analysis.collect import (
    Collected,
    collect_routing,
    load_analysis_tokenizer,
    moe_layers,
    tokenizer_name,
)
from mixlab.analysis.report import build_report, check_report_folder, write_report
from mixlab.analysis.stats import (
    RoutingCounts,
    consecutive_repeats,
    expert_counts,
    load_balance,
    pair_mask,
    random_baseline,
    total_variation,
)
from mixlab.corpus import Domain, check_domains, find_domains
from mixlab.model import Transformer, check_model

__all__ = [
    "Collected",
    "RoutingCounts",
    "analyze",
    "collect_routing",
    "consecutive_repeats",
    "expert_counts",
    "find_domains",
    "load_analysis_tokenizer",
    "load_balance",
    "pair_mask",
    "parse_layers",
    "random_baseline",
    "total_variation",
]


def default_layers(moe: list[int]) -> list[int]:
    """First, middle and last MoE layer, as the paper's 0, 15, 31 for 32 layers."""
    return sorted({moe[0], moe[(len(moe) - 1) // 2], moe[-1]})


def parse_layers(spec: str | None, moe: list[int]) -> list[int]:
    """'all', None (first/middle/last) or a comma list of layer indices; negative counts from the end."""
    if spec is None or spec == "":
        return default_layers(moe)
    if spec == "all":
        return list(moe)
    n = max(moe) + 1
    out = []
    for part in spec.split(","):
        try:
            i = int(part)
        except ValueError:
            raise ValueError(f"--layers: expected 'all' or comma-separated integers, got {spec!r}") from None
        i = i + n if i < 0 else i
        if i not in moe:
            raise ValueError(f"--layers: layer {part} is not an MoE layer of this model (MoE layers: "
                             f"{moe[0]}..{moe[-1]})")
        out.append(i)
    return sorted(set(out))


def analyze(
    model: Transformer,
    tokenizer: Any,
    data: str | Path,
    *,
    out: str | Path,
    layers: str | int | list[int] | None = None,
    domains: list[str] | None = None,
    split: str | None = "valid",
    max_tokens: int = 50_000,
    seq_len: int | None = None,
    batch_size: int = 8,
    samples_per_domain: int = 1,
    sample_tokens: int = 150,
    meta: dict[str, Any] | None = None,
    figures: bool = True,
    progress: bool = True,
    found: Mapping[str, Domain] | None = None,
) -> dict[str, Any]:
    """Collect routing over every domain of `data`, write the report to `out`, return it.
    `seq_len`: tokens per window (default 512, or the model's context if shorter). `found`: `data`'s
    domains as `find_domains(data, names=domains)` gave them to a caller that checked them already
    (`mixlab analyze`, before loading the model), so `data` is not read again."""
    check_model(model)
    if not callable(getattr(tokenizer, "encode", None)) or not isinstance(getattr(tokenizer, "vocab_size", None), int):
        # a path or None got as far as the routing, then "'str' object has no attribute 'vocab_size'"
        hint = f": load_analysis_tokenizer({str(tokenizer)!r})" if isinstance(tokenizer, str | Path) else ""
        raise ValueError(f"tokenizer must be a tokenizer (load_analysis_tokenizer(model_dir) finds the model's), "
                         f"not {type(tokenizer).__name__}{hint}")
    if seq_len is None:
        seq_len = min(512, model.config.max_seq_len)
    moe = moe_layers(model)
    if isinstance(layers, int):  # one layer (was: "'int' object is not iterable")
        layers = [layers]
    shown = parse_layers(layers, moe) if layers is None or isinstance(layers, str) else parse_layers(
        ",".join(map(str, layers)), moe)
    check_report_folder(out, sources=[data])  # before the routing, not after it
    if found is None:
        found = find_domains(data, names=domains)
    check_domains(found, split=split)
    collected = collect_routing(model, tokenizer, found, split=split, max_tokens=max_tokens, seq_len=seq_len,
                                batch_size=batch_size, samples_per_domain=samples_per_domain,
                                sample_tokens=sample_tokens, progress=progress)
    # the report names the tokenizer (it said "tokenizer: ?" unless the caller passed it in `meta`)
    meta = {"data": str(data), "tokenizer": tokenizer_name(tokenizer), **(meta or {})}
    report = build_report(collected, layers=shown, meta=meta)
    write_report(report, out, figures=figures)
    return report
