"""GGUF import: files written by llama.cpp's own `convert_hf_to_gguf.py` (and quantised by its
`llama_model_quantize`) load into mixlab and compute llama.cpp's logits; malformed files are refused.

Tolerances. F32: mixlab's logits equal the source checkpoint's exactly (same float32 weights, same
code) and llama.cpp's within 1e-3 with its KV cache in float32. Q4_0 / Q8_0: mixlab keeps (Q4_0) or
dequantises exactly (Q8_0) the stored weights, so its logits must equal llama.cpp's on a float32 file
holding those same dequantised weights within 1e-3; llama.cpp on the quantised file itself also
rounds every activation to 8 bits (its Q4_0 x Q8_0 dot products), which moves logits by ~1.5%
relative on this random model: bounded by 5% and 90% equal argmaxes.

The converter ships in llama-cpp-python's sdist (`pip download llama-cpp-python --no-binary :all:
--no-deps`, vendor/llama.cpp); point `LLAMA_CPP_CONVERT` at its `convert_hf_to_gguf.py` (default:
../shared/llama.cpp/, else extracted once from the installed version's sdist: `conftest.llama_cpp_converter`).
Without it the converter tests skip; the rest runs on files mixlab writes.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import gguf_test_model, llama_cpp_converter
from mixlab.checkpoint import CheckpointError, gguf_read, load_model, save_model
from mixlab.checkpoint.gguf import _tensors as gguf_tensors
from mixlab.checkpoint.gguf import gguf_writer, write_gguf
from mixlab.checkpoint.gguf_read import read_header
from mixlab.model import Experts, MoEBlock, Transformer
from mixlab.model.formats import Int4Experts
from mixlab.ops.quant import Int4Linear, dequantize
from mixlab.tokenizer import default_tokenizer_path, load_tokenizer

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[1]
CONVERT = llama_cpp_converter() or Path(os.environ.get("LLAMA_CPP_CONVERT", "convert_hf_to_gguf.py"))
T = 24


def _model(kind: str) -> Transformer:
    return gguf_test_model(kind)


def _llama_logits(path: Path, tokens: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, n_threads=2, type_k=0, type_v=0, verbose=False)
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return out


def _quantize(src: Path, dst: Path, ftype: int) -> Path:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


def _dequantized(model: Transformer) -> Transformer:
    """The same model with every int4 matrix as float32 (the weights llama.cpp dequantises to)."""
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, Int4Linear):
                lin = nn.Linear(child.in_features, child.out_features, bias=False)
                lin.weight = nn.Parameter(dequantize(child.weight, child.scale, torch.float32), requires_grad=False)
                setattr(mod, name, lin)
        if isinstance(mod, MoEBlock) and isinstance(mod.experts, Int4Experts):
            q = mod.experts
            w13 = dequantize(q.w13, q.w13_scale, torch.float32)  # [E, 2F, D]
            w2 = dequantize(q.w2, q.w2_scale, torch.float32)  # [E, D, F]
            plain = Experts(w13.shape[0], w13.shape[2], w2.shape[2])
            plain.w13 = nn.Parameter(w13, requires_grad=False)
            plain.w2 = nn.Parameter(w2, requires_grad=False)
            mod.experts = plain
    return model


@pytest.fixture(scope="module", params=["moe", "dense"])
def converted(request, tmp_path_factory):
    """(source model, llama.cpp's f32 GGUF of it, tokens) via convert_hf_to_gguf.py."""
    if not CONVERT.is_file():
        pytest.skip(f"llama.cpp's convert_hf_to_gguf.py not found at {CONVERT} (set LLAMA_CPP_CONVERT)")
    root = tmp_path_factory.mktemp(f"conv-{request.param}")
    model = _model(request.param)
    save_model(model, root / "hf")
    shutil.copy(default_tokenizer_path(), root / "hf" / "tokenizer.model")
    env = dict(os.environ, PYTHONPATH=str(CONVERT.parent / "gguf-py"))
    out = root / "m-f32.gguf"
    proc = subprocess.run([sys.executable, str(CONVERT), str(root / "hf"), "--outtype", "f32", "--outfile", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.manual_seed(0)
    return model, out, torch.randint(3, 32000, (1, T))


def test_f32_equals_source_and_llama_cpp(converted):
    model, path, tokens = converted
    loaded = load_model(path)
    with torch.no_grad():
        ref, got = model(tokens)[0].numpy(), loaded(tokens)[0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got, _llama_logits(path, tokens[0].tolist()), atol=1e-3, rtol=0)


@pytest.mark.parametrize("quant", ["q4_0", "q8_0"])
def test_quantised_equal_llama_cpp_on_the_same_weights(converted, quant, tmp_path):
    model, path, tokens = converted
    if quant == "q4_0" and model.config.moe is None:
        pytest.skip("one quantised dense case is enough")
    ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0 if quant == "q4_0" else llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    qpath = _quantize(path, tmp_path / f"m-{quant}.gguf", ftype)
    loaded = load_model(qpath)
    loaded.int4_activations = "float32"  # exact activations, as llama.cpp's run on the dequantised weights
    if quant == "q4_0":  # kept 4-bit: nothing requantised
        assert isinstance(loaded.layers[0].attn.wqkv, Int4Linear)
        experts = loaded.layers[0].ffn.experts
        assert experts.w13.dtype == torch.uint8 and experts.w13_scale.dtype == torch.float16
    with torch.no_grad():
        got = loaded(tokens)[0].numpy()
    ids = tokens[0].tolist()
    same_weights = _llama_logits(write_gguf(_dequantized(loaded), tmp_path / "deq.gguf", quant="f32"), ids)
    np.testing.assert_allclose(got, same_weights, atol=1e-3, rtol=0)
    theirs = _llama_logits(qpath, ids)
    assert np.linalg.norm(got - theirs) / np.linalg.norm(theirs) < 0.05
    assert (got.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9


def test_int4_dequantisation_equals_gguf_quants(converted, tmp_path):
    _, path, _ = converted
    qpath = _quantize(path, tmp_path / "m-q4_0.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)
    reader = gguf.GGUFReader(qpath)
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_output.weight")
    theirs = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType.Q4_0)
    wo = load_model(qpath).layers[0].attn.wo
    np.testing.assert_array_equal(dequantize(wo.weight, wo.scale, torch.float32).numpy(), theirs)


def test_tokenizer_from_metadata_equals_the_source(converted):
    _, path, _ = converted
    ours, src = load_tokenizer(path), load_tokenizer()
    for text in ["Hello world!  Two  spaces\nnew line", "naïve café 日本語 🙂", " leading", "[INST] hi [/INST]"]:
        assert ours.encode(text) == src.encode(text)
        assert ours.decode(src.encode(text)) == src.decode(src.encode(text))
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (src.bos_id, src.eos_id, src.vocab_size)


def test_generate_cli_runs_a_gguf(converted, capsys):
    from mixlab.cli import main

    _, path, _ = converted
    assert main(["generate", "--model", str(path), "--prompt", "Hello", "--max-new-tokens", "3", "--dtype",
                 "float32"]) == 0
    assert "decode:" in capsys.readouterr().err


def test_mixlab_written_gguf_roundtrips_exactly(tmp_path):
    model = _model("moe")
    loaded = load_model(write_gguf(model, tmp_path / "m.gguf", quant="f32"))
    tokens = torch.randint(3, 32000, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


@pytest.mark.parametrize(("device", "match"), [("tpu", "unknown device"), ("meta", "holds no data"),
                                              *([("cuda", "CUDA is not available")] if not torch.cuda.is_available()
                                                else [])])
def test_a_bad_device_for_a_gguf_is_named_before_reading(device, match, tmp_path, monkeypatch):
    # A folder's device was checked first; a GGUF file's was read whole, then failed in torch's `.to`.
    path = write_gguf(_model("moe"), tmp_path / "m.gguf", quant="f32")

    def boom(*a, **k):
        raise AssertionError("the file was read before the device was checked")

    monkeypatch.setattr(gguf_read, "load_gguf", boom)
    with pytest.raises(ValueError, match=match):
        load_model(path, device=device)


@pytest.mark.parametrize("fmt", ["hf", "mistral"])
def test_convert_cli_from_a_gguf_writes_its_weights_and_tokenizer(fmt, tmp_path, capsys):
    """`mixlab convert X.gguf DST --to hf|mistral`: the folder holds the file's weights (the same
    logits) and its vocabulary as `tokenizer.model` (the same encodings as the file's metadata)."""
    from mixlab.cli import main

    model = _model("moe")
    src = write_gguf(model, tmp_path / "m.gguf", quant="f32")
    assert main(["convert", str(src), str(tmp_path / fmt), "--to", fmt]) == 0
    assert (tmp_path / fmt / "tokenizer.model").is_file()
    tokens = torch.randint(3, 32000, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / fmt)(tokens), model(tokens), rtol=0, atol=0)
    ours, theirs = load_tokenizer(tmp_path / fmt), load_tokenizer(src)
    for text in ["Hello world!  Two  spaces", "naïve café 日本語 🙂", "[INST] hi [/INST]"]:
        assert ours.encode(text) == theirs.encode(text)
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (theirs.bos_id, theirs.eos_id, theirs.vocab_size)


def test_float32_metadata_reads_as_written(tmp_path, capsys):
    """GGUF stores the norm epsilon as a float32: it read back as 9.999999747378752e-06, which a
    GGUF -> transformers conversion wrote into config.json for the source's 1e-05."""
    import json

    from mixlab.cli import main

    model = Transformer(_model("moe").config.replace(norm_eps=1e-5, rope_theta=1e6))
    model.init_weights(seed=0)
    src = write_gguf(model, tmp_path / "m.gguf", quant="f32")
    assert (load_model(src).config.norm_eps, load_model(src).config.rope_theta) == (1e-5, 1e6)
    assert main(["convert", str(src), str(tmp_path / "hf"), "--quiet"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rms_norm_eps"] == 1e-5


def test_convert_cli_notes_a_gguf_without_a_vocabulary_as_its_warnings_are(tmp_path, capsys, monkeypatch):
    # the note began "note: ", without the "mixlab convert: " its warnings and errors have
    import mixlab.checkpoint.gguf_read as gguf_read
    from mixlab.cli import main
    from mixlab.errors import CheckpointError

    src = write_gguf(_model("moe"), tmp_path / "m.gguf", quant="f32")

    def no_vocabulary(path: object) -> bytes:
        raise CheckpointError(f"{path}: no tokenizer in its metadata")

    monkeypatch.setattr(gguf_read, "sentencepiece_proto", no_vocabulary)
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"mixlab convert: note: no tokenizer written ({src}: no tokenizer in its metadata)" in err
    assert not (tmp_path / "hf" / "tokenizer.model").exists()


@pytest.mark.parametrize("to", ["hf", "mistral", "gguf"])
def test_convert_cli_from_a_q4_0_gguf_dequantises(to, tmp_path, capsys):
    """A Q4_0 source converts to every format (it was refused as 'prepared for inference' for
    hf/mistral and, to GGUF, written with the packed nibbles as the matrices: a file no reader
    loads): the output computes the int4 model's logits (its dequantised weights; a Q4_0 output
    holds the same blocks)."""
    from mixlab.cli import main

    src = write_gguf(_model("moe"), tmp_path / "m.gguf", quant="q4_0")
    dst = tmp_path / ("out.gguf" if to == "gguf" else to)
    assert main(["convert", str(src), str(dst), "--to", to] + (["--quant", "q4_0"] if to == "gguf" else [])) == 0
    tokens = torch.randint(3, 32000, (1, 8))
    int4, out = load_model(src), load_model(dst)
    for m in (int4, out):  # the dequantised weights times exact activations, as a float output's
        m.int4_activations = "float32"
    with torch.no_grad():
        torch.testing.assert_close(out(tokens), int4(tokens), rtol=0, atol=1e-5)


def test_convert_cli_to_gguf_keeps_the_sources_vocabulary(tmp_path, capsys):
    """GGUF -> GGUF and folder -> GGUF write the source's vocabulary (a GGUF's metadata, a folder's
    tokenizer.model), not Mixtral's: a 300-piece vocabulary was refused ('32000 pieces but the
    model's vocab_size is 300'), and a 32000-piece one other than Mixtral's would have been replaced."""
    import sentencepiece as spm

    from mixlab.cli import main

    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog, again and again\n" * 50)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "t.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   hard_vocab_limit=False, minloglevel=2)
    model = Transformer(_model("moe").config.replace(vocab_size=300))
    model.init_weights(seed=0)
    src = write_gguf(model, tmp_path / "m.gguf", quant="f32", tokenizer=tmp_path / "sp.model")
    save_model(model, tmp_path / "hf", copy_files=[tmp_path / "sp.model"])
    (tmp_path / "hf" / "sp.model").rename(tmp_path / "hf" / "tokenizer.model")
    want = load_tokenizer(src)
    for s_ in (src, tmp_path / "hf"):
        dst = tmp_path / f"out-{s_.name}.gguf"
        assert main(["convert", str(s_), str(dst), "--to", "gguf", "--quant", "f32"]) == 0
        got = load_tokenizer(dst)
        assert got.vocab_size == want.vocab_size == 300
        assert got.encode("the lazy fox, again") == want.encode("the lazy fox, again")


def test_convert_refuses_a_json_tokenizer_before_loading(tmp_path, capsys, monkeypatch):
    """`convert DIR X.gguf --tokenizer config.json` (or a tokenizer.json) loaded the whole model, then said
    "this model's tokenizer is a tokenizer.json" of the file given; it is refused first, as given."""
    import mixlab.checkpoint
    from mixlab.cli import main

    save_model(_model("dense"), tmp_path / "m")
    monkeypatch.setattr(mixlab.checkpoint, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "m.gguf"), "--tokenizer",
                 str(tmp_path / "m" / "config.json")]) == 2
    assert (f"error: --tokenizer {tmp_path / 'm' / 'config.json'}: a GGUF carries a SentencePiece vocabulary, not a "
            ".json tokenizer; pass the SentencePiece model (FILE.model)\n") in capsys.readouterr().err


def test_convert_tokenizer_takes_a_name_or_a_folder_and_checks_it_before_loading(tmp_path, capsys, monkeypatch):
    """convert --tokenizer mixtral (a name every --tokenizer takes, as data prepare's) or a folder holding a
    tokenizer.model was read as a file ('tokenizer model not found'), and a missing file was found only
    after the model had loaded."""
    import mixlab.checkpoint
    from mixlab.cli import main
    from mixlab.tokenizer import default_tokenizer_path, load_tokenizer

    save_model(_model("dense"), tmp_path / "m")
    (tmp_path / "tok").mkdir()
    shutil.copy(default_tokenizer_path(), tmp_path / "tok" / "tokenizer.model")
    for name in ("mixtral", str(tmp_path / "tok")):
        assert main(["convert", str(tmp_path / "m"), str(tmp_path / "m.gguf"), "--tokenizer", name, "--quiet",
                     "--overwrite"]) == 0
        assert load_tokenizer(tmp_path / "m.gguf").encode("Bonjour, là") == load_tokenizer().encode("Bonjour, là")
    monkeypatch.setattr(mixlab.checkpoint, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    folder = f"--tokenizer {tmp_path / 'm'}: no tokenizer.model in this folder"
    for name, message, code in (("bytes", "--tokenizer bytes: llama.cpp has no vocabulary type for mixlab's bytes", 2),
                                (str(tmp_path / "m"), folder, 1),
                                ("nope.model", "--tokenizer nope.model: no such file", 1)):
        assert main(["convert", str(tmp_path / "m"), str(tmp_path / "x.gguf"), "--tokenizer", name]) == code
        assert message in capsys.readouterr().err


def test_a_capital_extension_picks_the_same_format(tmp_path, capsys):
    """`mixlab convert SRC out.GGUF` wrote a transformers folder named out.GGUF, and load_model, info and
    load_tokenizer refused a file named X.GGUF ('whose name does not end in .gguf: rename it') and read
    tokenizer.JSON as SentencePiece: an extension picks a format whatever its case."""
    from conftest import hf_tokenizer_json
    from mixlab.cli import main
    from mixlab.tokenizer import load_tokenizer

    model = _model("dense")
    save_model(model, tmp_path / "m")
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "out.GGUF"), "--quant", "f32", "--quiet"]) == 0
    assert (tmp_path / "out.GGUF").is_file() and "(gguf, f32)" in capsys.readouterr().out
    ids = torch.tensor([[1, 415, 2936]])
    torch.testing.assert_close(load_model(tmp_path / "out.GGUF")(ids), model(ids), rtol=0, atol=0)
    assert main(["info", str(tmp_path / "out.GGUF")]) == 0 and "GGUF v3" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "out.GGUF").encode("Bonjour") == load_tokenizer().encode("Bonjour")
    with pytest.raises(ValueError, match="write_gguf"):
        save_model(model, tmp_path / "x.GGUF")
    (tmp_path / "tok").mkdir()
    hf_tokenizer_json(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").rename(tmp_path / "tok" / "tokenizer.JSON")
    assert load_tokenizer(tmp_path / "tok" / "tokenizer.JSON").encode("Bonjour") == load_tokenizer().encode("Bonjour")


def test_write_gguf_refuses_a_model_prepared_for_inference(tmp_path):
    from mixlab.model.inference import prepare_for_inference

    for model in (load_model(write_gguf(_model("moe"), tmp_path / "m.gguf", quant="q4_0")),
                  prepare_for_inference(_model("moe"), quant="int8")):
        with pytest.raises(ValueError, match="prepared for inference"):
            write_gguf(model, tmp_path / "x.gguf")
        assert not (tmp_path / "x.gguf").exists()


# ------------------------------------------------------------------------------------------------
# Malformed files: each refused with a message naming the problem.


def _s(x: str | bytes) -> bytes:
    b = x.encode() if isinstance(x, str) else x
    return struct.pack("<Q", len(b)) + b


def _build(*, version: int = 3, n_tensors: int | None = None, kvs: list[bytes] | None = None,
           tensors: list[tuple[str, list[int], int, int]] | None = None, data: bytes = b"\0" * 64,
           magic: bytes = b"GGUF") -> bytes:
    kvs = [_s("general.architecture") + struct.pack("<I", 8) + _s("llama")] if kvs is None else kvs
    tensors = [("a.weight", [4, 2], 0, 0)] if tensors is None else tensors
    out = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors, len(kvs))
    out += b"".join(kvs)
    for name, dims, ttype, offset in tensors:
        out += _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ttype, offset)
    return out + b"\0" * (-len(out) % 32) + data


