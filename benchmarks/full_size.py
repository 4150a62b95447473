"""A full-size run: a random Mixtral-8x7B-shaped int4 (GGUF Q4_0) checkpoint, ~26 GB, decoded with
expert offloading under a budget that fits a 24 GB machine.

1. Writes the file tensor by tensor (random Q4_0 blocks: random nibbles, float16 scales of random
   sign around 0.003, so weights have mean 0 and a standard deviation near 0.014; norms 1, routers float32 N(0, 0.02)):
   at most one tensor (264 MB) is in memory at a time. The file is fsynced and dropped from the
   page cache, so decoding starts cold.
2. In a fresh process (its own peak RSS): `load_model(file, dtype=bfloat16, max_memory=BUDGET)`
   (attention and output stay int4 and resident, the embedding is dequantised to bf16, experts
   stay in the file), `prepare_for_inference`, a 1-token prompt, `--tokens` decode steps sampled
   at temperature 1 (seeded: greedy decoding of random weights repeats one token, whose routing
   then never changes and every expert hits).
   Reports tokens/s, hit rate, bytes read, time waited, resident size and peak RSS.
3. Deletes the file (unless `--keep`).

    python benchmarks/full_size.py --budget 8GB --tokens 6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mixlab.cli import positive
from mixlab.config import parse_bytes
from offload import peak_rss  # benchmarks/offload.py (this script's folder is on sys.path)


def _q4_0(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random Q4_0 bytes for a tensor of `shape` (torch order): blocks of 2 scale bytes + 16 nibble bytes."""
    rows = int(np.prod(shape[:-1]))
    blocks = shape[-1] // 32
    out = rng.integers(0, 256, size=(rows, blocks, 18), dtype=np.uint8)
    # Random signs: codes 0..15 give weights (q - 8) * d with mean -d/2 per block; a scale of random
    # sign makes the mean zero (else every hidden state drifts along one direction and the router
    # sends every token to the same experts).
    sign = rng.integers(0, 2, size=(rows, blocks)) * 2 - 1
    scales = (0.003 * sign * (1 + 0.25 * rng.standard_normal((rows, blocks)))).astype(np.float16)
    out[..., :2] = scales.view(np.uint8).reshape(rows, blocks, 2)
    return out.reshape(-1)


def _q4_k(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K bytes for a tensor of `shape`: super-blocks of 256 weights in 144 bytes (float16 d
    and dmin, 12 bytes of 6-bit scales and mins, 128 nibble bytes), w = d x sc x q - dmin x m. Each
    scale byte is 0x11 x k (k in 1..3), which makes every sub-block's min equal its scale, and dmin =
    7.5 d, so w = d x sc x (q - 7.5): mean 0; d of random sign, as `_q4_0`'s scales."""
    rows = int(np.prod(shape[:-1]))
    blocks = shape[-1] // 256
    out = rng.integers(0, 256, size=(rows, blocks, 144), dtype=np.uint8)
    out[..., 4:16] = (0x11 * rng.integers(1, 4, size=(rows, blocks))).astype(np.uint8)[..., None]
    sign = rng.integers(0, 2, size=(rows, blocks)) * 2 - 1
    d = (0.0001 * sign * (1 + 0.25 * rng.standard_normal((rows, blocks)))).astype(np.float16)
    out[..., :2] = d.view(np.uint8).reshape(rows, blocks, 2)
    out[..., 2:4] = (7.5 * d.astype(np.float32)).astype(np.float16).view(np.uint8).reshape(rows, blocks, 2)
    return out.reshape(-1)


def write_random_q4(path: Path, preset: str, ftype: str = "q4_0") -> int:
    import gguf
    from gguf import GGMLQuantizationType as Q

    from mixlab.checkpoint.gguf import gguf_writer
    from mixlab.config import get_preset

    c = get_preset(preset)
    assert c.moe is not None
    D, F, E, V, q, kv = c.dim, c.ffn_dim, c.moe.num_experts, c.vocab_size, c.q_dim, c.kv_dim
    ft = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_M}[ftype]
    w = gguf_writer(c, name=f"random {preset} {ftype}", file_type=int(ft))
    Q4 = Q.Q4_0 if ftype == "q4_0" else Q.Q4_K
    plan: list[tuple[str, tuple[int, ...], object]] = [("token_embd.weight", (V, D), Q4)]
    for i in range(c.n_layers):
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", (D,), Q.F32), (b + "attn_q.weight", (q, D), Q4),
                 (b + "attn_k.weight", (kv, D), Q4), (b + "attn_v.weight", (kv, D), Q4),
                 (b + "attn_output.weight", (D, q), Q4), (b + "ffn_norm.weight", (D,), Q.F32),
                 (b + "ffn_gate_inp.weight", (E, D), Q.F32), (b + "ffn_gate_exps.weight", (E, F, D), Q4),
                 (b + "ffn_up_exps.weight", (E, F, D), Q4), (b + "ffn_down_exps.weight", (E, D, F), Q4)]
    plan += [("output_norm.weight", (D,), Q.F32), ("output.weight", (V, D), Q4)]
    for name, shape, qt in plan:
        block, size = gguf.GGML_QUANT_SIZES[qt]  # type: ignore[index]
        w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) // block * size, raw_dtype=qt)
    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".tmp")
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, qt in plan:
        if qt == Q.Q4_0:
            data = _q4_0(shape, rng)
        elif qt == Q.Q4_K:
            data = _q4_k(shape, rng)
        elif name.endswith("norm.weight"):
            data = np.ones(shape, dtype=np.float32)
        else:
            data = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        w.write_tensor_data(data)
        del data
    w.close()
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # start cold
    tmp.rename(path)
    return path.stat().st_size


