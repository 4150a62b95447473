"""The inference benchmark behind `mixlab bench`: mixlab against transformers and llama.cpp, in one
process, on the same weights and thread count, each figure also as a fraction of the machine's limit
measured in the same run. A tool on top of the library, so it lives in the CLI layer (nothing in the
package imports it; the scripts in benchmarks/ reuse its peers and limit probes).

What is measured (`run_bench`):
- limits: memory read bandwidth (the fastest of three streaming reads of a large float32 tensor: a
  sum, PyTorch's and mixlab's native matrix-vector product; re-measured interleaved with the peers
  for decoding, the higher counts) and bf16 matmul throughput (a large square bf16 matmul), the two
  roofs every figure is compared to;
- prefill tokens/s for prompts of P tokens (the last position's logits, as generation needs);
- decode tokens/s at batch B after a 128-token prompt (greedy, one token per step);
- the MoE layer alone (router + experts) for T tokens.

The limit of a measurement is the roofline time max(bytes it must read / bandwidth, FLOPs it must
do / matmul peak); "of limit" is that time over the measured time (1.0 = at the roof). Bytes count
every weight a step touches once (the experts actually chosen, counted from the router), FLOPs are
2 per multiply-add of the matmuls (attention scores included).

Peers run in the same process, interleaved repetition by repetition, so load from other processes
hits all of them alike; medians of `reps` (>= 5) after warm-up. A peer that is not installed is
skipped with a note naming the extra that installs it (`PEERS_EXTRA`). Weights are random
(`init_weights`), identical for every peer: mixlab's model is saved as a transformers folder and as
GGUF files that the peers load.

Shape legend: B batch, T tokens, P prompt tokens, D width, V vocabulary.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixlab.cache import KVCache
from mixlab.config import ModelConfig, get_preset
from mixlab.generate import decode_step, greedy_step
from mixlab.model import MoEBlock, Transformer
from mixlab.model.inference import prepare_for_inference
from mixlab.ops import native
from mixlab.pages import huge_empty

# what installs the peers (pyproject's `peers` extra: transformers, gguf, llama-cpp-python)
PEERS_EXTRA = "pip install 'mixlab[peers]'"


@dataclass
class Row:
    """One measured figure: `value` in `unit` (higher is better), and the roofline time it could take."""

    section: str
    case: str
    peer: str
    value: float
    unit: str
    limit_s: float
    median_s: float

    @property
    def of_limit(self) -> float:
        return self.limit_s / self.median_s if self.median_s > 0 else float("nan")


@dataclass
class Report:
    settings: dict[str, Any]
    limits: dict[str, float]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        out = ["# mixlab bench", ""]
        out += [f"- {k}: {v}" for k, v in self.settings.items()]
        out.append(f"- memory read bandwidth: {self.limits['bandwidth'] / 1e9:.1f} GB/s; "
                   f"bf16 matmul: {self.limits['matmul'] / 1e9:.0f} GFLOP/s (measured in this run)")
        out += [f"- note: {n}" for n in self.notes]
        for section in dict.fromkeys(r.section for r in self.rows):
            rows = [r for r in self.rows if r.section == section]
            ours = [p for p in ("mixlab", "mixlab-int8", "mixlab-int8-act8", "mixlab-int4", "mixlab-int4-exact",
                                "mixlab-q4_k_m")
                    if any(r.peer == p for r in rows)]
            header = ["case", "peer", rows[0].unit, "of limit", *(f"{p} ÷ this" for p in ours)]
            out += ["", f"## {section}", "", "| " + " | ".join(header) + " |",
                    "|---|---|" + "---:|" * (len(header) - 2)]
            for case in dict.fromkeys(r.case for r in rows):
                by_peer = {r.peer: r for r in rows if r.case == case}
                for r in by_peer.values():
                    ratios = [f"{by_peer[p].value / r.value:.2f}x" if p in by_peer and p != r.peer else ""
                              for p in ours]
                    cells = [case, r.peer, f"{r.value:,.1f}", f"{r.of_limit:.0%}", *ratios]
                    out.append("| " + " | ".join(cells) + " |")
        return "\n".join(out) + "\n"


def _median_time(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                 log: Callable[[str], None] | None = None, before: Callable[[], object] | None = None
                 ) -> dict[str, float]:
    """Median seconds of each function, run round-robin so that machine load hits all alike;
    `before` runs (untimed) before each timed call."""
    return {k: statistics.median(v) for k, v in _interleaved_runs(fns, reps, warmup, log, before).items()}


def _interleaved_runs(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                      log: Callable[[str], None] | None = None, before: Callable[[], object] | None = None
                      ) -> dict[str, list[float]]:
    """The seconds of every repetition of each function (see `_interleaved`)."""
    for k, fn in fns.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        if log:
            log(f"  warm-up {k}: {time.perf_counter() - t0:.2f} s")
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def bandwidth_probe(*, reps: int = 5, mib: int = 1024) -> tuple[Callable[[], object], int]:
    """The fastest streaming read of `mib` MiB this machine offers, and the bytes it reads: the
    fastest of a float32 sum, PyTorch's float32 matrix-vector product (MKL streams its matrix near
    the memory's speed) and, when built, mixlab's native one (whose sequential row reads beat both
    on some CPUs: without it, mixlab's own decoding could show more than 100% of the "limit"). The
    buffer sits on 2 MiB pages, as the weights decoding reads do (`NativeDecoder`): on 4 KiB pages
    the same reads ran 0.90-0.93x as fast (BENCHMARKS.md, "The bandwidth probe on huge pages")."""
    big = huge_empty((mib * 2**20 // 4,), torch.float32).fill_(1.0)
    mat = big.view(-1, 4096)
    vec = torch.ones(1, 4096)
    reads: list[Callable[[], object]] = [big.sum, functools.partial(torch.nn.functional.linear, vec, mat)]
    if native.load() is not None:  # the benchmark builds the kernels (what inference preparation does)
        reads.append(functools.partial(native.gemv, mat, vec[0]))
    _keep_reading(big.sum, 0.3)  # reads after idle time run slow until reading has gone on (`sustained_bandwidth`)
    return min(reads, key=lambda fn: _median_time(fn, reps)), big.numel() * 4


def _keep_reading(fn: Callable[[], object], seconds: float) -> list[float]:
    """Call `fn` without a break for `seconds`; each call's duration."""
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or not times:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def sustained_bandwidth(probe: Callable[[], object], nbytes: int, seconds: float = 0.6) -> float:
    """Bytes/s of `probe` (from `bandwidth_probe`) read without a break for `seconds`: the median of
    the reads in the second half. Reads that follow idle time run slow until reading has gone on
    for a while (on an AMD EPYC host, single 256 MiB reads 0.25 s apart read 33-78 GB/s where
    reading without a break holds 90-95; BENCHMARKS.md, "The serving probe"), so a few reads after
    a pause understate the memory's speed and flatter every fraction of it."""
    times = _keep_reading(probe, seconds)
    return nbytes / statistics.median(times[len(times) // 2 :])


def measure_limits(*, reps: int = 5, mib: int = 1024, n: int = 2048) -> dict[str, float]:
    """Memory read bandwidth (bytes/s, `sustained_bandwidth`) and bf16 matmul throughput (FLOP/s)
    of this machine now."""
    probe, nbytes = bandwidth_probe(reps=reps, mib=mib)
    bandwidth = sustained_bandwidth(probe, nbytes, max(0.6, 0.12 * reps))
    del probe
    a = torch.randn(n, n).bfloat16()
    b = torch.randn(n, n).bfloat16()
    matmul = 2 * n**3 / _median_time(lambda: a @ b, reps)
    return {"bandwidth": bandwidth, "matmul": matmul}


# -- what a step must read and compute --------------------------------------------------------


def _dense_bytes_per_layer(cfg: ModelConfig, elem: float) -> float:
    attn = cfg.dim * (cfg.q_dim + 2 * cfg.kv_dim) + cfg.q_dim * cfg.dim
    router = cfg.dim * cfg.moe.num_experts * 4 if cfg.moe else 0  # kept in float32
    return attn * elem + router


def _expert_bytes(cfg: ModelConfig, elem: float) -> float:
    return 3 * cfg.dim * cfg.ffn_dim * elem


def _matmul_flops_per_token(cfg: ModelConfig, ctx: float) -> float:
    """FLOPs of one token: every active matrix (2 per weight) plus attention over `ctx` keys."""
    counts = cfg.param_counts()
    active_matrices = counts["active"] - counts["embedding"] - counts["norms"]
    return 2 * active_matrices + 4 * ctx * cfg.q_dim * cfg.n_layers


# -- peers ------------------------------------------------------------------------------------


class Peer:
    """One implementation under test: prefill P tokens; decode steps at batch B; the MoE layer."""

    name: str = ""
    elem_bytes: float = 2.0  # bytes per weight element

    def prefill(self, tokens_BT: torch.Tensor) -> None: ...
    def start_decode(self, prompt_BT: torch.Tensor, steps: int) -> None: ...
    def decode(self) -> None: ...
    def moe_layer(self, x_BTD: torch.Tensor) -> object: ...


class MixlabPeer(Peer):
    def __init__(self, model: Transformer, name: str, elem_bytes: float = 2.0) -> None:
        self.model, self.name, self.elem_bytes = model, name, elem_bytes
        self.cfg = model.config
        self.dtype = model.tok_embeddings.weight.dtype

    def _last_logits(self, tokens_BT: torch.Tensor, cache: KVCache) -> torch.Tensor:
        h_BTD = self.model.forward_output(tokens_BT, cache=cache, logits=False, last_only=True).hidden_BTD
        return self.model.output(h_BTD[:, -1])

    def prefill(self, tokens_BT: torch.Tensor) -> None:
        cache = KVCache(self.cfg, batch_size=tokens_BT.shape[0], max_len=tokens_BT.shape[1], dtype=self.dtype,
                        prefill_chunk=tokens_BT.shape[1])
        with torch.inference_mode():
            self._last_logits(tokens_BT, cache)

    def start_decode(self, prompt_BT: torch.Tensor, steps: int) -> None:
        B, P = prompt_BT.shape
        self.cache = KVCache(self.cfg, batch_size=B, max_len=P + steps, dtype=self.dtype, prefill_chunk=P)
        with torch.inference_mode():
            self.next_B1 = self._last_logits(prompt_BT, self.cache).argmax(-1, keepdim=True)
        self.next = int(self.next_B1[0, 0])

    def decode(self) -> None:
        with torch.inference_mode():
            if self.next_B1.shape[0] == 1:  # a greedy decoding loop's step: native kernels when prepared
                self.next = greedy_step(self.model, self.next, self.cache.t, self.cache)
                return
            positions_B1 = torch.full_like(self.next_B1, self.cache.t)
            logits_BV, _ = decode_step(self.model, self.next_B1, positions_B1, self.cache)
            self.next_B1 = logits_BV.argmax(-1, keepdim=True)

    def moe_layer(self, x_BTD: torch.Tensor) -> object:
        block = self.model.layers[0].ffn
        assert isinstance(block, MoEBlock)
        with torch.inference_mode():
            return block(x_BTD)


class TransformersPeer(Peer):
    def __init__(self, model: Any, impl: str) -> None:
        self.model, self.impl = model, impl
        self.name = f"transformers-{impl}"

    def _use(self) -> None:
        self.model.set_experts_implementation(self.impl)

    def prefill(self, tokens_BT: torch.Tensor) -> None:
        self._use()
        with torch.inference_mode():
            self.model(tokens_BT, use_cache=True, logits_to_keep=1)

    def start_decode(self, prompt_BT: torch.Tensor, steps: int) -> None:
        self._use()
        with torch.inference_mode():
            out = self.model(prompt_BT, use_cache=True, logits_to_keep=1)
        self.kv, self.next_B1 = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)

    def decode(self) -> None:
        self._use()
        with torch.inference_mode():
            out = self.model(self.next_B1, cache=self.kv, use_cache=True, logits_to_keep=1)
        self.kv, self.next_B1 = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)

    def moe_layer(self, x_BTD: torch.Tensor) -> object:
        self._use()
        with torch.inference_mode():
            return self.model.model.layers[0].mlp(x_BTD)


class LlamaCppPeer(Peer):
    """llama.cpp through llama-cpp-python; its Llama API decodes one sequence, so batch 1 only.

    Decoding is greedy as llama.cpp itself does it (`llama-cli --temp 0`, `llama-server`): each step's
    token comes from llama.cpp's greedy sampler over the logits it has just computed, in C, as
    mixlab's `greedy_step` takes its argmax in C. (`Llama.eval` with `logits_all=False` does not
    copy logits into `Llama.scores`: reading that array fed token 0 at every step, one unchanging
    routing, which ran ~3-4% faster than real decoding; BENCHMARKS.md.)"""

    def __init__(self, path: Path, name: str, threads: int, n_ctx: int, elem_bytes: float) -> None:
        import llama_cpp

        self.name, self.elem_bytes = name, elem_bytes
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, logits_all=False, verbose=False)
        self._greedy = llama_cpp.llama_sampler_init_greedy()

    def prefill(self, tokens_BT: torch.Tensor) -> None:
        self.llm.reset()
        self.llm.eval(tokens_BT[0].tolist())

    def start_decode(self, prompt_BT: torch.Tensor, steps: int) -> None:
        self.prefill(prompt_BT)
        self._next()

    def _next(self) -> None:
        import llama_cpp

        self.next = int(llama_cpp.llama_sampler_sample(self._greedy, self.llm.ctx, -1))

    def decode(self) -> None:
        self.llm.eval([self.next])
        self._next()

    def close(self) -> None:
        import llama_cpp

        llama_cpp.llama_sampler_free(self._greedy)
        self.llm.close()


