"""The training loop: exact resume, crash-safe checkpoints, signals, bad input, export."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import hf_tokenizer_json, step_clock
from mixlab import atomic
from mixlab.checkpoint import CheckpointError, load_model
from mixlab.config import ConfigError
from mixlab.errors import DataError, OutputError
from mixlab.train import checkpoints
from mixlab.train.data import TokenDataset, prepare, read_documents
from mixlab.train.loop import (
    TrainConfig,
    build_model_config,
    eval_line,
    evaluate,
    load_train_config,
    lr_at,
    train,
)

TINY = {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "ffn_dim": 48,
        "max_seq_len": 64, "moe": {"num_experts": 4, "top_k": 2, "jitter": 0.1, "z_loss_coef": 0.001}}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for dom, make in (("code", lambda i: f"def f{i}(x):\n    return x * {i}\n"),
                      ("prose", lambda i: f"The {i}th cat sat on the mat and looked around. ")):
        (root / "src" / dom).mkdir(parents=True)
        for split, n in (("train", 40), ("valid", 4)):
            lines = [json.dumps({"text": make(i) * 4}) for i in range(n)]
            (root / "src" / dom / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare(read_documents([root / "src"]), root / "ds")
    return root / "ds"


def _cfg(dataset: Path, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(data=str(dataset), out=str(out), model="tiny-moe", model_overrides=TINY,
                                seq_len=32, batch_size=4, steps=6, warmup=2, lr=3e-3, eval_every=0,
                                ckpt_every=0, log_every=1, progress=False, tensorboard=False, export_hf=False,
                                deterministic=True, grad_accum=2, threads=1)
    base.update(kw)
    return load_train_config(None, **base)


def test_a_resume_naming_the_start_weights_otherwise_continues(dataset: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`--init-from base`, then `--resume` from another directory (or `./base`, an absolute path) was refused:
    "saved with different training settings (init_from: checkpoint 'base' vs now '../base')". The checkpoint
    keeps where init_from pointed; another folder is still refused."""
    import shutil

    train(_cfg(dataset, tmp_path / "gen", steps=1, export_hf=True))
    shutil.copytree(tmp_path / "gen" / "hf", tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    kw: dict[str, Any] = dict(steps=2, ckpt_every=1, init_from="base", model="bogus")
    train(_cfg(dataset, Path("run"), **kw), stop_after=1)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert train(_cfg(dataset, Path("../run"), **kw | {"init_from": "../base"}), resume=True).step == 2
    train(_cfg(dataset, Path("../run2"), **kw | {"init_from": "../base"}), stop_after=1)
    shutil.copytree(tmp_path / "base", tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"saved with different training settings \(init_from: checkpoint "
                                              r"'../base' vs now '../other'\)"):
        train(_cfg(dataset, Path("../run2"), **kw | {"init_from": "../other"}), resume=True)


def test_resume_is_exact(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = train(_cfg(dataset, tmp_path / "a"))
    first = train(_cfg(dataset, tmp_path / "b"), stop_after=3)
    assert first.step == 3 and [c.name for c in checkpoints.list_checkpoints(tmp_path / "b" / "checkpoints")] == \
        ["step_00000003"]
    hashed: list[str] = []  # checksum passes over a checkpoint (each reads every byte: minutes on a large run)
    verify = checkpoints.verify
    monkeypatch.setattr(checkpoints, "verify", lambda p: (hashed.append(Path(p).name), verify(p))[1])
    # Evaluations and checkpoints draw no random numbers: changing how often they run changes nothing.
    second = train(_cfg(dataset, tmp_path / "b", eval_every=2, eval_windows=2, ckpt_every=1), resume=True)
    assert hashed.count("step_00000003") == 1  # the resume hashes the checkpoint once
    assert second.step == 6 and len(second.evals) == 2
    losses_a = [r["loss"] for r in straight.history]
    losses_b = [r["loss"] for r in first.history + second.history]
    aux_b = [r["aux_loss"] for r in first.history + second.history]
    assert losses_a == losses_b  # bitwise equal, not approximately
    assert [r["aux_loss"] for r in straight.history] == aux_b
    for (n, p), (_, q) in zip(straight.model.named_parameters(), second.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    # The learning rate of every step, across the resume, by hand: warmup 2 then cosine from 3e-3 to 3e-4 over 4.
    hand = [3e-3 * (i + 1) / 2 for i in range(2)] + [3e-4 + 0.5 * 2.7e-3 * (1 + math.cos(math.pi * j / 4))
                                                     for j in range(4)]
    assert [r["lr"] for r in first.history + second.history] == pytest.approx(hand, rel=1e-12)
    # The final checkpoints too: AdamW's moments and step counts, the RNG state, the data position.
    from safetensors.torch import load_file

    a, b = (tmp_path / r / "checkpoints" / "step_00000006" for r in ("a", "b"))
    for f in ("optimizer.safetensors", "rng.safetensors"):
        ta, tb = load_file(str(a / f)), load_file(str(b / f))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f
    assert checkpoints.validate(a)["data_position"] == checkpoints.validate(b)["data_position"]
    # The metrics file of the resumed run has each step exactly once.
    recs = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in recs if "eval_loss" in r] == [4, 6]


def test_a_resume_purges_the_steps_it_redoes_from_tensorboard(dataset: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """metrics.jsonl drops the records after the checkpoint a run resumes from, but TensorBoard's event
    files kept them, so each redone step showed twice; the writer now purges them (purge_step).
    The writer is faked: the tensorboard package is optional."""
    import types

    made: list[dict[str, Any]] = []

    class Writer:
        def __init__(self, logdir: str, **kw: Any) -> None:
            made.append(kw)

        def add_scalar(self, *a: Any) -> None:
            pass

        def close(self) -> None:
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    train(_cfg(dataset, tmp_path, steps=4, tensorboard=True), stop_after=2)
    train(_cfg(dataset, tmp_path, steps=4, tensorboard=True), resume=True)
    assert [kw.get("purge_step") for kw in made] == [None, 3]


def test_grad_accum_equals_one_large_batch(dataset: Path, tmp_path: Path) -> None:
    """2 micro-batches of 2 windows = one batch of 4: the same cross-entropy, z-loss and gradient
    (norm). The load-balancing loss is computed per micro-batch, then averaged (docs/training.md):
    off for the gradient comparison, and its logged value is not the large batch's."""
    moe = {**TINY["moe"], "jitter": 0.0, "aux_loss_coef": 0.0}
    runs = [train(_cfg(dataset, tmp_path / str(k), model_overrides={**TINY, "moe": moe}, steps=3, batch_size=4 // k,
                       grad_accum=k, clip=0.0)).history for k in (1, 2)]
    for key in ("loss", "z_loss", "grad_norm"):
        torch.testing.assert_close([r[key] for r in runs[1]], [r[key] for r in runs[0]], rtol=1e-6, atol=0, msg=key)
    assert runs[1][0]["aux_loss"] != runs[0][0]["aux_loss"]


def test_checkpoints_keep_last_k_and_export(dataset: Path, tmp_path: Path) -> None:
    res = train(_cfg(dataset, tmp_path, ckpt_every=1, keep=2, export_hf=True, eval_every=3, deterministic=False))
    names = [c.name for c in checkpoints.list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step_00000005", "step_00000006"]
    assert {"arxiv"}.isdisjoint(res.evals[-1]["loss"]) and set(res.evals[-1]["loss"]) == {"code", "prose"}
    assert len(res.evals[-1]["load"]["code"]) == 2  # [L, E] per domain
    # Each evaluation's record has bits per byte next to the loss, overall and per domain.
    recs = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ev_recs = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in ev_recs] == [3, 6]
    assert ev_recs[-1]["eval_bpb"] == res.evals[-1]["mean_bpb"] > 0
    assert set(ev_recs[-1]["eval_domain_bpb"]) == {"code", "prose"}
    # The transformers-format export loads back into the same function.
    m = load_model(tmp_path / "hf")
    x = torch.randint(0, 259, (1, 16))
    res.model.eval()
    torch.testing.assert_close(m(x), res.model(x), rtol=0, atol=0)
    assert json.loads((tmp_path / "hf" / "mixlab_data.json").read_text())["tokenizer"]["type"] == "bytes"


def test_convert_and_info_read_training_checkpoints(dataset: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`mixlab convert RUN/checkpoints/step_* OUT` (and `info`) said 'no config.json ... found': a
    checkpoint is now written as the run's export would be (weights and mixlab_data.json, the tokenizer
    generate reads), a run folder as --init-from reads it (its hf/, else its newest checkpoint)."""
    from mixlab.cli import main

    train(_cfg(dataset, tmp_path / "r", steps=2, ckpt_every=1, export_hf=True))
    step = tmp_path / "r" / "checkpoints" / "step_00000002"
    assert main(["convert", str(step), str(tmp_path / "out"), "--quiet"]) == 0
    for f in ("model.safetensors", "mixlab_data.json", "config.json"):  # the final export's bytes, file for file
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "r" / "hf" / f).read_bytes(), f
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in (tmp_path / "r/hf").iterdir())
    assert main(["info", str(step)]) == 0
    assert "stored:            training checkpoint of step 2: 3 files" in capsys.readouterr().out
    opt = step / "optimizer.safetensors"  # info reads headers, as for a model folder; convert every byte
    data = bytearray(opt.read_bytes())
    data[-1] ^= 1
    opt.write_bytes(bytes(data))
    assert main(["info", str(step)]) == 0
    assert main(["convert", str(step), str(tmp_path / "out3"), "--quiet"]) == 1
    assert "optimizer.safetensors" in capsys.readouterr().err
    data[-1] ^= 1
    opt.write_bytes(bytes(data))
    (tmp_path / "r" / "hf" / "config.json").unlink()  # a run stopped before its export: its newest checkpoint
    (tmp_path / "r" / "hf" / "model.safetensors").unlink()
    assert main(["convert", str(tmp_path / "r"), str(tmp_path / "out2"), "--quiet"]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'out2'} (hf, from {step})\n"
    assert (tmp_path / "out2/model.safetensors").read_bytes() == (tmp_path / "out/model.safetensors").read_bytes()
    # Commands that load a model name the folder to convert, in one line.
    assert main(["generate", "--model", str(step), "--prompt", "x"]) == 1
    assert f"(a training checkpoint: `mixlab convert {step} OUT` writes its model" in capsys.readouterr().err


def test_gguf_of_a_trained_model_carries_its_sentencepiece_vocabulary(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`mixlab convert RUN/hf x.gguf` (or a step) of a model trained on data prepared with a
    SentencePiece model of its own wrote Mixtral's vocabulary into the GGUF (llama.cpp then decoded its
    ids as other text); it now takes the file mixlab_data.json names. The bytes tokenizer has none: one
    line says so (it said Mixtral's 32000 pieces did not fit the model's 259)."""
    pytest.importorskip("gguf")
    import sentencepiece as spm

    from mixlab.checkpoint.gguf_read import read_header
    from mixlab.cli import main

    text = tmp_path / "text.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=64,
                                   model_type="bpe", minloglevel=2)
    (tmp_path / "src" / "code").mkdir(parents=True)
    (tmp_path / "src" / "code" / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"def g{i}(y):\n    return y - {i}\n" * 4}) + "\n" for i in range(30)))
    assert main(["data", "prepare", str(tmp_path / "src"), "--out", str(tmp_path / "ds"), "--tokenizer",
                 str(tmp_path / "sp.model"), "--quiet"]) == 0
    train(_cfg(tmp_path / "ds", tmp_path / "r", steps=1, ckpt_every=1, export_hf=True, seq_len=16,
               model_overrides={**TINY, "vocab_size": 64}))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    for src in (tmp_path / "r" / "hf", tmp_path / "r" / "checkpoints" / "step_00000001"):
        out = tmp_path / f"{src.name}.gguf"
        assert main(["convert", str(src), str(out), "--quant", "f32", "--quiet"]) == 0
        assert read_header(out).metadata["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(64)]
    # a folder whose only tokenizer is a Mistral-style tokenizer.model.v3 (Mistral 7B v0.3's): that one,
    # not Mixtral's v1 (which it got)
    shutil.copytree(tmp_path / "r" / "hf", tmp_path / "v3")
    (tmp_path / "v3" / "mixlab_data.json").unlink()
    shutil.copy(tmp_path / "sp.model", tmp_path / "v3" / "tokenizer.model.v3")
    assert main(["convert", str(tmp_path / "v3"), str(tmp_path / "v3.gguf"), "--quant", "f32", "--quiet"]) == 0
    assert read_header(tmp_path / "v3.gguf").metadata["tokenizer.ggml.tokens"] == [sp.id_to_piece(i)
                                                                                   for i in range(64)]
    # the tokenizer mixlab_data.json names, gone (another machine): named, not replaced by Mixtral's
    (tmp_path / "sp.model").rename(tmp_path / "elsewhere.model")
    assert main(["convert", str(tmp_path / "r" / "hf"), str(tmp_path / "gone.gguf"), "--quiet"]) == 1
    assert f"the model's tokenizer, {tmp_path / 'sp.model'}, is not there" in capsys.readouterr().err
    bytes_run = tmp_path / "b"
    train(_cfg(tmp_path / "ds", bytes_run, steps=1, export_hf=True, seq_len=16, model_overrides=TINY))
    (bytes_run / "hf" / "mixlab_data.json").write_text(json.dumps({"tokenizer": {"type": "bytes"}}))
    assert main(["convert", str(bytes_run / "hf"), str(tmp_path / "b.gguf"), "--quiet"]) == 1


def test_a_valid_split_too_short_for_one_window_warns_instead_of_reporting_a_zero_loss(tmp_path: Path) -> None:
    """A valid split shorter than seq_len + 1 tokens in every domain has no window: each evaluation
    reported 'valid loss 0.0000 (ppl 1.00)' and wrote eval_loss 0.0 to metrics.jsonl."""
    (tmp_path / "src" / "prose").mkdir(parents=True)
    (tmp_path / "src" / "prose" / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"The {i}th cat sat on the mat. " * 4}) + "\n" for i in range(20)))
    (tmp_path / "src" / "prose" / "valid.jsonl").write_text(json.dumps({"text": "Short."}) + "\n")
    prepare(read_documents([tmp_path / "src"]), tmp_path / "ds")
    with pytest.warns(UserWarning, match=r"the 'valid' split has no window of 33 tokens, so there is no validation"):
        res = train(_cfg(tmp_path / "ds", tmp_path / "run", steps=2, eval_every=1))
    assert res.step == 2 and res.evals == []
    assert not [ln for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in ln]
    # too short in one domain of two: it was left out of every evaluation, and of its mean, without a word
    (tmp_path / "src" / "code").mkdir()
    (tmp_path / "src" / "code" / "train.jsonl").write_text(json.dumps({"text": "x = 1\n" * 40}) + "\n")
    (tmp_path / "src" / "code" / "valid.jsonl").write_text(json.dumps({"text": "y = 2\n" * 20}) + "\n")
    prepare(read_documents([tmp_path / "src"]), tmp_path / "ds", overwrite=True)
    with pytest.warns(UserWarning, match=r"the 'valid' split of prose has no window of 33 tokens, so the validation "
                                         r"loss leaves them out"):
        res = train(_cfg(tmp_path / "ds", tmp_path / "run2", steps=1, eval_every=1))
    assert [list(ev["loss"]) for ev in res.evals] == [["code"]]


