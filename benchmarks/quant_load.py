"""Peak memory and time of loading a model as int4 or int8 (`--quant`): floats first, then
`prepare_for_inference(quant=)` (the two-step path `--quant int4` / `int8` took before), against
`load_model(path, quant=)`, which rounds each matrix as soon as it is read.

The model: Mixtral-wide layers (D 4096, F 14336, 8 experts, 32 heads, 8 KV heads, Mixtral's vocabulary
of 32,000), `--layers` of them (default 1: 1.7B parameters), with random weights, written once in
`--workdir` (tensor by tensor: at most one tensor in memory) as
- a transformers folder in bf16 (loaded as stored, bf16: the CLI's `--dtype auto` on a bf16 CPU), and
- a Q4_K_M GGUF made by llama.cpp's quantiser (llama-cpp-python's `llama_model_quantize`) from a bf16
  GGUF of the same weights (loaded in float32, the default dtype of a quantised GGUF).
Each load runs in a fresh process (`--threads` torch threads) with the file in the page cache; the
peak is VmHWM (ru_maxrss would start at this process's), minus what the process held after its imports.
The two ways alternate, `--rounds` times; the medians are reported.

    .venv/bin/python benchmarks/quant_load.py --layers 1 --rounds 3
    .venv/bin/python benchmarks/quant_load.py --layers 1 --rounds 3 --quant int8
    .venv/bin/python benchmarks/quant_load.py --layers 1 --quality   # the second rounding's cost

`--quality`: instead, how far from the original (bf16) weights each way's are: the Q4_K_M file as stored,
the Q4_K_M file rounded to int4 (what `quant="int4"` makes of it), the originals rounded to int4.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_LOAD = """
import json, sys, time, torch
from mixlab import load_model
from mixlab.model.inference import prepare_for_inference
def hwm():
    return next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:"))
torch.set_num_threads(int(sys.argv[3]))
base = hwm()
t0 = time.perf_counter()
if sys.argv[2] == "at-load":
    model = load_model(sys.argv[1], quant=sys.argv[4])
else:
    model = prepare_for_inference(load_model(sys.argv[1]), quant=sys.argv[4], decoder=False)
seconds = time.perf_counter() - t0
held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"seconds": seconds, "peak": hwm() - base, "model": held}))
"""


def mixtral_layers(layers: int):  # -> ModelConfig
    from mixlab.config import get_preset

    return get_preset("mixtral-8x7b").replace(n_layers=layers, max_seq_len=4096)


def write_folder(path: Path, layers: int) -> Path:
    """A bf16 transformers folder of random weights (N(0, 0.02)), one tensor at a time."""
    import torch

    from mixlab import save_model
    from mixlab.checkpoint import meta_model

    if (path / "config.json").is_file():
        return path
    model = meta_model(mixtral_layers(layers))
    shapes = {k: t.shape for k, t in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)

    def weight(name: str) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shapes[name], dtype=torch.bfloat16)
        return (torch.randn(shapes[name], generator=g) * 0.02).to(torch.bfloat16)

    save_model(model, path, dtype="bfloat16", weights=weight)
    return path


def write_q4_k_m(folder: Path, dst: Path) -> Path:
    """The folder's weights as a bf16 GGUF (`mixlab convert`), then Q4_K_M by llama.cpp's quantiser."""
    import ctypes

    import llama_cpp

    from mixlab.cli import main

    if dst.is_file():
        return dst
    bf16 = dst.with_name("bf16.gguf")
    assert main(["convert", str(folder), str(bf16), "--quant", "bf16", "--quiet"]) == 0
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(bf16).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    bf16.unlink()
    return dst


def warm(path: Path) -> None:
    """The files into the page cache (64 MB at a time), so that every load reads them from memory."""
    for f in [path] if path.is_file() else sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def load(path: Path, how: str, threads: int, quant: str) -> dict:
    warm(path)
    out = subprocess.run([sys.executable, "-c", _LOAD, str(path), how, str(threads), quant], capture_output=True,
                         text=True, check=False)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout)


def quality(folder: Path, gguf: Path) -> None:
    """How far each way's weights are from the originals (the folder's bf16): ||W' - W|| / ||W|| over
    every matrix int4 covers (each expert alone, one at a time), for the Q4_K_M file dequantised (what
    `load_model(gguf)` holds), the Q4_K_M file rounded to int4 (`quant="int4"`: a second rounding) and
    the originals rounded to int4."""
    import torch

    from mixlab import load_model
    from mixlab.checkpoint import gguf_read
    from mixlab.model.inference import quant_names
    from mixlab.ops.quant import dequantize_int4, quantize_int4

    model = load_model(folder)
    original, names = model.state_dict(), quant_names(model, "int4")
    h = gguf_read.read_header(gguf)
    cfg = gguf_read.config_from_header(h)
    plan = {name: (parts, kind) for name, parts, kind in gguf_read._plan(h, cfg)}
    sq = {"Q4_K_M": 0.0, "Q4_K_M -> int4": 0.0, "bf16 -> int4": 0.0}
    ref_sq = 0.0
    reader = gguf_read._Reader(h)

    def int4(w: torch.Tensor) -> torch.Tensor:
        return dequantize_int4(*quantize_int4(w, 32), torch.float32)

    try:
        for name in sorted(names):
            parts, kind = plan[name]
            pieces = ([([t.experts(e, e + 1) for t in parts], slice(e, e + 1)) for e in range(parts[0].shape[0])]
                      if kind == "experts" else [(parts, slice(None))])
            for ps, at in pieces:
                w = original[name][at].float()
                k = gguf_read._float_weight(reader, cfg, ps, kind, torch.float32)
                ref_sq += float(w.square().sum())
                for way, got in (("Q4_K_M", k), ("Q4_K_M -> int4", int4(k)), ("bf16 -> int4", int4(w))):
                    sq[way] += float((got - w).square().sum())
    finally:
        reader.close()
    for way, e in sq.items():
        print(f"relative weight error, {way}: {(e / ref_sq) ** 0.5:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quant", choices=["int4", "int8"], default="int4")
    ap.add_argument("--workdir", type=Path, default=Path("/work/runs/quant-load"))
    ap.add_argument("--quality", action="store_true", help="instead: the weights' rounding errors")
    args = ap.parse_args()
    from mixlab.checkpoint import meta_model

    work = args.workdir / f"mixtral-{args.layers}"
    folder = write_folder(work / "hf", args.layers)
    gguf = write_q4_k_m(folder, work / "q4_k_m.gguf")
    if args.quality:
        quality(folder, gguf)
        return
    params = sum(t.numel() for t in meta_model(mixtral_layers(args.layers)).parameters())
    print(f"{args.layers} Mixtral-wide layer(s), {params / 1e9:.2f}B parameters, {args.threads} threads, "
          f"{args.quant}")
    for name, path in (("transformers folder, bf16", folder), ("Q4_K_M GGUF (float32)", gguf)):
        runs: dict[str, list[dict]] = {"two-step": [], "at-load": []}
        for _ in range(args.rounds):
            for how in runs:
                runs[how].append(load(path, how, args.threads, args.quant))
        for how, rs in runs.items():
            peak = statistics.median(r["peak"] for r in rs) / 1e9
            secs = statistics.median(r["seconds"] for r in rs)
            peaks = ", ".join(f"{r['peak'] / 1e9:.2f}" for r in rs)
            times = ", ".join(f"{r['seconds']:.1f}" for r in rs)
            print(f"{name}: {how:8s} peak {peak:5.2f} GB ({peaks}), {secs:5.1f} s ({times}); the {args.quant} model "
                  f"{rs[0]['model'] / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
