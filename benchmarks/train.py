"""Training throughput: mixlab vs transformers' MixtralForCausalLM, side by side.

One measured iteration = forward + loss (cross-entropy + 0.02 x load-balancing loss, which both
models compute) + backward + AdamW step, on the same config, batch, dtype and thread count; mixlab's
column runs what `mixlab train` runs (its optimizer: fused AdamW; with --compile, its compile), the
transformers column a plain user setup (AdamW, foreach). Neither clips gradients. The two
models alternate iteration by iteration, so a busy shared CPU slows both alike; the ratio of the
medians is the result. transformers is measured with each experts implementation it offers on CPU.

    .venv/bin/python benchmarks/train.py                    # float32 and bf16 autocast
    .venv/bin/python benchmarks/train.py --iters 10 --dtype float32
    .venv/bin/python benchmarks/train.py --compile           # mixlab compiled, transformers eager
    .venv/bin/python benchmarks/train.py --compile --hf-compile   # both compiled
    .venv/bin/python benchmarks/train.py --profile 12        # then where each step's time goes

Each row also gives each column's step as a fraction of the matmul peak measured in the same run
(a 2048^3 matmul in the row's dtype): `step_flops` counts the step's matmul FLOPs. Like `mixlab
train`, the process first asks malloc to keep freed memory (`keep_freed_memory`); both columns
run in this process, so both get it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from mixlab.cli import positive
from mixlab.config import MoEConfig, get_preset
from mixlab.model import Transformer
from mixlab.train.loop import TrainConfig, compile_model, keep_freed_memory, make_optimizer
from mixlab.train.losses import lm_loss, router_losses


def configs(args: argparse.Namespace) -> tuple:
    mc = get_preset("tiny-moe").replace(
        vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
        head_dim=args.dim // args.heads, ffn_dim=args.ffn, max_seq_len=max(args.seq, 256),
        moe=MoEConfig(num_experts=args.experts, top_k=args.top_k),
    )
    from transformers import MixtralConfig

    hf = MixtralConfig(**{**mc.to_hf_dict(), "output_router_logits": True, "router_aux_loss_coef": 0.02})
    return mc, hf


HF_EXPERTS = ("eager", "batched_mm", "grouped_mm")  # transformers' `experts_implementation` choices


def make_steps(args: argparse.Namespace, dtype: str, hf_experts: str) -> dict[str, Callable[[], float]]:
    from transformers import MixtralForCausalLM

    mc, hf_cfg = configs(args)
    torch.manual_seed(0)
    ours = Transformer(mc)
    ours.init_weights(seed=0)
    ours.set_moe_impl(args.moe_impl)
    hf_cfg._experts_implementation = hf_experts
    theirs = MixtralForCausalLM(hf_cfg)
    theirs.train()
    ours.train()
    x = torch.randint(3, mc.vocab_size, (args.batch, args.seq + 1))
    inp, tgt = x[:, :-1], x[:, 1:]
    auto = dict(device_type="cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    opt_ours = make_optimizer(ours, TrainConfig(lr=1e-4))  # what `mixlab train` builds (fused AdamW)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, foreach=True)  # a plain user setup

    fwd = compile_model(ours) if args.compile else ours.forward_output  # what `mixlab train --compile` does
    fwd_theirs = torch.compile(theirs) if args.hf_compile else theirs

    def step_ours() -> float:
        t = time.perf_counter()
        with torch.autocast(**auto):
            o = fwd(inp)
            logits, routings = o.logits_BTV, o.routing
        aux, _ = router_losses(routings)
        loss = lm_loss(logits, tgt) + 0.02 * aux
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    def step_theirs() -> float:
        t = time.perf_counter()
        with torch.autocast(**auto):
            out = fwd_theirs(input_ids=inp, labels=x[:, :-1].clone(), output_router_logits=True)
        out.loss.backward()  # transformers adds router_aux_loss_coef * aux_loss to the loss
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    hf_name = f"transformers ({hf_experts}{'+compile' if args.hf_compile else ''})"
    return {f"mixlab ({args.moe_impl})": step_ours, hf_name: step_theirs}


def step_flops(mc, tokens: int, seq: int) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3x forward): 6 x the matmul parameters
    a token touches (attention, router, its top-k experts, output head; the embedding is a lookup)
    per token, plus causal attention's scores and values (each token attends to seq/2 keys on
    average: 2 x 2 x seq/2 x q_dim per layer forward)."""
    D, F, K = mc.dim, mc.ffn_dim, mc.moe.top_k
    per_layer = D * mc.q_dim * 2 + 2 * D * mc.kv_dim + mc.moe.num_experts * D + K * 3 * D * F
    params = mc.n_layers * per_layer + mc.vocab_size * D
    return tokens * (6 * params + 3 * mc.n_layers * 2 * seq * mc.q_dim)


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Median GFLOP/s of an n x n x n matmul in `dtype` (the physical limit for a training step)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(ts) / 1e9


