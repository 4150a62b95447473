"""Every bad checkpoint the loader can meet gets a clear error naming the file, the tensor and what
was expected; none of them reads a byte of tensor data first, and pickle is never unpickled."""

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import hf_mistral, hf_mixtral
from mixlab import CheckpointError, ModelConfig, Transformer, load_model, save_model
from mixlab.checkpoint import io as ckio


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return hf_mixtral(tmp_path / "ckpt")


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    save_model(load_model(hf_mixtral(tmp_path / "hf")), tmp_path / "sharded", max_shard_bytes=40_000)
    return tmp_path / "sharded"


@pytest.fixture
def no_reads(monkeypatch):
    """Fail the test if any tensor data is read: every check must come first."""

    def refuse(*a, **kw):
        raise AssertionError("tensor data was read before the error")

    monkeypatch.setattr(ckio, "_pread_into", refuse)


def load_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    return str(e.value)


def index_of(folder: Path) -> tuple[Path, dict]:
    p = folder / "model.safetensors.index.json"
    return p, json.loads(p.read_text())


# -- damaged files ----------------------------------------------------------------------------


def test_truncated_file(ckpt, no_reads):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    msg = load_error(ckpt)
    assert str(f) in msg and "truncated" in msg and f"the file has {len(data) - 100}" in msg


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"\x01\x02", "truncated"),
        (struct.pack("<Q", 10**9) + b"{}", "header claims 1000000000 bytes"),
        (struct.pack("<Q", 6) + b"not js", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    ],
)
def test_corrupt_header(ckpt, no_reads, content, words):
    (ckpt / "model.safetensors").write_bytes(content)
    msg = load_error(ckpt)
    assert "model.safetensors" in msg and words in msg


def test_header_offsets_that_do_not_match_the_shape(ckpt, no_reads):
    header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 100]}}).encode()
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(100))
    msg = load_error(ckpt)
    assert "'model.norm.weight'" in msg and "needs 256 bytes" in msg and "span 100" in msg


# -- shards and index -------------------------------------------------------------------------


def test_shard_named_in_index_but_missing(sharded, no_reads):
    _, index = index_of(sharded)
    shard = sorted(set(index["weight_map"].values()))[1]
    (sharded / shard).unlink()
    msg = load_error(sharded)
    assert f"shard {shard!r} is named in the index but missing" in msg and "index.json" in msg


def test_tensor_in_two_shards(sharded, no_reads):
    _, index = index_of(sharded)
    shards = sorted(set(index["weight_map"].values()))
    save_file({"model.norm.weight": torch.ones(64)}, str(sharded / "extra.safetensors"))
    index["weight_map"]["model.norm.weight"] = "extra.safetensors"  # listed once, present twice
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    original = next(s for s in shards if "model.norm.weight" in ckio.read_header(sharded / s))
    msg = load_error(sharded)
    assert "'model.norm.weight'" in msg and "two files" in msg and original in msg and "extra.safetensors" in msg


def test_tensor_listed_twice_in_the_index(sharded, no_reads):
    p, index = index_of(sharded)
    dup = '"weight_map": {\n    "model.norm.weight": "model-00001-of-00002.safetensors",'
    text = p.read_text().replace('"weight_map": {', dup, 1)
    p.write_text(text)
    msg = load_error(sharded)
    assert "'model.norm.weight' is listed twice" in msg and str(p) in msg


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/outside.safetensors", "sub/../../x.safetensors"])
def test_weight_map_escaping_the_folder(sharded, no_reads, entry):
    p, index = index_of(sharded)
    index["weight_map"]["model.norm.weight"] = entry
    p.write_text(json.dumps(index))
    msg = load_error(sharded)
    assert repr(entry) in msg and "outside the checkpoint folder" in msg


def test_symlink_out_of_the_folder(sharded, tmp_path, no_reads):
    p, index = index_of(sharded)
    shard = index["weight_map"]["model.norm.weight"]
    (sharded / shard).rename(tmp_path / "elsewhere.safetensors")
    (sharded / shard).symlink_to(tmp_path / "elsewhere.safetensors")
    msg = load_error(sharded)
    assert "elsewhere.safetensors" in msg and "outside the checkpoint folder" in msg


