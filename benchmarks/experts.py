"""The experts of batched decoding on their own: `mixlab.ops.native.moe` (decode.c's `mx_moe`, what
an engine step runs for the experts of each layer) on `mini-moe`'s expert shapes (8 experts of
1024 x 3584, top 2, bf16) for T tokens, through 8 layers of distinct weights so that every read
comes from memory, against the machine's read bandwidth probed between the repetitions.

    .venv/bin/python benchmarks/experts.py [--threads 2] [--reps 7] [--tokens 1 4 16 32]

Per T: milliseconds for the 8 layers (median), the bytes of the distinct experts hit over that time
(GB/s), and the median over rounds of (bytes / that round's probe) / time ("of limit": 1.0 =
streaming the chosen experts at the probe's speed). "balanced" rows give every expert exactly
T*2/8 tokens; the others route at random.
At 16 tokens each expert sees ~4 tokens: the compute per weight byte that `tile4x*_bf16` hides
behind the memory reads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mixlab.cli import positive
from mixlab.cli.benchmark import bandwidth_probe
from mixlab.ops import native

D, F, E, K, L = 1024, 3584, 8, 2, 8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=positive, default=2)
    p.add_argument("--reps", type=positive, default=7)
    p.add_argument("--tokens", type=positive, nargs="+", default=[1, 4, 16, 32])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if native.load() is None:
        raise SystemExit("native kernels unavailable (MIXLAB_NATIVE=0 or no C compiler)")
    g = torch.Generator().manual_seed(0)
    w13 = [(torch.randn(E, 2 * F, D, generator=g) * 0.02).bfloat16() for _ in range(L)]
    w2 = [(torch.randn(E, D, F, generator=g) * 0.02).bfloat16() for _ in range(L)]
    cases = []
    for T in args.tokens:
        x = torch.randn(T, D, generator=g)
        mix = torch.softmax(torch.randn(T, K, generator=g), -1)
        rand = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        cases.append((f"{T}", x, rand, mix))
        if T * K % E == 0:
            bal = torch.tensor([[(K * t + k) % E for k in range(K)] for t in range(T)])
            cases.append((f"{T} balanced", x, bal, mix))
    probe, probe_bytes = bandwidth_probe(reps=1, mib=256)
    times: dict[str, list[float]] = {name: [] for name, *_ in cases}
    bws: list[float] = []
    for rep in range(args.reps + 1):  # the first round warms up
        for name, x, idx, mix in cases:
            t0 = time.perf_counter()
            for layer in range(L):
                native.moe(x, w13[layer], w2[layer], idx, mix)
            if rep:
                times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        probe()
        if rep:
            bws.append(probe_bytes / (time.perf_counter() - t0))
    bw = statistics.median(bws)
    # per round: the round's time against the probe right after it (the bandwidth drifts within a run)
    print(f"# benchmarks/experts.py: mini-moe experts (8 x {D} x {F}, top {K}, bf16), {L} layers, "
          f"{args.threads} threads, torch {torch.__version__}")
    print(f"bandwidth probe: {bw / 1e9:.1f} GB/s (median of {len(bws)}: "
          f"{', '.join(f'{b / 1e9:.1f}' for b in bws)})\n")
    print("| tokens | distinct experts | ms (8 layers) | GB/s | of limit | GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for name, x, idx, _ in cases:
        T = x.shape[0]
        distinct = len(set(idx.flatten().tolist()))
        nbytes = L * distinct * 3 * D * F * 2
        flops = L * T * K * 3 * D * F * 2
        t = statistics.median(times[name])
        frac = statistics.median(nbytes / b / s for s, b in zip(times[name], bws, strict=True))
        print(f"| {name} | {distinct} | {t * 1e3:.2f} | {nbytes / t / 1e9:.1f} | {frac:.2f} | "
              f"{flops / t / 1e9:.0f} |")


if __name__ == "__main__":
    main()
