"""Write a routing report: report.json (every number), index.html (tables and figures),
tokens.html (tokens coloured by first-choice expert, paper Figure 8), summary.md, and PNG figures.

Figures (need matplotlib, the optional extra `plot`; without it the report is written without them):
expert_shares.png (paper Figure 7), repeats_by_layer.png (paper Figure 10), load_balance.png.
Files are written to a temporary folder and moved into place, so a failed run leaves no half report.

Shape legend: L MoE layers, E experts, S tokens of a sample, K experts per token.
"""

from __future__ import annotations

import colorsys
import html
import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mixlab import atomic
from mixlab.analysis.collect import Collected
from mixlab.analysis.stats import random_baseline, total_variation
from mixlab.errors import OutputError

# Light, distinguishable backgrounds for black text (first 8 close to the paper's Figure 8 palette).
_PALETTE = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
            "#d9d9d9", "#bc80bd", "#ccebc5", "#ffed6f"]


def expert_colors(num_experts: int) -> list[str]:
    if num_experts <= len(_PALETTE):
        return _PALETTE[:num_experts]
    out = []
    for e in range(num_experts):  # evenly spaced hues, light enough for black text
        r, g, b = colorsys.hls_to_rgb(e / num_experts, 0.78, 0.65)
        out.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    return out


