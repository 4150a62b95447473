"""`mixlab demo`: the whole system in a few minutes on a laptop CPU, with nothing to download.

It builds a three-domain corpus from text every Python install carries — the standard library's
source as *code* (docstrings removed), its docstrings as English *prose* — plus generated *math*
problems; prepares it with the byte tokenizer; trains a small Mixtral-style MoE (4 layers, 8 experts,
top-2, 3.41M parameters) for a time budget; then prints sampled generations and which experts each
kind of text is routed to (the Mixtral paper's §5 analysis, in miniature).

`data=DIR` trains on a corpus in the shared layout (`<domain>/train.jsonl`, `<domain>/valid.jsonl`).
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from mixlab.errors import DataError
from mixlab.model import Transformer
from mixlab.train.data import Document, TokenDataset, prepare, read_documents
from mixlab.train.loop import TrainConfig, evaluate, train

# 3.41M parameters (1.05M active): big enough to learn the three kinds of text, small enough for ~100k tokens/min.
DEMO_MODEL: dict[str, Any] = {
    "dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "head_dim": 32, "ffn_dim": 256,
    "max_seq_len": 256, "moe": {"num_experts": 8, "top_k": 2},
}


def _strip_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and \
                    isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def stdlib_documents(*, max_bytes: int, seed: int = 0) -> list[Document]:
    """Code (stdlib modules without docstrings) and prose (their docstrings), each up to `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    random.Random(seed).shuffle(files)
    docs: list[Document] = []
    sizes = {"code": 0, "prose": 0}
    for f in files:
        if min(sizes.values()) >= max_bytes:
            break
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        prose = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) >= 80:
                    prose.append(inspect.cleandoc(d))
        if prose and sizes["prose"] < max_bytes:
            text = "\n\n".join(prose)
            docs.append(Document("prose", "", text, str(f)))
            sizes["prose"] += len(text)
        if sizes["code"] < max_bytes:
            code = ast.unparse(_strip_docstrings(tree))
            docs.append(Document("code", "", code, str(f)))
            sizes["code"] += len(code)
    return docs


def math_documents(*, max_bytes: int, seed: int = 0) -> list[Document]:
    """Generated arithmetic, 40 problems per document: `What is 37 + 45?\\nAnswer: 82`."""
    rng = random.Random(seed)
    docs, size = [], 0
    while size < max_bytes:
        lines = []
        for _ in range(40):
            op = rng.choice("+-*")
            a, b = (rng.randint(0, 999), rng.randint(0, 999)) if op != "*" else (rng.randint(0, 99), rng.randint(0, 99))
            ans = a + b if op == "+" else a - b if op == "-" else a * b
            lines.append(f"What is {a} {op} {b}?\nAnswer: {ans}\n")
        text = "\n".join(lines)
        docs.append(Document("math", "", text, "generated"))
        size += len(text)
    return docs


def routing_table(load: dict[str, list[list[float]]]) -> str:
    """Per layer, each domain's share (%) of expert choices; * marks each domain's top expert."""
    domains = sorted(load)
    n_layers, E = len(load[domains[0]]), len(load[domains[0]][0])
    width = max(8, *(len(d) for d in domains))
    lines = []
    for li in range(n_layers):
        lines.append(f"layer {li}  " + " ".join(f"{'e' + str(e):>5}" for e in range(E)))
        for d in domains:
            row = load[d][li]
            top = max(range(E), key=lambda e: row[e])
            cells = " ".join(f"{100 * v:4.0f}{'*' if e == top else ' '}" for e, v in enumerate(row))
            lines.append(f"  {d:<{width}}{cells}")
    # How far each domain's routing is from the all-domain average (total variation, 0 = same).
    lines.append("distance from the average routing (total variation, 0 = identical, 1 = disjoint):")
    for d in domains:
        tv = []
        for li in range(n_layers):
            avg = [sum(load[o][li][e] for o in domains) / len(domains) for e in range(E)]
            tv.append(0.5 * sum(abs(load[d][li][e] - avg[e]) for e in range(E)))
        lines.append(f"  {d:<{width}} " + "  ".join(f"L{i} {v:.2f}" for i, v in enumerate(tv)))
    return "\n".join(lines)


def run_demo(*, steps: int | None = None, minutes: float | None = None, data: str | None = None,
             out: str | None = None, seed: int = 0, max_bytes: int = 1_200_000, quiet: bool = False) -> dict[str, Any]:
    """Build (or read) the corpus, train for `steps` or about `minutes` (default 4 without `steps`;
    the training stops at 1.25 x `minutes`, with a warning, on a slower machine), print samples and routing
    (stdout; the progress lines and the training's progress on stderr, none with `quiet`).
    Returns {"eval": per-domain validation results, "samples": {prompt: text}, "steps": n}, or
    {"steps": n, "stopped_by": signal number} when a signal stopped the training."""
    t_start = time.perf_counter()
    log = (lambda *_a: None) if quiet else (lambda text: print(text, file=sys.stderr))
    if out:
        _claim(Path(out), data=data)  # before any work: an --out holding other files is refused
    tmp = tempfile.TemporaryDirectory(prefix="mixlab-demo-")
    work = Path(out) if out else Path(tmp.name)
    threads, was_threads = _threads(), torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        if data:
            log(f"preparing the corpus at {data} (byte tokenizer) ...")
            documents = list(read_documents([data]))
        else:
            log("building the demo corpus: Python's standard library (code, docstrings) + arithmetic ...")
            documents = stdlib_documents(max_bytes=max_bytes, seed=seed) + \
                math_documents(max_bytes=max_bytes // 2, seed=seed)
        meta = prepare(documents, work / "data", tokenizer="bytes", valid_fraction=0.05, seed=seed)
        if not meta["splits"]["valid"]:  # else trained, then no losses and no sample prompts (an error)
            raise DataError(f"{data}: no validation text: a domain's valid file, or 5% of its documents (one of "
                            "two or more), is held out for the losses and the samples' prompts; give more "
                            "documents or a valid.jsonl")
        dataset = TokenDataset(work / "data")
        for dom, info in meta["splits"]["train"].items():
            log(f"  {dom:<14} {info['tokens']:>10,} train tokens in {info['docs']:,} documents")
        cfg = TrainConfig(data=str(work / "data"), out=str(work / "run"), model="tiny-moe",
                          model_overrides=DEMO_MODEL, seq_len=128, batch_size=16, lr=3e-3, warmup=30,
                          eval_every=0, eval_windows=8, ckpt_every=0, log_every=10, seed=seed,
                          export_hf=out is not None, progress=not quiet, tensorboard=False,
                          threads=threads)
        if steps is None:
            minutes = 4.0 if minutes is None else minutes
            step_s = _time_one_step(cfg)
            # Keep ~25% of the budget for setup, evaluation and sampling on a slower machine.
            steps = max(10, int(minutes * 60 * 0.8 / step_s))
            log(f"one step takes ~{step_s:.2f}s here: training {steps} steps "
                f"({steps * cfg.batch_size * cfg.seq_len:,} tokens) in ~{minutes:g} minutes")
        cfg.steps, cfg.warmup = steps, min(cfg.warmup, max(1, steps // 10))
        # A loaded machine: stop early rather than overrun. --steps alone sets no deadline (a default
        # 4 minutes cut `--steps 5000` short).
        deadline = math.inf if minutes is None else t_start + minutes * 60 * 1.25

        def over_time(_rec: dict[str, Any]) -> bool:
            return time.perf_counter() > deadline

        result = train(cfg, on_step=over_time)
        if result.stopped_by is not None:  # Ctrl-C or SIGTERM: stop here (the run's checkpoint kept with `out`)
            return {"steps": result.step, "stopped_by": result.stopped_by}
        if result.step < steps:
            warnings.warn(f"the time budget ({minutes:g} minutes, stopping at 1.25 x) ran out after {result.step} "
                          f"of {steps} steps", stacklevel=2)
        model = result.model.eval()
        ev = evaluate(model, dataset, cfg)
        print(f"\nvalidation loss after {result.step} steps (bits per byte):")
        for dom, loss in ev["loss"].items():
            bpb = f" = {ev['bpb'][dom]:.2f} bits/byte" if dom in ev["bpb"] else ""
            print(f"  {dom:<14} {loss:.3f} nats/token{bpb}")
        samples = _samples(model, dataset, data is not None)
        print("\nsamples (temperature 0.6, top-k 20, seed 0):")
        for prompt, text in samples.items():
            print(f"--- {prompt!r}\n{prompt}{text}")
        if ev["load"]:
            print("\nrouting: share of each domain's expert choices (%) per layer, on validation text")
            print(routing_table(ev["load"]))
        if out:
            print(_plots(work, ev["load"], title=f"mixlab demo: tiny MoE, {result.step} steps"))
        print(f"\ndone in {(time.perf_counter() - t_start) / 60:.1f} minutes"
            + (f"; model saved to {work / 'run' / 'hf'}" if out else ""))
        return {"eval": ev, "samples": samples, "steps": result.step}
    finally:
        torch.set_num_threads(was_threads)
        tmp.cleanup()


DEMO_MARK = "mixlab_demo.json"  # what an --out folder the demo wrote holds: a rerun may replace it
DEMO_FILES = {DEMO_MARK, "data", "run", "loss.png", "routing.png"}


def _claim(out: Path, *, data: str | None = None) -> None:
    """Make `out` the demo's: new, empty, or an earlier demo's output (replaced, so that the same
    command runs again); a folder holding anything else is refused, untouched, and so is one inside
    `data` (its run's metrics.jsonl would be read as text by the same command run again)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the demo's run, data and plots")
    if data and Path(os.path.realpath(data)) in Path(os.path.realpath(out)).parents:
        raise ValueError(f"--out {out} is inside --data {data}: the demo's run would be read as text when the "
                         "command runs again; choose an --out outside it")
    if out.is_dir() and any(out.iterdir()):
        held = {p.name for p in out.iterdir()}
        if DEMO_MARK not in held or not held <= DEMO_FILES:
            other = ", ".join(sorted(held - DEMO_FILES)) or f"no {DEMO_MARK}"
            raise ValueError(f"--out {out} holds other files ({other}); give a new or empty folder, or one an "
                             "earlier demo wrote")
        for name in held:
            path = out / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()  # a link, not its target
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARK).write_text(json.dumps({"written_by": "mixlab demo"}) + "\n", encoding="utf-8")


def _plots(work: Path, load: dict[str, list[list[float]]], *, title: str) -> str:
    """loss.png (training and validation loss) and routing.png (each domain's expert shares per
    layer) in `work`, with matplotlib (the `plot` extra); the line to print."""
    try:
        import matplotlib
    except ImportError:
        return "\n(no plots: pip install 'mixlab[plot]' for loss.png and routing.png)"
    from mixlab.atomic import atomic_file
    from mixlab.train.plot import plot_loss_curve

    plot_loss_curve(work / "run", work / "loss.png", title=title)
    if not load:
        return f"\nloss curve: {work / 'loss.png'}"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted(load)
    n_layers, E = len(load[domains[0]]), len(load[domains[0]][0])
    fig, axes = plt.subplots(1, n_layers, figsize=(2.2 * n_layers + 1.5, 0.45 * len(domains) + 1.8),
                             sharey=True, squeeze=False, layout="constrained")
    for li, ax in enumerate(axes[0]):
        shares = [[100 * load[d][li][e] for e in range(E)] for d in domains]
        im = ax.imshow(shares, cmap="viridis", vmin=0, vmax=100 / E * 3, aspect="auto")
        ax.set_title(f"layer {li}", fontsize=9)
        ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
    axes[0][0].set_yticks(range(len(domains)), domains, fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="% of the domain's choices")
    fig.suptitle("which experts each kind of text uses (validation text; uniform = "
                 f"{100 / E:.1f}%)", fontsize=10)
    with atomic_file(work / "routing.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return f"\nplots: {work / 'loss.png'} (loss), {work / 'routing.png'} (experts per domain and layer)"


def _threads() -> int:
    """1 thread when the CPU is already busy (load >= cores), else torch's default. A busy CPU
    deschedules OpenMP workers that the others spin-wait for (measurements in BENCHMARKS.md)."""
    try:
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:
        busy = False
    return 1 if busy else 0


def _time_one_step(cfg: TrainConfig) -> float:
    """Seconds per optimizer step on this machine, from a 3-step probe run (the first is warm-up)."""
    import dataclasses

    times: list[float] = []
    last = [time.perf_counter()]

    def tick(_rec: dict[str, Any]) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    with tempfile.TemporaryDirectory() as d:
        probe = dataclasses.replace(cfg, out=d, steps=3, progress=False, export_hf=False, ckpt_every=0)
        train(probe, on_step=tick, stop_after=3)
    return sorted(times[1:])[0] if len(times) > 1 else times[0]


def _samples(model: Transformer, dataset: TokenDataset, corpus: bool) -> dict[str, str]:
    from mixlab.generate import generate

    tok = dataset.tokenizer()
    if corpus:
        prompts = []
        for dom in dataset.split_domains("valid"):
            toks = dataset.read("valid", dom, 1, 200).tolist()
            prompts.append(tok.decode(toks)[:40])
    else:
        prompts = ["def __init__(self", "Return the number of ", "What is 23 + 45?\nAnswer:",
                   "What is 12 * 11?\nAnswer:"]
    ids = [tok.encode(p, bos=True) for p in prompts]
    # Sampled, not greedy: a small byte-level model's greedy output loops ("the the the").
    outs = generate(model, ids, max_new_tokens=120, temperature=0.6, top_k=20, seed=0)
    return {p: tok.decode(o) for p, o in zip(prompts, outs, strict=True)}
