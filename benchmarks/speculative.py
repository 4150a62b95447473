"""Speculative decoding by prompt lookup (`SamplingParams.speculative_tokens`) against plain greedy
decoding: decode tokens/s, engine steps and the drafts' acceptance rate, at several k, one request at
a time (batch 1, the memory-bound case), interleaved round by round in one process.

Prompts quote code from the corpus: a file's first `--quote` tokens, a blank line, then its first
`--lead` tokens again, so a model that copies continues the quote (a code edit, a summary that
cites its source). `--model DIR` is a trained checkpoint (`mixlab demo --out DIR` or `mixlab train`);
`--random mini-moe` times a random model of that preset over the same prompts, whose drafts are
almost all rejected: the overhead of verifying drafts that fail.

    .venv/bin/python benchmarks/speculative.py --model /tmp/demo/hf --data ../shared/corpus/github \\
        --k 2,4,8 --rounds 5
    .venv/bin/python benchmarks/speculative.py --random mini-moe --data ../shared/corpus/github --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mixlab import load_model, load_tokenizer
from mixlab.cli import positive
from mixlab.cli.bench import ints
from mixlab.config import get_preset
from mixlab.engine import Engine, SamplingParams
from mixlab.model import Transformer
from mixlab.tokenizer import model_tokenizer


def prompts_from(data: Path, tok: Any, n: int, quote: int, lead: int) -> list[list[int]]:
    """`n` prompts: a file's first `quote` tokens, a blank line, then its first `lead` tokens again."""
    out = []
    with open(data / "valid.jsonl", encoding="utf-8") as f:
        for line in f:
            ids = tok.encode(json.loads(line)["text"])
            if len(ids) < quote:
                continue
            ids = ids[:quote]
            out.append(ids + tok.encode("\n\n") + ids[:lead])
            if len(out) == n:
                break
    return out


def run(engine: Engine, prompt: list[int], k: int, max_tokens: int) -> tuple[list[int], float, dict[str, int]]:
    """One request alone: its tokens, the decode time (first token to last) and the engine's counters
    (`steps`: the decoding steps, after the prefill's, which gives the first token)."""
    before = dict(engine.stats())
    h = engine.submit(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, speculative_tokens=k))
    first = 0.0
    toks = []
    while engine.has_work():
        engine.step()
        for o in h.poll():
            if o.token_id is not None:
                first = first or time.perf_counter()
                toks.append(o.token_id)
    end = time.perf_counter()
    after = engine.stats()
    delta = {key: int(after[key]) - int(before[key]) for key in ("steps", "draft_tokens", "accepted_tokens")}  # type: ignore[call-overload]
    delta["steps"] -= -(-len(prompt) // engine.prefill_chunk)
    return toks, end - first, delta


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a trained checkpoint folder")
    src.add_argument("--random", metavar="PRESET", help="random weights of this preset (e.g. mini-moe)")
    p.add_argument("--tokenizer", default=None, help="(default: the model's; mixtral for --random)")
    p.add_argument("--data", type=Path, required=True, help="a corpus domain folder holding valid.jsonl")
    p.add_argument("--k", type=ints, default=(2, 4, 8), help="speculative tokens to compare with 0")
    p.add_argument("--prompts", type=positive, default=4)
    p.add_argument("--quote", type=positive, default=192, help="tokens of code quoted")
    p.add_argument("--lead", type=positive, default=16, help="tokens of it given again to continue")
    p.add_argument("--max-tokens", type=positive, default=128)
    p.add_argument("--rounds", type=positive, default=5)
    p.add_argument("--threads", type=positive, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch-invariant", action="store_true",
                   help="Engine(batch_invariant=True): outputs bit for bit plain decoding's, in bf16 too")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.model is not None:
        model = load_model(args.model, dtype=args.dtype)
        tok = load_tokenizer(args.tokenizer) if args.tokenizer else model_tokenizer(args.model)
    else:
        tok = load_tokenizer(args.tokenizer or "mixtral")
        cfg = get_preset(args.random)
        model = Transformer(cfg.replace(vocab_size=max(cfg.vocab_size, tok.vocab_size))).to(dtype)
        model.init_weights(seed=0)
    model.eval()
    prompts = prompts_from(args.data, tok, args.prompts, args.quote, args.lead)
    ks = (0, *args.k)
    longest = max(map(len, prompts)) + args.max_tokens
    engine = Engine(model, max_batch=1, max_seq_len=longest, prefix_cache=False, batch_invariant=args.batch_invariant)
    engine.runner.prepare()  # the native decoder; the steps are driven from here
    run(engine, prompts[0], 0, 8)  # warm-up
    rates: dict[int, list[float]] = {k: [] for k in ks}
    totals: dict[int, dict[str, int]] = {k: {"steps": 0, "draft_tokens": 0, "accepted_tokens": 0, "tokens": 0}
                                         for k in ks}
    same: dict[int, int] = dict.fromkeys(ks, 0)
    for _ in range(args.rounds):
        for prompt in prompts:
            want = None
            for k in ks:
                toks, seconds, delta = run(engine, prompt, k, args.max_tokens)
                rates[k].append((len(toks) - 1) / seconds)
                for key, v in delta.items():
                    totals[k][key] += v
                totals[k]["tokens"] += len(toks) - 1
                want = toks if k == 0 else want
                same[k] += toks == want
    runs = args.rounds * len(prompts)
    what = args.model or f"random {args.random}"
    invariant = ", batch_invariant" if args.batch_invariant else ""
    print(f"{what}, {args.dtype}{invariant}, {args.threads} threads, {len(prompts)} prompts of {len(prompts[0])}+ "
          f"tokens, {args.max_tokens} new tokens each, {args.rounds} rounds (medians over prompts x rounds)")
    print("| k | decode tok/s | vs k=0 | tokens per decoding step | acceptance | outputs equal to k=0 |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(rates[0])
    for k in ks:
        t = totals[k]
        med = statistics.median(rates[k])
        acc = f"{t['accepted_tokens'] / t['draft_tokens']:.2f}" if t["draft_tokens"] else "-"
        print(f"| {k} | {med:.1f} | {med / base:.2f}x | {t['tokens'] / t['steps']:.2f} | {acc} | "
              f"{same[k]}/{runs} |")


if __name__ == "__main__":
    main()