def build_report(collected: Collected, *, layers: list[int], meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready report. `layers` (transformer layer indices) are those shown in the per-expert
    figures and the token view; per-layer statistics cover every MoE layer."""
    E, K = collected.num_experts, collected.top_k
    total = None
    domains = {}
    for name, c in collected.counts.items():
        domains[name] = {"documents": collected.documents[name], **c.summary()}
        total = c if total is None else total.merged(c)
    assert total is not None
    pooled = total.summary()  # all domains together
    pos = {layer: i for i, layer in enumerate(collected.moe_layers)}
    return {
        "meta": meta,
        "settings": collected.settings,
        "num_experts": E,
        "top_k": K,
        "moe_layers": collected.moe_layers,
        "shown_layers": layers,
        "random_baseline": random_baseline(num_experts=E, top_k=K),
        "definitions": {
            "selection_share": "tokens whose top-k contains the expert / tokens (sums to k)",
            "assignment_share": "tokens whose top-k contains the expert / (tokens * k) (sums to 1; paper Fig. 7)",
            "first_choice_share": "tokens whose first choice is the expert / tokens",
            "repeat_first_choice": "consecutive token pairs of one document with the same first-choice expert / pairs",
            "repeat_topk_overlap": "consecutive token pairs of one document whose top-k sets share an expert / pairs "
                                   "(paper Table 5 'first or second choice' for k=2)",
            "*_different_tokens": "the same over consecutive pairs of two different token ids",
            "identical_token_pair_share": "consecutive pairs whose two token ids are equal / pairs",
            "load_balance": "over assignments per expert: entropy (nats), entropy / ln E, max / mean, min / mean",
            "domain_vs_all_tv": "total variation distance between a domain's assignment shares and all domains' "
                                "(0 = routed like the whole corpus, 1 = disjoint experts)",
        },
        "domains": domains,
        "all_domains": {key: pooled[key] for key in (
            "tokens", "pairs", "load_balance", "repeat_first_choice", "repeat_topk_overlap",
            "repeat_first_choice_different_tokens", "repeat_topk_overlap_different_tokens", "assignment_share")},
        "domain_vs_all_tv": {name: [total_variation(c.selected_LE[i], total.selected_LE[i])
                                    for i in range(len(collected.moe_layers))]
                             for name, c in collected.counts.items()},
        "samples": [  # topk[layer][slot][token]
            {"domain": s.domain, "source": s.source, "pieces": s.pieces,
             # [K][tokens]: slot-major, so each slot is one line in the JSON
             "topk": {str(layer): s.idx_LSK[pos[layer]].T.tolist() for layer in layers}}
            for s in collected.samples
        ],
    }


# ----------------------------------------------------------------------------------------------
# Figures


def write_figures(report: dict[str, Any], out: Path) -> list[str]:
    """PNG figures; returns their file names (none if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return []
    E, names = report["num_experts"], list(report["domains"])
    moe_layers, shown = report["moe_layers"], report["shown_layers"]
    base = report["random_baseline"]
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colors = [cmap(i) for i in range(cmap.N)]
    files = []

    # Figure 7: share of assignments per expert, per domain, one panel per shown layer.
    fig, axes = plt.subplots(len(shown), 1, figsize=(8, 2.3 * len(shown) + 0.6), squeeze=False, sharex=True)
    width = 0.8 / len(names)
    for ax, layer in zip(axes[:, 0], shown, strict=True):
        i = moe_layers.index(layer)
        for d, name in enumerate(names):
            share = report["domains"][name]["assignment_share"][i]
            xs = [e - 0.4 + width * (d + 0.5) for e in range(E)]
            ax.bar(xs, share, width, label=name, color=colors[d % len(colors)])
        ax.axhline(1 / E, color="gray", ls="--", lw=1)
        ax.set_ylabel("share")
        ax.set_title(f"layer {layer}", fontsize=10, loc="left")
    axes[-1, 0].set_xticks(range(E))
    axes[-1, 0].set_xlabel("expert (selected as any of the top-k; dashed: uniform 1/E)")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), fontsize=8, ncol=min(len(names), 4), loc="upper center")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    fig.savefig(out / "expert_shares.png", dpi=80)
    plt.close(fig)
    files.append("expert_shares.png")

    # Figure 10: repeated consecutive assignments by layer.
    diff = any(report["domains"][n]["different_token_pairs"] for n in names)
    fig, axes = plt.subplots(2 if diff else 1, 2, figsize=(10, 6.8 if diff else 3.6), squeeze=False)
    panels = [(axes[0, 0], "repeat_first_choice", base["first_choice"], "same first choice"),
              (axes[0, 1], "repeat_topk_overlap", base["topk_overlap"], f"top-{report['top_k']} sets overlap")]
    if diff:
        panels += [(axes[1, 0], "repeat_first_choice_different_tokens", base["first_choice"],
                    "same first choice, different tokens"),
                   (axes[1, 1], "repeat_topk_overlap_different_tokens", base["topk_overlap"],
                    f"top-{report['top_k']} overlap, different tokens")]
    for ax, key, b, title in panels:
        for d, name in enumerate(names):
            rates = [math.nan if r is None else r for r in report["domains"][name][key]]  # None: no pairs
            ax.plot(moe_layers, rates, marker=".", label=name, color=colors[d % len(colors)])
        ax.axhline(b, color="gray", ls="--", lw=1)
        ax.set_title(f"{title} (dashed: random {100 * b:.1f}%)", fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel("share of consecutive pairs")
        ax.set_ylim(0, 1)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "repeats_by_layer.png", dpi=80)
    plt.close(fig)
    files.append("repeats_by_layer.png")

    # Load balance per layer, all domains together.
    lb = report["all_domains"]["load_balance"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    axes[0].plot(moe_layers, [x["entropy_norm"] for x in lb], marker=".")
    axes[0].set_ylim(0, 1.02)
    axes[0].set_title("load entropy / ln E (1 = balanced)", fontsize=10)
    axes[1].plot(moe_layers, [x["max_over_mean"] for x in lb], marker=".", label="max / mean")
    axes[1].plot(moe_layers, [x["min_over_mean"] for x in lb], marker=".", label="min / mean")
    axes[1].axhline(1, color="gray", ls="--", lw=1)
    axes[1].set_title("expert load relative to the mean", fontsize=10)
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(out / "load_balance.png", dpi=80)
    plt.close(fig)
    files.append("load_balance.png")
    return files


# ----------------------------------------------------------------------------------------------
# HTML and Markdown

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.tokens{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:14px;line-height:1.7;
border:1px solid #ddd;padding:0.6em;margin:0.3em 0 1.2em}.tokens span{border-radius:2px}
.legend span{display:inline-block;padding:1px 8px;margin:0 4px 4px 0;font-family:ui-monospace,monospace}
.note{color:#555;font-size:90%}h3{font-size:100%;margin:0.4em 0 0}"""


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"  # None: a rate over no pairs


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table, shared by the HTML page and summary.md."""
    E, K, names = report["num_experts"], report["top_k"], list(report["domains"])
    moe_layers, shown, base = report["moe_layers"], report["shown_layers"], report["random_baseline"]
    idx = [moe_layers.index(layer) for layer in shown]
    out = []
    header = ["domain"] + [f"first, L{layer}" for layer in shown] + [f"top-{K} overlap, L{layer}" for layer in shown]
    rows = [[n] + [_pct(report["domains"][n]["repeat_first_choice"][i]) for i in idx]
            + [_pct(report["domains"][n]["repeat_topk_overlap"][i]) for i in idx] for n in names]
    rows.append(["uniform random"] + [_pct(base["first_choice"])] * len(idx) + [_pct(base["topk_overlap"])] * len(idx))
    out.append(("Repeated assignments of consecutive tokens (paper Table 5)", header, rows))
    if any(report["domains"][n]["different_token_pairs"] for n in names):
        rows = [[n] + [_pct(report["domains"][n]["repeat_first_choice_different_tokens"][i]) for i in idx]
                + [_pct(report["domains"][n]["repeat_topk_overlap_different_tokens"][i]) for i in idx] for n in names]
        out.append(("The same, over pairs of two different tokens only (identical neighbours, e.g. runs of spaces, "
                    "removed)", header, rows))
    for layer, i in zip(shown, idx, strict=True):
        rows = [[n] + [_pct(s) for s in report["domains"][n]["assignment_share"][i]] for n in names]
        out.append((f"Layer {layer}: share of assignments per expert (paper Figure 7; uniform {_pct(1 / E)})",
                    ["domain"] + [f"e{e}" for e in range(E)], rows))
    rows = [[n] + [f"{report['domain_vs_all_tv'][n][i]:.3f}" for i in idx] for n in names]
    out.append(("Domain specialisation: total variation distance of each domain's expert shares from all domains' "
                "(0 = no specialisation)", ["domain"] + [f"L{layer}" for layer in shown], rows))
    lb = report["all_domains"]["load_balance"]
    rows = [[str(layer), f"{x['entropy']:.3f}", f"{x['entropy_norm']:.3f}", f"{x['max_over_mean']:.2f}",
             f"{x['min_over_mean']:.2f}"] for layer, x in zip(moe_layers, lb, strict=True)]
    out.append(("Load balance per layer, all domains", ["layer", "entropy (nats)", "entropy / ln E", "max / mean",
                                                         "min / mean"], rows))
    rows = [[n, str(d["documents"]), f"{d['tokens']:,}", f"{d['pairs']:,}",
             _pct(d["identical_token_pair_share"])]
            for n, d in report["domains"].items()]
    out.append(("Data", ["domain", "documents", "tokens", "consecutive pairs", "pairs of identical tokens"], rows))
    return out


def _header_lines(report: dict[str, Any]) -> list[str]:
    m, s = report["meta"], report["settings"]
    return [
        f"model: {m.get('model', '?')} ({report['num_experts']} experts, top-{report['top_k']}, "
        f"{len(report['moe_layers'])} MoE layers); tokenizer: {m.get('tokenizer', '?')}",
        f"data: {m.get('data', '?')} (split {s['split']}); up to {s['max_tokens_per_domain']:,} tokens per domain, "
        f"sequences of at most {s['seq_len']} tokens",
        "Repeats count consecutive tokens of one document within one model sequence, never across documents. "
        f"Top-k overlap: the two tokens' top-{report['top_k']} sets share at least one expert; random baseline "
        f"1 - C(E-k,k)/C(E,k) = {report['random_baseline']['topk_overlap']:.4f}, first choice 1/E = "
        f"{report['random_baseline']['first_choice']:.4f}.",
    ]


def index_html(report: dict[str, Any], figures: list[str]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Routing report</title><style>{_CSS}</style>"
             "</head><body><h1>Routing report</h1>"]
    parts += [f"<p class='note'>{html.escape(line)}</p>" for line in _header_lines(report)]
    parts.append("<p><a href='tokens.html'>Token view: tokens coloured by first-choice expert</a> · "
                 "<a href='report.json'>report.json</a></p>")
    for f in figures:
        parts.append(f"<p><img src='{html.escape(f)}' alt='{html.escape(f)}'></p>")
    if not figures:
        parts.append("<p class='note'>No figures: install matplotlib (pip install 'mixlab[plot]').</p>")
    for title, header, rows in _tables(report):
        parts.append(f"<h2>{html.escape(title)}</h2>{_table(header, rows)}")
    parts.append("</body></html>")
    return "\n".join(parts)


def tokens_html(report: dict[str, Any]) -> str:
    """Each sample's tokens with the background of their first-choice expert (paper Figure 8);
    hovering a token shows its top-k experts. All text is HTML-escaped."""
    E, colors = report["num_experts"], expert_colors(report["num_experts"])
    legend = "".join(f"<span class=e{e}>expert {e}</span>" for e in range(E))
    classes = "".join(f".e{e}{{background:{c}}}" for e, c in enumerate(colors))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Routing: tokens by expert</title>"
             f"<style>{_CSS}\n{classes}</style></head><body><h1>Tokens coloured by first-choice expert</h1>",
             f"<p class='note'>{html.escape(_header_lines(report)[0])}. Each token's background is the expert it is "
             "routed to first; hover a token for its top-k experts (first choice first).</p>",
             f"<div class='legend'>{legend}</div>"]
    if E > len(_PALETTE):
        parts.append("<p class='note'>With more experts than distinct pastel colours, nearby hues are similar; "
                     "hover for ids.</p>")
    # One section per text, its layers one under the other, so a text's routing can be compared
    # across depth as in the paper's Figure 8.
    for s in report["samples"]:
        parts.append(f"<h2>{html.escape(s['domain'])} <span class='note'>{html.escape(s['source'])}</span></h2>")
        for layer in report["shown_layers"]:
            # Neighbours with the same top-k list share one span; a class per expert and the top-k
            # in the title (shown on hover) keep the page small.
            runs: list[tuple[list[int], str]] = []
            for piece, topk_tuple in zip(s["pieces"], zip(*s["topk"][str(layer)], strict=True), strict=True):
                topk = list(topk_tuple)
                if runs and runs[-1][0] == topk:
                    runs[-1] = (topk, runs[-1][1] + piece)
                else:
                    runs.append((topk, piece))
            spans = [f"<span class=e{topk[0]} title={','.join(map(str, topk))}>{html.escape(text)}</span>"
                     for topk, text in runs]
            parts.append(f"<h3>layer {layer}</h3><div class='tokens'>{''.join(spans)}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def summary_md(report: dict[str, Any]) -> str:
    parts = ["# Routing report", ""] + [f"- {line}" for line in _header_lines(report)] + [""]
    for title, header, rows in _tables(report):
        parts += [f"## {title}", "", _md_table(header, rows), ""]
    return "\n".join(parts)


_NUMBER_LIST = re.compile(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]")


def _rounded(x: Any) -> Any:
    """Floats to 6 significant digits (shares are counts over at most ~1e6 tokens; the exact
    counts are in the JSON too)."""
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def to_json(report: dict[str, Any]) -> str:
    """Indented JSON with each innermost list of numbers on one line (readable and small)."""
    text = json.dumps(_rounded(report), indent=1, ensure_ascii=False, allow_nan=True)
    return _NUMBER_LIST.sub(lambda m: "[" + re.sub(r",\s*", ", ", m.group(1)) + "]", text) + "\n"


REPORT_FILES = ("report.json", "index.html", "tokens.html", "summary.md", "expert_shares.png", "repeats_by_layer.png",
                "load_balance.png")


def check_report_folder(out: str | Path, *, sources: Sequence[str | Path] = ()) -> None:
    """OutputError unless `out` may receive a report: absent, a folder without any of the report's
    file names, or an earlier report (its report.json is mixlab's). Files a report does not write
    are kept either way; this only keeps a user's own index.html / summary.md from being replaced.
    `sources` (the data, the model folder): never a folder that is or holds one of them (the report's
    files would join the input's; a folder inside the corpus, `corpus/report`, is fine). Nor a folder
    mixlab wrote as something else (another model, a prepared dataset)."""
    out = Path(out)
    real = Path(os.path.realpath(out))
    for src in sources:
        src_real = Path(os.path.realpath(src))
        if src_real.is_dir() and (real == src_real or real in src_real.parents):  # (a .gguf model: any folder)
            what = "is" if real == src_real else "contains"
            raise OutputError(f"{out}: refusing to write the report there: it {what} the input {src}; choose "
                              "another --out")
    if not out.is_dir():
        if out.exists():
            raise OutputError(f"report folder {out} exists and is not a folder")
        atomic.check_destination(out)  # a file above it (`--out notes.txt/report`): now, not after the routing
        return
    for folder in (real.parent, real):  # the temporary goes beside it, each file is renamed into it
        atomic.check_writable(folder, str(out))
    held = atomic.read_manifest(real)
    if held is not None:  # `--out runs/other-model` (a typo) added the report's files to a model folder
        raise OutputError(f"{out}: holds a {str(held.get('kind', 'folder')).replace('-', ' ')} mixlab wrote; a "
                          "report goes into a folder of its own: choose another --out")
    clash = [n for n in REPORT_FILES if (out / n).exists()]
    if not clash:
        return
    try:
        earlier = json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    if not (isinstance(earlier, dict) and {"moe_layers", "random_baseline", "domains"} <= set(earlier)):
        raise OutputError(f"{out}: holds files a routing report would replace ({', '.join(clash)}) and no "
                                 "earlier report; choose another --out")


def write_report(report: dict[str, Any], out: str | Path, *, figures: bool = True) -> list[str]:
    """Write the report folder `out` atomically (replacing an earlier report there); returns file names.

    A new folder is renamed into place whole. An existing one keeps files the report does not write
    (e.g. a screenshot added later): each of the report's files is then replaced by its own rename,
    so every file is whole, old or new, at every moment; an earlier report's files this one does not
    write (its figures, when this one has none) are removed."""
    out = Path(out)
    check_report_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.remove_leftovers(out)  # temporaries of killed runs, by name
    tmp = atomic.new_temporary(out)  # `.NAME.tmp-PID-*`, the usual mode
    try:
        pngs = write_figures(report, tmp) if figures else []
        (tmp / "report.json").write_text(to_json(report), encoding="utf-8")
        (tmp / "index.html").write_text(index_html(report, pngs), encoding="utf-8")
        (tmp / "tokens.html").write_text(tokens_html(report), encoding="utf-8")
        (tmp / "summary.md").write_text(summary_md(report), encoding="utf-8")
        names = sorted(p.name for p in tmp.iterdir())
        atomic.sync_tree(tmp)  # durable before any rename makes it visible
        if out.exists():
            if not out.is_dir():
                raise NotADirectoryError(f"report folder {out} exists and is not a folder")
            for name in names:  # replace our files, keep others (e.g. a screenshot added later)
                os.replace(tmp / name, out / name)
            for name in set(REPORT_FILES) - set(names):  # an earlier run's figures: not of this report's numbers
                (out / name).unlink(missing_ok=True)
            atomic.fsync_dir(out)
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
            atomic.fsync_dir(out.parent)
        return names
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
