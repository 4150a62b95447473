"""Dequantise llama.cpp's block types in torch: the K-quants of the common Q4_K_M / Q5_K_M / Q6_K
downloads (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and the older Q4_1, Q5_0, Q5_1.

Each function takes whole blocks as bytes [B, block bytes] (uint8) and returns their values [B, block
elements] in float32, equal bit for bit to llama.cpp's `dequantize_row_*` (ggml-quants.c) and to the
`gguf` package's numpy `quants.dequantize`, which it replaces: the same float32 operations in the same
order (scale x sub-block scale, times the code, minus scale x sub-block min), vectorised over blocks
by torch's threads instead of numpy's one. Every ggml type is little-endian; a block's scales are
float16. Layouts (from ggml-common.h; a K-quant super-block is 256 values):

- Q4_1  (20 bytes / 32): d, m (f16), 16 bytes of nibbles (value i: byte i % 16, low nibble for i < 16).
- Q5_0  (22 / 32): d, qh (32 fifth bits, bit i of the little-endian word), 16 bytes of nibbles; q - 16.
- Q5_1  (24 / 32): d, m, qh, nibbles; d q + m.
- Q2_K  (84 / 256): 16 bytes of 4-bit scale | 4-bit min per 16 values, 64 bytes of 2-bit codes, d, dmin.
- Q3_K  (110 / 256): 32 bytes of high bits (set means no -4), 64 bytes of 2-bit codes, 12 bytes of
  sixteen 6-bit scales (offset 32), d.
- Q4_K  (144 / 256): d, dmin, 12 bytes of eight 6-bit scales and mins, 128 bytes of nibbles.
- Q5_K  (176 / 256): Q4_K's, with 32 bytes of fifth bits before the nibbles.
- Q6_K  (210 / 256): 128 bytes of low nibbles, 64 bytes of 2-bit high parts, sixteen int8 scales, d;
  q - 32.

Shape legend: B blocks, S sub-blocks of a block, L values of a sub-block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

QK_K = 256  # values of a K-quant super-block

# ggml type id -> (name, elements per block, bytes per block), as ggml.c's type traits
Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 3, 6, 7, 10, 11, 12, 13, 14
BLOCKS = {Q4_1: ("Q4_1", 32, 20), Q5_0: ("Q5_0", 32, 22), Q5_1: ("Q5_1", 32, 24), Q2_K: ("Q2_K", QK_K, 84),
          Q3_K: ("Q3_K", QK_K, 110), Q4_K: ("Q4_K", QK_K, 144), Q5_K: ("Q5_K", QK_K, 176),
          Q6_K: ("Q6_K", QK_K, 210)}


def _f16(blocks_BS: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte `at` of each block, as float32 [B, 1]."""
    return blocks_BS[:, at : at + 2].contiguous().view(torch.float16).float()


def _bits(bytes_BN: torch.Tensor, shifts: list[int], width: int) -> torch.Tensor:
    """Fields of `width` bits of each byte at each shift: [B, len(shifts), N] uint8 (shift-major, as the
    ggml layouts store consecutive values: all bytes' low fields, then all their next ones). One
    shift at a time, written in place: a broadcast shift, and every fresh temporary (page faults on
    each chunk's new memory), cost more than the arithmetic."""
    out = torch.empty(bytes_BN.shape[0], len(shifts), bytes_BN.shape[1], dtype=torch.uint8)
    for i, s in enumerate(shifts):
        torch.bitwise_right_shift(bytes_BN, s, out=out[:, i])
        if s + width < 8:
            out[:, i].bitwise_and_((1 << width) - 1)
    return out


def _nibbles(qs_BN: torch.Tensor) -> torch.Tensor:
    """Low nibbles then high nibbles of each run of bytes: [B, 2 N] uint8."""
    return _bits(qs_BN, [0, 4], 4).flatten(1)