def test_a_domain_too_short_for_one_training_window_warns(tmp_path: Path) -> None:
    """A domain whose train split is shorter than seq_len + 1 tokens (one tiny file) has no training
    window: the run trained on the other domains alone and said nothing, though it warns for valid."""
    for dom, text in (("prose", "The cat sat on the mat. " * 20), ("tiny", "hi")):
        (tmp_path / "src" / dom).mkdir(parents=True)
        (tmp_path / "src" / dom / "train.jsonl").write_text(json.dumps({"text": text}) + "\n")
        (tmp_path / "src" / dom / "valid.jsonl").write_text(json.dumps({"text": text}) + "\n")
    prepare(read_documents([tmp_path / "src"]), tmp_path / "ds")
    with pytest.warns(UserWarning, match=r"the 'train' split of tiny has no window of 33 tokens, so the run never "
                                         r"trains on them"):
        res = train(_cfg(tmp_path / "ds", tmp_path / "run", steps=1, eval_every=0))
    assert res.step == 1


def test_sigterm_saves_and_resume_continues(dataset: Path, tmp_path: Path) -> None:
    def kill_at_2(rec: dict[str, Any]) -> None:
        if rec["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    res = train(_cfg(dataset, tmp_path, steps=5), on_step=kill_at_2)
    assert res.stopped_by == signal.SIGTERM and res.step == 2
    assert checkpoints.list_checkpoints(tmp_path / "checkpoints")[-1].name == "step_00000002"
    assert train(_cfg(dataset, tmp_path, steps=5), resume=True).step == 5


def test_cli_train_stopped_by_a_signal_says_so_on_stderr(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`mixlab train` printed "stopped by SIGINT ..." on stdout, among the results (demo, and the
    interrupted message of every command, print it on stderr)."""
    import mixlab.train.loop as loop
    from mixlab.cli import main

    real = loop.train
    monkeypatch.setattr(loop, "train", lambda cfg, **kw: real(cfg, on_step=lambda rec: signal.raise_signal(
        signal.SIGINT), **kw))
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "r"), "--steps", "3", "--seq-len", "16",
                 "--batch-size", "2", "--set", "dim=32", "--set", "n_layers=1", "--quiet"]) == 130
    out, err = capsys.readouterr()
    assert out == "" and err == "stopped by SIGINT at step 1; checkpoint saved; continue with --resume\n"


def test_a_signal_at_the_last_step_still_finishes_the_run(dataset: Path, tmp_path: Path) -> None:
    """Ctrl-C during the last step or the final export: the run is complete (and exported), so it is
    not reported as stopped (the CLI said "continue with --resume" about a finished run)."""
    def kill_at_3(rec: dict[str, Any]) -> None:
        if rec["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    res = train(_cfg(dataset, tmp_path, steps=3, export_hf=True), on_step=kill_at_3)
    assert res.step == 3 and res.stopped_by is None
    assert (tmp_path / "hf" / "mixlab_data.json").exists()


def test_auto_resume_starts_then_continues(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`--auto-resume`: the same command, rerun as it is (torchrun --max-restarts, a scheduler's
    requeue), starts a run the first time and continues it from its newest checkpoint after that,
    as `--resume` would (which refuses to start one), and reaches the weights of a run never stopped."""
    from mixlab.cli import main

    args = ["train", "--data", str(dataset), "--seq-len", "16", "--batch-size", "2", "--steps", "4", "--threads", "1",
            "--eval-every", "0", "--log-every", "1", "--set", "dim=32", "--set", "n_layers=1", "--deterministic",
            "--quiet"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    import mixlab.train.loop as loop

    real = loop.train
    monkeypatch.setattr(loop, "train", lambda cfg, **kw: real(cfg, stop_after=2, **kw))
    assert main([*args, "--out", str(tmp_path / "r"), "--auto-resume"]) == 0  # starts: nothing to resume
    assert [c.name for c in checkpoints.list_checkpoints(tmp_path / "r" / "checkpoints")] == ["step_00000002"]
    monkeypatch.setattr(loop, "train", real)
    assert main([*args, "--out", str(tmp_path / "r"), "--auto-resume"]) == 0  # continues from step 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == [1, 2, 3, 4]
    a, b = (load_model(tmp_path / r / "hf") for r in ("straight", "r"))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    capsys.readouterr()
    with pytest.raises(SystemExit):  # one or the other
        main([*args, "--out", str(tmp_path / "r"), "--resume", "--auto-resume"])
    assert "--auto-resume: not allowed with argument --resume" in capsys.readouterr().err
    with pytest.raises(ValueError, match="invalid resume='yes': expected True, False or 'auto'"):
        train(_cfg(dataset, tmp_path / "x"), resume="yes")


def test_bad_resume_states_are_clear_errors(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        train(_cfg(dataset, tmp_path), resume=True)
    train(_cfg(dataset, tmp_path), stop_after=2)
    with pytest.raises(CheckpointError, match="already holds checkpoints; pass --resume"):
        train(_cfg(dataset, tmp_path))
    with pytest.raises(CheckpointError, match="different training settings.*lr"):
        train(_cfg(dataset, tmp_path, lr=1e-2), resume=True)
    with pytest.raises(CheckpointError, match="different model config.*hidden_size"):
        train(_cfg(dataset, tmp_path, model_overrides={**TINY, "dim": 64}), resume=True)
    # A damaged newest checkpoint is refused, never skipped silently.
    train(_cfg(dataset, tmp_path), resume=True, stop_after=3)
    (tmp_path / "checkpoints" / "step_00000003" / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"step_00000003: incomplete checkpoint .*remove it to resume from "
                                              "step_00000002"):
        train(_cfg(dataset, tmp_path), resume=True)


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(dataset: Path, tmp_path: Path) -> None:
    # Two runs into one --out interleaved their checkpoints and metrics (both "succeeded").
    with atomic.exclusive(tmp_path / "run", what="run folder"):  # as a run in another process holds it
        with pytest.raises(OutputError, match="run: another process is writing this run folder now"):
            train(_cfg(dataset, tmp_path / "run"))
        assert list((tmp_path / "run").iterdir()) == []
    assert train(_cfg(dataset, tmp_path / "run", steps=1)).step == 1  # released: the run goes ahead
    # A run refused before it wrote anything leaves no folder it made.
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        train(_cfg(dataset, tmp_path / "new"), resume=True)
    assert not (tmp_path / "new").exists()


def test_a_checkpoint_from_before_a_setting_existed_resumes(dataset: Path, tmp_path: Path) -> None:
    # A checkpoint written before `data_offset` and `init_from` existed lacks them: their defaults
    # are what that run used, so it resumes; a real change of either is still refused.
    train(_cfg(dataset, tmp_path), stop_after=2)
    state_file = tmp_path / "checkpoints" / "step_00000002" / "state.json"
    state = json.loads(state_file.read_text())
    for k in ("data_offset", "init_from"):
        del state["train_config"][k]
    state_file.write_text(json.dumps(state))
    atomic.write_manifest(state_file.parent, kind=atomic.read_manifest(state_file.parent)["kind"], checksums=True)
    with pytest.raises(CheckpointError, match="different training settings.*data_offset: checkpoint None vs now 5"):
        train(_cfg(dataset, tmp_path, data_offset=5), resume=True)
    assert train(_cfg(dataset, tmp_path), resume=True).step == 6


def test_a_checkpoint_with_the_expert_names_before_the_experts_module_resumes_exactly(dataset: Path,
                                                                                     tmp_path: Path) -> None:
    # Round-1 checkpoints named the expert weights `layers.{i}.ffn.w13` (now `.ffn.experts.w13`).
    from safetensors.torch import load_file, save_file

    straight = train(_cfg(dataset, tmp_path / "a"))
    train(_cfg(dataset, tmp_path / "b"), stop_after=3)
    ckpt = tmp_path / "b" / "checkpoints" / "step_00000003"

    def old(n: str) -> str:
        return n.replace(".ffn.experts.", ".ffn.")

    save_file({old(n): w for n, w in load_file(ckpt / "model.safetensors").items()}, ckpt / "model.safetensors")
    opt = load_file(ckpt / "optimizer.safetensors")
    assert any(".ffn.experts.w13." in k for k in opt)
    save_file({old(k): v for k, v in opt.items()}, ckpt / "optimizer.safetensors")
    state = json.loads((ckpt / "state.json").read_text())
    info = state["optimizer"]
    info["param_names"] = [old(n) for n in info["param_names"]]
    info["scalars"] = {old(n): d for n, d in info["scalars"].items()}
    state["files"] = {f: (ckpt / f).stat().st_size for f in state["files"]}
    (ckpt / "state.json").write_text(json.dumps(state))
    atomic.write_manifest(ckpt, kind=atomic.read_manifest(ckpt)["kind"], checksums=True)
    resumed = train(_cfg(dataset, tmp_path / "b"), resume=True)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history[3:]]
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_bad_settings(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="beyond the model's context"):
        train(_cfg(dataset, tmp_path, seq_len=128))
    with pytest.raises(ConfigError, match="unknown training setting.*bogus"):
        load_train_config(None, bogus=1)
    f = tmp_path / "c.toml"
    f.write_text("steps = 3\nlr = 'fast'\n[broken\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_train_config(f)
    f.write_text("steps = 3\nseq_len = 16\n")
    assert load_train_config(f, seq_len=None, batch_size=2).seq_len == 16
    # a misspelled key: the file and the nearest setting are named (was 'unknown training setting(s):
    # sequence_len; known: ...'); a capitalised extension is still TOML (was read as JSON)
    f.write_text("sequence_len = 16\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(f))}: unknown training setting.*sequence_len "
                                          r"\(did you mean 'seq_len'\?\)"):
        load_train_config(f)
    # the layout's and resuming's options are flags, not settings (`ep` was told "did you mean 'eps'?")
    f.write_text("ep = 2\nresume = true\n")
    with pytest.raises(ConfigError, match=r"ep \(a command-line flag, not a setting: --ep\), "
                                          r"resume \(a command-line flag, not a setting: --resume\)"):
        load_train_config(f)
    (F := tmp_path / "C.TOML").write_text("steps = 3\n")
    assert load_train_config(F).steps == 3
    # `--set` (model_overrides from flags) changes the fields it names and keeps the file's others.
    f.write_text("[model_overrides]\ndim = 32\n[model_overrides.moe]\nnum_experts = 4\ntop_k = 1\n")
    assert load_train_config(f, model_overrides={"moe": {"jitter": 0.1}}).model_overrides == {
        "dim": 32, "moe": {"num_experts": 4, "top_k": 1, "jitter": 0.1}}
    from mixlab.train.data import TokenDataset
    from mixlab.train.loop import build_model_config

    for over, match in (({"dimm": 64}, "unknown model field.*dimm; known: vocab_size, dim"),
                        ({"moe": {"jiter": 0.1}}, "unknown model field.*moe.jiter; known: moe.num_experts"),
                        ({"moe": 3}, "'moe' must be a table"),
                        ({"moe": {"aux_loss_coef": "nan"}}, "'moe.aux_loss_coef' must be a finite number")):
        with pytest.raises(ConfigError, match=match):
            build_model_config(_cfg(dataset, tmp_path, model_overrides=over), TokenDataset(dataset))
    # a file as `model` (a checkpoint's model.safetensors, a GGUF) was an "unknown preset"
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match=r"setting 'model': .*m.gguf is a file; the model is a preset or a .*"
                                          r"`mixlab convert .*m.gguf DIR`"):
        build_model_config(_cfg(dataset, tmp_path, model=str(tmp_path / "m.gguf")), TokenDataset(dataset))
    f.write_text("model_overrides = 3\n")
    with pytest.raises(ConfigError, match="setting 'model_overrides' must be a table"):
        load_train_config(f)


# Every setting and default before OptimizerSettings held the optimizer's fields once for both configs:
# the TOML/JSON keys, flags and the settings checkpoints store (and compare on resume) are unchanged.
TRAIN_SETTINGS_BEFORE = {
    "data": "", "out": "runs/train", "model": "tiny-moe", "model_overrides": {}, "init_std": 0.02, "init_from": "",
    "seq_len": 256, "batch_size": 8, "grad_accum": 1, "seed": 0, "data_offset": 0, "steps": 1000, "lr": 0.001,
    "min_lr_ratio": 0.1, "warmup": 100, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-08, "clip": 1.0,
    "skip_nonfinite": False, "dtype": "float32", "device": "cpu", "threads": 0, "activation_checkpointing": False,
    "compile": False, "deterministic": False, "moe_impl": "auto", "eval_every": 200, "eval_windows": 16,
    "ckpt_every": 200, "keep": 3, "log_every": 10, "export_hf": True, "progress": True, "tensorboard": True}
FINETUNE_SETTINGS_BEFORE = {
    "task": "sft", "model": "", "data": "", "valid_data": "", "valid_fraction": 0.05, "max_examples": 0,
    "out": "runs/finetune", "tokenizer": "", "seq_len": 512, "batch_size": 8, "grad_accum": 1, "steps": 100,
    "lr": 1e-05, "min_lr_ratio": 0.1, "warmup": 10, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.95, "eps": 1e-08,
    "clip": 1.0, "seed": 0, "dtype": "float32", "device": "cpu", "threads": 0, "aux_loss_coef": None,
    "freeze_router": False, "beta": 0.1, "loss": "sigmoid", "reference_free": False, "label_smoothing": 0.0,
    "length_normalize": False, "lora_rank": 0, "lora_alpha": 16.0, "lora_dropout": 0.0,
    "lora_targets": "attention,experts", "lora_base_dtype": "float32", "eval_every": 50, "ckpt_every": 50, "keep": 2,
    "log_every": 10, "export_hf": True, "export_peft": True, "progress": True, "tensorboard": False}


def test_the_optimizer_settings_are_defined_once_and_the_surface_is_unchanged(tmp_path: Path) -> None:
    import dataclasses

    from mixlab.train.finetune import FinetuneConfig, load_finetune_config
    from mixlab.train.settings import OptimizerSettings

    assert dataclasses.asdict(TrainConfig()) == TRAIN_SETTINGS_BEFORE
    # export_hf None since: hf/ for full fine-tuning, for LoRA only when asked (as `mixlab sft` had it);
    # activation_checkpointing added since (a run's setting: off by default, may change on resume)
    assert dataclasses.asdict(FinetuneConfig()) == {**FINETUNE_SETTINGS_BEFORE, "export_hf": None,
                                                    "activation_checkpointing": False}
    shared = {f.name for f in dataclasses.fields(OptimizerSettings)}
    assert shared == {"steps", "lr", "min_lr_ratio", "warmup", "weight_decay", "beta1", "beta2", "eps", "clip"}
    for cls in (TrainConfig, FinetuneConfig):
        assert issubclass(cls, OptimizerSettings) and cls.lr_at is OptimizerSettings.lr_at
    # The same flat keys in a TOML file, for both.
    f = tmp_path / "c.toml"
    f.write_text("lr = 0.002\nbeta2 = 0.99\nwarmup = 3\nclip = 0.0\n")
    t, ft = load_train_config(f), load_finetune_config(f, model="m", data="d.jsonl")
    for c in (t, ft):
        assert (c.lr, c.beta2, c.warmup, c.clip, c.max_grad_norm) == (0.002, 0.99, 3, 0.0, math.inf)
    assert (t.weight_decay, ft.weight_decay, t.steps, ft.steps) == (0.1, 0.0, 1000, 100)


def test_a_checkpoint_written_before_the_shared_optimizer_settings_resumes(dataset: Path, tmp_path: Path) -> None:
    """Its train_config lists the fields in the old order (the optimizer's in the middle): resumed
    exactly as a run that never stopped; a changed optimizer setting is still refused."""
    straight = train(_cfg(dataset, tmp_path / "a", steps=4))
    train(_cfg(dataset, tmp_path / "b", steps=4), stop_after=2)
    state_file = tmp_path / "b" / "checkpoints" / "step_00000002" / "state.json"
    state = json.loads(state_file.read_text())
    state["train_config"] = {k: state["train_config"][k] for k in TRAIN_SETTINGS_BEFORE}
    state_file.write_text(json.dumps(state))
    atomic.write_manifest(state_file.parent, kind=atomic.read_manifest(state_file.parent)["kind"], checksums=True)
    with pytest.raises(CheckpointError, match="different training settings.*beta1: checkpoint 0.9 vs now 0.8"):
        train(_cfg(dataset, tmp_path / "b", steps=4, beta1=0.8), resume=True)
    resumed = train(_cfg(dataset, tmp_path / "b", steps=4), resume=True)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history[2:]]


@pytest.mark.parametrize(("kw", "match"), [
    ({"bogus": 1}, "unknown {} setting.*bogus"),
    ({"steps": 0}, "{} setting 'steps' must be an integer in \\[1, 9223372036854775807\\], got 0"),
    ({"log_every": 0}, "{} setting 'log_every' must be an integer in \\[1, "),  # a ZeroDivisionError at step 1
    ({"grad_accum": 2**64}, "{} setting 'grad_accum' must be an integer in \\[1, "),  # an OverflowError
    ({"dtype": "float16"}, "{} setting 'dtype' must be 'float32' or 'bfloat16'"),
    ({"lr": float("nan")}, "{} setting 'lr' must be a finite number >= 0"),
    ({"eps": 0.0}, "{} setting 'eps' must be a finite number > 0"),
    ({"warmup": 1.5}, "{} setting 'warmup' must be an integer"),
    ({"beta2": 1.5}, "{} setting 'beta2' must be at most 1"),
    ({"device": "meta"}, "{} setting 'device'"),
    ({"out": 5}, "{} setting 'out' must be a string, got 5"),  # TOML `out = 5`: not a TypeError mid-run
    ({"progress": "no"}, "{} setting 'progress' must be true or false, got 'no'"),  # not truthy
    ({"seq_len": True}, "{} setting 'seq_len' must be an integer in \\[1, 9223372036854775807\\], got True"),
])
def test_training_and_fine_tuning_check_their_settings_alike(kw: dict, match: str, tmp_path: Path) -> None:
    """One reader and checker (train/settings.py) behind both configs: the same error, naming the run kind;
    also for a config made in Python and passed to `train` / `finetune` (they ran unchecked: lr="3e-4"
    failed inside AdamW, dtype="float16" trained in float32)."""
    from mixlab.train.finetune import FinetuneConfig, finetune, load_finetune_config

    with pytest.raises(ConfigError, match=match.format("training")):
        load_train_config(None, **kw)
    with pytest.raises(ConfigError, match=match.format("fine-tuning")):
        load_finetune_config(None, model="m", data="d.jsonl", **kw)
    if "bogus" not in kw:
        with pytest.raises(ConfigError, match=match.format("training")):
            train(TrainConfig(**{"data": "d", "out": str(tmp_path / "t"), **kw}))
        with pytest.raises(ConfigError, match=match.format("fine-tuning")):
            finetune(FinetuneConfig(**{"model": "m", "data": "d.jsonl", "out": str(tmp_path / "f"), **kw}))
    f = tmp_path / "c.json"
    f.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a table / object of fine-tuning settings"):
        load_finetune_config(f)


@pytest.mark.parametrize(("text", "key"), [("lr = nan", "'lr'"), ("warmup = -5", "'warmup'"),
                                         ("threads = -3", "'threads'"), ('lr = "fast"', "'lr'")])
def test_a_bad_value_in_a_config_file_names_the_file(text: str, key: str, tmp_path: Path) -> None:
    """The file's error names the file and key (it named only the key, as for a flag); a flag's value
    overrides the file's, and a bad flag's value over a good file is not blamed on the file."""
    from mixlab.train.finetune import load_finetune_config

    f = tmp_path / "run.toml"
    f.write_text(text + "\n")
    name = key.strip("'")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(f))}: training setting {key} must be"):
        load_train_config(f)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(f))}: fine-tuning setting {key} must be"):
        load_finetune_config(f, model="m", data="d.jsonl")
    good = {"lr": 0.1, "warmup": 5, "threads": 1}[name]
    assert getattr(load_train_config(f, **{name: good}), name) == good
    # the file's bad value given as an override too is the override's (it was the file's: the file alone
    # fails the same way)
    with pytest.raises(ConfigError, match=f"^training setting {key}"):
        load_train_config(f, **tomllib.loads(text))
    f.write_text("steps = 10\n")
    with pytest.raises(ConfigError, match=f"^training setting {key}"):
        load_train_config(f, **{name: -1})
    # the file gives the model, a flag the bad value checked after the model is: not the file's either
    f.write_text('model = "m"\ndata = "d.jsonl"\n')
    with pytest.raises(ConfigError, match="^fine-tuning setting 'lora_alpha'"):
        load_finetune_config(f, lora_rank=8, lora_alpha=0.0)
    # nor a setting the file does not give (was "run.toml: no data: ...")
    f.write_text('model = "m"\n')
    with pytest.raises(ConfigError, match="^no data: pass --data"):
        load_finetune_config(f)


