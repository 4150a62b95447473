"""Does sparse upcycling pay at small scale? Dense vs upcycled MoE vs MoE from scratch, equal compute.

    .venv/bin/python experiments/upcycle.py              # seeds 0 and 1: 20-35 min each on a shared 2-core CPU
    .venv/bin/python experiments/upcycle.py --table      # the results table of docs/upcycling.md
    .venv/bin/python experiments/upcycle.py --noise-table  # how far `--noise` moves the trained model
    .venv/bin/python experiments/upcycle.py --quick      # a few-minute smoke run (../runs/upcycle-quick)

1. Train a small dense Mistral-style model on the 8 pretraining domains of ../shared/corpus
   (byte-level tokenizer, vocabulary 259, the training data module's default) for P steps.
2. From that finished dense model, spend the same additional compute C two ways:
   (a) continue training the dense model;
   (b) upcycle it (`mixlab.train.upcycle.upcycle`, the same code as `mixlab upcycle`) to an MoE with
       8 experts, top-2, and train that;
   and (c) train the same MoE from scratch with the total compute of phase 1 plus (a);
   and (d) continue the dense model for as many tokens as (b) saw (equal data, fewer FLOPs).
3. Report validation loss per domain against compute (`../runs/upcycle/seed*/results.json`,
   docs/figures/upcycling_*.png).

Compute: FLOPs = 6 x N_active x tokens, with N_active the parameters one token's matmuls touch (all
of attention, the router and the top-k experts of every layer, and the output head; not the
embedding lookup, which is a gather). Attention's score/value FLOPs (O(T) per token) are left out:
they are equal for all three models. Equal compute therefore means the MoE sees fewer tokens:
N_active(MoE) / N_active(dense) times fewer.

Shape legend: B batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mixlab.atomic import atomic_file, write_text
from mixlab.checkpoint import load_model
from mixlab.config import ModelConfig, MoEConfig
from mixlab.errors import MixlabError
from mixlab.model import Transformer
from mixlab.train.data import TokenDataset, eval_windows, prepare, read_documents
from mixlab.train.loop import TrainConfig, evaluate
from mixlab.train.loop import train as loop_train
from mixlab.train.losses import lm_loss
from mixlab.train.upcycle import upcycle

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
DOMAINS = ("arxiv", "dm_mathematics", "github", "gutenberg", "philosophy", "pubmed", "stackexchange", "wikipedia")


@dataclass
class Settings:
    seq_len: int = 256
    batch_size: int = 8
    dense_steps: int = 400  # phase 1 (P)
    extra_dense_steps: int = 400  # phase 2 for the dense model (C); the MoE runs get the same FLOPs
    lr: float = 3e-3
    lr_continue: float = 1.5e-3  # phase 2 re-warms to this (both (a) and (b): a fresh AdamW each)
    min_lr_ratio: float = 0.1  # of `lr`: every run ends at the same learning rate
    warmup_frac: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    experts: int = 8
    top_k: int = 2
    aux_loss_coef: float = 0.02  # Mixtral's router_aux_loss_coef
    router_std: float = 0.02
    eval_every_frac: float = 1 / 6  # of each run's steps
    eval_windows: int = 8  # per domain
    seed: int = 0
    model: dict = field(default_factory=lambda: dict(
        dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=384))


def flops_per_token(cfg: ModelConfig) -> int:
    c = cfg.param_counts()
    return 6 * (c["active"] - c["embedding"])


def train(
    name: str,
    out: Path,
    ds: TokenDataset,
    *,
    steps: int,
    peak_lr: float,
    s: Settings,
    flops_start: float,
    log: list[dict],
    init_from: Path | None = None,
    model_cfg: ModelConfig | None = None,
    data_offset: int = 0,
    threads: int = 1,
) -> Path:
    """One arm: `mixlab.train.loop.train` (the trainer behind `mixlab train`) from `init_from` (a
    checkpoint folder: the dense model, the upcycled one) or from a random init of `model_cfg`, on the
    training stream from window `data_offset` on, evaluating as it goes. Returns the arm's
    transformers-format export (`out/<name>/hf`)."""
    run = out / name
    if run.exists():
        shutil.rmtree(run)  # a rerun of this arm starts over
    cfg_dir = out / f"{name}-config"
    if model_cfg is not None:
        cfg_dir.mkdir(parents=True, exist_ok=True)
        write_text(cfg_dir / "config.json", json.dumps(model_cfg.to_hf_dict(), indent=2) + "\n")
    every = max(1, int(s.eval_every_frac * steps))
    tc = TrainConfig(data=str(ds.path), out=str(run), model=str(cfg_dir), init_from=str(init_from or ""),
                     data_offset=data_offset, seq_len=s.seq_len, batch_size=s.batch_size, steps=steps,
                     lr=peak_lr, min_lr_ratio=s.min_lr_ratio * s.lr / peak_lr,
                     warmup=max(1, int(s.warmup_frac * steps)), weight_decay=s.weight_decay, clip=s.grad_clip,
                     eval_every=every, eval_windows=s.eval_windows, ckpt_every=0, keep=1, log_every=every,
                     seed=s.seed, threads=threads, progress=False, tensorboard=False, export_hf=True)
    mc = model_cfg if model_cfg is not None else ModelConfig.from_dir(init_from or "")
    fpt = flops_per_token(mc)
    tokens_per_step = s.batch_size * s.seq_len
    t0 = time.perf_counter()

    def record(step: int, ev: dict, train_loss: float | None, seconds: float) -> None:
        row = {"run": name, "step": step, "flops": flops_start + fpt * tokens_per_step * step,
               "tokens": tokens_per_step * step, "train_loss": train_loss, "valid": ev["loss"],
               "valid_mean": ev["mean_loss"], "expert_load": ev["load"], "seconds": seconds}
        log.append(row)
        print(f"  [{name}] step {step:5d}/{steps}  flops {row['flops']:.3e}  valid {row['valid_mean']:.4f}"
              + (f"  train {train_loss:.4f}" if train_loss is not None else "") + f"  ({seconds:.0f}s)",
              flush=True)

    if init_from is not None:
        start = load_model(init_from)
    else:
        start = Transformer(mc)
        start.init_weights(std=tc.init_std, seed=tc.seed)  # the trainer's own initialisation
    record(0, evaluate(start, ds, tc), None, 0.0)
    result = loop_train(tc)
    ema, seconds, evals = 0.0, 0.0, {e["step"]: e for e in result.evals}
    for rec in result.history:
        ema = rec["loss"] if rec["step"] == 1 else 0.95 * ema + 0.05 * rec["loss"]
        seconds += tokens_per_step / rec["tokens_per_s"]
        if rec["step"] in evals:
            record(rec["step"], evals[rec["step"]], ema, seconds)
    print(f"  [{name}] {time.perf_counter() - t0:.0f}s in all", flush=True)
    return run / "hf"


def get_data(out: Path, data: Path | None) -> TokenDataset:
    if data is not None:
        ds = TokenDataset(data)
        if ds.meta["tokenizer"].get("type") != "bytes" or set(DOMAINS) != set(ds.domains):
            sys.exit(f"{data}: expected a byte-tokenized dataset with exactly the domains {', '.join(DOMAINS)}")
        return ds
    path = out / "data"
    if not (path / "meta.json").is_file():
        if not CORPUS.is_dir():
            sys.exit(f"corpus not found at {CORPUS}")
        print(f"preparing {CORPUS} (bytes tokenizer) -> {path}", flush=True)
        prepare(read_documents([CORPUS], domains=DOMAINS), path, tokenizer="bytes")
    return TokenDataset(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="default ../runs/upcycle (../runs/upcycle-quick with --quick)")
    ap.add_argument("--data", type=Path, default=None, help="a prepared byte-level dataset (default: prepare one)")
    ap.add_argument("--quick", action="store_true", help="tiny step counts: a smoke test of the pipeline")
    ap.add_argument("--figures", type=Path, default=REPO / "docs" / "figures")
    # One thread: on a shared, oversubscribed CPU two threads spin at every barrier while the other is
    # descheduled; measured 8x slower per step than one thread under a load average of 10 on 2 cores.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one full comparison per seed")
    ap.add_argument("--no-scratch", action="store_true", help="skip arm (c), the MoE from scratch (the slowest)")
    ap.add_argument("--add-equal-tokens", action="store_true",
                    help="only add arm (d) to existing results (for results written before it existed)")
    ap.add_argument("--table", action="store_true", help="only print the Markdown results table of docs/upcycling.md")
    ap.add_argument("--noise-table", action="store_true",
                    help="only measure how far `upcycle --noise STD` moves the trained dense model's outputs")
    args = ap.parse_args()
    # a smoke run never replaces the reported run's models and results.json
    args.out = args.out or REPO.parent / "runs" / ("upcycle-quick" if args.quick else "upcycle")
    torch.set_num_threads(args.threads)
    if args.table:
        markdown_table(args.out)
        return
    if args.noise_table:
        noise_table(args.out, args.out / f"seed{args.seeds[0]}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    ds = get_data(args.out, args.data)
    for seed in args.seeds:
        s = Settings(seed=seed)
        if args.add_equal_tokens:
            f = args.out / f"seed{seed}" / "results.json"
            if not f.is_file():
                sys.exit(f"{f}: not found; --add-equal-tokens adds arm (d) to a finished run's results")
            res = json.loads(f.read_text())
            res["log"] = [x for x in res["log"] if x["run"] != "dense-equal-tokens"]
            p_flops = max(x["flops"] for x in res["log"] if x["run"] == "dense")
            equal_tokens(s, ds, f.parent, res["log"], steps=res["steps"]["upcycled"],
                         data_offset=res["steps"]["dense"] * s.batch_size, flops_start=p_flops, threads=args.threads)
            res["steps"]["dense-equal-tokens"] = res["steps"]["upcycled"]
            write_text(f, json.dumps(res, indent=2) + "\n")
            continue
        if args.quick:
            s.dense_steps, s.extra_dense_steps, s.eval_windows = 30, 20, 2
        summarize(run(s, ds, args.out / f"seed{seed}", scratch_arm=not args.no_scratch, threads=args.threads))
    if not args.quick:
        plot(args.out, args.figures)


def equal_tokens(s: Settings, ds: TokenDataset, out: Path, log: list[dict], *, steps: int, data_offset: int,
                 flops_start: float, threads: int = 1) -> None:
    """(d): the dense model continued on exactly the upcycled MoE's batches, with its own full schedule,
    to separate "better per token" from "better per FLOP"."""
    print("2d. dense, continued for the upcycled MoE's tokens", flush=True)
    train("dense-equal-tokens", out, ds, init_from=out / "dense" / "hf", data_offset=data_offset, steps=steps,
          peak_lr=s.lr_continue, s=s, flops_start=flops_start, log=log, threads=threads)


def run(s: Settings, ds: TokenDataset, out: Path, *, scratch_arm: bool = True, threads: int = 1) -> dict:
    """One seed of the whole comparison; models and results.json go to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    dense_cfg = ModelConfig(vocab_size=ds.vocab_size, max_seq_len=s.seq_len, rope_theta=1e4, moe=None,
                            bos_id=ds.meta["bos_id"], eos_id=ds.meta["eos_id"], **s.model)
    moe_cfg = dense_cfg.replace(moe=MoEConfig(num_experts=s.experts, top_k=s.top_k, aux_loss_coef=s.aux_loss_coef))
    fd, fm = flops_per_token(dense_cfg), flops_per_token(moe_cfg)
    tok_step = s.batch_size * s.seq_len
    moe_extra_steps = round(s.extra_dense_steps * fd / fm)
    moe_scratch_steps = round((s.dense_steps + s.extra_dense_steps) * fd / fm)
    print(f"seed {s.seed}: dense: {dense_cfg.param_counts()['total']:,} params, {fd:,} FLOPs/token; "
          f"MoE {s.experts}x top-{s.top_k}: {moe_cfg.param_counts()['total']:,} params, {fm:,} FLOPs/token "
          f"(x{fm / fd:.2f}); {tok_step} tokens/step", flush=True)
    print(f"steps: dense {s.dense_steps} + (a) {s.extra_dense_steps} | (b) upcycled {moe_extra_steps} | "
          f"(c) MoE from scratch {moe_scratch_steps}", flush=True)
    log: list[dict] = []
    t_start = time.perf_counter()
    steps = {"dense": s.dense_steps, "dense-continued": s.extra_dense_steps, "upcycled": moe_extra_steps,
             "dense-equal-tokens": moe_extra_steps, "moe-scratch": moe_scratch_steps}

    def save() -> dict:  # after every arm, so an interrupted run keeps what it finished
        result = {"settings": asdict(s), "dense_config": asdict(dense_cfg), "moe_config": asdict(moe_cfg),
                  "flops_per_token": {"dense": fd, "moe": fm}, "tokens_per_step": tok_step, "steps": steps,
                  "wall_seconds": time.perf_counter() - t_start, "torch": torch.__version__, "log": log}
        write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
        return result

    # 1. dense pretraining
    print("1. dense pretraining", flush=True)
    dense = train("dense", out, ds, model_cfg=dense_cfg, steps=s.dense_steps, peak_lr=s.lr, s=s, flops_start=0.0,
                  log=log, threads=threads)
    save()
    data_offset = s.dense_steps * s.batch_size  # phase 2 continues the training stream where phase 1 stopped
    p_flops = fd * tok_step * s.dense_steps

    # 2a. continue dense, on the data that follows phase 1
    print("2a. dense, continued", flush=True)
    train("dense-continued", out, ds, init_from=dense, data_offset=data_offset, steps=s.extra_dense_steps,
          peak_lr=s.lr_continue, s=s, flops_start=p_flops, log=log, threads=threads)
    save()

    # 2b. upcycle (the library function behind `mixlab upcycle`), then train on the same data stream
    print("2b. upcycled MoE", flush=True)
    report = upcycle(dense, out / "upcycled-init", num_experts=s.experts, top_k=s.top_k,
                     router_init="normal", router_std=s.router_std, seed=s.seed)
    assert report.config == moe_cfg, (report.config, moe_cfg)
    train("upcycled", out, ds, init_from=out / "upcycled-init", data_offset=data_offset, steps=moe_extra_steps,
          peak_lr=s.lr_continue, s=s, flops_start=p_flops, log=log, threads=threads)
    save()

    # 2d. dense continued for as many tokens (not FLOPs) as the upcycled MoE saw: equal data
    equal_tokens(s, ds, out, log, steps=moe_extra_steps, data_offset=data_offset, flops_start=p_flops,
                 threads=threads)
    save()
    if not scratch_arm:
        return save()

    # 2c. the same MoE from scratch with the total compute
    print("2c. MoE from scratch", flush=True)
    train("moe-scratch", out, ds, model_cfg=moe_cfg, steps=moe_scratch_steps, peak_lr=s.lr, s=s, flops_start=0.0,
          log=log, threads=threads)

    result = save()
    print(f"seed {s.seed} done in {result['wall_seconds'] / 60:.1f} min; results in {out / 'results.json'}",
          flush=True)
    return result


