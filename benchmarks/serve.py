"""Serving throughput and latency: `mixlab serve` against llama.cpp's server on the same weights.

Builds `mini-moe` (random weights, bf16, seeded), saves it as a transformers checkpoint and exports
the same weights to GGUF (bf16), then for each server drives 1, 4 and 16 concurrent streaming
clients over loopback, each sending `--requests` completions of mixed prompt lengths (text of
15-47 random Mixtral tokens, about 16-48 tokens with BOS, mean 32) with `--max-tokens` greedy
tokens and `ignore_eos`. Reports the aggregate generated tokens/s, time to first token and
inter-token latency (p50, p99), the ratio to the peer, and the weight-streaming limit: the bytes a
decoding step of B sequences must read (dense weights + the experts those B tokens touch) over the
memory bandwidth measured in the same run: probed right before and after each run (the stricter of
the two, since this kind of machine's bandwidth can change by the minute), the median of the runs'
fractions; in brackets, against the best of the probes before and after the whole benchmark.

The peer is llama.cpp's own `llama-server` (`--llama-server PATH`, run with `-np 16` parallel slots
and continuous batching), built from the llama.cpp source the llama-cpp-python sdist vendors; or
`--llama-cpp-python` for `python -m llama_cpp.server` (one request at a time); both may run. `--engine`
adds the same load on an in-process `Engine` (no HTTP), which shows what serving costs on top of the
engine, and where its time goes: steps with prompt tokens, decoding-only steps against their own
limits, gaps between steps, and what a server with decoding steps exactly at their limits would
reach on the same schedule (the prompt tokens cost compute the limit does not count). Below the
table, what the machine allows: the load's FLOPs (every prompt and fed-back position, every row of
logits) at the bf16 matmul peak probed with the bandwidth, against the limit's streaming time: no
server can beat max(streaming, FLOPs), nor, running dense products and experts one after the other
each at its own roofline, the second figure. Then the issue's own form of the limit ("about 4.8x its
batch-1 rate"): each server's rate at B clients against its 1-client rate times the limits' ratio,
which measures batching alone (it is lower than the bandwidth's limit whenever batch 1 is). Every server
gets the same `--threads`. Everything binds to 127.0.0.1; every run is bounded
by `--timeout`. `--model-dir` keeps the checkpoint and GGUF for later runs.

    python benchmarks/serve.py --llama-server /path/to/llama-server --llama-cpp-python --engine --threads 2

`--json` keeps the numbers, `--plot PNG` draws them (tokens/s against the limit, p99 latencies).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mixlab.atomic import OutputError, atomic_file, check_destination, write_text  # noqa: E402
from mixlab.checkpoint import save_model  # noqa: E402
from mixlab.checkpoint.gguf import write_gguf  # noqa: E402
from mixlab.cli import positive  # noqa: E402
from mixlab.cli.benchmark import (  # noqa: E402
    _dense_bytes_per_layer,
    _expert_bytes,
    bandwidth_probe,
    measure_limits,
    sustained_bandwidth,
)
from mixlab.config import get_preset  # noqa: E402
from mixlab.model import Transformer  # noqa: E402
from mixlab.tokenizer import load_tokenizer  # noqa: E402

TOK = load_tokenizer()
PROMPT_LENS = (16, 24, 32, 40, 48)  # mean 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        for path in ("/health", "/v1/models"):  # llama-cpp-python's server has no /health
            try:
                if httpx.get(url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become healthy")


def one_request(http: httpx.Client, url: str, model: str, prompt: str, max_tokens: int,
                timeout: float) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    with http.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            if ev.get("choices"):
                stamps.append(time.perf_counter())
    tokens = int(usage["completion_tokens"]) if usage else len(stamps)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"ttft": stamps[0] - t0 if stamps else float("nan"), "gaps": gaps, "tokens": tokens}


def engine_request(engine: Any, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One request straight to an in-process `Engine` (what `mixlab serve` does for it, minus HTTP)."""
    from mixlab.engine import SamplingParams

    t0 = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    handle = engine.submit(TOK.encode(prompt, bos=True), SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    for out in handle:
        if out.token_id is not None:
            tokens += 1
            if out.text or out.finish_reason is not None:  # the server sends a chunk only for these
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"ttft": stamps[0] - t0 if stamps else float("nan"), "gaps": gaps, "tokens": tokens}


