"""mixlab's distributed entry points called more than once in one Python process (a notebook, a
sweep script calling `mixlab.cli.main` in a loop): each run sets up its process layout and tears it
down, and the next run in the same processes works as a fresh command would.

Like tests/test_parallel_generate.py, a group of processes (gloo, loopback, forked) runs a list of jobs;
a world of one (`train --fsdp` without torchrun) runs in the test's own process."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest

from processes import run_group


def _generate_twice_job(rank: int, job: dict[str, Any]) -> None:
    """`mixlab generate --ep 2` twice through `cli.main`: rank 0 writes what each run printed. Rank 1
    ends its process group a second after rank 0 (as a process that prints, or saves, at the end)."""
    import time

    from mixlab.cli import main
    from mixlab.parallel import mesh

    if rank == 1:
        shutdown = mesh.shutdown
        mesh.shutdown = lambda: (time.sleep(1), shutdown())[1]  # type: ignore[func-returns-value]
    for run in range(2):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["generate", "--model", job["model"], "--prompt", "Bonjour, le monde", "--max-new-tokens",
                         "6", "--dtype", "float32", "--threads", "1", "--ep", "2"])
        assert code == 0, (rank, run)
        if rank == 0:
            Path(f"{job['out']}.{run}").write_text(out.getvalue())


@pytest.mark.slow  # 2 processes: 7 s on 2 busy cores
def test_generate_ep_twice_in_the_same_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second run hung in `init` (or failed at MIXLAB_DIST_TIMEOUT): torch's env:// store outlives
    the process group in the process that serves it (rank 0: one server per port and process), so the
    second run's process group met in a store that held the first's addresses; rank 0, through first,
    read rank 1's old address there and sent to it. Each run's process group now meets under a prefix
    of its own in a store rank 0 keeps serving: the second run prints the first's text."""
    from mixlab import save_model
    from mixlab.config import get_preset
    from mixlab.model import Transformer

    model = Transformer(get_preset("tiny-moe").replace(vocab_size=32000))
    model.init_weights(std=0.1, seed=0)
    save_model(model, tmp_path / "model")
    monkeypatch.setenv("MIXLAB_DIST_TIMEOUT", "20")  # a hang ends in a one-line error, not at the test's deadline
    run_group(_generate_twice_job, [{"model": str(tmp_path / "model"), "out": str(tmp_path / "out")}], timeout=90)
    first, second = ((tmp_path / f"out.{i}").read_text() for i in range(2))
    assert first and first == second


def _refused_then_run_job(rank: int, job: dict[str, Any]) -> None:
    """`init` refused (the processes disagree on --fsdp), then the next run's `init` in the same
    processes, which must hold a process group again and agree."""
    import torch
    import torch.distributed as dist

    from mixlab.errors import ConfigError
    from mixlab.parallel.mesh import init, shutdown

    with pytest.raises(ConfigError, match="started differently"):
        init(ep=2, fsdp=rank == 1)
    assert not dist.is_initialized()  # nothing of the refused run is left to the next
    layout = init(ep=2, fsdp=True)
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t, group=layout.ep_group)
    assert t.item() == 3.0
    shutdown()


@pytest.mark.slow  # 2 processes: 4 s on 2 busy cores
def test_a_refused_init_leaves_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused `init` (ConfigError from its `check_same`, after the process group was made) left the
    process group up: the next run in the process used it as it was (another world, another store)
    instead of starting its own. `init` now ends what it started when it fails."""
    monkeypatch.setenv("MIXLAB_DIST_TIMEOUT", "20")
    run_group(_refused_then_run_job, [{}], timeout=60)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_fsdp_in_one_process_gives_every_moe_kernel_whole_experts(small_data: Path, tmp_path: Path,
                                                                   impl: str) -> None:
    """`train --fsdp` (a world of one) after a command that loaded the native kernels (generate,
    eval, sft, ...) in the same process failed at its first evaluation: "mixlab.moe.default got mixed
    torch.Tensor and DTensor". FSDP gathered the experts' weights when the experts module's `forward`
    ran, but a MoE layer calls that only for `sorted` / `grouped`: the whole-layer kernels (`native`,
    which `auto` picks for evaluation once the kernels are loaded, `reference`, `decode`, `triton`)
    read the experts' FSDP shards. The experts' FSDP unit is now the MoE layer: every kernel gets the
    whole experts, and the run's losses equal one process's."""
    import dataclasses

    from mixlab.ops import native
    from mixlab.parallel.mesh import init, shutdown
    from mixlab.parallel.train import DistributedTraining
    from mixlab.train.loop import load_train_config, train

    if impl == "auto" and native.load() is None:  # what the commands before it did
        pytest.skip("the native kernels cannot be built here")
    cfg = load_train_config(None, data=str(small_data), out=str(tmp_path / "one"), model="tiny-moe", steps=2,
                            batch_size=2, seq_len=32, moe_impl=impl)
    want = train(cfg)
    par = DistributedTraining(init(ep=1, fsdp=True))
    try:
        got = train(dataclasses.replace(cfg, out=str(tmp_path / "fsdp")), parallel=par)
    finally:
        shutdown()
    assert len(got.evals) == len(want.evals) > 0
    for a, b in zip(got.history + got.evals, want.history + want.evals, strict=True):
        assert a.get("loss") == pytest.approx(b.get("loss"), rel=1e-5), (a, b)