def top_ops(step: Callable[[], float], n: int, steps: int = 3) -> dict[str, float]:
    """The n ops with the most self CPU time over `steps` profiled steps, in ms per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:n]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    ms = {e.key: round(e.self_cpu_time_total / steps / 1e3, 1) for e in ops}
    return {"total": round(total / steps / 1e3, 1), **ms}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=positive, default=259)
    p.add_argument("--dim", type=positive, default=256)
    p.add_argument("--layers", type=positive, default=4)
    p.add_argument("--heads", type=positive, default=8)
    p.add_argument("--kv-heads", type=positive, default=2)
    p.add_argument("--ffn", type=positive, default=512)
    p.add_argument("--experts", type=positive, default=8)
    p.add_argument("--top-k", type=positive, default=2)
    p.add_argument("--batch", type=positive, default=8)
    p.add_argument("--seq", type=positive, default=256)
    p.add_argument("--iters", type=positive, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--moe-impl", default="auto", help="mixlab MoE implementation (mixlab.ops.moe.IMPLS or auto)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile mixlab's model (warm-up compiles)")
    p.add_argument("--hf-compile", action="store_true",
                   help="torch.compile transformers' model too (its name then ends in +compile)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    p.add_argument("--hf-experts", default="eager,grouped_mm",
                   help="transformers experts implementations to compare against (comma-separated)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, print each column's N costliest ops (ms per step, torch.profiler)")
    args = p.parse_args()
    if args.warmup < 0:
        p.error(f"argument --warmup: expected an integer >= 0, got {args.warmup}")
    bad = [n for n in args.hf_experts.split(",") if n not in HF_EXPERTS]
    if bad:
        p.error(f"argument --hf-experts: {bad[0]!r} is not one of transformers' experts implementations "
                f"({', '.join(HF_EXPERTS)})")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # What `mixlab train` does at start; process-wide, so transformers' column gets it too.
    malloc_kept = keep_freed_memory()
    import transformers

    mc, _ = configs(args)
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                      "params": mc.param_counts()["total"], "batch": args.batch, "seq": args.seq,
                      "malloc keeps freed memory": malloc_kept}))
    tokens = args.batch * args.seq
    flops = step_flops(mc, tokens, args.seq)
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    for dtype in dtypes:
        for hf_experts in args.hf_experts.split(","):
            steps = make_steps(args, dtype, hf_experts)
            times: dict[str, list[float]] = {k: [] for k in steps}
            for i in range(args.warmup + args.iters):
                for name, fn in steps.items():  # alternate: both see the same machine load
                    dt = fn()
                    if i >= args.warmup:
                        times[name].append(dt)
            med = {k: statistics.median(v) for k, v in times.items()}
            names = list(med)
            ratio = med[names[1]] / med[names[0]]
            peak = matmul_peak(torch.bfloat16 if dtype == "bfloat16" else torch.float32)  # same run, same load
            row = {"dtype": dtype, **{f"{k} tok/s": round(tokens / v) for k, v in med.items()},
                   "speedup": round(ratio, 2), "matmul peak GFLOP/s": round(peak),
                   **{f"{k} % of peak": round(100 * flops / v / 1e9 / peak) for k, v in med.items()}}
            print(json.dumps(row))
            if args.profile:
                for name, fn in steps.items():
                    print(json.dumps({"dtype": dtype, "profile": name, "ms per step": top_ops(fn, args.profile)}))


if __name__ == "__main__":
    main()
