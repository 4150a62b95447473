"""The native weight conversions alone, on random blocks of one Mixtral 8x7B expert matrix (14336 x 4096
values): `mx_dequantize` of Q4_K / Q5_K / Q6_K blocks to bf16, and `mx_quantize_q4` of bf16 rows to
int4 (groups of 32); one thread, medians of `--reps`. For comparing compilers (`CC=clang` with its own
`MIXLAB_CACHE`) or builds of decode.c: bit-exactness is the tests' (tests/test_native_convert.py).

    .venv/bin/python benchmarks/convert_kernels.py
    CC=clang MIXLAB_CACHE=/tmp/clang-cache .venv/bin/python benchmarks/convert_kernels.py
"""

from __future__ import annotations

import argparse

import torch

from mixlab.cli.benchmark import _median_time
from mixlab.ops import native

# ggml type -> (name, bytes per 256 values, offsets of its float16 scales)
TYPES = {12: ("Q4_K", 144, (0, 2)), 13: ("Q5_K", 176, (0, 2)), 14: ("Q6_K", 210, (208,))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    lib = native.load()
    assert lib is not None, "native kernels unavailable"
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    blocks = 14336 * 4096 // 256
    out = torch.empty(blocks * 256, dtype=torch.bfloat16)
    scale = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)  # finite scales: no NaN / inf values
    print(f"# benchmarks/convert_kernels.py: {lib._name}, 1 thread, one Mixtral expert matrix")
    for t, (name, size, at) in TYPES.items():
        raw = torch.randint(0, 256, (blocks, size), dtype=torch.uint8, generator=g)
        for o in at:
            raw[:, o:o + 2] = scale
        ms = _median_time(lambda raw=raw, t=t: native.dequantize(raw, t, out), args.reps) * 1e3
        print(f"dequantise {name} -> bf16: {ms:.0f} ms")
    w = torch.randn(14336, 4096, generator=g).to(torch.bfloat16)
    ms = _median_time(lambda: native.quantize_int4(w, 32), args.reps) * 1e3
    print(f"round bf16 -> int4 (groups of 32): {ms:.0f} ms")


if __name__ == "__main__":
    main()
