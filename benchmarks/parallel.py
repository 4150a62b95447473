"""Step time and the share of it spent in collectives, training on 2 CPU processes (gloo) with
expert parallelism, FSDP2 or both, against one process on the same global batch.

    PYTHONPATH=src python benchmarks/parallel.py [--steps 12] [--dim 256] [--layers 4] [--experts 8]

Each layout runs the training step of `mixlab.train.loop` (forward, router losses, backward,
`DistributedTraining.sync_grads` / `clip_grad_norm`, fused AdamW) with the global batch split over
the processes. Communication time = the CPU time torch.profiler records in the collectives
(all_to_all, all_reduce, reduce_scatter, all_gather, broadcast: gloo blocks the calling thread, so
this includes waiting for the slower process), as a share of the profiled steps' wall time.
Medians over the steps after two warm-up steps. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from mixlab.cli import positive

COMM = ("all_to_all", "allreduce", "all_reduce", "reduce_scatter", "allgather", "all_gather", "broadcast", "gloo:")


def _step_fn(model: Any, opt: Any, par: Any, x: torch.Tensor, y: torch.Tensor) -> None:
    from mixlab.train.losses import lm_loss, router_losses

    out = model.forward_output(x) if hasattr(model, "forward_output") else None
    if out is not None:
        logits, routings = out.logits_BTV, out.routing
    else:
        logits, routings = model(x, return_routing=True)
    aux, z = router_losses(routings, reduce=par.all_sum if par is not None else None)
    loss = lm_loss(logits, y) + 0.01 * aux + 0.001 * z
    loss.backward()
    if par is not None:
        par.sync_grads(model)
        par.clip_grad_norm(model, 1.0)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _run(rank: int, world: int, port: int, layout: dict[str, Any], a: dict[str, Any], out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(a["threads"])
    from mixlab.config import get_preset
    from mixlab.model import Transformer
    from mixlab.parallel.mesh import init, shutdown
    from mixlab.parallel.train import DistributedTraining
    from mixlab.train.loop import TrainConfig, make_optimizer

    cfg = get_preset("tiny-moe").replace(vocab_size=512, dim=a["dim"], n_layers=a["layers"], n_heads=4, n_kv_heads=2,
                                         head_dim=a["dim"] // 4, ffn_dim=2 * a["dim"], max_seq_len=a["seq"])
    assert cfg.moe is not None
    cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, num_experts=a["experts"], jitter=0.0))
    model = Transformer(cfg)
    model.init_weights(seed=0)
    par = None
    if world > 1 or layout["fsdp"]:
        par = DistributedTraining(init(ep=layout["ep"], fsdp=layout["fsdp"]))
        par.parallelize(model)
    opt = make_optimizer(model, TrainConfig())
    g = torch.Generator().manual_seed(0)
    B = a["batch"] // world
    times, comm = [], []
    for i in range(a["steps"]):
        x = torch.randint(0, 512, (a["batch"], a["seq"] + 1), generator=g)[rank * B:(rank + 1) * B]
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if i >= 2 else None
        t0 = time.perf_counter()
        if prof is not None:
            with prof:
                _step_fn(model, opt, par, x[:, :-1], x[:, 1:])
        else:
            _step_fn(model, opt, par, x[:, :-1], x[:, 1:])
        dt = time.perf_counter() - t0
        if prof is not None:
            times.append(dt)
            c = sum(e.cpu_time_total for e in prof.key_averages()
                    if any(k in e.key.lower() for k in COMM) and "record_param_comms" not in e.key) / 1e6
            comm.append(c)
    if rank == 0:
        Path(out).write_text(json.dumps({"step_s": statistics.median(times), "comm_s": statistics.median(comm)}))
    if par is not None:
        shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=positive, default=12)
    ap.add_argument("--dim", type=positive, default=256)
    ap.add_argument("--layers", type=positive, default=4)
    ap.add_argument("--experts", type=positive, default=8)
    ap.add_argument("--seq", type=positive, default=256)
    ap.add_argument("--batch", type=positive, default=8, help="global sequences per step")
    ap.add_argument("--threads", type=positive, default=1, help="torch threads per process")
    a = vars(ap.parse_args())
    if a["steps"] < 3:  # the first two are warm-up, not measured
        ap.error(f"--steps: expected at least 3 (two warm-up steps, then the measured ones), got {a['steps']}")
    if a["batch"] % 2:  # split over the 2 processes
        ap.error(f"--batch: expected an even number of sequences (split over 2 processes), got {a['batch']}")
    layouts = {"1 process": (1, {"ep": 1, "fsdp": False}), "EP=2": (2, {"ep": 2, "fsdp": False}),
               "FSDP=2": (2, {"ep": 1, "fsdp": True}), "EP=2 + FSDP": (2, {"ep": 2, "fsdp": True}),
               "DP=2 (replicated)": (2, {"ep": 1, "fsdp": False})}
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"dim {a['dim']}, {a['layers']} layers, {a['experts']} experts (top-2), seq {a['seq']}, "
          f"global batch {a['batch']}, {a['threads']} thread(s) per process", file=sys.stderr)
    print("| layout | step (s, median) | in collectives (s) | share communicating | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for name, (world, layout) in layouts.items():
        with tempfile.NamedTemporaryFile(suffix=".json") as f, socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            mp.start_processes(_run, args=(world, port, layout, a, f.name), nprocs=world, start_method="spawn")
            r = json.loads(Path(f.name).read_text())
        tok = a["batch"] * a["seq"] / r["step_s"]
        print(f"| {name} | {r['step_s']:.3f} | {r['comm_s']:.3f} | {r['comm_s'] / r['step_s']:.0%} | {tok:,.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