def test_a_failed_check_is_blamed_by_the_setting_its_error_carries(dataset: Path, tmp_path: Path) -> None:
    """Whose a failed check is, the config file's (a SettingsFileError naming it) or the command line's, is
    decided by the setting its ConfigError carries: it was read back out of the message (`setting 'x'`, else
    its first word), so a check whose message names no setting first was blamed by a word of its text."""
    from mixlab.errors import SettingsFileError
    from mixlab.train.loop import build_model_config

    f = tmp_path / "run.toml"
    f.write_text('seq_len = 64\nlr = "fast"\n')
    with pytest.raises(SettingsFileError, match=f"^{re.escape(str(f))}: training setting 'lr' must be") as e:
        load_train_config(f)
    assert e.value.setting == "lr"
    with pytest.raises(ConfigError, match="^training setting 'lr' must be") as e:  # the override's: as it is
        load_train_config(f, lr=-1.0)
    assert e.value.setting == "lr" and not isinstance(e.value, SettingsFileError)

    def too_long(cfg: Any) -> None:  # a caller's check whose message names another setting first
        raise ConfigError("training setting 'lr' is too large for so long a seq_len", setting="seq_len")

    f.write_text("seq_len = 64\n")
    with pytest.raises(SettingsFileError, match=f"^{re.escape(str(f))}: training setting 'lr' is too large") as e:
        load_train_config(f, then=too_long)
    assert e.value.setting == "seq_len"
    with pytest.raises(ConfigError, match="^training setting 'lr' is too large") as e:  # --seq-len's
        load_train_config(f, then=too_long, seq_len=32)
    assert not isinstance(e.value, SettingsFileError)
    # the checks say which setting: a model field out of range is model_overrides', a context too short seq_len's
    for over, setting in (({"moe": {"top_k": 99}}, "model_overrides"), ({"dimm": 1}, "model_overrides"),
                          ({"max_seq_len": 8}, "seq_len")):
        with pytest.raises(ConfigError) as e:
            build_model_config(_cfg(dataset, tmp_path, model_overrides={**TINY, **over}), TokenDataset(dataset))
        assert e.value.setting == setting, e.value


