"""Bad and hostile inputs through the `mixlab` command (issue 11): every case exits with code 1 (2 for
a flag's value, a usage error) and a one-line message naming the file, field, parameter or value,
prints no traceback, and deletes nothing of the user's. Cases run in-process (`mixlab.cli.main`);
the few that could hang, or whose exit code only a real process shows, run as subprocesses with a
time limit. The Python API raises mixlab's own exception types (`mixlab.errors`) with the same
messages."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mixlab.checkpoint import load_model, save_model
from mixlab.cli import main
from mixlab.config import ModelConfig, get_preset
from mixlab.errors import CheckpointError, ConfigError, DataError, GenerationError, MixlabError
from mixlab.model import Transformer

SRC = Path(__file__).resolve().parents[1] / "src"


def _tiny(path: Path, vocab: int = 256, **cfg: object) -> Path:
    m = Transformer(get_preset("tiny-moe").replace(vocab_size=vocab, **cfg))
    m.init_weights(seed=0)
    save_model(m, path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny(tmp_path_factory.mktemp("m") / "base")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Vocabulary 32000: Mixtral's tokenizer fits, so generate and chat run."""
    return _tiny(tmp_path_factory.mktemp("m") / "chat", vocab=32000)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mixlab.train.data import prepare, read_documents

    root = tmp_path_factory.mktemp("data")
    (root / "src" / "prose").mkdir(parents=True)
    for i in range(12):
        (root / "src" / "prose" / f"{i}.txt").write_text(f"The {i}th cat sat on the mat. " * 8)
    prepare(read_documents([root / "src"]), root / "ds")
    return root / "ds"


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_meta(dataset: Path, **changes: object) -> None:
    meta = json.loads((dataset / "meta.json").read_text())
    (dataset / "meta.json").write_text(json.dumps({**meta, **changes}))


def _edit_config(folder: Path, **changes: object) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _params(folder: Path, **changes: object) -> Path:
    """A Mistral-format copy with params.json edited."""
    d = json.loads((folder / "config.json").read_text())
    (folder / "config.json").unlink()
    params = {"dim": d["hidden_size"], "n_layers": d["num_hidden_layers"], "n_heads": d["num_attention_heads"],
              "n_kv_heads": d["num_key_value_heads"], "hidden_dim": d["intermediate_size"],
              "vocab_size": d["vocab_size"], "moe": {"num_experts": 4, "num_experts_per_tok": 2}}
    params.update(changes)
    (folder / "params.json").write_text(json.dumps(params))
    return folder


