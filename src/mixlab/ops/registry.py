"""Which kernel runs: the one place that decides.

`choose(op, device=, fmt=, dtype=, tokens=, training=)` picks the implementation of an operation
from the device, the weight format, the number of tokens (rows) and whether gradients are needed.
Every caller asks it (`ops.linear`, `ops.quant`, `ops.moe`, `generate.decode_step`, the weight
format modules) and none second-guesses it; `linear_impl`, `moe_impl` and `decode_impl` read those
five facts off the tensors at hand.

Operations and what they can get:
- `linear` (x @ w.T): `native` (`torch.ops.mixlab.linear`: few rows, each weight row read once; any
  number of rows for int4 weights times activations rounded to int8, `act8`, whose kernel runs many
  rows in integer register tiles, `gemm_panels_a8`; up to INT8_A16_MAX_ROWS rows of bf16 activations
  for int8 weights, multiplied as bf16 in panels),
  `packed` (oneDNN's linear on a packed weight), `int8pack` (torch's fused int8 matrix-vector
  kernel), `int8` / `int4` (dequantise, then GEMM), `torch` (`F.linear`).
- `moe` (the experts of a layer): `triton` (CUDA: `mixlab.ops.triton_moe`, differentiable),
  `native` (`torch.ops.mixlab.moe`, stacks of up to 256 experts), `decode` (one token: its K
  experts on weight views), `sorted` (the sorted segment loop; training, and many tokens).
- `decode_step` (one token of one sequence through the whole model): `native`
  (`torch.ops.mixlab.decode_step`) or `torch` (the model's forward pass).
- `decode_batch` (an engine step of `tokens` tokens through the whole model: one decoding token
  per sequence and prompt chunks): `native` (`torch.ops.mixlab.decode_batch`, up to
  NATIVE_MAX_STEP_TOKENS tokens; with bf16 activations on a CPU with AMX, whose bf16 GEMMs oneDNN runs
  on the tile unit, up to AMX_MAX_STEP_TOKENS by the weights' dtype, or AMX_PANELS_MAX_STEP_TOKENS
  where the native step reads bf16 panels on the tile unit too) or `torch` (the engine's batched
  PyTorch pass).

The native kernels are chosen only once they are loaded (`mixlab.ops.native.load`, which inference
preparation calls), for inference, on CPU, where this CPU vectorises their weight type. Nothing
here builds or loads them, so a forward pass on a model nobody prepared never starts a compiler.

Weight conversions (rounding to int4, dequantising GGUF K-quants) are chosen by `convert_impl`.

Weight formats (`fmt`): `plain` (a contiguous float or int8 tensor), `packed` (oneDNN's blocked
layout), `int8` (int8 with one scale per output row), `int4` (packed 4-bit, uint8, with float16
scales per group of inputs: `mixlab.ops.quant`), `strided` (a plain tensor that is not contiguous:
PyTorch only).
"""

from __future__ import annotations

import functools

import torch

from mixlab.ops import native
from mixlab.ops.native import ops as _ops  # noqa: F401  (registers torch.ops.mixlab.*)

