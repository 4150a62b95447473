"""Prefill at Mixtral's own widths: mixlab against llama.cpp on the same bf16 weights.

`mixlab bench --preset mixtral-8x7b --layers 1` compares decoding at Mixtral's widths, but a one-layer
model's prefill runs its only layer (the last) for the last position alone, and two layers with bench's
copies (mixlab's prepared copy, int8 and int4) and three GGUF files do not fit a 24 GB machine. Here:
the first `--layers` (default 2) layers of Mixtral 8x7B with random bf16 weights, one copy that mixlab
prepares in place (as `mixlab generate` runs a bf16 model) and one bf16 GGUF that llama.cpp maps: ~13 GB
at 2 layers. A prompt of P tokens is prefilled to the last position's logits (batch 1, peers interleaved,
median of `--reps`), by mixlab two ways: `mixlab.generate(model, [prompt], max_new_tokens=1)`, the engine that
`mixlab generate`, `chat` and `serve` run (native steps of up to 512 prompt tokens), and the model's own
forward pass (`model.forward_output` with a KV cache: PyTorch's operators, what `mixlab bench`'s prefill
rows time). Every layer but the last runs its experts for all P positions; the last layer's
experts and the output matrix run for the last position only, in both decoders, and the limit (the bf16
matmul peak measured in the same run) counts exactly that work.

`--quant int4`: mixlab's int4 (groups of 32, activations rounded to int8) against llama.cpp's Q4_0 made
from the bf16 file by its own quantiser (every matrix Q4_0); `--quant int8`: mixlab's int8 against the
Q8_0 file mixlab writes (`--quant int8-act8`: with `int8_activations="int8"`). The limit stays the bf16
matmul peak (the work, not its arithmetic).

    .venv/bin/python benchmarks/width_prefill.py --layers 2 --prompts 128 512 --reps 5
    .venv/bin/python benchmarks/width_prefill.py --layers 2 --prompts 128 512 --reps 5 --quant int4
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
from pathlib import Path

import torch

import mixlab
from mixlab.checkpoint.gguf import write_gguf
from mixlab.cli.benchmark import (
    LlamaCppPeer,
    MixlabPeer,
    Peer,
    _cpu_name,
    _interleaved,
    _versions,
    llama_quantize,
    measure_limits,
)
from mixlab.config import ModelConfig, get_preset
from mixlab.model import Transformer
from mixlab.model.inference import prepare_for_inference


def prefill_flops(cfg: ModelConfig, P: int) -> float:
    """Matmul FLOPs of prefilling P tokens to the last position's logits, as both decoders run it."""
    assert cfg.moe is not None
    D, F, E, K = cfg.dim, cfg.ffn_dim, cfg.moe.num_experts, cfg.moe.top_k
    attn = 2 * (D * (cfg.q_dim + 2 * cfg.kv_dim) + cfg.q_dim * D)  # per token and layer
    scores = 4 * (P / 2) * cfg.q_dim  # QK^T and PV over P/2 keys on average (causal)
    experts = K * 2 * 3 * D * F + 2 * D * E  # the chosen experts and the router
    return (P * cfg.n_layers * (attn + scores) + P * (cfg.n_layers - 1) * experts
            + experts + 2 * D * cfg.vocab_size)  # the last layer's experts and the output: one position


