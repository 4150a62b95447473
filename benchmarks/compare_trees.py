"""Before/after speed of two mixlab source trees in one run (e.g. the previous main in a `git worktree`
against this checkout), with llama.cpp as the fixed peer: decode at batch 1 (bf16 and int8, q8_0 for
llama.cpp), prefill at 128 and 512 tokens, and the training step.

The trees run in turn, each in its own subprocess (`PYTHONPATH=TREE/src`), round after round, so load
from other processes hits both alike; each worker measures with its own tree's benchmark peers
(`mixlab.cli.benchmark`, `mixlab.bench` in older trees: what `mixlab bench` measures) and reports the
median of its repetitions; the table gives the median over rounds and the load average seen at each
worker's start. The model (`mini-moe`, random bf16 weights) and its GGUF files are written once, by
this tree, and read by every worker.

    .venv/bin/python benchmarks/compare_trees.py --old /work/wt/oldmain --new . --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mixlab.cli import positive

PREFILL = (128, 512)
DECODE_PROMPT, DECODE_STEPS = 128, 16


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _peer_figures(peer, vocab: int, reps: int) -> dict[str, float]:
    import torch

    g = torch.Generator().manual_seed(1)
    out = {}
    for P in PREFILL:
        tokens = torch.randint(3, vocab, (1, P), generator=g)
        out[f"prefill {P} (tokens/s)"] = P / _median_time(lambda tokens=tokens: peer.prefill(tokens), reps)
    prompt = torch.randint(3, vocab, (1, DECODE_PROMPT), generator=g)
    peer.start_decode(prompt, DECODE_STEPS * (reps + 1) + 1)

    def run() -> None:
        for _ in range(DECODE_STEPS):
            peer.decode()

    out["decode B=1 (tokens/s)"] = DECODE_STEPS / _median_time(run, reps)
    return out


def worker_infer(model_dir: str, reps: int, threads: int) -> dict[str, dict[str, float]]:
    import torch

    try:
        from mixlab.cli.benchmark import MixlabPeer
    except ImportError:  # a tree from before bench.py moved into the CLI layer
        from mixlab.bench import MixlabPeer  # type: ignore[no-redef]
    from mixlab.checkpoint import load_model
    from mixlab.model.inference import prepare_for_inference

    torch.set_num_threads(threads)
    res = {}
    for name, quant in (("bf16", None), ("int8", "int8")):
        model = prepare_for_inference(load_model(model_dir, dtype=torch.bfloat16).eval(), quant=quant)
        torch.set_num_threads(threads)
        res[name] = _peer_figures(MixlabPeer(model, f"mixlab-{name}"), model.config.vocab_size, reps)
        del model
    return res


def worker_llama(gguf_dir: str, vocab: int, reps: int, threads: int) -> dict[str, dict[str, float]]:
    try:
        from mixlab.cli.benchmark import LlamaCppPeer
    except ImportError:  # a tree from before bench.py moved into the CLI layer
        from mixlab.bench import LlamaCppPeer  # type: ignore[no-redef]

    res = {}
    for quant in ("bf16", "q8_0"):
        n_ctx = max(max(PREFILL), DECODE_PROMPT + DECODE_STEPS * (reps + 2)) + 16
        peer = LlamaCppPeer(Path(gguf_dir) / f"m-{quant}.gguf", quant, threads, n_ctx, 2.0)
        try:
            res[quant] = _peer_figures(peer, vocab, reps)
        finally:
            peer.close()
    return res


def worker_train(reps: int, threads: int) -> dict[str, dict[str, float]]:
    """benchmarks/train.py's default model and batch (bf16 autocast, fused AdamW): one step's time."""
    import torch

    from mixlab.config import MoEConfig, get_preset
    from mixlab.model import Transformer
    from mixlab.train.loop import TrainConfig, make_optimizer
    from mixlab.train.losses import lm_loss, router_losses

    torch.set_num_threads(threads)
    mc = get_preset("tiny-moe").replace(vocab_size=259, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32,
                                        ffn_dim=512, max_seq_len=256, moe=MoEConfig(num_experts=8, top_k=2))
    torch.manual_seed(0)
    model = Transformer(mc)
    model.init_weights(seed=0)
    model.train()
    opt = make_optimizer(model, TrainConfig(lr=1e-4))
    x = torch.randint(3, mc.vocab_size, (8, 257))
    inp, tgt = x[:, :-1], x[:, 1:]

    def step() -> None:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            if hasattr(model, "forward_output"):  # one return type: forward_output has logits and routing
                out = model.forward_output(inp)
                logits, routings = out.logits_BTV, out.routing
            else:  # the older tree: forward(return_routing=True) -> (logits, routings)
                logits, routings = model(inp, return_routing=True)
        aux, _ = router_losses(routings)
        (lm_loss(logits, tgt) + 0.02 * aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return {"train step (bf16 autocast, 8x256 tokens)": {"ms": 1000 * _median_time(step, reps)}}


def _run_worker(tree: Path, args: list[str]) -> tuple[dict, float]:
    load = os.getloadavg()[0]
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker in {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), load


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, help="the tree measured as 'before'")
    p.add_argument("--new", type=Path, default=Path(__file__).resolve().parents[1])
    p.add_argument("--rounds", type=positive, default=3)
    p.add_argument("--reps", type=positive, default=3)
    p.add_argument("--threads", type=positive, default=2)
    p.add_argument("--preset", default="mini-moe")
    p.add_argument("--workdir", default=None)
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "infer":
            out = worker_infer(rest[0], args.reps, args.threads)
        elif kind == "llama":
            out = worker_llama(rest[0], int(rest[1]), args.reps, args.threads)
        else:
            out = worker_train(args.reps, args.threads)
        print(json.dumps(out))
        return 0

    for flag, tree in (("--old", args.old), ("--new", args.new)):
        if tree is None or not (tree / "src" / "mixlab").is_dir():
            p.error(f"{flag} {tree}: expected a mixlab source tree (with src/mixlab)")
    import torch

    from mixlab.checkpoint import save_model
    from mixlab.checkpoint.gguf import write_gguf
    from mixlab.config import get_preset
    from mixlab.model import Transformer

    cfg = get_preset(args.preset)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="mixlab-compare-") as tmp:
        root = Path(tmp)
        print(f"writing {args.preset} (random bf16) and its GGUF files to {root} ...", file=sys.stderr)
        with torch.device("meta"):
            model = Transformer(cfg).to(torch.bfloat16)
        model = model.to_empty(device="cpu")
        model.init_weights(seed=0)
        save_model(model.eval(), root / "model", fmt="hf")
        for quant in ("bf16", "q8_0"):
            write_gguf(model, root / f"m-{quant}.gguf", quant=quant)
        del model
        results: dict[str, list[dict]] = {}
        loads: dict[str, list[float]] = {}
        jobs = [("old", args.old, ["infer", str(root / "model")]), ("new", args.new, ["infer", str(root / "model")]),
                ("llama.cpp", args.new, ["llama", str(root), str(cfg.vocab_size)]),
                ("old", args.old, ["train"]), ("new", args.new, ["train"])]
        for r in range(args.rounds):
            for name, tree, wargs in jobs:
                out, load = _run_worker(tree, [*wargs, "--reps", str(args.reps), "--threads", str(args.threads)])
                key = f"{name} {wargs[0]}"
                results.setdefault(key, []).append(out)
                loads.setdefault(key, []).append(load)
                print(f"round {r + 1} {key}: {json.dumps(out)} (load {load:.1f})", file=sys.stderr)
    print(f"- rounds: {args.rounds} (workers alternate old, new, llama.cpp), each worker the median of "
          f"{args.reps} repetitions after a warm-up; threads {args.threads}; preset {args.preset}")
    print(f"- torch {torch.__version__}; load average (1 min) at each worker's start: "
          + "; ".join(f"{k}: {', '.join(f'{x:.1f}' for x in v)}" for k, v in loads.items()))
    print("\n| figure | variant | old (median over rounds) | new | new / old | llama.cpp | new / llama.cpp |")
    print("|---|---|---:|---:|---:|---:|---:|")

    def med(key: str, variant: str, fig: str) -> float:
        return statistics.median(o[variant][fig] for o in results[key])

    for variant, peer in (("bf16", "bf16"), ("int8", "q8_0")):
        for fig in [f"prefill {P} (tokens/s)" for P in PREFILL] + ["decode B=1 (tokens/s)"]:
            old, new, ll = med("old infer", variant, fig), med("new infer", variant, fig), med("llama.cpp llama", peer,
                                                                                                fig)
            print(f"| {fig} | {variant} (llama.cpp {peer}) | {old:.1f} | {new:.1f} | {new / old:.2f}x | {ll:.1f} | "
                  f"{new / ll:.2f}x |")
    fig = "train step (bf16 autocast, 8x256 tokens)"
    old, new = med("old train", fig, "ms"), med("new train", fig, "ms")
    print(f"| {fig}, ms | bf16 | {old:.1f} | {new:.1f} | {new / old:.2f}x (time) | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