@torch.no_grad()
def noise_table(out: Path, run_dir: Path, stds: tuple[float, ...] = (0.0, 0.001, 0.01, 0.03, 0.1, 0.3)) -> None:
    """Upcycle the experiment's trained dense model with each noise std; compare outputs to the dense
    model's on validation windows: max |logit difference|, mean KL(dense || MoE), validation loss."""
    ds = TokenDataset(out / "data")
    dense_path = run_dir / "dense" / "hf"
    if not (dense_path / "config.json").is_file():
        sys.exit(f"{dense_path}: run the experiment first (it trains the dense model)")
    dense = load_model(dense_path)
    x = torch.cat([eval_windows(ds, split="valid", domain=d, seq_len=256, max_windows=2) for d in DOMAINS])
    ref = dense(x[:, :-1])
    assert isinstance(ref, torch.Tensor)
    print(f"{'noise std':>10} {'max |dlogit|':>13} {'KL(dense||moe)':>15} {'valid loss':>11} "
          f"(dense: {lm_loss(ref, x[:, 1:]):.4f})")
    rows = []
    for std in stds:
        upcycle(dense_path, run_dir / "noise-tmp", num_experts=8, top_k=2, noise=std, seed=0)
        moe = load_model(run_dir / "noise-tmp")
        logits = moe(x[:, :-1])
        assert isinstance(logits, torch.Tensor)
        kl = torch.nn.functional.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1).mean().item()
        row = {"noise": std, "max_abs_logit_diff": (logits - ref).abs().max().item(), "kl": kl,
               "valid_loss": lm_loss(logits, x[:, 1:]).item()}
        rows.append(row)
        print(f"{std:>10g} {row['max_abs_logit_diff']:>13.3e} {kl:>15.3e} {row['valid_loss']:>11.4f}", flush=True)
    shutil.rmtree(run_dir / "noise-tmp")
    write_text(run_dir / "noise_table.json", json.dumps(rows, indent=2) + "\n")


