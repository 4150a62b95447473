"""Sharded full fine-tuning (`torchrun --nproc-per-node 2 -m mixlab sft|dpo --fsdp`, `--ep 2`,
`--ep 2 --fsdp`, gloo on loopback) equals the one-process run: SFT (with activation checkpointing),
and DPO with a frozen router (reference log-probs and evaluations through the sharded model, whose
forward every process must join), metrics records and the final hf/ weights within 1e-5; a run
stopped at step 2 and resumed under --fsdp (or --ep), one resumed under --fsdp from a one-process
checkpoint, and one process resuming a two-process --fsdp (or --ep) checkpoint all equal the
uninterrupted run; each process holds half of the parameters (--fsdp) or of the experts (--ep); 4 processes under
--ep 2 (two replicas of the experts' split, with and without --fsdp) equal one; --fsdp or --ep with
LoRA is one line.

One torchrun launch runs every two-process job in turn (another the four-process ones); the
one-process runs are made here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mixlab.model import Transformer
from mixlab.train import checkpoints
from mixlab.train.finetune import finetune, load_finetune_config
from processes import mixlab
from test_finetune_parallel import CFG, TIMEOUT, _config_file, _records, _same_tensors, _settings, files

__all__ = ["files"]  # the fixture, shared with test_finetune_parallel.py
pytestmark = pytest.mark.slow  # a torchrun launch of 12 sharded runs, one of 4 processes: 30-50 s on 2 busy cores

# Every process runs the jobs in turn: a `mixlab` command line, or `finetune` over the sharded layout
# (fsdp, ep; stop_after: as an interrupted run), reporting how many elements of the parameters it
# holds, and of the expert weights, each against the whole model's.
SCRIPT = '''
import json, os, sys
from pathlib import Path

from mixlab.cli import main
from mixlab.parallel.mesh import init, shutdown
from mixlab.parallel.train import DistributedTraining
from mixlab.train.finetune import finetune, load_finetune_config

jobs, rank, report = json.loads(Path(sys.argv[1]).read_text()), int(os.environ["RANK"]), {"codes": [], "held": []}
for job in jobs:
    if isinstance(job, list):
        report["codes"].append(main(job))
        continue
    par = DistributedTraining(init(ep=job.get("ep", 1), fsdp=job.get("fsdp", True)))
    try:
        r = finetune(load_finetune_config(job["config"], **job["set"]), stop_after=job.get("stop_after"), parallel=par)
        local = {n: (p.to_local() if hasattr(p, "to_local") else p).numel() for n, p in r.model.named_parameters()}
        held = [sum(local.values()), sum(v for n, v in local.items() if n in par.expert_names)]
        report["held"].append({"ep": job.get("ep", 1), "fsdp": job.get("fsdp", True), "held": held})
    finally:
        shutdown()
Path(sys.argv[1]).parent.joinpath(f"rank_{rank}.json").write_text(json.dumps(report))
'''


def _same_runs(want: Path, got: Path) -> None:
    w, g = _records(want), _records(got)
    assert [r["step"] for r in g] == [r["step"] for r in w]
    assert {k for r in w for k in r} >= {"loss", "aux_loss", "z_loss", "grad_norm", "eval_loss"}
    for a, b in zip(w, g, strict=True):
        assert b.keys() == a.keys()
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7), a["step"]
    # within 1e-5: the reduce-scatter sums in another order than one process's backward, and AdamW's
    # g / sqrt(v) magnifies that rounding where a gradient is tiny (one expert element in 2048 moves 2e-6)
    assert sorted(f.name for f in (got / "hf").iterdir()) == sorted(f.name for f in (want / "hf").iterdir())
    assert (got / "hf" / "mixlab_data.json").read_text() == (want / "hf" / "mixlab_data.json").read_text()
    a, b = load_file(str(want / "hf" / "model.safetensors")), load_file(str(got / "hf" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)


def test_two_sharded_processes_equal_one(files: dict[str, Path], tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    two.mkdir()
    runs = {"sft": _settings(files, "sft", two / "sft"),
            "dpo": _settings(files, "dpo", two / "dpo", freeze_router=True)}
    for name, s in runs.items():  # the one-process runs, uninterrupted
        finetune(load_finetune_config(None, **(s | {"out": str(one / name)})))
    for ep in ("ep", "ep_fsdp"):  # expert parallel, without and with FSDP
        runs |= {f"sft_{ep}": _settings(files, "sft", two / f"sft_{ep}"),
                 f"dpo_{ep}": _settings(files, "dpo", two / f"dpo_{ep}", freeze_router=True)}
    resumed = {k: _settings(files, "sft", two / k)
               for k in ("stopped", "from_one", "to_one", "stopped_ep", "ep_to_one")}
    finetune(load_finetune_config(None, **resumed["from_one"]), stop_after=2)  # a one-process checkpoint
    conf = {name: _config_file(tmp_path / f"{name}.json", s) for name, s in (runs | resumed).items()}
    jobs: list[Any] = [
        ["sft", str(conf["sft"]), "--fsdp", "--activation-checkpointing"],  # recomputed: the same numbers
        {"config": str(conf["dpo"]), "set": {"task": "dpo"}},
        # stopped at step 2 (as if killed), then resumed by two
        {"config": str(conf["stopped"]), "set": {"task": "sft"}, "stop_after": 2},
        ["sft", str(conf["stopped"]), "--fsdp", "--resume"],
        ["sft", str(conf["from_one"]), "--fsdp", "--resume"],
        {"config": str(conf["to_one"]), "set": {"task": "sft"}, "stop_after": 2},  # resumed by one, below
        # expert parallel: each process its half of the experts, FSDP or not
        ["sft", str(conf["sft_ep"]), "--ep", "2"],
        ["sft", str(conf["sft_ep_fsdp"]), "--ep", "2", "--fsdp"],
        {"config": str(conf["dpo_ep"]), "set": {"task": "dpo"}, "ep": 2, "fsdp": False},
        {"config": str(conf["dpo_ep_fsdp"]), "set": {"task": "dpo"}, "ep": 2, "fsdp": True},
        {"config": str(conf["stopped_ep"]), "set": {"task": "sft"}, "stop_after": 2, "ep": 2, "fsdp": False},
        ["sft", str(conf["stopped_ep"]), "--ep", "2", "--resume"],
        {"config": str(conf["ep_to_one"]), "set": {"task": "sft"}, "stop_after": 2, "ep": 2, "fsdp": False},
    ]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "run.py").write_text(SCRIPT)
    p = mixlab([str(tmp_path / "jobs.json")], nproc=2, script=tmp_path / "run.py")
    _, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, err[-3000:]
    report = {r: json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)}
    assert report[0]["codes"] == report[1]["codes"] == [0] * 6
    # the checkpoints are sharded: every process wrote its pieces
    state = checkpoints.validate(two / "to_one" / "checkpoints" / "step_00000002")
    assert state["format"] == "dcp" and state["world"] == 2 and state["fsdp"] is True
    for name in ("to_one", "ep_to_one"):  # one process resumes a sharded checkpoint (FSDP, expert parallel)
        finetune(load_finetune_config(None, **resumed[name]), resume=True)

    for sharding in ("", "_ep", "_ep_fsdp"):
        _same_runs(one / "sft", two / f"sft{sharding}")
        _same_runs(one / "dpo", two / f"dpo{sharding}")
        _same_tensors(one / "dpo" / "reference_logps.safetensors",
                      two / f"dpo{sharding}" / "reference_logps.safetensors")
    for name in resumed:
        _same_runs(one / "sft", two / name)
    state = checkpoints.validate(two / "stopped_ep" / "checkpoints" / "step_00000002")
    assert state["format"] == "dcp" and state["world"] == 2 and state["ep"] == 2, state
    # FSDP: each process holds half of every parameter (the total counts tied weights once, as the model
    # does); --ep alone: half of the experts and all the rest
    model = Transformer(CFG)
    whole = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    for rank in (0, 1):
        assert [(h["ep"], h["fsdp"]) for h in report[rank]["held"]] == [(1, True)] * 3 + [(2, False), (2, True),
                                                                                          (2, False), (2, False)]
        for h in report[rank]["held"]:
            local, local_experts = h["held"]
            want = 0.5 * whole if h["fsdp"] else whole - experts / 2
            assert abs(local - want) < 0.05 * whole and local_experts == experts // 2, (rank, h, whole, experts)


def test_expert_parallel_replicas_equal_one_process(files: dict[str, Path], tmp_path: Path) -> None:
    """4 processes, --ep 2: 2 replicas of a 2-way expert split, whose expert gradients are summed over
    the replicas (the dp group; all-reduced without --fsdp, reduce-scattered with it)."""
    one, four = tmp_path / "one", tmp_path / "four"
    four.mkdir()
    runs = {"sft": _settings(files, "sft", four / "sft"),
            "dpo": _settings(files, "dpo", four / "dpo", freeze_router=True)}
    for name, s in runs.items():
        finetune(load_finetune_config(None, **(s | {"out": str(one / name)})))
    conf = {name: _config_file(tmp_path / f"{name}.json", s) for name, s in runs.items()}
    jobs = [["sft", str(conf["sft"]), "--ep", "2"], ["dpo", str(conf["dpo"]), "--ep", "2", "--fsdp"]]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "run.py").write_text(SCRIPT)
    p = mixlab([str(tmp_path / "jobs.json")], nproc=4, script=tmp_path / "run.py")
    _, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, err[-3000:]
    assert json.loads((tmp_path / "rank_3.json").read_text())["codes"] == [0, 0]
    _same_runs(one / "sft", four / "sft")
    _same_runs(one / "dpo", four / "dpo")


def test_fsdp_or_ep_with_lora_is_one_line(files: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from mixlab.cli import main

    base = ["sft", "--model", str(files["base"]), "--data", str(files["sft"]), "--out", str(tmp_path / "run"),
            "--lora-rank", "4"]
    assert main([*base, "--fsdp"]) == 2
    err = capsys.readouterr().err
    assert err == ("mixlab sft: error: --fsdp with --lora-rank: --fsdp shards full fine-tuning; a LoRA run's trainable "
                   "part is small: run it data parallel (leave out --fsdp)\n"), err
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun's second process: refused before the process group
    assert main([*base, "--ep", "2"]) == 2
    err = capsys.readouterr().err
    assert err == ("mixlab sft: error: --ep with --lora-rank: --ep shards full fine-tuning; a LoRA run's trainable "
                   "part is small: run it data parallel (leave out --ep)\n"), err
    assert not (tmp_path / "run").exists()


class _ShardedWorld2:
    """Rank 0 of two sharded processes (FSDP, or expert parallel), refused before any collective."""

    rank, world, is_main = 0, 2, True

    def __init__(self, *, fsdp: bool, ep: int) -> None:
        self.fsdp, self.ep = fsdp, ep


def test_a_sharded_lora_run_is_refused_before_anything(files: dict[str, Path], tmp_path: Path) -> None:
    from mixlab.config import ConfigError

    cfg = load_finetune_config(None, **_settings(files, "sft", tmp_path / "run", lora_rank=4))
    for flag, par in (("--fsdp", _ShardedWorld2(fsdp=True, ep=1)), ("--ep", _ShardedWorld2(fsdp=False, ep=2))):
        with pytest.raises(ConfigError, match=rf"^fine-tuning setting 'lora_rank': {flag} shards full fine-tuning; "
                                              rf"a LoRA .* \(leave out {flag}\)$"):
            finetune(cfg, parallel=par)  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()
