"""The inference engine under load: continuous batching on a CPU.

Measured in one run, on one random model (`init_weights`), with the machine's limits measured in
the same run (`mixlab.cli.benchmark.measure_limits`; a bandwidth probe in every round of the decode
repetitions, since the bandwidth of a shared machine drifts):

1. Aggregate decode tokens/s with B = 1, 4, 16, 64 running sequences (128-token prompts, greedy,
   one engine step = one token for each), rounds interleaved across B, medians; each as a fraction
   of its limit: max(bytes the step reads / bandwidth, FLOPs / bf16 matmul peak), where the bytes
   are every dense weight once, the distinct experts the step's tokens chose (counted from the
   router) once, the output matrix and the KV cache read.
   Also batch 1 through today's prepared path (`prepare_for_inference` + `decode_step`, one native
   call per token) and through `mixlab.generate` on the unprepared model, interleaved with it.
2. Steady arrivals: requests with mixed prompt lengths arriving at a fixed interval; time to first
   token and inter-token latency, p50 and p99 (the engine is driven from this thread so every
   output is timestamped when its step ends).
3. A 2,000-token prompt arriving while 8 streams decode: their p99 inter-token latency during its
   prefill, over the same without it (chunked prefill under `--token-budget`).
4. (`--sections mixed`) One engine step, natively in one call (`torch.ops.mixlab.decode_batch`)
   against the engine's PyTorch pass over the same items, rounds interleaved, medians: decoding
   tokens next to prompt chunks at short and long positions, and prompt chunks alone (where the
   registry's NATIVE_MAX_STEP_TOKENS should sit). The slots hold random keys and values at their
   positions (the time does not depend on them).

Usage: .venv/bin/python benchmarks/engine.py [--preset mini-moe] [--dtype bfloat16] [--threads 2]
       [--batches 1,4,16,64] [--reps 5] [--steps 4] [--token-budget 32] [--prompt 128]
       [--requests 24] [--max-arrival-prompt 512] [--long-prompt 2000]
       [--sections decode,batch1,arrivals,long[,mixed]] [--mixed-steps native|torch|both] [--plot PNG]
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import platform
import statistics
import time
from collections.abc import Sequence

import torch

from mixlab.atomic import OutputError, atomic_file, check_destination
from mixlab.cache import KVCache
from mixlab.cli import positive
from mixlab.cli.benchmark import (
    _dense_bytes_per_layer,
    _expert_bytes,
    _matmul_flops_per_token,
    bandwidth_probe,
    measure_limits,
)
from mixlab.config import get_preset
from mixlab.dtypes import DTYPES
from mixlab.engine import Engine, SamplingParams
from mixlab.generate import decode_step, generate_stream
from mixlab.model import Transformer
from mixlab.model.inference import prepare_for_inference
from mixlab.model.native import shared_decoder

PROMPT = 128


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _model(preset: str, dtype: torch.dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(get_preset(preset))
    model = model.to_empty(device="cpu").to(dtype)
    model.init_weights(seed=0)
    return model.eval()


def _fill(engine: Engine, B: int, g: torch.Generator, max_tokens: int, prompt: int = PROMPT,
          adapters: Sequence[str | None] = (None,)) -> None:
    """B requests of `prompt` tokens prefilled and decoding, each with `max_tokens` left to decode
    after the last one's prompt is in (the early ones decode while the later ones prefill); request i
    under adapters[i % len(adapters)]."""
    V = engine.config.vocab_size
    head = B * prompt // engine.token_budget + B  # steps of prefill at most, each a token for the early ones
    for i in range(B):
        engine.submit(torch.randint(3, V, (prompt,), generator=g).tolist(),
                      SamplingParams(max_tokens=max_tokens + head, ignore_eos=True,
                                     adapter=adapters[i % len(adapters)]))
    while engine.stats()["waiting"] or any(s.prefilling for s in engine._running):
        engine.step()
    assert len(engine._running) == B, f"{len(engine._running)} of {B} sequences decoding after prefill"


def decode_section(model: Transformer, args: argparse.Namespace, limits: dict[str, float]) -> dict[int, float]:
    cfg = model.config
    assert cfg.moe is not None
    e = model.tok_embeddings.weight.element_size()
    g = torch.Generator().manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    total_steps = (args.reps + 1) * args.steps + 2
    engines = {}
    for B in batches:
        # a budget that prefills every prompt in one step, so all B start decoding together
        engines[B] = Engine(model, max_batch=B, max_seq_len=PROMPT + total_steps + 8 + B, token_budget=B * PROMPT + B)
        _fill(engines[B], B, g, total_steps + 4)
        dec = engines[B].runner._native_decoder()
        if dec is not None:
            dec.wait_huge_pages()  # not still collapsing the weights' pages while we measure
    experts: dict[int, list[float]] = {B: [] for B in batches}

    def run(B: int) -> None:
        for _ in range(args.steps):
            engines[B].step()
            counts = engines[B].runner.last_counts_LE
            assert counts is not None
            experts[B].append(float((counts > 0).sum(1).float().mean()))

    probe, probe_bytes = bandwidth_probe(reps=1, mib=256)
    fns = {f"B={B}": functools.partial(run, B) for B in batches} | {"bw": probe}
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    bws = [probe_bytes / t for t in times.pop("bw")]
    print(f"bandwidth per round (GB/s): {', '.join(f'{b / 1e9:.1f}' for b in bws)}")
    print("\n| sequences | step ms (median) | aggregate tok/s | × batch 1 | distinct experts/layer | "
          "limit ms | of limit |")
    print("|---|---|---|---|---|---|---|")
    rates = {}
    plotted: list[tuple[int, float, float, float]] = []  # (B, tok/s, limit tok/s, fraction of the limit)
    for B in batches:
        n_exp = statistics.mean(experts[B])
        ctx = PROMPT + total_steps / 2
        w_bytes = cfg.n_layers * (_dense_bytes_per_layer(cfg, e) + n_exp * _expert_bytes(cfg, e))
        w_bytes += cfg.vocab_size * cfg.dim * e  # the output matrix
        kv = B * ctx * cfg.kv_cache_bytes_per_token(e)
        flops = B * _matmul_flops_per_token(cfg, ctx)
        per_round = [(t / args.steps, max((w_bytes + kv) / bw, flops / limits["matmul"]))
                     for t, bw in zip(times[f"B={B}"], bws, strict=True)]
        step = statistics.median(t for t, _ in per_round)
        frac = statistics.median(lim / t for t, lim in per_round)
        rates[B] = B / step
        plotted.append((B, B / step, B / statistics.median(lim for _, lim in per_round), frac))
        print(f"| {B} | {step * 1e3:.1f} | {B / step:.2f} | {rates[B] / rates[batches[0]]:.2f} | {n_exp:.1f} | "
              f"{statistics.median(lim for _, lim in per_round) * 1e3:.1f} | {frac:.2f} |")
    for eng in engines.values():
        eng.shutdown()
    if args.plot:
        _plot_decode(plotted, statistics.median(bws), args)
    return rates


def _plot_decode(points: list[tuple[int, float, float, float]], bandwidth: float, args: argparse.Namespace) -> None:
    """Aggregate decode tokens/s against the number of sequences, with each batch's limit; atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bs = [b for b, *_ in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(bs, [r for _, r, _, _ in points], "o-", label="mixlab engine (label: fraction of the limit)")
    ax.plot(bs, [lim for _, _, lim, _ in points], "k--", label="limit (weights touched / bandwidth, or FLOPs / peak)")
    for b, r, _, frac in points:
        ax.annotate(f"{frac:.0%}", (b, r), textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(bs, [str(b) for b in bs])
    ax.set_xlabel("sequences decoding together")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title(f"{args.preset} {args.dtype}, {args.threads} threads, memory {bandwidth / 1e9:.0f} GB/s", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.margins(y=0.15)  # room for the lowest point's label
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(args.plot) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    print(f"wrote {args.plot}")


def batch1_section(model: Transformer, args: argparse.Namespace) -> None:
    """Engine batch 1 and `mixlab.generate` on an unprepared copy of the model against today's
    prepared path, all three in the same rounds (the machine's bandwidth drifts within a run)."""
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    n = args.steps * 4
    prompt = torch.randint(3, cfg.vocab_size, (PROMPT,), generator=g).tolist()
    plain = copy.deepcopy(model)  # stays unprepared: what `load_model` + `generate` runs

    def gen_unprepared() -> float:
        """Seconds for the n tokens after the first (the prefill's) through `generate_stream`."""
        t_first = 0.0
        for i, _ in enumerate(generate_stream(plain, [prompt], max_new_tokens=n + 1, stop_at_eos=False)):
            if i == 0:
                t_first = time.perf_counter()
        return time.perf_counter() - t_first

    # The first generate builds the unprepared model's decoder, whose weights' huge pages are
    # collapsed in the background (seconds): wait for that, or it steals a core from every round.
    gen_unprepared()
    dec = shared_decoder(plain)
    if dec is not None:
        dec.wait_huge_pages()
    # Today's prepared path: prepare_for_inference (in place: same weights) + decode_step.
    prepare_for_inference(model)
    cache = KVCache(cfg, batch_size=1, max_len=PROMPT + n * (args.reps + 2) + 4,
                    dtype=model.tok_embeddings.weight.dtype)
    eng = Engine(model, max_batch=1, max_seq_len=PROMPT + n * (args.reps + 2) + 8)
    _fill(eng, 1, g, n * (args.reps + 2))
    tok = torch.tensor([prompt])
    with torch.inference_mode():
        model(tok, cache=cache)
        pos = [PROMPT]

        def prepared() -> None:
            for _ in range(n):
                logits, _ = decode_step(model, tok[:, -1:], torch.tensor([[pos[0]]]), cache)
                logits.argmax(-1)
                pos[0] += 1

        def engine() -> None:
            for _ in range(n):
                eng.step()

        times: dict[str, list[float]] = {"prepared": [], "engine": [], "generate": []}
        for _ in range(args.reps):
            for k, fn in (("prepared", prepared), ("engine", engine)):
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
            times["generate"].append(gen_unprepared())
    prep = n / statistics.median(times["prepared"])
    engr = n / statistics.median(times["engine"])
    gen_decode = n / statistics.median(times["generate"])
    print("\n| batch-1 decode | tok/s | × prepared path |")
    print("|---|---|---|")
    print(f"| prepare_for_inference + decode_step (today's prepared path) | {prep:.2f} | 1.00 |")
    print(f"| engine, B=1 (prepared model) | {engr:.2f} | {engr / prep:.2f} |")
    print(f"| load_model + generate (an unprepared copy) | {gen_decode:.2f} | {gen_decode / prep:.2f} |")
    eng.shutdown()


def _mixed_steps(eng: Engine, how: str) -> str:
    """`how` = "torch": steps that carry a prompt chunk take the engine's PyTorch pass (as before the
    native mixed step), decoding-only steps stay native. Returns a label for the tables."""
    if how == "torch":
        run = eng.runner._native_batch
        eng.runner._native_batch = (  # type: ignore[method-assign]
            lambda items: None if any(len(it.tokens) > 1 for it in items) else run(items))
    return f"mixed steps: {how}"


def arrivals_section(model: Transformer, args: argparse.Namespace, interval: float, how: str = "native") -> None:
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    n_req = args.requests
    lengths = [int(x) for x in torch.randint(16, args.max_arrival_prompt, (n_req,), generator=g)]
    outs = [int(x) for x in torch.randint(16, 48, (n_req,), generator=g)]
    eng = Engine(model, max_batch=16, max_seq_len=min(640, cfg.max_seq_len), token_budget=args.token_budget)
    label = _mixed_steps(eng, how)
    start = time.perf_counter()
    due = [start + i * interval for i in range(n_req)]
    handles: list = [None] * n_req
    stamps: list[list[float]] = [[] for _ in range(n_req)]
    nxt = 0
    while nxt < n_req or eng.has_work():
        now = time.perf_counter()
        while nxt < n_req and due[nxt] <= now:
            handles[nxt] = eng.submit(torch.randint(3, cfg.vocab_size, (lengths[nxt],), generator=g).tolist(),
                                      SamplingParams(max_tokens=outs[nxt], ignore_eos=True))
            nxt += 1
        if not eng.step():
            time.sleep(0.001)
        t = time.perf_counter()
        for i, h in enumerate(handles):
            if h is not None:
                stamps[i] += [t for o in h.poll() if o.token_id is not None]
    ttft = [s[0] - due[i] for i, s in enumerate(stamps)]
    itl = [b - a for s in stamps for a, b in zip(s, s[1:], strict=False)]
    total = sum(len(s) for s in stamps)
    print(f"\nsteady arrivals: {n_req} requests every {interval:.2f} s, prompts 16-{args.max_arrival_prompt - 1} "
          "tokens, 16-47 new tokens, "
          f"token budget {args.token_budget}, max batch 16, {label}: {total / (time.perf_counter() - start):.2f} "
          "tok/s overall")
    print("| | p50 | p99 |\n|---|---|---|")
    print(f"| time to first token (s) | {_pct(ttft, 0.5):.2f} | {_pct(ttft, 0.99):.2f} |")
    print(f"| inter-token latency (s) | {_pct(itl, 0.5):.3f} | {_pct(itl, 0.99):.3f} |")
    eng.shutdown()


def long_prompt_section(model: Transformer, args: argparse.Namespace, how: str = "native") -> None:
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    long_len = args.long_prompt
    eng = Engine(model, max_batch=9, max_seq_len=min(long_len + 256, cfg.max_seq_len), token_budget=args.token_budget)
    label = _mixed_steps(eng, how)
    handles = [eng.submit(torch.randint(3, cfg.vocab_size, (64,), generator=g).tolist(),
                          SamplingParams(max_tokens=long_len // max(1, args.token_budget - 8) + args.base_steps + 40,
                                         ignore_eos=True))
               for _ in range(8)]

    def itls(steps: int, until=None) -> list[float]:
        last = [None] * 8
        gaps: list[float] = []
        k = 0
        while (until is None and k < steps) or (until is not None and not until()):
            eng.step()
            k += 1
            t = time.perf_counter()
            for i, h in enumerate(handles):
                for o in h.poll():
                    if o.token_id is None:
                        continue
                    if last[i] is not None:
                        gaps.append(t - last[i])
                    last[i] = t
        return gaps

    itls(6)  # prefill the 8 streams and settle
    base = itls(args.base_steps)
    t_long = time.perf_counter()
    long_h = eng.submit(torch.randint(3, cfg.vocab_size, (long_len,), generator=g).tolist(),
                        SamplingParams(max_tokens=4, ignore_eos=True))
    first: list[float] = []

    def long_started() -> bool:
        outs = long_h.poll()
        if any(o.token_id is not None for o in outs):
            first.append(time.perf_counter())
            return True
        return False

    during = itls(0, until=long_started)
    print(f"\n{long_len}-token prompt arriving while 8 streams decode (token budget {args.token_budget}, {label}, "
          f"{len(during)} gaps during its prefill, {(first[0] - t_long) if first else float('nan'):.1f} s to its "
          "first token):")
    print("| 8 streams' inter-token latency | p50 (s) | p99 (s) |\n|---|---|---|")
    print(f"| without the long prompt | {_pct(base, 0.5):.3f} | {_pct(base, 0.99):.3f} |")
    print(f"| while it prefills | {_pct(during, 0.5):.3f} | {_pct(during, 0.99):.3f} |")
    print(f"p99 ratio: {_pct(during, 0.99) / _pct(base, 0.99):.2f}")
    eng.shutdown()


MIXED_SHAPES = (  # (label, decoding tokens and their position, prompt chunk length and its start)
    ("16 decoding", 16, 128, 0, 0),
    ("16 decoding at 1944", 16, 1944, 0, 0),
    ("16 decoding + 32-token chunk", 16, 128, 32, 0),
    ("8 decoding + 56-token chunk at 1000", 8, 128, 56, 1000),
    ("8 decoding + 56-token chunk at 1944", 8, 128, 56, 1944),
    ("64-token chunk", 0, 0, 64, 0),
    ("128-token chunk", 0, 0, 128, 0),
    ("256-token chunk", 0, 0, 256, 0),
    ("512-token chunk", 0, 0, 512, 0),
)


def mixed_section(model: Transformer, args: argparse.Namespace) -> None:
    from mixlab.engine.runner import Item, Runner
    from mixlab.ops import native, registry

    cfg = model.config
    native.load()
    runner = Runner(model, max_batch=17, cache_bytes=None, prefill_chunk=512, max_seq_len=2304, prefix_cache=False)
    g = torch.Generator().manual_seed(4)
    for k in runner.k + runner.v:
        k.copy_(torch.randn(k.shape, generator=g) * 0.5)
    C = runner.capacity
    runner.pos_SC.copy_(torch.arange(C).expand_as(runner.pos_SC))
    saved = registry.NATIVE_MAX_STEP_TOKENS, registry.AMX_MAX_STEP_TOKENS, registry.AMX_PANELS_MAX_STEP_TOKENS
    # time the native step past the registry's limits too
    registry.NATIVE_MAX_STEP_TOKENS = registry.AMX_PANELS_MAX_STEP_TOKENS = 1 << 30
    registry.AMX_MAX_STEP_TOKENS = dict.fromkeys(saved[1], 1 << 30)
    print("\none engine step: native (one call) vs the PyTorch pass, same items, "
          f"{args.reps} interleaved rounds of {args.steps} steps, medians")
    print("| step | tokens | native ms | PyTorch ms | speed-up |\n|---|---|---|---|---|")
    try:
        for label, n_dec, dec_pos, n_chunk, chunk_start in MIXED_SHAPES:
            items = [Item(s, [int(torch.randint(3, cfg.vocab_size, (1,), generator=g))], dec_pos)
                     for s in range(n_dec)]
            if n_chunk:
                items.append(Item(16, torch.randint(3, cfg.vocab_size, (n_chunk,), generator=g).tolist(), chunk_start))
            times: dict[str, list[float]] = {"native": [], "torch": []}
            with torch.inference_mode():
                for r in range(args.reps + 1):
                    for how in ("native", "torch") if r % 2 else ("torch", "native"):
                        run = runner._native_batch if how == "native" else runner._batched
                        for _ in range(args.steps):
                            t0 = time.perf_counter()
                            out = run(items)
                            if r:  # round 0 warms up
                                times[how].append(time.perf_counter() - t0)
                            assert out is not None
            nat, ref = statistics.median(times["native"]) * 1e3, statistics.median(times["torch"]) * 1e3
            print(f"| {label} | {n_dec + n_chunk} | {nat:.1f} | {ref:.1f} | {ref / nat:.2f}x |")
    finally:
        registry.NATIVE_MAX_STEP_TOKENS, registry.AMX_MAX_STEP_TOKENS, registry.AMX_PANELS_MAX_STEP_TOKENS = saved


SECTIONS = ("decode", "batch1", "arrivals", "long", "mixed")


def main() -> None:
    global PROMPT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mini-moe")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--reps", type=positive, default=5)
    ap.add_argument("--steps", type=positive, default=4)
    ap.add_argument("--token-budget", type=positive, default=32)
    ap.add_argument("--requests", type=positive, default=24)
    ap.add_argument("--long-prompt", type=int, default=2000)
    ap.add_argument("--base-steps", type=int, default=12)
    ap.add_argument("--sections", default="decode,batch1,arrivals,long", help=f"of {','.join(SECTIONS)}")
    ap.add_argument("--plot", default=None, metavar="PNG",
                    help="draw the decode section's tokens/s against sequences, with the limits (needs matplotlib)")
    ap.add_argument("--prompt", type=int, default=PROMPT, help="prompt tokens of the decoding sequences")
    ap.add_argument("--max-arrival-prompt", type=int, default=512)
    ap.add_argument("--mixed-steps", default="native", choices=["native", "torch", "both"],
                    help="arrivals and long prompt: steps with a prompt chunk natively, on the PyTorch pass, or both")
    args = ap.parse_args()
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:  # a misspelt section was skipped without a word
        ap.error(f"--sections: unknown {', '.join(map(repr, unknown))}; known: {','.join(SECTIONS)}")
    if args.plot:  # refused now, not after minutes of measuring
        try:
            check_destination(args.plot, kind="file")
        except OutputError as e:
            raise SystemExit(f"--plot: {e}") from None
    PROMPT = args.prompt
    torch.set_num_threads(args.threads)
    print(f"# benchmarks/engine.py: {args.preset} {args.dtype}, {args.threads} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}")
    model = _model(args.preset, DTYPES[args.dtype])
    limits = measure_limits(reps=3, mib=256)
    print(f"limits: bandwidth {limits['bandwidth'] / 1e9:.1f} GB/s, bf16 matmul {limits['matmul'] / 1e9:.0f} GFLOP/s")
    sections = args.sections.split(",")
    rates = decode_section(model, args, limits) if "decode" in sections else {1: 1.0, 4: 1.0}
    hows = ["torch", "native"] if args.mixed_steps == "both" else [args.mixed_steps]
    if "arrivals" in sections:
        for how in hows:
            arrivals_section(model, args, interval=6 * 4 / rates.get(4, rates[min(rates)]), how=how)
    if "long" in sections:
        for how in hows:
            long_prompt_section(model, args, how=how)
    if "mixed" in sections:
        mixed_section(model, args)
    if "batch1" in sections:  # last: it prepares the model in place
        batch1_section(model, args)


if __name__ == "__main__":
    main()
