"""GPU measurements for BENCHMARKS.md (run by benchmarks/gpu.sh on a CUDA machine).

Everything is measured in one run, next to the two physical limits measured in the same run:
- memory bandwidth: a large device-to-device copy (bytes read + written per second);
- bf16 matmul peak: an 8192^3 bf16 product.

1. The MoE layer (Mixtral 8x7B shape: D 4096, F 14336, E 8, K 2; bf16) at T = 1, 64, 1024, 8192:
   mixlab's Triton kernel, torch._grouped_mm (mixlab's `grouped` implementation) and transformers'
   MixtralSparseMoeBlock (router included). TFLOP/s = 2 * T * K * 3 * D * F / time; the fraction of
   the matmul peak, and for small T of the bandwidth limit (the bytes of the distinct experts hit).
2. Whole models: decode tokens/s at batch 1 and 32 (the static-cache decoder replayed as a CUDA
   graph), prefill of 2,048 tokens; for `mini-moe` and a random-weight Mixtral-8x7B (93 GB bf16).
   Decode as a fraction of bandwidth (bytes of weights the step reads), prefill of the matmul peak.

Writes one JSON file (--out) and prints a summary. Options to keep it inside its time budget:
--skip-full (no 8x7B model), --quick.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mixlab.atomic import OutputError, check_destination, write_text  # noqa: E402
from mixlab.config import get_preset  # noqa: E402
from mixlab.graphs import StaticDecoder  # noqa: E402
from mixlab.model import Transformer  # noqa: E402
from mixlab.ops import moe as moe_ops  # noqa: E402
from mixlab.ops.triton_moe import triton_moe  # noqa: E402


def cuda_time(fn, *, warmup: int = 3, reps: int = 10) -> float:
    """Median seconds of `fn()` over `reps` timed runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def probes() -> dict:
    n = 1 << 30  # 2 GiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = cuda_time(lambda d=dst, s=src: d.copy_(s))
    bw = 2 * n * 2 / t
    src = dst = torch.empty(0)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b)
    peak = 2 * 8192**3 / t
    return {"bandwidth_GBps": bw / 1e9, "bf16_peak_TFLOPs": peak / 1e12}


