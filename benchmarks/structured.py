"""What a structured output costs the engine: decode steps of B sequences under a JSON schema against the
same steps unconstrained, greedy and sampled (temperature 1, seeded), rounds interleaved, medians of the
steady steps (every sequence decoding). Then one constrained row's parts, timed alone: llguidance's
bitmask, the mask on the logits, the choice of the token, the token consumed.

The constrained rows write JSON strings (the schema's free text, at least 64 of them): the mask there
allows most of the vocabulary, and a greedy row's argmax mostly. Random weights, Mixtral's tokenizer (32,000 tokens).

    .venv/bin/python benchmarks/structured.py [--preset mini-moe] [--dtype bfloat16] [--batches 1,16]
        [--rounds 5] [--steps 24] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mixlab import load_tokenizer
from mixlab.cli import positive
from mixlab.config import get_preset
from mixlab.engine import Engine, SamplingParams, Structured
from mixlab.engine.sampling import Sampler, sample_row
from mixlab.engine.structured import Matcher, lltokenizer
from mixlab.model import Transformer

# minItems: no row completes its object (and leaves the batch) within the measured steps
SCHEMA = {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"}, "minItems": 64}},
          "required": ["notes"]}
MODES = {"plain greedy": (False, False), "json greedy": (True, False),
         "plain sampled": (False, True), "json sampled": (True, True)}


def _steps(engine: Engine, prompts: list[list[int]], structured: bool, sampled: bool, steps: int) -> list[float]:
    """Times of the steps in which every request decodes (after their prompts, before any ends)."""
    spec = Structured("json_schema", SCHEMA) if structured else None
    handles = [engine.submit(p, SamplingParams(max_tokens=steps + 4, structured=spec, ignore_eos=not structured,
                                               **({"temperature": 1.0, "seed": i} if sampled else {})))
               for i, p in enumerate(prompts)]
    times = []
    while engine.has_work():
        decoding = all(h.state == "decoding" for h in handles)
        t = time.perf_counter()
        engine.step()
        if decoding and all(h.state == "decoding" for h in handles):
            times.append(time.perf_counter() - t)
    for h in handles:
        h.result()
    return times


def _parts(model: Transformer, tok: object, reps: int = 200) -> dict[str, float]:
    """One constrained row inside a JSON string, its parts timed alone (medians, microseconds)."""
    V = model.config.vocab_size
    matcher = Matcher(Structured("json_schema", SCHEMA), tok, V)  # type: ignore[arg-type]
    for t in lltokenizer(tok).tokenize_str('{"notes":["'):  # type: ignore[arg-type]
        matcher.advance(t)
    a = lltokenizer(tok).tokenize_str("a")[0]  # type: ignore[arg-type]
    logits_1V = torch.randn(1, V)
    greedy = SamplingParams()
    sampler = Sampler(0.0, 0, 1.0, 0.0, 1.0)  # greedy

    def timed(f: Callable[[], object]) -> float:
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            out.append(time.perf_counter() - t)
        return statistics.median(out) * 1e6

    def step(f: Callable[[], object]) -> Callable[[], object]:  # after a token, as in a step (else it is cached)
        return lambda: (matcher.m.consume_token(a), f(), matcher.m.rollback(1))

    parts = {"advance + rollback": timed(step(lambda: None)), "compute_bitmask": timed(step(matcher.m.compute_bitmask)),
             "allowed ([V] bool)": timed(step(matcher.allowed)), "mask (allowed, torch.where)": timed(step(
                 lambda: matcher.mask(logits_1V)))}
    parts = {k: v - parts["advance + rollback"] if k != "advance + rollback" else v for k, v in parts.items()}
    return {**parts, "sample_row greedy": timed(lambda: sample_row(logits_1V, greedy, sampler, seen_1V=None,
                                                                   counts_1V=None, generator=None)),
            "argmax": timed(lambda: int(logits_1V.argmax()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mini-moe")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--batches", default="1,16", help="concurrent requests, comma-separated")
    ap.add_argument("--rounds", type=positive, default=5, help="rounds after a warm-up one, modes interleaved")
    ap.add_argument("--steps", type=positive, default=24, help="decode steps per request")
    ap.add_argument("--threads", type=positive, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer()
    model = Transformer(get_preset(args.preset).replace(vocab_size=tok.vocab_size))
    model.init_weights(seed=0)
    model = model.to(getattr(torch, args.dtype)).eval()
    print(f"{args.preset} ({args.dtype}), {args.threads} threads; one row's parts (us):",
          {k: round(v) for k, v in _parts(model, tok).items()})
    g = torch.Generator().manual_seed(0)
    for B in (int(b) for b in args.batches.split(",")):
        engine = Engine(model, tok, max_batch=B, max_seq_len=256)
        prompts = [tok.encode("Notes:") + torch.randint(3, tok.vocab_size, (8,), generator=g).tolist()
                   for _ in range(B)]
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(args.rounds + 1):  # round 0 warms up
            for mode, (structured, sampled) in MODES.items():
                t = _steps(engine, prompts, structured, sampled, args.steps)
                if r:
                    times[mode] += t
        med = {m: statistics.median(t) for m, t in times.items()}
        for kind in ("greedy", "sampled"):
            plain, json_ = med[f"plain {kind}"], med[f"json {kind}"]
            print(f"B={B:2d} {kind:7s}: step {json_ / plain:.3f}x the unconstrained one "
                  f"(+{(json_ - plain) * 1e3:.2f} ms a step, +{(json_ - plain) / B * 1e3:.2f} ms a token; "
                  f"{len(times[f'json {kind}'])} and {len(times[f'plain {kind}'])} steps)", flush=True)


if __name__ == "__main__":
    main()
