"""SFT and DPO training throughput: mixlab against TRL's SFTTrainer and DPOTrainer.

    .venv/bin/python benchmarks/finetune.py [--threads 1] [--steps 8] [--repeats 3]

Both frameworks train the same tiny transformers Mixtral checkpoint (written once with
`save_pretrained`, loaded by both), on the same conversations and pairs of ../shared/corpus/chat,
with the same byte-level token ids (an HF tokenizer built to equal mixlab's `bytes` tokenizer), batch
size, sequence limit, float32, full fine-tuning, AdamW, and the same torch thread count. DPO: sigmoid
loss, beta 0.1, reference log-probs precomputed by both (mixlab always; TRL's
`precompute_ref_log_probs=True`), so only policy steps are timed. Each framework's default data path:
TRL pads each batch (its default, packing off); mixlab packs SFT conversations (block-diagonal
attention) and right-pads DPO pairs.

Reported: tokens/s of the timed steps (real, non-padding tokens: for DPO, prompt and reply tokens of
both sequences of each pair), median over `--repeats` runs that alternate the frameworks, and the
ratio mixlab / TRL in the same run (the median of the per-run ratios). Each rate is given twice: per
wall-clock second, and per CPU second of the training thread (`time.thread_time()`; with one torch
thread all compute runs on it), which time slices lost to other processes on a shared machine do not
inflate; the load average before and after each run is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mixlab.cli import positive

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO.parent / "shared" / "corpus" / "chat"


def byte_tokenizer():  # type: ignore[no-untyped-def]
    """A transformers tokenizer giving mixlab's `bytes` ids: byte b -> b + 3, <pad> 0, <s> 1, </s> 2.
    ByteLevel turns each byte into one character (GPT-2's bytes_to_unicode); each character is a token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {chr(c): b + 3 for b, c in zip(bs, cs, strict=True)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        pre_tokenizers.Split(Regex("."), behavior="isolated"),
    ])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_checkpoint(root: Path) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=259, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=512, rope_theta=1e4, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0, router_aux_loss_coef=0.02, tie_word_embeddings=False)
    m = MixtralForCausalLM(cfg)
    path = root / "ckpt"
    m.save_pretrained(path)
    (path / "mixlab_data.json").write_text(json.dumps({"tokenizer": {"type": "bytes"}}))
    return path


def data(root: Path, n_sft: int, n_dpo: int) -> tuple[Path, Path]:
    s = (CHAT / "sft.jsonl").read_text(encoding="utf-8").splitlines()[:n_sft]
    d = (CHAT / "dpo.jsonl").read_text(encoding="utf-8").splitlines()[:n_dpo]
    (root / "sft.jsonl").write_text("\n".join(s) + "\n")
    (root / "dpo.jsonl").write_text("\n".join(d) + "\n")
    return root / "sft.jsonl", root / "dpo.jsonl"


def run_mixlab(task: str, ckpt: Path, path: Path, out: Path, *, steps: int, warm: int, batch: int,
               seq: int) -> tuple[float, float]:
    """(tokens per wall-clock second, tokens per CPU second of the training thread) of the timed steps."""
    from mixlab.train.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(task=task, model=str(ckpt), data=str(path), out=str(out), seq_len=seq, batch_size=batch,
                         steps=warm + steps, lr=1e-4, warmup=1, valid_fraction=0.0, eval_every=0, ckpt_every=0,
                         log_every=1000, progress=False, export_hf=False, aux_loss_coef=0.02)
    cpu: list[float] = []
    hist = finetune(cfg, on_step=lambda _r: cpu.append(time.thread_time())).history
    tokens = sum(r["tokens"] for r in hist[warm:])
    return (tokens / sum(r["tokens"] / r["tokens_per_s"] for r in hist[warm:]),
            tokens / (cpu[warm + steps - 1] - cpu[warm - 1]))


