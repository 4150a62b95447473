"""What a model's weights take in memory, and what the machine has: the byte rules that `mixlab plan`
(parallel/plan.py), `load_model`'s check and the commands' check (cli/run.py) share.

- `count_params`: exact parameter counts of the model built on the meta device, split into the
  stacked expert weights and the rest.
- `inference_weights`: the bytes of the weights as inference holds them, in a float dtype or as int8
  (one scale per output row) / int4 (4.5 bits a weight: groups of 32 with a 16-bit scale); the
  embeddings, routers and norms stay floats.
- `meminfo` / `available_memory` / `swap_free`: Linux's /proc/meminfo.
- `shortfall`: whether a model's weights fit the memory available now, and if not, the formats and
  the expert-cache budget (`load_model(max_memory=)`) that would: a load that cannot fit ends in the
  kernel's out-of-memory kill minutes in, so callers refuse it first.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from mixlab.config import ModelConfig
from mixlab.dtypes import DTYPES

QUANT_BITS = {"int8": 8.0, "int4": 4.5}


@dataclass(frozen=True)
class ParamSplit:
    """Exact parameter counts of the model built on the meta device."""

    total: int
    experts: int  # stacked expert weights [E, ...] (sharded by expert parallelism)
    dense: int  # everything else
    block_dense: int  # one transformer block's non-expert weights (FSDP gathers a block at a time)
    block_experts: int  # one block's expert weights
    embedding: int  # tok_embeddings (kept unquantised)
    router: int
    norms: int


def is_expert_param(p: torch.Tensor, config: ModelConfig) -> bool:
    """Stacked expert weights: 3-D with the experts first (`w13 [E, 2F, D]`, `w2 [E, D, F]`)."""
    return config.moe is not None and p.dim() == 3 and p.shape[0] == config.moe.num_experts


@functools.lru_cache(maxsize=8)  # a Mixtral on the meta device takes ~1-2 s; a check counts it for 3 formats
def count_params(config: ModelConfig) -> ParamSplit:
    from mixlab.model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    seen: set[int] = set()
    total = experts = embedding = router = norms = 0
    for name, p in model.named_parameters():  # tied weights appear once
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        if is_expert_param(p, config):
            experts += n
        elif name.startswith("tok_embeddings"):
            embedding += n
        elif p.dim() == 1:
            norms += n
        elif ".gate." in name or name.endswith(("router.weight", "gate.weight")):
            router += n
    block = model.layers[0]
    block_experts = sum(p.numel() for p in block.parameters() if is_expert_param(p, config))
    block_dense = sum(p.numel() for p in block.parameters()) - block_experts
    return ParamSplit(total=total, experts=experts, dense=total - experts, block_dense=block_dense,
                      block_experts=block_experts, embedding=embedding, router=router, norms=norms)


def int8_rows(config: ModelConfig, ep: int = 1) -> float:
    """Output rows of the int8 matrices per device (one scale each)."""
    rows_attn = config.q_dim + 2 * config.kv_dim + config.dim
    if config.moe is not None:
        rows_ffn = config.moe.num_experts / ep * (2 * config.ffn_dim + config.dim)
    else:
        rows_ffn = 2 * config.ffn_dim + config.dim
    return config.n_layers * (rows_attn + rows_ffn) + config.vocab_size  # + the output matrix


def inference_weights(config: ModelConfig, dtype: str, quant: str | None, *, ep: int = 1,
                      params: ParamSplit | None = None) -> tuple[float, float]:
    """(weights, floats while loading): the bytes of the weights inference holds per device (the
    experts divided by `ep`) in `dtype` or as `quant`, and with `quant` the one weight's floats that
    rounding each matrix as it is read holds besides (`load_model(quant=)`: a layer's stacked w13, its
    share under `ep`), else 0."""
    ps = params or count_params(config)
    w_b = DTYPES[dtype].itemsize
    experts = ps.experts / ep
    if quant is None:
        return (ps.dense + experts) * w_b, 0.0
    keep = ps.embedding + ps.router + ps.norms  # stay in dtype
    weights = keep * w_b + (ps.dense - keep + experts) * QUANT_BITS[quant] / 8
    if quant == "int8":  # one scale per output row, in dtype (as prepare_for_inference stores it)
        weights += int8_rows(config, ep) * w_b
    w13 = 2 * config.ffn_dim * config.dim * (config.moe.num_experts // ep if config.moe else 1)
    return weights, w13 * w_b


def weights_needed(config: ModelConfig, dtype: str | None, quant: str | None, *, kept: bool = False) -> int:
    """A lower bound of the bytes loading a model of `config` holds on one device: its weights in their
    final format, or while `quant` rounds each matrix as it is read, those plus one weight's floats;
    no KV cache. `dtype` None (as stored, unknown) counts 2 bytes a float. `kept`: a GGUF file whose
    Q4_0 matrices stay int4 (copied as stored: no weight's floats while loading)."""
    name = dtype if dtype in ("float32", "float16") else "bfloat16"
    weights, floats = inference_weights(config, name, "int4" if kept and quant is None else quant)
    return int(weights if kept else weights + floats)


def meminfo(key: str) -> int:
    """A field of Linux's /proc/meminfo in bytes (`MemAvailable`, `SwapFree`, ...), or 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def available_memory() -> int:
    """Bytes of memory available for new allocations (Linux's MemAvailable), or 0 when unknown."""
    return meminfo("MemAvailable")


def swap_free() -> int:
    """Free swap space in bytes (Linux's SwapFree), or 0 when unknown."""
    return meminfo("SwapFree")


def expert_cache_that_fits(config: ModelConfig, need: int, dtype: str | None, quant: str | None,
                           free: int) -> str | None:
    """An expert cache budget (`max_memory`, as `parse_bytes` reads it: "18.3GB", rounded down to a tenth
    of its unit) that leaves room in `free` bytes for the rest of the model (`need` less its experts), the
    KV cache (the engine's default budget: 2 GiB at most) and ~15% for the run; None for a dense model or
    where not even one token's experts of a layer (top-k) would fit."""
    from mixlab.ops.offload import SlotFormat

    if config.moe is None:
        return None
    fmt = SlotFormat(quant or "plain", torch.float32 if dtype == "float32" else torch.bfloat16)
    one = fmt.expert_bytes(config.dim, config.ffn_dim)
    resident = need - config.n_layers * config.moe.num_experts * one
    kv = min(2**31, config.kv_cache_bytes_per_token(2) * config.max_seq_len)  # the engine's default KV budget
    cache = 0.85 * free - resident - kv
    unit, size = next(((u, n) for u, n in (("GB", 1e9), ("MB", 1e6)) if cache >= n), ("KB", 1e3))
    tenths = int(cache / size * 10)
    return f"{tenths / 10:g}{unit}" if tenths * size / 10 >= config.moe.top_k * one else None


@dataclass
class Shortfall:
    """Weights that do not fit: what they need, what the machine has, and what would fit."""

    need: int
    ram: int  # MemAvailable
    swap: int  # SwapFree
    formats: dict[str, int] = field(default_factory=dict)  # quant -> bytes, for those that fit
    cache: str | None = None  # an expert-cache budget that fits (max_memory)


def shortfall(config: ModelConfig, dtype: str | None, quant: str | None, *, kept: bool = False,
              alternatives: bool = True) -> Shortfall | None:
    """None where the weights of `config` (as `weights_needed` counts them) fit in the memory available
    and the free swap, or where the memory is unknown (not Linux); else a `Shortfall`, with
    `alternatives` the quantised formats that would fit and an expert-cache budget."""
    ram, swap = available_memory(), swap_free()
    need = weights_needed(config, dtype, quant, kept=kept)
    if not ram or need <= ram + swap:
        return None
    short = Shortfall(need, ram, swap)
    if alternatives:
        for q in ("int8", "int4"):
            other = weights_needed(config, dtype, q, kept=kept)
            if q != quant and other < need and other <= ram + swap:
                short.formats[q] = other
        short.cache = expert_cache_that_fits(config, need, dtype, quant, ram + swap)
    return short


def refuse_if_short(what: str, config: ModelConfig, dtype: str | None, quant: str | None, *,
                    kept: bool = False) -> None:
    """`NotEnoughMemoryError` for `load_model` (and `load_gguf`) where the weights of `config` cannot fit
    (`shortfall`), naming the arguments that would fit: `quant=` formats and a `max_memory=` expert cache."""
    from mixlab.config import format_bytes
    from mixlab.errors import NotEnoughMemoryError

    short = shortfall(config, dtype, quant, kept=kept)
    if short is None:
        return
    fits = [f"quant={q!r} (~{format_bytes(n)})" for q, n in short.formats.items()]
    if short.cache:
        fits.append(f"max_memory={short.cache!r} (the experts stay on disk, read on demand into a cache of that many "
                    "bytes)")
    sizes = (f"{what}: its weights need at least {format_bytes(short.need)} as {quant or dtype or 'stored'}, but "
             f"{format_bytes(short.ram)} of memory is available and {format_bytes(short.swap)} of swap")
    raise NotEnoughMemoryError(
        sizes + ": " + (f"load it with {' or '.join(fits)}" if fits else "it needs a machine with more memory"),
        sizes=sizes)
