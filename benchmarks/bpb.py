"""Bits per byte per domain of one model in bf16, int8 and int4 (mixlab) and in llama.cpp's Q8_0 and
Q4_0 (llama-cpp-python's logits), all scored by `mixlab.eval`'s code: disjoint windows, each token
predicted once, bytes counted from the original text (BENCHMARKS.md, "Quantisation: bits per byte").

    python benchmarks/bpb.py --model RUN_OR_CHECKPOINT --data ../shared/corpus --max-docs 8 --out bpb.json
    python benchmarks/bpb.py --model RUN_OR_CHECKPOINT --data ../shared/corpus --max-docs 1 --max-bytes 2048 \\
        --int4-decode --no-llama-cpp      # what int4 decoding's int8-rounded activations cost
    python benchmarks/bpb.py --model RUN_OR_CHECKPOINT --data ../shared/corpus --max-docs 3 \
        --int8-activations --no-llama-cpp # and int8's (`int8_activations="int8"`)

The model is the corpus-trained byte-level MoE (vocabulary 259). llama.cpp needs a vocabulary in the
GGUF file: a SentencePiece model of the byte tokenizer's 259 pieces (pad/unknown, BOS, EOS, 256
byte pieces) is written for it; ids are fed to llama.cpp directly, so its tokenizer is never used.
The F32 GGUF is written by mixlab and quantised by llama.cpp's own `llama_model_quantize` (default
parameters: llama.cpp picks the types of the embedding and output matrices itself).
"""

from __future__ import annotations

import argparse
import copy
import json
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from mixlab.atomic import OutputError, check_destination, write_text
from mixlab.cache import KVCache
from mixlab.model import Transformer


def _byte_spm(path: Path) -> Path:
    """A SentencePiece model of mixlab's byte tokenizer: 0 <unk> (pad), 1 <s>, 2 </s>, 3 + b = <0xBB>."""
    from mixlab.checkpoint.gguf_read import _field, _pb_bytes, _pb_int

    pieces = b""
    for i, (piece, kind) in enumerate([("<unk>", 2), ("<s>", 3), ("</s>", 3)] +
                                      [(f"<0x{b:02X}>", 6) for b in range(256)]):
        body = _pb_bytes(1, piece.encode()) + _field(2, 5, struct.pack("<f", -float(i))) + _pb_int(3, kind)
        pieces += _pb_bytes(1, body)
    trainer = _pb_int(3, 2) + _pb_int(4, 259) + _pb_int(35, 1) + _pb_int(40, 0) + _pb_int(41, 1) + _pb_int(42, 2)
    normalizer = _pb_bytes(1, b"identity") + _pb_int(3, 0) + _pb_int(4, 0) + _pb_int(5, 1)
    path.write_bytes(pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer))
    return path


class LogitsModel(nn.Module):
    """Enough of a mixlab model for `mixlab.eval.perplexity.score_batch`, over a `forward` that gives
    the logits of every position: `forward_output` hands them on as the "hidden states", and `output`
    (the head score_batch applies to the rows it scores) is the identity."""

    def forward_output(self, tokens_BT: torch.Tensor, logits: bool = False) -> SimpleNamespace:
        return SimpleNamespace(hidden_BTD=self(tokens_BT))

    def output(self, logits_RV: torch.Tensor) -> torch.Tensor:
        return logits_RV


class LlamaCppModel(LogitsModel):
    """Logits of a batch through llama.cpp."""

    def __init__(self, path: Path, config: object, threads: int) -> None:
        import llama_cpp

        super().__init__()
        self.config = config
        self._p = nn.Parameter(torch.zeros(1), requires_grad=False)  # device lookup
        self.llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=config.max_seq_len, n_batch=512,  # type: ignore[attr-defined]
                                   n_threads=threads, type_k=0, type_v=0, verbose=False)

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        out = []
        for row in tokens_BT.tolist():
            self.llm.reset()
            self.llm.eval(row)
            out.append(torch.from_numpy(np.array(self.llm.scores[: len(row)], dtype=np.float32)))
        return torch.stack(out)