# Up to this many rows `native` linear, which reads each weight once for all rows at close to the
# memory bandwidth, beats PyTorch's GEMMs; up to this many tokens the native MoE kernel does
# (beyond, the work is compute-bound and oneDNN's GEMM wins). Measured in BENCHMARKS.md.
NATIVE_MAX_ROWS = native.MAX_ROWS
NATIVE_MAX_TOKENS = 64
# Up to this many tokens (decoding tokens and prompt chunks together) one native call runs a whole
# engine step (`mx_decode_batch`): 1.1-1.2x faster than the engine's PyTorch pass from 16 decoding
# tokens to 128-token chunks, even with it at 256 and 512 (the default token budget), where both are
# compute-bound (bf16 mini-moe, 2 threads; BENCHMARKS.md "Mixed steps").
NATIVE_MAX_STEP_TOKENS = 512
# On a CPU with AMX (Intel Xeon from Sapphire Rapids on) oneDNN runs PyTorch's bf16 GEMMs on the tile
# unit (2.3-2.7 TFLOP/s on 2 cores, against ~0.4-0.9 for AVX-512 here), so with bf16 activations a
# step of many prompt tokens runs faster on the engine's PyTorch pass. By the weights' dtype, the most
# tokens the native call keeps there: bf16 64 (128-token prompts prefill 2.0x faster on the PyTorch
# pass, 512 4.4x; up to 64 tokens, decoding and mixed steps included, the native call 1.0-1.2x faster),
# int8 128 (its prompt's matrices dequantised to bf16 for the GEMM: 192 tokens 1.14x, 512 2.05-2.25x
# faster; 128 and fewer native 1.0-1.1x). int4 stays native (its int8-activation kernels 1.1-1.2x
# faster than dequantising at 64-512 tokens). mini-moe, 2 threads, an Intel Xeon host; BENCHMARKS.md
# "An Intel Xeon host with AMX". At Mixtral's widths (2 of its layers) bf16 crosses over at ~48 tokens
# (512: 5.7x faster on the PyTorch pass): 64 leaves up to ~10-45% there for 48-64-token steps.
AMX_MAX_STEP_TOKENS = {torch.bfloat16: 64, torch.int8: 128}
# Where the engine's decoder keeps its bf16 weights in panels (`NativeDecoder.pack`) and the native
# step reads those on the tile unit too (`native.amx()`), the native call keeps bf16 steps of up to
# this many tokens: against the PyTorch pass 2.4-2.5x faster at 64 tokens, 1.3-1.4x at 128, 1.1-1.2x
# at 256, 0.86-0.91x at 512 (one engine step, mini-moe, 2 threads, an Intel Xeon host, two runs;
# BENCHMARKS.md "AMX in the native kernels").
AMX_PANELS_MAX_STEP_TOKENS = 256
# Above this many rows dequantise-then-GEMM beats torch's int8 matrix-vector kernel (a GEMV at heart
# that does not block for many rows).
INT8PACK_MAX_ROWS = 8
# Up to this many rows int8 weights times bf16 activations run natively as bf16 (`choose`).
INT8_A16_MAX_ROWS = 128

FORMATS = ("plain", "packed", "int8", "int4", "strided")
OPS = ("linear", "moe", "decode_step", "decode_batch")


def weight_format(w: torch.Tensor, scale: torch.Tensor | None = None) -> str:
    """The format of a weight tensor (and its int8 row scales, if any)."""
    if w.is_mkldnn:
        return "packed"
    if scale is not None:
        if not w.is_contiguous():
            return "strided"
        return "int4" if w.dtype == torch.uint8 else "int8"
    return "plain" if w.is_contiguous() else "strided"


def triton_ready(device: str) -> bool:
    """Whether the Triton MoE kernel runs on `device` (CUDA with Triton installed)."""
    if device != "cuda":
        return False
    from mixlab.ops.triton_moe import available  # imports triton: only asked on CUDA

    return available()  # None: asks about CUDA


@functools.cache
def amx() -> bool:
    """Whether this CPU has AMX tiles that the OS lets processes use (what oneDNN's bf16 GEMMs run on)."""
    supported = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch's own check (CPUID and the OS)
    try:
        return bool(supported is not None and supported())
    except Exception:  # noqa: BLE001 - a torch without the check: as without AMX
        return False


def native_ready(dtype: torch.dtype) -> bool:
    """Whether the native kernels are loaded and vectorised here for weights of `dtype`."""
    return native.fast(dtype)


