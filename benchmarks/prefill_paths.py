"""Prefill through `mixlab.generate` (the engine: one step per prompt chunk of up to the token budget)
three ways: every step native (`mx_decode_batch`), every step on the engine's PyTorch pass, and the
registry's choice.

On a CPU with AMX, whose bf16 GEMMs oneDNN runs on the tile unit, the registry hands a step of bf16
activations with more tokens than `AMX_MAX_STEP_TOKENS` gives its weights' dtype (bf16, int8) to the
engine's PyTorch pass; elsewhere the native call takes steps of up to `NATIVE_MAX_STEP_TOKENS`.

A random model of `--preset` (bf16, seeded), prompts of `--prompts` random tokens prefilled to one new
token, the ways back to back in each of `--reps` rounds, medians.
`--quant int8|int4`: the model prepared so first (`prepare_for_inference`). Also the bf16 and float32
throughput of PyTorch's GEMM (512 x 4096 x 4096) in the same run.

    .venv/bin/python benchmarks/prefill_paths.py --preset mini-moe --prompts 64 128 512 2000 --reps 5
    .venv/bin/python benchmarks/prefill_paths.py --quant int4
    .venv/bin/python benchmarks/prefill_paths.py --preset mixtral-8x7b --layers 2 --prompts 64 128 512 --reps 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import mixlab
from mixlab.model import Transformer
from mixlab.ops import registry


def gemm_gflops(dtype: torch.dtype, reps: int = 10) -> float:
    a, w = torch.randn(512, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    for _ in range(3):
        a @ w.t()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ w.t()
        times.append(time.perf_counter() - t)
    return 2 * 512 * 4096 * 4096 / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mini-moe")
    ap.add_argument("--layers", type=int, default=None, help="the preset's first N layers (Mixtral's widths: 2)")
    ap.add_argument("--prompts", type=int, nargs="+", default=[64, 128, 512, 2000])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quant", choices=["int8", "int4"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = mixlab.get_preset(args.preset)
    if args.layers:
        cfg = cfg.replace(n_layers=args.layers)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    model.init_weights(seed=0)
    model = model.to(torch.bfloat16).eval()
    if args.quant:
        from mixlab.model.inference import prepare_for_inference

        model = prepare_for_inference(model, quant=args.quant)
    what = f"{args.preset}{f' ({args.layers} layers)' if args.layers else ''} bfloat16" + (
        f" {args.quant}" if args.quant else "")
    print(f"# benchmarks/prefill_paths.py: {what}, {args.threads} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}; registry.amx() = {registry.amx()}")
    print(f"PyTorch GEMM 512x4096x4096: bf16 {gemm_gflops(torch.bfloat16):.0f} GFLOP/s, "
          f"float32 {gemm_gflops(torch.float32):.0f} GFLOP/s")
    print("| prompt tokens | every step native (tok/s) | every step PyTorch (tok/s) | the registry's choice (tok/s) "
          "| registry / native | same tokens |")
    print("|---:|---:|---:|---:|---:|---|")
    g = torch.Generator().manual_seed(0)
    amx_most = dict(registry.AMX_MAX_STEP_TOKENS)
    limits = {"native": (registry.NATIVE_MAX_STEP_TOKENS, {k: registry.NATIVE_MAX_STEP_TOKENS for k in amx_most}),
              "torch": (0, {k: 0 for k in amx_most}), "registry": (registry.NATIVE_MAX_STEP_TOKENS, amx_most)}
    saved = limits["registry"]
    for P in args.prompts:
        prompt = torch.randint(3, cfg.vocab_size, (P,), generator=g).tolist()
        mixlab.generate(model, [prompt], max_new_tokens=1)  # warm
        times: dict[str, list[float]] = {way: [] for way in limits}
        outs = {}
        try:
            for _ in range(args.reps):
                for way, (most, by_dtype) in limits.items():
                    registry.NATIVE_MAX_STEP_TOKENS, registry.AMX_MAX_STEP_TOKENS = most, by_dtype
                    t = time.perf_counter()
                    outs[way] = mixlab.generate(model, [prompt], max_new_tokens=1)
                    times[way].append(time.perf_counter() - t)
        finally:
            registry.NATIVE_MAX_STEP_TOKENS, registry.AMX_MAX_STEP_TOKENS = saved
        rate = {way: P / statistics.median(t) for way, t in times.items()}
        same = len({str(o) for o in outs.values()}) == 1
        print(f"| {P} | {rate['native']:,.0f} | {rate['torch']:,.0f} | {rate['registry']:,.0f} | "
              f"{rate['registry'] / rate['native']:.2f}x | {same} |", flush=True)

if __name__ == "__main__":
    main()