def moe_layer(limits: dict, Ts: list[int]) -> list[dict]:
    D, Fd, E, K = 4096, 14336, 8, 2
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * Fd, D, device="cuda", generator=g) * D**-0.5).bfloat16()
    w2 = (torch.randn(E, D, Fd, device="cuda", generator=g) * Fd**-0.5).bfloat16()
    hf_block = None
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        hf_cfg = MixtralConfig(hidden_size=D, intermediate_size=Fd, num_local_experts=E, num_experts_per_tok=K)
        hf_block = MixtralSparseMoeBlock(hf_cfg).to("cuda", torch.bfloat16).eval()
    except Exception as e:  # noqa: BLE001 - report, keep measuring
        print(f"transformers' MoE block unavailable: {e}", file=sys.stderr)
    rows = []
    for T in Ts:
        x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
        logits = torch.randn(T, E, device="cuda", generator=g)
        wt, idx = torch.topk(logits, K, dim=-1)
        wt = torch.softmax(wt, dim=-1)
        flops = 2 * T * K * 3 * D * Fd
        hit = int(torch.unique(idx).numel())
        bytes_ = hit * 3 * D * Fd * 2
        row = {"T": T, "experts_hit": hit}
        with torch.no_grad():
            ref = moe_ops.grouped_mm(x, w13, w2, idx, wt).float()
            got = triton_moe(x, w13, w2, idx, wt).float()
            row["triton_max_rel_err_vs_grouped_mm"] = float((got - ref).abs().max() / ref.abs().max())
            args = (x, w13, w2, idx, wt)
            cands = {"triton": lambda a=args: triton_moe(*a),
                     "grouped_mm": lambda a=args: moe_ops.grouped_mm(*a)}
            if hf_block is not None:
                cands["transformers"] = lambda x_=x, blk=hf_block: blk(x_[None])
            for name, fn in cands.items():
                try:
                    t = cuda_time(fn, reps=10 if T < 4096 else 5)
                except Exception as e:  # noqa: BLE001
                    row[name] = {"error": str(e)[:200]}
                    continue
                row[name] = {"ms": t * 1e3, "TFLOPs": flops / t / 1e12,
                             "frac_peak": flops / t / 1e12 / limits["bf16_peak_TFLOPs"],
                             "frac_bandwidth": bytes_ / t / 1e9 / limits["bandwidth_GBps"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def build(preset: str) -> Transformer:
    cfg = get_preset(preset)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def weight_bytes(model: Transformer, batch: int) -> int:
    """Bytes of weights a decode step reads: everything but the experts, plus the experts hit (K
    per token, up to E, assuming distinct choices across the batch)."""
    cfg = model.config
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if cfg.moe is None:
        return total
    E, K = cfg.moe.num_experts, cfg.moe.top_k
    expert = 3 * cfg.dim * cfg.ffn_dim * next(model.parameters()).element_size()
    hit = min(E, K * batch)
    return total - cfg.n_layers * (E - hit) * expert - cfg.vocab_size * cfg.dim * 2  # embedding: a row gather


def model_runs(preset: str, limits: dict, *, new_tokens: int = 64) -> dict:
    model = build(preset)
    cfg = model.config
    out: dict = {"preset": preset, "params": sum(p.numel() for p in model.parameters())}
    g = torch.Generator().manual_seed(0)
    for B in (1, 32):
        dec = StaticDecoder(model, batch_size=B, max_len=128 + new_tokens + 8, graph=True)
        prompts = [torch.randint(3, cfg.vocab_size, (128,), generator=g).tolist() for _ in range(B)]
        for r, p in enumerate(prompts):
            dec.prefill(r, p)
        tok = torch.zeros(B, dtype=torch.long, device="cuda")
        dec.step(tok)  # capture
        t = cuda_time(lambda d=dec, t_=tok: d.step(t_), warmup=2, reps=new_tokens)
        bytes_ = weight_bytes(model, B)
        out[f"decode_b{B}"] = {"tok_s": B / t, "ms_per_step": t * 1e3,
                               "frac_bandwidth": bytes_ / t / 1e9 / limits["bandwidth_GBps"]}
        print(preset, f"decode batch {B}", json.dumps(out[f"decode_b{B}"]), flush=True)
        del dec
        torch.cuda.empty_cache()
    ids = torch.randint(3, cfg.vocab_size, (1, 2048), generator=g).cuda()
    with torch.no_grad():
        t = cuda_time(lambda m=model, i=ids: m(i), warmup=1, reps=3)
    active = cfg.param_counts()["active"] if hasattr(cfg, "param_counts") else out["params"]
    flops = 2 * 2048 * active
    out["prefill_2048"] = {"tok_s": 2048 / t, "ms": t * 1e3, "TFLOPs": flops / t / 1e12,
                           "frac_peak": flops / t / 1e12 / limits["bf16_peak_TFLOPs"]}
    print(preset, "prefill 2048", json.dumps(out["prefill_2048"]), flush=True)
    model = None  # free the weights before the next model
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu.json")
    ap.add_argument("--skip-full", action="store_true", help="skip the random-weight Mixtral-8x7B model")
    ap.add_argument("--quick", action="store_true", help="fewer token counts")
    args = ap.parse_args()
    if args.out:  # refused now, not after the run
        try:
            check_destination(args.out, kind="file")
        except OutputError as e:
            raise SystemExit(f"--out: {e}") from None
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU")
    t0 = time.time()
    import triton

    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                    "python": platform.python_version()}
    result["limits"] = probes()
    print("limits", json.dumps(result["limits"]), flush=True)
    result["moe_layer"] = moe_layer(result["limits"], [1, 64, 1024] if args.quick else [1, 64, 1024, 8192])
    result["models"] = [model_runs("mini-moe", result["limits"])]
    if not args.skip_full:
        result["models"].append(model_runs("mixtral-8x7b", result["limits"], new_tokens=32))
    result["seconds"] = time.time() - t0
    write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