def _train_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(dataset), "--out", str(out), "--steps", "3", "--seq-len", "16",
            "--batch-size", "2", "--eval-every", "0", "--ckpt-every", "0", "--log-every", "1", "--threads", "1",
            "--set", "dim=32", "--set", "n_layers=1", "--set", "n_heads=2", "--set", "n_kv_heads=1",
            "--set", "head_dim=16", "--set", "ffn_dim=32", *extra]


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# Each case: (setup(tmp, base, chat_model, dataset) -> argv, words the message must contain).
Case = Callable[[Path, Path, Path, Path], list[str]]
CASES: dict[str, tuple[Case, list[str]]] = {
    # 1-3: data loss
    "convert into a folder holding the source": (
        lambda t, b, c, d: (_copy(b, t / "models" / "a"), _copy(b, t / "models" / "b"),
                            (t / "models" / "config.json").write_text("{}"),
                            ["convert", str(t / "models" / "a"), str(t / "models"), "--to", "mistral"])[-1],
        ["contains the source", "models"]),
    "convert into the parent of the source, --overwrite": (
        lambda t, b, c, d: (_copy(b, t / "p" / "src"),
                            ["convert", str(t / "p" / "src"), str(t / "p"), "--overwrite"])[-1],
        ["contains the source"]),
    "convert into a foreign folder": (
        lambda t, b, c, d: ((t / "notes").mkdir(), (t / "notes" / "thesis.tex").write_text("x"),
                            ["convert", str(b), str(t / "notes")])[-1],
        ["thesis.tex", "--overwrite"]),
    "data prepare --out the corpus": (
        lambda t, b, c, d: ((t / "corpus").mkdir(), (t / "corpus" / "a.txt").write_text("hello " * 20),
                            ["data", "prepare", str(t / "corpus"), "--out", str(t / "corpus"), "--overwrite"])[-1],
        ["is the source", "corpus"]),
    "data prepare --out an existing file": (
        lambda t, b, c, d: ((t / "corpus").mkdir(), (t / "corpus" / "a.txt").write_text("hello " * 20),
                            (t / "ds").write_text("mine"),
                            ["data", "prepare", str(t / "corpus"), "--out", str(t / "ds")])[-1],
        ["ds", "not a folder"]),
    # 5: NaN / Inf
    "generate from NaN weights": (
        lambda t, b, c, d: (_nan_copy(c, t / "nan"),
                            ["generate", "--model", str(t / "nan"), "--prompt", "hi", "--max-new-tokens", "2",
                             "--dtype", "float32"])[-1],
        ["NaN logits"]),
    "train --lr 1e10": (lambda t, b, c, d: _train_args(d, t / "run", "--lr", "1e10", "--warmup", "0"),
                        ["non-finite loss at step", "skip_nonfinite", "No checkpoint has been written yet"]),
    # 6: text that is not UTF-8
    "generate --prompt with undecodable bytes": (
        lambda t, b, c, d: ["generate", "--model", str(c), "--prompt", os.fsdecode(b"\xff\xfe"),
                            "--max-new-tokens", "2"],
        ["not valid UTF-8", "ff"]),
    "generate --prompt with a lone surrogate": (
        lambda t, b, c, d: ["generate", "--model", str(c), "--prompt", "a\ud800b", "--max-new-tokens", "2"],
        ["not valid UTF-8", "character 1"]),
    "generate --stop with undecodable bytes": (  # accepted, and it could never match
        lambda t, b, c, d: ["generate", "--model", str(c), "--prompt", "hi", "--stop", os.fsdecode(b"a\xe4"),
                            "--max-new-tokens", "2"],
        ["stop string 'a\\udce4' is not valid UTF-8", "bytes e4 at character 1"]),
    "chat --stop with undecodable bytes": (
        lambda t, b, c, d: ["chat", "--model", str(c), "--stop", os.fsdecode(b"\xff")],
        ["stop string", "not valid UTF-8", "bytes ff"]),
    # 7: runaway resources
    "num_hidden_layers 1000000": (
        lambda t, b, c, d: ["generate", "--model", str(_edit_config(_copy(c, t / "m"), num_hidden_layers=1_000_000)),
                            "--prompt", "hi"],
        ["1000000 layers", "the weights hold 2"]),
    "deeply nested safetensors header": (
        lambda t, b, c, d: (_nested_header(_copy(b, t / "m")), ["info", str(t / "m")])[-1],
        ["model.safetensors", "nested too deeply"]),
    "deeply nested config.json": (
        lambda t, b, c, d: ((_copy(b, t / "m") / "config.json").write_text('{"a": ' + _nested(100_000) + "}"),
                            ["info", str(t / "m")])[-1],
        ["config.json", "nested too deeply"]),
    # JSON nested past Python's recursion limit: a RecursionError traceback (not a ValueError)
    "deeply nested JSONL line in data prepare": (
        lambda t, b, c, d: ((t / "c" / "prose").mkdir(parents=True),
                            (t / "c" / "prose" / "train.jsonl").write_text('{"text": ' + _nested(100_000) + "}\n"),
                            ["data", "prepare", str(t / "c"), "--out", str(t / "ds")])[-1],
        ["prose/train.jsonl:1: JSON nested too deeply"]),
    "deeply nested JSONL line in sft": (
        lambda t, b, c, d: ((t / "x.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": '
                                                      + _nested(100_000) + "}\n"),
                            ["sft", "--model", str(c), "--data", str(t / "x.jsonl"), "--out", str(t / "r")])[-1],
        ["x.jsonl:2: JSON nested too deeply"]),
    "deeply nested train config file": (
        lambda t, b, c, d: ((t / "c.toml").write_text("lr = " + _nested(100_000) + "\n"),
                            ["train", str(t / "c.toml"), "--data", str(d), "--out", str(t / "r")])[-1],
        ["c.toml: nested too deeply"]),
    "deeply nested dataset meta.json": (
        lambda t, b, c, d: ((_copy_tree(d, t / "ds") / "meta.json").write_text('{"a": ' + _nested(100_000) + "}"),
                            _train_args(t / "ds", t / "r"))[-1],
        ["meta.json: JSON nested too deeply"]),
    # damaged metadata that passed the checks and failed as a TypeError traceback, or was blamed on the flags
    "dataset meta.json with a split that is not a table": (
        lambda t, b, c, d: (_edit_meta(_copy_tree(d, t / "ds"), splits={"train": 5}),
                            _train_args(t / "ds", t / "r"))[-1],
        ["meta.json: missing or bad field ('splits.train' must map each domain to its 'tokens' and 'docs' counts)"]),
    "dataset meta.json vocab_size -1": (  # it was exit 2, "--set dim=32 ...: config field 'vocab_size' ..."
        lambda t, b, c, d: (_edit_meta(_copy_tree(d, t / "ds"), vocab_size=-1), _train_args(t / "ds", t / "r"))[-1],
        ["meta.json: missing or bad field (vocab_size -1"]),
    "adapter_config.json target_modules 5": (
        lambda t, b, c, d: ((t / "a").mkdir(), (t / "a" / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": 5})),
                            ["generate", "--model", str(c), "--adapter", str(t / "a"), "--prompt", "hi"])[-1],
        ["adapter_config.json: target_modules is 5; expected a module name or a list of them"]),
    "analyze --model a folder that is not there": (
        lambda t, b, c, d: ["analyze", "--model", str(t / "nope"), "--data", str(_corpus(t)), "--out", str(t / "r")],
        ["nope: no such checkpoint folder"]),  # it said "nope: no config.json (transformers) or params.json ... found"
    "demo --out inside --data": (  # it ran, and the same command then failed on the run's metrics.jsonl
        lambda t, b, c, d: ["demo", "--steps", "1", "--data", str(_corpus(t, train_docs=20)), "--out",
                            str(t / "corpus" / "demo")],
        ["--out", "is inside --data", "choose an --out outside it"]),
    "training checkpoint state.json whose files is 5": (  # an AttributeError traceback
        lambda t, b, c, d: ((t / "step_00000001").mkdir(), (t / "step_00000001" / "state.json").write_text(
            json.dumps({"step": 1, "files": 5})), ["info", str(t / "step_00000001")])[-1],
        ["state.json: corrupt checkpoint state ('files' must map file names to byte counts)"]),
    "eval --data a pipe": (  # it said "data folder or file p.jsonl does not exist"
        lambda t, b, c, d: (os.mkfifo(t / "p.jsonl"), ["eval", "--model", str(c), "--data", str(t / "p.jsonl")])[-1],
        ["p.jsonl: not a regular file or folder (a pipe, a socket or a device)"]),
    "data prepare of a pipe": (  # "p.jsonl: no such file or folder"
        lambda t, b, c, d: (os.mkfifo(t / "p.jsonl"),
                            ["data", "prepare", str(t / "p.jsonl"), "--out", str(t / "ds")])[-1],
        ["p.jsonl: not a regular file or folder (a pipe, a socket or a device)"]),
    # 8: one-line errors naming the file, field or value
    "rope_parameters as a list": (
        lambda t, b, c, d: ["info", str(_edit_config(_copy(b, t / "m"), rope_parameters=[1, 2]))],
        ["config.json", "rope_parameters"]),
    "rope_theta 'abc'": (lambda t, b, c, d: ["info", str(_edit_config(_copy(b, t / "m"), rope_theta="abc",
                                                                      rope_parameters=None))],
                         ["config.json", "rope_theta", "'abc'"]),
    "moe 'x' in params.json": (lambda t, b, c, d: ["info", str(_params(_copy(b, t / "m"), moe="x"))],
                               ["params.json", "'moe'", "'x'"]),
    "n_heads 0 without head_dim": (lambda t, b, c, d: ["info", str(_params(_copy(b, t / "m"), n_heads=0))],
                                   ["params.json", "n_heads", "0"]),
    "gguf destination is a folder": (
        lambda t, b, c, d: ((t / "x.gguf").mkdir(), ["convert", str(c), str(t / "x.gguf"), "--to", "gguf"])[-1],
        ["x.gguf", "is a folder"]),
    "--device cuda without CUDA": (
        lambda t, b, c, d: ["generate", "--model", str(c), "--prompt", "hi", "--device", "cuda"],
        ["cuda", "not available"]),
    "--device bogus": (lambda t, b, c, d: ["generate", "--model", str(c), "--prompt", "hi", "--device", "bogus"],
                       ["'bogus'", "cpu"]),
    "--device meta": (lambda t, b, c, d: ["generate", "--model", str(c), "--prompt", "hi", "--device", "meta"],
                      ["meta", "no data"]),
    "lr = 'fast' in TOML": (
        lambda t, b, c, d: ((t / "c.toml").write_text('lr = "fast"\n'),
                            ["train", str(t / "c.toml"), "--data", str(d), "--out", str(t / "run")])[-1],
        ["c.toml: training setting 'lr'", "'fast'"]),  # the file's error (1), naming the file
    "seed 10**23 in generate": (
        lambda t, b, c, d: ["generate", "--model", str(c), "--prompt", "hi", "--temperature", "1",
                            "--seed", str(10**23)],
        ["seed", str(10**23)]),
    "seed 10**23 in train": (lambda t, b, c, d: _train_args(d, t / "run", "--seed", str(10**23)),
                             ["--seed", str(10**23)]),
    # 10: smaller
    "bos_token_id outside the vocabulary": (
        lambda t, b, c, d: ["info", str(_edit_config(_copy(b, t / "m"), bos_token_id=999))],
        ["config.json", "bos_token_id", "999"]),
    "info on tensors that do not match the config": (
        lambda t, b, c, d: ["info", str(_edit_config(_copy(b, t / "m"), intermediate_size=64))],
        ["shape", "expected"]),
    "train --lr nan": (lambda t, b, c, d: _train_args(d, t / "run", "--lr", "nan"), ["--lr", "nan"]),
    "train --lr -1": (lambda t, b, c, d: _train_args(d, t / "run", "--lr", "-1"), ["--lr", "-1"]),
    "train --warmup -5": (lambda t, b, c, d: _train_args(d, t / "run", "--warmup", "-5"), ["--warmup", "-5"]),
    "train --threads -3": (lambda t, b, c, d: _train_args(d, t / "run", "--threads", "-3"), ["--threads", "-3"]),
    # `--set dim` (no =) said "config field 'dim' must be an integer ..., got ''"
    "train --set without =": (lambda t, b, c, d: _train_args(d, t / "run", "--set", "n_layers"),
                              ["--set 'n_layers'", "FIELD=VALUE"]),
    "eval --stride past the model's context": (
        lambda t, b, c, d: ((t / "e.txt").write_text("hello world"),
                            ["eval", "--model", str(c), "--data", str(t / "e.txt"), "--context", "4096",
                             "--stride", "1024"])[-1],
        ["--stride 1024", "512 positions"]),
    "eval on an empty text file": (
        lambda t, b, c, d: ((t / "e.txt").write_text(""), ["eval", "--model", str(c), "--data", str(t / "e.txt")])[-1],
        ["e.txt", "empty"]),
    # a --domains name the data does not have: the flag's value (2), as --split's; it exited 1
    "eval --domains nope": (
        lambda t, b, c, d: ["eval", "--model", str(c), "--data", str(_corpus(t)), "--domains", "prose,nope"],
        ["--domains: 'nope' not found in", "domains there: code, prose"]),
    "analyze --domains nope": (
        lambda t, b, c, d: ["analyze", "--model", str(c), "--data", str(_corpus(t)), "--out", str(t / "r"),
                            "--domains", "prsoe"],
        ["--domains: 'prsoe' not found in", "did you mean 'prose'?", "domains there: code, prose"]),
    "data prepare --domains nope": (
        lambda t, b, c, d: ["data", "prepare", str(_corpus(t)), "--out", str(t / "ds"), "--domains", "nope"],
        ["--domains: 'nope' not found in", "domains there: code, prose"]),
    # a run folder that is a source or a file; an export that would replace the starting weights
    "train --out the dataset": (lambda t, b, c, d: _train_args(d, d), ["refusing to write the run there", "source"]),
    "train --out a file": (lambda t, b, c, d: ((t / "f").write_text("x"), _train_args(d, t / "f"))[-1],
                           ["f: exists and is not a folder", "--out"]),  # it said "f: File exists"
    "sft --out the model's folder": (
        lambda t, b, c, d: ["sft", "--model", str(c), "--data", str(_chat_jsonl(t)), "--out", str(c), "--steps", "1",
                            "--seq-len", "32", "--valid-fraction", "0"],
        ["refusing to write the run there: it is the source"]),
    "sft --model RUN/hf --out RUN": (  # the run's export replaced its starting weights with the result
        lambda t, b, c, d: ["sft", "--model", str(_copy(c, t / "run" / "hf")), "--data", str(_chat_jsonl(t)),
                            "--out", str(t / "run"), "--steps", "1", "--seq-len", "32", "--valid-fraction", "0"],
        ["hf: refusing to write there: it is the source"]),
    "prompt over the context names --truncate": (
        lambda t, b, c, d: ["generate", "--model", str(c), "--prompt", "word " * 600, "--max-new-tokens", "8"],
        ["--truncate"]),
}


def _corpus(t: Path, train_docs: int = 0) -> Path:
    """A corpus in the shared layout: <domain>/valid.jsonl for code and prose, and train.jsonl of
    `train_docs` documents when asked."""
    for domain in ("code", "prose"):
        (t / "corpus" / domain).mkdir(parents=True)
        (t / "corpus" / domain / "valid.jsonl").write_text(json.dumps({"text": f"some {domain} " * 20}) + "\n")
        if train_docs:
            (t / "corpus" / domain / "train.jsonl").write_text(
                "".join(json.dumps({"text": f"{i} more {domain} " * 30}) + "\n" for i in range(train_docs)))
    return t / "corpus"


def _chat_jsonl(t: Path) -> Path:
    (t / "chat.jsonl").write_text(json.dumps({"prompt": "hi", "completion": "there"}) + "\n")
    return t / "chat.jsonl"


def _nan_copy(src: Path, dst: Path) -> Path:
    m = load_model(src)
    with torch.no_grad():
        m.layers[0].attn.wo.weight[0, 0] = math.nan
    save_model(m, dst)
    return dst


def _nested_header(folder: Path) -> None:
    f = folder / "model.safetensors"
    header = b'{"x": ' + _nested(100_000).encode() + b"}"
    f.write_bytes(len(header).to_bytes(8, "little") + header)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# The cases that are usage errors (exit code 2, as argparse's): a flag's value that its type or the command
# refuses; the others ran and failed (1).
USAGE_ERRORS = {"generate --stop with undecodable bytes", "chat --stop with undecodable bytes",
                "--device cuda without CUDA", "--device bogus", "--device meta", "seed 10**23 in generate",
                "train --set without =", "prompt over the context names --truncate", "seed 10**23 in train",
                "train --lr nan", "train --lr -1", "train --warmup -5", "train --threads -3",
                "eval --stride past the model's context", "eval --domains nope", "analyze --domains nope",
                "data prepare --domains nope"}


@pytest.mark.parametrize("name", list(CASES))
def test_cli_case_is_a_clear_error(name, tmp_path, base, chat_model, dataset, capsys):
    setup, words = CASES[name]
    argv = setup(tmp_path, base, chat_model, dataset)
    before = _snapshot(tmp_path)
    inputs = _snapshot(base), _snapshot(chat_model), _snapshot(dataset)
    try:
        code = main(argv)
    except SystemExit as e:  # a flag's own check (argparse's error line), before anything is read
        code = e.code
    err = capsys.readouterr().err
    warned = [ln for ln in err.splitlines() if ln.startswith(f"mixlab {argv[0]}: warning: ")]
    assert len(warned) == ("NaN" in name), err  # the NaN tensor is named once, on its own line, before the error
    lines = [ln for ln in err.splitlines() if ln.startswith("mixlab ") and ln not in warned]
    assert code == (2 if name in USAGE_ERRORS else 1), err
    assert "Traceback" not in err and len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    after = _snapshot(tmp_path)
    assert all(after.get(k) == v for k, v in before.items()), "a file of the user's changed or vanished"
    assert (_snapshot(base), _snapshot(chat_model), _snapshot(dataset)) == inputs


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1", "1e-12", "abc"])
@pytest.mark.parametrize("command", ["convert", "upcycle"])
def test_max_shard_gb_must_be_a_positive_finite_size(command, value, tmp_path, base, capsys):
    """inf was an OverflowError traceback; 0 and -1 wrote one shard per tensor."""
    argv = (["convert", str(base), str(tmp_path / "o")] if command == "convert"
            else ["upcycle", "--from", str(base), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as e:
        main(argv + ["--max-shard-gb", value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "--max-shard-gb: expected a" in err and repr(value) in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,expected", [
    (["data", "prepare", "c", "--out", "o", "--valid-fraction", "2"],
     "--valid-fraction: expected a number in [0, 1), got 2"),
    (["data", "prepare", "c", "--out", "o", "--valid-fraction", "-1"],
     "--valid-fraction: expected a number in [0, 1), got -1"),
    (["upcycle", "--from", "m", "--out", "o", "--noise", "-1"], "--noise: expected a number >= 0, got -1"),
    (["upcycle", "--from", "m", "--out", "o", "--noise", "nan"], "--noise: expected a finite number, got 'nan'"),
    (["generate", "--model", "m", "--prompt", "hi", "--max-new-tokens", "0"],
     "--max-new-tokens: expected an integer >= 1, got 0"),
    (["chat", "--model", "m", "--max-new-tokens", "x"], "--max-new-tokens: expected an integer, got 'x'"),
])
def test_a_bad_number_names_the_flag(args, expected, capsys):
    # the library's check said "valid_fraction must be in [0, 1)", "noise must be a finite number >= 0",
    # "invalid max_new_tokens=0": its parameter, not the flag given
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err and "Traceback" not in err


@pytest.mark.parametrize("args,expected", [
    (["train", "--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
    (["train", "--lr", "-1"], "argument --lr: expected a number >= 0, got -1"),
    (["train", "--warmup", "-5"], "argument --warmup: expected an integer in [0, 9223372036854775807], got -5"),
    (["train", "--threads", "-3"], "argument --threads: expected an integer in [0, 9223372036854775807], got -3"),
    (["train", "--seq-len", "0"], "argument --seq-len: expected an integer in [1, 9223372036854775807], got 0"),
    # log_every 0 was a ZeroDivisionError traceback at the first step, grad_accum 10**20 an OverflowError
    (["train", "--log-every", "0"], "argument --log-every: expected an integer in [1, 9223372036854775807], got 0"),
    (["sft", "--grad-accum", str(10**20)],
     f"argument --grad-accum: expected an integer in [1, 9223372036854775807], got {10**20}"),
    (["train", "--out", "o"], "no dataset: pass --data DIR"),
    (["train", "--data", "d", "--out", "o", "--ep", "0"], "--ep 0: the expert-parallel size must be at least 1"),
    (["train", "--data", "d", "--out", "o", "--ep", "2"], "--ep 2 needs 2 processes (or a multiple of 2)"),
    (["generate", "--model", "m", "--prompt", "x", "--ep", "0"], "--ep 0: the expert-parallel size must be at least 1"),
    (["generate", "--model", "m", "--prompt", "x", "--ep", "2"], "--ep 2 needs 2 processes (or a multiple of 2)"),
    (["sft", "--model", "m", "--data", "d", "--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
    (["eval", "--model", "m", "--data", "d", "--stride", "0"],
     "--stride must be between 1 and --context (2048); got 0"),
    (["eval", "--model", "m", "--data", "d", "--context", "0"], "--context must be >= 1, got 0"),
    (["eval", "--model", "m", "--data", "d", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["eval", "--model", "m", "--data", "d", "--max-docs", "0"], "--max-docs must be >= 1, got 0"),
    (["train", "--data", "d", "--out", "o", "--device", "bogus"],
     "training setting 'device' (--device): unknown device 'bogus'; expected cpu, cuda or cuda:N"),
    (["sft", "--model", "m", "--data", "d", "--lora-rank", "2", "--lora-alpha", "0"],
     "fine-tuning setting 'lora_alpha' (--lora-alpha): LoRA alpha must be a finite number > 0, got 0.0"),
    (["sft", "--model", "m", "--data", "d", "--lora-rank", "2", "--lora-dropout", "1"],
     "fine-tuning setting 'lora_dropout' (--lora-dropout): LoRA dropout must be a number in [0, 1), got 1.0"),
    (["sft", "--model", "m", "--data", "d", "--lora-rank", "2", "--lora-targets", "mlp"],
     "fine-tuning setting 'lora_targets' (--lora-targets): LoRA targets ['mlp']: expected some of attention"),
    (["sft", "--model", "m", "--data", "d", "--lora-rank", "2", "--lora-targets", "router", "--freeze-router"],
     "fine-tuning setting 'freeze_router' (--freeze-router) keeps the router fixed, but 'router' is one of the"),
    (["sft", "--model", "m", "--data", "d", "--valid-fraction", "1"],
     "fine-tuning setting 'valid_fraction' (--valid-fraction) must be in [0, 1), got 1.0"),
    (["sft", "--model", "m", "--data", "d", "--device", "bogus"], "fine-tuning setting 'device' (--device): unknown"),
    (["sft", "--model", "m", "--data", "d", "--lora-alpha", "32"],  # full fine-tuning, the flag ignored
     "fine-tuning setting 'lora_alpha' (--lora-alpha) applies to LoRA, but lora_rank is 0 (full fine-tuning): give "
     "lora_rank too, or remove it"),
    (["sft", "--model", "m"], "no data: pass --data FILE.jsonl"),
    (["dpo", "--data", "d"], "no starting model: pass --model DIR"),
    (["dpo", "--model", "m", "--data", "d", "--beta", "0"],
     "fine-tuning setting 'beta' (--beta) must be a finite number > 0, got 0.0"),
    (["dpo", "--model", "m", "--data", "d", "--label-smoothing", "0.5"],
     "fine-tuning setting 'label_smoothing' (--label-smoothing) must be in [0, 0.5), got 0.5"),
    (["dpo", "--model", "m", "--data", "d", "--label-smoothing", "0.1", "--loss", "ipo"],
     "fine-tuning setting 'label_smoothing' (--label-smoothing) applies to the sigmoid loss only"),
    (["eval", "--model", "m", "--data", "d", "--split", "tset"], "--split 'tset' is not a split name (did you mean"),
    (["analyze", "--model", "m", "--data", "d", "--out", "o", "--split", "tset"], "--split 'tset' is not a split name"),
    (["upcycle", "--from", "m", "--out", "o", "--seed", str(10**23)],
     f"argument --seed: expected an integer in [-2**63, 2**64), got {10**23}"),
    (["demo", "--seed", str(10**23)],
     f"argument --seed: expected an integer in [0, 9223372036854775807], got {10**23}"),
    (["plan", "tiny-moe", "--ep", "3"], "--ep must divide --devices (1), got 3"),
    (["plan", "tiny-moe", "--devices", "3", "--ep", "3"], "--ep 3 must divide the number of experts (4)"),
    (["plan", "tiny-moe", "--devices", "0"], "--devices must be >= 1, got 0"),
    (["upcycle", "--from", "m", "--out", "o", "--top-k", "0"],
     "--experts 8 --top-k 0: config field 'moe.top_k' must be in [1, num_experts=8], got 0"),
    (["upcycle", "--from", "m", "--out", "o", "--experts", "4", "--top-k", "5"],
     "--experts 4 --top-k 5: config field 'moe.top_k' must be in [1, num_experts=4], got 5"),
])
def test_a_flag_value_the_command_refuses_is_a_usage_error(args, expected, tmp_path, monkeypatch, capsys):
    """Exit 2 naming the flag, before any file is read (m, d: none here): these flags' values were checked
    in library code (TrainConfig's, FinetuneConfig's, plan's, upcycle's, eval's own with ValueError, the
    corpus' --split) and exited 1, a failed run."""
    monkeypatch.chdir(tmp_path)
    try:
        code = main(args)
    except SystemExit as e:  # refused by the flag's type
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert sum(ln.startswith(f"mixlab {args[0]}: error: ") for ln in err.splitlines()) == 1, err  # after a usage
    assert not list(tmp_path.iterdir())


def _code(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`mixlab ARGS`' exit code and its one error line (no traceback)."""
    try:
        code = main(args)
    except SystemExit as e:
        code = int(e.code or 0)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"mixlab {args[0]}: error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return code, lines[0]


def test_a_model_setting_the_flags_contradict_is_a_usage_error(tmp_path, base, dataset, capsys):
    """--set against --init-from's weights, --init-from's vocabulary against --data's, --seq-len past the
    model's context (train's and sft's) exited 1, failed runs, once the data and weights were being read;
    each is the command line's (exit 2, naming the flag) before anything is written. The same values in a
    config file are the file's (exit 1, naming the file and the key)."""
    init = _tiny(tmp_path / "init", vocab=512)
    train = ["train", "--data", str(dataset), "--out", str(tmp_path / "run"), "--steps", "1", "--seq-len", "16"]
    sft = ["sft", "--model", str(init), "--data", str(tmp_path / "chat.jsonl"), "--out", str(tmp_path / "run"),
           "--tokenizer", "bytes"]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"prompt": "hi", "completion": "there"}) + "\n")
    for args, said in (
            ([*train, "--init-from", str(init), "--set", "dim=32"],
             f"--set dim=32: model_overrides: dim = 32, but the weights of init_from {init} have dim = 64"),
            ([*train, "--init-from", str(init), "--set", "moe.num_experts=8"], "--set moe.num_experts=8: "),
            ([*train, "--init-from", str(base)],
             f"init_from (--init-from) {base}: vocab_size 256 is smaller than the dataset's tokenizer vocabulary"),
            ([*train, "--set", "vocab_size=100"], "--set vocab_size=100: model_overrides: vocab_size 100 is smaller"),
            ([*train, "--set", "moe.top_k=9"], "--set moe.top_k=9: config field 'moe.top_k' must be in [1, "),
            ([*train, "--set", "dims=64"], "--set dims=64: model_overrides: unknown model field(s) dims"),
            ([*train, "--seq-len", "1000"], "seq_len 1000 is beyond the model's context (max_seq_len 512); set"),
            ([*train, "--model", "tiny-mo"], "training setting 'model' (--model): unknown preset 'tiny-mo' (did you "),
            ([*sft, "--seq-len", "1000"], "seq_len 1000 is beyond the model's context (max_seq_len 512); set"),
            ([*sft, "--model", str(base)], "fine-tuning setting 'tokenizer' (--tokenizer): bytes has 259 tokens, "
                                           "more than the model's vocabulary (256)")):
        code, line = _code(args, capsys)
        assert code == 2 and said in line, line
        assert not (tmp_path / "run").exists()
    code, line = _code([*train, "--model", str(tmp_path / "nope")], capsys)  # a folder that is not there: exit 1
    assert code == 1 and line.endswith(f"error: {tmp_path / 'nope'}: no such checkpoint folder (the model is one, "
                                       "or a preset)"), line
    (tmp_path / "c.toml").write_text(f'init_from = "{init}"\n[model_overrides]\ndim = 32\n')
    code, line = _code(["train", str(tmp_path / "c.toml"), *train[1:]], capsys)
    assert code == 1 and line.endswith(f"error: {tmp_path / 'c.toml'}: model_overrides: dim = 32, but the weights "
                                       f"of init_from {init} have dim = 64; the starting weights fix the model's "
                                       "shape: remove dim from model_overrides (the config file's "
                                       "[model_overrides], or --set)"), line
    (tmp_path / "c.toml").write_text("seq_len = 1000\n")
    code, line = _code(["sft", str(tmp_path / "c.toml"), *sft[1:]], capsys)
    assert code == 1 and f"{tmp_path / 'c.toml'}: seq_len 1000 is beyond the model's context" in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command,toml,said", [
    # the LoRA settings' said "(--lora-alpha)", a flag not given
    ("sft", "lora_rank = 2\nlora_alpha = 0", "fine-tuning setting 'lora_alpha': LoRA alpha must be a"),
    ("sft", "lora_rank = 2\nlora_dropout = 1.0", "fine-tuning setting 'lora_dropout': LoRA dropout"),
    ("sft", 'lora_rank = 2\nlora_targets = "mlp"', "fine-tuning setting 'lora_targets': LoRA targets ['mlp']"),
    ("sft", "valid_fraction = 1.0", "fine-tuning setting 'valid_fraction' must be in [0, 1), got 1.0"),
    ("dpo", "beta = 0.0", "fine-tuning setting 'beta' must be a finite number > 0, got 0.0"),
    # a non-number said ">= 0" of a setting that must be > 0 (the flag says "> 0" of -1 and 0)
    ("dpo", 'beta = "x"', "fine-tuning setting 'beta' must be a finite number > 0, got 'x'"),
    ("train", 'eps = "x"', "training setting 'eps' must be a finite number > 0, got 'x'"),
    ("sft", 'lora_rank = 2\nlora_alpha = "x"', "'lora_alpha': LoRA alpha must be a finite number > 0"),
    ("dpo", 'label_smoothing = 0.1\nloss = "ipo"', "fine-tuning setting 'label_smoothing' applies to the sigmoid"),
    ("train", 'device = "bogus"', "training setting 'device': unknown device 'bogus'"),
    ("dpo", 'lora_base_dtype = "int8"', "fine-tuning setting 'lora_base_dtype' applies to LoRA, but lora_rank is 0"),
    ("sft", "log_every = 0", "fine-tuning setting 'log_every' must be an integer in [1, 9223372036854775807], got 0"),
    ("train", f"grad_accum = {2**63}", f"training setting 'grad_accum' must be an integer in [1, {2**63 - 1}], got"),
])
def test_a_config_files_bad_value_names_the_file_and_key(command, toml, said, tmp_path, monkeypatch, capsys):
    """The values the flags refuse as usage errors (exit 2), given in a config file: the file's error (exit 1),
    naming the file and the key and no flag, nothing read or written (m, d: none here)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.toml").write_text(toml + "\n")
    code, line = _code([command, "c.toml", "--data", "d", "--out", "o", *(["--model", "m"] if command != "train"
                                                                          else [])], capsys)
    assert code == 1 and line.startswith(f"mixlab {command}: error: c.toml: ") and said in line, line
    assert "(--" not in line and sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


@pytest.mark.parametrize("command", ["train", "sft"])
def test_a_config_file_that_cannot_be_read_is_the_file_s_however_it_is_named(command, tmp_path, monkeypatch, capsys):
    """A config file not there, or not TOML, is the file's error (exit 1) whatever the path's spelling: it was
    told from a flag's by the message starting with the path as given, so `./c.toml` (said as c.toml) was a
    usage error (exit 2). A folder in its place (`mixlab train data/corpus`, the dataset given as the config)
    was "Is a directory"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.toml").write_text("lr = \n")
    (tmp_path / "corpus").mkdir()
    model, what = ([], "training") if command == "train" else (["--model", "m"], "fine-tuning")
    for path, said in (("./nope.toml", f"nope.toml: {what} config file not found"),
                       ("./bad.toml", "bad.toml: not valid TOML"),
                       ("corpus", f"corpus: a folder, not a {what} config file (.toml or .json), which the command's "
                                  "first argument names; a dataset or model folder goes to --data or --model")):
        code, line = _code([command, path, "--data", "d", "--out", "o", *model], capsys)
        assert code == 1 and f"error: {said}" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml", "corpus"]


@pytest.mark.parametrize("command,toml,flags,said", [
    ("dpo", "beta = 0.5", ["--beta", "0"], "fine-tuning setting 'beta' (--beta) must be a finite number > 0, got 0.0"),
    ("sft", "lora_rank = 2", ["--lora-alpha", "0"], "fine-tuning setting 'lora_alpha' (--lora-alpha): LoRA alpha"),
    ("train", "lr = 0.001", ["--device", "bogus"], "training setting 'device' (--device): unknown device 'bogus'"),
])
def test_a_bad_flag_over_a_good_config_file_is_the_flag_s(command, toml, flags, said, tmp_path, monkeypatch, capsys):
    """A flag's value the command refuses is a usage error (exit 2) with a config file too, not blamed on it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.toml").write_text(toml + "\n")
    model = ["--model", "m"] if command != "train" else []
    code, line = _code([command, "c.toml", "--data", "d", "--out", "o", *model, *flags], capsys)
    assert code == 2 and "c.toml" not in line and said in line, line


def test_an_error_is_the_flag_s_or_the_file_s_by_which_set_its_setting(tmp_path, monkeypatch, capsys):
    """Whose error a refused setting is comes from where its value came from, as the file and the flags are
    read (it was decided by checking again without the file, then without the flags): a value the file and
    a flag both give is the flag's; so is a check naming a flag's setting whose other half the file set
    (--freeze-router over the file's router target); a flag's value the file's model refuses is the command
    line's (--seq-len 512 past the model's context; seq_len's default is lowered to it instead)."""
    monkeypatch.chdir(tmp_path)
    short = _tiny(tmp_path / "short", vocab=512, max_seq_len=256)
    (tmp_path / "chat.jsonl").write_text(json.dumps({"prompt": "hi", "completion": "there"}) + "\n")
    for command, toml, flags, said in (
            ("dpo", "beta = 0.0", ["--beta", "0", "--model", "m"],
             "fine-tuning setting 'beta' (--beta) must be a finite number > 0"),
            ("train", 'device = "bogus"', ["--device", "bogus"], "training setting 'device' (--device): unknown"),
            ("sft", 'lora_rank = 2\nlora_targets = "router"', ["--freeze-router", "--model", "m"],
             "fine-tuning setting 'freeze_router' (--freeze-router) keeps the router fixed"),
            ("sft", f'model = "{short}"\ntokenizer = "bytes"', ["--seq-len", "512"],
             "error: seq_len 512 is beyond the model's context (max_seq_len 256); set --seq-len")):
        (tmp_path / "c.toml").write_text(toml + "\n")
        code, line = _code([command, "c.toml", "--data", "chat.jsonl", "--out", "o", *flags], capsys)
        assert code == 2 and said in line, line
    assert not (tmp_path / "o").exists()


def _run(args: list[str], timeout: float = 120, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-m", "mixlab", *args], capture_output=True, timeout=timeout, env=env,
                          input=stdin)


@pytest.mark.parametrize("command", ["info", "generate"])
def test_a_fifo_named_model_safetensors_is_refused_not_waited_on(tmp_path, base, command):
    m = _copy(base, tmp_path / "m")
    (m / "model.safetensors").unlink()
    os.mkfifo(m / "model.safetensors")
    args = ["info", str(m)] if command == "info" else ["generate", "--model", str(m), "--prompt", "hi"]
    r = _run(args, timeout=60)  # a hang fails here (TimeoutExpired)
    assert r.returncode == 1 and b"not a regular file" in r.stderr and b"Traceback" not in r.stderr


def test_real_exit_codes_of_a_few_cases(tmp_path, base, chat_model):
    r = _run(["generate", "--model", str(chat_model), "--prompt", os.fsdecode(b"\xff\xfe")])
    assert r.returncode == 1 and b"not valid UTF-8" in r.stderr and b"Traceback" not in r.stderr
    r = _run(["convert", str(base), str(base.parent)])
    assert r.returncode == 1 and b"contains the source" in r.stderr


def test_a_closed_pipe_ends_quietly():
    """`mixlab plan ... | head -1`: the reader leaves; no 'error: Broken pipe' (it printed one)."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    p = subprocess.Popen([sys.executable, "-m", "mixlab", "plan", "mixtral-8x7b", "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # before the command writes a byte
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141 and err == b"", err


def test_chat_rejects_a_bad_line_and_keeps_the_conversation(chat_model):
    stdin = b"hello\n\xff\xfe bad\n/exit\n"
    r = _run(["chat", "--model", str(chat_model), "--max-new-tokens", "2", "--temperature", "0"], stdin=stdin)
    assert r.returncode == 0, r.stderr
    assert b"not valid UTF-8" in r.stderr and b"conversation is kept" in r.stderr and b"Traceback" not in r.stderr


def test_threads_beyond_the_cpu_count_are_bounded_with_a_warning(chat_model, capsys):
    old = torch.get_num_threads()
    try:
        assert main(["generate", "--model", str(chat_model), "--prompt", "hi", "--max-new-tokens", "2",
                     "--threads", "10000"]) == 0
        assert torch.get_num_threads() <= (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(old)
    assert "more than the" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "sft"])
def test_training_threads_beyond_the_cpu_count_are_bounded_with_a_warning(command, dataset, chat_model, tmp_path,
                                                                           monkeypatch, capsys):
    """train/sft --threads 99999 crashed the process in torch.set_num_threads (SIGSEGV, no message);
    2**63 - 1 said 'error: Overflow when unpacking long'. They are bounded as generate's are."""
    asked: list[int] = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (asked.append(n), real(min(n, os.cpu_count() or 1))))
    argv = (_train_args(dataset, tmp_path / "run", "--steps", "1") if command == "train" else
            ["sft", "--model", str(chat_model), "--data", str(_chat_jsonl(tmp_path)), "--out", str(tmp_path / "run"),
             "--steps", "1", "--seq-len", "32", "--valid-fraction", "0", "--threads", "1"])
    argv[argv.index("--threads") + 1] = "99999"
    assert main(argv) == 0
    assert asked and max(asked) <= (os.cpu_count() or 1), asked
    assert f"mixlab {command}: warning: threads 99999 is more than the" in capsys.readouterr().err


def test_torn_last_line_of_metrics_does_not_block_resume(dataset, tmp_path):
    out = tmp_path / "run"
    args = _train_args(dataset, out, "--steps", "4", "--ckpt-every", "2", "--warmup", "0")
    assert main(args) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # killed mid-write
    assert main([*args, "--resume"]) == 0
    assert all(json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines())


def test_skip_nonfinite_skips_bad_steps(dataset, tmp_path, capsys):
    from mixlab.train.loop import load_train_config, train

    cfg = load_train_config(None, data=str(dataset), out=str(tmp_path / "run"), steps=3, seq_len=16, batch_size=2,
                            eval_every=0, ckpt_every=0, log_every=1, threads=1, lr=1e10, warmup=0,
                            skip_nonfinite=True, progress=False, tensorboard=False, export_hf=False,
                            model_overrides={"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
                                             "head_dim": 16, "ffn_dim": 32})
    result = train(cfg)
    assert result.step == 3 and any(r.get("skipped") for r in result.history)


# -- the Python API raises mixlab's own types -------------------------------------------------


def test_python_api_raises_mixlab_errors(tmp_path, base, chat_model):
    from mixlab.generate import generate
    from mixlab.tokenizer import load_tokenizer
    from mixlab.train.data import Document, prepare

    with pytest.raises(ConfigError, match="rope_theta.*'abc'"):
        ModelConfig.from_hf_dict({**json.loads((base / "config.json").read_text()), "rope_theta": "abc",
                                  "rope_parameters": None},
                                 source="config.json")
    with pytest.raises(CheckpointError, match="1000000 layers"):
        load_model(_edit_config(_copy(base, tmp_path / "deep"), num_hidden_layers=1_000_000))
    with pytest.raises(ValueError, match="meta"):
        load_model(base, device="meta")
    model = load_model(base)
    with pytest.raises(ValueError, match="bytes are not accepted"):
        generate(model, [[1, 5]], max_new_tokens=2, stop=b"x")
    with pytest.raises(MixlabError, match="not valid UTF-8"):
        load_tokenizer().encode("a\ud800")
    with pytest.raises(DataError, match="valid_fraction"):
        prepare([Document("d", "", "text", "x")], tmp_path / "ds", valid_fraction=2)
    with pytest.warns(UserWarning, match=r"o_proj.weight' holds NaN"):
        nan_model = load_model(_nan_copy(base, tmp_path / "nan"))
    with pytest.raises(GenerationError, match="NaN logits"):
        generate(nan_model, [[1, 5]], max_new_tokens=2)
    assert all(issubclass(e, MixlabError) for e in (ConfigError, CheckpointError, DataError, GenerationError))


def test_a_path_that_is_not_a_path_is_named():
    # pathlib's "expected str, bytes or os.PathLike object, not int" named no parameter
    from mixlab.tokenizer import load_tokenizer

    with pytest.raises(ValueError, match=r"^load_model's path must be a str or pathlib.Path, not int$"):
        load_model(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^save_model's path must be a str or pathlib.Path, not int$"):
        save_model(Transformer(get_preset("tiny-moe")), 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^load_tokenizer's path must be a str or pathlib.Path, not list$"):
        load_tokenizer(["tokenizer.model"])  # type: ignore[arg-type]


def test_a_model_trained_with_the_bytes_tokenizer_generates_and_chats(dataset, tmp_path, capsys, monkeypatch):
    import io

    out = tmp_path / "run"
    assert main(_train_args(dataset, out, "--steps", "2", "--warmup", "0")) == 0
    assert (out / "hf" / "mixlab_data.json").is_file()
    capsys.readouterr()
    assert main(["generate", "--model", str(out / "hf"), "--prompt", "The cat", "--max-new-tokens", "3"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    assert main(["chat", "--model", str(out / "hf"), "--max-new-tokens", "3"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_info_and_plan_of_a_checkpoints_file_or_a_preset_typo(tmp_path, base, capsys):
    """`mixlab info DIR/model.safetensors` said "'...' is neither a checkpoint folder, a GGUF file nor
    a preset" of a file that is there; a preset typo listed the presets without the one meant."""
    for args in (["info", str(base / "config.json")],
                 ["plan", str(base / "model.safetensors"), "--mode", "infer", "--devices", "1", "--device-mem", "8GB"]):
        assert main(args) == 1
        assert "a file, not a checkpoint folder: pass the folder holding it" in capsys.readouterr().err
    assert main(["info", "mixtral-8x7"]) == 1
    assert "nor a preset (did you mean 'mixtral-8x7b'?); presets: " in capsys.readouterr().err


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["chat"], ["eval", "--data", "notes.txt"]])
def test_a_missing_tokenizer_is_told_before_the_model_loads(tmp_path, base, command, capsys, monkeypatch):
    """--tokenizer with a typo was found only after the whole model had loaded (minutes for a big one)."""
    import mixlab.checkpoint

    monkeypatch.setattr(mixlab.checkpoint, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("The cat sat on the mat.")
    assert main([command[0], "--model", str(base), "--tokenizer", "tokenizr.model", *command[1:]]) == 1
    assert "tokenizr.model: no such tokenizer file" in capsys.readouterr().err


def test_save_model_to_a_gguf_name_names_write_gguf(tmp_path):
    """save_model(model, "x.gguf") wrote a transformers folder named x.gguf; fmt="gguf" listed the
    formats without saying where GGUF is written."""
    model = Transformer(get_preset("tiny-moe"))
    for kw in ({}, {"fmt": "gguf"}):
        with pytest.raises(ValueError, match=r"mixlab.checkpoint.gguf.write_gguf\(model, 'x.gguf'"):
            save_model(model, tmp_path / "x.gguf", **kw)
    assert not (tmp_path / "x.gguf").exists()
    save_model(model, tmp_path / "x.gguf", fmt="hf")  # asked for by name: a folder (convert --to hf)
    assert (tmp_path / "x.gguf" / "config.json").is_file()


def test_a_hugging_face_repo_id_says_how_to_download_it(tmp_path, capsys, monkeypatch):
    """`--model mistralai/Mixtral-8x7B-v0.1` (as transformers takes it) said only 'no such checkpoint folder'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    repo = "mistralai/Mixtral-8x7B-v0.1"
    hint = f"a Hugging Face repo id? mixlab reads local folders: `hf download {repo} --local-dir DIR`"
    for args in (["generate", "--model", repo, "--prompt", "x"], ["info", repo],
                 ["upcycle", "--from", repo, "--out", "u"],
                 ["sft", "--model", repo, "--data", "c.jsonl", "--out", "o"]):
        assert main(args) == 1
        assert hint in capsys.readouterr().err, args
    assert main(["generate", "--model", "runs/typo", "--prompt", "x"]) == 1  # a local folder's typo: no hint
    assert capsys.readouterr().err.endswith("runs/typo: no such checkpoint folder\n")


def test_a_resume_refusal_shows_a_float_setting_one_way():
    """A checkpoint saved with `lora_alpha = 8` (a TOML integer) resumed with --lora-alpha 16 said
    "lora_alpha: checkpoint 8 vs now 16.0": the same setting, printed two ways."""
    import dataclasses

    from mixlab.train.settings import check_resume_settings

    @dataclasses.dataclass
    class Cfg:
        lora_alpha: float = 16.0
        seq_len: int = 64

    with pytest.raises(CheckpointError, match=r"\(lora_alpha: checkpoint 8\.0 vs now 16\.0, seq_len: checkpoint 32 "
                                              r"vs now 64\)"):
        check_resume_settings({"lora_alpha": 8, "seq_len": 32}, Cfg(), run_only=set(), ckpt=Path("c"), what="x")
    with pytest.raises(CheckpointError, match=r"\(lora_alpha: checkpoint 8\.0 vs now 16\.0\)"):
        check_resume_settings({"lora_alpha": 8.0, "seq_len": 64}, Cfg(lora_alpha=16), run_only=set(), ckpt=Path("c"),
                              what="x")


def test_info_of_a_missing_path_or_a_fifo(tmp_path, capsys):
    """`mixlab info missing.gguf` (or dir/missing) said "neither a checkpoint folder, a GGUF file nor a preset"
    of what is a path; a FIFO named x.gguf was "a file, not a checkpoint folder", and `generate` said
    "no such GGUF file" of it, while it is there."""
    for spec in ("missing.gguf", str(tmp_path / "missing")):
        assert main(["info", spec]) == 1
        err = capsys.readouterr().err
        assert f"{spec}: no such file or folder" in err and "preset" not in err, err
    fifo = tmp_path / "x.gguf"
    os.mkfifo(fifo)
    assert main(["info", str(fifo)]) == 1
    assert f"{fifo}: not a regular file (a FIFO, a device or a socket)" in capsys.readouterr().err
    from mixlab.checkpoint.gguf_read import read_header

    with pytest.raises(CheckpointError, match=r"x\.gguf: not a regular file \(a FIFO, a device or a socket\)"):
        read_header(fifo)
    assert main(["generate", "--model", str(fifo), "--prompt", "hi"]) == 1
    assert "not a regular file" in capsys.readouterr().err
