"""The cost of batch-invariant steps (`Engine(batch_invariant=True)`, `serve --batch-invariant`):
one engine step prefilling N prompts of 32 tokens, then its decoding steps, for N = 1 and 16, the
default kernels against the invariant ones, alternated round by round in one process (medians).

    .venv/bin/python benchmarks/batch_invariant.py --model DIR [--rounds 5 --threads 2]
"""

import argparse
import statistics
import time

import torch

import mixlab
from mixlab.cli import positive
from mixlab.engine import Engine, SamplingParams
from mixlab.errors import MixlabError


def one_round(engine: Engine, prompts: list[list[int]], steps: int) -> tuple[float, float]:
    """(seconds of the step that prefills every prompt, seconds per decoding step)."""
    hs = [engine.submit(p, SamplingParams(max_tokens=steps + 1, ignore_eos=True)) for p in prompts]
    t = time.perf_counter()
    engine.step()
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    decode = (time.perf_counter() - t) / steps
    engine.run_until_idle()
    for h in hs:
        h.result()
    return prefill, decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (loaded in bf16)")
    ap.add_argument("--rounds", type=positive, default=5)
    ap.add_argument("--steps", type=positive, default=16, help="decoding steps timed per round")
    ap.add_argument("--threads", type=positive, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        model = mixlab.load_model(args.model, dtype="bfloat16")
    except MixlabError as e:  # a missing or broken folder: one line, as argparse says a bad flag
        ap.error(f"--model: {e}")
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, model.config.vocab_size, (31,), generator=g).tolist() for _ in range(16)]
    engines = {inv: Engine(model, max_batch=16, prefix_cache=False, batch_invariant=inv) for inv in (False, True)}
    for n in (1, 16):
        times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for r in range(args.rounds + 1):  # round 0 warms up
            for inv, engine in engines.items():
                out = one_round(engine, prompts[:n], args.steps)
                if r:
                    times[inv].append(out)
        med = {inv: [statistics.median(x[i] for x in t) for i in (0, 1)] for inv, t in times.items()}
        (p0, d0), (p1, d1) = med[False], med[True]
        print(f"{n:>2} sequences: prefill step {1000 * p0:.1f} -> {1000 * p1:.1f} ms ({p1 / p0:.2f}x), "
              f"decoding step {1000 * d0:.1f} -> {1000 * d1:.1f} ms ({d1 / d0:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
