"""The native weight conversions (decode.c "Weight conversion"): int4 rounding (`mx_quantize_q4`) and
K-quant dequantisation (`mx_dequantize`) give the bytes of their PyTorch references
(`ops.quant._quantize_int4_rows`, `checkpoint.gguf_dequant`) bit for bit, and the paths that read a
Q4_K_M file into int4 (an offloaded expert's read, `quantize_int4`) take them once the kernels are loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixlab.checkpoint import gguf_dequant
from mixlab.ops import native
from mixlab.ops.quant import _quantize_int4_rows, quantize_int4

lib = native.load()
pytestmark = pytest.mark.skipif(lib is None, reason="native kernels unavailable (no C compiler)")


@pytest.fixture
def threads():
    """Three threads (rows that do not divide by them), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def _hard_rows(R: int, D: int, group: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows with, per row kind, groups that test the rounding's corners: ties of |x| (first of
    +m and -m decides the sign of d), all zeros (and -0.0 first), values whose d is subnormal (1/d
    infinite: codes from torch's float -> uint8 conversion of inf and NaN), huge values (d overflowing
    float16), exact halves (x / d + 8.5 an integer), small integers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(R, D, generator=g)
    for r in range(R):
        kind, row = r % 9, w[r].view(-1, group)
        if kind == 1:  # |x| ties: +m and -m, the first decides
            row[:, ::7] = 2.5 * torch.sign(torch.randn(row[:, ::7].shape, generator=g))
        elif kind == 2:
            row[::2] = 0.0
            row[1::2, 0] = -0.0
        elif kind == 3:
            row.mul_(1e-40)  # subnormal values: d subnormal or zero in float16
        elif kind == 4:
            row.mul_(3e37)  # d = m / -8 past float16's 65504: inf scales
        elif kind == 5:
            row.copy_((torch.randint(-8, 8, row.shape, generator=g).float() + 0.5) / 8)  # halves
        elif kind == 6:
            row.copy_(torch.randint(-3, 4, row.shape, generator=g).float())  # many ties, zeros
        elif kind == 7:
            row.mul_(2.0**-130)  # normal float32 values whose d is subnormal in float32
    return w.to(dtype)


def _assert_int4_equal(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert got[0].dtype == torch.uint8 and got[1].dtype == torch.float16
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1].view(torch.int16), want[1].view(torch.int16))  # -0.0 and NaN bits too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantize_int4_equals_the_reference(dtype, group, threads):
    w = _hard_rows(37, 4 * 128, group, dtype, seed=group)
    want = _quantize_int4_rows(w, group)
    assert (want[1] == 0).any() and want[1].isinf().any() and (want[1].abs() > 0).any()  # the corners were hit
    _assert_int4_equal(native.quantize_int4(w, group), want)


@pytest.mark.parametrize("group", [32, 128])
def test_quantize_int4_of_nan_groups_equals_the_reference(group):
    """A NaN takes its group's scale (the first NaN, as torch's argmax; codes 0) and leaves the
    other groups' bytes alone: the 16-group pass (groups of 32) falls back to one group at a time."""
    w = _hard_rows(8, 1024, group, torch.float32, seed=3)
    w[1, 5] = w[4, 700] = float("nan")
    w[4, 703] = -float("nan")
    got, want = native.quantize_int4(w, group), _quantize_int4_rows(w, group)
    assert torch.equal(got[0], want[0])
    nan = want[1].isnan()
    assert nan.sum() == 2 and torch.equal(got[1].isnan(), nan)
    assert torch.equal(got[1][~nan].view(torch.int16), want[1][~nan].view(torch.int16))


def test_quantize_int4_takes_the_native_kernel_and_gives_the_same_bytes(monkeypatch):
    """`quantize_int4` on stacked CPU weights goes to `native.quantize_int4` once the kernels are
    loaded, and `MIXLAB_NATIVE=0` (the PyTorch code, in chunks) gives the same bytes; non-contiguous
    weights too."""
    w = _hard_rows(2 * 256, 128, 32, torch.bfloat16, seed=1).view(2, 256, 128)[:, ::2, :96]  # [2, 128, 96]
    calls = []
    real = native.quantize_int4
    monkeypatch.setattr(native, "quantize_int4", lambda *a: calls.append(1) or real(*a))
    got = quantize_int4(w, 32)
    assert calls and got[0].shape == (2, 128, 48) and got[1].shape == (2, 128, 3)
    monkeypatch.setenv("MIXLAB_NATIVE", "0")
    want = quantize_int4(w, 32)
    assert len(calls) == 1
    _assert_int4_equal(got, want)


