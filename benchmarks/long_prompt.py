"""A long prompt arriving while other streams decode: the engine's `prefill_chunk` trade-off.

On `mini-moe` (random weights, bf16, prepared for inference, as `mixlab serve` runs it), an
in-process `Engine` (token budget 512, 16 sequences) decodes `--streams` requests (32-token prompts,
greedy); then a `--long`-token prompt arrives. Per prefill chunk: the streams' inter-token gaps
before it and while it prefills (p50, p99, max), the tokens they got meanwhile, and the long
prompt's time to first token; then the same prompt alone on the idle engine (no streams). Chunks
run in interleaved rounds (`--rounds`; medians), with the memory bandwidth probed after each round
(this kind of machine's memory changes speed by the minute). Every thread count is `--threads`.

    .venv/bin/python benchmarks/long_prompt.py [--long 2048] [--streams 15] [--chunks 512,256,128,64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mixlab.cli import positive
from mixlab.cli.bench import ints
from mixlab.cli.benchmark import bandwidth_probe  # noqa: E402
from mixlab.config import get_preset  # noqa: E402
from mixlab.engine import Engine, SamplingParams  # noqa: E402
from mixlab.model import Transformer  # noqa: E402
from mixlab.model.inference import prepare_for_inference  # noqa: E402


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))] if xs else float("nan")


def one_run(model: Transformer, chunk: int, args: argparse.Namespace, seed: int) -> dict[str, float]:
    V = model.config.vocab_size
    eng = Engine(model, max_batch=args.streams + 1, token_budget=512, prefill_chunk=chunk,
                 max_seq_len=args.long + 256).start()
    try:
        stamps: list[list[float]] = [[] for _ in range(args.streams)]
        handles: list = [None] * args.streams
        need = 2 * args.long // min(chunk, 64) + 60  # enough tokens to outlast the long prompt's prefill

        def stream(i: int) -> None:
            g = torch.Generator().manual_seed(seed * 1000 + i)
            h = handles[i] = eng.submit(torch.randint(3, V, (32,), generator=g).tolist(),
                                        SamplingParams(max_tokens=need, ignore_eos=True))
            for out in h:
                if out.token_id is not None:
                    stamps[i].append(time.perf_counter())

        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(args.streams)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while min(len(s) for s in stamps) < 20 and time.monotonic() < deadline:  # all decoding, settled
            time.sleep(0.01)
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        h = eng.submit(torch.randint(3, V, (args.long,), generator=g).tolist(),
                       SamplingParams(max_tokens=1, ignore_eos=True))
        first = next(o for o in h if o.token_id is not None)
        t1 = time.perf_counter()
        del first
        for handle in handles:
            handle.cancel()
        for t in threads:
            t.join(timeout=60)
        before = [b - a for s in stamps for a, b in zip(s, s[1:], strict=False) if b < t0]
        during = [b - a for s in stamps for a, b in zip(s, s[1:], strict=False) if t0 <= b <= t1]
        return {"ttft": t1 - t0, "before_p50": _pct(before, 0.5), "p50": _pct(during, 0.5),
                "p99": _pct(during, 0.99), "max": max(during, default=float("nan")), "tokens": len(during)}
    finally:
        eng.shutdown()


def alone(model: Transformer, chunk: int, args: argparse.Namespace, seed: int) -> float:
    eng = Engine(model, max_batch=1, token_budget=512, prefill_chunk=chunk, max_seq_len=args.long + 8)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    h = eng.submit(torch.randint(3, model.config.vocab_size, (args.long,), generator=g).tolist(),
                   SamplingParams(max_tokens=1, ignore_eos=True))
    eng.run_until_idle()
    list(h)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--long", type=positive, default=2048, help="the long prompt's tokens")
    ap.add_argument("--streams", type=int, default=15, help="requests decoding when it arrives")
    ap.add_argument("--chunks", type=ints, default=(512, 256, 128, 64), help="prefill chunks to compare")
    ap.add_argument("--rounds", type=positive, default=2)
    ap.add_argument("--threads", type=positive, default=2)
    args = ap.parse_args()
    chunks = list(args.chunks)
    if args.long < 1 or args.streams < 1 or args.rounds < 1 or args.threads < 1 or not chunks or min(chunks) < 1:
        raise SystemExit("--long, --streams, --rounds, --threads and every --chunks value must be >= 1")
    torch.set_num_threads(args.threads)
    with torch.device("meta"):
        model = Transformer(get_preset("mini-moe"))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    model.init_weights(seed=0)
    model = prepare_for_inference(model)
    probe, nbytes = bandwidth_probe(reps=1, mib=256)
    runs: dict[int, list[dict[str, float]]] = {c: [] for c in chunks}
    solo: dict[int, list[float]] = {c: [] for c in chunks}
    bws: list[float] = []
    alone(model, chunks[0], args, 0)  # warm-up (the native decoder, its panels)
    for r in range(args.rounds):
        for c in chunks if r % 2 == 0 else chunks[::-1]:
            print(f"round {r + 1}, chunk {c} ...", file=sys.stderr, flush=True)
            runs[c].append(one_run(model, c, args, seed=r + 1))
            solo[c].append(alone(model, c, args, seed=r + 1))
        time.sleep(0.3)
        best = 0.0
        for _ in range(4):
            t = time.perf_counter()
            probe()
            best = max(best, nbytes / (time.perf_counter() - t))
        bws.append(best)
    print(f"\n{args.long}-token prompt arriving while {args.streams} streams decode (mini-moe bf16, token budget 512, "
          f"{args.threads} threads, {args.rounds} rounds, medians; memory {', '.join(f'{b / 1e9:.0f}' for b in bws)} "
          f"GB/s per round; torch {torch.__version__}):\n")
    print("| prefill chunk | streams' gap before: p50 (ms) | while it prefills: p50 / p99 / max (ms) | their tokens "
          "meanwhile | its first token (s) | the prompt alone (s) |")
    print("|---|---|---|---|---|---|")
    for c in chunks:
        med = {k: statistics.median(x[k] for x in runs[c]) for k in runs[c][0]}
        print(f"| {c} | {med['before_p50'] * 1e3:.1f} | {med['p50'] * 1e3:.0f} / {med['p99'] * 1e3:.0f} / "
              f"{med['max'] * 1e3:.0f} | {med['tokens']:.0f} | {med['ttft']:.2f} | {statistics.median(solo[c]):.2f} |")


if __name__ == "__main__":
    main()
