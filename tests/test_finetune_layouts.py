"""Sharded full fine-tuning (`mixlab sft --ep 2`, `--fsdp`) on two processes of tests/processes.py's
fork server (gloo on loopback), where test_finetune_fsdp.py stops: `--ep 2` with
`--activation-checkpointing` is the run without it; a checkpoint written under `--ep 2` resumes under
`--fsdp` and under plain data parallelism (and `--fsdp`'s and plain data parallelism's under
`--ep 2`), each reaching the uninterrupted run; SIGTERM to one process of an `--fsdp` run stops both
after the same step with that step's checkpoint (rank 0 says so and returns 143), and the resumed
run reaches the uninterrupted one."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from mixlab.train import checkpoints
from mixlab.train.finetune import finetune, load_finetune_config
from processes import run_group
from test_finetune_fsdp import _same_runs
from test_finetune_parallel import TIMEOUT, _config_file, _records, _settings, files

__all__ = ["files"]  # the fixture, shared with test_finetune_parallel.py


def _job(rank: int, job: dict[str, Any]) -> None:
    """`mixlab ARGS` on this process (`job["args"]`); its return code, stderr, the step its run ended
    at, the signal that stopped it and how many block forwards ran written to `REPORT.RANK.json`.
    `stop_after`: the run stops there with a checkpoint, as if killed; `signal_at`: rank 1 sends itself
    SIGTERM as that step ends (a scheduler's preemption of one process)."""
    import mixlab.train.finetune as ft
    from mixlab.cli import main
    from mixlab.model.transformer import Block

    real, block_forward, seen = ft.finetune, Block.forward, {"block_forwards": 0}

    def counted(self: Block, *args: Any, **kw: Any) -> Any:  # recomputed in backward: counted again
        seen["block_forwards"] += 1  # (where a module forward hook is not called)
        return block_forward(self, *args, **kw)

    def finetune(cfg: Any, **kw: Any) -> Any:  # what `mixlab sft` calls
        def on_step(rec: dict[str, Any]) -> None:
            if rank == 1 and rec["step"] == job.get("signal_at"):
                os.kill(os.getpid(), signal.SIGTERM)
        res = real(cfg, on_step=on_step, stop_after=job.get("stop_after"), **kw)
        seen.update(step=res.step, stopped_by=res.stopped_by)
        return res

    ft.finetune, Block.forward = finetune, counted  # type: ignore[method-assign]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = main(job["args"])
    finally:
        ft.finetune, Block.forward = real, block_forward  # type: ignore[method-assign]
    Path(f"{job['report']}.{rank}.json").write_text(json.dumps({"code": code, "err": err.getvalue(), **seen}))


def _reports(report: Path) -> list[dict[str, Any]]:
    return [json.loads(Path(f"{report}.{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def one(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process SFT run, uninterrupted."""
    out = tmp_path_factory.mktemp("one") / "sft"
    finetune(load_finetune_config(None, **_settings(files, "sft", out)))
    return out


@pytest.mark.slow  # three sharded runs: 10-12 s on 2 busy cores
def test_expert_parallel_with_activation_checkpointing_is_the_same_run(files: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    """`--ep 2 --activation-checkpointing`: the recomputed forward repeats each block's all-to-alls in
    backward, in the same order on every process; the records and weights are those without it,
    exactly (and with `--fsdp` too, within the rounding of another layout). Each sharded export to hf/
    brings the starting folder's tokenizer files and generation_config.json, as the one-process one does."""
    runs = {"plain": ["--ep", "2"], "recomputed": ["--ep", "2", "--activation-checkpointing"],
            "recomputed_fsdp": ["--ep", "2", "--fsdp", "--activation-checkpointing"]}
    base = shutil.copytree(files["base"], tmp_path / "base")
    brought = {"generation_config.json": '{"do_sample": true, "temperature": 0.6}\n',
               "special_tokens_map.json": '{"eos_token": "</s>"}\n'}
    for name, text in brought.items():
        (base / name).write_text(text)
    conf = {name: _config_file(tmp_path / f"{name}.json", _settings({**files, "base": base}, "sft", tmp_path / name))
            for name in runs}
    run_group(_job, [{"args": ["sft", str(conf[name]), *flags], "report": str(tmp_path / name)}
                     for name, flags in runs.items()], timeout=TIMEOUT)
    reports = {name: _reports(tmp_path / name) for name in runs}
    assert [r["code"] for rs in reports.values() for r in rs] == [0] * 6, reports
    for name in ("recomputed", "recomputed_fsdp"):  # each training forward of the 2 blocks ran again in
        # backward: 4 steps x 2 micro-batches x 2 blocks more
        assert [r["block_forwards"] - p["block_forwards"]
                for p, r in zip(reports["plain"], reports[name], strict=True)] == [16, 16], reports
        _same_runs(tmp_path / "plain", tmp_path / name)
    assert _records(tmp_path / "recomputed") == _records(tmp_path / "plain")  # not only within 1e-5: exactly
    a, b = (load_file(str(tmp_path / n / "hf" / "model.safetensors")) for n in ("plain", "recomputed"))
    assert all(a[k].equal(b[k]) for k in a)
    for name in runs:
        assert {n: (tmp_path / name / "hf" / n).read_text() for n in brought} == brought, name


@pytest.mark.slow  # three runs stopped at step 2, four resumed: 10-12 s on 2 busy cores
def test_a_checkpoint_resumes_on_another_sharded_layout(files: dict[str, Path], one: Path, tmp_path: Path) -> None:
    """A sharded checkpoint names each tensor as one process does, its pieces by their offsets in the
    whole tensor (parallel/checkpoint.py), whatever the layout, so DCP reshards it onto any other:
    `--ep 2`'s step 2 continued under `--fsdp` and under plain data parallelism (each process reads it
    whole), `--fsdp`'s and plain data parallelism's (one process's format) under `--ep 2`; each reaches
    the uninterrupted run."""
    flags = {"ep": ["--ep", "2"], "fsdp": ["--fsdp"], "dp": []}
    settings = {layout: _settings(files, "sft", tmp_path / layout) for layout in flags}
    conf = {layout: _config_file(tmp_path / f"{layout}.json", s) for layout, s in settings.items()}
    run_group(_job, [{"args": ["sft", str(conf[layout]), *f], "stop_after": 2, "report": str(tmp_path / f"{layout}")}
                     for layout, f in flags.items()], timeout=TIMEOUT)
    names = {}  # the tensors (pieces) each sharded layout's checkpoint holds: the same names
    for layout in ("ep", "fsdp"):
        ckpt = tmp_path / layout / "checkpoints" / "step_00000002"
        assert checkpoints.validate(ckpt)["ep"] == (2 if layout == "ep" else 1)
        names[layout] = set()
        for f in ckpt.glob("shard-*.safetensors"):
            with safe_open(str(f), "pt") as st:
                names[layout] |= set(st.keys())
    assert names["ep"] == names["fsdp"] and "state.layers.0.ffn.experts.w13.exp_avg" in names["ep"], names
    resumed = [("ep", "fsdp"), ("ep", "dp"), ("fsdp", "ep"), ("dp", "ep")]
    jobs = []
    for was, now in resumed:
        out = tmp_path / f"{was}_to_{now}"
        shutil.copytree(tmp_path / was, out)
        c = _config_file(tmp_path / f"{was}_to_{now}.json", settings[was] | {"out": str(out)})
        jobs.append({"args": ["sft", str(c), *flags[now], "--resume"], "report": str(out)})
    run_group(_job, jobs, timeout=TIMEOUT)
    for was, now in resumed:
        out = tmp_path / f"{was}_to_{now}"
        assert [(r["code"], r["step"]) for r in _reports(out)] == [(0, 4), (0, 4)], _reports(out)
        _same_runs(one, out)


def test_a_signal_to_one_process_of_a_sharded_run_stops_both_after_a_checkpoint(
        files: dict[str, Path], one: Path, tmp_path: Path) -> None:
    """SIGTERM to rank 1 of `sft --fsdp` as step 1 ends (checkpoints every 2 steps): both processes stop
    after step 1 and write its checkpoint together; rank 0 says so in one line and returns 143 (128 +
    SIGTERM), rank 1 returns 0 and says nothing; `--resume` then reaches the uninterrupted run."""
    out = tmp_path / "run"
    conf = _config_file(tmp_path / "run.json", _settings(files, "sft", out))
    run_group(_job, [{"args": ["sft", str(conf), "--fsdp"], "signal_at": 1, "report": str(tmp_path / "stopped")}],
              timeout=TIMEOUT)
    stopped = _reports(tmp_path / "stopped")
    assert [(r["code"], r["step"], r["stopped_by"]) for r in stopped] == [(143, 1, signal.SIGTERM),
                                                                          (0, 1, signal.SIGTERM)], stopped
    assert stopped[0]["err"] == "stopped by SIGTERM at step 1; checkpoint saved; continue with --resume\n", stopped
    assert stopped[1]["err"] == "", stopped
    # step 1's checkpoint (not one of ckpt_every's), whole: both processes' pieces, checksummed
    assert checkpoints.list_checkpoints(out / "checkpoints") == [out / "checkpoints" / "step_00000001"]
    state = checkpoints.validate(out / "checkpoints" / "step_00000001")
    assert (state["step"], state["world"], state["fsdp"]) == (1, 2, True), state
    assert len([f for f in state["files"] if f.startswith("shard-")]) == 2, state["files"]  # each process's
    assert not (out / "hf").exists()
    run_group(_job, [{"args": ["sft", str(conf), "--fsdp", "--resume"], "report": str(tmp_path / "resumed")}],
              timeout=TIMEOUT)
    assert [(r["code"], r["step"], r["stopped_by"]) for r in _reports(tmp_path / "resumed")] == [(0, 4, None)] * 2
    _same_runs(one, out)
