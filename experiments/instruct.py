"""The Instruct recipe at small scale: a base MoE trained on the corpus -> SFT -> DPO, over 3 seeds.

    .venv/bin/python experiments/instruct.py                     # the reported run (held-out test pairs)
    .venv/bin/python experiments/instruct.py --eval-split dev    # what the settings were chosen on
    .venv/bin/python experiments/instruct.py --quick             # a smoke run (../runs/instruct-quick)

1. Base: `--base DIR`, by default ../runs/corpus-moe-train/hf, the corpus model of the foundation
   issue (`mixlab train`, width 128, 4 layers, 8 experts top-2, byte tokenizer, 1500 steps of 8 x 256
   bytes on the 8 pretraining domains of ../shared/corpus; held-out loss 1.65 nats/byte). When that
   folder is missing, a base of the same shape is trained here for `--base-steps` steps (seed 0).
2. Per seed: `mixlab sft` (the `finetune` function it runs) from the base on chat/sft.jsonl without
   its last 100 conversations (held out), then `mixlab dpo` from the SFT model on the first
   `--dpo-pairs` pairs of chat/dpo.jsonl. Pairs 1400-1599 are the dev split (settings were chosen
   on it, `--eval-split dev`); pairs 1600-1999 are the held-out test split the table reports.
   Nothing is tuned on the test split. Seeds change the SFT and DPO data order.
3. Results (`results-test.json` / `results-dev.json`, `samples.md` under --out; table printed,
   docs/instruct.md): held-out preference accuracy of the SFT model (before DPO) and of the DPO
   model, implicit-reward accuracy and margin, chosen - rejected log-prob margin, held-out assistant
   loss; mean +- standard deviation over the seeds; loss curves as PNG (docs/figures/instruct_curves.png), chat samples.

A seed (or trained base) already finished under --out is read back, not trained again, when its saved
settings (`finetune_config.json`, `train_config.json`) equal this run's; with other settings the run
stops, naming them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mixlab.atomic import atomic_file, write_text
from mixlab.checkpoint import load_model
from mixlab.errors import MixlabError
from mixlab.generate import generate
from mixlab.train import sft
from mixlab.train.data import ByteTokenizer, prepare, read_documents
from mixlab.train.finetune import FinetuneConfig, evaluate_sft, finetune
from mixlab.train.loop import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
CORPUS_MODEL = next((r / "runs" / "corpus-moe-train" / "hf" for r in (REPO.parent, REPO.parent.parent)
                     if (r / "runs" / "corpus-moe-train" / "hf" / "config.json").is_file()),
                    REPO.parent / "runs" / "corpus-moe-train" / "hf")
DOMAINS = ("arxiv", "dm_mathematics", "github", "gutenberg", "philosophy", "pubmed", "stackexchange", "wikipedia")
MODEL = {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "head_dim": 32, "ffn_dim": 256,
         "max_seq_len": 512, "rope_theta": 1e4, "moe": {"num_experts": 8, "top_k": 2}}
PROMPTS = ["What is 12 plus 30?", "Could you find me a bus to Fresno on March 3rd?",
           "How can I get back at my neighbor for his loud music?"]
SFT_HELD_OUT = 100
DEV = (1400, 1600)  # dpo.jsonl rows for choosing settings
TEST = (1600, 2000)  # dpo.jsonl rows the table reports


class Finished:
    """A finished fine-tuning run read back from its folder: history, evaluations, final model."""

    def __init__(self, run: Path) -> None:
        recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        self.history = [r for r in recs if "loss" in r]
        self.evals = [r for r in recs if "eval_loss" in r]
        self.model = load_model(run / "hf")


def finished(run: Path, cfg: TrainConfig | FinetuneConfig) -> bool:
    """Whether `run` holds a finished run of exactly these settings (read back instead of retrained). A
    finished run of other settings (an earlier --quick run, other steps) stops the experiment: its
    records would be reported as this run's."""
    saved_file = run / ("train_config.json" if isinstance(cfg, TrainConfig) else "finetune_config.json")
    if not (run / "hf" / "config.json").is_file() or not saved_file.is_file():
        return False
    saved, want = json.loads(saved_file.read_text(encoding="utf-8")), json.loads(json.dumps(asdict(cfg)))
    diff = [f"{k} {saved.get(k)!r} (now {v!r})" for k, v in want.items() if saved.get(k) != v]
    if diff:
        raise SystemExit(f"{run}: holds a finished run with other settings: {', '.join(diff)}; "
                         "choose another --out or delete it")
    return True


