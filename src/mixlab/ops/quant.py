"""Weight-only quantisation: int8 with one scale per output row, and int4 with one scale per group.

Int8: symmetric, one scale per output row (as gpt-fast and torchao do).

A weight `w_XD` (X output rows, D inputs) is stored as `q_XD` int8 and `s_X` with w ≈ q * s[:, None],
s = max|w_row| / 127. Activations stay in bf16/f32; only the weights shrink, which is what matters
for decoding: one token reads every weight it touches once, so time ≈ bytes / memory bandwidth and
int8 halves the bytes of bf16.

`int8_linear` runs the kernel `mixlab.ops.registry` picks by the number of rows: for a few rows
(decoding) the native kernel (or, without it, torch's fused `aten._weight_int8pack_mm`) reads int8
and scales on the fly; for many rows (prefill) the matmul is compute-bound, so the weight is
dequantised once to the activation dtype for the bf16 GEMM, but where the native kernel wins: bf16
activations up to `registry.INT8_A16_MAX_ROWS` rows (the int8 rows multiplied as bf16 in panels, no
bf16 copy of the weight: a prompt's per-expert slices at Mixtral's widths) and activations rounded
to int8 (`act8`) against float32 ones (integer tiles beat float32 GEMMs). Batch-1 decoding of a prepared model
runs the whole step natively instead (`mixlab.model.native`).

`int4_linear` with activations rounded to int8 (`act8`, a model's default `int4_activations="int8"`)
runs the native int4 x int8 kernel for any number of rows once the kernels are loaded (for many rows
integer register tiles over unpacked panels: the native steps' own products), so a prepared model's
forward over a prompt never rebuilds a float weight; with exact float activations (`"float32"`), or
without the kernels, many rows dequantise per call, then GEMM.

Int4: llama.cpp's Q4_0 arithmetic with groups of G = 32, 64 or 128 inputs. A group's scale is
d = m / -8, m its element of largest magnitude (sign kept), and w ≈ (q - 8) * d with q in [0, 15].
Two weights share a byte, laid out in chunks of 32 inputs exactly as a Q4_0 block stores them: byte
j of a chunk holds input j in its low nibble and input j + 16 in its high nibble. So a Q4_0 tensor
of llama.cpp's GGUF files loads with one strided copy (scales apart, nibbles apart; nothing is
requantised), and a kernel turns 16 bytes into two 16-lane vectors of consecutive inputs with one
mask and one shift. Scales are float16 (Q4_0's own), `[X, D / G]`; the packed weights are uint8
`[X, D / 2]`: 4.5 bits per weight at G = 32, 4.125 at G = 128. A uint8 weight with scales is int4
everywhere in mixlab (`dequantize` tells the two formats apart by dtype).

Shape legend: N rows of activations, X output features, D input features, G group size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixlab.ops import native, registry

QUANT_CHUNK = 4 << 20  # float32 bytes of rows rounded at a time: temporaries a chunk's, not a tensor's


def quantize_int8(w_XD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_XD int8, s_X float32) with w ≈ q * s[:, None]; works on stacked weights `[..., X, D]` too.
    Rounded a few MB of rows at a time (`QUANT_CHUNK`; each row is rounded alone, so the bytes are the
    same): a whole Mixtral w13's float32 temporaries took ~3x its float32 size (11 GB)."""
    *lead, X, D = w_XD.shape
    w_RD = w_XD.detach().reshape(-1, D)  # R: every row of every leading index
    q_RD = torch.empty(w_RD.shape, dtype=torch.int8, device=w_RD.device)
    s_R = torch.empty(w_RD.shape[0], dtype=torch.float32, device=w_RD.device)
    step = max(1, QUANT_CHUNK // (4 * max(D, 1)))
    for lo in range(0, w_RD.shape[0], step):
        w = w_RD[lo : lo + step].float()
        s = w.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
        q_RD[lo : lo + step] = torch.round(w / s[:, None]).clamp(-127, 127)
        s_R[lo : lo + step] = s
    return q_RD.reshape(*lead, X, D), s_R.reshape(*lead, X)


def dequantize_int8(q_XD: torch.Tensor, s_X: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q_XD.to(torch.float32) * s_X.float()[..., None]).to(dtype)


INT4_GROUPS = (32, 64, 128)
QK = 32  # the nibble-layout chunk (Q4_0's block)


def quantize_int4(w_XD: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 `[..., X, D/2]`, float16 scales `[..., X, D/G]`) with llama.cpp Q4_0's rounding
    (`quantize_row_q4_0_ref`): at G = 32 the bytes are those of a Q4_0 tensor. CPU float32 / bf16
    weights go to the native kernel once it is loaded (`native.quantize_int4`: the same bytes, tested
    against `_quantize_int4_rows`, the reference); else rounded a few MB of rows at a time
    (`QUANT_CHUNK`; each group is rounded alone, so the bytes are the same): a whole Mixtral expert
    tensor's float32 temporaries took ~4x its size."""
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group size must be one of {INT4_GROUPS}, not {group}")
    *lead, X, D = w_XD.shape
    if D % group:
        raise ValueError(f"int4 with groups of {group} needs a multiple of {group} inputs per row, not {D}")
    w_RD = w_XD.detach().reshape(-1, D)  # R: every row of every leading index
    if registry.convert_impl("quantize_int4", device=w_RD.device.type, dtype=w_RD.dtype) == "native":
        # the same bytes (decode.c `mx_quantize_q4`), ~10x faster and without temporaries: an offloaded
        # Q4_K_M expert's int4 rounding took 0.8 s in the code below (BENCHMARKS.md, "Expert offloading")
        q_RDh, s_RG = native.quantize_int4(w_RD.contiguous(), group)
        return q_RDh.reshape(*lead, X, D // 2), s_RG.reshape(*lead, X, D // group)
    q_RDh = torch.empty(w_RD.shape[0], D // 2, dtype=torch.uint8, device=w_RD.device)
    s_RG = torch.empty(w_RD.shape[0], D // group, dtype=torch.float16, device=w_RD.device)
    step = max(1, QUANT_CHUNK // (4 * D))
    for lo in range(0, w_RD.shape[0], step):
        q_RDh[lo : lo + step], s_RG[lo : lo + step] = _quantize_int4_rows(w_RD[lo : lo + step], group)
    return q_RDh.reshape(*lead, X, D // 2), s_RG.reshape(*lead, X, D // group)


def _quantize_int4_rows(w_RD: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    R, D = w_RD.shape
    w = w_RD.float().reshape(R, D // group, group)
    at = w.abs().argmax(dim=-1, keepdim=True)
    d = torch.gather(w, -1, at) / -8.0  # [R, D/G, 1]
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.clamp(torch.floor(w * inv + 8.5), max=15).to(torch.uint8).reshape(R, D // QK, 2, QK // 2)
    packed = q[..., 0, :] | (q[..., 1, :] << 4)  # low nibble: input j of the chunk; high: input j + 16
    return packed.reshape(R, D // 2), d.squeeze(-1).to(torch.float16)


def unpack_int4(q_XDh: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes [0, 15] of packed int4 weights as uint8 `[..., X, D]` (inputs in order)."""
    *lead, X, Dh = q_XDh.shape
    b = q_XDh.reshape(*lead, X, Dh // (QK // 2), 1, QK // 2)
    return torch.cat([b & 0xF, b >> 4], dim=-2).reshape(*lead, X, 2 * Dh)


def dequantize_int4(q_XDh: torch.Tensor, s_XG: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(q - 8) * d for every weight, in `dtype` (computed in float32: exact for float32)."""
    codes = unpack_int4(q_XDh)
    *lead, X, D = codes.shape
    G = s_XG.shape[-1]
    w = (codes.to(torch.float32) - 8.0).reshape(*lead, X, G, D // G) * s_XG.float()[..., None]
    return w.reshape(*lead, X, D).to(dtype)


def dequantize(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float weight of a quantised one: int8 with row scales, or packed int4 (uint8) with group scales."""
    if q.dtype == torch.uint8:
        return dequantize_int4(q, s, dtype)
    return dequantize_int8(q, s, dtype)


def round_activations_q8(x_ND: torch.Tensor) -> torch.Tensor:
    """`x` (float32, last dimension a multiple of 32) rounded as the native int4 x int8 kernels round
    activations (decode.c `quant_a8`, llama.cpp's Q8_0): per block of 32 inputs, d = max|x| / 127 and
    x ≈ d * round-to-even(x * (127 / max|x|)), all in float32. What `int4_activations="int8"`
    (`int8_activations="int8"`) decoding multiplies the int4 (int8) weights by; the error per input is
    at most d / 2."""
    xb = x_ND.float().reshape(*x_ND.shape[:-1], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax != 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv) * (amax / 127)).reshape(x_ND.shape)


def rounds_activations(m: nn.Module) -> bool:
    """Whether int4 or int8 module `m` (`Int4Linear`, `Int4Experts`, `Int8Linear`, `Int8Experts`)
    multiplies its weights by activations rounded to int8 (`round_activations_q8`; its flag `act8`):
    whenever its model's `int4_activations` (int4; "int8" by default) or `int8_activations` (int8;
    "float32" by default) is "int8", as the model's native steps then do on any AVX-512 CPU (with or
    without VNNI) and as llama.cpp's Q4_0 / Q8_0 x Q8_0 always do; so PyTorch's pass (a forward, long
    steps, adapters' steps) computes the products those steps compute, and a model's numerics never
    depend on whether the native kernels are loaded (`MIXLAB_NATIVE=0`, no compiler, before
    `native.load()`) or the CPU."""
    return bool(getattr(m, "act8", False))


def int4_linear(x_ND: torch.Tensor, q_XDh: torch.Tensor, s_XG: torch.Tensor, *, act8: bool = False) -> torch.Tensor:
    """x @ dequantize_int4(q, s).T: the native kernel where the registry picks it, else the
    dequantised weight through PyTorch's matmul (correct everywhere; the weight is rebuilt per call).
    `act8`: x's rows rounded to int8 per block of 32 (`round_activations_q8`): by the native kernel
    (MX_Q4_*_A8: integer products, the native steps' own, for any number of rows) where it runs,
    else first, then multiplied exactly. Without act8 the native kernel takes a few rows only."""
    if registry.linear_impl(x_ND, q_XDh, s_XG, act8=act8) == "native":
        return torch.ops.mixlab.linear(x_ND, q_XDh, s_XG, act8)
    if act8:
        x_ND = round_activations_q8(x_ND).to(x_ND.dtype)
    return F.linear(x_ND, dequantize_int4(q_XDh, s_XG, x_ND.dtype))


def int8_linear(x_ND: torch.Tensor, q_XD: torch.Tensor, s_X: torch.Tensor, *, act8: bool = False) -> torch.Tensor:
    """x @ (q * s).T without materialising the bf16 weight when x has few rows (int4 weights:
    `int4_linear`). `act8`: x's rows rounded to int8 per block of 32 (`round_activations_q8`): by the
    native kernel (MX_I8_A8, the native steps' integer products) where it runs, else first, then
    multiplied exactly (the same products, summed in another order)."""
    if q_XD.dtype == torch.uint8:
        return int4_linear(x_ND, q_XD, s_X, act8=act8)
    impl = registry.linear_impl(x_ND, q_XD, s_X, act8=act8)
    if impl == "native":
        return torch.ops.mixlab.linear(x_ND, q_XD, s_X, act8)
    if act8:
        x_ND = round_activations_q8(x_ND).to(x_ND.dtype)
    lead = x_ND.shape[:-1]
    x2 = x_ND.reshape(-1, x_ND.shape[-1])
    if impl == "int8pack":
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), q_XD, s_X.to(x2.dtype))
    else:
        y = F.linear(x2, q_XD.to(x2.dtype)) * s_X.to(x2.dtype)
    return y.reshape(*lead, q_XD.shape[0])


class Int8Linear(nn.Module):
    """A bias-free `nn.Linear` replacement holding int8 weights and per-row scales (inference only).
    Built from a float linear (`Int8Linear(lin, scale_dtype=torch.bfloat16)`) or from quantised data
    (`Int8Linear.from_quantised`: a weight rounded as it was read, `load_model(quant="int8")`)."""

    def __init__(self, linear: nn.Linear | None = None, *, scale_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight: torch.Tensor
        self.scale: torch.Tensor
        # its model's int8_activations is "int8" (`Transformer.int8_activations` sets it): `rounds_activations`
        self.act8 = False
        if linear is None:
            return
        if linear.bias is not None:
            raise ValueError("Int8Linear supports bias-free linears only")
        q, s = quantize_int8(linear.weight)
        self._set(q, s.to(scale_dtype))

    def _set(self, q: torch.Tensor, s: torch.Tensor) -> None:
        self.out_features: int = q.shape[0]
        self.in_features: int = q.shape[1]
        self.register_buffer("weight", q)
        self.register_buffer("scale", s)

    @classmethod
    def from_quantised(cls, q_XD: torch.Tensor, s_X: torch.Tensor) -> Int8Linear:
        m = cls()
        m._set(q_XD, s_X)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scale, act8=rounds_activations(self))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


class Int4Linear(nn.Module):
    """A bias-free `nn.Linear` replacement holding packed int4 weights and float16 group scales
    (inference only). Built from a float linear (`Int4Linear(lin, group=32)`) or from packed data
    (`Int4Linear.from_packed`, e.g. a GGUF Q4_0 tensor)."""

    def __init__(self, linear: nn.Linear | None = None, *, group: int = 32) -> None:
        super().__init__()
        self.weight: torch.Tensor
        self.scale: torch.Tensor
        # its model's int4_activations is "int8" (`Transformer.int4_activations` sets it): `rounds_activations`
        self.act8 = False
        if linear is None:
            return
        if linear.bias is not None:
            raise ValueError("Int4Linear supports bias-free linears only")
        q, s = quantize_int4(linear.weight, group)
        self._set(q, s)

    def _set(self, q: torch.Tensor, s: torch.Tensor) -> None:
        self.out_features: int = q.shape[0]
        self.in_features: int = q.shape[1] * 2
        self.group: int = self.in_features // s.shape[1]
        self.register_buffer("weight", q)
        self.register_buffer("scale", s)

    @classmethod
    def from_packed(cls, q_XDh: torch.Tensor, s_XG: torch.Tensor) -> Int4Linear:
        m = cls()
        m._set(q_XDh, s_XG)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.weight, self.scale, act8=rounds_activations(self))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group}"