def load(url: str, model: str, clients: int, requests: int, max_tokens: int, seed: int, timeout: float,
         vocab: int, engine: Any = None) -> dict[str, Any]:
    rng = random.Random(seed)
    # text prompts (llama-cpp-python's server takes no token ids): random Mixtral tokens, decoded
    jobs = [[TOK.decode([rng.randrange(100, vocab - 100) for _ in range(PROMPT_LENS[(c + r) % len(PROMPT_LENS)] - 1)])
             for r in range(requests)] for c in range(clients)]
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    # Each client sets up before the clock starts and all start together, so that the client's own
    # set-up (an httpx.Client is milliseconds of Python) does not stagger the arrivals. Each request
    # opens its own loopback connection (llama-server may close a kept-alive one after a stream).
    start = threading.Barrier(clients + 1)

    def client(prompts: list[str]) -> None:
        with httpx.Client(trust_env=False, timeout=timeout, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            start.wait()
            for p in prompts:
                try:
                    res = (engine_request(engine, p, max_tokens) if engine is not None
                           else one_request(http, url, model, p, max_tokens, timeout))
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)
                    return
                res["prompt_tokens"] = len(TOK.encode(p, bos=True))  # the same text and tokenizer everywhere
                with lock:
                    results.append(res)

    threads = [threading.Thread(target=client, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    start.wait(timeout)
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout)
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]!r}")
    gaps = sorted(g for r in results for g in r["gaps"])
    ttfts = sorted(r["ttft"] for r in results)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")

    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "load": [(r["prompt_tokens"], r["tokens"]) for r in results],
            "tok_s": tokens / wall, "ttft_p50": pct(ttfts, 0.5), "ttft_p99": pct(ttfts, 0.99),
            "itl_p50": pct(gaps, 0.5), "itl_p99": pct(gaps, 0.99)}


@contextlib.contextmanager
def server_process(name: str, cmd: list[str], url: str, args: argparse.Namespace, log: Any) -> Iterator[None]:
    """A server running `cmd` until the block ends (its output goes to a log file in the temp folder)."""
    log(f"starting {name}: {' '.join(cmd)}")
    logfile = open(Path(tempfile.gettempdir()) / f"mixlab-serve-bench-{name.split()[0]}.log", "w")  # noqa: SIM115
    # (a pipe nobody reads would fill with llama.cpp's loading log and block the server)
    proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_healthy(url, proc, args.timeout)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        logfile.close()


@contextlib.contextmanager
def engine_in_process(hf: Path, args: argparse.Namespace, log: Any, *, torch_mixed: bool = False) -> Iterator[Any]:
    """The same model on an in-process `Engine` (no HTTP): what serving costs on top of the engine.
    `torch_mixed`: steps that carry a prompt chunk take the engine's PyTorch pass (as before the
    native mixed step), decoding-only steps stay native: the A/B of that step under this load."""
    from mixlab.checkpoint import load_model
    from mixlab.engine import Engine
    from mixlab.model.inference import prepare_for_inference

    log("starting the engine in-process (no HTTP)")
    model = prepare_for_inference(load_model(hf, dtype="bfloat16"))
    engine = Engine(model, TOK, max_batch=max(args.clients), token_budget=args.token_budget)
    if torch_mixed:
        run = engine.runner._native_batch
        engine.runner._native_batch = (  # type: ignore[method-assign]
            lambda items: None if any(len(it.tokens) > 1 for it in items) else run(items))
    steps: list[tuple[float, int, int]] = []  # each step's (seconds, tokens, prompt-chunk tokens)
    forward = engine.runner.forward

    def timed(items: list[Any]) -> Any:
        t0 = time.perf_counter()
        out = forward(items)
        steps.append((time.perf_counter() - t0, sum(len(it.tokens) for it in items),
                      sum(len(it.tokens) for it in items if len(it.tokens) > 1)))
        return out

    engine.runner.forward = timed  # type: ignore[method-assign]
    engine.bench_steps = steps  # type: ignore[attr-defined]
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown(timeout=30)