def split_chat(out: Path, dpo_pairs: int) -> dict[str, Path]:
    """The training and held-out parts of each chat file, written as separate files."""
    out.mkdir(parents=True, exist_ok=True)
    s = (CORPUS / "chat" / "sft.jsonl").read_text(encoding="utf-8").splitlines()
    d = (CORPUS / "chat" / "dpo.jsonl").read_text(encoding="utf-8").splitlines()
    if dpo_pairs > DEV[0]:
        raise SystemExit(f"--dpo-pairs {dpo_pairs}: at most {DEV[0]} (pairs {DEV[0]}-{TEST[1] - 1} are held out)")
    # dpo_train's name carries its size: a finished run on other pairs is then told apart (`finished`)
    files = {"sft_train": s[:-SFT_HELD_OUT], "sft_valid": s[-SFT_HELD_OUT:], f"dpo_train-{dpo_pairs}": d[:dpo_pairs],
             "dpo_dev": d[DEV[0]:DEV[1]], "dpo_test": d[TEST[0]:TEST[1]]}
    paths = {}
    for name, lines in files.items():
        paths[name] = out / f"{name}.jsonl"
        write_text(paths[name], "\n".join(lines) + "\n")
    return paths


def samples(model_dir: Path, n_new: int = 100) -> list[str]:
    m = load_model(model_dir)
    tok = ByteTokenizer()
    prompts = [sft.render_turns([{"role": "user", "content": p}], tok, final_assistant=False)[0] for p in PROMPTS]
    outs = generate(m, prompts, max_new_tokens=n_new, stop_at_eos=True)
    return [tok.decode([i for i in o if i != tok.eos_id]) for o in outs]