def test_a_train_config_made_in_python_may_name_paths(dataset: Path, tmp_path: Path) -> None:
    # A Path for data or out trained, then failed storing the settings ("Object of type PosixPath is not
    # JSON serializable"); a str config was an AttributeError.
    cfg = _cfg(dataset, tmp_path / "a", steps=2, grad_accum=1, ckpt_every=1)
    res = train(dataclasses.replace(cfg, data=dataset, out=tmp_path / "a"))  # type: ignore[arg-type]
    assert res.step == 2 and checkpoints.list_checkpoints(tmp_path / "a" / "checkpoints")
    assert load_train_config(None, data=dataset).data == str(dataset)
    with pytest.raises(ConfigError, match="train takes a TrainConfig .*, not str"):
        train("config.toml")  # type: ignore[arg-type]


def test_bf16_autocast_and_activation_checkpointing(dataset: Path, tmp_path: Path) -> None:
    ref = train(_cfg(dataset, tmp_path / "a", steps=2, deterministic=False))
    ckpt = train(_cfg(dataset, tmp_path / "b", steps=2, deterministic=False, activation_checkpointing=True))
    for key in ("loss", "aux_loss", "grad_norm"):  # the same gradients (recomputed with the same router jitter)
        torch.testing.assert_close(torch.tensor([r[key] for r in ref.history]),
                                   torch.tensor([r[key] for r in ckpt.history]), rtol=1e-6, atol=0, msg=key)
    bf = train(_cfg(dataset, tmp_path / "c", steps=2, deterministic=False, dtype="bfloat16"))
    assert all(abs(r["loss"] - q["loss"]) < 0.05 for r, q in zip(bf.history, ref.history, strict=True))
    ev = evaluate(bf.model, __import__("mixlab.train.data", fromlist=["TokenDataset"]).TokenDataset(dataset),
                  _cfg(dataset, tmp_path / "c", dtype="bfloat16"))
    assert set(ev["loss"]) == {"code", "prose"} and all(v > 0 for v in ev["ppl"].values())