MALFORMED = {
    "bad magic": (_build(magic=b"GGML"), "not a GGUF file"),
    "version 1": (_build(version=1), "unsupported GGUF version 1"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 1, 1) + b"\0" * 64, "a big-endian GGUF file"),
    "truncated header": (_build()[:20], "truncated GGUF"),
    "truncated tensor info": (_build(data=b"")[:60], "truncated GGUF"),
    "truncated data": (_build(data=b"\0" * 8), "runs past the end of the file"),
    "more tensors than present": (_build(n_tensors=3, data=b""), "truncated GGUF"),
    "absurd tensor count": (_build(n_tensors=2**62), "tensor count"),
    "absurd key/value count": (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**60) + b"\0" * 64, "key/value count"),
    "huge dimension": (_build(tensors=[("a.weight", [2**63, 2], 0, 0)]), "dimension"),
    "overflowing product": (_build(tensors=[("a.weight", [2**31, 2**31, 2**31], 0, 0)]), "more than 2**60"),
    "zero dimension": (_build(tensors=[("a.weight", [0, 2], 0, 0)]), "dimension 0"),
    "rank 5": (_build(tensors=[("a.weight", [1, 1, 1, 1, 1], 0, 0)]), "rank 5"),
    "unknown tensor type": (_build(tensors=[("a.weight", [4, 2], 999, 0)]), "unknown ggml type 999"),
    "partial block": (_build(tensors=[("a.weight", [16, 2], 2, 0)]), "whole Q4_0 blocks"),
    "unknown value type": (_build(kvs=[_s("k") + struct.pack("<I", 77)]), "unknown value type 77"),
    "string past the end": (_build(kvs=[_s("k") + struct.pack("<IQ", 8, 2**40)]), "runs past the end"),
    "key past the end": (b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**50) + b"k" * 64, "runs past the end"),
    "array past the end": (_build(kvs=[_s("k") + struct.pack("<IIQ", 9, 6, 2**40)]), "runs past the end"),
    "nested array": (_build(kvs=[_s("k") + struct.pack("<IIQ", 9, 9, 1)]), "nested arrays"),
    "duplicate key": (_build(kvs=[_s("k") + struct.pack("<IB", 0, 1)] * 2), "duplicate metadata key"),
    "duplicate tensor": (_build(tensors=[("a.weight", [4], 0, 0), ("a.weight", [4], 0, 32)]), "duplicate tensor"),
    "misaligned offset": (_build(tensors=[("a.weight", [4], 0, 4)]), "not a multiple of the alignment"),
    "overlapping tensors": (_build(tensors=[("a.weight", [16], 0, 0), ("b.weight", [4], 0, 32)], data=b"\0" * 128),
                            "overlap"),
    "bad alignment": (_build(kvs=[_s("general.alignment") + struct.pack("<II", 4, 3)]), "power of two"),
    "invalid utf-8": (_build(kvs=[_s(b"\xff\xfe") + struct.pack("<IB", 0, 1)]), "UTF-8"),
    "long name": (_build(tensors=[("x" * 70, [4], 0, 0)]), "longer than 63 bytes"),
}