def test_the_registry_chooses_the_conversions():
    """Rounding to int4 and dequantising K-quants go native only once loaded, on the CPU, for float32 /
    bf16 and the types the kernels take (Q4_K 12, Q5_K 13, Q6_K 14); the registry says it, not callers."""
    from mixlab.ops import registry

    assert registry.convert_impl("quantize_int4", device="cpu", dtype=torch.bfloat16) == "native"
    assert registry.convert_impl("quantize_int4", device="cuda", dtype=torch.bfloat16) == "torch"
    assert registry.convert_impl("quantize_int4", device="cpu", dtype=torch.float16) == "torch"
    assert registry.convert_impl("dequantize", device="cpu", dtype=torch.float32, ggml_type=14) == "native"
    assert registry.convert_impl("dequantize", device="cpu", dtype=torch.float32, ggml_type=2) == "torch"  # Q4_0
    with pytest.raises(ValueError, match="unknown conversion 'pack'"):
        registry.convert_impl("pack", device="cpu", dtype=torch.float32)


def test_native_quantize_int4_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match=r"contiguous CPU float32 or bf16 rows .* not torch.float16 \(4, 64\)"):
        native.quantize_int4(torch.zeros(4, 64, dtype=torch.float16), 32)
    with pytest.raises(ValueError, match=r"not torch.float32 \(4, 96\) on cpu in groups of 64"):
        native.quantize_int4(torch.zeros(4, 96), 64)


KQUANTS = {12: ("Q4_K", (0, 2)), 13: ("Q5_K", (0, 2)), 14: ("Q6_K", (208,))}  # ggml id: name, f16 scales' bytes


@pytest.mark.parametrize("ttype", sorted(KQUANTS), ids=lambda t: KQUANTS[t][0])
def test_dequantize_k_quants_equals_the_reference(ttype, threads):
    """Random blocks (any bytes are a block) with finite float16 scales, among them +-0, subnormals and
    the largest; 1,001 blocks (not a multiple of the threads)."""
    name, at = KQUANTS[ttype]
    assert native.DEQUANT_TYPES[ttype] == gguf_dequant.BLOCKS[ttype][2]
    size = gguf_dequant.BLOCKS[ttype][2]
    rng = np.random.default_rng(ttype)
    raw = rng.integers(0, 256, (1001, size), dtype=np.uint8)
    special = np.array([0.0, -0.0, 2.0**-24, -(2.0**-14), 65504.0, -65504.0, 1e-3, 7.0], np.float16)
    for k, o in enumerate(at):
        d = (rng.standard_normal(1001) * 0.01).astype(np.float16)
        d[:64] = np.roll(np.repeat(special, 8), 8 * k)
        raw[:, o : o + 2] = d.view(np.uint8).reshape(-1, 2)
    want = gguf_dequant.dequantize(torch.from_numpy(raw), ttype)
    got = native.dequantize(torch.from_numpy(raw), ttype)
    assert got.dtype == torch.float32 and got.shape == want.shape == (1001 * 256,), name
    assert torch.isfinite(want).all() and (want != 0).float().mean() > 0.5
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), name
    into = torch.full((1001, 256), 3.0, dtype=torch.bfloat16)  # written in place, rounded as PyTorch's copy_
    assert native.dequantize(torch.from_numpy(raw), ttype, out=into) is into
    assert torch.equal(into.view(-1).view(torch.int16), want.to(torch.bfloat16).view(torch.int16)), name