def test_evaluate_equals_mixlab_eval_on_the_same_windows(dataset: Path, tmp_path: Path) -> None:
    """The trainer's validation (issue 18): per-domain loss through mixlab.eval's code equals
    mixlab.eval's harness scoring (`score_batch`) of the same windows, and the loss the trainer computed
    before with its own cross-entropy (`lm_loss`, gradients on); the expert load is weighted per token."""
    from mixlab.eval import score_batch
    from mixlab.train.data import TokenDataset, eval_windows
    from mixlab.train.losses import expert_load, lm_loss

    torch.manual_seed(0)
    cfg = _cfg(dataset, tmp_path, steps=2, eval_windows=5, batch_size=2)  # 5 windows: a last, shorter batch
    model = train(cfg).model
    ds = TokenDataset(dataset)
    ev = evaluate(model, ds, cfg)
    assert set(ev["loss"]) == {"code", "prose"}
    nll_all = n_all = bytes_all = 0.0
    for dom in ("code", "prose"):
        w = eval_windows(ds, split="valid", domain=dom, seq_len=cfg.seq_len, max_windows=cfg.eval_windows)
        assert len(w) == 5
        lps = score_batch(model.eval(), [x[:-1].tolist() for x in w], [x[1:].tolist() for x in w])
        nll, n = -sum(lp for lp, _ in lps), w[:, 1:].numel()
        assert ev["loss"][dom] == pytest.approx(nll / n, rel=1e-6)
        assert ev["ppl"][dom] == pytest.approx(torch.tensor(nll / n).exp().item(), rel=1e-5)
        old, load = 0.0, 0.0
        for i in range(0, len(w), cfg.batch_size):  # the trainer's loss before it shared mixlab.eval's code
            x = w[i : i + cfg.batch_size]
            o = model.forward_output(x[:, :-1])
            old += float(lm_loss(o.logits_BTV, x[:, 1:])) * x[:, 1:].numel()
            load = load + expert_load(o.routing, 4) * x[:, 1:].numel()
        assert ev["loss"][dom] == pytest.approx(old / n, rel=1e-5)
        torch.testing.assert_close(torch.tensor(ev["load"][dom]), load / n, rtol=1e-5, atol=1e-6)
        nll_all, n_all = nll_all + nll, n_all + n
        # Bits per byte: the windows' NLL over the bytes their tokens stand for, at the split's
        # bytes per token (the byte tokenizer: each document is BOS, its UTF-8 bytes, EOS).
        info = ds.meta["splits"]["valid"][dom]
        assert ds.bytes_per_token("valid", dom) == (info["tokens"] - 2 * info["docs"]) / info["tokens"]
        bytes_ = n * ds.bytes_per_token("valid", dom)
        assert ev["bpb"][dom] == pytest.approx(nll / bytes_ / math.log(2), rel=1e-6)
        bytes_all += bytes_
    assert ev["mean_loss"] == pytest.approx(nll_all / n_all, rel=1e-6)
    assert ev["mean_bpb"] == pytest.approx(nll_all / bytes_all / math.log(2), rel=1e-6)
    assert "bits/byte" in eval_line(ev) and f"{ev['mean_bpb']:.4f}" in eval_line(ev)


