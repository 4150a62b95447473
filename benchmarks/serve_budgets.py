"""`--token-budget` A/B on benchmarks/serve.py's load, in one process: one in-process `Engine` over
`mini-moe` (bf16, the checkpoint `serve.py --model-dir` keeps), 16 streaming clients with mixed prompt
lengths, each budget in turn, round by round. Each run is rated against its own median 16-sequence
decoding step (`serve.breakdown`'s `own`), which ran in the same seconds as the rest of the run, so the
memory's drift from run to run (this machine's bandwidth moves 30-68 GB/s within an hour) cancels.

    python benchmarks/serve.py --model-dir /tmp/servebench-model --clients 1 --requests 1 --repeats 1 \
        --skip-mixlab --engine  # once: writes the checkpoint
    python benchmarks/serve_budgets.py --model-dir /tmp/servebench-model --budgets 512 96 48 32 --rounds 3

A smaller budget staggers the clients (prompt pieces ride in decoding steps) instead of prefilling
each wave of prompts in one compute-bound step while nothing decodes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve  # noqa: E402
from mixlab.config import get_preset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True, help="serve.py's --model-dir (its hf/ checkpoint)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[512, 48])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2, help="requests per client per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefill-chunk", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args()
    hf = a.model_dir / "hf"
    if not (hf / "config.json").is_file():
        raise SystemExit(f"--model-dir {a.model_dir}: no hf/config.json; run benchmarks/serve.py --model-dir "
                         f"{a.model_dir} once first")
    if min(a.budgets) < 1 or a.clients < 1 or a.requests < 1 or a.rounds < 1:
        raise SystemExit("--budgets, --clients, --requests and --rounds must be >= 1")
    cfg = get_preset("mini-moe")
    args = argparse.Namespace(clients=[a.clients], token_budget=max(a.budgets))
    own: dict[int, list[float]] = {b: [] for b in a.budgets}
    with serve.engine_in_process(hf, args, print) as engine:
        serve.load(None, "m", 2, 1, 8, 999, a.timeout, cfg.vocab_size, engine)  # warm-up
        for k in range(a.rounds):
            for b in a.budgets:
                engine.token_budget, engine.prefill_chunk = b, min(a.prefill_chunk, b)
                engine.bench_steps.clear()
                r = serve.load(None, "m", a.clients, a.requests, 48, 1 + k, a.timeout, cfg.vocab_size, engine)
                r["steps"], r["bandwidth"] = list(engine.bench_steps), float("nan")
                d = serve.breakdown(cfg, r)
                own[b].append(d["own"])
                print(f"round {k} budget {b:>4}: {r['tok_s']:6.1f} tok/s in {r['wall_s']:.2f} s, {len(r['steps'])} "
                      f"steps, prompt steps {d['prompt_s']:.2f} s, median {a.clients}-sequence step "
                      f"{d['full_step_s'] * 1e3:.1f} ms: {d['own']:.1%} of its rate; TTFT p99 "
                      f"{r['ttft_p99'] * 1e3:.0f} ms", flush=True)
    print(f"\n| --token-budget | of its own {a.clients}-sequence step's rate: median (runs) |\n|---:|---|")
    for b, xs in own.items():
        print(f"| {b} | {statistics.median(xs):.1%} ({', '.join(f'{x:.1%}' for x in xs)}) |")


if __name__ == "__main__":
    main()
