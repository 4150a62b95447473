"""Loading benchmark: `mixlab.load_model` vs transformers' `from_pretrained` on the `mini-moe`
checkpoint (bf16, sharded, transformers names, ~1.6 GB), each load in a fresh subprocess.

Reports per peer the median over runs of: load time (the call only, imports excluded), peak RSS
of the process (`ru_maxrss`, imports included) and peak RSS minus the RSS after imports (what the
load itself added). Files are read once before timing so both peers read from the page cache.

    .venv/bin/python benchmarks/load.py --runs 5

Targets (issue 2): mixlab's peak RSS <= 1.2x the checkpoint's size, load time <= 1.5x transformers'.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mixlab.cli import positive


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def child(peer: str, path: str) -> None:
    t0 = time.perf_counter()
    import torch

    if peer == "transformers":
        from transformers import AutoModelForCausalLM
    else:
        import mixlab
    t1 = time.perf_counter()
    base = rss_bytes()
    start = time.perf_counter()
    if peer == "transformers":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    else:
        model = mixlab.load_model(path, dtype="bfloat16")
    load_s = time.perf_counter() - start
    n = sum(p.numel() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"peer": peer, "import_s": t1 - t0, "load_s": load_s, "rss_after_import": base,
                      "peak_rss": peak, "rss_end": rss_bytes(), "params": n}))


def build(path: Path, shard_bytes: int) -> None:
    """A random bf16 mini-moe, written by mixlab with transformers' (legacy per-expert) names."""
    import torch

    import mixlab

    cfg = mixlab.get_preset("mini-moe")
    with torch.device("meta"):
        model = mixlab.Transformer(cfg)
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    mixlab.save_model(model, path, fmt="hf", max_shard_bytes=shard_bytes)


def run(peer: str, path: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", peer, str(path)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=positive, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="reuse/keep the checkpoint here (default: a temp dir)")
    ap.add_argument("--shard-mb", type=positive, default=500)
    ap.add_argument("--child", nargs=2, metavar=("PEER", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    import torch
    import transformers

    tmp = None
    path = args.dir
    if path is None:
        tmp = Path(tempfile.mkdtemp(prefix="mixlab-load-bench-"))
        path = tmp / "mini-moe"
    try:
        if not (path / "config.json").exists():
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                            f"import load; load.build(__import__('pathlib').Path({str(path)!r}), "
                            f"{args.shard_mb * 2**20})"], check=True)
            print(f"built {path} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        files = sorted(path.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in files)
        for f in files:  # warm the page cache for both peers
            with open(f, "rb") as fh:
                while fh.read(1 << 26):
                    pass
        results: dict[str, list[dict[str, float]]] = {"mixlab": [], "transformers": []}
        for i in range(args.runs):
            for peer in (("mixlab", "transformers") if i % 2 == 0 else ("transformers", "mixlab")):
                results[peer].append(run(peer, path))
                print(json.dumps(results[peer][-1]), file=sys.stderr)
        print(f"checkpoint: mini-moe bf16, {len(files)} shards, {size:,} bytes ({size / 2**30:.2f} GiB); "
              f"{args.runs} runs per peer, medians; torch {torch.__version__}, "
              f"transformers {transformers.__version__}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        print("| peer | load time (s) | peak RSS (GiB) | peak RSS / checkpoint | RSS added by the load (GiB) |")
        print("|---|---|---|---|---|")
        med = {p: {k: statistics.median(r[k] for r in rs) for k in ("load_s", "peak_rss", "rss_after_import")}
               for p, rs in results.items()}
        for p, m in med.items():
            print(f"| {p} | {m['load_s']:.2f} | {m['peak_rss'] / 2**30:.2f} | {m['peak_rss'] / size:.2f} | "
                  f"{(m['peak_rss'] - m['rss_after_import']) / 2**30:.2f} |")
        ratio = med["mixlab"]["load_s"] / med["transformers"]["load_s"]
        print(f"mixlab / transformers load time: {ratio:.2f} (target <= 1.5); "
              f"mixlab peak RSS / checkpoint: {med['mixlab']['peak_rss'] / size:.2f} (target <= 1.2)")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