def test_hugging_face_cache_symlinks_are_allowed(ckpt, tmp_path):
    """The hub cache links snapshots/REV/FILE to ../../blobs/SHA; that layout must load."""
    repo = tmp_path / "models--x--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in ckpt.iterdir():
        blob = repo / "blobs" / f"sha-{f.name}"
        f.rename(blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    assert load_model(snap).config.n_layers == 2


def test_index_that_is_not_an_index(sharded, no_reads):
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    assert "not a valid index" in load_error(sharded)


# -- names, shapes, dtypes --------------------------------------------------------------------


def rewrite(folder: Path, change) -> None:
    from safetensors.torch import load_file

    f = folder / "model.safetensors"
    state = load_file(str(f))
    change(state)
    save_file(state, str(f))


def test_missing_tensor(ckpt, no_reads):
    rewrite(ckpt, lambda s: s.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    msg = load_error(ckpt)
    assert "missing tensors" in msg and "model.layers.1.block_sparse_moe.experts.2.w3.weight" in msg


def test_unexpected_tensor(ckpt, no_reads):
    rewrite(ckpt, lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    msg = load_error(ckpt)
    assert "unexpected tensors" in msg and "model.layers.0.self_attn.q_proj.bias" in msg


def test_wrong_shape(ckpt, no_reads):
    rewrite(ckpt, lambda s: s.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(64, 64)}))
    msg = load_error(ckpt)
    assert str(ckpt / "model.safetensors") in msg and "'model.layers.1.self_attn.k_proj.weight'" in msg
    assert "has shape [64, 64], expected [32, 64]" in msg


def test_transposed_expert_is_caught(ckpt, no_reads):
    name = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    rewrite(ckpt, lambda s: s.update({name: s[name].T.contiguous()}))
    assert "has shape [96, 64], expected [64, 96]" in load_error(ckpt)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_wrong_dtype(ckpt, no_reads, dtype):
    name = "model.norm.weight"  # sorts late: the check must come before reading anything
    rewrite(ckpt, lambda s: s.update({name: torch.ones(64, dtype=dtype)}))
    msg = load_error(ckpt)
    assert f"'{name}'" in msg and "expected a floating-point dtype" in msg
    assert {torch.int64: "I64", torch.int8: "I8", torch.bool: "BOOL"}[dtype] in msg


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_a_dense_config_over_expert_weights_names_the_mismatch(ckpt, no_reads, model_type):
    """A Mixtral whose config.json says llama / mistral was "missing tensors ...mlp.gate_proj.weight"."""
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": model_type}))
    assert load_error(ckpt) == (
        f"{ckpt}: the config describes a dense model (config.json, model_type {model_type!r}) but the weights hold "
        "4 MoE experts per layer (model.layers.0.block_sparse_moe.experts.0.w1.weight, ...): an MoE checkpoint's "
        "config.json has model_type 'mixtral', architectures ['MixtralForCausalLM'], num_local_experts 4 and "
        "num_experts_per_tok")


def test_an_moe_config_over_dense_weights_names_the_mismatch(tmp_path, no_reads):
    folder = hf_mistral(tmp_path / "dense")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "mixtral", "num_local_experts": 8}))
    msg = load_error(folder)
    assert msg.startswith(f"{folder}: the config describes an MoE model (8 experts; config.json, model_type "
                          "'mixtral') but the weights hold a dense feed-forward (model.layers.0.mlp.down_proj.weight")
    assert "model_type 'mistral' or 'llama'" in msg


def test_params_json_without_moe_over_expert_weights_names_the_mismatch(ckpt, tmp_path):
    out = tmp_path / "mistral"
    save_model(load_model(ckpt), out, fmt="mistral")
    params = json.loads((out / "params.json").read_text())
    del params["moe"]
    (out / "params.json").write_text(json.dumps(params))
    assert load_error(out).endswith('but the weights hold 4 MoE experts per layer (layers.0.feed_forward.experts.0.'
                                    'w1.weight, ...): an MoE checkpoint\'s params.json has a "moe" block, '
                                    '{"num_experts": 4, "num_experts_per_tok": K}')