def summarize(result: dict) -> None:
    finals = {}
    for row in result["log"]:
        finals[row["run"]] = row
    names = list(finals)
    print(f"\n{'domain':<16}" + "".join(f"{n:>20}" for n in names))
    for d in DOMAINS:
        print(f"{d:<16}" + "".join(f"{finals[n]['valid'][d]:>20.4f}" for n in names))
    print(f"{'mean':<16}" + "".join(f"{finals[n]['valid_mean']:>20.4f}" for n in names))
    print(f"{'PFLOPs':<16}" + "".join(f"{finals[n]['flops'] / 1e15:>20.4f}" for n in names))


def markdown_table(out: Path) -> None:
    """Final validation loss per domain (rows) and arm (columns); a cell lists the seeds' values."""
    results = [json.loads(f.read_text()) for f in sorted(out.glob("seed*/results.json"))]
    if not results:
        sys.exit(f"{out}: no seed*/results.json; run the experiment first (or pass its --out)")
    arms = [r for r in RUNS if any(x["run"] == r for res in results for x in res["log"])]

    def finals(r: str) -> list[dict]:
        rows = [[x for x in res["log"] if x["run"] == r] for res in results]
        return [x[-1] for x in rows if x]

    seeds = ", ".join(str(res["settings"]["seed"]) for res in results)
    print(f"| domain (seeds {seeds}) | " + " | ".join(LABELS[r] for r in arms) + " |")
    print("|---|" + "---:|" * len(arms))
    for d in [*DOMAINS, "mean"]:
        row = [" / ".join(f"{f['valid_mean'] if d == 'mean' else f['valid'][d]:.3f}" for f in finals(r)) for r in arms]
        print(f"| {'**mean**' if d == 'mean' else d} | " + " | ".join(row) + " |")
    print("| TFLOPs (total) | " + " | ".join(f"{finals(r)[0]['flops'] / 1e12:.2f}" for r in arms) + " |")
    print("| tokens in the arm | " + " | ".join(f"{finals(r)[0]['tokens'] / 1e6:.2f}M" for r in arms) + " |")