def decode(args: argparse.Namespace) -> dict:
    from mixlab import load_model
    from mixlab.cache import KVCache
    from mixlab.checkpoint.offload import resident_bytes
    from mixlab.generate import generate_stream
    from mixlab.model.formats import expert_cache
    from mixlab.model.inference import prepare_for_inference

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    quant = "int4" if args.ftype == "q4_k" else None  # as `mixlab generate`'s --quant auto runs a Q4_K file
    model = prepare_for_inference(load_model(args.path, dtype="bfloat16", max_memory=args.budget, quant=quant,
                                             policy=args.policy, prefetch=not args.no_prefetch), quant=quant)
    load_s = time.perf_counter() - t0
    cache = expert_cache(model)
    assert cache is not None
    cache.prefetch_gate = not args.prefetch_always
    with open("/proc/self/statm") as f:
        rss_loaded = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    kv = KVCache(model.config, batch_size=1, max_len=64, dtype=torch.bfloat16)
    times = [time.perf_counter()]
    tokens = []
    for n, step in enumerate(generate_stream(model, [[model.config.bos_id]], max_new_tokens=args.tokens + 1,
                                             cache=kv, temperature=1.0, seed=0, stop_at_eos=False)):
        times.append(time.perf_counter())
        tokens.append(step.tokens[0])
        if n == 0:
            first = dict(cache.stats.as_dict())
            cache.reset_stats()
    st = cache.stats
    out = dict(load_s=load_s, first_token_s=times[1] - times[0], decode_tokens=len(times) - 2,
               decode_tok_s=(len(times) - 2) / (times[-1] - times[1]),
               step_s=[b - a for a, b in zip(times, times[1:], strict=False)],
               tokens=tokens, first_step=first, decode=st.as_dict(), slots=cache.num_slots,
               experts=cache.num_layers * cache.num_experts, expert_bytes=cache.expert_bytes,
               resident_weight_bytes=resident_bytes(model), rss_loaded=rss_loaded,
               peak_rss=peak_rss(), budget=cache.budget, read_s_mean=cache.read_s_mean,
               window_s_mean=cache.window_s_mean)
    cache.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mixtral-8x7b")
    ap.add_argument("--dir", default="/work/runs/full-size")
    ap.add_argument("--budget", default="8GB")
    ap.add_argument("--tokens", type=positive, default=6)
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--policy", default="lru", choices=["lru", "lfu"])
    ap.add_argument("--no-prefetch", action="store_true")
    ap.add_argument("--prefetch-always", action="store_true",
                    help="read every guess (by default only while a read fits in the compute between two layers)")
    ap.add_argument("--keep", action="store_true", help="keep the file (and reuse it if present)")
    ap.add_argument("--ftype", default="q4_0", choices=["q4_0", "q4_k"],
                    help="the file's matrices: Q4_0 (kept int4: experts read as stored) or Q4_K (as in Q4_K_M "
                         "downloads: experts dequantised and rounded to int4 as read)")
    ap.add_argument("--decode-only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:  # now, not after minutes of writing the file
        parse_bytes(args.budget, what="--budget")
    except ValueError as e:
        ap.error(str(e))
    if args.decode_only:
        args.path = args.decode_only
        print(json.dumps(decode(args)))
        return
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"random-{args.preset}-{args.ftype}.gguf"
    try:
        if not path.exists():
            t0 = time.perf_counter()
            size = write_random_q4(path, args.preset, args.ftype)
            dt = time.perf_counter() - t0
            print(f"wrote {path} ({size / 1e9:.2f} GB) in {dt:.0f} s ({size / dt / 1e9:.2f} GB/s); "
                  f"writer peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB", flush=True)
        with open(path, "rb") as f:  # every run starts cold, a reused file too (--keep)
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        cmd = [sys.executable, __file__, "--decode-only", str(path), "--budget", args.budget, "--tokens",
               str(args.tokens), "--threads", str(args.threads), "--policy", args.policy, "--ftype", args.ftype]
        if args.no_prefetch:
            cmd.append("--no-prefetch")
        if args.prefetch_always:
            cmd.append("--prefetch-always")
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            raise SystemExit(res.returncode)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        d = r["decode"]
        gb = 1e9
        print(f"budget {r['budget'] / gb:.2f} GB = {r['slots']} of {r['experts']} experts "
              f"({r['expert_bytes'] / 1e6:.1f} MB each, int4); policy {args.policy}, "
              f"prefetch {'no' if args.no_prefetch else 'always' if args.prefetch_always else 'yes'}; "
              f"{args.threads} threads")
        print(f"load {r['load_s']:.1f} s; first token (1-token prompt) {r['first_token_s']:.1f} s")
        print(f"decode: {r['decode_tokens']} tokens at {r['decode_tok_s']:.3f} tokens/s "
              f"(steps {', '.join(f'{s:.1f}' for s in r['step_s'][1:])} s); hit rate {d['hit_rate']:.1%} "
              f"({d['hits']} hits, {d['misses']} misses); read {d['bytes_read'] / gb:.2f} GB in {d['read_s']:.1f} s "
              f"({d['bytes_read'] / max(d['read_s'], 1e-9) / gb:.2f} GB/s); waited {d['wait_s']:.1f} s; "
              f"prefetched {d['prefetched']} (used {d['prefetch_used']}, cancelled {d['prefetch_cancelled']}, "
              f"failed {d['prefetch_failed']}; guesses skipped {d['prefetch_skipped']})")
        if r["read_s_mean"] is not None and r["window_s_mean"] is not None:
            print(f"running means: one expert's read {r['read_s_mean'] * 1e3:.1f} ms, compute between two layers "
                  f"{r['window_s_mean'] * 1e3:.1f} ms")
        target = 1.1 * (r["budget"] + r["rss_loaded"])
        print(f"resident weights {r['resident_weight_bytes'] / gb:.2f} GB; RSS after load "
              f"{r['rss_loaded'] / gb:.2f} GB; peak RSS {r['peak_rss'] / gb:.2f} GB (target <= 1.1 x (budget + "
              f"RSS after load) = {target / gb:.2f} GB: {'met' if r['peak_rss'] <= target else 'NOT met'})")
        print(f"tokens: {r['tokens']}")
    finally:
        if not args.keep and path.exists():
            path.unlink()
            print(f"deleted {path}")


if __name__ == "__main__":
    main()