def test_schedule_warmup_then_cosine() -> None:
    cfg = TrainConfig(lr=1.0, warmup=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)


_CHILD = r"""
import sys, time, torch
from pathlib import Path
from mixlab.config import get_preset
from mixlab.model import Transformer
from mixlab.train import checkpoints
root = Path(sys.argv[1])
m = Transformer(get_preset("tiny-moe")); m.init_weights(seed=0)
opt = torch.optim.AdamW(m.parameters())
m(torch.randint(0, 256, (1, 8))).sum().backward(); opt.step()
checkpoints.save(root, step=1, model=m, optimizer=opt, state={}, keep=3)
real = checkpoints.write_safetensors
def slow(*a, **k):
    real(*a, **k)
    print("WROTE", flush=True)
    time.sleep(60)  # the parent SIGKILLs us here, mid-save
checkpoints.write_safetensors = slow
checkpoints.save(root, step=2, model=m, optimizer=opt, state={}, keep=3)
"""


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()  # blocks until the first file of step 2 is written
        assert line.strip() == "WROTE"
        assert any(p.name.startswith(".step_00000002.tmp-") for p in root.iterdir())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    time.sleep(0.05)
    assert checkpoints.latest(root) == root / "step_00000001"
    from mixlab.config import get_preset
    from mixlab.model import Transformer

    m = Transformer(get_preset("tiny-moe"))
    opt = torch.optim.AdamW(m.parameters())
    checkpoints.load(root / "step_00000001", model=m, optimizer=opt)
    assert len(opt.state) == len(list(m.parameters()))


def test_capacity_factor_training_counts_dropped_tokens(dataset: Path, tmp_path: Path) -> None:
    moe = {**TINY["moe"], "capacity_factor": 0.5}
    res = train(_cfg(dataset, tmp_path, steps=1, grad_accum=1, model_overrides={**TINY, "moe": moe}))
    assert res.history[0]["dropped"] > 0
    # With gradient accumulation the step's count is every micro-batch's (it was the last one's alone).
    from mixlab.model import Transformer
    from mixlab.train.data import BatchLoader, TokenDataset
    from mixlab.train.loop import build_model_config

    moe["jitter"] = 0.0
    cfg = _cfg(dataset, tmp_path / "accum", steps=1, grad_accum=3, batch_size=2, model_overrides={**TINY, "moe": moe})
    got = train(cfg).history[0]["dropped"]
    ds = TokenDataset(dataset)
    model = Transformer(build_model_config(cfg, ds))
    model.init_weights(std=cfg.init_std, seed=cfg.seed)
    loader = BatchLoader(ds, split="train", seq_len=cfg.seq_len, batch_size=2, seed=cfg.seed)
    with torch.no_grad():
        each = [sum(r.dropped for r in model.train().forward_output(loader.next_batch()[0]).routing) for _ in range(3)]
    assert min(each) > 0 and got == sum(each)


def test_cli_errors_are_one_line(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mixlab.cli import main

    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "r"), "--seq-len", "4096"]) == 2  # the flag
    assert "beyond the model's context (max_seq_len 512); set --seq-len (seq_len in a config file) to 512 or less" \
        in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no text field"}\n')
    assert main(["data", "prepare", str(bad), "--out", str(tmp_path / "ds")]) == 1
    assert "mixlab data prepare: error: " in (err := capsys.readouterr().err)  # not 'mixlab data'
    assert "bad.jsonl:1: expected a JSON object with a 'text' field" in err
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "r"), "--resume"]) == 1
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_a_token_id_outside_the_vocabulary_stops_the_run_before_a_step(dataset: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A damaged tokens.bin with an id >= the vocabulary failed at the first step, in the embedding
    (not naming the file); below a model's larger vocabulary it was trained on without a word. Its ids
    are checked as the windows are read: the step that would feed it to the model stops the run."""
    import numpy as np

    from mixlab.cli import main
    from mixlab.train.data import BatchLoader

    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)

    def spoil(seq_len: int, batch_size: int, nth: int) -> str:
        """Put id 300 in the middle of the `nth` window the run reads; the error it gives."""
        for f in (ds / "train").glob("*.tokens.bin"):  # undo an earlier spoil
            shutil.copy(dataset / "train" / f.name, f)
        loader = BatchLoader(TokenDataset(ds), seq_len=seq_len, batch_size=batch_size, seed=0)
        w = int(loader._perm[nth])
        d = int(np.searchsorted(loader.offsets, w, side="right") - 1)
        where = (w - int(loader.offsets[d])) * seq_len + seq_len // 2
        f = ds / "train" / f"{loader.domains[d]}.tokens.bin"
        toks = np.fromfile(f, dtype=np.uint16)
        toks[where] = 300
        f.write_bytes(toks.tobytes())
        return rf"{loader.domains[d]}.tokens.bin: token {where} is id 300, outside the dataset's vocabulary of 259"

    over = {**TINY, "vocab_size": 512}  # the model's vocabulary covers 300: it trained on the id
    pattern = spoil(32, 4, 8)  # step 2's first window (4 rows, 2 micro-batches a step)
    with pytest.raises(DataError, match=pattern):
        train(_cfg(ds, tmp_path / "a", model_overrides=over))
    assert [json.loads(r)["step"] for r in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()] == [1]
    pattern = spoil(16, 2, 0)
    assert main(["train", "--data", str(ds), "--out", str(tmp_path / "b"), "--steps", "1", "--seq-len", "16",
                 "--batch-size", "2", "--threads", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert re.search(f"^mixlab train: error: .*{pattern}", err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
    # `data check` reads it all, once, before a run: the same line
    assert main(["data", "check", str(ds)]) == 1
    err = capsys.readouterr().err
    assert re.search(f"^mixlab data check: error: .*{pattern}", err) and len(err.strip().splitlines()) == 1, err
    assert main(["data", "check", str(dataset), "--quiet"]) == 0
    n = sum(v["tokens"] for s in TokenDataset(dataset).meta["splits"].values() for v in s.values())
    assert capsys.readouterr().out == f"{dataset}: {n:,} tokens, every id below the vocabulary of 259; sizes and " \
                                      "document offsets as meta.json says\n"


def _params(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def test_init_from_any_checkpoint(dataset: Path, tmp_path: Path) -> None:
    """`init_from` starts from given weights: a transformers export, a run folder, a step folder, a
    Mistral-format folder and an upcycled model. lr=0 leaves them untouched, so the run's final
    weights equal the checkpoint's bit for bit."""
    from mixlab.checkpoint import save_model
    from mixlab.train.upcycle import upcycle

    base = train(_cfg(dataset, tmp_path / "a", steps=2, export_hf=True, ckpt_every=1))
    want = _params(base.model)
    save_model(base.model, tmp_path / "mistral", fmt="mistral")
    sources = {"hf": tmp_path / "a" / "hf", "run": tmp_path / "a", "mistral": tmp_path / "mistral",
               "step": tmp_path / "a" / "checkpoints" / "step_00000002"}
    for name, src in sources.items():
        res = train(_cfg(dataset, tmp_path / f"from-{name}", steps=1, lr=0.0, init_from=str(src), model="bogus"))
        got = _params(res.model)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[n], want[n]) for n in want), name
    # Training-only fields may change; the loss is the start model's on the first batch.
    res = train(_cfg(dataset, tmp_path / "b", steps=1, grad_accum=1, init_from=str(tmp_path / "a" / "hf"),
                     model_overrides={"moe": {"aux_loss_coef": 0.0, "jitter": 0.0}}))
    from mixlab.train.data import BatchLoader, TokenDataset
    from mixlab.train.losses import lm_loss

    x, y, _ = BatchLoader(TokenDataset(dataset), seq_len=32, batch_size=4).next_batch()
    m = load_model(tmp_path / "a" / "hf")  # eval: no router jitter, as the run (jitter overridden to 0)
    assert res.history[0]["loss"] == pytest.approx(float(lm_loss(m(x).detach(), y)), rel=1e-5)
    # A dense model trained, upcycled, then trained as an MoE from the upcycled weights.
    dense = {k: v for k, v in TINY.items() if k != "moe"}
    train(_cfg(dataset, tmp_path / "dense", steps=1, model="tiny-dense", export_hf=True,
               model_overrides={**dense, "sliding_window": None}))
    upcycle(tmp_path / "dense" / "hf", tmp_path / "up", num_experts=4, top_k=2)
    up = load_model(tmp_path / "up")
    res = train(_cfg(dataset, tmp_path / "moe", steps=1, lr=0.0, init_from=str(tmp_path / "up")))
    assert res.model.config.moe is not None and res.model.config.moe.num_experts == 4
    assert all(torch.equal(p, q) for p, q in zip(res.model.parameters(), up.parameters(), strict=True))


