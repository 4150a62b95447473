"""Matrix-vector speed on the matrix shapes of one `mini-moe` decoding step: mixlab's native kernel
(`mixlab.ops.native`, what batch-1 decoding runs) against the PyTorch kernels it replaces
(oneDNN-packed weights, plain `F.linear`), and its int4 kernels (float32 activations, exact; activations
rounded to int8, `act8`), in GB/s of weights read, next to the machine's memory
read bandwidth measured in the same run (a float32 sum over 1 GiB).

    .venv/bin/python benchmarks/gemv.py [--threads 2] [--reps 7]

16 distinct weights per timing, so reads come from memory, not from the CPU caches; median of reps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mixlab.cli import positive
from mixlab.ops import native
from mixlab.ops.linear import pack
from mixlab.ops.quant import quantize_int4

# (rows, cols) of the matrices one mini-moe decoding step reads: expert w13, expert w2, wqkv, output.
SHAPES = [(7168, 1024), (1024, 3584), (1536, 1024), (32000, 1024)]


def gbps(fn: Callable[[int], object], nbytes: int, copies: int, reps: int) -> float:
    fn(0)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(copies):
            fn(i)
        times.append(time.perf_counter() - t)
    return copies * nbytes / statistics.median(times) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=positive, default=2)
    p.add_argument("--reps", type=positive, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if native.load() is None:
        raise SystemExit("native kernels unavailable (MIXLAB_NATIVE=0 or no C compiler)")
    big = torch.ones(256 * 1024 * 1024)
    roof = gbps(lambda i: big.sum(), big.numel() * 4, 1, args.reps)
    print(f"torch {torch.__version__}, {args.threads} threads; memory read bandwidth (float32 sum): {roof:.1f} GB/s")
    print("| shape (rows x cols) | native bf16 | oneDNN packed bf16 | F.linear bf16 | native int8 (int8 bytes) "
          "| native int4 (Q4_0 bytes: 18 per 32) | native int4 x int8 activations |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    copies = 16
    for X, D in SHAPES:
        ws = [torch.randn(X, D).bfloat16() for _ in range(copies)]
        packed = [pack(w) for w in ws]
        qs = [torch.randint(-127, 128, (X, D), dtype=torch.int8) for _ in range(copies)]
        s = torch.rand(X)
        q4s = [quantize_int4(torch.randn(X, D), 32) for _ in range(copies)]
        x = torch.randn(1, D).bfloat16()
        xf = x[0].float()
        kernels: list[tuple[Callable[[int], object], int]] = [
            (lambda i, ws=ws, xf=xf: native.gemv(ws[i], xf), 2),
            (lambda i, x=x, packed=packed: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], ""), 2),
            (lambda i, x=x, ws=ws: F.linear(x, ws[i]), 2),
            (lambda i, qs=qs, xf=xf, s=s: native.gemv(qs[i], xf, s), 1),
            (lambda i, q4s=q4s, xf=xf: native.gemv(q4s[i][0], xf, q4s[i][1]), 18 / 32),
            (lambda i, q4s=q4s, xf=xf: native.gemv(q4s[i][0], xf, q4s[i][1], act8=True), 18 / 32),
        ]
        row = [gbps(fn, int(X * D * elem), copies, args.reps) for fn, elem in kernels]
        print(f"| {X} x {D} | " + " | ".join(f"{v:.1f} GB/s" for v in row) + " |")


if __name__ == "__main__":
    main()
