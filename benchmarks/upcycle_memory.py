"""Peak memory of `mixlab upcycle`: it streams layer by layer, so it should stay near one output
shard plus one layer, far below the size of the MoE it writes.

    .venv/bin/python benchmarks/upcycle_memory.py [--runs 3]

Writes a random dense Mistral-style checkpoint (the `mini-moe` preset made dense: width 1024,
8 layers, FFN 3584, vocabulary 32,000; bf16) once, then runs `mixlab upcycle --experts 8 --top-k 2`
in fresh subprocesses and reports the child's peak RSS (`ru_maxrss`) next to the sizes on disk.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mixlab import Transformer, get_preset, save_model
from mixlab.cli import positive


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir() if f.suffix == ".safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=positive, default=3)
    ap.add_argument("--max-shard-gb", type=float, default=0.25)
    args = ap.parse_args()
    cfg = get_preset("mini-moe").replace(moe=None)
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir, out = Path(tmp) / "dense", Path(tmp) / "moe"
        model = Transformer(cfg)
        model.init_weights(seed=0)
        save_model(model.to(torch.bfloat16), dense_dir, fmt="hf")
        del model
        # The peak is read in a small wrapper process: a child forked straight from this (large)
        # process would inherit its high-water mark (Linux carries ru_maxrss across fork + exec).
        code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
                "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")

        def peak_rss(cmd: list[str]) -> int:
            r = subprocess.run([sys.executable, "-c", code, *cmd], check=True, capture_output=True, text=True)
            return int(r.stdout.split()[-1]) * 1024

        peaks, times = [], []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            peaks.append(peak_rss([str(Path(sys.executable).parent / "mixlab"), "upcycle", "--from", str(dense_dir),
                                   "--out", str(out), "--experts", "8", "--top-k", "2",
                                   "--max-shard-gb", str(args.max_shard_gb)]))
            times.append(time.perf_counter() - t0)
        imports = peak_rss([sys.executable, "-c", "import mixlab.cli, mixlab.train.upcycle"])
        dense_b, moe_b = folder_bytes(dense_dir), folder_bytes(out)
        E, F_, D = 8, cfg.ffn_dim, cfg.dim
        layer_b = (E * 3 * F_ * D + E * D) * 2
        mib = 2**20
        print(f"dense checkpoint {dense_b / mib:,.0f} MiB -> MoE {moe_b / mib:,.0f} MiB "
              f"({len(list(out.glob('*.safetensors')))} shards of <= {args.max_shard_gb} GiB); one MoE layer "
              f"{layer_b / mib:,.0f} MiB")
        print(f"peak RSS (median of {args.runs}): {statistics.median(peaks) / mib:,.0f} MiB; after imports alone "
              f"{imports / mib:,.0f} MiB; added {(statistics.median(peaks) - imports) / mib:,.0f} MiB; "
              f"wall {statistics.median(times):.1f} s")


if __name__ == "__main__":
    main()