class EnginePeer(Peer):
    """A prompt through `mixlab.generate` to its first token: what mixlab's commands run."""

    def __init__(self, model: Transformer, name: str) -> None:
        self.model, self.name = model, name

    def prefill(self, tokens_BT: torch.Tensor) -> None:
        mixlab.generate(self.model, [tokens_BT[0].tolist()], max_new_tokens=1, stop_at_eos=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mixtral-8x7b", help="whose widths (default mixtral-8x7b)")
    ap.add_argument("--layers", type=int, default=2, help="the preset's first N layers (default 2)")
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 512], help="prompt lengths")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quant", choices=["bf16", "int8", "int8-act8", "int4"], default="bf16",
                    help="mixlab's weights, against llama.cpp's bf16 / Q8_0 / Q8_0 / Q4_0 file (default bf16; "
                         "int8-act8: int8 with int8_activations='int8')")
    ap.add_argument("--workdir", default=None, help="where the GGUF file is written (default: the temp folder)")
    args = ap.parse_args()
    try:
        preset = get_preset(args.preset)
    except (KeyError, ValueError) as e:
        ap.error(f"--preset {args.preset}: {e}")
    if not 2 <= args.layers <= preset.n_layers:
        ap.error(f"--layers must be 2 to {preset.n_layers} ({args.preset}'s layers), not {args.layers}: one layer is "
                 "its own last, run for the last position only")
    for flag, values in (("--prompts", args.prompts), ("--reps", [args.reps]), ("--threads", [args.threads])):
        if min(values) < 1:
            ap.error(f"{flag} must be at least 1, not {min(values)}")
    if args.workdir is not None and not Path(args.workdir).is_dir():
        ap.error(f"--workdir {args.workdir}: not a folder")
    if preset.moe is None:
        ap.error(f"--preset {args.preset} is dense: the benchmark needs an MoE preset")
    torch.set_num_threads(args.threads)
    cfg = preset.replace(n_layers=args.layers)
    print(f"cpu: {_cpu_name()}, {os.cpu_count()} logical CPUs; threads {args.threads}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("versions:", ", ".join(f"{k} {v}" for k, v in _versions().items()))
    limits = measure_limits(reps=args.reps)
    print(f"bf16 matmul peak {limits['matmul'] / 1e9:.0f} GFLOP/s, memory {limits['bandwidth'] / 1e9:.1f} GB/s")
    print(f"building the first {args.layers} layers of {args.preset} ({cfg.param_counts()['total'] / 1e6:,.0f}M "
          "parameters), random bf16 weights ...", flush=True)
    with torch.device("meta"):
        model = Transformer(cfg).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    model.init_weights(seed=args.seed)
    model.eval()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="mixlab-width-") as tmp:
        path = write_gguf(model, Path(tmp) / "m-bf16.gguf", quant="bf16")
        if args.quant.startswith("int8"):
            path.unlink()
            path = write_gguf(model, Path(tmp) / "m-q8_0.gguf", quant="q8_0")
        elif args.quant == "int4":  # every matrix Q4_0, as mixlab's int4 holds it
            path = llama_quantize(path, Path(tmp) / "m-q4_0.gguf", "Q4_0", threads=args.threads, pure=True)
        theirs = {"bf16": "llama.cpp-bf16", "int4": "llama.cpp-q4_0"}.get(args.quant, "llama.cpp-q8_0")
        quant = None if args.quant == "bf16" else args.quant[:4]
        prepared = prepare_for_inference(model, quant=quant,
                                         int8_activations="int8" if args.quant == "int8-act8" else None)
        peers: list[Peer] = [EnginePeer(prepared, f"mixlab-{args.quant} (engine)"),
                             MixlabPeer(prepared, f"mixlab-{args.quant} (forward pass)"),
                             LlamaCppPeer(path, theirs, args.threads, max(args.prompts) + 16, 2.0)]
        g = torch.Generator().manual_seed(args.seed)
        print("\n| P | peer | tokens/s | seconds | of the matmul peak |\n|---:|---|---:|---:|---:|")
        try:
            for P in args.prompts:
                tokens = torch.randint(3, cfg.vocab_size, (1, P), generator=g)
                times = _interleaved({p.name: functools.partial(p.prefill, tokens) for p in peers}, args.reps)
                best = prefill_flops(cfg, P) / limits["matmul"]
                for p in peers:
                    t = times[p.name]
                    print(f"| {P} | {p.name} | {P / t:,.0f} | {t:.3f} | {best / t:.0%} |", flush=True)
                for p in peers[:2]:
                    print(f"| {P} | **{p.name} / llama.cpp** | **{times[theirs] / times[p.name]:.2f}x** | | |",
                          flush=True)
        finally:
            peers[2].close()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
