"""Data-parallel fine-tuning (`torchrun --nproc-per-node 2 -m mixlab sft|dpo`, gloo on loopback)
equals the one-process run on the same global batch (SFT LoRA over an int4 base, SFT in full, DPO
LoRA over float32; 2 accumulated micro-batches whose rows hold different numbers of real tokens):
per-step losses, router losses, gradient norms and evaluations, the final adapter or weights, DPO's
reference log-probs; a resume under torchrun from a one-process checkpoint and from a two-process
one; rank 1 writes nothing; a batch size that does not split is refused with one line.

One torchrun launch runs every two-process job in turn (each start costs seconds); the one-process
runs are made in this process."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mixlab.checkpoint import save_model
from mixlab.config import ModelConfig, MoEConfig
from mixlab.model import Transformer
from mixlab.train.finetune import finetune, load_finetune_config
from processes import mixlab

TIMEOUT = 300  # seconds for a torchrun launch (bounded; the one of 3.5 runs takes ~8 s on 2 busy cores)
CFG = ModelConfig(vocab_size=259, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64,
                  max_seq_len=256, rope_theta=1e4, moe=MoEConfig(num_experts=4, top_k=2, z_loss_coef=0.01))

# Every process: record what it writes under the watched folder (Python's audit events: files opened
# for writing, folders made, renames, removals), run the jobs (a `mixlab` command line, or `finetune`
# with stop_after as an interrupted run), then report.
SCRIPT = '''
import json, os, sys
from pathlib import Path

jobs, watched = json.loads(Path(sys.argv[1]).read_text()), os.path.realpath(sys.argv[2])
writes = []
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if not (isinstance(flags, int) and flags & WRITE or mode and any(c in mode for c in "wax+")):
            return
        paths = [path]
    elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.link", "os.symlink", "os.truncate",
                   "os.chmod", "shutil.rmtree", "shutil.move", "shutil.copyfile"):
        paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
    else:
        return
    for p in paths:
        if isinstance(p, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(p)).startswith(watched):
            writes.append(f"{event} {os.fsdecode(p)}")


sys.addaudithook(hook)
from mixlab.cli import main
from mixlab.parallel.mesh import init, shutdown
from mixlab.parallel.train import DistributedTraining
from mixlab.train.finetune import finetune, load_finetune_config

codes, errors, rank = [], [], int(os.environ["RANK"])
for job in jobs:
    if isinstance(job, list):
        codes.append(main(job))
        continue
    par = DistributedTraining(init())
    over = job["set"] | ({"data": job["data"][rank]} if "data" in job else {})  # each rank its own file
    try:
        finetune(load_finetune_config(job["config"], **over), stop_after=job.get("stop_after"), parallel=par)
    except ValueError as e:
        errors.append(str(e))
    finally:
        shutdown()
report = {"codes": codes, "errors": errors, "writes": writes}
Path(sys.argv[2]).parent.joinpath(f"rank_{rank}.json").write_text(json.dumps(report))
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ftdp")
    m = Transformer(CFG)
    m.init_weights(std=0.1, seed=0)
    save_model(m, root / "base")
    (root / "base" / "mixlab_data.json").write_text(json.dumps({"tokenizer": {"type": "bytes"}}))
    # conversations of different lengths: the processes' rows hold different numbers of real tokens
    convs = [{"messages": [{"role": "user", "content": f"What is {i} plus {i * 7}?" + " Please." * (i % 3)},
                           {"role": "assistant", "content": f"{i} plus {i * 7} is {8 * i}."}]} for i in range(24)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in convs))
    convs[5]["messages"][1]["content"] = "I do not know."  # another node's copy, edited
    (root / "sft_edited.jsonl").write_text("".join(json.dumps(r) + "\n" for r in convs))
    pairs = [{"prompt": f"Human: Say the number {i}.\n\nAssistant:", "chosen": f"{i}" + "!" * (i % 4),
              "rejected": f"I will not say {i + 1}."} for i in range(24)]
    (root / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return {"base": root / "base", "sft": root / "sft.jsonl", "sft_edited": root / "sft_edited.jsonl",
            "dpo": root / "dpo.jsonl"}


def _settings(files: dict[str, Path], task: str, out: Path, **kw: Any) -> dict[str, Any]:
    return dict(task=task, model=str(files["base"]), data=str(files[task]), out=str(out), seq_len=96, batch_size=4,
                grad_accum=2, steps=4, warmup=1, lr=3e-3, eval_every=2, ckpt_every=2, log_every=1,
                valid_fraction=0.2, aux_loss_coef=0.5, threads=1, progress=False) | kw


def _config_file(path: Path, settings: dict[str, Any]) -> Path:
    path.write_text(json.dumps({k: v for k, v in settings.items() if k != "task"}))
    return path


def _records(out: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"}
            for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _same_tensors(a: Path, b: Path) -> None:
    """The same tensors up to float32 summation order: the two processes' gradients are all-reduced, one
    process sums them in one pass. AdamW divides each element's step by its own gradient's scale, so an
    element whose gradient is near 0 turns that rounding into a visible share of the learning rate: on an
    Intel Xeon host one of 2,048 lora_B elements of the DPO run ended 1.5e-6 apart (2e-4 of its value)
    after 4 steps at lr 3e-3. A wrong gradient scale or a lost shard moves every element by ~lr."""
    want, got = load_file(str(a)), load_file(str(b))
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)


def _tree(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def test_two_processes_equal_one(files: dict[str, Path], tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    two.mkdir()
    lora = dict(lora_rank=4, lora_targets="attention,experts,router")
    runs = {"sft_lora": _settings(files, "sft", two / "sft_lora", **lora, lora_base_dtype="int4"),
            "sft_full": _settings(files, "sft", two / "sft_full"),
            "dpo_lora": _settings(files, "dpo", two / "dpo_lora", **lora)}
    for name, s in runs.items():  # the one-process runs, uninterrupted
        finetune(load_finetune_config(None, **(s | {"out": str(one / name)})))
    # sft_full: continued under torchrun from a one-process checkpoint at step 2
    finetune(load_finetune_config(None, **runs["sft_full"]), stop_after=2)
    conf = {name: _config_file(tmp_path / f"{name}.json", s) for name, s in runs.items()}
    jobs: list[Any] = [
        ["sft", str(conf["sft_lora"])],
        ["sft", str(conf["sft_full"]), "--resume"],
        # two processes stopped at step 2 (as if killed), then resumed by two
        {"config": str(conf["dpo_lora"]), "set": {"task": "dpo"}, "stop_after": 2},
        ["dpo", str(conf["dpo_lora"]), "--resume"],
        # processes given different data (each node its own copy) are refused before the first step
        {"config": str(conf["sft_full"]), "set": {"task": "sft", "out": str(two / "refused")},
         "data": [str(files["sft"]), str(files["sft_edited"])]},
    ]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "run.py").write_text(SCRIPT)
    p = mixlab([str(tmp_path / "jobs.json"), str(two)], nproc=2, script=tmp_path / "run.py")
    stdout, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, err[-3000:]
    report = {r: json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)}
    assert report[0]["codes"] == report[1]["codes"] == [0, 0, 0]
    assert report[0]["errors"] == report[1]["errors"] and len(report[0]["errors"]) == 1
    assert report[0]["errors"][0].startswith("the processes of this run were started differently (the training "
                                             "examples): rank 1 has the training examples = ")
    # rank 0 writes every file, rank 1 none: only the probe every rank makes and removes at once, so that all
    # refuse an --out they cannot write together (atomic.check_writable), as `mixlab train`'s processes do
    probes = [w for w in report[1]["writes"] if "/.mixlab-probe-" in w]
    assert report[0]["writes"] and report[1]["writes"] == probes and probes
    assert stdout.count("run folder:") == 3, stdout  # rank 0 prints
    assert not (two / "refused").exists()

    for name in runs:
        want, got = _records(one / name), _records(two / name)
        assert [r["step"] for r in got] == [r["step"] for r in want]
        assert {k for r in want for k in r} >= {"loss", "aux_loss", "z_loss", "grad_norm", "eval_loss"}
        for w, g in zip(want, got, strict=True):
            assert g.keys() == w.keys(), name
            assert g == pytest.approx(w, rel=1e-5, abs=1e-7), (name, w["step"])
        assert _tree(two / name) == _tree(one / name)
    _same_tensors(one / "sft_lora" / "adapter" / "adapter_model.safetensors",
                  two / "sft_lora" / "adapter" / "adapter_model.safetensors")
    _same_tensors(one / "sft_full" / "hf" / "model.safetensors", two / "sft_full" / "hf" / "model.safetensors")
    _same_tensors(one / "dpo_lora" / "adapter" / "adapter_model.safetensors",
                  two / "dpo_lora" / "adapter" / "adapter_model.safetensors")
    _same_tensors(one / "dpo_lora" / "reference_logps.safetensors", two / "dpo_lora" / "reference_logps.safetensors")


def test_a_batch_size_that_does_not_split_is_one_line(files: dict[str, Path], tmp_path: Path) -> None:
    p = mixlab(["sft", "--model", str(files["base"]), "--data", str(files["sft"]), "--out", str(tmp_path / "run"),
                "--seq-len", "96", "--batch-size", "3"], nproc=2)
    _, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode != 0 and "(exitcode: 2)" in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("mixlab sft:")]
    assert lines == ["mixlab sft: error: fine-tuning setting 'batch_size' (--batch-size) must be a multiple of the "
                     "number of processes (2), got 3"], err[-3000:]
    assert "[rank" not in err and not (tmp_path / "run").exists()


def test_an_ep_the_processes_cannot_hold_is_one_line(files: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before any process group or file: --ep 3 in a world of one, and of two (as torchrun's
    WORLD_SIZE says; --ep must divide it), of three over 4 experts; --ep 2 on a dense model."""
    from mixlab.cli import main

    base = ["dpo", "--model", str(files["base"]), "--data", str(files["dpo"]), "--out", str(tmp_path / "run"),
            "--seq-len", "96", "--ep", "3"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err == ("mixlab dpo: error: --ep 3 needs 3 processes (or a multiple of 3) and this is one: launch it "
                   "with `torchrun --nproc-per-node 3 -m mixlab ...`\n"), err
    assert os.environ.get("WORLD_SIZE") is None  # no world of one was started
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err == ("mixlab dpo: error: --ep 3 must divide the number of processes (2): use --ep 1 or 2, or run a "
                   "multiple of 3 processes\n"), err
    monkeypatch.setenv("WORLD_SIZE", "3")  # the processes hold it, the model's 4 experts do not
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err == "mixlab dpo: error: --ep 3 must divide the number of experts (4)\n", err
    dense = tmp_path / "dense"
    save_model(Transformer(dataclasses.replace(CFG, moe=None)), dense)
    (dense / "mixlab_data.json").write_text(json.dumps({"tokenizer": {"type": "bytes"}}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sft", "--model", str(dense), "--data", str(files["sft"]), "--out", str(tmp_path / "run"),
                 "--seq-len", "96", "--ep", "2", "--fsdp"]) == 2
    err = capsys.readouterr().err
    assert err == ("mixlab sft: error: --ep 2: the model is dense (no MoE layer), there are no experts to split; "
                   "leave out --ep (under torchrun, mixlab sft then runs data parallel)\n"), err
    assert not (tmp_path / "run").exists()


class _Checked(Exception):
    """Raised by `_World2.check_same`: the run got past its up-front checks."""


class _World2:
    """Rank 0 of two processes, up to `finetune`'s first collective."""

    rank, world, is_main = 0, 2, True

    def check_same(self, values: dict[str, Any]) -> None:
        raise _Checked

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        raise AssertionError("no collective before check_same")

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        raise AssertionError("no collective before check_same")


def test_a_process_needs_memory_for_its_share_of_the_batch(files: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose rows fit only split over the processes is not refused as if one held them all
    (and one that does not fit even split is, naming a process's share)."""
    from mixlab.train import settings

    per_row = 96 * (4 * CFG.vocab_size + 2 * CFG.dim * CFG.n_layers)  # check_batch_fits' floor for a row
    monkeypatch.setattr(settings, "available_memory", lambda: 3 * per_row)
    cfg = load_finetune_config(None, **_settings(files, "sft", tmp_path / "run", batch_size=6))
    with pytest.raises(ValueError, match="batch_size 6 cannot fit: one micro-batch"):
        finetune(cfg)
    with pytest.raises(_Checked):
        finetune(cfg, parallel=_World2())
    with pytest.raises(ValueError, match="batch_size 8 cannot fit: a process's share of one micro-batch"):
        finetune(dataclasses.replace(cfg, batch_size=8), parallel=_World2())
