"""Bits per byte of the int4 model as native batch-1 decoding computes it, with float32 activations
(exact) and with activations rounded to int8 per block of 32 (`int4_activations="int8"`, the default,
as llama.cpp's Q4_0 x Q8_0 dot products do): does the faster rounding cost prediction quality?
Scored like benchmarks/bpb.py (`mixlab.eval.perplexity`: disjoint windows, each token once, bytes
from the original text) on the same sample, but every window is fed token by token through the
native decoder (`model.native_decoder.step`) instead of one forward pass; the float32 (unquantised)
and PyTorch int4 forward passes are scored alongside for reference.

    python benchmarks/int4_decode_bpb.py --model /work/runs/corpus-moe-train --data ../shared/corpus \\
        --max-docs 1 --max-bytes 2048
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import nn

from mixlab.cache import KVCache
from mixlab.model import Transformer


class NativeDecodeModel(nn.Module):
    """Enough of a mixlab model for `mixlab.eval.perplexity`: the logits of each row, one native
    decoding step per token (a fresh cache per row)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        if model.native_decoder is None:
            raise SystemExit("native decoding unavailable here (no AVX-512 or no C compiler)")
        self.model, self.config = model, model.config
        self._p = nn.Parameter(torch.zeros(1), requires_grad=False)  # device lookup

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        dec = self.model.native_decoder
        assert dec is not None
        out = []
        for row in tokens_BT.tolist():
            cache = KVCache(self.config, batch_size=1, max_len=len(row), dtype=torch.float32)
            with torch.inference_mode():
                out.append(torch.cat([dec.step(t, i, cache) for i, t in enumerate(row)]))
        return torch.stack(out)


def main() -> int:
    from mixlab.eval.data import documents
    from mixlab.eval.perplexity import evaluate_texts
    from mixlab.model.inference import prepare_for_inference
    from mixlab.train.checkpoints import init_config, load_init
    from mixlab.train.data import ByteTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a checkpoint folder, training step folder or run folder")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="valid")
    ap.add_argument("--max-docs", type=int, default=None)
    ap.add_argument("--max-bytes", type=int, default=None, help="score only the first N characters of each document")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = init_config(args.model)
    base = load_init(args.model, cfg).float().eval()
    tok = ByteTokenizer()
    docs = [(d, t[: args.max_bytes] if args.max_bytes else t)
            for d, t in documents(args.data, split=args.split, max_docs=args.max_docs)]
    results: dict[str, dict] = {}

    def run(name: str, model: nn.Module) -> None:
        t0 = time.perf_counter()
        rep = evaluate_texts(model, lambda s: tok.encode(s), docs, prefix=1, context=args.context)  # type: ignore[arg-type]
        results[name] = rep.to_json()
        print(f"{name}: {rep.overall().metrics()['bits_per_byte']:.4f} bits/byte ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)

    def int4(mode: str) -> Transformer:
        return prepare_for_inference(copy.deepcopy(base), quant="int4", group=args.group, int4_activations=mode)

    run("float32", base)
    run("int4 forward", int4("float32"))
    run("int4 decode, float32 activations", NativeDecodeModel(int4("float32")))
    run("int4 decode, int8 activations", NativeDecodeModel(int4("int8")))
    domains = sorted(results["float32"]["domains"])
    print("| domain | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for dname in [*domains, "overall"]:
        cells = [(r["overall"] if dname == "overall" else r["domains"][dname])["bits_per_byte"]
                 for r in results.values()]
        print(f"| {dname} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