def choose(op: str, *, device: str, fmt: str, dtype: torch.dtype, tokens: int, training: bool,
           act_dtype: torch.dtype | None = None, experts: int = 0, act8: bool = False, panels: bool = False) -> str:
    """The implementation of `op` for weights of format `fmt` and `dtype` on `device`, for `tokens`
    rows or tokens, with (`training`) or without gradients. `act_dtype`: the activations' dtype
    (torch's int8 kernel takes float32 and bf16; int8 experts times bf16 ones run `sorted`).
    `experts` (moe only): how many experts the weights stack (the native kernel takes up to
    `native.MAX_EXPERTS`). `act8` (linear only): int4 / int8 weights times activations rounded to
    int8 per block of 32. `panels` (decode_batch only): the native step reads bf16 weights kept in
    32-row panels (`NativeDecoder.pack`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {', '.join(FORMATS)}")
    native_ok = (device == "cpu" and not training and fmt in ("plain", "int8", "int4") and native_ready(dtype))
    if op == "linear":
        if native_ok and tokens <= NATIVE_MAX_ROWS:
            return "native"
        # int4 x int8 activations: from `big_min_tokens` rows the kernel runs integer register tiles
        # over unpacked panels (`gemm_panels_a8`), the native steps' bits; dequantise-then-GEMM rebuilds
        # the float weight on every call (mini-moe's 2-layer forward, 2 threads, a quiet run: 5.0x
        # faster at 32 and 128 tokens, 2.2x at 512). The float-activation int4 kernel (act8 off) has
        # no panels: many rows stay with dequantise-then-GEMM.
        if native_ok and fmt == "int4" and act8:
            return "native"
        # int8 x int8 activations (MX_I8_A8, 4x4 integer tiles, no panels): 2-7x faster than
        # dequantise-then-GEMM against float32 activations at 32-128 rows, ~1.5x at 512 (float32 GEMMs;
        # 4096x1024 and 1024x4096 matrices, 2 shared cores), but not against bf16 ones (AVX512-BF16
        # GEMMs level or faster from 64 rows). Float activations' int8 kernel (MX_I8) has no many-row
        # tiles (4-10x slower than bf16 GEMMs from 128 rows, 1.5x than float32 ones at 512): those
        # stay with dequantise-then-GEMM. (`native_ok` is false for training: the kernels have no
        # autograd; off CPU; without the loaded kernels.)
        if native_ok and fmt == "int8" and act8 and act_dtype == torch.float32:
            return "native"
        # int8 weights times exact bf16 activations: the native kernel multiplies the int8 rows as bf16
        # (decode.c's `act16`, panels from `big_min_tokens` rows: what a bf16 model's engine step runs),
        # with no bf16 copy of the weight. That copy is what costs at Mixtral's widths, where a prompt's
        # per-expert slices have few rows: a 28672x4096 w13 (a 4096x14336 w2) at 32 rows 3.9x (4.0x)
        # faster, 128 rows 1.9x (1.8x), 512 level; mini-moe's forward level at 32 and 512 tokens, 1.1-1.5x
        # at 128 (2 shared cores / 1 thread). Beyond INT8_A16_MAX_ROWS the GEMM.
        if (native_ok and fmt == "int8" and not act8 and act_dtype == torch.bfloat16
                and tokens <= INT8_A16_MAX_ROWS and native_ready(torch.bfloat16)):
            return "native"
        if fmt == "packed":
            return "packed"
        if fmt == "int4":
            return "int4"
        if fmt == "int8" or dtype == torch.int8:
            small = device == "cpu" and tokens <= INT8PACK_MAX_ROWS and act_dtype in (torch.bfloat16, torch.float32)
            return "int8pack" if small else "int8"
        return "torch"
    if op == "moe":
        if fmt == "plain" and dtype != torch.int8 and triton_ready(device):
            return "triton"
        if training:
            return "sorted"
        # int8 experts times bf16 activations (a bf16 model's int8 prompt): the sorted segments' products
        # run natively as bf16 (`linear` up to INT8_A16_MAX_ROWS rows, panels), where the whole-layer
        # kernel multiplies exact float32 activations row by row: two Mixtral-wide layers' forward 1.35x
        # faster at 8 tokens, 1.7-1.9x at 32-64; mini-moe level at 2-8 tokens, 1.3-1.5x at 16-64 (quiet,
        # 2 threads). One token keeps the whole-layer kernel (each chosen expert read once).
        if (native_ok and fmt == "int8" and act_dtype == torch.bfloat16 and tokens > 1
                and native_ready(torch.bfloat16)):
            return "sorted"
        if native_ok and tokens <= NATIVE_MAX_TOKENS and experts <= native.MAX_EXPERTS:
            return "native"
        return "decode" if tokens == 1 else "sorted"
    if op == "decode_step":
        return "native" if native_ok and tokens == 1 else "torch"
    if op == "decode_batch":
        most = NATIVE_MAX_STEP_TOKENS
        if device == "cpu" and (act_dtype or dtype) == torch.bfloat16 and dtype in AMX_MAX_STEP_TOKENS and amx():
            most = AMX_MAX_STEP_TOKENS[dtype]  # PyTorch's GEMMs on AMX tiles: see AMX_MAX_STEP_TOKENS
            if panels and dtype == torch.bfloat16 and native.amx():
                most = AMX_PANELS_MAX_STEP_TOKENS  # and the native step's panels on them too
        return "native" if native_ok and 1 <= tokens <= most else "torch"
    raise ValueError(f"unknown operation {op!r}; expected one of {', '.join(OPS)}")


def _training(*ts: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def linear_impl(x_ND: torch.Tensor, w_XD: torch.Tensor, scale_X: torch.Tensor | None = None, *,
                act8: bool = False) -> str:
    """`choose("linear", ...)` for these tensors."""
    return choose("linear", device=x_ND.device.type, fmt=weight_format(w_XD, scale_X), dtype=w_XD.dtype,
                  tokens=x_ND.shape[:-1].numel(), training=_training(x_ND, w_XD), act_dtype=x_ND.dtype,
                  act8=act8)


def moe_impl(x_TD: torch.Tensor, w13_E2FD: torch.Tensor, w13_scale_E2F: torch.Tensor | None = None) -> str:
    """`choose("moe", ...)` for these tensors (stacked expert weights; a list of per-expert packed
    matrices is format `packed`)."""
    if not isinstance(w13_E2FD, torch.Tensor):
        fmt, dtype, w = "packed", x_TD.dtype, None
    else:
        fmt, dtype, w = weight_format(w13_E2FD, w13_scale_E2F), w13_E2FD.dtype, w13_E2FD
    return choose("moe", device=x_TD.device.type, fmt=fmt, dtype=dtype, tokens=x_TD.shape[0],
                  training=_training(x_TD, w), experts=len(w13_E2FD), act_dtype=x_TD.dtype)


def decode_impl(tokens_BT: torch.Tensor, weight: torch.Tensor) -> str:
    """`choose("decode_step", ...)` for a step of `tokens_BT` through a model with a native decoder
    whose matrices look like `weight` (its output projection)."""
    return choose("decode_step", device=tokens_BT.device.type, fmt=weight_format(weight), dtype=weight.dtype,
                  tokens=tokens_BT.numel(), training=_training(weight))


def convert_impl(kind: str, *, device: str, dtype: torch.dtype, ggml_type: int | None = None) -> str:
    """The implementation of a weight conversion (loading, offloading, preparation; no forward pass):
    `quantize_int4` (float weights rounded to int4, `ops.quant.quantize_int4`) or `dequantize` (a GGUF
    tensor of `ggml_type` read as floats of `dtype`). `native` (decode.c `mx_quantize_q4` /
    `mx_dequantize`: the same bytes as the PyTorch code, ~10x / 3-8x faster) once the kernels are
    loaded, on the CPU, for float32 / bf16 (and the K-quant types Q4_K, Q5_K, Q6_K), else `torch`."""
    if kind not in ("quantize_int4", "dequantize"):
        raise ValueError(f"unknown conversion {kind!r}; expected quantize_int4 or dequantize")
    ok = native.library() is not None and device == "cpu" and dtype in (torch.float32, torch.bfloat16)
    if kind == "dequantize":
        ok = ok and ggml_type in native.DEQUANT_TYPES
    return "native" if ok else "torch"


def prepare_native() -> bool:
    """Load the native kernels for inference (building them unless cached): what inference
    preparation calls. False (after one warning) when they cannot be had."""
    return native.load() is not None
