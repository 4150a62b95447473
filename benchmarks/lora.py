"""Several LoRA adapters served over one base (`Engine(adapters=)`, `serve --lora-modules`): what a
batch of adapter requests costs against the same batch on the base, and on the adapter merged into
the weights (`--adapter`, one model per adapter).

Builds a random `--preset` model (bf16, seeded) and two PEFT adapters over it (rank `--rank`,
attention + experts, random non-zero B, written by mixlab's own `save_peft`), then runs `--batch`
requests of `--prompt` random tokens and `--max-tokens` greedy tokens each through one engine, four
ways, rounds interleaved, medians of the rounds after a warm-up. Prefix caching is off: every round
sends the same prompts, which free slots would otherwise give some loads and not others (the merged
engine's all of them, the base load those the mixed one left under the base, adapter a's none):

- base: every request on the base (the native kernels' steps);
- merged: every request on a copy of the base with adapter a merged in (native steps as well);
- adapter a: every request under adapter a on the base's engine (native steps, each adapted
  weight's low-rank update added inside `mx_decode_batch`);
- mixed: half on the base, a quarter under each adapter (the same native steps, base rows beside
  adapter rows).

    .venv/bin/python benchmarks/lora.py [--preset mini-moe] [--batch 16] [--rank 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mixlab.checkpoint import merge_adapter  # noqa: E402
from mixlab.cli import positive  # noqa: E402
from mixlab.config import get_preset  # noqa: E402
from mixlab.engine import Engine, SamplingParams  # noqa: E402
from mixlab.model import Transformer  # noqa: E402
from mixlab.train.lora import LoraConfig, apply_lora, save_peft  # noqa: E402


def make_adapter(base: Transformer, path: Path, rank: int, seed: int) -> Path:
    m = apply_lora(copy.deepcopy(base), LoraConfig(rank=rank, alpha=2 * rank, targets=("attention", "experts")))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    save_peft(m, path)
    return path


def run(engine: Engine, prompts: list[list[int]], adapters: list[str | None], max_tokens: int) -> float:
    """Tokens/s of the batch: every request submitted at once, the engine stepped until idle."""
    t = time.perf_counter()
    hs = [engine.submit(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True, adapter=a))
          for p, a in zip(prompts, adapters, strict=True)]
    engine.run_until_idle()
    n = sum(len([o for o in h.result() if o.token_id is not None]) for h in hs)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mini-moe")
    ap.add_argument("--batch", type=positive, default=16, help="requests at once")
    ap.add_argument("--prompt", type=positive, default=32, help="prompt tokens per request")
    ap.add_argument("--max-tokens", type=positive, default=48)
    ap.add_argument("--rank", type=positive, default=16)
    ap.add_argument("--rounds", type=positive, default=3)
    ap.add_argument("--threads", type=positive, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    base = Transformer(cfg).to(torch.bfloat16).eval()
    base.init_weights(seed=0)
    g = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(3, cfg.vocab_size, (args.prompt - 1,), generator=g).tolist()
               for _ in range(args.batch)]
    B = args.batch
    with tempfile.TemporaryDirectory() as tmp:
        a, b = (make_adapter(base, Path(tmp) / n, args.rank, seed) for n, seed in (("a", 2), ("b", 3)))
        merged = merge_adapter(copy.deepcopy(base), a)
        engines = {"base": Engine(base, max_batch=B, adapters={"a": a, "b": b}, prefix_cache=False),
                   "merged": Engine(merged, max_batch=B, prefix_cache=False)}
        loads: dict[str, tuple[str, list[str | None]]] = {
            "base": ("base", [None] * B), "merged": ("merged", [None] * B), "adapter a": ("base", ["a"] * B),
            "mixed": ("base", [None] * (B - B // 2) + ["a", "b"] * (B // 4) + ["a"] * (B // 2 % 2))}
        rates: dict[str, list[float]] = {k: [] for k in loads}
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, (eng, which) in loads.items():
                tok_s = run(engines[eng], prompts, which, args.max_tokens)
                if r:
                    rates[name].append(tok_s)
                    print(f"round {r}: {name} {tok_s:.1f} tok/s", flush=True)
    print(f"\n{args.preset} bf16, {B} requests of {args.prompt} prompt + {args.max_tokens} greedy tokens, adapters "
          f"rank {args.rank} (attention + experts), {args.threads} threads, torch {torch.__version__}\n")
    print("| requests | tokens/s (median; rounds) | vs base |\n|---|---|---|")
    ref = statistics.median(rates["base"])
    for name, rs in rates.items():
        med = statistics.median(rs)
        print(f"| {name} | {med:.1f} ({', '.join(f'{x:.1f}' for x in rs)}) | {med / ref:.2f}x |")


if __name__ == "__main__":
    main()