def llama_quantize(src: Path, dst: Path, ftype: str, *, threads: int = 2, pure: bool = False) -> Path:
    """A GGUF of `src` made by llama.cpp's own quantiser (`llama_model_quantize`, llama-cpp-python) as
    `ftype` ("Q4_0", "Q4_K_M", ...): with llama.cpp's mix of types for it (Q4_K_M: Q4_K, some matrices
    Q5_K / Q6_K / Q8_0; Q4_0: the output matrix wider), or with `pure` every matrix `ftype`."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    params.pure = pure
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {src} ({ftype})")
    return dst


def _matrix_bytes_per_weight(path: Path) -> float:
    """Bytes per weight of the matrices a GGUF file's decoding streams (attention, experts, output; not the
    embedding), averaged over their weights: one figure for a mix of types (Q4_K_M's Q4_K and Q6_K)."""
    from mixlab.checkpoint.gguf_read import read_header

    mats = [t for name, t in read_header(path).tensors.items() if len(t.shape) >= 2 and name != "token_embd.weight"
            and not name.endswith("ffn_gate_inp.weight")]  # the router: float32, counted apart
    return sum(t.nbytes for t in mats) / sum(math.prod(t.shape) for t in mats)


def _int4_of_gguf(path: Path) -> Transformer:
    """A quantised GGUF file as `mixlab generate --model FILE --quant int4` runs it: every matrix int4."""
    from mixlab.checkpoint import load_model

    return prepare_for_inference(load_model(path, dtype="bfloat16", quant="int4"), quant="int4")


def _transformers_model(folder: Path, threads: int) -> Any | None:
    try:
        from transformers import MixtralForCausalLM
    except ImportError:
        return None
    model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    torch.set_num_threads(threads)  # loading may reset it
    return model.eval()


# -- the benchmark ----------------------------------------------------------------------------


@dataclass
class BenchPlan:
    preset: str = "mini-moe"
    threads: int = 2
    reps: int = 5
    prefill: tuple[int, ...] = (128, 512, 2048)
    decode_batch: tuple[int, ...] = (1, 4, 16)
    decode_prompt: int = 128
    decode_steps: int = 8  # per repetition
    moe_tokens: tuple[int, ...] = (1, 32, 512, 4096)
    peers: tuple[str, ...] = ("mixlab", "mixlab-packed", "mixlab-int8", "mixlab-int4", "mixlab-int4-exact",
                              "transformers", "llama.cpp")
    # not run by default: a Q4_K_M file (llama.cpp's common download) of the same weights, read by llama.cpp
    # and by mixlab (as int4: each matrix rounded a second time); int8 weights times int8-rounded activations
    optional_peers: tuple[str, ...] = ("q4_k_m", "mixlab-int8-act8")
    seed: int = 0
    limit_mib: int = 1024  # size of the bandwidth probe
    limit_n: int = 2048  # size of the matmul probe
    flush_mib: int = 256  # read between MoE-layer calls to evict the layer from the CPU caches
    vocab_size: int | None = None  # override the preset's (llama.cpp needs the tokenizer's 32000)
    layers: int | None = None  # the preset's first N layers: a wide model's slice that fits in memory

    @classmethod
    def quick(cls, preset: str = "tiny-moe") -> BenchPlan:
        return cls(preset=preset, reps=2, prefill=(32,), decode_batch=(1, 2), decode_prompt=16, decode_steps=2,
                   moe_tokens=(1, 16), vocab_size=32000, limit_mib=128, limit_n=512, flush_mib=8)


def _versions() -> dict[str, str]:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("transformers", "llama-cpp-python", "gguf"):
        try:
            v[dist] = version(dist)
        except PackageNotFoundError:
            v[dist] = "not installed"
    return v


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_bench(plan: BenchPlan, *, log: Callable[[str], None] = print, workdir: str | Path | None = None) -> Report:
    """Run every measurement of `plan`; returns a `Report` (`.format()` gives the markdown table)."""
    torch.set_num_threads(plan.threads)
    torch.manual_seed(plan.seed)
    cfg = get_preset(plan.preset)
    if plan.vocab_size is not None:
        cfg = cfg.replace(vocab_size=plan.vocab_size)
    if plan.layers is not None:
        cfg = cfg.replace(n_layers=plan.layers)
    if cfg.moe is None:
        raise ValueError(f"preset {plan.preset!r} is dense; the benchmark needs an MoE preset")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    settings: dict[str, Any] = {
        "preset": f"{plan.preset}{f' (first {plan.layers} layers)' if plan.layers is not None else ''} "
                  f"({cfg.param_counts()['total'] / 1e6:,.0f}M parameters, "
                  f"{cfg.param_counts()['active'] / 1e6:,.0f}M active)",
        "dtype": "bfloat16 (int8 weight-only for mixlab-int8 (float32 activations) and mixlab-int8-act8 "
                 "(activations rounded to int8 per 32, as llama.cpp-q8_0 does), q8_0 for llama.cpp-q8_0; int4 at "
                 "groups of 32 "
                 "for mixlab-int4 (activations rounded to int8 per 32, as llama.cpp-q4_0 does) and "
                 "mixlab-int4-exact (float32 activations))",
        "threads": plan.threads, "repetitions": f"median of {plan.reps} after warm-up, peers interleaved",
        "cpu": f"{_cpu_name()}, {os.cpu_count()} logical CPUs",
        "load average at start": " ".join(f"{x:.2f}" for x in load),
        **_versions(),
    }
    log("measuring machine limits ...")
    report = Report(settings, measure_limits(reps=plan.reps, mib=plan.limit_mib, n=plan.limit_n))
    if cfg.n_layers == 1 and plan.prefill:  # mixlab and llama.cpp alike skip the last layer's other rows
        report.notes.append("one layer: the prefill's layer is also its last, whose MoE block every peer but "
                            "transformers runs for the last position only; --layers 2 or more to measure it")

    log(f"building {plan.preset} with random weights (bf16) ...")
    with torch.device("meta"):  # allocate straight in bf16: no float32 copy of the whole model
        model = Transformer(cfg).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    model.init_weights(seed=plan.seed)
    model.eval()
    # mixlab as users run it for inference (native batch-1 decoding, plain weights); oneDNN-packed
    # weights (faster prefill, PyTorch decoding); int8 weight-only (native decoding).
    peers: list[Peer] = []
    if "mixlab" in plan.peers:
        fast = prepare_for_inference(copy.deepcopy(model))
        if fast.native_decoder is None:
            report.notes.append("mixlab's native kernels are unavailable (no C compiler?): mixlab = packed weights")
        peers.append(MixlabPeer(fast, "mixlab"))
    if "mixlab-packed" in plan.peers:
        peers.append(MixlabPeer(prepare_for_inference(copy.deepcopy(model), packed=True), "mixlab-packed"))
    if "mixlab-int8" in plan.peers:
        peers.append(MixlabPeer(prepare_for_inference(copy.deepcopy(model), quant="int8"), "mixlab-int8", 1.0))
    if "mixlab-int8-act8" in plan.peers:  # the same weights times int8-rounded activations (Q8_0 x Q8_0)
        int8 = prepare_for_inference(copy.deepcopy(model), quant="int8", int8_activations="int8")
        peers.append(MixlabPeer(int8, "mixlab-int8-act8", 1.0))
    if "mixlab-int4" in plan.peers:  # groups of 32: Q4_0's 18 bytes per 32 weights; int8 activations
        peers.append(MixlabPeer(prepare_for_inference(copy.deepcopy(model), quant="int4"), "mixlab-int4", 18 / 32))
    if "mixlab-int4-exact" in plan.peers:  # the same weights times float32 activations (exact)
        int4 = prepare_for_inference(copy.deepcopy(model), quant="int4", int4_activations="float32")
        peers.append(MixlabPeer(int4, "mixlab-int4-exact", 18 / 32))
    tmp = tempfile.TemporaryDirectory(dir=workdir, prefix="mixlab-bench-")
    root = Path(tmp.name)
    try:
        if "transformers" in plan.peers:
            from mixlab.checkpoint import save_model

            save_model(model, root / "hf", fmt="hf")
            hf = _transformers_model(root / "hf", plan.threads)
            if hf is None:
                report.notes.append(f"transformers is not installed: skipped ({PEERS_EXTRA})")
            else:
                peers += [TransformersPeer(hf, "eager"), TransformersPeer(hf, "grouped_mm")]
            (root / "hf" / "model.safetensors").unlink(missing_ok=True)
        if "llama.cpp" in plan.peers or "q4_k_m" in plan.peers:
            try:
                import llama_cpp  # noqa: F401

                from mixlab.checkpoint.gguf import write_gguf
            except ImportError:
                report.notes.append(f"llama-cpp-python (or gguf) is not installed: llama.cpp skipped ({PEERS_EXTRA})")
            else:
                if cfg.vocab_size < 32000:
                    report.notes.append(f"llama.cpp skipped: vocab_size {cfg.vocab_size} < the tokenizer's 32000")
                else:
                    n_ctx = max(max(plan.prefill, default=0),
                                plan.decode_prompt + plan.decode_steps * (plan.reps + 2)) + 16
                    # bf16 and q8_0 written by mixlab; q4_0 made from the bf16 file by llama.cpp's own
                    # quantiser (`llama_quantize`) with `pure`: every matrix Q4_0, as mixlab-int4 holds it
                    # (without `pure` llama.cpp would store the output matrix as Q6_K), router and norms f32; each
                    # peer's roofline counts its file's bytes per matrix weight.
                    # Q4_K_M (`q4_k_m`): llama.cpp's own mix, its file also loaded by mixlab as int4.
                    log("writing GGUF bf16 ...")
                    bf16 = write_gguf(model, root / "m-bf16.gguf", quant="bf16")  # what the quantiser reads
                    files: list[tuple[str, Path]] = []
                    if "llama.cpp" in plan.peers:
                        log("writing GGUF q8_0, q4_0 ...")
                        files += [("bf16", bf16), ("q8_0", write_gguf(model, root / "m-q8_0.gguf", quant="q8_0")),
                                  ("q4_0", llama_quantize(bf16, root / "m-q4_0.gguf", "Q4_0", threads=plan.threads,
                                                          pure=True))]
                    if "q4_k_m" in plan.peers:
                        log("writing GGUF q4_k_m ...")
                        files.append(("q4_k_m", llama_quantize(bf16, root / "m-q4_k_m.gguf", "Q4_K_M",
                                                               threads=plan.threads)))
                    for quant, path in files:
                        peers.append(LlamaCppPeer(path, f"llama.cpp-{quant}", plan.threads, n_ctx,
                                                  _matrix_bytes_per_weight(path)))
                        if quant == "q4_k_m":  # the same file in mixlab: every matrix int4 (18 bytes per 32)
                            peers.append(MixlabPeer(_int4_of_gguf(path), "mixlab-q4_k_m", 18 / 32))
                    report.notes.append("llama.cpp decode runs at batch 1 only (llama-cpp-python's Llama API "
                                        "decodes one sequence)")
        _bench_prefill(plan, cfg, peers, report, log)
        _bench_decode(plan, cfg, model, peers, report, log)
        _bench_moe(plan, cfg, model, peers, report, log)
    finally:
        for p in peers:
            if isinstance(p, LlamaCppPeer):
                p.close()
        tmp.cleanup()
    return report


def _bench_prefill(plan: BenchPlan, cfg: ModelConfig, peers: list[Peer], report: Report, log: Callable) -> None:
    g = torch.Generator().manual_seed(plan.seed)
    for P in plan.prefill:
        log(f"prefill {P} ...")
        tokens = torch.randint(3, cfg.vocab_size, (1, P), generator=g)
        times = _interleaved({p.name: functools.partial(p.prefill, tokens) for p in peers}, plan.reps, log=log)
        limit = P * _matmul_flops_per_token(cfg, ctx=P / 2) / report.limits["matmul"]
        for p in peers:
            t = times[p.name]
            report.rows.append(Row("Prefill (tokens/s, batch 1)", f"P={P}", p.name, P / t, "tokens/s", limit, t))


def _unique_experts(model: Transformer, prompt_BT: torch.Tensor) -> float:
    """Mean number of distinct experts per layer that one decode step of this batch touches."""
    cache = KVCache(model.config, batch_size=prompt_BT.shape[0], max_len=prompt_BT.shape[1] + 1,
                    dtype=model.tok_embeddings.weight.dtype, prefill_chunk=prompt_BT.shape[1])
    with torch.inference_mode():
        model(prompt_BT, cache=cache)
        routings = model.forward_output(prompt_BT[:, -1:], cache=cache, logits=False).routing
    return statistics.mean(r.idx_TK.unique().numel() for r in routings)


def _bench_decode(plan: BenchPlan, cfg: ModelConfig, model: Transformer, peers: list[Peer], report: Report,
                  log: Callable) -> None:
    g = torch.Generator().manual_seed(plan.seed + 1)
    for B in plan.decode_batch:
        log(f"decode batch {B} ...")
        prompt = torch.randint(3, cfg.vocab_size, (B, plan.decode_prompt), generator=g)
        active = [p for p in peers if not (isinstance(p, LlamaCppPeer) and B > 1)]
        steps = plan.decode_steps * (plan.reps + 1)
        for p in active:
            p.start_decode(prompt, steps + 1)

        def run(p: Peer) -> None:
            for _ in range(plan.decode_steps):
                p.decode()

        # The memory bandwidth of this machine drifts by tens of percent within minutes (other tenants
        # of the host): a bandwidth probe runs in every round of the interleaved repetitions, and
        # each repetition's roof uses the bandwidth measured in its own round.
        probe, probe_bytes = bandwidth_probe(reps=1, mib=plan.limit_mib)
        runs = _interleaved_runs({p.name: functools.partial(run, p) for p in active} | {"(bandwidth)": probe},
                                 plan.reps, log=log)
        bandwidth_r = [probe_bytes / t for t in runs.pop("(bandwidth)")]
        report.notes.append(f"decode B={B}: memory bandwidth measured in each round of the repetitions: "
                            + ", ".join(f"{b / 1e9:.1f}" for b in bandwidth_r) + " GB/s")
        del probe
        n_exp = _unique_experts(model, prompt)
        ctx = plan.decode_prompt + steps / 2
        kv_bytes = B * ctx * cfg.kv_cache_bytes_per_token(2)
        for p in active:
            t = statistics.median(runs[p.name]) / plan.decode_steps
            e = p.elem_bytes
            weight_bytes = cfg.n_layers * (_dense_bytes_per_layer(cfg, e) + n_exp * _expert_bytes(cfg, e))
            weight_bytes += cfg.vocab_size * cfg.dim * e  # output matrix
            # of limit = median over rounds of (roofline time at that round's bandwidth / time)
            frac = statistics.median(
                max((weight_bytes + kv_bytes) / bw, B * _matmul_flops_per_token(cfg, ctx) / report.limits["matmul"])
                / (r / plan.decode_steps)
                for bw, r in zip(bandwidth_r, runs[p.name], strict=True))
            limit = frac * t
            report.rows.append(Row("Decode (tokens/s)", f"B={B}", p.name, B / t, "tokens/s", limit, t))


def _bench_moe(plan: BenchPlan, cfg: ModelConfig, model: Transformer, peers: list[Peer], report: Report,
               log: Callable) -> None:
    assert cfg.moe is not None
    active = [p for p in peers if not isinstance(p, LlamaCppPeer)]
    g = torch.Generator().manual_seed(plan.seed + 2)
    block = model.layers[0].ffn
    assert isinstance(block, MoEBlock)
    flush = torch.ones(plan.flush_mib * 2**20 // 4)
    for T in plan.moe_tokens:
        log(f"MoE layer T={T} ...")
        x = (torch.randn(1, T, cfg.dim, generator=g)).bfloat16()
        # Evict the layer's weights from the CPU caches before each call, as the other layers of a
        # forward pass do: otherwise small T measures cache-resident weights, not memory.
        times = _interleaved({p.name: functools.partial(p.moe_layer, x) for p in active}, plan.reps, log=log,
                             before=flush.sum)
        with torch.inference_mode():
            _, routing = block(x)
        n_exp = routing.idx_TK.unique().numel()
        flops = 2 * T * cfg.moe.top_k * 3 * cfg.dim * cfg.ffn_dim
        for p in active:
            t = times[p.name]
            limit = max(n_exp * _expert_bytes(cfg, p.elem_bytes) / report.limits["bandwidth"],
                        flops / report.limits["matmul"])
            report.rows.append(Row("MoE layer alone (tokens/s: router + experts, layer 0)", f"T={T}", p.name,
                                   T / t, "tokens/s", limit, t))
