"""In-process A/B of `decode.c` variants: each source file compiled with mixlab's flags into its own
library (checked like the real one, `native.load_library`), all loaded at once and swapped in round
by round, so that every variant meets the same memory state (this kind of machine's bandwidth can
change by the minute: runs minutes apart cannot be compared). A bandwidth probe after every round
sorts the rounds into slow and fast memory states (`--split` GB/s); an untimed call follows it
(right after the probe's pause the first reads run slow).

    .venv/bin/python benchmarks/kernels_ab.py [--rounds 10] [--cases gu4,dn4,moe16,logits16] \
        [--engine 1,16] [--prefill] [--panels] main=old/decode.c new=src/mixlab/ops/native/decode.c

Cases (mini-moe's shapes, bf16, random weights; `--threads`, default 2):
- `gu{M}`, `dn{M}`: `mx_linear` of M tokens over 16 distinct gate/up (7168 x 1024) or down (1024 x
  3584) matrices, so every weight comes from memory;
- `lin{M}`: one 7168 x 1024 matrix; `logits{M}`: the 32000 x 1024 output matrix;
- `moe{T}`: `mx_moe` for T tokens routed at random through 8 layers of distinct experts;
- `--engine B,...`: whole engine steps of B decoding sequences, each after a prompt of `--context`
  tokens (default 128; the model's shared native decoder has its library swapped); `--prefill`:
  one engine step prefilling 16 prompts of 32 tokens;
  `--quant int8|int4`: those on `prepare_for_inference(quant=...)` weights;
  `--lora R`: each engine case also under LoRA adapters of rank R (attention + experts, as
  benchmarks/lora.py makes them; each adapted weight's update runs inside `mx_decode_batch`):
  `engine{B}+lora` with the B sequences under four adapters in turn, `prefill512+lora` with the
  16 prompts under one;
- `--panels`: each variant run twice, the second (`NAME+panels`) reading the bf16 weights' 32-row
  panels (`gu`/`dn`/`lin`/`logits` through `native.linear_packed`, the engine cases through
  `NativeDecoder.pack`).

Each case reports per variant the median time, GB/s (the bytes it must read) and GFLOP/s, and the
median over rounds of its time over the first variant's (below 1: faster), overall and per memory
state. The first run compares every variant's outputs with the first's (max relative difference).
`--cpu-time`: each case timed by the process's CPU time (`time.process_time`) instead of the wall
clock, so that on a shared machine the time slices other processes take do not count (with
`--threads 1`: with more, the threads' spinning at barriers counts as well).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mixlab.cli import positive  # noqa: E402
from mixlab.cli.benchmark import bandwidth_probe  # noqa: E402
from mixlab.ops import native  # noqa: E402

D, F, E, K, L, V = 1024, 3584, 8, 2, 8, 32000
Case = tuple[Callable[[], torch.Tensor | None], float, float]  # (run, bytes, FLOPs)
PANELS = [False]  # the variant being run reads the weights' 32-row panels (`--panels`)


def kernel_cases(names: list[str], g: torch.Generator) -> dict[str, Case]:
    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).bfloat16()

    cases: dict[str, Case] = {}
    for c in names:
        kind, M = c.rstrip("0123456789"), int(c[len(c.rstrip("0123456789")):] or 0)
        if kind in ("gu", "dn"):
            shape = (2 * F, D) if kind == "gu" else (D, F)
            ws = [w(*shape) for _ in range(16)]
            ps = [native.pack_bf16(m) for m in ws]
            x = torch.randn(M, shape[1], generator=g)
            cases[c] = (lambda x=x, ws=ws, ps=ps: [native.linear_packed(x, m, p) if PANELS[0] else native.linear(x, m)
                                                   for m, p in zip(ws, ps, strict=True)][-1],
                        16 * shape[0] * shape[1] * 2, 16 * 2 * M * shape[0] * shape[1])
        elif kind in ("lin", "logits"):
            rows = 2 * F if kind == "lin" else V
            m, x = w(rows, D), torch.randn(M, D, generator=g)
            p = native.pack_bf16(m)
            cases[c] = (lambda x=x, m=m, p=p: native.linear_packed(x, m, p) if PANELS[0] else native.linear(x, m),
                        rows * D * 2, 2 * M * rows * D)
        elif kind == "moe":
            w13 = [w(E, 2 * F, D) for _ in range(L)]
            w2 = [w(E, D, F) for _ in range(L)]
            x, mix = torch.randn(M, D, generator=g), torch.softmax(torch.randn(M, K, generator=g), -1)
            idx = [torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(M)]) for _ in range(L)]
            nbytes = sum(len(set(i.flatten().tolist())) for i in idx) * 3 * D * F * 2

            def moe(x=x, mix=mix, idx=idx, w13=w13, w2=w2) -> torch.Tensor:
                for layer in range(L):
                    y = native.moe(x, w13[layer], w2[layer], idx[layer], mix)
                return y

            cases[c] = (moe, nbytes, 2 * L * M * K * 3 * D * F)
        else:
            raise SystemExit(f"unknown case {c!r}: expected gu, dn, lin, logits or moe and a token count")
    return cases


def engine_cases(batches: list[int], prefill: bool, rounds: int, n_libs: int, steps: int,
                 quant: str | None, context: int, lora: int | None) -> tuple[dict[str, Case], list]:
    import engine as eb  # benchmarks/engine.py
    import lora as lb  # benchmarks/lora.py
    from mixlab.engine import Engine, SamplingParams
    from mixlab.model.inference import prepare_for_inference

    model = eb._model("mini-moe", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    cases: dict[str, Case] = {}
    engines = []
    total = (rounds + 2) * steps * n_libs + 8
    names = ["a", "b", "c", "d"]
    with tempfile.TemporaryDirectory(prefix="mixlab-kernels-ab-lora-") as tmp:  # the engines read them at once
        adapters = {n: lb.make_adapter(model, Path(tmp) / n, lora, seed=i) for i, n in enumerate(names)} if lora else {}
        if quant:
            model = prepare_for_inference(model, quant=quant)
        # (name suffix, the engine's adapters, the requests' adapters in turn): the base without any
        ways: list[tuple[str, dict, list[str | None]]] = [("", {}, [None])] + (
            [("+lora", adapters, list(names))] if lora else [])
        for B in batches:
            for suffix, table, which in ways:
                budget = min(B * context + B, 4096)
                head = B * context // budget + B  # engine._fill's prefill steps, each a token for the early sequences
                eng = Engine(model, max_batch=B, max_seq_len=context + total + 8 + head, token_budget=budget,
                             adapters=table or None)
                eb._fill(eng, B, g, total + 4, prompt=context, adapters=which)
                engines.append(eng)

                def step(eng=eng, B=B) -> None:
                    for _ in range(steps):
                        if len(eng._running) != B:  # a sequence ran out of tokens: the steps would not compare
                            raise RuntimeError(f"engine{B}: {len(eng._running)} sequences left")
                        eng.step()

                cases[f"engine{B}{suffix}"] = (step, 0.0, 0.0)
        counts, out = model.config.param_counts(), V * D  # logits for the last rows only
        matrices = counts["active"] - counts["embedding"] - counts["norms"] - out
        for suffix, table, which in ways if prefill else []:
            eng = Engine(model, max_batch=16, max_seq_len=128, token_budget=512, prefix_cache=False,
                         adapters=table or None)
            engines.append(eng)

            def wave(eng=eng, adapter=which[0]) -> None:
                hs = [eng.submit(torch.randint(3, V, (32,), generator=g).tolist(),
                                 SamplingParams(max_tokens=1, ignore_eos=True, adapter=adapter)) for _ in range(16)]
                eng.run_until_idle()
                for h in hs:
                    list(h)

            cases[f"prefill512{suffix}"] = (wave, 0.0, 2.0 * (512 * matrices + 16 * out))
    return cases, engines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", metavar="NAME=decode.c")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--cases", default="", help="comma-separated kernel cases (see above)")
    ap.add_argument("--engine", default="", help="engine steps of these batch sizes, e.g. 1,16")
    ap.add_argument("--steps", type=int, default=3, help="engine steps per round")
    ap.add_argument("--context", type=int, default=128,
                    help="the engine cases' prompt tokens per sequence (the steps attend over about this many)")
    ap.add_argument("--prefill", action="store_true", help="an engine step prefilling 16 x 32 prompt tokens")
    ap.add_argument("--quant", default=None, choices=["int8", "int4"], help="the engine cases' weights")
    ap.add_argument("--lora", type=positive, default=None, metavar="RANK",
                    help="also run the engine cases under LoRA adapters of this rank (NAME+lora)")
    ap.add_argument("--panels", action="store_true",
                    help="also run each variant reading the bf16 weights' 32-row panels (NAME+panels: "
                         "`NativeDecoder.pack`, `native.linear_packed`)")
    ap.add_argument("--no-amx", default="", metavar="NAMES",
                    help="comma-separated variants whose panels stay off AMX's tile unit (the others use it where "
                         "the CPU allows, as `native.load` does)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time the cases by the process's CPU time, not the wall clock (a shared machine; --threads 1)")
    ap.add_argument("--split", type=float, default=58.0, help="GB/s between the slow and fast memory states")
    args = ap.parse_args()
    if args.rounds < 1 or args.steps < 1 or args.threads < 1 or args.context < 1:
        raise SystemExit(f"--rounds, --steps, --threads and --context must be >= 1, not {args.rounds}, {args.steps}, "
                         f"{args.threads}, {args.context}")
    torch.set_num_threads(args.threads)
    if native.load() is None or native.compiler() is None:
        raise SystemExit("native kernels unavailable (MIXLAB_NATIVE=0 or no C compiler)")
    names = [spec.partition("=")[0] for spec in args.variants]
    unknown = [n for n in args.no_amx.split(",") if n and n not in names]
    if unknown:
        raise SystemExit(f"--no-amx names {', '.join(unknown)}, not a variant ({', '.join(names)})")
    libs = {}
    with tempfile.TemporaryDirectory(prefix="mixlab-kernels-ab-") as tmp:
        for spec in args.variants:
            name, sep, path = spec.partition("=")
            if not sep or not Path(path).is_file():
                raise SystemExit(f"invalid variant {spec!r}: expected NAME=path/to/decode.c (an existing file)")
            out = Path(tmp) / f"{name}.so"
            cmd = [*native.command(native.compiler()), *native.FLAGS, f"-I{native.HERE}", path, "-o", str(out), "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"variant {name}: {path} does not compile:\n{proc.stderr.strip()[-2000:]}")
            try:
                libs[name] = native.load_library(out)
            except native.NativeABIError as e:
                raise SystemExit(f"variant {name}: {e}") from None
            libs[name][0].mx_amx(0 if name in args.no_amx.split(",") else 1)
    g = torch.Generator().manual_seed(0)
    cases = kernel_cases([c for c in args.cases.split(",") if c], g)
    batches = [int(b) for b in args.engine.split(",") if b]
    engines: list = []
    decoder = None
    if batches or args.prefill:
        runs = len(libs) * (2 if args.panels else 1) + 1  # each variant (again with panels), and a warm-up
        more, engines = engine_cases(batches, args.prefill, args.rounds, runs, args.steps, args.quant, args.context,
                                     args.lora)
        cases |= more
        decoder = engines[0].runner._native_decoder()
        decoder.wait_huge_pages()

    if args.panels:
        libs |= {f"{name}+panels": lib for name, lib in list(libs.items())}
        if decoder is not None:
            decoder.pack()

    def use(name: str) -> None:
        native._lib, native._simd = libs[name]
        PANELS[0] = name.endswith("+panels")
        if decoder is not None:
            decoder.lib = libs[name][0]
            decoder.pack(PANELS[0])

    first = next(iter(libs))
    for c, (fn, _, _) in cases.items():  # outputs against the first variant's
        if c.startswith(("engine", "prefill")):
            continue
        use(first)
        ref = fn()
        for name in list(libs)[1:]:
            use(name)
            got = fn()
            assert ref is not None and got is not None
            print(f"{c}: {name} vs {first}: max relative difference "
                  f"{((got - ref).abs().max() / ref.abs().max()).item():.1e}")
    probe, probe_bytes = bandwidth_probe(reps=1, mib=256)
    clock = time.process_time if args.cpu_time else time.perf_counter
    times: dict[tuple[str, str], list[float]] = {(n, c): [] for n in libs for c in cases}
    bws: list[float] = []
    for r in range(args.rounds + 1):  # round 0 warms up
        order = list(libs) if r % 2 == 0 else list(reversed(libs))
        use(order[0])
        next(iter(cases.values()))[0]()  # untimed: right after the probe's pause the first reads run slow
        for c, (fn, _, _) in cases.items():
            for name in order:
                use(name)
                t0 = clock()
                fn()
                if r:
                    times[(name, c)].append(clock() - t0)
        t0 = time.perf_counter()
        probe()
        if r:
            bws.append(probe_bytes / (time.perf_counter() - t0))
    use(first)
    for eng in engines:
        eng.shutdown()
    print(f"\n# benchmarks/kernels_ab.py: {args.rounds} rounds, {args.threads} threads, "
          f"{'CPU' if args.cpu_time else 'wall-clock'} time, torch {torch.__version__}; "
          f"bandwidth per round {', '.join(f'{b / 1e9:.0f}' for b in bws)} GB/s")
    states = {"slow": [i for i, b in enumerate(bws) if b < args.split * 1e9],
              "fast": [i for i, b in enumerate(bws) if b >= args.split * 1e9]}
    print(f"\n| case | variant | ms | GB/s | GFLOP/s | ÷ {first} | slow rounds | fast rounds |")
    print("|---|---|---|---|---|---|---|---|")
    for c, (_, nbytes, flops) in cases.items():
        base = times[(first, c)]
        for name in libs:
            ts = times[(name, c)]
            t = statistics.median(ts)
            per = [a / b for a, b in zip(ts, base, strict=True)]
            by_state = [f"{statistics.median(per[i] for i in sel):.3f} (n={len(sel)})" if sel else "-"
                        for sel in states.values()]
            print(f"| {c} | {name} | {t * 1e3:.2f} | {nbytes / t / 1e9:.1f} | {flops / t / 1e9:.0f} | "
                  f"{statistics.median(per):.3f} | {by_state[0]} | {by_state[1]} |")


if __name__ == "__main__":
    main()
