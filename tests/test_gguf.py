"""GGUF export: llama.cpp (through llama-cpp-python) loads the file and computes mixlab's logits.

Tolerances. f32 files must agree to 1e-3 (they agree to ~1e-6: same weights, float32 arithmetic).
Quantised files cannot agree elementwise: bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 0.2%)
and llama.cpp also rounds every activation it feeds to a bf16 matmul; q8_0 stores blocks of 32 as
int8 times one f16 scale (error up to 0.4% of the block maximum) and quantises activations the same
way. Through the layers these roundings add up to ~1-2% (bf16) and ~2-4% (q8_0) relative error on
the logits of a random model, so we bound the relative Frobenius error by 4% and 8% and require the
same argmax on 90% of positions. Any layout mistake (a missing rotary permutation, swapped gate and
up projections) gives a relative error near 100%, which the test checks too. The router is scaled up
so that no expert choice is a near-tie: a flipped tie under rounding is legitimate but would make
any tolerance meaningless.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import gguf_test_model
from mixlab import load_model
from mixlab.checkpoint.gguf import rope_permute, write_gguf
from mixlab.config import get_preset
from mixlab.model import Transformer

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

T = 24


def _model(kind: str) -> Transformer:
    return gguf_test_model(kind)


def _llama_logits(path: Path, tokens: list[int]) -> np.ndarray:
    # type_k/type_v = 0 (GGML_TYPE_F32): keep llama.cpp's KV cache in float32, not its default f16.
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, n_threads=2, type_k=0, type_v=0, verbose=False)
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return out


@pytest.fixture(scope="module", params=["moe", "dense"])
def model_and_ref(request):
    torch.manual_seed(0)
    model = _model(request.param)
    tokens = torch.randint(3, 32000, (1, T))
    with torch.no_grad():
        ref = model(tokens)[0].numpy()
    return model, tokens[0].tolist(), ref


def test_f32_gguf_matches_mixlab_logits(model_and_ref, tmp_path):
    model, tokens, ref = model_and_ref
    got = _llama_logits(write_gguf(model, tmp_path / "m.gguf", quant="f32"), tokens)
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize(("quant", "tol"), [("bf16", 0.04), ("q8_0", 0.08), ("f16", 0.04)])
def test_quantised_gguf_within_rounding_error(model_and_ref, tmp_path, quant, tol):
    model, tokens, ref = model_and_ref
    got = _llama_logits(write_gguf(model, tmp_path / "m.gguf", quant=quant), tokens)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < tol, f"{quant}: relative logit error {rel:.4f} >= {tol}"
    # The next token agrees wherever the reference is decisive: a top-2 margin of more than twice the
    # largest logit error of that position cannot be flipped by rounding. (Near-ties of this random
    # model may flip, and do: llama.cpp's Q8_0 also rounds activations to 8 bits.)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > 2 * np.abs(got - ref).max(-1)
    assert decisive.mean() >= 0.25, "too few decisive positions: the test would be weak"
    assert (got.argmax(-1) == ref.argmax(-1))[decisive].all()


def test_layout_mistake_is_detected(tmp_path, monkeypatch):
    """The parity test can fail: without the rotary permutation llama.cpp computes something else."""
    import mixlab.checkpoint.gguf as g

    model = _model("moe")
    tokens = torch.randint(3, 32000, (1, T))
    with torch.no_grad():
        ref = model(tokens)[0].numpy()
    monkeypatch.setattr(g, "rope_permute", lambda w, n: w)
    got = _llama_logits(g.write_gguf(model, tmp_path / "bad.gguf", quant="f32"), tokens[0].tolist())
    assert np.abs(got - ref).max() > 1e-2


def test_rope_permute_pairs_halves_into_neighbours():
    Hd, D = 8, 3
    w = torch.arange(2 * Hd, dtype=torch.float32)[:, None].expand(2 * Hd, D)  # two heads
    rows = rope_permute(w, 2)[:, 0].tolist()
    assert rows[:Hd] == [0, 4, 1, 5, 2, 6, 3, 7] and rows[Hd:] == [8, 12, 9, 13, 10, 14, 11, 15]


def test_bad_requests_are_clear_errors_and_leave_no_file(tmp_path):
    model = Transformer(get_preset("tiny-moe"))  # vocab 256 < the tokenizer's 32000 pieces
    model.init_weights(seed=0)
    with pytest.raises(ValueError, match="32000 pieces but the model's vocab_size is 256"):
        write_gguf(model, tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="unknown GGUF quantisation 'q4'"):
        write_gguf(model, tmp_path / "m.gguf", quant="q4")
    with pytest.raises(ValueError, match="must end in .gguf"):
        write_gguf(model, tmp_path / "m.bin")
    assert list(tmp_path.iterdir()) == []


def test_convert_cli_writes_a_gguf_llama_cpp_reads(tmp_path, capsys):
    from mixlab.checkpoint import save_model
    from mixlab.cli import main

    model = _model("moe")
    save_model(model, tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--to", "gguf", "--quant", "f32"]) == 0
    assert "gguf, f32" in capsys.readouterr().out
    tokens = torch.randint(3, 32000, (1, 8))
    with torch.no_grad():
        ref = model(tokens)[0].numpy()
    np.testing.assert_allclose(_llama_logits(tmp_path / "m.gguf", tokens[0].tolist()), ref, atol=1e-3, rtol=0)


def test_a_sliding_window_left_out_is_a_warning(tmp_path):
    """llama.cpp's `llama` architecture has no sliding window: writing a model with one says so
    (it was dropped silently, and the file's model attends to the whole context)."""
    import warnings

    model = _model("dense")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_gguf(model, tmp_path / "m.gguf", quant="f32")
    model.config = model.config.replace(sliding_window=32)  # in a 512-token context
    with pytest.warns(UserWarning, match=r"m.gguf: the model's sliding window \(32 tokens\) is not written"):
        write_gguf(model, tmp_path / "m.gguf", quant="f32")


def test_rows_that_blocks_do_not_fit_are_f16_and_said(tmp_path):
    """q8_0 / q4_0 blocks hold 32 inputs: a matrix with 40 per row is stored as f16, as llama.cpp's
    quantiser does, and a warning says so (it was silent); the file still reads back, in float32 (its
    few f16 matrices made the whole model float16, the exact Q8_0 ones rounded to it)."""
    import gguf

    cfg = get_preset("tiny-dense").replace(vocab_size=32000, sliding_window=None, ffn_dim=40)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    with pytest.warns(UserWarning, match=r"matrices have rows that are not a multiple of 32 \(.*: 40 inputs\), "
                                         r"which q8_0 blocks need: they are stored as f16"):
        path = write_gguf(model, tmp_path / "m.gguf", quant="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"
    assert {p.dtype for p in load_model(path).parameters()} == {torch.float32}
    assert {p.dtype for p in load_model(write_gguf(model, tmp_path / "h.gguf", quant="f16")).parameters()} == \
        {torch.float16}  # an f16 file (its router f32) is float16
