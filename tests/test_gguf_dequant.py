"""mixlab's torch dequantisation of llama.cpp's K-quants (and Q4_1 / Q5_0 / Q5_1) equals the `gguf`
package's numpy `quants.dequantize`, which it replaced, bit for bit in float32: on random blocks (any
bytes are a valid block; f16 scales that are NaN or Inf included, where only NaN's payload may
differ), and on the tensors llama.cpp's own quantiser writes; a Q4_K_M file then computes llama.cpp's
logits on the same weights."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import kquant_source, llama_quantize
from mixlab.checkpoint import gguf_read, load_model
from mixlab.checkpoint.gguf import write_gguf

gguf = pytest.importorskip("gguf")


def _theirs(raw: np.ndarray, ttype: int) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):  # NaN / Inf scales in random blocks
        return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(ttype)).reshape(-1)


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    """Equal bits, NaN where NaN (its payload and sign: whichever operand the CPU's SIMD kept)."""
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def _dequant():  # imported by the tests of its API alone: the file tests run on the code before it too
    from mixlab.checkpoint import gguf_dequant

    return gguf_dequant


# where each block's float16 scales are (ggml-common.h's block_* structs)
F16_AT = {"Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2),
          "Q5_K": (0, 2), "Q6_K": (208,)}
SPECIAL = np.array([np.inf, -np.inf, np.nan, -0.0, 0.0, 2.0**-24, -(2.0**-14), 65504.0], np.float16)


KINDS = {3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}  # ggml ids


@pytest.mark.parametrize("ttype", sorted(KINDS), ids=KINDS.get)
def test_random_blocks_equal_gguf_quants(ttype):
    """Random bytes (NaN-scaled blocks ~3% of them) and, in the first blocks, each scale set to
    +-Inf, NaN, +-0, the smallest subnormal and normal, and the largest finite float16."""
    gguf_dequant = _dequant()
    assert set(gguf_dequant.BLOCKS) == set(KINDS)
    name, block, size = gguf_dequant.BLOCKS[ttype]
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)] == (block, size), name
    raw = np.random.default_rng(ttype).integers(0, 256, (4096, size), dtype=np.uint8)
    for k, at in enumerate(F16_AT[name]):
        raw[: 8 * len(SPECIAL), at : at + 2] = np.roll(np.repeat(SPECIAL, 8), k * 8).view(np.uint8).reshape(-1, 2)
    want = _theirs(raw, ttype)
    got = gguf_dequant.dequantize(torch.from_numpy(raw), ttype)
    assert got.dtype == torch.float32 and got.shape == (4096 * block,)
    _assert_same(got.numpy(), want)
    assert np.isnan(want).any() and np.isinf(want).any()  # the special scales were compared too
    assert (np.abs(want[np.isfinite(want)]) > 0).mean() > 0.5


def test_partial_blocks_are_refused():
    with pytest.raises(ValueError, match=r"Q4_K: expected whole 144-byte blocks as uint8, got 145 torch.uint8"):
        _dequant().dequantize(torch.zeros(145, dtype=torch.uint8), 12)


# ------------------------------------------------------------------------------------------------
# Files llama.cpp quantises (rows of 256: K-quant blocks fit)

llama_cpp = pytest.importorskip("llama_cpp")

# ftype -> the types llama.cpp writes for this small model (its mixes keep some tensors wider)
FTYPES = {"Q4_K_M": {"Q4_K", "Q6_K"}, "Q5_K_M": {"Q5_K", "Q6_K"}, "Q2_K": {"Q2_K", "Q3_K", "Q6_K"},
          "Q4_1": {"Q4_1", "Q6_K"}, "Q5_0": {"Q5_0", "Q6_K"}, "Q5_1": {"Q5_1", "Q6_K"}}


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory):
    return kquant_source(tmp_path_factory.mktemp("kq"))


_quantize = llama_quantize


@pytest.mark.parametrize("ftype", sorted(FTYPES))
def test_tensors_llama_cpp_quantised_equal_gguf_quants(f32_file, ftype):
    """Every tensor of llama.cpp's file, read by `_Reader.floats` (in chunks), equals gguf-py's
    dequantisation of its bytes bit for bit (of the vocabulary's matrices, 1,024 rows: gguf-py takes
    seconds over their 32,000)."""
    h = gguf_read.read_header(_quantize(f32_file, ftype))
    assert {t.type_name for t in h.tensors.values()} - {"F32"} == FTYPES[ftype]
    reader = gguf_read._Reader(h)
    try:
        for t in h.tensors.values():
            if t.type_name == "F32":
                continue
            if t.shape[0] > 1024:  # the embedding and output matrices, 32,000 rows: their first 1,024
                t = t.rows(0, 1024)
            got = reader.floats(t, torch.float32)
            raw = reader.raw(t).reshape(-1, t.nbytes // int(np.prod(t.shape[:-1])))
            _assert_same(got.reshape(-1).numpy(), _theirs(raw, t.type))
    finally:
        reader.close()


def test_q4_k_m_equals_llama_cpp_on_the_same_weights(f32_file, tmp_path, monkeypatch):
    """A Q4_K_M file (Q4_K, Q6_K) loads as floats, without the gguf package too, whose logits are
    llama.cpp's on an f32 file of those same weights (1e-3), and within 5% of llama.cpp's on the
    Q4_K_M file itself (which also rounds activations to 8 bits: Q4_K x Q8_K dot products)."""
    path = _quantize(f32_file, "Q4_K_M")
    loaded = load_model(path)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "gguf", None)
        without = load_model(path).state_dict()
    for name, t in loaded.state_dict().items():
        assert torch.equal(without[name], t), name
    tokens = torch.randint(3, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = loaded(tokens)[0].numpy()

    def logits(p: Path) -> np.ndarray:
        llm = llama_cpp.Llama(str(p), logits_all=True, n_ctx=64, n_threads=2, type_k=0, type_v=0, verbose=False)
        llm.eval(tokens[0].tolist())
        out = np.array(llm.scores[: tokens.shape[1]], dtype=np.float32)
        llm.close()
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # write_gguf's notes on the tokenizer
        same = logits(write_gguf(loaded, tmp_path / "deq.gguf", quant="f32"))
    np.testing.assert_allclose(got, same, atol=1e-3, rtol=0)
    theirs = logits(path)
    assert np.linalg.norm(got - theirs) / np.linalg.norm(theirs) < 0.05
