"""Batch-1 native decoding with the barrier's spin limit (decode.c's MX_SPIN_LOG2) set to several
values, interleaved in one process: how long a waiting thread spins before it yields its core.

    .venv/bin/python benchmarks/barrier_spin.py --values 16,10,6 --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mixlab.cache import KVCache
from mixlab.cli import positive
from mixlab.cli.bench import ints
from mixlab.config import MoEConfig, get_preset
from mixlab.generate import prefill
from mixlab.model import Transformer
from mixlab.model.inference import prepare_for_inference
from mixlab.model.native import NativeDecoder
from mixlab.ops import native


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--values", type=ints, default=(16, 10, 6))
    p.add_argument("--rounds", type=positive, default=7)
    p.add_argument("--steps", type=positive, default=32)
    p.add_argument("--threads", type=positive, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_preset("tiny-moe").replace(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64,
                                         ffn_dim=1024, max_seq_len=512, moe=MoEConfig(num_experts=8, top_k=2))
    torch.manual_seed(0)
    model = Transformer(cfg).to(torch.bfloat16)
    model.init_weights(seed=0)
    model = prepare_for_inference(model.eval())
    cc = native.compiler()
    assert cc is not None
    tmp = Path(tempfile.mkdtemp(prefix="mixlab-spin-"))
    decoders = {}
    for v in args.values:
        path = native.compile_library(cc, tmp / f"spin{v}.so", defines=(f"MX_SPIN_LOG2={v}",))
        decoders[v] = NativeDecoder(model, native.load_library(path)[0])
    res: dict[int, list[float]] = {v: [] for v in decoders}
    loads = []
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for v, dec in decoders.items():
            cache = KVCache(cfg, batch_size=1, max_len=64 + args.steps, dtype=torch.bfloat16)
            with torch.inference_mode():
                prefill(model, torch.randint(3, 1000, (1, 64)), torch.arange(64)[None], cache, chunk=512)
                t = time.perf_counter()
                for i in range(args.steps):
                    dec.step(5, 64 + i, cache)
                res[v].append(args.steps / (time.perf_counter() - t))
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds interleaved; load average "
          f"(1 min) per round: {', '.join(f'{x:.1f}' for x in loads)}")
    print("| MX_SPIN_LOG2 | decode B=1 tokens/s (median) | per round |")
    print("|---:|---:|---|")
    for v, r in res.items():
        print(f"| {v} | {statistics.median(r):.1f} | {', '.join(f'{x:.1f}' for x in r)} |")


if __name__ == "__main__":
    main()
