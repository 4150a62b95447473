"""Expert offloading: hit rate, decode tokens/s and peak RSS against the cache budget.

For each model: the budget as 25/50/75/100% of the experts' bytes (in the cache's format), LRU and
LFU, with and without prefetch (`--prefetch no,yes,always`: "yes" is the library's default, which
reads guesses only while a read fits in the compute between two layers; "always" reads every
guess), plus the resident model; `--repeats N` runs each N times and shows the median. Every
configuration runs in its own process (so its peak RSS, VmHWM, is its own): load with
`max_memory`, prepare for inference, prefill a prompt, then greedy-decode `--tokens` tokens, after
a short warm-up generation and with the cache emptied; the hit rate, bytes read and time waited
are counted over the decode steps only (the prefill touches nearly every expert).

Models: `--model DIR` (e.g. the corpus-trained /work/runs/corpus-moe-train/hf, prompts from the
corpus) and `--random D,F,L,E` (random weights written once to `--workdir`, bf16; big enough that
reads matter). `--drop-pages` evicts each range from the page cache after reading it
(posix_fadvise DONTNEED), so every miss reads the disk as on a machine whose RAM cannot hold the
file; without it, re-reads usually come from the page cache.

The RSS target: peak RSS <= budget + resident part + 10%, where the resident part is the process
after loading (torch, attention/norms/embeddings, no expert) measured in the same process.

    python benchmarks/offload.py --model /work/runs/corpus-moe-train/hf --tokens 64
    python benchmarks/offload.py --random 1024,3584,8,8 --tokens 24 --drop-pages
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from mixlab.atomic import OutputError, check_destination, write_text
from mixlab.cli import positive


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent at fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _prompt(model_dir: str, length: int, vocab: int) -> list[int]:
    from mixlab.tokenizer import load_tokenizer

    folder = Path(model_dir)
    if (folder / "mixlab_data.json").is_file():  # the corpus model: a validation document
        corpus = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
        texts = sorted(corpus.glob("*/valid.jsonl"))
        text = json.loads(texts[0].read_text().splitlines()[0])["text"] if texts else "def main():\n    return 0\n" * 40
        ids = load_tokenizer(folder).encode(text)
        return ids[:length]
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def run_one(args: argparse.Namespace) -> dict:
    """One configuration, in this process."""
    from mixlab import load_model
    from mixlab.generate import generate_stream
    from mixlab.model.formats import expert_cache
    from mixlab.model.inference import prepare_for_inference

    torch.set_num_threads(args.threads)
    kw = {} if args.budget is None else dict(max_memory=args.budget, policy=args.policy, prefetch=args.prefetch)
    model = prepare_for_inference(load_model(args.model_dir, **kw), quant=None if args.quant == "none" else args.quant)
    cache = expert_cache(model)
    if cache is not None and args.drop_pages:
        cache.source.files.drop_pages = True  # type: ignore[attr-defined]
    if cache is not None and getattr(args, "prefetch_always", False):
        cache.prefetch_gate = False
    rss_loaded = _rss_now()
    ids = _prompt(args.model_dir, args.prompt_len, model.config.vocab_size)
    for _ in generate_stream(model, [ids[:4]], max_new_tokens=3, temperature=0.0):  # warm-up (kernels, allocator)
        pass
    if cache is not None:
        cache.clear()  # start cold
    times = []
    start = time.perf_counter()
    for n, _ in enumerate(generate_stream(model, [ids], max_new_tokens=args.tokens + 1, temperature=0.0,
                                          stop_at_eos=False)):
        times.append(time.perf_counter())
        if n == 0 and cache is not None:
            cache.reset_stats()  # count the decode steps only
    decode_s = times[-1] - times[0]
    out = dict(budget=args.budget, policy=args.policy, prefetch=args.prefetch, quant=args.quant,
               prefetch_always=getattr(args, "prefetch_always", False),
               prefill_s=times[0] - start, decode_tokens=len(times) - 1, decode_tok_s=(len(times) - 1) / decode_s,
               rss_loaded=rss_loaded, peak_rss=peak_rss())
    if cache is not None:
        out.update(cache.stats.as_dict(), slots=cache.num_slots, expert_bytes=cache.expert_bytes,
                   total_expert_bytes=cache.total_expert_bytes, read_s_mean=cache.read_s_mean,
                   window_s_mean=cache.window_s_mean)
        cache.close()
    return out


def expert_bytes_total(model_dir: str, quant: str) -> int:
    from mixlab import load_model
    from mixlab.model.formats import expert_cache
    from mixlab.model.inference import prepare_for_inference

    model = load_model(model_dir, max_memory=2**62)
    prepare_for_inference(model, quant=None if quant == "none" else quant)
    cache = expert_cache(model)
    assert cache is not None
    return cache.total_expert_bytes


def write_random(spec: str, workdir: Path) -> str:
    from mixlab import save_model
    from mixlab.config import MoEConfig, get_preset
    from mixlab.model import Transformer

    D, F, L, E = (int(x) for x in spec.split(","))
    path = workdir / f"random-{D}-{F}-{L}-{E}"
    if (path / "config.json").is_file():
        return str(path)
    cfg = get_preset("mini-moe").replace(dim=D, ffn_dim=F, n_layers=L, n_heads=max(1, D // 64),
                                         n_kv_heads=max(1, D // 256), head_dim=64,
                                         moe=MoEConfig(num_experts=E, top_k=2), max_seq_len=4096)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    save_model(model.to(torch.bfloat16), path, overwrite=True)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder")
    ap.add_argument("--random", default=None, metavar="D,F,L,E", help="random bf16 model of this shape")
    ap.add_argument("--workdir", default="/work/runs/offload-bench")
    ap.add_argument("--fractions", default="0.25,0.5,0.75,1.0")
    ap.add_argument("--policies", default="lru,lfu")
    ap.add_argument("--quant", default="none", choices=["none", "int8", "int4"])
    ap.add_argument("--tokens", type=positive, default=32)
    ap.add_argument("--prompt-len", type=positive, default=32)
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--drop-pages", action="store_true")
    ap.add_argument("--prefetch", default="no,yes", help="rows per budget and policy: no, yes (reads guesses while "
                    "a read fits in the compute window), always (reads every guess)")
    ap.add_argument("--repeats", type=positive, default=1, help="runs per configuration (the table shows medians)")
    ap.add_argument("--no-resident", action="store_true", help="skip the resident model's row")
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    args = ap.parse_args()
    if args.one:
        one = argparse.Namespace(**json.loads(args.one))
        print(json.dumps(run_one(one)))
        return
    if args.json:  # refused now, not after the run
        try:
            check_destination(args.json, kind="file")
        except OutputError as e:
            raise SystemExit(f"--json: {e}") from None
    if (args.model is None) == (args.random is None):
        ap.error("give --model DIR or --random D,F,L,E")
    try:
        fractions = [float(x) for x in args.fractions.split(",")]
        if args.random is not None:
            D, F, L, E = (int(x) for x in args.random.split(","))
    except ValueError:
        ap.error(f"--fractions {args.fractions!r} / --random {args.random!r}: expected comma-separated numbers "
                 "(--random: four integers D,F,L,E)")
    for flag, values, known in (("--policies", args.policies, ("lru", "lfu")),
                                ("--prefetch", args.prefetch, ("no", "yes", "always"))):
        if unknown := [v for v in values.split(",") if v not in known]:  # "maybe" ran as "yes"
            ap.error(f"{flag}: unknown {', '.join(map(repr, unknown))}; known: {','.join(known)}")
    model_dir = args.model or write_random(args.random, Path(args.workdir))
    total = expert_bytes_total(model_dir, args.quant)
    configs: list[dict] = [] if args.no_resident else [dict(budget=None, policy="lru", prefetch=False)]
    for frac in fractions:
        for policy in args.policies.split(","):
            for mode in args.prefetch.split(","):
                configs.append(dict(budget=int(frac * total), policy=policy, prefetch=mode != "no",
                                    prefetch_always=mode == "always", fraction=frac))
    print(f"model {model_dir}; experts {total / 1e6:.1f} MB ({args.quant}); torch {torch.__version__}; "
          f"{args.tokens} decode tokens after a {args.prompt_len}-token prompt; {args.threads} threads; "
          f"drop pages: {args.drop_pages}; medians of {args.repeats} run(s) (decode tok/s of each in brackets)",
          flush=True)
    print("| budget | policy | prefetch | hit rate | decode tok/s | waited s | read MB "
          "| prefetched (used; cancelled; skipped) | peak RSS MB | loaded RSS MB | RSS target MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for c in configs:
        one = dict(model_dir=model_dir, quant=args.quant, tokens=args.tokens, prompt_len=args.prompt_len,
                   threads=args.threads, drop_pages=args.drop_pages, **{k: v for k, v in c.items() if k != "fraction"})
        runs = []
        for _ in range(args.repeats):
            res = subprocess.run([sys.executable, __file__, "--one", json.dumps(one)], capture_output=True, text=True,
                                 check=False)
            if res.returncode != 0:
                err = res.stderr.strip()
                print(f"| {c} | failed: {err.splitlines()[-1] if err else res.returncode} |")
                break
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        if len(runs) < args.repeats:
            continue
        # The median run by decode tokens/s (its other columns are that run's); peak RSS: the largest.
        r = dict(sorted(runs, key=lambda x: x["decode_tok_s"])[len(runs) // 2])
        r["peak_rss"] = max(x["peak_rss"] for x in runs)
        r["fraction"], r["runs"] = c.get("fraction"), runs
        rows.append(r)
        mb = 1e6
        each = " ({})".format(", ".join(f"{x['decode_tok_s']:.1f}" for x in runs)) if len(runs) > 1 else ""
        if r["budget"] is None:
            print(f"| resident | - | - | - | {r['decode_tok_s']:.1f}{each} | - | - | - | {r['peak_rss'] / mb:.0f} | "
                  f"{r['rss_loaded'] / mb:.0f} | - |", flush=True)
            continue
        target = 1.1 * (r["budget"] + r["rss_loaded"])
        ok = "ok" if r["peak_rss"] <= target else "OVER"
        mode = "always" if r["prefetch_always"] else "yes" if r["prefetch"] else "no"
        pf = (f"{r['prefetched']} ({r['prefetch_used']}; {r.get('prefetch_cancelled', 0)}; "
              f"{r.get('prefetch_skipped', 0)})")
        print(f"| {r['fraction']:.0%} ({r['slots']} experts) | {r['policy']} | {mode} | "
              f"{r['hit_rate']:.1%} | {r['decode_tok_s']:.1f}{each} | {r['wait_s']:.2f} | {r['bytes_read'] / mb:.1f} | "
              f"{pf} | {r['peak_rss'] / mb:.0f} | {r['rss_loaded'] / mb:.0f} | {target / mb:.0f} {ok} |", flush=True)
    if args.json:
        write_text(args.json, json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