class NativeDecodeModel(LogitsModel):
    """The logits of each row, one native decoding step per token (a fresh cache per row)."""

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


def llama_cpp_columns(base: nn.Module, cfg: object, threads: int, run: Callable[[str, nn.Module], None],
                      kquant: bool = False) -> None:
    """Score llama.cpp's Q8_0 and Q4_0 of `base`: mixlab's F32 GGUF quantised by llama.cpp's own
    `llama_model_quantize` (default parameters), logits through llama-cpp-python. `kquant`: also its
    Q4_K_M, and that file read by mixlab, dequantised (its exact values) and as `--quant int4` loads it
    (every matrix rounded a second time, to int4 in groups of 32)."""
    from mixlab.checkpoint import load_model
    from mixlab.checkpoint.gguf import write_gguf
    from mixlab.cli.benchmark import llama_quantize
    from mixlab.model.inference import prepare_for_inference

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        f32 = write_gguf(base, root / "m-f32.gguf", quant="f32", tokenizer=_byte_spm(root / "bytes.model"))
        for name in ("Q8_0", "Q4_0", *(("Q4_K_M",) if kquant else ())):
            out = llama_quantize(f32, root / f"m-{name}.gguf", name, threads=threads)
            run(f"llama.cpp {name}", LlamaCppModel(out, cfg, threads))
            if name == "Q4_K_M":
                run("mixlab Q4_K_M dequantised", load_model(out, dtype="float32"))
                run("mixlab Q4_K_M as int4", prepare_for_inference(load_model(out, dtype="float32", quant="int4"),
                                                                    quant="int4"))


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
    ap.add_argument("--context", type=int, default=256,
                    help="tokens per window (default 256: the corpus model was trained on 256-token windows)")
    ap.add_argument("--max-bytes", type=int, default=None,
                    help="score only the first N characters of each document (a quick, smaller sample)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--int4-decode", action="store_true",
                    help="also score int4 as native batch-1 decoding computes it, token by token, with float32 "
                         "activations (exact) and with activations rounded to int8 per 32 (the default, as "
                         "llama.cpp's Q4_0 x Q8_0 dot products): what the faster rounding costs")
    ap.add_argument("--int8-activations", action="store_true",
                    help="also score int8 weights times activations rounded to int8 per 32 (`int8_activations="
                         "'int8'`, as llama.cpp's Q8_0 x Q8_0), through PyTorch's pass, which rounds each product's "
                         "input as the native steps do (tests/test_native.py): what that rounding costs int8")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp's Q8_0 and Q4_0 columns")
    ap.add_argument("--kquant", action="store_true",
                    help="also llama.cpp's Q4_K_M, and mixlab reading that file: dequantised, and as int4 "
                         "(`--quant int4`: rounded again; needs a model whose rows fit K-quant's 256-weight blocks)")
    args = ap.parse_args()
    if args.out:  # refused now, not after the run
        try:
            check_destination(args.out, kind="file")
        except OutputError as e:
            raise SystemExit(f"--out: {e}") from None
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

    run("float32", base)
    run("bf16", copy.deepcopy(base).to(torch.bfloat16))
    run("int8", prepare_for_inference(copy.deepcopy(base), quant="int8"))
    if args.int8_activations:
        run("int8, int8 activations", prepare_for_inference(copy.deepcopy(base), quant="int8", int8_activations="int8"))
    run("int4", prepare_for_inference(copy.deepcopy(base), quant="int4"))
    if args.int4_decode:
        for mode in ("float32", "int8"):
            run(f"int4 decode, {mode} activations",
                NativeDecodeModel(prepare_for_inference(copy.deepcopy(base), quant="int4", int4_activations=mode)))
    if not args.no_llama_cpp:
        llama_cpp_columns(base, cfg, args.threads, run, kquant=args.kquant)
    domains = sorted(results["float32"]["domains"])  # type: ignore[arg-type]
    print("| domain | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for dname in [*domains, "overall"]:
        cells = [(r["overall"] if dname == "overall" else r["domains"][dname])["bits_per_byte"]
                 for r in results.values()]
        print(f"| {dname} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    if args.out:
        write_text(args.out, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