@pytest.mark.parametrize("first_read", [None, 40])  # the header parsed from the first 40 bytes, then 320, ...
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_gguf_is_refused_clearly(case, first_read, tmp_path, monkeypatch):
    if first_read:
        monkeypatch.setattr(gguf_read, "FIRST_READ", first_read)
    raw, message = MALFORMED[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match="bad.gguf: .*" + message.replace("*", r"\*")):
        read_header(path)
    with pytest.raises(CheckpointError, match=message.replace("*", r"\*")):
        load_model(path)


def test_a_header_longer_than_the_first_read_is_read_in_steps(tmp_path, monkeypatch, capsys):
    """The header is read 16 MiB at first (a Mixtral file is tens of GB), more while it runs on:
    the same header from a first read of 100 bytes, and `mixlab info` reads a GGUF's config."""
    from mixlab.cli import main

    path = write_gguf(_model("moe"), tmp_path / "m.gguf", quant="f32")
    want = read_header(path)
    reads: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def seek(self, n):
            return self.f.seek(n)

        def read(self, n):
            reads.append(n)
            return self.f.read(n)

    monkeypatch.setattr(gguf_read, "FIRST_READ", 100)
    monkeypatch.setattr(gguf_read, "open", lambda p, mode: Counting(real_open(p, mode)), raising=False)
    got = read_header(path)
    assert reads[0] == 100 and reads == sorted(reads) and reads[-1] < path.stat().st_size
    assert got.tensors == want.tensors and got.data_start == want.data_start
    assert got.metadata.keys() == want.metadata.keys() and got.metadata["general.architecture"] == "llama"
    monkeypatch.undo()
    assert main(["info", str(path)]) == 0
    assert "MoE, 4 experts, top-2" in capsys.readouterr().out


