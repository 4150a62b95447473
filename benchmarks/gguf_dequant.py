"""GGUF dequantisation speed: MB of file a second per ggml type, the `gguf` package's numpy
`quants.dequantize` (what a GGUF load ran before) against mixlab's torch code (`gguf_dequant`).

Each type: `--mb` MB of random blocks (finite float16 scales, as a quantiser writes them) in rows of
`--row` values (Mixtral's width, 4096: gguf-py converts 16 rows per numpy call, so rows of one block
would slow it 16x), converted the way `_Reader.floats_into` converts a tensor: `CHUNK` bytes of
float32 at a time (whole rows), copied into their place (one chunk-sized buffer here, so that the
measure is the conversion and not the page faults of a fresh weight, the same for both). Old and new
run back to back in each round; the median of `--rounds` rounds is reported. torch runs on
`--threads` threads; numpy's is one thread whatever the setting. Both outputs are checked equal first.

    .venv/bin/python benchmarks/gguf_dequant.py --mb 200 --rounds 3 --threads 2

`--model DIR`: instead, a whole `load_model` of a Q4_K_M file (a random Mixtral-shaped MoE, width
1024, 8 experts, 4 layers, Mixtral's vocabulary: 0.17B parameters, quantised by llama-cpp-python's
`llama_model_quantize`; made once in DIR), the old way (gguf-py, as before `gguf_dequant`) and the new
back to back: seconds and MB of file a second.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

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


def run(raw: np.ndarray, ttype: int, convert: Callable[[np.ndarray], torch.Tensor], row: int) -> float:
    """Seconds to convert all of `raw` a chunk of whole rows of `row` values at a time into a float32
    chunk buffer."""
    _, block, size = gguf_dequant.BLOCKS[ttype]
    raw = raw[: len(raw) // (row // block) * (row // block)].reshape(-1, row // block * size)
    per = max(1, CHUNK // (4 * row))  # rows a chunk
    out = torch.empty(per * row)
    t0 = time.perf_counter()
    for lo in range(0, len(raw), per):
        x = convert(raw[lo : lo + per])
        out[: x.numel()].copy_(x)
    return time.perf_counter() - t0


def q4_k_m_file(folder: Path) -> Path:
    """The `--model` file, made once."""
    import ctypes

    import llama_cpp

    from mixlab.checkpoint.gguf import write_gguf
    from mixlab.config import MoEConfig, get_preset
    from mixlab.model import Transformer

    dst = folder / "moe-q4_k_m.gguf"
    if dst.exists():
        return dst
    folder.mkdir(parents=True, exist_ok=True)
    cfg = get_preset("tiny-moe").replace(vocab_size=32000, dim=1024, ffn_dim=1024, n_heads=8, n_kv_heads=2,
                                         head_dim=128, n_layers=4, sliding_window=None,
                                         moe=MoEConfig(num_experts=8, top_k=2))
    model = Transformer(cfg)
    model.init_weights(std=0.02, seed=0)
    src = write_gguf(model.eval(), folder / "moe-f32.gguf", quant="f32")
    del model
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    src.unlink()
    return dst


def whole_load(folder: Path, rounds: int) -> None:
    from unittest import mock

    from mixlab.checkpoint import gguf_read, load_model

    path = q4_k_m_file(folder)
    h = gguf_read.read_header(path)
    by: dict[str, int] = {}
    for t in h.tensors.values():
        by[t.type_name] = by.get(t.type_name, 0) + t.nbytes
    mb = path.stat().st_size / 1e6
    print(f"{path.name}: {mb:.0f} MB (" + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in sorted(by.items())) + ")")
    path.read_bytes()  # into the page cache for both
    times: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(rounds):
        for way in ("old", "new"):
            with mock.patch.object(gguf_read.gguf_dequant, "BLOCKS", {} if way == "old" else gguf_dequant.BLOCKS):
                t0 = time.perf_counter()
                model = load_model(path)
                times[way].append(time.perf_counter() - t0)
            del model
    for way, ts in times.items():
        s = statistics.median(ts)
        print(f"load_model, {way} ({'gguf-py' if way == 'old' else 'gguf_dequant'}): {s:.2f} s "
              f"({', '.join(f'{t:.2f}' for t in ts)}), {mb / s:.0f} MB/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=200.0, help="MB of blocks per type")
    p.add_argument("--rounds", type=positive, default=3)
    p.add_argument("--threads", type=positive, default=2)
    p.add_argument("--row", type=positive, default=4096, help="values a row (a multiple of 256)")
    p.add_argument("--types", default=",".join(n for n, _, _ in gguf_dequant.BLOCKS.values()))
    p.add_argument("--model", type=Path, help="time load_model of a Q4_K_M file made once in this folder")
    args = p.parse_args()
    import gguf

    torch.set_num_threads(args.threads)
    if args.model:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.rounds}")
        return whole_load(args.model, args.rounds)
    ids = {n: t for t, (n, _, _) in gguf_dequant.BLOCKS.items()}
    if args.row % 256:
        p.error(f"--row {args.row}: not a multiple of 256 (whole K-quant blocks a row)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.mb:g} MB a type in rows of "
          f"{args.row}, median of {args.rounds}")
    print(f"{'type':6} {'numpy MB/s':>11} {'torch MB/s':>11} {'x':>6}")
    for name in args.types.split(","):
        ttype = ids[name]
        block = gguf_dequant.BLOCKS[ttype][1]
        raw = blocks(ttype, args.mb, np.random.default_rng(ttype))
        qtype = gguf.GGMLQuantizationType(ttype)

        def old(b: np.ndarray, q: gguf.GGMLQuantizationType = qtype) -> torch.Tensor:
            return torch.from_numpy(gguf.quants.dequantize(b, q).reshape(-1))

        def new(b: np.ndarray, t: int = ttype) -> torch.Tensor:
            return gguf_dequant.dequantize(torch.from_numpy(b), t)

        sample = raw[:512].reshape(-1, args.row // block * raw.shape[1])
        assert torch.equal(old(sample), new(sample)), name
        times: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.rounds):
            times["old"].append(run(raw, ttype, old, args.row))
            times["new"].append(run(raw, ttype, new, args.row))
        o, n = (raw.nbytes / 1e6 / statistics.median(times[k]) for k in ("old", "new"))
        print(f"{name:6} {o:11.1f} {n:11.1f} {n / o:6.1f}", flush=True)


if __name__ == "__main__":
    main()