def run_trl(task: str, ckpt: Path, path: Path, out: Path, *, steps: int, warm: int, batch: int,
            seq: int) -> tuple[float, float]:
    from datasets import Dataset
    from transformers import MixtralForCausalLM, TrainerCallback

    from mixlab.train import dpo as mdpo
    from mixlab.train import sft as msft
    from mixlab.train.data import ByteTokenizer

    tok = byte_tokenizer()
    model = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    times: list[float] = []
    cpu: list[float] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            times.append(time.perf_counter())
            cpu.append(time.thread_time())

        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            times.append(time.perf_counter())
            cpu.append(time.thread_time())

    common = dict(output_dir=str(out), per_device_train_batch_size=batch, max_steps=warm + steps, learning_rate=1e-4,
                  lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                  dataloader_num_workers=0, seed=0, bf16=False)
    bt = ByteTokenizer()
    if task == "sft":
        from trl import SFTConfig, SFTTrainer

        exs = msft.read_sft(path, bt)
        ds = Dataset.from_list([{"input_ids": e.ids[: seq + 1], "completion_mask": [int(t) for t in e.train[: seq + 1]]}
                                for e in exs])
        args = SFTConfig(max_length=seq + 1, completion_only_loss=True, packing=False, **common)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    else:
        from trl import DPOConfig, DPOTrainer

        rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()]
        ds_rows = []
        for r in rows:
            prompt_ids, _ = msft.render_turns(mdpo.transcript_turns(r["prompt"]), bt, final_assistant=False)
            ds_rows.append({"prompt": bt.decode(prompt_ids[1:]), "chosen": r["chosen"], "rejected": r["rejected"]})
        args = DPOConfig(max_length=seq, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=True,
                         truncation_mode="keep_end", **common)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(ds_rows), processing_class=tok,
                             callbacks=[Clock()])
    trainer.train()
    hist = [h for h in trainer.state.log_history if "num_tokens" in h]
    per_step = [hist[i]["num_tokens"] - (hist[i - 1]["num_tokens"] if i else 0) for i in range(len(hist))]
    step_secs = [times[2 * i + 1] - times[2 * i] for i in range(len(times) // 2)]
    step_cpu = [cpu[2 * i + 1] - cpu[2 * i] for i in range(len(cpu) // 2)]
    tokens = sum(per_step[warm: warm + steps])
    return tokens / sum(step_secs[warm: warm + steps]), tokens / sum(step_cpu[warm: warm + steps])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=positive, default=1)
    ap.add_argument("--steps", type=positive, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=positive, default=3)
    ap.add_argument("--batch", type=positive, default=8)
    ap.add_argument("--seq", type=positive, default=256)
    ap.add_argument("--tasks", nargs="+", choices=("sft", "dpo"), default=["sft", "dpo"])
    args = ap.parse_args()
    if args.warmup < 0:
        ap.error(f"argument --warmup: expected an integer >= 0, got {args.warmup}")
    torch.set_num_threads(args.threads)
    import transformers
    import trl

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"threads {args.threads}, batch {args.batch}, seq {args.seq}, float32, {args.steps} timed steps after "
          f"{args.warmup}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = make_checkpoint(root)
        sft_path, dpo_path = data(root, 400, 96)
        for task in args.tasks:
            path = sft_path if task == "sft" else dpo_path
            ours, theirs, ours_cpu, theirs_cpu = [], [], [], []
            for r in range(args.repeats):
                kw = dict(steps=args.steps, warm=args.warmup, batch=args.batch, seq=args.seq)
                load0 = os.getloadavg()[0]
                (w, c) = run_mixlab(task, ckpt, path, root / f"m-{task}-{r}", **kw)
                ours.append(w)
                ours_cpu.append(c)
                (w, c) = run_trl(task, ckpt, path, root / f"t-{task}-{r}", **kw)
                theirs.append(w)
                theirs_cpu.append(c)
                print(f"  {task} run {r}: mixlab {ours[-1]:,.0f} tok/s, TRL {theirs[-1]:,.0f} tok/s "
                      f"(x{ours[-1] / theirs[-1]:.2f}); per CPU second of the training thread: mixlab "
                      f"{ours_cpu[-1]:,.0f}, TRL {theirs_cpu[-1]:,.0f} (x{ours_cpu[-1] / theirs_cpu[-1]:.2f}); "
                      f"load average {load0:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)
            for label, a, b in (("wall clock", ours, theirs), ("CPU time", ours_cpu, theirs_cpu)):
                ratios = [x / y for x, y in zip(a, b, strict=True)]
                print(f"{task} ({label}): mixlab {statistics.median(a):,.0f} tok/s, TRL {statistics.median(b):,.0f} "
                      f"tok/s, median per-run ratio x{statistics.median(ratios):.2f} (per-run ratios "
                      f"{', '.join(f'{x:.2f}' for x in ratios)})", flush=True)


if __name__ == "__main__":
    main()
