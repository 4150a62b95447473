"""The Instruct recipe at small scale: a base MoE trained on the corpus -> SFT -> DPO, over 3 seeds.

    .venv/bin/python experiments/instruct.py                # ~15 min on a shared 2-core CPU (1 thread)
    .venv/bin/python experiments/instruct.py --quick        # a smoke run of the same pipeline

1. Base: a Mixtral-shaped model (width 128, 4 layers, 8 experts top-2, byte tokenizer) trained with
   `mixlab train` on the 8 pretraining domains of ../shared/corpus (once, seed 0).
2. Per seed: `mixlab sft` from the base on chat/sft.jsonl (its last 60 conversations held out),
   then `mixlab dpo` from the SFT model on chat/dpo.jsonl (its last 100 pairs held out; its first 192
   pairs for training: one epoch).
3. docs/instruct.md's numbers: held-out preference accuracy before / after DPO, the chosen - rejected
   log-prob margin, held-out assistant loss; loss curves as PNG (docs/figures/instruct_*.png), chat
   samples of seed 0 (`results.json`, `samples.md` under --out).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mixlab.checkpoint import load_model
from mixlab.generate import generate
from mixlab.train import sft
from mixlab.train.data import ByteTokenizer, prepare, read_documents
from mixlab.train.finetune import FinetuneConfig, evaluate_sft, finetune
from mixlab.train.loop import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
DOMAINS = ("arxiv", "dm_mathematics", "github", "gutenberg", "philosophy", "pubmed", "stackexchange", "wikipedia")
MODEL = {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "head_dim": 32, "ffn_dim": 256,
         "max_seq_len": 512, "rope_theta": 1e4, "moe": {"num_experts": 8, "top_k": 2}}
PROMPTS = ["What is 12 plus 30?", "Could you find me a bus to Fresno on March 3rd?",
           "Write a short sentence about the sea."]


class Finished:
    """A finished fine-tuning run read back from its folder: history, evaluations, final model."""

    def __init__(self, run: Path) -> None:
        recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        self.history = [r for r in recs if "loss" in r]
        self.evals = [r for r in recs if "eval_loss" in r]
        self.model = load_model(run / "hf")


def split_chat(out: Path) -> dict[str, Path]:
    """Held-out parts of each chat file, written as separate files."""
    out.mkdir(parents=True, exist_ok=True)
    s = (CORPUS / "chat" / "sft.jsonl").read_text(encoding="utf-8").splitlines()
    d = (CORPUS / "chat" / "dpo.jsonl").read_text(encoding="utf-8").splitlines()
    files = {"sft_train": s[:-60], "sft_valid": s[-60:], "dpo_train": d[:192], "dpo_valid": d[-100:]}
    paths = {}
    for name, lines in files.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def samples(model_dir: Path, n_new: int = 120) -> list[str]:
    m = load_model(model_dir)
    tok = ByteTokenizer()
    prompts = [sft.render_turns([{"role": "user", "content": p}], tok, final_assistant=False)[0] for p in PROMPTS]
    outs = generate(m, prompts, max_new_tokens=n_new, stop_at_eos=True)
    return [tok.decode([i for i in o if i != tok.eos_id]) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO.parent / "runs" / "instruct")
    ap.add_argument("--figures", type=Path, default=REPO / "docs" / "figures")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--base-steps", type=int, default=100)
    ap.add_argument("--sft-steps", type=int, default=25)
    ap.add_argument("--dpo-steps", type=int, default=24)
    args = ap.parse_args()
    if args.quick:
        args.base_steps, args.sft_steps, args.dpo_steps = 4, 3, 3
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    out: Path = args.out
    chat = split_chat(out / "chat")
    if not (out / "data" / "meta.json").is_file():
        prepare(read_documents([CORPUS], domains=DOMAINS), out / "data", tokenizer="bytes")

    base = out / "base"
    if not (base / "hf" / "config.json").is_file():
        train(TrainConfig(data=str(out / "data"), out=str(base), model="tiny-moe", model_overrides=MODEL, seq_len=256,
                          batch_size=8, steps=args.base_steps, lr=3e-3, warmup=max(1, args.base_steps // 20),
                          eval_every=args.base_steps, eval_windows=4, ckpt_every=0, keep=1, log_every=10, threads=1,
                          progress=False, tensorboard=False, seed=0))
    t_base = time.perf_counter() - t_start
    print(f"base model: {t_base:.0f}s", flush=True)

    common = dict(seq_len=256, batch_size=8, threads=1, progress=False, ckpt_every=0, keep=1, log_every=1)
    results = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        run = out / f"seed{seed}"
        if (run / "dpo" / "hf" / "config.json").is_file():  # finished earlier: read its records
            s, d = Finished(run / "sft"), Finished(run / "dpo")
        else:
            s = finetune(FinetuneConfig(task="sft", model=str(base / "hf"), data=str(chat["sft_train"]),
                                        valid_data=str(chat["sft_valid"]), out=str(run / "sft"),
                                        steps=args.sft_steps, lr=2e-3, warmup=3, min_lr_ratio=0.1,
                                        eval_every=max(1, args.sft_steps // 2), seed=seed,
                                        **common))  # type: ignore[arg-type]
            d = finetune(FinetuneConfig(task="dpo", model=str(run / "sft"), data=str(chat["dpo_train"]),
                                        valid_data=str(chat["dpo_valid"]), out=str(run / "dpo"),
                                        steps=args.dpo_steps, lr=2e-4, warmup=3, beta=0.1,
                                        eval_every=max(1, args.dpo_steps // 2), seed=seed,
                                        **common))  # type: ignore[arg-type]
        # Held-out assistant loss of the DPO model (SFT's held-out conversations).
        valid = sft.read_sft(chat["sft_valid"], ByteTokenizer())
        after_dpo_sft_loss = evaluate_sft(d.model, valid, FinetuneConfig(model="-", data="-", seq_len=256,
                                                                          batch_size=8))["eval_loss"]
        first, last = d.evals[0], d.evals[-1]
        row = {"seed": seed, "seconds": time.perf_counter() - t0,
               "sft_valid_loss_base": s.evals[0]["eval_loss"], "sft_valid_loss_sft": s.evals[-1]["eval_loss"],
               "sft_valid_loss_dpo": after_dpo_sft_loss,
               "pref_logp_acc_before": first["eval_logps/accuracy"], "pref_logp_acc_after": last["eval_logps/accuracy"],
               "implicit_reward_acc_after": last["eval_rewards/accuracies"],
               "margin_before": first["eval_logps/margin"], "margin_after": last["eval_logps/margin"],
               "reward_margin_after": last["eval_rewards/margins"],
               "sft_history": [{k: r[k] for k in ("step", "loss", "aux_loss")} for r in s.history],
               "sft_evals": s.evals, "dpo_history": [{k: r[k] for k in ("step", "loss", "rewards/accuracies",
                                                                        "rewards/margins", "aux_loss")}
                                                     for r in d.history],
               "dpo_evals": d.evals}
        results.append(row)
        print(f"seed {seed}: {row['seconds']:.0f}s; " + ", ".join(
            f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    (out / "results.json").write_text(json.dumps({"seeds": results}, indent=2) + "\n", encoding="utf-8")
    res = {"seeds": results, "base_seconds": t_base, "wall_seconds": time.perf_counter() - t_start,
           "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    if args.seeds and args.seeds[0] == 0:
        res["samples"] = {"base": samples(base / "hf"), "sft": samples(out / "seed0" / "sft" / "hf"),
                          "dpo": samples(out / "seed0" / "dpo" / "hf"), "prompts": PROMPTS}
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(f"total {res['wall_seconds'] / 60:.1f} min; results in {out / 'results.json'}", flush=True)
    if not args.quick:
        plot(res, args.figures)
    table(res)


def table(res: dict) -> None:
    rows = res["seeds"]

    def cell(k: str) -> str:
        vals = [r[k] for r in rows]
        return " / ".join(f"{v:.3f}" for v in vals) + (f" (mean {sum(vals) / len(vals):.3f})" if len(vals) > 1 else "")

    seeds = ", ".join(str(r["seed"]) for r in rows)
    print(f"| held out (seeds {seeds}) | before DPO | after DPO |")
    print("|---|---|---|")
    print(f"| preference accuracy: log p(chosen) > log p(rejected) | {cell('pref_logp_acc_before')} | "
          f"{cell('pref_logp_acc_after')} |")
    print(f"| preference accuracy: implicit reward (DPO's, ties at 0 before) | 0.5 (all tied) | "
          f"{cell('implicit_reward_acc_after')} |")
    print(f"| log p(chosen) - log p(rejected), nats | {cell('margin_before')} | {cell('margin_after')} |")
    print(f"| assistant-token loss, nats/byte (base model: {cell('sft_valid_loss_base')}) | "
          f"{cell('sft_valid_loss_sft')} | {cell('sft_valid_loss_dpo')} |")


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
        axes[2].plot([e["step"] for e in r["dpo_evals"]], [e["eval_logps/accuracy"] for e in r["dpo_evals"]], "o-",
                     label=f"log-prob acc., seed {r['seed']}")
        ev = r["dpo_evals"][1:]  # at step 0 the implicit rewards are all 0
        axes[2].plot([e["step"] for e in ev], [e["eval_rewards/accuracies"] for e in ev],
                     "s--", label=f"implicit-reward acc., seed {r['seed']}")
    axes[0].set_title("SFT: assistant-token loss (nats/byte)")
    axes[1].set_title("DPO: sigmoid loss (beta 0.1)")
    axes[2].set_title("DPO: held-out preference accuracy")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(figures / "instruct_curves.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
