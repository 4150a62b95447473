"""`load_model(path, quant="int4" / "int8")`: each matrix quantised as soon as it is read equals loading
floats and then `prepare_for_inference(quant=)`, bit for bit, from every source (transformers and
Mistral folders, GGUF files: f32, bf16, Q8_0, llama.cpp's K-quants and Q4_0, which int8 refuses); its
refusals; `generate --quant int4 / int8` loading this way; and the peak memory it saves, measured in
subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import hf_mistral, hf_mixtral, kquant_source, llama_quantize
from mixlab import generate, load_model, load_tokenizer, save_model
from mixlab.checkpoint.gguf_read import _int4_names, _plan, config_from_header, read_header
from mixlab.cli import main
from mixlab.config import MoEConfig, get_preset
from mixlab.model import Transformer
from mixlab.model.formats import Int4Experts, Int8Experts
from mixlab.model.inference import prepare_for_inference, quantize_model_int4, quantize_model_int8
from mixlab.ops.quant import Int4Linear, Int8Linear

ROOT = Path(__file__).resolve().parents[1]


def _two_step(path: Path, group: int = 32, **kw: object) -> Transformer:
    """What `quant="int4"` must equal: the floats loaded, then quantised (prepare_for_inference's
    conversion, before it attaches the native decoder)."""
    return quantize_model_int4(load_model(path, **kw), group=group).requires_grad_(False)


def _two_step8(path: Path, **kw: object) -> Transformer:
    """What `quant="int8"` must equal (prepare_for_inference's conversion, before native attach)."""
    return quantize_model_int8(load_model(path, **kw)).requires_grad_(False)


def _assert_same(got: Transformer, want: Transformer) -> None:
    """The same modules, and every tensor of the state dict equal in dtype and bits."""
    assert [(n, type(m)) for n, m in got.named_modules()] == [(n, type(m)) for n, m in want.named_modules()]
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert not any(p.requires_grad for p in got.parameters())
    assert not got.training


def _tiny(preset: str = "tiny-moe", **kw: object) -> Transformer:
    model = Transformer(get_preset(preset).replace(**kw))
    model.init_weights(std=0.3, seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> a checkpoint folder: transformers Mixtral and Mistral (float32, sharded), a tied Mixtral,
    a Mistral-format folder, transformers >= 5's fused experts in bfloat16."""
    root = tmp_path_factory.mktemp("folders")
    out = {"mixtral": hf_mixtral(root / "mixtral"), "mistral": hf_mistral(root / "mistral"),
           "tied": hf_mixtral(root / "tied", tie_word_embeddings=True)}
    model = _tiny()
    save_model(model, root / "consolidated", fmt="mistral")
    save_model(model, root / "fused", fmt="hf-fused", dtype="bfloat16", max_shard_bytes=40_000)  # several shards
    out.update(consolidated=root / "consolidated", fused=root / "fused")
    assert len(list((root / "fused").glob("*.safetensors"))) > 1
    return out


@pytest.mark.parametrize(("name", "dtype", "group"), [
    ("mixtral", None, 32), ("mixtral", "bfloat16", 32), ("mistral", None, 32), ("tied", "bfloat16", 32),
    ("consolidated", None, 64), ("fused", None, 32), ("fused", "float32", 64)])
def test_a_folder_loads_int4_equal_to_loading_floats_then_quantising(folders, name, dtype, group):
    got = load_model(folders[name], dtype=dtype, quant="int4", group=group)
    want = _two_step(folders[name], group, dtype=dtype)
    _assert_same(got, want)
    assert isinstance(got.output, Int4Linear) and isinstance(got.layers[0].attn.wqkv, Int4Linear)
    assert got.tok_embeddings.weight.dtype == (torch.bfloat16 if name == "fused" and dtype is None
                                               else torch.float32 if dtype is None else getattr(torch, dtype))


def test_generate_gives_the_same_tokens_and_prepare_attaches_the_native_decoder(folders):
    got = prepare_for_inference(load_model(folders["mixtral"], quant="int4"), quant="int4")
    want = prepare_for_inference(load_model(folders["mixtral"]), quant="int4")
    assert (got.native_decoder is None) == (want.native_decoder is None)
    prompts = [[1, 5, 9, 33], [1, 70, 2]]
    assert generate(got, prompts, max_new_tokens=10) == generate(want, prompts, max_new_tokens=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mixes int4 and float matrices" warning: every matrix is int4
        prepare_for_inference(load_model(folders["mixtral"], quant="int4"))


@pytest.mark.parametrize("source", ["folder", "gguf"])
def test_offloaded_experts_are_cached_int4_and_the_resident_matrices_loaded_int4(folders, source, tmp_path):
    """max_memory with quant: the expert cache is int4 from the start (as prepare_for_inference makes
    it), the linears int4 as read; the tokens are the two-step path's."""
    from mixlab.checkpoint.gguf import write_gguf
    from mixlab.model.formats import expert_cache

    pytest.importorskip("gguf") if source == "gguf" else None
    path = folders["mixtral"] if source == "folder" else write_gguf(_tiny(vocab_size=32000), tmp_path / "m.gguf",
                                                                     quant="f32")
    got = load_model(path, quant="int4", max_memory="1MB")
    cache = expert_cache(got)
    assert cache is not None and (cache.fmt.kind, cache.fmt.group) == ("int4", 32)
    assert isinstance(got.layers[0].attn.wqkv, Int4Linear) and got.int4_activations == "float32"
    want = prepare_for_inference(load_model(path, max_memory="1MB"), quant="int4")
    assert expert_cache(want).fmt == cache.fmt
    for (n, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    got = prepare_for_inference(got, quant="int4")
    prompts = [[1, 5, 9, 33]]
    assert generate(got, prompts, max_new_tokens=8) == generate(want, prompts, max_new_tokens=8)


# ------------------------------------------------------------------------------------------------
# GGUF files: f32, and llama.cpp's own quantiser's Q4_K_M (K-quants dequantised, then rounded to int4)
# and Q4_0 (kept as stored; its Q6_K output rounded to int4)


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    f32 = kquant_source(tmp_path_factory.mktemp("qload"))
    return {"F32": f32, "Q4_K_M": llama_quantize(f32, "Q4_K_M"), "Q4_0": llama_quantize(f32, "Q4_0"),
            "Q8_0": llama_quantize(f32, "Q8_0"), "BF16": llama_quantize(f32, "BF16")}


@pytest.mark.parametrize(("ftype", "dtype", "group"), [
    ("F32", None, 64), ("Q4_K_M", None, 32), ("Q4_K_M", "bfloat16", 128), ("Q4_0", None, 32)])
def test_a_gguf_loads_int4_equal_to_loading_floats_then_quantising(gguf_files, ftype, dtype, group):
    path = gguf_files[ftype]
    h = read_header(path)
    types = {t.type_name for t in h.tensors.values()}
    assert {"Q4_K_M": {"Q4_K", "Q6_K"}, "Q4_0": {"Q4_0", "Q6_K"}, "F32": set()}[ftype] <= types
    got = load_model(path, dtype=dtype, quant="int4", group=group)
    _assert_same(got, _two_step(path, group, dtype=dtype))
    assert all(isinstance(m, Int4Linear) for m in (got.output, got.layers[0].attn.wqkv, got.layers[0].attn.wo))
    assert isinstance(got.layers[0].ffn.experts, Int4Experts)
    if ftype == "Q4_0":  # the stored bytes kept: nothing rounded twice
        kept = _int4_names(_plan(h, config_from_header(h)))
        assert "layers.0.ffn.experts.w13" in kept and "output.weight" not in kept
        plain = load_model(path)  # Q4_0 kept int4 without quant too
        assert torch.equal(plain.layers[0].ffn.experts.w13, got.layers[0].ffn.experts.w13)
    prompts = [[1, 415, 2936, 9060]]
    want = prepare_for_inference(_two_step(path, group, dtype=dtype))
    assert generate(prepare_for_inference(got), prompts, max_new_tokens=6) == generate(want, prompts,
                                                                                      max_new_tokens=6)


# ------------------------------------------------------------------------------------------------
# Refusals: one line naming the argument, before anything is read


@pytest.mark.parametrize(("kw", "match"), [
    (dict(quant="q4_0"), r"quant='q4_0': expected 'int8' or 'int4' \(each matrix rounded as it is read\) or None$"),
    (dict(group=64), r"group=64 sets int4's inputs per scale: pass quant='int4' with it$"),
    (dict(quant="int8", group=32), r"group=32 sets int4's inputs per scale: pass quant='int4' with it \(int8 has "
                                   r"one scale per row\)$"),
    (dict(quant="int4", group=48), r"group=48: int4's inputs per scale are one of 32, 64, 128"),
    (dict(quant="int4", group=128), r"int4 with groups of 128 needs a multiple of 128 inputs per row; "
                                    r"layers.0.attn.wqkv has 64"),
])
def test_bad_quant_arguments_are_refused_by_name(folders, kw, match, monkeypatch):
    from mixlab.checkpoint import io

    monkeypatch.setattr(io.TensorReader, "read_into", lambda *a, **k: pytest.fail("read before refusing"))
    with pytest.raises(ValueError, match=match):
        load_model(folders["mixtral"], **kw)


def test_quant_with_an_adapter_is_refused(folders, tmp_path):
    with pytest.raises(ValueError, match=r"quant= does not combine with adapter=: the adapter is merged into float "
                                         r"weights; load with adapter= and without quant, then prepare_for_inference"):
        load_model(folders["mixtral"], quant="int4", adapter=tmp_path / "adapter")


def test_a_q4_0_gguf_in_other_groups_is_refused_as_prepare_refuses_it(gguf_files):
    with pytest.raises(ValueError, match=r"holds Q4_0 \(int4\) matrices in groups of 32, kept as stored; "
                                         r"quant='int4' converts its float matrices in the same groups, not 64: "
                                         r"pass group=32"):
        load_model(gguf_files["Q4_0"], quant="int4", group=64)
    with pytest.raises(ValueError, match=r"groups of 32 .* not 64: pass group=32"):  # the two-step path's
        prepare_for_inference(load_model(gguf_files["Q4_0"]), quant="int4", group=64)


# ------------------------------------------------------------------------------------------------
# The CLI


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_generate_quant_loads_quantised_and_prints_the_same_text(folders, tmp_path, capsys, monkeypatch, quant):
    import mixlab.checkpoint as checkpoint

    path = tmp_path / "m"
    save_model(_tiny(vocab_size=32000), path)
    asked = []
    real = checkpoint.load_model
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: asked.append(k.get("quant")) or real(*a, **k))
    args = ["generate", "--model", str(path), "--prompt", "Bonjour, le monde", "--max-new-tokens", "10",
            "--dtype", "float32", "--quant", quant, "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert asked == [quant]
    tok = load_tokenizer()
    prompt = tok.encode("Bonjour, le monde")
    ids = generate(prepare_for_inference(real(path), quant=quant), [prompt], max_new_tokens=10)[0]
    ids = [i for i in ids if i != tok.eos_id]
    assert out == tok.decode(prompt + ids)[len(tok.decode(prompt)) :] + "\n"


def test_file_quant_is_the_format_nearest_a_gguf_files_own(gguf_files):
    from mixlab.checkpoint.gguf_read import file_quant

    q5, q6 = llama_quantize(gguf_files["F32"], "Q5_K_M"), llama_quantize(gguf_files["F32"], "Q6_K")
    got = {k: file_quant(read_header(p)) for k, p in [*gguf_files.items(), ("Q5_K_M", q5), ("Q6_K", q6)]}
    assert got == {"F32": (None, "F32"), "BF16": (None, "BF16"), "Q4_K_M": ("int4", "Q4_K"),
                   "Q4_0": ("int4", "Q4_0"), "Q8_0": ("int8", "Q8_0"), "Q5_K_M": ("int8", "Q5_K"),
                   "Q6_K": ("int8", "Q6_K")}


def test_file_quant_gives_way_where_int4_cannot_hold_every_matrix(tmp_path):
    """An FFN of 48 inputs is no whole group of 32: int4 of every matrix was refused after the load."""
    from mixlab.checkpoint.gguf import write_gguf
    from mixlab.checkpoint.gguf_read import file_quant

    model = _tiny(vocab_size=32000, ffn_dim=48)
    write_gguf(model, tmp_path / "q4_0.gguf", quant="q4_0")
    write_gguf(_tiny(vocab_size=32000), tmp_path / "whole.gguf", quant="q4_0")
    assert file_quant(read_header(tmp_path / "q4_0.gguf")) == (None, "Q4_0")  # its Q4_0 kept, the rest floats
    assert file_quant(read_header(tmp_path / "whole.gguf")) == ("int4", "Q4_0")


def test_info_and_plan_say_the_format_a_gguf_file_runs_as(gguf_files, capsys):
    assert main(["info", str(gguf_files["Q4_K_M"])]) == 0
    assert "runs as:           int4 (generate / chat / serve / eval's --quant auto, for its Q4_K matrices)" in \
        capsys.readouterr().out
    assert main(["info", str(gguf_files["F32"])]) == 0
    assert "runs as" not in capsys.readouterr().out
    assert main(["plan", str(gguf_files["Q8_0"]), "--mode", "infer", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["quant"] == "int8" and "planned as int8: the matrices of" in err, err


@pytest.mark.parametrize(("ftype", "flags", "kind", "said"), [
    ("Q4_K_M", [], Int4Experts, "holds Q4_K matrices: loading them as int4 (--quant auto; --quant none loads floats)"),
    ("Q8_0", [], Int8Experts, "holds Q8_0 matrices: loading them as int8"),
    ("Q4_K_M", ["--quant", "none"], None, None),
    ("F32", [], None, None),
])
def test_generate_runs_a_quantised_gguf_in_its_own_format_by_default(gguf_files, capsys, ftype, flags, kind, said):
    """--quant auto (the default): a Q4_K_M file was dequantised to floats (a Mixtral's 93 GB in bf16 where
    the file takes 26) unless the user knew to pass --quant int4."""
    from mixlab.cli import _build_parser_interruptible, _parse_args
    from mixlab.cli.run import _load
    from mixlab.model.moe import Experts

    args = _parse_args(_build_parser_interruptible(), [
        "generate", "--model", str(gguf_files[ftype]), "--prompt", "x", "--dtype", "float32", *flags])
    model, _ = _load(args)
    err = capsys.readouterr().err
    assert isinstance(model.layers[0].ffn.experts, kind or Experts)
    assert (said in err) if said else "--quant auto" not in err, err
    if kind is Int4Experts:  # the same model as --quant int4 asked for
        args = _parse_args(_build_parser_interruptible(), [
            "generate", "--model", str(gguf_files[ftype]), "--prompt", "x", "--dtype", "float32", "--quant", "int4"])
        _assert_same(model, _load(args)[0])


def test_a_model_whose_weights_cannot_fit_is_refused_before_the_load(gguf_files, tmp_path, capsys, monkeypatch):
    """It was read until the kernel killed the process (a bf16 Mixtral: 93 GB); now one line says what the
    weights need, what is free, and which formats fit."""
    import re

    import mixlab.checkpoint as checkpoint
    from mixlab.cli import run
    from mixlab.config import format_bytes, parse_bytes
    from mixlab.model import memory

    path = tmp_path / "m"  # experts most of the weights, as in Mixtral (97%): here 2/3
    save_model(_tiny(vocab_size=32000, ffn_dim=2048), path)
    cfg = run._checked_config(path)
    assert cfg is not None
    floats, int8, int4 = (memory.weights_needed(cfg, "float32", q) for q in (None, "int8", "int4"))
    assert floats and int8 and int4 and int4 < int8 < floats
    experts = 4 * 2 * 3 * 64 * 2048 * 4  # E x L x (w1, w2, w3) x D x F, float32 bytes
    monkeypatch.setattr(memory, "swap_free", lambda: 1000)
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    cases = [((int8 + int4) // 2, ["pass --quant int4 (~"], ["--quant int8", "--max-memory"]),
             (floats - 2000, ["pass --quant int8 (~", " or --quant int4 (~", " or --max-memory "], []),
             (int4 // 2, ["it needs a machine with more memory"], ["--quant", "--max-memory"])]
    for ram, said, unsaid in cases:
        monkeypatch.setattr(memory, "available_memory", lambda ram=ram: ram)
        rc = main(["generate", "--model", str(path), "--prompt", "x", "--dtype", "float32", "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{path}: its weights need at least {format_bytes(floats)} as float32, but " in err, err
        assert f"{format_bytes(ram)} of memory is available and 1.00 KB of swap: " in err, err
        assert all(s in err for s in said) and not any(s in err for s in unsaid), err
        cache = re.search(r"--max-memory (\S+) \(the experts stay on disk, read on demand into a cache", err)
        if cache:  # a budget that leaves room for the rest of the model
            assert 0 < parse_bytes(cache.group(1), what="--max-memory") < ram - (floats - experts), err
    # analyze loads floats, and takes neither flag: the sizes alone
    (tmp_path / "notes.txt").write_text("plain text")
    monkeypatch.setattr(memory, "available_memory", lambda: int4 // 2)
    rc = main(["analyze", "--model", str(path), "--data", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "r"),
               "--dtype", "float32", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "its weights need at least" in err and "it needs a machine with more memory" in err, err
    assert "--quant" not in err and not (tmp_path / "r").exists(), err
    # a dense model has no experts to leave on disk
    save_model(_tiny("tiny-dense", vocab_size=32000), tmp_path / "dense")
    rc = main(["generate", "--model", str(tmp_path / "dense"), "--prompt", "x", "--dtype", "float32", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "of swap: it needs a machine with more memory" in err and "--max-memory" not in err, err
    # what fits loads (here: the int4 need fits, asked for)
    monkeypatch.undo()
    monkeypatch.setattr(memory, "available_memory", lambda: int4 + 10)
    monkeypatch.setattr(memory, "swap_free", lambda: 0)
    assert main(["generate", "--model", str(path), "--prompt", "x", "--max-new-tokens", "2", "--dtype", "float32",
                 "--quant", "int4", "--quiet"]) == 0
    # a Q4_0 file's int4 matrices are copied as stored: no weight's floats while loading, as rounding has
    cfg = run._checked_config(gguf_files["Q4_0"])
    assert cfg is not None and run._holds_int4(gguf_files["Q4_0"])
    assert memory.weights_needed(cfg, "float32", None, kept=True) < memory.weights_needed(cfg, "float32", "int4")


def test_load_model_refuses_weights_that_cannot_fit_in_the_apis_words(gguf_files, tmp_path, monkeypatch, capsys):
    """`mixlab.load_model` makes the commands' check itself (`model.memory.shortfall`): a notebook's
    load_model of a model larger than the machine was the kernel's out-of-memory kill. The error is a
    MemoryError too, and names the arguments that fit; what fits loads."""
    from mixlab.config import format_bytes
    from mixlab.errors import NotEnoughMemoryError
    from mixlab.model import memory

    path = tmp_path / "m"
    save_model(_tiny(vocab_size=32000, ffn_dim=2048), path)  # float32, as stored
    cfg = load_model(path).config
    floats, int4 = memory.weights_needed(cfg, "float32", None), memory.weights_needed(cfg, "float32", "int4")
    monkeypatch.setattr(memory, "swap_free", lambda: 0)
    monkeypatch.setattr(memory, "available_memory", lambda: floats - 1000)
    with pytest.raises(MemoryError) as e:
        load_model(path)
    assert isinstance(e.value, NotEnoughMemoryError), e.value
    said = str(e.value)
    assert said.startswith(f"{path}: its weights need at least {format_bytes(floats)} as float32, but "), said
    assert "load it with quant='int8' (~" in said and f" or quant='int4' (~{format_bytes(int4)})" in said, said
    assert "max_memory='" in said and "(the experts stay on disk" in said, said
    assert "--" not in said, said  # the API's words, not the command's flags
    load_model(path, quant="int4")  # fits
    load_model(path, max_memory="8MB")  # offloaded: the experts are not counted
    monkeypatch.setattr(memory, "available_memory", lambda: memory.weights_needed(cfg, "bfloat16", None) - 1)
    with pytest.raises(NotEnoughMemoryError, match="as bfloat16"):  # a dtype asked for is counted as asked
        load_model(path, dtype="bfloat16")
    # a GGUF file: its K-quant matrices load as float32 by default (`load_gguf` checks too)
    q4k = gguf_files["Q4_K_M"]
    gcfg = config_from_header(read_header(q4k))
    need = memory.weights_needed(gcfg, "float32", None)
    monkeypatch.setattr(memory, "available_memory", lambda: need - 1)
    with pytest.raises(NotEnoughMemoryError, match=f"need at least {format_bytes(need)} as float32"):
        load_model(q4k)
    load_model(q4k, quant="int4")
    # a command that loads without its own check (convert holds the floats) says the sizes, not quant=
    rc = main(["convert", str(q4k), str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert f"need at least {format_bytes(need)} as float32" in err and "it needs a machine with more memory" in err
    assert "quant=" not in err and "max_memory" not in err and not (tmp_path / "out").exists(), err


# ------------------------------------------------------------------------------------------------
# Peak memory, in fresh processes: the int4 model plus one weight's floats, not the whole model's floats

# The peak read as VmHWM: a fresh process's getrusage ru_maxrss starts at its parent's (Linux keeps it over
# fork and exec), here pytest's, which holds models larger than the one loaded.
_PEAK = """
import json, sys, torch
from mixlab import load_model
from mixlab.model.inference import prepare_for_inference
def hwm():
    return next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:"))
torch.set_num_threads(1)
before = hwm()
if sys.argv[2] == "at-load":
    model = load_model(sys.argv[1], quant=sys.argv[3])
else:
    model = prepare_for_inference(load_model(sys.argv[1]), quant=sys.argv[3], decoder=False)
print(json.dumps(hwm() - before))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc (Linux)")
@pytest.mark.parametrize(("source", "quant"), [("folder", "int4"), pytest.param("gguf", "int4", marks=pytest.mark.slow),
                                               pytest.param("folder", "int8", marks=pytest.mark.slow)])
def test_loading_quantised_peaks_at_the_quantised_model_not_its_floats(source, quant, tmp_path):
    """A 370 MB float32 MoE (4 layers of 8 experts, 512 x 1792; a GGUF: Mixtral's vocabulary, 500 MB):
    loading then quantising peaks above its float size; quantising each weight as read saves more than
    half of it (it holds the int4 model, 14% of the floats, or the int8 one, 25%, one weight's floats,
    12-17%, and a GGUF's float32 embeddings and header)."""
    cfg = get_preset("tiny-moe").replace(dim=512, ffn_dim=1792, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=64,
                                         vocab_size=2048 if source == "folder" else 32000, moe=MoEConfig(8, 2))
    model = Transformer(cfg)
    model.init_weights(std=0.02, seed=0)
    floats = sum(p.numel() * 4 for p in model.parameters())
    if source == "folder":
        save_model(model, path := tmp_path / "m")
    else:
        from mixlab.checkpoint.gguf import write_gguf

        pytest.importorskip("gguf")
        path = write_gguf(model, tmp_path / "m.gguf", quant="f32")
    del model

    # both ways at once, each in its own process (VmHWM is a process's own): the test takes one load's time
    runs = {how: subprocess.Popen([sys.executable, "-c", _PEAK, str(path), how, quant], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
            for how in ("two-step", "at-load")}

    def peak(how: str) -> int:
        out, err = runs[how].communicate(timeout=120)
        assert runs[how].returncode == 0, err[-2000:]
        return int(json.loads(out))

    try:
        two_step, at_load = peak("two-step"), peak("at-load")
    finally:
        for r in runs.values():
            r.kill()
            r.communicate()
    assert floats > 300e6 and two_step > floats
    assert two_step - at_load > floats / 2, (at_load, two_step, floats)  # most of the floats never exist at once


# ------------------------------------------------------------------------------------------------
# convert --quant q4_0 / int4: the model loaded int4, its bytes written as they are (the same file)


@pytest.mark.parametrize("source", ["folder", "Q4_K_M", "Q4_0"])
def test_convert_to_q4_0_loads_int4_and_writes_the_file_the_floats_gave(source, gguf_files, tmp_path, monkeypatch,
                                                                        capsys):
    import mixlab.checkpoint as checkpoint
    from mixlab.checkpoint import gguf_read
    from mixlab.cli import model as cli_model

    if source == "folder":
        src = tmp_path / "m"
        save_model(_tiny(vocab_size=32000), src)
    else:
        src = gguf_files[source]
    asked: list[object] = []
    for module, name in ((checkpoint, "load_model"), (gguf_read, "load_gguf")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=real, **k: asked.append(k.get("quant")) or _f(*a, **k))
    assert main(["convert", str(src), str(tmp_path / "int4.gguf"), "--quant", "int4", "--quiet"]) == 0
    assert asked == ["int4"]
    monkeypatch.setattr(cli_model, "_whole_q4_blocks", lambda *a: False)  # the float load, as before
    assert main(["convert", str(src), str(tmp_path / "floats.gguf"), "--quant", "q4_0", "--quiet"]) == 0
    assert asked == ["int4", None]
    assert (tmp_path / "int4.gguf").read_bytes() == (tmp_path / "floats.gguf").read_bytes()


def test_write_gguf_takes_int4_weights_as_q4_0_only(folders, tmp_path):
    from mixlab.checkpoint.gguf import write_gguf

    pytest.importorskip("gguf")
    path = tmp_path / "m"
    save_model(_tiny(vocab_size=32000), path)
    with pytest.raises(ValueError, match=r"int4 inference weights .* as GGUF \(int4 weights are written as q4_0 "
                                         r"only\)"):
        write_gguf(load_model(path, quant="int4"), tmp_path / "x.gguf", quant="bf16")
    with pytest.raises(ValueError, match=r"cannot write int4 weights in groups of 64 as q4_0, whose blocks are 32 "
                                         r"inputs: load the model with group=32"):
        write_gguf(load_model(path, quant="int4", group=64), tmp_path / "x.gguf", quant="q4_0")
    assert not (tmp_path / "x.gguf").exists()


# ------------------------------------------------------------------------------------------------
# int8: the same hook (`quantize_weight`), row scales in the embeddings' dtype


@pytest.mark.parametrize(("name", "dtype"), [("mixtral", None), ("mistral", "bfloat16"), ("tied", None),
                                             ("consolidated", None), ("fused", None)])
def test_a_folder_loads_int8_equal_to_loading_floats_then_quantising(folders, name, dtype):
    got = load_model(folders[name], dtype=dtype, quant="int8")
    _assert_same(got, _two_step8(folders[name], dtype=dtype))
    assert isinstance(got.output, Int8Linear) and isinstance(got.layers[0].attn.wqkv, Int8Linear)
    if name != "mistral":
        assert isinstance(got.layers[0].ffn.experts, Int8Experts)
    floats = got.tok_embeddings.weight.dtype  # the scales' dtype: bf16 for the bf16 folder, or as asked
    assert floats == (torch.bfloat16 if name == "fused" or dtype else torch.float32)
    assert got.output.scale.dtype == floats and got.layers[0].attn.wqkv.weight.dtype == torch.int8


@pytest.mark.parametrize("ftype", ["F32", "BF16", "Q8_0", "Q4_K_M"])
def test_a_gguf_loads_int8_equal_to_loading_floats_then_quantising(gguf_files, ftype):
    path = gguf_files[ftype]
    types = {t.type_name for t in read_header(path).tensors.values()}
    assert {"Q4_K_M": {"Q4_K", "Q6_K"}, "Q8_0": {"Q8_0"}, "BF16": {"BF16"}, "F32": set()}[ftype] <= types
    got = load_model(path, quant="int8")
    _assert_same(got, _two_step8(path))
    assert isinstance(got.layers[0].ffn.experts, Int8Experts) and isinstance(got.output, Int8Linear)


def test_int8_loaded_attaches_natively_and_decodes_the_two_step_tokens(folders, tmp_path):
    got = prepare_for_inference(load_model(folders["mixtral"], dtype="bfloat16", quant="int8"), quant="int8")
    want = prepare_for_inference(load_model(folders["mixtral"], dtype="bfloat16"), quant="int8")
    assert (got.native_decoder is None) == (want.native_decoder is None)
    prompts = [[1, 5, 9, 33], [1, 70, 2]]
    assert generate(got, prompts, max_new_tokens=10) == generate(want, prompts, max_new_tokens=10)
    # without quant= its int8 weights stay too, as a Q4_0 file's int4 ones do
    plain = prepare_for_inference(load_model(folders["mixtral"], dtype="bfloat16", quant="int8"))
    assert (plain.native_decoder is None) == (want.native_decoder is None)
    assert generate(plain, prompts, max_new_tokens=10) == generate(want, prompts, max_new_tokens=10)
    with pytest.raises(ValueError, match=r"already prepared for inference \(int8 weights\)"):
        prepare_for_inference(load_model(folders["mixtral"], quant="int8"), quant="int4")
    with pytest.raises(ValueError, match=r"int8 inference weights \(prepared for inference, loaded with quant=, "):
        save_model(load_model(folders["mixtral"], quant="int8"), tmp_path / "x")


def test_a_q4_0_gguf_is_refused_int8_as_prepare_refuses_it(gguf_files, monkeypatch):
    from mixlab.checkpoint import gguf_read

    with pytest.raises(ValueError, match=r"this model already holds int4 weights; int8 applies to float models"):
        prepare_for_inference(load_model(gguf_files["Q4_0"]), quant="int8")  # the two-step path's
    monkeypatch.setattr(gguf_read._Reader, "floats_into", lambda *a, **k: pytest.fail("read before refusing"))
    with pytest.raises(ValueError, match=r"m-Q4_0.gguf: this model already holds int4 weights; int8 applies to "
                                         r"float models \(its Q4_0 matrices are kept as stored\): pass "
                                         r"quant='int4' \(its float matrices made int4 too\) or none$"):
        load_model(gguf_files["Q4_0"], quant="int8")


@pytest.mark.parametrize("source", ["folder", "gguf"])
def test_offloaded_experts_are_cached_int8_and_the_resident_matrices_loaded_int8(folders, source, tmp_path):
    """max_memory with quant="int8": the cache holds int8 experts from the start (scales in the floats'
    dtype), the linears are int8 as read; prepare_for_inference keeps both; the tokens are the two-step
    path's."""
    from mixlab.checkpoint.gguf import write_gguf
    from mixlab.model.formats import expert_cache

    pytest.importorskip("gguf") if source == "gguf" else None
    path = folders["mixtral"] if source == "folder" else write_gguf(_tiny(vocab_size=32000), tmp_path / "m.gguf",
                                                                     quant="bf16")
    got = load_model(path, quant="int8", max_memory="1MB")
    cache = expert_cache(got)
    assert cache is not None and cache.fmt.kind == "int8" and isinstance(got.layers[0].attn.wqkv, Int8Linear)
    assert cache.fmt.dtype == got.tok_embeddings.weight.dtype == (torch.float32 if source == "folder" else
                                                                  torch.bfloat16)
    want = prepare_for_inference(load_model(path, max_memory="1MB"), quant="int8")
    assert expert_cache(want).fmt == cache.fmt
    for (n, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    got = prepare_for_inference(got)  # without quant= too: the held int8 stays (it said "already prepared")
    assert expert_cache(got).fmt == cache.fmt and isinstance(got.layers[0].attn.wqkv, Int8Linear)
    prompts = [[1, 5, 9, 33]]
    assert generate(got, prompts, max_new_tokens=8) == generate(want, prompts, max_new_tokens=8)


def test_quantize_int8_in_chunks_gives_the_whole_tensor_s_rounding(monkeypatch):
    """quantize_int8 rounds a few rows at a time (a whole Mixtral w13's float32 temporaries were ~11 GB):
    each row alone, so the codes and scales are those of the whole-tensor formula, bit for bit."""
    from mixlab.ops import quant

    monkeypatch.setattr(quant, "QUANT_CHUNK", 4 * 96 * 5)  # 5 rows of 96 at a time: chunks cross experts
    w = (torch.randn(3, 7, 96, generator=torch.Generator().manual_seed(0)) * 0.3).to(torch.bfloat16)
    w[1, 2] = 0  # a zero row: the clamped scale
    q, s = quant.quantize_int8(w)
    f = w.float()
    s_want = f.abs().amax(-1).clamp(min=1e-12) / 127.0
    assert s.dtype == torch.float32 and torch.equal(s, s_want)
    assert q.dtype == torch.int8 and torch.equal(q, torch.round(f / s_want[..., None]).clamp(-127, 127).to(torch.int8))
    assert q.abs().max() == 127 and not q[1, 2].any()
