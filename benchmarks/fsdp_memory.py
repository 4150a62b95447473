"""Per-process memory of `mixlab train --fsdp` steps on 2 CPU processes (gloo), for FSDP's mixed
precision (docs/scaling.md, "Mixed precision under `--fsdp`") and the optimizer step: what the first
forward leaves held for the backward, the first forward + backward's peak, the first optimizer
step's peak (AdamW's states made) and the final checkpoint's, each above the process's resident
memory once the sharded model and its optimizer exist. `--single`: the same run in one process
without FSDP (what a step costs without sharding).

    PYTHONPATH=src python benchmarks/fsdp_memory.py [--dtype bfloat16] [--dim 1024] [--layers 4]
        [--ffn 2048] [--experts 8] [--steps 2] [--single]

Starts itself under torchrun (2 processes, loopback; `--single`: one process) and prints one line
per process. Peaks are /proc/self/status's VmHWM, reset (/proc/self/clear_refs 5) when
`make_optimizer` returns and as the first `optimizer.step` and the checkpoint begin: Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def _resident() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(ln.split()[1]) * 1024 for ln in status if ln.startswith("VmHWM:"))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # the peak := what the process holds now


def _process(cfg_file: str, dtype: str, out: str, single: str) -> None:
    """One of the processes: `train` under --fsdp (or alone), measured."""
    import torch

    from mixlab.train import checkpoints, loop

    at: dict[str, int] = {}
    make, backward = loop.make_optimizer, torch.Tensor.backward

    def made(model: Any, cfg: Any) -> Any:
        opt = make(model, cfg)
        _reset_peak()
        at["setup"] = _resident()
        step = opt.step

        def first_step(*a: Any, **k: Any) -> Any:
            if "step" in at:
                return step(*a, **k)
            at.setdefault("forward_backward", _peak())
            _reset_peak()
            try:
                return step(*a, **k)
            finally:
                at["step"] = _peak()

        opt.step = first_step
        return opt

    def noted(self: torch.Tensor, *a: Any, **k: Any) -> Any:
        at.setdefault("held", _resident())  # what the first forward left for its backward
        return backward(self, *a, **k)

    def measured(save: Any) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            _reset_peak()
            at["checkpoint_start"] = _resident()
            try:
                return save(*a, **k)
            finally:
                at["checkpoint"] = _peak()
        return run

    loop.make_optimizer = made  # type: ignore[assignment]  # this process trains nothing else
    torch.Tensor.backward = noted  # type: ignore[method-assign]
    cfg = loop.load_train_config(cfg_file, out=out, dtype=dtype)
    if single == "1":
        checkpoints.save = measured(checkpoints.save)  # type: ignore[assignment]
        loop.train(cfg)
        who = "one process, no FSDP"
    else:
        from mixlab.parallel.mesh import init, shutdown
        from mixlab.parallel.train import DistributedTraining

        par = DistributedTraining(init(ep=1, fsdp=True))
        par.save = measured(par.save)  # type: ignore[method-assign]
        try:
            loop.train(cfg, parallel=par)
        finally:
            shutdown()
        who = f"rank {os.environ['RANK']}"
    mb = {k: (v - at["setup"]) / 1e6 for k, v in at.items()}
    print(f"{who} --dtype {dtype}: held at the first backward {mb['held']:.0f} MB, first forward + backward's "
          f"peak {mb['forward_backward']:.0f} MB, first optimizer step's peak {mb['step']:.0f} MB, final "
          f"checkpoint's peak {mb['checkpoint']:.0f} MB ({mb['checkpoint_start']:.0f} MB as it began), above the "
          f"{at['setup'] / 1e6:.0f} MB of the set-up process", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--single", action="store_true", help="one process without FSDP, for comparison")
    a = ap.parse_args()

    from mixlab.train.data import prepare, read_documents

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "src" / "code"
        src.mkdir(parents=True)
        rows = (json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 8}) + "\n" for i in range(40))
        (src / "train.jsonl").write_text("".join(rows))
        prepare(read_documents([src.parent]), root / "ds", valid_fraction=0.1)
        cfg = {"data": str(root / "ds"), "model_overrides": {
            "dim": a.dim, "n_layers": a.layers, "n_heads": 8, "n_kv_heads": 2, "head_dim": a.dim // 8,
            "ffn_dim": a.ffn, "moe": {"num_experts": a.experts, "top_k": 2}}, "seq_len": 32, "batch_size": 2,
            "steps": a.steps, "warmup": 1, "eval_every": 0, "ckpt_every": 0, "export_hf": False, "threads": 1,
            "progress": False}
        (root / "cfg.json").write_text(json.dumps(cfg))
        env = os.environ | {"OMP_NUM_THREADS": "1", "MIXLAB_FSDP_MEMORY": "1"}
        args = [__file__, str(root / "cfg.json"), a.dtype, str(root / "run"), str(int(a.single))]
        if a.single:
            subprocess.run([sys.executable, *args], env=env, check=True)
        else:
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            *args], env=env, check=True)


if __name__ == "__main__":
    if os.environ.get("MIXLAB_FSDP_MEMORY") == "1":  # a measured process (main set it)
        _process(*sys.argv[1:5])
    else:
        main()