def test_init_from_errors(dataset: Path, tmp_path: Path) -> None:
    train(_cfg(dataset, tmp_path / "a", steps=1, export_hf=True))
    with pytest.raises(CheckpointError, match="nowhere: no such checkpoint folder"):
        train(_cfg(dataset, tmp_path / "b", init_from=str(tmp_path / "nowhere")))
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        train(_cfg(dataset, tmp_path / "b", init_from=str(tmp_path)))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")  # a file that is there: not 'no such checkpoint folder'
    with pytest.raises(CheckpointError, match=f"m.gguf: a file; training starts from a checkpoint folder: "
                                              f"`mixlab convert {tmp_path / 'm.gguf'} DIR` writes it as one"):
        train(_cfg(dataset, tmp_path / "b", init_from=str(tmp_path / "m.gguf")))
    (tmp_path / "M.GGUF").write_bytes(b"GGUF")  # the extension in any case, as load_model reads it
    with pytest.raises(CheckpointError, match="M.GGUF: a file; training starts from a checkpoint folder: `mixlab co"):
        train(_cfg(dataset, tmp_path / "b", init_from=str(tmp_path / "M.GGUF")))
    # an override of the shape was blamed on the checkpoint ('... has shape [...], the model expects ...',
    # or 'the config has 4 layers ..., the weights hold 2' from a config file's [model_overrides])
    hf = tmp_path / "a" / "hf"
    for over, said in (({"ffn_dim": 64}, "ffn_dim = 64"), ({"n_layers": 4}, "n_layers = 4"),
                       ({"moe": {"num_experts": 2}}, "moe.num_experts = 2")):
        with pytest.raises(ConfigError, match=f"^model_overrides: {said}, but the weights of init_from {hf} have "):
            train(_cfg(dataset, tmp_path / "b", init_from=str(hf), model_overrides=over))
    with pytest.raises(ConfigError, match="smaller than the dataset's tokenizer vocabulary"):
        train(_cfg(dataset, tmp_path / "b", init_from=str(tmp_path / "a" / "hf"), model_overrides={"vocab_size": 100}))
    with pytest.raises(ConfigError, match="data_offset"):
        _cfg(dataset, tmp_path, data_offset=-1)


