"""GGUF dequantisation speed: MB of file a second per ggml type, the `gguf` package's numpy
`quants.dequantize` (what a GGUF load ran before) against mixlab's torch code (`gguf_dequant`).

Each type: `--mb` MB of random blocks (finite float16 scales, as a quantiser writes them) converted
the way `_Reader.floats_into` converts a tensor: `CHUNK` bytes of float32 at a time, copied into
their place (one chunk-sized buffer here, so that the measure is the conversion and not the page
faults of a fresh weight, the same for both). Old and new run back to back in each round; the median
of `--rounds` rounds is reported. torch runs on `--threads` threads; numpy's is one thread whatever
the setting. Both outputs are checked equal first.

    .venv/bin/python benchmarks/gguf_dequant.py --mb 200 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from mixlab.checkpoint import gguf_dequant
from mixlab.checkpoint.gguf_read import CHUNK
from mixlab.cli import positive

F16_AT = {"Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2),
          "Q5_K": (0, 2), "Q6_K": (208,)}  # where each block's float16 scales are


def blocks(ttype: int, mb: float, rng: np.random.Generator) -> np.ndarray:
    name, _, size = gguf_dequant.BLOCKS[ttype]
    raw = rng.integers(0, 256, (int(mb * 1e6) // size, size), dtype=np.uint8)
    for at in F16_AT[name]:
        raw[:, at : at + 2] = (rng.random((len(raw), 1), dtype=np.float32) / 64).astype(np.float16).view(np.uint8)
    return raw


def run(raw: np.ndarray, ttype: int, convert: Callable[[np.ndarray], torch.Tensor]) -> float:
    """Seconds to convert all of `raw` a chunk at a time into a float32 chunk buffer."""
    _, block, size = gguf_dequant.BLOCKS[ttype]
    per = max(1, CHUNK // (4 * block))  # blocks a chunk
    out = torch.empty(per * block)
    t0 = time.perf_counter()
    for lo in range(0, len(raw), per):
        x = convert(raw[lo : lo + per])
        out[: x.numel()].copy_(x)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=200.0, help="MB of blocks per type")
    p.add_argument("--rounds", type=positive, default=3)
    p.add_argument("--threads", type=positive, default=2)
    p.add_argument("--types", default=",".join(n for n, _, _ in gguf_dequant.BLOCKS.values()))
    args = p.parse_args()
    import gguf

    torch.set_num_threads(args.threads)
    ids = {n: t for t, (n, _, _) in gguf_dequant.BLOCKS.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.mb:g} MB a type, "
          f"median of {args.rounds}")
    print(f"{'type':6} {'numpy MB/s':>11} {'torch MB/s':>11} {'x':>6}")
    for name in args.types.split(","):
        ttype = ids[name]
        raw = blocks(ttype, args.mb, np.random.default_rng(ttype))
        qtype = gguf.GGMLQuantizationType(ttype)

        def old(b: np.ndarray, q: gguf.GGMLQuantizationType = qtype) -> torch.Tensor:
            return torch.from_numpy(gguf.quants.dequantize(b, q).reshape(-1))

        def new(b: np.ndarray, t: int = ttype) -> torch.Tensor:
            return gguf_dequant.dequantize(torch.from_numpy(b), t)

        sample = raw[:512]
        assert torch.equal(old(sample), new(sample)), name
        times: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.rounds):
            times["old"].append(run(raw, ttype, old))
            times["new"].append(run(raw, ttype, new))
        o, n = (raw.nbytes / 1e6 / statistics.median(times[k]) for k in ("old", "new"))
        print(f"{name:6} {o:11.1f} {n:11.1f} {n / o:6.1f}", flush=True)


if __name__ == "__main__":
    main()