def measure(targets: list[tuple[str, str, Any]], args: argparse.Namespace, vocab: int,
            log: Any) -> list[dict[str, Any]]:
    """Every (name, url, engine) target at each client count, `--repeats` runs each, interleaved (round
    k runs the targets in a rotated order) so that drift in the machine's speed touches all alike; the
    median run by tokens/s is reported."""
    for _, url, engine in targets:
        load(url, "m", 2, 1, 8, 999, args.timeout, vocab, engine)  # warm-up
    probe, probe_bytes = bandwidth_probe(reps=1, mib=1024)  # as the outer probes: the weights span GBs

    def bandwidth() -> float:
        """The memory's read speed now (this machine's drifts by the minute), read without a break
        for 0.6 s after a 0.3 s pause (`sustained_bandwidth`). Right after a run a server's worker
        threads may still spin (OpenMP's wait policy), and a probe sharing the cores with them
        reads slower memory; and reads that follow idle time run slow until reading has gone on
        for a while. Either would understate the memory's speed and flatter the run's fraction."""
        time.sleep(0.3)
        return sustained_bandwidth(probe, probe_bytes, 0.6)

    out = []
    last = bandwidth()
    for clients in args.clients:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in targets}
        for k in range(args.repeats):
            for name, url, engine in targets[k % len(targets):] + targets[: k % len(targets)]:
                if engine is not None:
                    engine.bench_steps.clear()
                run = load(url, "m", clients, args.requests, args.max_tokens, args.seed + k, args.timeout, vocab,
                           engine)
                if engine is not None:
                    run["steps"] = list(engine.bench_steps)
                after = bandwidth()
                run["bandwidth"] = max(last, after)  # the probes on either side: the stricter limit
                last = after
                runs[name].append(run)
        for name, rs in runs.items():
            med = dict(sorted(rs, key=lambda r: r["tok_s"])[len(rs) // 2])
            med["tok_s_runs"] = [round(r["tok_s"], 1) for r in rs]
            med["bandwidth_runs"] = [r["bandwidth"] for r in rs]
            med["server"] = name
            log(f"  {name} {clients:>2} clients: {med['tok_s']:.1f} tok/s {med['tok_s_runs']}, TTFT p50 "
                f"{med['ttft_p50']*1e3:.0f} ms p99 {med['ttft_p99']*1e3:.0f} ms, ITL p50 {med['itl_p50']*1e3:.0f} ms "
                f"p99 {med['itl_p99']*1e3:.0f} ms")
            out.append(med)
    order = {name: i for i, (name, _, _) in enumerate(targets)}
    return sorted(out, key=lambda r: (order[r["server"]], r["clients"]))


def step_limit(cfg: Any, bandwidth: float, batch: int, elem: float = 2.0) -> float:
    """Tokens/s if a decoding step of `batch` sequences only had to stream its weights: dense weights
    once, and per layer the experts `batch` tokens are expected to touch (uniform routing)."""
    E, K = cfg.moe.num_experts, cfg.moe.top_k
    touched = E * (1 - (1 - K / E) ** batch)
    step_bytes = cfg.n_layers * (_dense_bytes_per_layer(cfg, elem) + touched * _expert_bytes(cfg, elem))
    step_bytes += cfg.vocab_size * cfg.dim * elem  # the output matrix (embedding rows read are negligible)
    return batch * bandwidth / step_bytes


def load_flops(cfg: Any, load: list[tuple[int, int]]) -> tuple[float, float]:
    """The FLOPs any server must spend on a load (each request: P prompt tokens, G generated), as
    (dense, experts): the P + G - 1 positions run through every layer (the last token is never fed
    back), each attending to the keys it sees, and the output matrix for the G tokens sampled."""
    E, K = cfg.moe.num_experts, cfg.moe.top_k
    attn = cfg.dim * (cfg.q_dim + 2 * cfg.kv_dim) + cfg.q_dim * cfg.dim
    dense = experts = 0.0
    for P, G in load:
        n = P + G - 1
        keys = sum(min(i + 1, cfg.sliding_window or i + 1) for i in range(n))
        dense += cfg.n_layers * (2 * (attn + cfg.dim * E) * n + 4 * cfg.q_dim * keys) + 2 * cfg.vocab_size * cfg.dim * G
        experts += cfg.n_layers * K * 2 * _expert_bytes(cfg, 1.0) * n  # 3 D F weights, 2 FLOPs each
    return dense, experts


def ceilings(cfg: Any, r: dict[str, Any], bandwidth: float, matmul: float) -> dict[str, float]:
    """What the machine allows on run r's load, as fractions of its weight-streaming limit: the
    limit's time (decoding steps of r["clients"] tokens, each streaming its weights at `bandwidth`)
    against the time its FLOPs take at the `matmul` peak (bf16, measured). `any`: no server can
    beat max(streaming, FLOPs); `serial`: the dense products (attention, output matrix) and the
    experts each at their own roofline max(bytes / bandwidth, FLOPs / peak), one after the other
    (the same cores stream and compute; a prompt's FLOPs may hide under the experts' streaming)."""
    E, K, B = cfg.moe.num_experts, cfg.moe.top_k, r["clients"]
    steps = r["tokens"] / B
    dense_s = steps * (cfg.n_layers * _dense_bytes_per_layer(cfg, 2.0) + cfg.vocab_size * cfg.dim * 2.0) / bandwidth
    expert_s = steps * cfg.n_layers * E * (1 - (1 - K / E) ** B) * _expert_bytes(cfg, 2.0) / bandwidth
    f_dense, f_experts = load_flops(cfg, r["load"])
    stream_s = dense_s + expert_s  # = tokens / step_limit(cfg, bandwidth, B)
    return {"flops": f_dense + f_experts, "stream_s": stream_s,
            "any": min(1.0, stream_s * matmul / (f_dense + f_experts)),
            "serial": stream_s / (max(dense_s, f_dense / matmul) + max(expert_s, f_experts / matmul))}


def breakdown(cfg: Any, r: dict[str, Any]) -> dict[str, float]:
    """Where an in-process engine run's time went (its step log): prompt steps (any step with a
    prompt chunk), decoding-only steps against their own limits at the run's bandwidth, gaps
    between steps; and `bound`, the fraction of the weight-streaming limit a server reaches on this
    run's schedule with decoding steps exactly at their limits, this prefill and no gaps. `own`: the
    run's tokens/s against its own median decoding step of every client (`full_step_s`), which the
    memory's drift moves little, since that step ran beside the rest in the same seconds (NaN if no
    step held them all)."""
    bw, steps = r["bandwidth"], r["steps"]
    prompt_s = sum(dt for dt, _, n in steps if n)
    decode = [(dt, n) for dt, n, p in steps if not p]
    decode_s = sum(dt for dt, _ in decode)
    at_limit_s = sum(n / step_limit(cfg, bw, n) for _, n in decode)
    full = sorted(dt for dt, n in decode if n == r["clients"])
    full_s = full[len(full) // 2] if full else float("nan")
    return {"prompt_s": prompt_s, "decode_s": decode_s, "gaps_s": r["wall_s"] - prompt_s - decode_s,
            "decode_of_limit": at_limit_s / decode_s if decode_s else float("nan"),
            "bound": r["tokens"] / (prompt_s + at_limit_s) / step_limit(cfg, bw, r["clients"]),
            "full_step_s": full_s, "own": r["tokens"] / r["wall_s"] * full_s / r["clients"]}


def plot(report: dict[str, Any], png: Path) -> None:
    """Aggregate tokens/s, the fraction of the weight-streaming limit (per run, as the table), p99
    time to first token and p99 inter-token latency against concurrent clients, one line per
    server; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    servers = list(dict.fromkeys(r["server"] for r in results))
    clients = sorted({r["clients"] for r in results})
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    panels = (("aggregate tokens/s", lambda r: r["tok_s"]),
              ("of the weight-streaming limit", lambda r: r["of_limit"]),
              ("p99 time to first token (ms)", lambda r: r["ttft_p99"] * 1e3),
              ("p99 inter-token latency (ms)", lambda r: r["itl_p99"] * 1e3))
    for server in servers:
        rs = sorted((r for r in results if r["server"] == server), key=lambda r: r["clients"])
        for ax, (_, value) in zip(axes, panels, strict=True):
            ax.plot([r["clients"] for r in rs], [value(r) for r in rs], "o-", label=server)
    ceiling = [sorted(r["ceilings"]["any"] for r in results if r["clients"] == c) for c in clients]
    axes[1].plot(clients, [cs[len(cs) // 2] for cs in ceiling], "k--", lw=1,
                 label="no server above (this load's FLOPs at the matmul peak)")
    axes[1].axhline(0.8, color="tab:red", ls=":", lw=1, label="target at 16 clients")
    axes[1].legend(fontsize=7)
    for ax, (title, _) in zip(axes, panels, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.set_xlabel("concurrent streaming clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes[0].legend(fontsize=8)
    bws = ", ".join(f"{b:.0f}" for b in report["bandwidth_GBs"])
    fig.suptitle(f"{report['preset']} bf16, {report['threads']} threads, {report['max_tokens']} greedy tokens "
                 f"per request, {report['requests_per_client']} requests per client (memory bandwidth before / after: "
                 f"{bws} GB/s)", fontsize=10)
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def llama_server_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return " ".join(line.strip() for line in (out.stdout + out.stderr).splitlines() if line.startswith("version"))


def prepare_models(cfg: Any, root: Path, seed: int, log: Any) -> tuple[Path, Path]:
    """The transformers checkpoint and the bf16 GGUF of the same random weights (kept in `root`)."""
    hf, gguf = root / "hf", root / "m-bf16.gguf"
    stamp = root / "done.json"
    want = {"config": repr(cfg), "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and gguf.is_file():
        log(f"reusing the model files in {root}")
        return hf, gguf
    log("building the model (random, bf16) ...")
    with torch.device("meta"):
        model = Transformer(cfg).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    model.init_weights(seed=seed)
    model.eval()
    save_model(model, hf, fmt="hf")
    write_gguf(model, gguf, quant="bf16")
    stamp.write_text(json.dumps(want))
    return hf, gguf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mini-moe")
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--clients", type=positive, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=positive, default=2, help="requests per client per run")
    ap.add_argument("--repeats", type=positive, default=3, help="runs per point (the median is reported)")
    ap.add_argument("--max-tokens", type=positive, default=48)
    ap.add_argument("--token-budget", type=positive, default=512,
                    help="mixlab's tokens per engine step (mixlab serve's default 512)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--llama-server", default=None, help="path to llama.cpp's llama-server binary")
    ap.add_argument("--llama-cpp-python", action="store_true", help="also python -m llama_cpp.server")
    ap.add_argument("--engine", action="store_true",
                    help="also the same load on an in-process Engine (no HTTP): the cost of serving")
    ap.add_argument("--engine-torch-mixed", action="store_true",
                    help="also an in-process engine whose steps with a prompt chunk take the PyTorch pass")
    ap.add_argument("--skip-mixlab", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, metavar="PNG",
                    help="also draw tokens/s and p99 latencies against clients per server (needs matplotlib)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--model-dir", default=None,
                    help="keep the checkpoint and GGUF here and reuse them in later runs (default: a temporary folder)")
    args = ap.parse_args()
    if args.token_budget < 1:
        raise SystemExit(f"--token-budget must be >= 1, not {args.token_budget}")
    for flag, dst in (("--json", args.json), ("--plot", args.plot)):  # refused now, not after the run
        if dst:
            try:
                check_destination(dst, kind="file")
            except OutputError as e:
                raise SystemExit(f"{flag}: {e}") from None
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    load_before = os.getloadavg()
    log("measuring memory bandwidth and matmul throughput ...")
    lims = [measure_limits(reps=5)]
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="mixlab-serve-bench-") as tmp:
        root = Path(args.model_dir) if args.model_dir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        hf, gguf = prepare_models(cfg, root, args.seed, log)
        n_ctx_slot = max(PROMPT_LENS) + args.max_tokens + 16
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        targets: list[tuple[str, str, Any]] = []
        peers: list[str] = []
        versions = {"torch": torch.__version__}
        with contextlib.ExitStack() as stack:
            if not args.skip_mixlab:
                port = free_port()
                cmd = ["env", f"PYTHONPATH={env['PYTHONPATH']}", sys.executable, "-m", "mixlab", "serve", "--model",
                       str(hf), "--port", str(port), "--dtype", "bfloat16", "--threads", str(args.threads),
                       "--max-batch", str(max(args.clients)), "--token-budget", str(args.token_budget),
                       "--served-model-name", "m", "--log-level", "warning"]
                stack.enter_context(server_process("mixlab serve", cmd, f"http://127.0.0.1:{port}", args, log))
                targets.append(("mixlab serve", f"http://127.0.0.1:{port}", None))
            if args.engine:
                targets.append(("engine (in-process)", "", stack.enter_context(engine_in_process(hf, args, log))))
            if args.engine_torch_mixed:
                targets.append(("engine, mixed steps on PyTorch", "",
                                stack.enter_context(engine_in_process(hf, args, log, torch_mixed=True))))
            if args.llama_server:
                port = free_port()
                peers.append("llama-server")
                versions["llama-server"] = llama_server_version(args.llama_server)
                cmd = [args.llama_server, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t",
                       str(args.threads), "-tb", str(args.threads), "-np", str(max(args.clients)), "-c",
                       str(n_ctx_slot * max(args.clients)), "--cont-batching", "--no-webui", "-ngl", "0"]
                stack.enter_context(server_process("llama-server", cmd, f"http://127.0.0.1:{port}", args, log))
                targets.append(("llama-server", f"http://127.0.0.1:{port}", None))
            if args.llama_cpp_python:
                import llama_cpp

                port = free_port()
                peers.append("llama-cpp-python[server]")
                versions["llama-cpp-python"] = llama_cpp.__version__
                cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                       "--port", str(port), "--n_threads", str(args.threads), "--n_ctx", str(n_ctx_slot * 2),
                       "--model_alias", "m",
                       "--interrupt_requests", "False"]  # by default a new request cuts the running stream short
                stack.enter_context(server_process(peers[-1], cmd, f"http://127.0.0.1:{port}", args, log))
                targets.append((peers[-1], f"http://127.0.0.1:{port}", None))
            results = measure(targets, args, cfg.vocab_size, log)
    log("measuring memory bandwidth and matmul throughput again ...")
    lims.append(measure_limits(reps=5))
    bws = [lim["bandwidth"] for lim in lims]
    bw = max(bws)  # the machine's best: the stricter limit
    matmul = max(lim["matmul"] for lim in lims)  # the faster peak: the more generous ceiling

    for r in results:  # each run against the bandwidth probed beside it; the median of those fractions
        fracs = [t / step_limit(cfg, b, r["clients"])
                 for t, b in zip(r["tok_s_runs"], r["bandwidth_runs"], strict=True)]
        r["of_limit"] = sorted(fracs)[len(fracs) // 2]
        r["limit_tok_s"] = step_limit(cfg, r["bandwidth"], r["clients"])  # the median run's
        r["limit_tok_s_whole_run"] = step_limit(cfg, bw, r["clients"])  # at the best of the outer probes
        r["ceilings"] = ceilings(cfg, r, r["bandwidth"], matmul)
        if "steps" in r:
            r["breakdown"] = breakdown(cfg, r)
            del r["steps"]
    report = {"preset": args.preset, "threads": args.threads, "max_tokens": args.max_tokens,
              "requests_per_client": args.requests, "repeats": args.repeats, "prompt_lens": PROMPT_LENS,
              "bandwidth_GBs": [b / 1e9 for b in bws], "matmul_GFLOPs": [lim["matmul"] / 1e9 for lim in lims],
              "peers": peers, "versions": versions,
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "results": results}
    if args.json:
        write_text(args.json, json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, Path(args.plot))
        log(f"wrote {args.plot}")
    cols = "".join(f" vs {p} |" for p in peers)
    print(f"| server | clients | tokens/s (runs) |{cols} of weight-streaming limit: per run (at the outer probes' "
          f"best) | TTFT p50 / p99 (ms) "
          f"| ITL p50 / p99 (ms) |\n|---|---|---|{'---|' * len(peers)}---|---|---|")
    by = {(r["server"], r["clients"]): r for r in results}
    for r in results:
        ratios = ""
        for peer in peers:
            p = by.get((peer, r["clients"]))
            ratios += f" {r['tok_s'] / p['tok_s']:.2f}x |" if p else " - |"
        print(f"| {r['server']} | {r['clients']} | {r['tok_s']:.1f} ({', '.join(map(str, r['tok_s_runs']))}) |"
              f"{ratios} {r['of_limit']:.0%} ({r['tok_s'] / r['limit_tok_s_whole_run']:.0%} of "
              f"{r['limit_tok_s_whole_run']:.0f}) | "
              f"{r['ttft_p50']*1e3:.0f} / {r['ttft_p99']*1e3:.0f} | {r['itl_p50']*1e3:.0f} / {r['itl_p99']*1e3:.0f} |")
    print("\nThe issue's form of the limit, \"about 4.8x its batch-1 rate\": each server's rate against its own "
          "1-client rate times the weight-streaming limits' ratio (a measure of batching alone: a batch-1 rate "
          "below the bandwidth's lowers this limit with it)", end="")
    for r in results:
        one = by.get((r["server"], 1))
        if one and r["clients"] > 1:
            scale = step_limit(cfg, 1.0, r["clients"]) / step_limit(cfg, 1.0, 1)
            print(f"\n- {r['server']}, {r['clients']} clients: {r['tok_s']:.1f} against {one['tok_s']:.1f} x "
                  f"{scale:.2f} = {one['tok_s'] * scale:.1f} tok/s: {r['tok_s'] / (one['tok_s'] * scale):.0%}", end="")
    print()
    for r in results:
        if "breakdown" in r:
            b = r["breakdown"]
            print(f"\n{r['server']}, {r['clients']} clients (its median run, {r['wall_s']:.2f} s): steps with prompt "
                  f"tokens {b['prompt_s']:.2f} s, decoding-only steps {b['decode_s']:.2f} s at "
                  f"{b['decode_of_limit']:.2f} of their limits, gaps {b['gaps_s']:.2f} s; with those steps at their "
                  f"limits, this prefill and no gaps: {b['bound']:.0%} of the weight-streaming limit; its tokens/s "
                  f"against its own median {r['clients']}-sequence decoding step ({b['full_step_s'] * 1e3:.1f} ms): "
                  f"{b['own']:.0%}", end="")
    print(f"\n\nWhat this machine allows (the median run's bandwidth, matmul {matmul / 1e9:.0f} GFLOP/s: the faster "
          "probe), as fractions of the weight-streaming limit:", end="")
    for clients in sorted({r["clients"] for r in results}):
        rs = [r for r in results if r["clients"] == clients]
        c = [r["ceilings"] for r in rs]

        def each(key: str, fmt: str, c: list[dict[str, float]] = c) -> str:
            return ", ".join(format(x[key], fmt) for x in c)

        print(f"\n- {clients} clients: the load's {c[0]['flops'] / 1e9:.0f} GFLOP at that peak against the limit's "
              f"{each('stream_s', '.2f')} s of streaming: no server above {each('any', '.0%')}; dense products and "
              f"experts each at their own roofline, one after the other: {each('serial', '.0%')} "
              f"({', '.join(r['server'] for r in rs)})", end="")
    print(f"\n\nmemory bandwidth {', '.join(f'{b / 1e9:.1f}' for b in bws)} GB/s (before, after: the limit in "
          f"brackets uses the higher; per run: the stricter of the probes right before and after it, median of the "
          f"runs' fractions); {args.threads} threads; {args.requests} requests per client, {args.repeats} runs per "
          f"point; "
          f"load average before {load_before}, after {os.getloadavg()}; {versions}")


if __name__ == "__main__":
    main()
