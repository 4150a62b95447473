"""Loss curves from a run's `metrics.jsonl` (matplotlib, the optional `plot` extra).

    python -m mixlab.train.plot RUN_DIR OUT.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mixlab.atomic import atomic_file
from mixlab.errors import DataError


def read_metrics(path: Path) -> list[dict]:
    """The records of a `metrics.jsonl`. Its last line may be torn (a run still writing it, or one
    killed mid-write), and is dropped, here and by `mixlab train --resume`, which reads it through this;
    damage elsewhere is a DataError naming the line."""
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    recs = []
    for i, ln in enumerate(lines):
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise DataError(f"{path}: line {i + 1} is not valid JSON ({e}); fix or remove it") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}: line {i + 1} is not a JSON object; fix or remove it")
        recs.append(rec)
    return recs


def plot_loss_curve(run: str | Path, png: str | Path, *, title: str | None = None) -> None:
    """Training loss (per logged step) and validation loss (per evaluation; per domain too where the
    run records it, as `mixlab train` does; `sft` and `dpo` record the held-out loss alone) to `png`."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f"plotting needs matplotlib: pip install 'mixlab[plot]' ({e})") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(run) / "metrics.jsonl"
    if not path.is_file():  # was "[Errno 2] No such file or directory: '.../hf/metrics.jsonl'"
        raise DataError(f"{run}: no metrics.jsonl in it; expected a run folder of mixlab train, sft or dpo")
    recs = read_metrics(path)
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_loss" in r]
    if not train and not evals:  # a run yet to log its first step: an empty chart, and exit status 0
        raise DataError(f"{path}: no loss recorded yet (no record with 'loss' or 'eval_loss'); plot the run "
                        "once it has logged a step")
    domains = [r for r in evals if "eval" in r]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="lightsteelblue", lw=1, label="train (batch)")
    for dom in domains[-1]["eval"] if domains else []:
        ax.plot([r["step"] for r in domains], [r["eval"][dom] for r in domains], marker="o", ms=3, lw=1.2,
                label=f"valid {dom}")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], color="k", lw=2.2, marker="o", ms=3,
                label="valid (all domains)" if domains else "valid")
    ax.set_xlabel("optimizer step")
    dpo = any("rewards/margins" in r for r in train)  # a `mixlab dpo` run's loss is the preference loss
    ax.set_ylabel("DPO loss" if dpo else "cross-entropy (nats per token)")
    ax.set_title(title or str(run))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_file(png) as tmp:  # the format from `png`'s suffix, not the temporary's name
        fig.savefig(tmp, dpi=120, format=Path(png).suffix.lstrip(".").lower() or "png")
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m mixlab.train.plot",
                                     description="Draw a run's training and validation loss (metrics.jsonl).")
    # `~` is the home folder, as in mixlab's commands, also in a quoted '~/x' no shell expands
    parser.add_argument("run", metavar="RUN_DIR", type=os.path.expanduser,
                        help="a run folder of mixlab train, sft or dpo")
    parser.add_argument("png", metavar="OUT.png", type=os.path.expanduser,
                        help="the image to write (its suffix picks the format)")
    args = parser.parse_args()
    try:
        plot_loss_curve(args.run, args.png)
    except (ImportError, OSError, ValueError) as e:  # no matplotlib, no metrics.jsonl, a bad line in it
        sys.exit(f"python -m mixlab.train.plot: error: {e}")