def test_the_seq_len_default_is_lowered_to_a_shorter_models_context(dataset: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`mixlab train --init-from` a model of 64 positions was refused ('seq_len 256 is beyond the model's
    context') though no length was set: the default (256) is lowered to the context, said once on stderr as
    sft's is, and recorded; a length given past it, as the flag or in the config file, stays an error."""
    from mixlab.cli import main

    train(_cfg(dataset, tmp_path / "a", steps=1, export_hf=True))  # TINY: max_seq_len 64
    hf, out = tmp_path / "a" / "hf", tmp_path / "b"
    fast = ["--data", str(dataset), "--init-from", str(hf), "--steps", "1", "--batch-size", "2", "--threads", "1",
            "--eval-every", "0", "--ckpt-every", "0", "--quiet"]
    capsys.readouterr()
    assert main(["train", *fast, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and ("mixlab train: note: --seq-len's default 256 is past the model's 64 positions; "
                                        "training rows of 64 tokens\n") in err
    assert json.loads((out / "train_config.json").read_text())["seq_len"] == 64
    assert main(["train", *fast, "--out", str(tmp_path / "c"), "--seq-len", "128"]) == 2
    assert ("seq_len 128 is beyond the model's context (max_seq_len 64); set --seq-len (seq_len in a config file) "
            "to 64 or less") in capsys.readouterr().err
    (tmp_path / "long.toml").write_text("seq_len = 128\n")
    assert main(["train", str(tmp_path / "long.toml"), *fast, "--out", str(tmp_path / "c")]) == 1
    assert f"{tmp_path / 'long.toml'}: seq_len 128 is beyond the model's context" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert main(["train", *fast, "--out", str(tmp_path / "d"), "--seq-len", "32"]) == 0  # one it holds: no note
    assert "note:" not in capsys.readouterr().err


def test_init_from_a_model_of_another_tokenizer_is_refused(dataset: Path, tmp_path: Path) -> None:
    """Weights trained with one tokenizer, trained further on data another wrote (`data prepare`'s default
    `bytes` under a Mixtral-tokenizer model), ran without a word when the model's vocabulary covered the
    data's ids: it trained on other text than the ids meant to it. Refused where the checkpoint names its
    tokenizer (a tokenizer file in its folder, a mixlab export's mixlab_data.json, a run's); the same
    vocabulary from another file, or a checkpoint naming none (or one no longer there), still trains."""
    from mixlab.tokenizer import default_tokenizer_path

    train(_cfg(dataset, tmp_path / "a", steps=1, export_hf=True, model_overrides={**TINY, "vocab_size": 32000}))
    sp = tmp_path / "sp"  # a converted checkpoint: its own tokenizer.model, no mixlab_data.json
    shutil.copytree(tmp_path / "a" / "hf", sp)
    (sp / "mixlab_data.json").unlink()
    shutil.copy(default_tokenizer_path(), sp / "tokenizer.model")
    mixtral = {"type": "file", "name": "mixtral", "path": "/elsewhere/tokenizer.model.v1", "vocab_size": 32000}
    run = tmp_path / "a" / "hf" / "mixlab_data.json"
    run.write_text(json.dumps({"tokenizer": mixtral, "domains": ["code", "prose"]}))
    for src, named in ((sp, str(sp / "tokenizer.model")), (tmp_path / "a", "mixtral")):
        with pytest.raises(ConfigError, match=rf"^init_from \(--init-from\) {re.escape(str(src))}: its tokenizer "
                                              rf"\({re.escape(named)}\) is not the one {re.escape(str(dataset))} was "
                                              rf"prepared with \(bytes, meta.json's\); prepare the data again with "
                                              rf"--tokenizer {re.escape(named)}$"):
            train(_cfg(dataset, tmp_path / "b", steps=1, init_from=str(src)))
    assert not (tmp_path / "b").exists()
    ds = tmp_path / "ds"  # the same vocabulary, from mistral-common's file: trains
    prepare(read_documents([dataset.parent / "src"]), ds, tokenizer="mixtral")
    assert train(_cfg(ds, tmp_path / "c", steps=1, init_from=str(sp))).step == 1
    assert train(_cfg(ds, tmp_path / "d", steps=1, init_from=str(tmp_path / "a"))).step == 1
    (sp / "tokenizer.model").unlink()  # names none
    assert train(_cfg(dataset, tmp_path / "e", steps=1, init_from=str(sp), export_hf=True)).step == 1
    run.write_text(json.dumps({"tokenizer": {**mixtral, "name": "/elsewhere/tok.model"}}))  # moved since
    assert train(_cfg(dataset, tmp_path / "f", steps=1, init_from=str(tmp_path / "a"))).step == 1
    from mixlab.corpus import get_tokenizer, same_vocabulary

    bytes_model = tmp_path / "e" / "hf"  # written by a run on `bytes` data: a FileTokenizer of its folder
    assert same_vocabulary(get_tokenizer("bytes"), get_tokenizer(str(bytes_model)))
    assert not same_vocabulary(get_tokenizer("bytes"), get_tokenizer("mixtral"))
    # Mixtral's tokenizer.json as the Hub lays it out: the pieces of its SentencePiece file, id for id
    assert same_vocabulary(get_tokenizer("mixtral"), get_tokenizer(str(hf_tokenizer_json(tmp_path))))


def test_data_offset_continues_the_stream(dataset: Path) -> None:
    from mixlab.train.data import BatchLoader, TokenDataset

    ds = TokenDataset(dataset)
    a = BatchLoader(ds, seq_len=32, batch_size=4)
    n = a.n_windows
    for _ in range(n // 4 + 3):  # across an epoch boundary
        a.next_batch()
    b = BatchLoader(ds, seq_len=32, batch_size=4)
    b.skip(4 * (n // 4 + 3))
    assert a.state_dict() == b.state_dict() or torch.equal(a.next_batch()[0], b.next_batch()[0])
    assert torch.equal(a.next_batch()[0], b.next_batch()[0])


def test_an_export_folder_holding_other_files_is_refused_before_training(dataset: Path, tmp_path: Path) -> None:
    """OUT/hf with files mixlab did not write: refused at the start, not after the whole run (whose
    error then pointed to an --overwrite flag `mixlab train` does not have)."""
    (tmp_path / "run" / "hf").mkdir(parents=True)
    (tmp_path / "run" / "hf" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"hf: holds files mixlab did not write \(notes.txt\).*--out"):
        train(_cfg(dataset, tmp_path / "run", export_hf=True))
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert (tmp_path / "run" / "hf" / "notes.txt").read_text() == "mine"


def test_tokens_per_s_is_the_interval_since_the_last_logged_record(dataset: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A logged record's tokens_per_s was its step's alone: with log_every 3, one step in three stood for
    the others (and the first after an evaluation or a checkpoint is slow). It is now the tokens since
    the last logged record over the steps' time: a clock where step k takes k seconds, with 100 s of
    something else (an evaluation, a checkpoint) between steps, which does not count."""
    import mixlab.train.loop as loop

    step_clock(monkeypatch, loop)
    res = train(_cfg(dataset, tmp_path, steps=6, log_every=3, eval_every=2))
    tok = 4 * 32 * 2  # batch_size x seq_len x grad_accum
    assert [r["tokens_per_s"] for r in res.history] == pytest.approx(
        [tok / 1, 2 * tok / 3, 3 * tok / 6, tok / 4, 2 * tok / 9, 3 * tok / 15])
    logged = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["tokens_per_s"]) for r in logged if "loss" in r] == [(3, 3 * tok / 6), (6, 3 * tok / 15)]


def test_progress_in_a_log_file_is_a_line_per_record(dataset: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """With stderr not a terminal (`mixlab train ... 2> log`), tqdm redrew its bar into the file at every
    step and data prepare left a bar per domain and split; now the log gets one line per metrics record."""
    from mixlab.cli import main

    src = tmp_path / "src" / "prose"
    src.mkdir(parents=True)
    (src / "train.jsonl").write_text(json.dumps({"text": "The cat sat on the mat. " * 20}) + "\n")
    assert main(["data", "prepare", str(tmp_path / "src"), "--out", str(tmp_path / "ds")]) == 0
    assert capsys.readouterr().err == ""
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "r"), "--steps", "4", "--log-every", "2",
                 "--seq-len", "16", "--batch-size", "2", "--eval-every", "4", "--set", "dim=32",
                 "--set", "n_layers=1"]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in err and "step/s" not in err
    # the evaluation during the run is progress too (it was on stdout, between the results)
    assert [ln.split(":")[0] for ln in err.splitlines()] == ["step 2/4", "step 4/4", "step 4"]
    assert out.splitlines()[-1] == f"run folder: {tmp_path / 'r'}"


def test_a_config_files_dtype_takes_the_spellings_the_flag_takes(tmp_path: Path) -> None:
    """`dtype = "bf16"` in a config file was refused though `--dtype bf16` was taken."""
    from mixlab.train.finetune import load_finetune_config

    conf = tmp_path / "run.toml"
    for spelling, name in (("bf16", "bfloat16"), ("fp32", "float32"), ("bfloat16", "bfloat16")):
        conf.write_text(f'dtype = "{spelling}"\n')
        assert load_train_config(conf).dtype == name and load_finetune_config(conf, model="m", data="d").dtype == name
    conf.write_text('dtype = "fp16"\n')  # a dtype autocast does not train in, by its full name
    with pytest.raises(ConfigError, match="'dtype' must be 'float32' or 'bfloat16', got 'float16'"):
        load_train_config(conf)


def test_a_config_files_home_paths_are_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TOML `out = "~/runs/a"` (no shell expands it) wrote the run to ./~/runs/a in the working folder."""
    from mixlab.train.finetune import load_finetune_config

    monkeypatch.setenv("HOME", str(tmp_path))
    conf = tmp_path / "run.toml"
    conf.write_text('data = "~/ds"\nout = "~/runs/a"\ninit_from = "~/ckpt"\nmodel = "tiny-moe"\n')
    cfg = load_train_config(conf)
    assert (cfg.data, cfg.out, cfg.init_from) == (str(tmp_path / "ds"), str(tmp_path / "runs/a"),
                                                  str(tmp_path / "ckpt"))
    assert cfg.model == "tiny-moe"
    conf.write_text('model = "~/ckpt"\ndata = "~/chats.jsonl"\nvalid_data = "~/v.jsonl"\ntokenizer = "mixtral"\n')
    ft = load_finetune_config(conf)
    assert (ft.model, ft.data, ft.valid_data, ft.tokenizer) == (
        str(tmp_path / "ckpt"), str(tmp_path / "chats.jsonl"), str(tmp_path / "v.jsonl"), "mixtral")


def test_quiet_drops_the_progress_lines_not_the_results(dataset: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """--quiet was taken by eval and analyze only; train printed its progress lines whatever was asked."""
    from mixlab.cli import main

    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "r"), "--steps", "2", "--log-every", "1",
                 "--seq-len", "16", "--batch-size", "2", "--eval-every", "2", "--set", "dim=32",
                 "--set", "n_layers=1", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines()[0].startswith("step 2: ") and out.splitlines()[-1] == f"run folder: {tmp_path / 'r'}"



def test_a_batch_that_cannot_fit_in_memory_is_refused_up_front(dataset: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`train --batch-size 100000000000` grew the loader's rows until the machine struggled: it is
    now one line naming the value and how many rows fit; sane values are not refused."""
    from mixlab.cli import main
    from mixlab.train import settings

    out = tmp_path / "r"
    assert main(["train", "--data", str(dataset), "--out", str(out), "--batch-size", "100000000000"]) == 1
    err = capsys.readouterr().err
    assert "mixlab train: error: batch_size 100000000000 cannot fit: one micro-batch (256 tokens an item)" in err
    assert "of memory is free on cpu; at most " in err and not out.exists()
    # the floor: float32 logits and each layer's bf16 input, per token (tiny-moe: 259 x 4 + 8 x 64 x 2)
    mc = build_model_config(_cfg(dataset, tmp_path / "x"), TokenDataset(dataset))
    per_row = 32 * (4 * mc.vocab_size + 2 * mc.dim * mc.n_layers)
    monkeypatch.setattr(settings, "available_memory", lambda: 10 * per_row)
    settings.check_batch_fits(mc, batch_size=10, seq_len=32, device="cpu")
    settings.check_batch_fits(mc, batch_size=20, seq_len=32, device="cpu", processes=2)
    with pytest.raises(ValueError, match=r"batch_size 11 cannot fit: .* at most 10 fit"):
        settings.check_batch_fits(mc, batch_size=11, seq_len=32, device="cpu")
    with pytest.raises(ValueError, match=r"batch_size 6 cannot fit: one micro-batch \(64 tokens an item\).* at most 5"):
        settings.check_batch_fits(mc, batch_size=6, seq_len=32, device="cpu", rows_per_item=2)  # DPO's pairs
    with pytest.raises(ValueError, match=r"batch_size 21 cannot fit: a process's share of .* at most 20 fit"):
        settings.check_batch_fits(mc, batch_size=21, seq_len=32, device="cpu", processes=2)


def test_training_a_llama_3_folder_keeps_its_eos_list_only_for_its_own_vocabulary(tmp_path: Path) -> None:
    """A model folder with an eos_token_id list (Llama 3 Instruct's): its other EOS ids stay EOS after
    training on data of its tokenizer, and go where the data's smaller vocabulary cannot hold them
    (the extra ids past the vocabulary were refused)."""
    from types import SimpleNamespace

    from mixlab.config import ModelConfig, get_preset

    cfg = get_preset("tiny-moe").replace(vocab_size=1000, eos_id=900, extra_eos_ids=(901, 902))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert ModelConfig.from_dir(tmp_path / "m").eos_ids == (900, 901, 902)
    same = SimpleNamespace(vocab_size=1000, bos_id=1, eos_id=902)  # its tokenizer's EOS: <|eot_id|>
    got = build_model_config(TrainConfig(model=str(tmp_path / "m")), same)  # type: ignore[arg-type]
    assert got.eos_ids == (902, 900, 901)
    small = SimpleNamespace(vocab_size=259, bos_id=1, eos_id=2)  # the byte tokenizer's
    assert build_model_config(TrainConfig(model=str(tmp_path / "m")), small).eos_ids == (2,)  # type: ignore[arg-type]