@pytest.mark.parametrize("cls", ["MixtralModel", "MixtralForSequenceClassification"])
def test_a_transformers_model_without_its_lm_head_is_named_as_such(tmp_path, no_reads, cls):
    """MixtralModel.save_pretrained was "tensor names match no known format", a classifier "missing tensors:
    lm_head.weight"; both are named by their architectures."""
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    getattr(transformers, cls)(cfg).save_pretrained(tmp_path / "m")
    bare = "; names without the model. prefix" if cls == "MixtralModel" else ""
    assert load_error(tmp_path / "m") == (
        f"{tmp_path / 'm'}: the weights have no language-modelling head (no lm_head.weight{bare}): config.json "
        f"architectures ['{cls}']; mixlab loads MixtralForCausalLM, MistralForCausalLM and LlamaForCausalLM "
        "checkpoints (save that class's model)")
    if cls != "MixtralModel":  # a causal LM's file that lost its head is still told as a missing tensor
        (tmp_path / "m" / "config.json").write_text(
            (tmp_path / "m" / "config.json").read_text().replace(cls, "MixtralForCausalLM"))
        assert "missing tensors for this config (hf format): lm_head.weight" in load_error(tmp_path / "m")


def test_a_quantised_transformers_checkpoint_is_named_as_such(ckpt, no_reads):
    """A GPTQ / AWQ / FP8 checkpoint (quantization_config in config.json; q_proj.qweight and .scales for
    q_proj.weight) was "missing tensors for this config: ...experts.0.w1.weight, ..." (and 27 more)."""
    rewrite(ckpt, lambda s: s.update({k.replace(".weight", ".qweight"): s.pop(k).to(torch.int32)
                                      for k in [k for k in s if k.endswith("proj.weight")]}))
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    assert load_error(ckpt) == (f"{ckpt / 'config.json'}: quantization_config (quant_method 'gptq'): a quantised "
                                "checkpoint, whose packed weights and scales mixlab does not read; load the float "
                                "checkpoint it was made from (then --quant int8 / int4, or prepare_for_inference), "
                                "or a GGUF file")


def test_no_weights_at_all(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = load_model(hf_mixtral(tmp_path / "h")).config.to_hf_dict()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(cfg))
    assert "no *.safetensors files" in load_error(tmp_path / "empty")
    assert "no such checkpoint folder" in load_error(tmp_path / "absent")


