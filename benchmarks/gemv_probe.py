"""Probe for the next decode-speed step: a hand-written AVX512-BF16 GEMV against the kernels mixlab
uses today, in GB/s of weight read, on the matrix shapes of one `mini-moe` decoding step.

Not part of the library. `mixlab bench` shows decode at ~48% of the measured bandwidth with
oneDNN-packed weights; this measures how much a `_mm512_dpbf16_ps` kernel (4 rows per iteration,
OpenMP over rows, float32 accumulation) would gain. It compiles a C++ extension with
`torch.utils.cpp_extension.load_inline` (needs a C++ compiler, ninja and a CPU with AVX512-BF16).

    .venv/bin/python benchmarks/gemv_probe.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load_inline

from mixlab.ops.linear import linear, pack

SRC = r"""
#include <torch/extension.h>
#include <immintrin.h>
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w) {
  // y[X] = w[X, D] @ x[D], bf16 inputs, float32 accumulation; X % 4 == 0, D % 32 == 0.
  const int64_t X = w.size(0), D = w.size(1);
  auto y = torch::empty({X}, torch::dtype(torch::kFloat32));
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  #pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < X; r += 4) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    const uint16_t* w0 = wp + r * D;
    for (int64_t k = 0; k < D; k += 32) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(xp + k);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + k), xv);
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w0 + D + k), xv);
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w0 + 2 * D + k), xv);
      a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w0 + 3 * D + k), xv);
    }
    yp[r] = _mm512_reduce_add_ps(a0); yp[r + 1] = _mm512_reduce_add_ps(a1);
    yp[r + 2] = _mm512_reduce_add_ps(a2); yp[r + 3] = _mm512_reduce_add_ps(a3);
  }
  return y;
}
"""

# (rows, cols) of the matrices one mini-moe decoding step reads: expert w13, expert w2, wqkv, output.
SHAPES = [(7168, 1024), (1024, 3584), (1536, 1024), (32000, 1024)]


def probe(mod: object, X: int, D: int, copies: int = 16) -> str:
    """GB/s of weight read for each kernel; `copies` distinct weights so reads come from memory."""
    ws = [torch.randn(X, D).bfloat16() for _ in range(copies)]
    packed = [pack(w) for w in ws]
    x = torch.randn(1, D).bfloat16()
    gemv = mod.gemv_bf16  # type: ignore[attr-defined]
    err = (gemv(x[0], ws[0]) - F.linear(x.float(), ws[0].float())[0]).abs().max().item()
    kernels = {"avx512-bf16": lambda i: gemv(x[0], ws[i]),
               "onednn-packed": lambda i: linear(x, packed[i]),
               "F.linear": lambda i: F.linear(x, ws[i])}
    line = []
    for name, fn in kernels.items():
        fn(0)
        times = []
        for _ in range(7):
            t = time.perf_counter()
            for i in range(copies):
                fn(i)
            times.append(time.perf_counter() - t)
        line.append(f"{name} {copies * X * D * 2 / statistics.median(times) / 1e9:5.1f} GB/s")
    return f"[{X:>5} x {D:>4}] max err {err:.1e}: " + ", ".join(line)


def main() -> None:
    torch.set_num_threads(2)
    mod = load_inline("mixlab_gemv_probe", cpp_sources=SRC, functions=["gemv_bf16"],
                      extra_cflags=["-O3", "-mavx512f", "-mavx512bf16", "-fopenmp"], extra_ldflags=["-fopenmp"])
    for X, D in SHAPES:
        print(probe(mod, X, D))


if __name__ == "__main__":
    main()