def test_valid_header_but_wrong_model_is_refused(tmp_path):
    model = _model("moe")
    path = write_gguf(model, tmp_path / "m.gguf", quant="f32")
    raw = bytearray(path.read_bytes())
    h = read_header(path)
    assert len(h.tensors) == 1 + model.config.n_layers * 10 + 2
    # A real file cut anywhere inside its data is refused before anything is read.
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(bytes(raw[: h.data_start + 1000]))
    with pytest.raises(CheckpointError, match="runs past the end of the file"):
        load_model(cut)
    # An architecture mixlab does not implement.
    other = tmp_path / "other.gguf"
    n5 = struct.pack("<Q", 5)
    other.write_bytes(bytes(raw).replace(n5 + b"llama", n5 + b"gemma", 1))
    with pytest.raises(CheckpointError, match="architecture 'gemma' is not supported"):
        load_model(other)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("llama.attention.layer_norm_rms_epsilon", "x", r"metadata 'llama.attention.layer_norm_rms_epsilon' = 'x' has "
                                                    r"the wrong type \(expected a number\)"),
    ("llama.attention.head_count", 0, r"metadata 'llama.attention.head_count' = 0: expected at least 1"),
    ("llama.attention.head_count", 3, r"metadata 'llama.embedding_length' = 64 is not a multiple of "
                                      r"'llama.attention.head_count' = 3, and no 'llama.attention.key_length' gives"),
    # These named mixlab's field ('moe.top_k') or no key at all, not the file's key.
    ("llama.expert_used_count", 5, r"config field 'moe.top_k' \('llama.expert_used_count' in this file\) must be in "
                                   r"\[1, num_experts=4\], got 5"),
    ("llama.context_length", 0, r"config field 'max_seq_len' \('llama.context_length' in this file\) must be in"),
    ("llama.attention.key_length", 8, r"metadata 'llama.rope.dimension_count' = 16: rotary embedding on 16 of 8 head "
                                      r"dimensions \('llama.attention.key_length', else"),
])
def test_bad_metadata_is_named_by_its_key(key, value, message, tmp_path):
    """A metadata value of the wrong type said "(expected (<class 'float'>, <class 'int'>))"; a head
    count of 0 or 3 (for a width of 64) said 'rotary embedding on 16 of 0 (21) head dimensions is not
    supported', naming neither key."""
    _load_with_key(tmp_path, key, value, message)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("llama.block_count", 1_000_000, r"missing tensor 'blk.2.attn_norm.weight' \(metadata 'llama.block_count' = "
                                     r"1000000, but the file holds 2 blocks\)$"),
    ("llama.expert_count", None, r"missing tensor 'blk.0.ffn_gate.weight' \(it holds stacked experts, "
                                 r"'blk.0.ffn_gate_exps.weight', but no 'llama.expert_count'\)$"),
])
def test_a_missing_tensor_names_the_metadata_that_expected_it(key, value, message, tmp_path):
    """A block count beyond the blocks stored, or stacked experts without an expert count (read as a
    dense model), said only "missing tensor 'blk.2.attn_norm.weight'", not which field was wrong."""
    _load_with_key(tmp_path, key, value, message)