def _with_high(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """low | high << 4, in `low`."""
    return low.bitwise_or_(high.bitwise_left_shift_(4))


def _fifth_bits32(qh_B4: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1's 32 fifth bits [B, 32]: value i takes bit i of the little-endian uint32 (read in the
    machine's order, little-endian as on x86 and ARM; bit 31 of a negative int32 shifts in ones, masked)."""
    word = qh_B4.contiguous().view(torch.int32)  # [B, 1]
    return ((word >> torch.arange(32, dtype=torch.int32)) & 1).to(torch.uint8)


def _affine(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None, *, less: int = 0,
            minus: bool = False) -> torch.Tensor:
    """scale (q - less) + offset (- offset if `minus`) in float32, in place on one new float tensor,
    the operations in llama.cpp's order (q - less is an exact small integer either way); `scale` and
    `offset` broadcast over the last dim."""
    y = q.float()
    if less:
        y.sub_(less)
    y.mul_(scale)
    if offset is not None:
        y.sub_(offset) if minus else y.add_(offset)
    return y


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _affine(_nibbles(b[:, 4:]), _f16(b, 0), _f16(b, 2))


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    return _affine(_with_high(_nibbles(b[:, 6:]), _fifth_bits32(b[:, 2:6])), _f16(b, 0), less=16)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    return _affine(_with_high(_nibbles(b[:, 8:]), _fifth_bits32(b[:, 4:8])), _f16(b, 0), _f16(b, 2))


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    B = b.shape[0]
    sc = b[:, :16]  # one byte per 16 values: scale low nibble, min high nibble
    dl, ml = (_f16(b, 80) * (sc & 0xF).float()).unsqueeze(2), (_f16(b, 82) * (sc >> 4).float()).unsqueeze(2)
    # two halves of 128 values, each 32 bytes read at shifts 0, 2, 4, 6: value 128 h + 32 s + l
    q = _bits(b[:, 16:80].reshape(B * 2, 32), [0, 2, 4, 6], 2).reshape(B, 16, 16)
    return _affine(q, dl, ml, minus=True).reshape(B, QK_K)


def _q3_k_scales(s_B12: torch.Tensor) -> torch.Tensor:
    """Q3_K's sixteen 6-bit scales: low 4 bits from bytes 0-7 (low nibbles for scales 0-7, high
    for 8-15), high 2 bits from bytes 8-11 (scale i: byte 8 + i % 4 at shift 2 (i // 4)); less 32."""
    low = _nibbles(s_B12[:, :8])  # [B, 16]
    high = _bits(s_B12[:, 8:], [0, 2, 4, 6], 2).flatten(1)  # [B, 16]
    return _with_high(low, high).to(torch.int8) - 32


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    B = b.shape[0]
    dl = (_f16(b, 108) * _q3_k_scales(b[:, 96:108]).float()).unsqueeze(2)  # [B, 16, 1]
    q = _bits(b[:, 32:96].reshape(B * 2, 32), [0, 2, 4, 6], 2).reshape(B, 16, 16)  # value 128 h + 32 s + l
    high = _bits(b[:, :32], list(range(8)), 1).reshape(B, 16, 16)  # value 32 j + l: bit j of byte l
    q.add_(high.bitwise_left_shift_(2))  # q + 4 where the high bit is set; less 4 below: a clear bit subtracts 4
    return _affine(q, dl, less=4).reshape(B, QK_K)


def _k_scale_min(s_B12: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's eight 6-bit scales and mins [B, 8] from 12 bytes: for j < 4, scale j and min j
    are the low 6 bits of bytes j and j + 4; for j >= 4, their low 4 bits are byte j + 4's low and
    high nibble, their high 2 bits the top bits of bytes j - 4 and j."""
    d, m, md = s_B12.contiguous().view(-1, 3, 4).unbind(1)  # a copy of 12 bytes a block: the ops below are faster on it
    sc = torch.cat([d & 0x3F, (md & 0xF) | (d >> 6) << 4], 1)
    mn = torch.cat([m & 0x3F, (md >> 4) | (m >> 6) << 4], 1)
    return sc, mn


def _k_affine(b: torch.Tensor, q_BSL: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K: (d x scale) q - (dmin x min), per sub-block of 32."""
    sc, mn = _k_scale_min(b[:, 4:16])
    dl, ml = (_f16(b, 0) * sc.float()).unsqueeze(2), (_f16(b, 2) * mn.float()).unsqueeze(2)  # [B, 8, 1]
    return _affine(q_BSL, dl, ml, minus=True).reshape(b.shape[0], QK_K)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    B = b.shape[0]
    # four runs of 32 bytes: sub-block 2 r from their low nibbles, 2 r + 1 from their high ones
    return _k_affine(b, _nibbles(b[:, 16:].reshape(B * 4, 32)).reshape(B, 8, 32))


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    B = b.shape[0]
    low = _nibbles(b[:, 48:].reshape(B * 4, 32)).reshape(B, 8, 32)
    high = _bits(b[:, 16:48], list(range(8)), 1)  # [B, 8, 32]: sub-block j's fifth bits are bit j of the 32 bytes
    return _k_affine(b, _with_high(low, high))


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    B = b.shape[0]
    dl = (_f16(b, 208) * b[:, 192:208].view(torch.int8).float()).unsqueeze(2)  # [B, 16, 1]
    # two halves of 128 values; in each, 64 bytes of nibbles (low nibbles: values 0-63, high: 64-127)
    # and 32 bytes of 2-bit high parts at shifts 0, 2, 4, 6 (values 0-31, 32-63, 64-95, 96-127)
    low = _nibbles(b[:, :128].reshape(B * 2, 64))
    high = _bits(b[:, 128:192].reshape(B * 2, 32), [0, 2, 4, 6], 2).reshape(B * 2, 128)
    return _affine(_with_high(low, high).reshape(B, 16, 16), dl, less=32).reshape(B, QK_K)


DEQUANTIZE: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    Q4_1: _q4_1, Q5_0: _q5_0, Q5_1: _q5_1, Q2_K: _q2_k, Q3_K: _q3_k, Q4_K: _q4_k, Q5_K: _q5_k, Q6_K: _q6_k}


def dequantize(raw: torch.Tensor, ttype: int) -> torch.Tensor:
    """The values of whole blocks of ggml type `ttype` (a key of `BLOCKS`), given as their bytes
    (uint8, any shape), as float32 [number of values]."""
    name, _, size = BLOCKS[ttype]
    if raw.dtype != torch.uint8 or raw.numel() % size:
        raise ValueError(f"{name}: expected whole {size}-byte blocks as uint8, got {raw.numel()} {raw.dtype} elements")
    return DEQUANTIZE[ttype](raw.reshape(-1, size)).reshape(-1)
