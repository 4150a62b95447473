"""`mixlab bench`: inference speed of mixlab vs transformers and llama.cpp (see mixlab.cli.benchmark)."""

from __future__ import annotations

import argparse
import sys

from mixlab import atomic
from mixlab.cli import add_quiet_arg, positive, user_path
from mixlab.errors import UsageError


def ints(s: str) -> tuple[int, ...]:
    """Sizes, each >= 1 (a prompt of 0 tokens or a batch of 0 sequences was a traceback mid-run)."""
    if s == "none":  # skip this section
        return ()
    try:
        return tuple(positive(x) for x in s.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {s!r}") from None


def _peers(s: str) -> tuple[str, ...]:
    from mixlab.cli.benchmark import BenchPlan

    names = tuple(s.split(","))
    known = BenchPlan.peers + BenchPlan.optional_peers
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {', '.join(map(repr, unknown))}; known: {','.join(known)}")
    return names


def _moe_preset(name: str) -> str:
    """argparse type of --preset: an MoE preset's name (an unknown or dense one exited 1, a failed run)."""
    from mixlab.config import PRESETS, ConfigError, get_preset

    try:
        dense = get_preset(name).moe is None
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if dense:
        moe = ", ".join(sorted(n for n, c in PRESETS.items() if c.moe is not None))
        raise argparse.ArgumentTypeError(f"preset {name!r} is dense; the benchmark needs an MoE preset: {moe}")
    return name


def bench(args: argparse.Namespace) -> int:
    from mixlab.cli.benchmark import BenchPlan, run_bench
    from mixlab.config import usable_threads

    if args.out:  # refused now, not after minutes of measuring
        atomic.check_json_destination(args.out)
    plan = BenchPlan.quick(args.preset or "tiny-moe") if args.quick else BenchPlan(preset=args.preset or "mini-moe")
    plan.threads = usable_threads(args.threads)
    if args.reps is not None:
        plan.reps = args.reps
    if args.layers is not None:
        from mixlab.config import get_preset

        if args.layers > (most := get_preset(plan.preset).n_layers):
            raise UsageError(f"--layers {args.layers}: preset {plan.preset!r} has {most} layers")
        plan.layers = args.layers
    for name in ("prefill", "decode_batch", "moe_tokens"):
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))
    if args.peers is not None:
        plan.peers = args.peers
    if not (plan.prefill or plan.decode_batch or plan.moe_tokens):  # it measured the machine, built the models
        raise ValueError("--prefill, --decode-batch and --moe-tokens are all 'none': nothing to measure")
    # progress on stderr: stdout is the report (`mixlab bench > report.md`)
    report = run_bench(plan, log=(lambda _: None) if args.quiet else lambda line: print(line, file=sys.stderr))
    text = report.format()
    print(text)
    if args.out:
        atomic.write_text(args.out, text)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="inference speed vs transformers and llama.cpp, "
                                     "as a fraction of this machine's limits")
    p.add_argument("--preset", type=_moe_preset, default=None,
                   help="MoE preset (default mini-moe; tiny-moe with --quick)")
    p.add_argument("--layers", type=positive, default=None,
                   help="the preset's first N layers only (default: all): --preset mixtral-8x7b --layers 1 is a "
                        "slice of Mixtral's own widths (~4 GB in bf16), each layer's bytes against each peer's "
                        "cost per layer as in the whole model")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny preset, few sizes, 2 repetitions")
    p.add_argument("--threads", type=positive, default=2, help="CPU threads for every peer (default 2)")
    p.add_argument("--reps", type=positive, default=None,
                   help="repetitions per figure (median; default 5, --quick: 2)")
    p.add_argument("--prefill", type=ints, default=None,
                   help="prompt lengths (default 128,512,2048; --quick: 32; none: skip)")
    p.add_argument("--decode-batch", dest="decode_batch", type=ints, default=None,
                   help="batch sizes of the decode steps (default 1,4,16; --quick: 1,2; none: skip)")
    p.add_argument("--moe-tokens", dest="moe_tokens", type=ints, default=None,
                   help="tokens through one MoE layer (default 1,32,512,4096; --quick: 1,16; none: skip)")
    p.add_argument("--peers", type=_peers, default=None,
                   help="comma-separated subset of mixlab,mixlab-packed,mixlab-int8,mixlab-int4,"
                        "mixlab-int4-exact,transformers,llama.cpp (the default: all of them), and q4_k_m: a Q4_K_M "
                        "file of the same weights made by llama.cpp's quantiser, run by llama.cpp and by mixlab "
                        "(every matrix int4), and mixlab-int8-act8: int8 weights times activations rounded to int8 "
                        "(--int8-activations int8)")
    p.add_argument("--out", type=user_path, default=None, help="also write the markdown report to this file")
    add_quiet_arg(p)
    p.set_defaults(func=bench)