def test_native_dequantize_refuses_partial_blocks_and_other_types():
    with pytest.raises(ValueError, match=r"whole blocks \(uint8\) of ggml types \[12, 13, 14\], not 145 torch.uint8"):
        native.dequantize(torch.zeros(145, dtype=torch.uint8), 12)
    with pytest.raises(ValueError, match=r"not 22 torch.uint8 elements of type 6"):
        native.dequantize(torch.zeros(22, dtype=torch.uint8), 6)  # Q5_0: the PyTorch code's
    with pytest.raises(ValueError, match=r"writes 256 values into a contiguous CPU float32 or bf16 tensor, not "
                                         r"torch.float16 \(256,\)"):
        native.dequantize(torch.zeros(144, dtype=torch.uint8), 12, out=torch.empty(256, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"not torch.float32 \(16, 8\) on cpu"):
        native.dequantize(torch.zeros(144, dtype=torch.uint8), 12, out=torch.empty(16, 16)[:, :8])


@pytest.mark.slow
def test_portable_loops_equal_the_reference(tmp_path, monkeypatch, threads):
    """The conversion's loops without AVX-512 (built with MX_CONVERT_PORTABLE: what a CPU without it
    runs) give the same bytes."""
    path = native.compile_library(native.compiler(), tmp_path / "portable.so", defines=("MX_CONVERT_PORTABLE",))
    portable, _ = native.load_library(path)
    monkeypatch.setattr(native, "_lib", portable)
    for group in (32, 128):
        w = _hard_rows(19, 256, group, torch.float32, seed=7)
        _assert_int4_equal(native.quantize_int4(w, group), _quantize_int4_rows(w, group))


# ------------------------------------------------------------------------------------------------
# A Q4_K_M file llama.cpp quantised, offloaded into int4 slots


def test_offloaded_q4_k_m_expert_slots_equal_the_pytorch_path(tmp_path, monkeypatch):
    """An offloaded Q4_K_M file's experts (Q4_K and Q6_K blocks) read into int4 slots by
    `GGUFSource.read` (chunks of rows: native K-quant dequantisation straight to bf16, native int4
    rounding) hold the bytes of the PyTorch path as it was (`MIXLAB_NATIVE=0`: each matrix dequantised
    whole to float32, then bf16, then `SlotFormat.fill`), in groups of 32 and 128; int8 and plain
    slots too (chunked against whole)."""
    pytest.importorskip("llama_cpp")
    from conftest import kquant_source, llama_quantize
    from mixlab.checkpoint.gguf_read import _Reader, config_from_header, read_header
    from mixlab.checkpoint.offload import GGUFSource
    from mixlab.ops.offload import Slot, SlotFormat

    h = read_header(llama_quantize(kquant_source(tmp_path), "Q4_K_M"))
    cfg = config_from_header(h)
    assert cfg.moe is not None
    src = GGUFSource(h, cfg)
    assert {t.type_name for ts in src.layers for t in ts} == {"Q4_K", "Q6_K"}
    calls: dict[str, int] = {"quantize_int4": 0, "dequantize": 0}
    for name in calls:
        real = getattr(native, name)

        def spy(*a, _n=name, _f=real, **k):  # type: ignore[no-untyped-def]
            calls[_n] += 1
            return _f(*a, **k)

        monkeypatch.setattr(native, name, spy)
    reader = _Reader.__new__(_Reader)
    reader.h, reader.fds = src.h, src.files.fds

    def empty(fmt: SlotFormat) -> Slot:
        parts = {k: torch.full(s, 7, dtype=d) for k, (s, d) in fmt.shapes(cfg.dim, cfg.ffn_dim).items()}
        return Slot(parts["w13"], parts["w2"], parts.get("w13_scale"), parts.get("w2_scale"))

    def as_bytes(slot: Slot) -> list[torch.Tensor]:
        return [t.view(torch.uint8) for t in slot if t is not None]

    try:
        for fmt in (SlotFormat("int4", torch.bfloat16, 32), SlotFormat("int4", torch.bfloat16, 128),
                    SlotFormat("int8", torch.bfloat16), SlotFormat("plain", torch.float32)):
            for layer in range(cfg.n_layers):
                for e in range(cfg.moe.num_experts):
                    got = empty(fmt)
                    src.read(layer, e, fmt, got)
                    with monkeypatch.context() as m:
                        m.setenv("MIXLAB_NATIVE", "0")
                        gate, up, down = (t.experts(e, e + 1) for t in src.layers[layer])
                        want = empty(fmt)
                        w13 = torch.cat([reader.floats(gate, fmt.dtype), reader.floats(up, fmt.dtype)], 1)
                        fmt.fill(want, w13[0], reader.floats(down, fmt.dtype)[0])
                    for a, b in zip(as_bytes(got), as_bytes(want), strict=True):
                        assert torch.equal(a, b), (fmt, layer, e)
            assert calls["dequantize"] and (calls["quantize_int4"] or fmt.kind != "int4")
    finally:
        src.close()