# -- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"hidden_size": -64}, "'hidden_size' in this file"),
        ({"num_hidden_layers": 0}, "'num_hidden_layers' in this file"),
        ({"intermediate_size": 10**13}, "'intermediate_size' in this file"),
        ({"num_attention_heads": 5, "head_dim": 16}, "must be a multiple of"),
        ({"num_attention_heads": 6, "head_dim": None}, "not divisible by num_attention_heads"),
        ({"num_experts_per_tok": 9}, "'num_experts_per_tok' in this file"),
        ({"vocab_size": "many"}, "'vocab_size'"),
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        # Fields transformers honours that mixlab's model lacks (they were ignored: other logits).
        ({"rope_parameters": None, "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 4.0}},
         "'rope_scaling' has rope type 'linear'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope type 'yarn'"),
        ({"hidden_act": "gelu"}, "'hidden_act' is 'gelu'"),
        ({"attention_bias": True}, "'attention_bias' is True"),
        ({"tie_word_embeddings": "false"}, "'tie_word_embeddings' must be true or false"),  # bool("false") is True
        ({"hidden_size": 1 << 24, "vocab_size": 1 << 24, "num_hidden_layers": 1 << 20}, "parameters, more than"),
    ],
)
def test_config_out_of_range(ckpt, change, words):
    p = ckpt / "config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **change}))
    msg = load_error(ckpt)
    assert str(p) in msg and words in msg


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{oops")
    assert "not valid JSON" in load_error(ckpt)


# -- pickle -----------------------------------------------------------------------------------


class Trap:
    """Unpickling this creates `marker`: the proof that a loader unpickled the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.00.pth"])
def test_pickle_is_refused_and_never_unpickled(tmp_path, name):
    folder = tmp_path / "pickled"
    folder.mkdir()
    marker = tmp_path / "unpickled"
    (folder / name).write_bytes(pickle.dumps({"model.embed_tokens.weight": Trap(marker)}))
    (folder / "config.json").write_text(json.dumps({"model_type": "mixtral", "hidden_size": 64,
                                                    "num_hidden_layers": 1, "num_attention_heads": 4,
                                                    "intermediate_size": 96, "vocab_size": 128}))
    for path in (folder, folder / name):
        msg = load_error(path)
        assert name in msg and "never unpickled" in msg and "safetensors" in msg and "weights_only=True" in msg
        # Mistral's consolidated.00.pth is to become the consolidated.00.safetensors mistral-inference reads too
        out = "consolidated.00.safetensors" if name.startswith("consolidated") else "model.safetensors"
        assert f"}}, '{out}')" in msg
    assert not marker.exists()
    # The trap is real: unpickling it does create the file.
    pickle.loads((folder / name).read_bytes())
    assert marker.exists()
    os.remove(marker)


@pytest.mark.parametrize("sharded", [False, True])
def test_the_pickle_conversion_command_given_works(tmp_path, monkeypatch, sharded):
    """The command the refusal gives, run as given in the folder, makes a checkpoint that loads as the model:
    it was one file only (half the tensors of a sharded pickle) and failed on a tied head, whose tensors
    share memory ("Some tensors share memory", safetensors)."""
    from transformers import AutoModelForCausalLM

    src = hf_mistral(tmp_path / "hf", tie_word_embeddings=not sharded)
    state = AutoModelForCausalLM.from_pretrained(src).state_dict()
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((src / "config.json").read_text())
    if sharded:
        names = sorted(state)
        shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
        for f, keys in shards.items():
            torch.save({k: state[k] for k in keys}, folder / f)
        (folder / "pytorch_model.bin.index.json").write_text(
            json.dumps({"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    msg = load_error(folder)
    command = msg.split('python -c "', 1)[1].split('"`', 1)[0]
    monkeypatch.chdir(folder)
    exec(command, {})
    ours, ref = load_model(folder), load_model(src)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours.forward_output(tokens).logits_BTV, ref.forward_output(tokens).logits_BTV)
    assert (ours.output.weight is ours.tok_embeddings.weight) is not sharded


def test_safetensors_win_over_a_pickle_next_to_them(ckpt, tmp_path):
    marker = tmp_path / "unpickled"
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(Trap(marker)))
    assert load_model(ckpt).config.n_layers == 2 and not marker.exists()


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.complex64])
def test_a_dtype_that_cannot_hold_weights_is_refused(ckpt, tmp_path, no_reads, dtype):
    # load_model(dtype=torch.int8) failed deep in load_state_dict after reading everything, and
    # save_model(dtype=torch.int8) wrote an integer checkpoint that no loader accepts.
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_model(ckpt, dtype=dtype)
    model = Transformer(ModelConfig.from_dir(ckpt))
    with pytest.raises(ValueError, match="unsupported dtype"):
        save_model(model, tmp_path / "out", dtype=dtype)
    assert not (tmp_path / "out").exists()


def test_float64_is_a_weight_dtype(ckpt, tmp_path):
    model = load_model(ckpt, dtype=torch.float64)
    assert model.output.weight.dtype == torch.float64
    save_model(model, tmp_path / "f64")
    assert load_model(tmp_path / "f64").output.weight.dtype == torch.float64


def test_wrong_types_of_config_and_model_are_named(ckpt, tmp_path):
    # load_model(config={...}) and save_model(nn.Linear) were AttributeErrors ("'dict' object has no
    # attribute 'n_layers'", "'Linear' object has no attribute 'config'").
    with pytest.raises(ValueError, match="config= takes a mixlab ModelConfig.*not dict"):
        load_model(ckpt, config={"dim": 64})
    with pytest.raises(ValueError, match="saves a mixlab Transformer, not Linear"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "out")
    assert not (tmp_path / "out").exists()