RUNS = ("dense", "dense-continued", "upcycled", "moe-scratch", "dense-equal-tokens")
LABELS = {"dense": "dense (phase 1)", "dense-continued": "(a) dense, continued", "upcycled": "(b) upcycled MoE",
          "moe-scratch": "(c) MoE from scratch", "dense-equal-tokens": "(d) dense, (b)'s tokens"}
COLORS = {"dense": "0.4", "dense-continued": "tab:blue", "upcycled": "tab:red", "moe-scratch": "tab:green",
          "dense-equal-tokens": "tab:cyan"}


def plot(out: Path, figures: Path) -> None:
    """Loss against compute (every seed) and final per-domain losses (mean over seeds, min-max bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(f.read_text()) for f in sorted(out.glob("seed*/results.json"))]
    if not results:
        return
    figures.mkdir(parents=True, exist_ok=True)
    p_flops = max(x["flops"] for x in results[0]["log"] if x["run"] == "dense")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, zoom in zip(axes, (False, True), strict=True):
        for k, res in enumerate(results):
            for r in RUNS:
                rows = [x for x in res["log"] if x["run"] == r and (not zoom or x["flops"] >= p_flops)]
                ax.plot([x["flops"] for x in rows], [x["valid_mean"] for x in rows], "o-" if k == 0 else "s--",
                        ms=3, lw=1.5 if k == 0 else 1, alpha=1 if k == 0 else 0.6, color=COLORS[r],
                        label=LABELS[r] if k == 0 else None)
        seeds = [str(res["settings"]["seed"]) for res in results]
        ax.plot([], [], "k-", label=f"seed {seeds[0]}")
        if len(seeds) > 1:
            ax.plot([], [], "k--", alpha=0.6, label=f"seed {', '.join(seeds[1:])}")
        ax.set_xlabel("training FLOPs = 6 x active non-embedding params x tokens")
        ax.set_ylabel("validation loss, nats/byte (mean of 8 domains)")
        ax.grid(alpha=0.3)
        if zoom:
            ax.set_title("phase 2 (after the dense model is trained)")
            ys = [x["valid_mean"] for res in results for x in res["log"] if x["flops"] >= p_flops]
            ax.set_ylim(min(ys) - 0.02, max(ys) + 0.02)
        else:
            ax.set_title("all runs")
            lo = min(x["valid_mean"] for res in results for x in res["log"] if x["step"] > 0)
            ax.set_ylim(lo - 0.05, lo + 1.0)
            ax.legend(fontsize=7)
    fig.suptitle(f"Sparse upcycling, {results[0]['moe_config']['moe']['num_experts']} experts top-"
                 f"{results[0]['moe_config']['moe']['top_k']}, {len(results)} seed(s)")
    fig.tight_layout()
    with atomic_file(figures / "upcycling_loss_vs_compute.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

    # the three arms at equal total compute that were run (--no-scratch leaves out (c))
    equal = [r for r in RUNS[1:4] if any(x["run"] == r for res in results for x in res["log"])]
    finals = [{r: [x for x in res["log"] if x["run"] == r][-1]["valid"] for r in equal
               if any(x["run"] == r for x in res["log"])} for res in results]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    w = 0.27
    ax = axes[0]
    for j, r in enumerate(equal):
        vals = [[f[r][d] for f in finals if r in f] for d in DOMAINS]
        mean = [sum(v) / len(v) for v in vals]
        err = [[m - min(v) for m, v in zip(mean, vals, strict=True)],
               [max(v) - m for m, v in zip(mean, vals, strict=True)]]
        ax.bar([i + (j - 1) * w for i in range(len(DOMAINS))], mean, w, yerr=err, capsize=2, label=LABELS[r],
               color=COLORS[r])
    ax.set_xticks(range(len(DOMAINS)), DOMAINS, rotation=25, fontsize=8)
    ax.set_ylabel("validation loss, nats/byte")
    ax.set_title("final validation loss per domain (equal total compute)")
    allv = [f[r][d] for f in finals for r in equal if r in f for d in DOMAINS]
    ax.set_ylim(min(allv) - 0.2, max(allv) + 0.05)
    ax.legend(fontsize=8)
    ax = axes[1]
    for j, r in enumerate(equal[1:]):
        diffs = [[f[r][d] - f["dense-continued"][d] for f in finals if r in f] for d in DOMAINS]
        mean = [sum(v) / len(v) for v in diffs]
        err = [[m - min(v) for m, v in zip(mean, diffs, strict=True)],
               [max(v) - m for m, v in zip(mean, diffs, strict=True)]]
        ax.bar([i + (j - 0.5) * w for i in range(len(DOMAINS))], mean, w, yerr=err, capsize=2, label=LABELS[r],
               color=COLORS[r])
    ax.axhline(0, color=COLORS["dense-continued"], lw=1)
    ax.set_xticks(range(len(DOMAINS)), DOMAINS, rotation=25, fontsize=8)
    ax.set_ylabel("loss minus (a) dense continued (below 0 = better)")
    ax.set_title("difference to the continued dense model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(figures / "upcycling_per_domain.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    print(f"figures in {figures}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except MixlabError as e:  # a missing model or dataset, a refused destination: one line, as `mixlab` prints
        sys.exit(f"experiments/upcycle.py: error: {e}")
