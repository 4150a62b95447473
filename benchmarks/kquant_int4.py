"""K-quant GGUF weights read into int4: the native conversions (decode.c `mx_dequantize`,
`mx_quantize_q4`) against the PyTorch code they replace (the same bytes; `MIXLAB_NATIVE=0` in-process
for the "torch" runs), torch and native back to back in each round.

- One expert (layer 0, expert 0; the page cache holds its bytes after the first round) converted as
  the offloaded read converted it before: gate / up / down dequantised to bf16 in fresh tensors
  ("dequantise"), then `quantize_int4` of w13 and w2 ("int4"); and read into an int4 slot (groups of
  32) as `GGUFSource.read` reads it now (chunks of rows, a buffer kept per thread).
- `--layers N`: the first N layers' expert weights read as `load_model(FILE, quant="int4")` reads them
  (`gguf_read._quantised_experts`: one expert's floats at a time in the file's float dtype, float32 for
  a quantised file, rounded to int4): MB of file a second (`--cold`: the file's pages dropped first).
- `--model FILE`: a whole `load_model(FILE, quant="int4")` (a small Q4_K_M file: a 26 GB Mixtral's int4
  model does not fit a 24 GB machine): seconds and MB of file a second.

    python benchmarks/full_size.py --ftype q4_k --keep ...   # writes the file once
    python benchmarks/kquant_int4.py --file /work/runs/full-size/random-mixtral-8x7b-q4_k.gguf --layers 2 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from mixlab.cli import positive
from mixlab.ops import native


def _mode(name: str) -> None:
    if name == "torch":
        os.environ["MIXLAB_NATIVE"] = "0"
    else:
        os.environ.pop("MIXLAB_NATIVE", None)
        assert native.load() is not None, "native kernels unavailable"


def expert_read(path: Path) -> dict[str, float]:
    """One expert (layer 0, expert 0) as `GGUFSource.read` converts it, timed by step."""
    from mixlab.checkpoint.gguf_read import _Reader, config_from_header, read_header
    from mixlab.checkpoint.offload import GGUFSource
    from mixlab.ops.offload import Slot, SlotFormat
    from mixlab.ops.quant import quantize_int4

    h = read_header(path)
    cfg = config_from_header(h)
    src = GGUFSource(h, cfg)
    try:
        reader = _Reader.__new__(_Reader)
        reader.h, reader.fds = src.h, src.files.fds
        gate, up, down = (t.experts(0, 1) for t in src.layers[0])
        F, D = cfg.ffn_dim, cfg.dim
        t0 = time.perf_counter()
        w13 = torch.empty(2 * F, D, dtype=torch.bfloat16)
        reader.floats_into(gate, w13[:F])
        reader.floats_into(up, w13[F:])
        w2 = reader.floats(down, torch.bfloat16)[0]
        t1 = time.perf_counter()
        quantize_int4(w13, 32)
        quantize_int4(w2, 32)
        t2 = time.perf_counter()
        fmt = SlotFormat("int4", torch.bfloat16, 32)
        slot = Slot(*(torch.zeros(s, dtype=d) for s, d in fmt.shapes(D, F).values()))
        t3 = time.perf_counter()
        src.read(0, 0, fmt, slot)
        t4 = time.perf_counter()
    finally:
        src.close()
    return {"dequantise": t1 - t0, "int4": t2 - t1, "total": t2 - t0, "GGUFSource.read": t4 - t3}


def layers_read(path: Path, n: int) -> tuple[float, int]:
    """Seconds and file bytes of the first `n` layers' experts read as load_gguf(quant="int4") reads them
    (`_quantised_experts`: one expert's floats at a time, rounded to int4)."""
    from mixlab.checkpoint.gguf_read import (
        _default_dtype,
        _plan,
        _quantised_experts,
        _Reader,
        config_from_header,
        read_header,
    )

    h = read_header(path)
    cfg = config_from_header(h)
    want = _default_dtype(h)
    todo = [parts for name, parts, kind in _plan(h, cfg) if kind == "experts" and int(name.split(".")[1]) < n]
    reader = _Reader(h)
    try:
        t0 = time.perf_counter()
        for parts in todo:
            _quantised_experts(reader, cfg, parts, want, "int4", 32)
        return time.perf_counter() - t0, sum(t.nbytes for parts in todo for t in parts)
    finally:
        reader.close()


def whole_load(path: Path) -> float:
    from mixlab.checkpoint import load_model

    t0 = time.perf_counter()
    load_model(path, quant="int4")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", type=Path, help="a GGUF file whose experts are K-quants (full_size.py --ftype q4_k)")
    p.add_argument("--layers", type=int, default=0, help="also time the first N layers' experts read as int4")
    p.add_argument("--model", type=Path, help="also time a whole load_model(MODEL, quant='int4')")
    p.add_argument("--cold", action="store_true", help="drop the file from the page cache before each --layers read")
    p.add_argument("--rounds", type=positive, default=3)
    p.add_argument("--threads", type=positive, default=2)
    a = p.parse_args()
    if a.file is None and a.model is None:
        p.error("give --file and/or --model")
    for given in (a.file, a.model):
        if given is not None and not given.is_file():
            p.error(f"no GGUF file {given}")
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads")
    if a.file is not None:
        runs: dict[str, list[dict[str, float]]] = {"torch": [], "native": []}
        for _ in range(a.rounds):
            for mode in runs:
                _mode(mode)
                runs[mode].append(expert_read(a.file))
        for mode, rs in runs.items():
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            print(f"one expert, {mode}: " + ", ".join(f"{k} {v:.3f} s" for k, v in med.items())
                  + "  (totals " + ", ".join(f"{r['total']:.3f}" for r in rs) + ")")
        for mode in ("torch", "native") if a.layers else ():
            _mode(mode)
            if a.cold:  # as full_size.py starts cold: the file's pages dropped (clean pages: no write-back)
                fd = os.open(a.file, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            s, nbytes = layers_read(a.file, a.layers)
            print(f"{a.layers} layers' experts as int4, {mode}: {s:.1f} s, {nbytes / 1e6 / s:.0f} MB of file/s "
                  f"(the whole file at this rate: {a.file.stat().st_size / (nbytes / s) / 60:.1f} min)")
    if a.model is not None:
        for mode in ("torch", "native"):
            times = []
            for _ in range(a.rounds):
                _mode(mode)
                times.append(whole_load(a.model))
            s = statistics.median(times)
            print(f"load_model(quant='int4') of {a.model.name}, {mode}: {s:.2f} s "
                  f"({a.model.stat().st_size / 1e6 / s:.0f} MB of file/s; {', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