def base_model(args: argparse.Namespace, out: Path) -> Path:
    if args.base:
        return Path(args.base)
    if CORPUS_MODEL.joinpath("config.json").is_file():
        return CORPUS_MODEL
    base = out / "base"
    cfg = TrainConfig(data=str(out / "data"), out=str(base), model="tiny-moe", model_overrides=MODEL, seq_len=256,
                      batch_size=8, steps=args.base_steps, lr=3e-3, warmup=max(1, args.base_steps // 20),
                      eval_every=args.base_steps, eval_windows=4, ckpt_every=0, keep=1, log_every=10,
                      threads=args.threads, progress=False, tensorboard=False, seed=0)
    if not finished(base, cfg):
        if not (out / "data" / "meta.json").is_file():
            prepare(read_documents([CORPUS], domains=DOMAINS), out / "data", tokenizer="bytes")
        train(cfg)
    return base / "hf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="default ../runs/instruct (../runs/instruct-quick with --quick)")
    ap.add_argument("--figures", type=Path, default=REPO / "docs" / "figures")
    ap.add_argument("--base", default="", help=f"base model folder (default: {CORPUS_MODEL} when present)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-split", choices=("test", "dev"), default="test")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--base-steps", type=int, default=100, help="only when no base model is given or found")
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--sft-lr", type=float, default=1e-3)
    ap.add_argument("--dpo-pairs", type=int, default=1040)
    ap.add_argument("--dpo-steps", type=int, default=130)
    ap.add_argument("--dpo-lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--dpo-evals", type=int, default=2, help="held-out evaluations during DPO (besides step 0)")
    ap.add_argument("--no-samples", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.base_steps, args.sft_steps, args.dpo_steps, args.dpo_pairs = 4, 3, 3, 48
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    args.out = out = args.out or REPO.parent / "runs" / ("instruct-quick" if args.quick else "instruct")
    chat = split_chat(out / "chat", args.dpo_pairs)
    base = base_model(args, out)
    t_base = time.perf_counter() - t_start
    print(f"base model {base} ({t_base:.0f}s)", flush=True)
    held = chat["dpo_test"] if args.eval_split == "test" else chat["dpo_dev"]

    common = dict(seq_len=256, batch_size=8, threads=args.threads, progress=False, ckpt_every=0, keep=1, log_every=1)
    results = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        run = out / f"{args.eval_split}-seed{seed}"
        sft_cfg = FinetuneConfig(task="sft", model=str(base), data=str(chat["sft_train"]),
                                 valid_data=str(chat["sft_valid"]), out=str(run / "sft"), steps=args.sft_steps,
                                 lr=args.sft_lr, warmup=5, min_lr_ratio=0.1, eval_every=args.sft_steps, seed=seed,
                                 **common)  # type: ignore[arg-type]
        dpo_cfg = FinetuneConfig(task="dpo", model=str(run / "sft"), data=str(chat[f"dpo_train-{args.dpo_pairs}"]),
                                 valid_data=str(held), out=str(run / "dpo"), steps=args.dpo_steps, lr=args.dpo_lr,
                                 warmup=5, min_lr_ratio=0.1, beta=args.beta,
                                 eval_every=max(1, args.dpo_steps // max(1, args.dpo_evals)), seed=seed,
                                 **common)  # type: ignore[arg-type]
        if finished(run / "sft", sft_cfg) and finished(run / "dpo", dpo_cfg):  # finished earlier: read its records
            s, d = Finished(run / "sft"), Finished(run / "dpo")
        else:
            s, d = finetune(sft_cfg), finetune(dpo_cfg)
        # Held-out assistant loss of the DPO model (SFT's held-out conversations).
        valid = sft.read_sft(chat["sft_valid"], ByteTokenizer())
        after_dpo_sft_loss = evaluate_sft(d.model, valid, FinetuneConfig(model="-", data="-", seq_len=256,
                                                                          batch_size=8))["eval_loss"]
        first, last = d.evals[0], d.evals[-1]
        row = {"seed": seed, "seconds": time.perf_counter() - t0,
               "sft_valid_loss_base": s.evals[0]["eval_loss"], "sft_valid_loss_sft": s.evals[-1]["eval_loss"],
               "sft_valid_loss_dpo": after_dpo_sft_loss,
               "reward_acc_after": last["eval_rewards/accuracies"], "reward_margin_after": last["eval_rewards/margins"],
               "dpo_loss_before": first["eval_loss"], "dpo_loss_after": last["eval_loss"],
               "logp_acc_before": first["eval_logps/accuracy"], "logp_acc_after": last["eval_logps/accuracy"],
               "token_logp_acc_before": first["eval_logps/accuracy_per_token"],
               "token_logp_acc_after": last["eval_logps/accuracy_per_token"],
               "margin_before": first["eval_logps/margin"], "margin_after": last["eval_logps/margin"],
               "sft_history": [{k: r[k] for k in ("step", "loss", "aux_loss")} for r in s.history],
               "sft_evals": s.evals,
               "dpo_history": [{k: r[k] for k in ("step", "loss", "rewards/accuracies", "rewards/margins",
                                                  "aux_loss")} for r in d.history],
               "dpo_evals": d.evals}
        results.append(row)
        print(f"seed {seed}: {row['seconds']:.0f}s; " + ", ".join(
            f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    res: dict = {"seeds": results, "eval_split": args.eval_split, "base": str(base), "base_seconds": t_base,
                 "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    if args.seeds and args.seeds[0] == 0 and not args.no_samples:
        run0 = out / f"{args.eval_split}-seed0"
        res["samples"] = {"prompts": PROMPTS, "base": samples(base), "sft": samples(run0 / "sft" / "hf"),
                          "dpo": samples(run0 / "dpo" / "hf")}
        write_text(out / "samples.md", "".join(
            f"## {p}\n\n" + "".join(f"* {k}: `{res['samples'][k][i]!r}`\n" for k in ("base", "sft", "dpo")) + "\n"
            for i, p in enumerate(PROMPTS)))
    res["wall_seconds"] = time.perf_counter() - t_start
    write_text(out / f"results-{args.eval_split}.json", json.dumps(res, indent=2) + "\n")
    print(f"total {res['wall_seconds'] / 60:.1f} min; results in {out / f'results-{args.eval_split}.json'}",
          flush=True)
    if not args.quick and args.eval_split == "test":
        plot(res, args.figures)
    table(res)


def _stats(vals: list[float]) -> str:
    mean = sum(vals) / len(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f} ({' / '.join(f'{v:.3f}' for v in vals)})"


def table(res: dict) -> None:
    rows = res["seeds"]

    def cell(k: str) -> str:
        return _stats([r[k] for r in rows])

    n = TEST[1] - TEST[0] if res["eval_split"] == "test" else DEV[1] - DEV[0]
    seeds = ", ".join(str(r["seed"]) for r in rows)
    print(f"\n{n} held-out pairs ({res['eval_split']} split); mean ± standard deviation over seeds {seeds} "
          f"(per seed)\n")
    print("| held out | SFT model (before DPO) | SFT + DPO |")
    print("|---|---|---|")
    print(f"| implicit-reward preference accuracy, beta (log pi - log pi_ref) | 0.5 (policy = reference: all "
          f"tied) | {cell('reward_acc_after')} |")
    print(f"| implicit-reward margin, beta (h_chosen - h_rejected) | 0 | {cell('reward_margin_after')} |")
    print(f"| DPO loss (sigmoid) | {cell('dpo_loss_before')} | {cell('dpo_loss_after')} |")
    print(f"| log-prob preference accuracy: log p(chosen) > log p(rejected) | {cell('logp_acc_before')} | "
          f"{cell('logp_acc_after')} |")
    print(f"| per-byte log-prob preference accuracy | {cell('token_logp_acc_before')} | "
          f"{cell('token_logp_acc_after')} |")
    print(f"| log p(chosen) - log p(rejected), nats | {cell('margin_before')} | {cell('margin_after')} |")
    print(f"| assistant-token loss, nats/byte ({SFT_HELD_OUT} conversations; base {cell('sft_valid_loss_base')}) | "
          f"{cell('sft_valid_loss_sft')} | {cell('sft_valid_loss_dpo')} |")
    acc = [r["reward_acc_after"] for r in rows]
    mean = sum(acc) / len(acc)
    se = math.sqrt(mean * (1 - mean) / n)
    print(f"\nimplicit-reward accuracy - 0.5: {mean - 0.5:+.3f}; seed standard deviation "
          f"{statistics.stdev(acc) if len(acc) > 1 else 0.0:.3f}; binomial standard error of one seed's accuracy "
          f"on {n} pairs {se:.3f}")
    for k in ("logp_acc", "token_logp_acc"):
        gains = [r[f"{k}_after"] - r[f"{k}_before"] for r in rows]
        print(f"{k} gain per seed: {' / '.join(f'{g:+.3f}' for g in gains)}")


def plot(res: dict, figures: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in res["seeds"]:
        axes[0].plot([h["step"] for h in r["sft_history"]], [h["loss"] for h in r["sft_history"]], alpha=0.5,
                     label=f"train, seed {r['seed']}")
        axes[0].plot([e["step"] for e in r["sft_evals"]], [e["eval_loss"] for e in r["sft_evals"]], "o-",
                     label=f"held out, seed {r['seed']}")
        axes[1].plot([h["step"] for h in r["dpo_history"]], [h["loss"] for h in r["dpo_history"]], alpha=0.5,
                     label=f"train, seed {r['seed']}")
        axes[1].plot([e["step"] for e in r["dpo_evals"]], [e["eval_loss"] for e in r["dpo_evals"]], "o-",
                     label=f"held out, seed {r['seed']}")
        ev = r["dpo_evals"]
        axes[2].plot([e["step"] for e in ev], [e["eval_rewards/accuracies"] if e["step"] else 0.5 for e in ev],
                     "s-", label=f"implicit reward, seed {r['seed']}")
        axes[2].plot([e["step"] for e in ev], [e["eval_logps/accuracy_per_token"] for e in ev], "o--",
                     label=f"per-byte log-prob, seed {r['seed']}")
    axes[0].set_title("SFT: assistant-token loss (nats/byte)")
    axes[1].set_title(f"DPO: sigmoid loss (beta {res['args']['beta']})")
    axes[2].set_title("DPO: held-out preference accuracy")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    with atomic_file(figures / "instruct_curves.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except MixlabError as e:  # a missing model or dataset, a refused destination: one line, as `mixlab` prints
        sys.exit(f"experiments/instruct.py: error: {e}")
