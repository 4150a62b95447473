"""Sparse upcycling: the upcycled MoE computes the dense model's function, in mixlab and in transformers.

The MoE output is sum_k weight_k * FFN_{e_k}(x) with weights summing to 1 (softmax over the top-k
logits) and every expert a copy of the dense FFN, so it equals FFN(x) whatever the router says.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import hf_mistral, hf_mixtral
from mixlab import load_model, save_model
from mixlab.checkpoint import CheckpointError
from mixlab.cli import main as cli_main
from mixlab.config import ConfigError
from mixlab.train.upcycle import upcycle

TOKENS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))


def hf_llama(tmp: Path, **kw: object) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    args: dict[str, object] = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=5e5,
    )
    args.update(kw)
    torch.manual_seed(3)
    LlamaForCausalLM(LlamaConfig(**args)).eval().save_pretrained(tmp)
    return tmp


def hf_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    path = hf_mistral(tmp_path_factory.mktemp("dense"))
    return path, hf_logits(path)


@pytest.mark.parametrize(("init", "seed", "experts", "top_k"), [
    ("zeros", 0, 8, 2), ("normal", 0, 8, 2), ("normal", 1, 4, 2), ("normal", 2, 4, 1), ("uniform", 3, 8, 2),
])
def test_upcycled_equals_dense_whatever_the_router(dense, tmp_path, init, seed, experts, top_k):
    src, ref = dense
    upcycle(src, tmp_path / "moe", num_experts=experts, top_k=top_k, router_init=init, router_std=1.0, seed=seed)
    moe = load_model(tmp_path / "moe")
    assert moe.config.moe is not None and moe.config.moe.num_experts == experts
    with torch.no_grad():
        o = moe.forward_output(TOKENS)
        logits, routing = o.logits_BTV, o.routing
        dense_logits = load_model(src)(TOKENS)
    # mixlab MoE == transformers MistralForCausalLM on the dense weights, and == mixlab dense
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=0)
    if init != "zeros" and top_k < experts:  # the router really spreads tokens (so equality is not by luck)
        assert len(routing[0].idx_TK.unique()) > top_k


def test_transformers_mixtral_loads_upcycled(dense, tmp_path):
    src, ref = dense
    upcycle(src, tmp_path / "moe", num_experts=8, top_k=2, router_std=1.0, seed=0)
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    dense_cfg = json.loads((src / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["sliding_window"] == dense_cfg["sliding_window"] == 8
    assert cfg["rope_theta"] == dense_cfg["rope_parameters"]["rope_theta"]
    torch.testing.assert_close(hf_logits(tmp_path / "moe"), ref, atol=1e-5, rtol=0)


def test_upcycle_never_writes_where_the_sources_links_point(dense, tmp_path):
    """A hub snapshot's files are links to ../../blobs: upcycle --from SNAPSHOT --out BLOBS --overwrite
    replaced the blobs folder, the snapshot's own weights; refused before anything is written."""
    from mixlab.atomic import OutputError

    src, _ = dense
    snap, blobs = tmp_path / "models--x" / "snapshots" / "rev", tmp_path / "models--x" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in src.iterdir():
        (blobs / f"sha-{f.name}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(f"../../blobs/sha-{f.name}")
    before = sorted(p.name for p in blobs.iterdir())
    with pytest.raises(OutputError, match=f"{blobs}: refusing to write there: it contains the target of {snap}/"):
        upcycle(snap, blobs, num_experts=4, top_k=2, overwrite=True)
    assert sorted(p.name for p in blobs.iterdir()) == before


@pytest.mark.parametrize("tied", [False, True])
def test_llama_upcycles(tmp_path, tied):
    src = hf_llama(tmp_path / "llama", tie_word_embeddings=tied)
    upcycle(src, tmp_path / "moe", num_experts=4, top_k=2, seed=1)
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["sliding_window"] is None and cfg["rope_theta"] == 5e5 and cfg["tie_word_embeddings"] is tied
    torch.testing.assert_close(hf_logits(tmp_path / "moe"), hf_logits(src), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_mistral_format_upcycles(tmp_path, tied):
    # a params.json + consolidated.safetensors folder (Mistral's downloads, `mixlab convert --to mistral`)
    # was refused ("convert it first with mixlab convert SRC DST --to hf")
    src = hf_llama(tmp_path / "llama", tie_word_embeddings=tied)
    save_model(load_model(src), tmp_path / "mistral", fmt="mistral")
    assert not (tmp_path / "mistral" / "config.json").exists()
    upcycle(tmp_path / "mistral", tmp_path / "moe", num_experts=4, top_k=2, router_std=1.0, seed=1)
    torch.testing.assert_close(hf_logits(tmp_path / "moe"), hf_logits(src), atol=1e-5, rtol=0)
    # a Mistral-format MoE is refused as a transformers one is
    save_model(load_model(tmp_path / "moe"), tmp_path / "moe_mistral", fmt="mistral")
    with pytest.raises(ConfigError, match=r"params\.json: this checkpoint is already a mixture of experts"):
        upcycle(tmp_path / "moe_mistral", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_training_run_is_refused_naming_its_model(dense, tmp_path):
    # it said "no config.json (transformers format) found" of a run folder and of its checkpoints
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000003").mkdir(parents=True)
    (run / "checkpoints" / "step_00000003" / "state.json").write_text("{}")
    (run / "hf").symlink_to(dense[0])
    with pytest.raises(ConfigError, match=r"a training run folder: its exported model is .*run/hf"):
        upcycle(run, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"a training checkpoint: `mixlab convert .*step_00000003 OUT`"):
        upcycle(run / "checkpoints" / "step_00000003", tmp_path / "out")


def test_the_command_upcycles_a_dense_training_run_from_its_export(dense, tmp_path, capsys):
    """`mixlab upcycle --from RUN` of a `mixlab train` run of a dense model failed ('its exported model is
    RUN/hf'), where every command that reads a model takes a run as its hf/ (cli.model_path)."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000003").mkdir(parents=True)
    (run / "checkpoints" / "step_00000003" / "state.json").write_text("{}")
    (run / "hf").symlink_to(dense[0])
    assert cli_main(["upcycle", "--from", str(run), "--out", str(tmp_path / "moe"), "--experts", "4",
                     "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'moe'}: 4 experts, top-2")
    torch.testing.assert_close(hf_logits(tmp_path / "moe"), dense[1], atol=1e-5, rtol=0)
    step = run / "checkpoints" / "step_00000003"  # no model: its error names the convert command
    assert cli_main(["upcycle", "--from", str(step), "--out", str(tmp_path / "moe2")]) == 1
    assert f"`mixlab convert {step} OUT`" in capsys.readouterr().err


def test_noise_makes_experts_differ_and_logits_stay_close(dense, tmp_path):
    src, ref = dense
    dense_w = load_file(str(src / "model.safetensors"))["model.layers.0.mlp.gate_proj.weight"]
    kls = []
    for noise in (0.01, 0.1):
        out = tmp_path / f"moe{noise}"
        upcycle(src, out, num_experts=4, top_k=2, noise=noise, seed=0)
        w = load_file(str(out / "model.safetensors"))
        w1 = [w[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"] for e in range(4)]
        assert not torch.equal(w1[0], w1[1])
        # each copy = dense + N(0, (noise * std(dense))^2): the spread matches the documented scale
        rel = (w1[2] - dense_w).std() / dense_w.std()
        assert 0.8 * noise < rel < 1.2 * noise
        with torch.no_grad():
            logits = load_model(out)(TOKENS)
        kl = torch.nn.functional.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                        reduction="batchmean")
        assert (logits - ref).abs().max() > 1e-6  # the noise is really there ...
        assert (logits - ref).abs().max() < 20 * noise  # ... and small
        kls.append(kl.item())
    assert kls[0] < kls[1] < 1e-2


def test_seeded(dense, tmp_path):
    src, _ = dense
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        upcycle(src, tmp_path / name, num_experts=4, top_k=2, noise=0.05, seed=seed)
    a, b, c = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    gate = "model.layers.1.block_sparse_moe.gate.weight"
    assert not torch.equal(a[gate], c[gate])


def test_streams_into_shards_and_keeps_dtype(tmp_path):
    from transformers import MistralForCausalLM, MixtralForCausalLM

    src = hf_mistral(tmp_path / "dense")
    bf16 = tmp_path / "dense-bf16"
    MistralForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(bf16)
    upcycle(bf16, tmp_path / "moe", num_experts=8, top_k=2, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "moe" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    with safe_open(str(tmp_path / "moe" / shards[-1]), framework="pt") as h:
        assert {h.get_tensor(k).dtype for k in h.keys()} == {torch.bfloat16}
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"  # "dtype" said float32: transformers 5 loaded it so
    assert MixtralForCausalLM.from_pretrained(tmp_path / "moe").dtype == torch.bfloat16
    assert load_model(tmp_path / "moe").config.moe.num_experts == 8


# -- bad input ---------------------------------------------------------------------------------


def _edit_config(path: Path, **changes: object) -> Path:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_refuses_moe_checkpoint(tmp_path):
    src = hf_mixtral(tmp_path / "mixtral")
    with pytest.raises(ConfigError, match="already a mixture of experts"):
        upcycle(src, tmp_path / "out")
    # MoE weights behind a dense config.json are caught by their tensor names
    _edit_config(src, model_type="mistral", architectures=["MistralForCausalLM"])
    cfg = json.loads((src / "config.json").read_text())
    del cfg["num_local_experts"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="block_sparse_moe"):
        upcycle(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_missing_ffn_tensor(dense, tmp_path):
    src, _ = dense
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        upcycle(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("changes", "match"), [
    ({"model_type": "qwen2"}, "model_type 'qwen2' is not supported"),
    ({"hidden_act": "gelu"}, "'hidden_act' is 'gelu'"),
    ({"attention_bias": True}, "'attention_bias' is True"),
    ({"mlp_bias": True}, "'mlp_bias' is True"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope type 'llama3'"),
])
def test_refuses_unsupported_architecture(tmp_path, changes, match):
    src = _edit_config(hf_llama(tmp_path / "llama"), **changes)
    with pytest.raises(ConfigError, match=match) as err:
        upcycle(src, tmp_path / "out")
    assert "config.json" in str(err.value)


def test_refuses_extra_weights(tmp_path):
    """A bias (here on q_proj) has no place in Mixtral: refuse rather than drop it silently."""
    src = hf_llama(tmp_path / "llama")
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"q_proj\.bias"):
        upcycle(src, tmp_path / "out")


def test_cli_shows_its_progress_on_a_terminal(dense, tmp_path, monkeypatch):
    """A multi-GB upcycle wrote for minutes without a word; --quiet (and a log file) keep it so."""
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for quiet in ([], ["--quiet"]):
        monkeypatch.setattr(sys, "stderr", Terminal())
        assert cli_main(["upcycle", "--from", str(dense[0]), "--out", str(tmp_path / "moe"), "--experts", "2",
                         *quiet]) == 0
        bar = sys.stderr.getvalue()
        assert (f"writing {tmp_path / 'moe'}:" in bar and "tensor/s" in bar) != bool(quiet), bar


def test_cli(dense, tmp_path, capsys):
    src, ref = dense
    out = tmp_path / "moe"
    assert cli_main(["upcycle", "--from", str(src), "--out", str(out), "--experts", "4", "--top-k", "2",
                     "--router-init", "zeros", "--seed", "3"]) == 0
    assert "4 experts, top-2" in capsys.readouterr().out
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(TOKENS), ref, atol=1e-5, rtol=0)
    assert cli_main(["upcycle", "--from", str(out), "--out", str(tmp_path / "again")]) == 1
    assert "already a mixture of experts" in capsys.readouterr().err
    assert cli_main(["upcycle", "--from", str(src), "--out", str(tmp_path / "x"), "--top-k", "9"]) == 2  # a usage error
    assert "top_k" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--router-std", "-1"], "argument --router-std: expected a number >= 0, got -1"),  # 'router std must be ...'
    (["--router-std", "nan"], "argument --router-std: expected a finite number, got 'nan'"),
    (["--dtype", "half"], "argument --dtype: expected one of float32, bfloat16, float16, got 'half'"),
])
def test_cli_flag_errors_name_the_flag(dense, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        cli_main(["upcycle", "--from", str(dense[0]), "--out", str(tmp_path / "moe"), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "moe").exists()


def test_cli_names_the_flag_of_a_bad_dtype_or_router_std(dense, tmp_path, capsys):
    """`--dtype int8` was told 'int8 / int4 weights are a quantisation: --quant', a flag upcycle does
    not take, and `--router-std -1` 'router std must be ...', naming no flag; `bf16` is still taken."""
    args = ["upcycle", "--from", str(dense[0]), "--out", str(tmp_path / "moe"), "--experts", "2", "--top-k", "1"]
    for flag, value, said in [("--dtype", "int8", "expected one of float32, bfloat16, float16, got 'int8'"),
                              ("--router-std", "-1", "expected a number >= 0, got -1")]:
        with pytest.raises(SystemExit) as e:  # argparse's error, as for every flag's bad value
            cli_main([*args, flag, value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument {flag}: {said}" in err and "--quant" not in err
    assert not (tmp_path / "moe").exists()
    assert cli_main([*args, "--dtype", "bf16", "--quiet"]) == 0
    assert load_model(tmp_path / "moe").output.weight.dtype == torch.bfloat16


def test_an_out_folder_with_other_files_needs_overwrite(dense, tmp_path, capsys):
    """The refusal told the user to 'pass --overwrite', which `mixlab upcycle` did not have."""
    src, _ = dense
    out = tmp_path / "moe"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli_main(["upcycle", "--from", str(src), "--out", str(out), "--experts", "2", "--top-k", "1"]) == 1
    assert "holds files mixlab did not write (notes.txt); pass --overwrite" in capsys.readouterr().err
    assert cli_main(["upcycle", "--from", str(src), "--out", str(out), "--experts", "2", "--top-k", "1",
                     "--overwrite"]) == 0
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()


def test_side_files_copied(tmp_path):
    src = hf_mistral(tmp_path / "dense")
    (src / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    (src / "tokenizer.model").write_bytes(bytes(range(256)))  # binary, as SentencePiece models are
    # a `mixlab train` export names its tokenizer here: without it an upcycled byte-level model was
    # read with Mixtral's tokenizer (sft / generate / analyze refused it)
    (src / "mixlab_data.json").write_text('{"tokenizer": {"type": "bytes"}}')
    (src / "tokenizer.model.v3").write_bytes(b"v3")  # Mistral's versioned file (was left behind)
    (src / "chat_template.jinja").write_text("{{ messages }}")  # an Instruct model's template (was left behind)
    upcycle(src, tmp_path / "moe", num_experts=2, top_k=1)
    assert (tmp_path / "moe" / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (tmp_path / "moe" / "tokenizer.model.v3").read_bytes() == b"v3"
    assert json.loads((tmp_path / "moe" / "mixlab_data.json").read_text()) == {"tokenizer": {"type": "bytes"}}
    assert (tmp_path / "moe" / "tokenizer.model").read_bytes() == bytes(range(256))
    assert json.loads((tmp_path / "moe" / "tokenizer_config.json").read_text()) == {"model_max_length": 256}


def test_refuses_wrong_shape(dense, tmp_path):
    src, _ = dense
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 95)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"down_proj\.weight' has shape \[64, 95\].*implies \[64, 96\]"):
        upcycle(broken, tmp_path / "out")


def test_noise_is_relative_to_each_matrix(dense, tmp_path):
    """w1, w3 and w2 each get noise scaled by their own spread, even when their scales differ."""
    src, _ = dense
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    (scaled / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] *= 10
    save_file(tensors, str(scaled / "model.safetensors"))
    upcycle(scaled, tmp_path / "moe", num_experts=2, top_k=1, noise=0.05, seed=0)
    moe = load_file(str(tmp_path / "moe" / "model.safetensors"))
    for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        w = tensors[f"model.layers.0.mlp.{theirs}.weight"]
        copy = moe[f"model.layers.0.block_sparse_moe.experts.1.{ours}.weight"]
        rel = ((copy - w).std() / w.std()).item()
        assert 0.04 < rel < 0.06, (ours, rel)


def test_dtype_by_name_and_bad_arguments(dense, tmp_path):
    # dtype="bfloat16" (as load_model and save_model take it) failed mid-write with "Invalid device
    # string"; dtype=torch.int8 wrote an integer checkpoint; seed=None / 1.5 and noise="0.1" failed
    # deep in torch.
    upcycle(dense[0], tmp_path / "bf16", num_experts=2, top_k=1, dtype="bfloat16")
    assert load_model(tmp_path / "bf16").output.weight.dtype == torch.bfloat16
    for bad, match in [({"dtype": torch.int8}, "unsupported dtype"), ({"dtype": "int8"}, "unknown dtype"),
                       ({"seed": None}, "seed"), ({"seed": 1.5}, "seed"), ({"noise": "0.1"}, "noise"),
                       ({"seed": 2**64}, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),  # was torch's "Overflow"
                       ({"router_std": None}, "router std")]:
        with pytest.raises(ValueError, match=match):
            upcycle(dense[0], tmp_path / "bad", num_experts=2, top_k=1, **bad)
        assert not (tmp_path / "bad").exists()


def test_a_file_given_as_the_dense_model_names_what_to_pass(dense, tmp_path):
    """`upcycle --from X.gguf` or `--from DIR/model.safetensors` said only "not a checkpoint folder"."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=r"gguf: a file, not a checkpoint folder: `mixlab convert .*m.gguf DIR`"):
        upcycle(tmp_path / "m.gguf", tmp_path / "out", num_experts=2, top_k=1)
    weights = next(dense[0].glob("*.safetensors"))
    with pytest.raises(CheckpointError, match="a file, not a checkpoint folder: pass the folder holding it"):
        upcycle(weights, tmp_path / "out", num_experts=2, top_k=1)
    with pytest.raises(CheckpointError, match="nope: no such checkpoint folder"):
        upcycle(tmp_path / "nope", tmp_path / "out", num_experts=2, top_k=1)
    assert not (tmp_path / "out").exists()


def test_a_tied_config_over_a_different_head_is_refused(tmp_path):
    """tie_word_embeddings true over an lm_head.weight of its own: dropped when equal to the embeddings (the
    upcycled model equals the dense one); when it differs, the dense model transformers 5 computes uses it,
    and the upcycled one tied silently (other logits), so it is refused by name."""
    src = hf_llama(tmp_path / "llama", tie_word_embeddings=True)
    tensors = load_file(str(src / "model.safetensors"))
    for head, refused in ((tensors["model.embed_tokens.weight"].clone(), False),
                          (torch.randn(tensors["model.embed_tokens.weight"].shape), True)):
        save_file({**tensors, "lm_head.weight": head}, str(src / "model.safetensors"), metadata={"format": "pt"})
        out = tmp_path / f"out-{refused}"
        if refused:
            with pytest.raises(CheckpointError, match=r"config field 'tie_word_embeddings' is true, but tensor "
                                                      r"'lm_head\.weight' differs"):
                upcycle(src, out)
            assert not out.exists()
        else:
            upcycle(src, out, num_experts=4)
            torch.testing.assert_close(hf_logits(out), hf_logits(src), atol=1e-5, rtol=0)