def test_a_type_nothing_dequantises_is_refused_before_reading(tmp_path, monkeypatch):
    """I32 (or F64, Q8_1: types the gguf package has no dequantisation for) is named with its tensor
    before any tensor is read; it was gguf's NotImplementedError from the middle of the load."""
    path = write_gguf(_model("dense"), tmp_path / "m.gguf", quant="f32")
    raw = bytearray(path.read_bytes())
    name = b"blk.0.attn_norm.weight"
    at = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4 + 8  # past the rank and the one dim
    assert struct.unpack_from("<I", raw, at)[0] == 0  # F32 -> I32: same size, a valid header
    struct.pack_into("<I", raw, at, int(gguf.GGMLQuantizationType.I32))
    bad = tmp_path / "i32.gguf"
    bad.write_bytes(bytes(raw))
    assert read_header(bad).tensors[name.decode()].type_name == "I32"
    monkeypatch.setattr(gguf_read._Reader, "raw", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(CheckpointError, match=r"i32.gguf: tensor 'blk.0.attn_norm.weight' is I32, a type mixlab "
                                              r"cannot read as weights \(it reads BF16, F16, F32, .*Q4_K, .*Q8_0"):
        load_model(bad)  # it said "the quantised types the gguf package dequantises: pip install 'mixlab[gguf]'"


def test_a_quantised_type_without_the_gguf_package_says_to_install_it(tmp_path, monkeypatch):
    """Without the gguf extra, a type other than mixlab's own (IQ4_NL, say: Q6_K, which llama.cpp's
    Q4_0 files keep output.weight at, is one of them now) was 'unknown ggml type 20 (at byte ...)':
    it now says to install it."""
    path = write_gguf(_model("dense"), tmp_path / "m.gguf", quant="f32")
    raw = bytearray(path.read_bytes())
    name = b"output.weight"
    at = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4 + 16  # past the rank and two dims
    struct.pack_into("<I", raw, at, int(gguf.GGMLQuantizationType.IQ4_NL))  # a valid header, its data cut short
    path.write_bytes(bytes(raw))
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(CheckpointError, match=r"m.gguf: tensor 'output.weight' has ggml type 20, which mixlab reads "
                                              r"through the gguf package: pip install 'mixlab\[gguf\]' "
                                              r"\(without it: F32, F16, Q4_0, Q8_0, BF16, Q4_1, .*, Q6_K\)"):
        load_model(path)


def test_rotary_frequency_factors_are_refused(tmp_path):
    """llama.cpp's converter writes Llama 3.1's 'llama3' rope scaling as a `rope_freqs.weight` tensor
    (no metadata key), which llama.cpp applies: it was ignored, and the logits differed from llama.cpp's."""
    model = _model("dense")
    cfg = model.config
    w = gguf_writer(cfg, name="x", file_type=0)
    items = [(n, t.detach().float().numpy(), tuple(t.shape)) for n, t, _ in gguf_tensors(model, cfg)]
    items.append(("rope_freqs.weight", np.array([1.0] * 4 + [8.0] * 4, np.float32), (cfg.head_dim // 2,)))
    for n, data, shape in items:
        w.add_tensor_info(n, shape, np.dtype(np.float32), data.nbytes, raw_dtype=gguf.GGMLQuantizationType.F32)
    path = tmp_path / "freqs.gguf"
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, data, _ in items:
        w.write_tensor_data(data)
    w.close()
    with pytest.raises(CheckpointError, match="freqs.gguf: rope_freqs.weight holds per-frequency rotary factors"):
        load_model(path)


def test_info_shows_what_a_gguf_stores_and_checks_its_tensors(tmp_path, capsys):
    """`mixlab info x.gguf` checks the tensors as `mixlab info DIR` and load_model do (it read the
    config alone: rc 0 for a file no loader takes) and says what is stored, per ggml type."""
    from mixlab.cli import main

    path = write_gguf(_model("moe"), tmp_path / "m.gguf", quant="q4_0")
    assert main(["info", str(path)]) == 0
    assert "stored:            GGUF v3, 23 tensors: Q4_0 " in capsys.readouterr().out
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes().replace(b"blk.1.ffn_up_exps", b"blk.1.ffn_xx_exps", 1))
    assert main(["info", str(bad)]) == 1
    assert "bad.gguf: missing tensor 'blk.1.ffn_up_exps.weight'" in capsys.readouterr().err


def test_a_file_that_is_no_folder_is_named_as_such(tmp_path):
    """A GGUF file named otherwise (no suffix; model.GGUF is one) or a weights file given for its folder:
    the error said 'no config.json (transformers) or params.json (Mistral) found' in a file."""
    path = write_gguf(_model("moe"), tmp_path / "m.gguf", quant="q4_0")
    shutil.copy(path, tmp_path / "ggml-model-q4_0")
    with pytest.raises(CheckpointError, match="ggml-model-q4_0: a GGUF file whose name does not end in .gguf: rename"):
        load_model(tmp_path / "ggml-model-q4_0")
    save_model(_model("moe"), tmp_path / "hf")
    with pytest.raises(CheckpointError, match="model.safetensors: a file, not a checkpoint folder: pass the folder"):
        load_model(tmp_path / "hf" / "model.safetensors")


def test_a_folder_of_gguf_files_names_them(tmp_path, capsys):
    """A folder of GGUF files (a hub snapshot of one model's quantisations) given as the model said
    only 'no config.json (transformers) or params.json (Mistral) found', as if it held nothing to load;
    its GGUF files are named, a split file by its first part, the part that loads it."""
    from mixlab.cli import main

    path = write_gguf(_model("moe"), tmp_path / "snap" / "m-Q4_0.gguf", quant="q4_0")
    with pytest.raises(CheckpointError, match=r"snap: no config.json .* found \(it holds a GGUF file, m-Q4_0.gguf: "
                                              rf"pass it as the model, e.g. {re.escape(str(path))}\)"):
        load_model(tmp_path / "snap")
    for i in (1, 2):
        (tmp_path / "snap" / f"m-Q8_0-0000{i}-of-00002.GGUF").write_bytes(b"")
    assert main(["info", str(tmp_path / "snap")]) == 1
    err = capsys.readouterr().err
    assert "(it holds 2 GGUF files, m-Q4_0.gguf, m-Q8_0-00001-of-00002.GGUF: pass one as the model, e.g. " in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("quant", ["f32", "q4_0"])
def test_nan_weights_warn_as_for_safetensors(quant, tmp_path):
    """A NaN in a float tensor or an int4 scale: warned, naming the tensor (safetensors loads did;
    a GGUF gave NaN outputs without a word)."""
    import warnings

    path = write_gguf(_model("moe"), tmp_path / "m.gguf", quant=quant)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(path)
    raw = bytearray(path.read_bytes())
    t = read_header(path).tensors["blk.1.attn_output.weight"]
    if quant == "f32":
        struct.pack_into("<f", raw, t.start + 4 * 7, float("nan"))
    else:
        struct.pack_into("<H", raw, t.start + 18 * 3, 0x7E00)  # block 3's float16 scale
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=r"m.gguf: tensor 'blk.1.attn_output.weight' holds NaN or Inf values"):
        load_model(path)


# ------------------------------------------------------------------------------------------------
# Tensor data converted a few rows at a time into its destination: a whole tensor's values, a chunk's
# temporaries.

TYPES = {"Q4_0": 2, "Q8_0": 8, "Q4_K": 12, "F16": 1, "BF16": 30}  # ggml type ids


def _tensor_bytes(qtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> bytes:
    """A tensor of this shape in this ggml type: random weights quantised by gguf-py (Q4_K, which it
    does not quantise: random blocks with finite float16 scales)."""
    if qtype == "Q4_K":
        blocks = rng.integers(0, 256, (int(np.prod(shape)) // 256, 144), dtype=np.uint8)
        blocks[:, :4] = (rng.random((len(blocks), 2), dtype=np.float32) / 16).astype(np.float16).view(np.uint8)
        return blocks.tobytes()
    x = rng.standard_normal(shape, dtype=np.float32)
    return gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype]).tobytes()


def _tensors_file(path: Path, tensors: dict[str, tuple[tuple[int, ...], str, bytes]]) -> Path:
    """A GGUF file of these tensors alone: name -> (torch shape, ggml type name, bytes)."""
    infos, data = [], b""
    for name, (shape, qtype, raw) in tensors.items():
        infos.append((name, list(reversed(shape)), TYPES[qtype], len(data)))
        data += raw + b"\0" * (-len(raw) % 32)
    path.write_bytes(_build(kvs=[], tensors=infos, data=data))
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qtype", sorted(TYPES))
def test_tensors_read_a_few_rows_at_a_time_equal_gguf_quants(qtype, dtype, tmp_path, monkeypatch):
    """Each type converted 3 rows at a time (the last chunk 1 row) equals gguf-py's dequantisation of
    the whole tensor, rounded to `dtype`, bit for bit; Q4_0 also the whole-tensor path's (`dequantize`
    of its int4 codes and scales, as `_Reader.floats` read it before it worked in chunks)."""
    X, D = 10, 512
    raw = _tensor_bytes(qtype, (X, D), np.random.default_rng(0))
    h = read_header(_tensors_file(tmp_path / "t.gguf", {"w": ((X, D), qtype, raw)}))
    monkeypatch.setattr(gguf_read, "CHUNK", 3 * 4 * D, raising=False)  # 3 rows of float32
    reader = gguf_read._Reader(h)
    try:
        got = reader.floats(h.tensors["w"], dtype)
        whole = dequantize(*reader.q4(h.tensors["w"]), dtype) if qtype == "Q4_0" else got
    finally:
        reader.close()
    theirs = gguf.quants.dequantize(np.frombuffer(raw, np.uint8).reshape(X, -1), gguf.GGMLQuantizationType[qtype])
    assert got.dtype == dtype and got.shape == (X, D)
    torch.testing.assert_close(got, torch.from_numpy(theirs.astype(np.float32)).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(got, whole, rtol=0, atol=0)


def test_a_dequantised_load_equals_the_int4_load_dequantised(tmp_path, monkeypatch):
    """`keep_int4=False` reads each Q4_0 part straight into its place in the joined weight, a few rows
    at a time (each expert's gate rows, then its up rows; the q / k rows put back in rotary order):
    the weights equal the int4 load's, dequantised, bit for bit."""
    path = write_gguf(_model("moe"), tmp_path / "m.gguf", quant="q4_0")
    monkeypatch.setattr(gguf_read, "CHUNK", 1000, raising=False)  # 1-3 rows a chunk
    plain = gguf_read.load_gguf(path, keep_int4=False).state_dict()
    ref = _dequantized(load_model(path)).state_dict()
    assert plain.keys() == ref.keys()
    for name, t in ref.items():
        assert torch.equal(plain[name], t), name


_PEAK = """
import json, sys
from pathlib import Path
import torch
from mixlab.checkpoint import gguf_read

def rss(key):
    return next(int(ln.split()[1]) for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key))

h = gguf_read.read_header(sys.argv[1])
reader = gguf_read._Reader(h)
reader.floats(h.tensors["s"], torch.float32)  # the imports of a first read: not measured
out = {}
for what, read in (("matrix", lambda: reader.floats(h.tensors["w"], torch.float32)),
                   ("experts", lambda: gguf_read._float_weight(reader, None, [h.tensors["g"], h.tensors["u"]],
                                                               "experts", torch.float32))):
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) := the current resident memory
    before = rss("VmRSS:")
    x = read()
    out[what] = [(rss("VmHWM:") - before) * 1024, x.numel() * 4]
    del x
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="resets and reads the peak memory in /proc")
def test_dequantising_takes_a_chunk_of_temporaries_not_a_tensors(tmp_path):
    """A Q4_0 matrix read as floats (a Q4_0 file's embedding; every Q4_0 matrix with keep_int4=False)
    and a layer's gate + up experts joined: the peak memory grows by the floats and a chunk's
    temporaries (measured in a fresh process: +152 MiB for a 128 MiB matrix, +130 MiB for 128 MiB of
    experts). Dequantising whole tensors, then joining gate and up, took +337 MiB and +272-304 MiB."""
    rng = np.random.default_rng(0)
    X, D, E, F = 8192, 4096, 4, 1024  # each read 128 MiB of float32
    path = _tensors_file(tmp_path / "t.gguf", {"s": ((1, D), "Q4_0", _tensor_bytes("Q4_0", (1, D), rng)),
                                               "w": ((X, D), "Q4_0", _tensor_bytes("Q4_0", (X, D), rng)),
                                               "g": ((E, F, D), "Q4_0", _tensor_bytes("Q4_0", (E, F, D), rng)),
                                               "u": ((E, F, D), "Q4_0", _tensor_bytes("Q4_0", (E, F, D), rng))})
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run([sys.executable, "-c", _PEAK, str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for what, (grown, floats) in json.loads(run.stdout).items():
        assert grown < floats + (48 << 20), (what, grown >> 20, floats >> 20)


def _split(model: Transformer, folder: Path) -> list[Path]:
    """`model` as an f32 GGUF split in 3 parts, m-0000K-of-00003.gguf in `folder`."""
    w = gguf_writer(model.config, name="x", file_type=0)
    w.split_max_tensors = 8  # gguf-py's own splitting, what llama.cpp's converter runs
    for n, t, _ in gguf_tensors(model, model.config):
        w.add_tensor(n, t.detach().float().contiguous().numpy())
    w.write_header_to_file(folder / "m.gguf")
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return [folder / f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]


def test_a_split_gguf_loads_from_its_first_part(tmp_path, capsys):
    """A GGUF split in parts (llama.cpp's gguf-split, `convert_hf_to_gguf.py --split-max-size`: the
    large Mixtral files) loads from its first part, as llama.cpp loads it: it was refused as 'missing
    tensor' (the first part's tensors alone). Offloaded experts read from their own parts; another
    part, or a part missing, is named."""
    from mixlab.cli import main

    model = _model("moe")
    first, second, third = _split(model, tmp_path)
    tokens = torch.randint(3, 32000, (1, 8))
    with torch.no_grad():
        want = model(tokens)
        torch.testing.assert_close(load_model(first)(tokens), want, rtol=0, atol=0)
        torch.testing.assert_close(load_model(first, max_memory="1GB")(tokens), want, rtol=0, atol=0)
    np.testing.assert_allclose(_llama_logits(first, tokens[0].tolist()), want[0].numpy(), atol=1e-3, rtol=0)
    assert main(["info", str(first)]) == 0
    assert "GGUF v3 in 3 parts, 23 tensors" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match=r"m-00002-of-00003.gguf: part 2 of a GGUF split in 3: pass its first"):
        load_model(second)
    first.rename(tmp_path / "renamed.gguf")
    with pytest.raises(CheckpointError, match=r"renamed.gguf: the first part of a GGUF split in 3, not named PREFIX-"):
        load_model(tmp_path / "renamed.gguf")
    (tmp_path / "renamed.gguf").rename(first)
    third.unlink()
    with pytest.raises(CheckpointError, match=r"part 3 of this GGUF split in 3, m-00003-of-00003.gguf, is missing"):
        load_model(first)


def test_convert_never_writes_over_a_part_of_its_split_gguf(tmp_path, capsys):
    """convert FIRST_PART OTHER_PART.gguf replaced the source's part 2 (a GGUF, so replaceable) with
    the converted model, breaking the split file it had just read; every part is refused, naming it
    and the source, before anything is written, and so is a folder holding them (--to hf)."""
    from mixlab.cli import main

    parts = _split(_model("moe"), tmp_path)
    before = {p: p.read_bytes() for p in parts}
    for i, dst in enumerate(parts, 1):
        assert main(["convert", str(parts[0]), str(dst), "--quant", "q8_0", "--overwrite", "--quiet"]) == 1
        err = capsys.readouterr().err
        name = f"part {i} of 3 of the source {parts[0]}" if i > 1 else f"the source {parts[0]}"
        assert f"{dst}: refusing to write there: it is {name}" in err
    assert main(["convert", str(parts[0]), str(tmp_path), "--to", "hf", "--overwrite", "--quiet"]) == 1
    assert f"{tmp_path}: refusing to write there: it contains the source" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in parts} == before and sorted(tmp_path.iterdir()) == parts
    # eval --json onto a part (it starts with no JSON, but a report path is any file name) wrote the
    # report over it after the evaluation
    data = tmp_path.parent / f"{tmp_path.name}-data.txt"
    data.write_text("a b c d e f g h")
    assert main(["eval", "--model", str(parts[0]), "--data", str(data), "--json", str(parts[1]), "--quiet"]) == 1
    assert f"{parts[1]}: refusing to write there: it is part 2 of 3 of the source" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in parts} == before


def test_experts_stored_one_tensor_each_are_named(tmp_path):
    """Mixtral GGUF files from before llama.cpp stacked the experts (blk.N.ffn_gate.E.weight): named
    as such, not as a missing 'blk.0.ffn_gate_exps.weight'."""
    model = _model("moe")
    cfg = model.config
    w = gguf_writer(cfg, name="x", file_type=0)
    items = []
    for n, t, _ in gguf_tensors(model, cfg):
        parts = [(n.replace("_exps.", f".{e}."), t[e]) for e in range(t.shape[0])] if "_exps." in n else [(n, t)]
        items += [(name, x.detach().float().contiguous().numpy()) for name, x in parts]
    for n, data in items:
        w.add_tensor_info(n, data.shape, np.dtype(np.float32), data.nbytes, raw_dtype=gguf.GGMLQuantizationType.F32)
    path = tmp_path / "split.gguf"
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, data in items:
        w.write_tensor_data(data)
    w.close()
    with pytest.raises(CheckpointError, match=r"split.gguf: the experts are stored one tensor each \(blk.0.ffn_gate.0"):
        load_model(path)


def _load_with_key(tmp_path, key, value, message):
    """The tiny MoE written as GGUF with metadata `key` set to `value` (None: left out), then loaded: refused
    with `message` after the file's name."""
    model = _model("moe")
    w = gguf_writer(model.config, name="x", file_type=0)
    for kv in w.kv_data:
        kv.pop(key, None)
    if value is not None:
        kind = gguf.GGUFValueType.STRING if isinstance(value, str) else gguf.GGUFValueType.UINT32
        w.add_key_value(key, value, kind)
    for n, t, _ in gguf_tensors(model, model.config):
        w.add_tensor(n, t.detach().float().contiguous().numpy())
    path = tmp_path / "m.gguf"
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="m.gguf: " + message):
        load_model(path)


def _gguf_with(model: Transformer, path: Path, keys: dict[str, int | str]) -> Path:
    """`model` as an f32 GGUF file at `path` with the metadata `keys` added (uint32 or string)."""
    w = gguf_writer(model.config, name="x", file_type=0)
    for k, v in keys.items():
        (w.add_string if isinstance(v, str) else w.add_uint32)(k, v)
    for n, t, _ in gguf_tensors(model, model.config):
        w.add_tensor(n, t.detach().float().contiguous().numpy())
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

def _eog_ids(path: Path) -> set[int]:
    """The ids llama.cpp ends generation at in the GGUF file `path` (`llama_vocab_is_eog`)."""
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    vocab = llm._model.vocab
    ids = {i for i in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    llm.close()
    return ids


def test_eot_and_eom_ids_end_generation_as_in_llama_cpp(tmp_path):
    """llama.cpp ends generation at a file's tokenizer.ggml.eot_token_id and eom_token_id as at EOS (Llama 3's
    <|eot_id|>, <|eom_id|>); mixlab read eos_token_id alone, so its reply ran on past them."""
    from mixlab import generate

    model = _model("dense")
    prompt = [1, 851, 3999, 12000, 77]
    free = generate(model, [prompt], max_new_tokens=3, stop_at_eos=False)[0]
    eot, eom = free[2], next(i for i in range(1000, 2000) if i not in free)  # eot comes third, eom never
    assert eot not in free[:2] and 2 not in free, free
    path = _gguf_with(model, tmp_path / "m.gguf", {"tokenizer.ggml.eot_token_id": eot,
                                                   "tokenizer.ggml.eom_token_id": eom})
    loaded = load_model(path)
    assert set(loaded.config.eos_ids) == _eog_ids(path) == {2, eot, eom}
    ours = generate(loaded, [prompt], max_new_tokens=8)[0]
    assert ours == free  # stopped at eot, which it keeps as it keeps EOS
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, verbose=False)
    out = llm.create_completion(prompt, max_tokens=8, temperature=0.0)
    text = llm.detokenize(free[:2], prev_tokens=prompt).decode()  # as it decoded its own tokens
    llm.close()
    assert (out["choices"][0]["finish_reason"], out["usage"]["completion_tokens"]) == ("stop", 2)
    assert out["choices"][0]["text"] == text



def _rename_pieces(monkeypatch, names: dict[int, str]) -> None:
    """GGUF files written from here on give the pieces of the ids of `names` those texts."""
    import mixlab.checkpoint.gguf as gguf_export

    vocab = gguf_export._vocab

    def renamed(config, tokenizer):
        pieces, scores, types, special = vocab(config, tokenizer)
        return [names[i].encode() if i in names else p for i, p in enumerate(pieces)], scores, types, special

    monkeypatch.setattr(gguf_export, "_vocab", renamed)

def test_chat_turn_ends_known_by_their_text_end_generation_as_in_llama_cpp(tmp_path, monkeypatch):
    """llama.cpp ends generation at <|im_end|> (a ChatML Mixtral fine-tune's, whose file's EOS is </s>) and the other
    chat-turn ends of `EOG_TEXTS` by their text alone, no key naming them; mixlab ran on past them."""
    from mixlab import generate

    model = _model("dense")
    prompt = [1, 851, 3999, 12000, 77]
    free = generate(model, [prompt], max_new_tokens=3, stop_at_eos=False)[0]
    assert free[2] not in free[:2] and 2 not in free, free
    others = sorted(gguf_read.EOG_TEXTS - {"<|im_end|>"})
    unreached = [i for i in range(1000, 2000) if i not in free][:len(others)]
    names = {free[2]: "<|im_end|>", **dict(zip(unreached, others, strict=True))}  # id -> its piece's new text
    _rename_pieces(monkeypatch, names)
    path = _gguf_with(model, tmp_path / "m.gguf", {})
    loaded = load_model(path)
    assert set(loaded.config.eos_ids) == _eog_ids(path) == {2, *names}
    assert generate(loaded, [prompt], max_new_tokens=8)[0] == free
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, verbose=False)
    out = llm.create_completion(prompt, max_tokens=8, temperature=0.0)
    llm.close()
    assert (out["choices"][0]["finish_reason"], out["usage"]["completion_tokens"]) == ("stop", 2)

def test_write_gguf_writes_every_eos_id_that_llama_cpp_has_a_key_for(tmp_path, monkeypatch):
    """A model that ends generation at several ids (an eos_token_id list, generation_config.json's) was written
    with EOS alone, so llama.cpp ran on past the others: the second and third are its eot and eom ids."""
    model = Transformer(_model("dense").config.replace(extra_eos_ids=(900, 901)))
    model.init_weights(seed=0)
    path = write_gguf(model, tmp_path / "m.gguf", quant="f32")
    assert _eog_ids(path) == {2, 900, 901}
    assert load_model(path).config.eos_ids == (2, 900, 901)
    more = Transformer(model.config.replace(extra_eos_ids=(900, 901, 902)))
    with pytest.warns(UserWarning, match=r"llama.cpp will not stop at \[902\]"):
        write_gguf(more, tmp_path / "more.gguf", quant="f32")
    _rename_pieces(monkeypatch, {900: "<|im_end|>"})  # known by its text: no key needed, so none is short
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = write_gguf(more, tmp_path / "named.gguf", quant="f32")
    assert _eog_ids(path) == {2, 900, 901, 902}


def test_a_bad_eot_token_id_is_named(tmp_path):
    path = _gguf_with(_model("dense"), tmp_path / "m.gguf", {"tokenizer.ggml.eot_token_id": "x"})
    with pytest.raises(CheckpointError, match=r"'tokenizer.ggml.eot_token_id' = 'x' has the wrong type"):
        load_model(path)


def test_an_eot_token_id_outside_the_vocabulary_is_ignored_with_a_warning_as_llama_cpp_does(tmp_path):
    """llama.cpp loads such a file ("bad special token", the id left unset); mixlab refused it."""
    path = _gguf_with(_model("dense"), tmp_path / "m.gguf", {"tokenizer.ggml.eot_token_id": 32000})
    with pytest.warns(UserWarning, match=r"'tokenizer.ggml.eot_token_id' = 32000 is not a token id in \[0, 32000\)"):
        config = load_model(path).config
    assert config.eos_ids == (config.eos_id,)
