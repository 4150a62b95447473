"""Groups of processes for the tests of torch.distributed code: `torch.multiprocessing` starts them on
loopback (gloo), each runs its jobs with one thread, and the group is bounded in time.

The processes are forked from multiprocessing's fork server, which imports torch, its distributed
packages and mixlab once (the first group starts it): spawned, every process of every group imported
them itself, 1.5-3 s of CPU each. As a spawned one, each process starts in the caller's working folder
with its sys.path, and `_worker` gives it the caller's environment (the server's is its first caller's)."""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

Job = Callable[[int, dict[str, Any]], None]

multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "torch.distributed.tensor",
                                        "torch.distributed.fsdp", "torch.distributed.checkpoint", "pytest",
                                        "mixlab", "mixlab.checkpoint", "mixlab.parallel.expert",
                                        "mixlab.parallel.train", "mixlab.train.loop", "processes"])


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on loopback (held together while the kernel picks them)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


def _worker(rank: int, world: int, port: int, run: Job, jobs: list[dict[str, Any]], env: dict[str, str]) -> None:
    os.environ.clear()  # the fork server's environment is that of the test that started it
    os.environ.update(env, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    faulthandler.enable()  # a crash (a SIGSEGV once, in test_sharded_memory) prints its Python stack
    from mixlab.parallel.mesh import shutdown

    try:
        for job in jobs:
            run(rank, job)
    finally:
        shutdown()


def run_group(run: Job, jobs: list[dict[str, Any]], *, world: int = 2, timeout: float = 300) -> float:
    """`run(rank, job)` for each job in turn on `world` processes (`run` a module-level function: the
    processes import it); the wall time. Fails the test after `timeout` seconds, the processes killed."""
    return run_groups(run, [(world, jobs)], timeout=timeout)


def run_groups(run: Job, groups: list[tuple[int, list[dict[str, Any]]]], *, timeout: float = 300) -> float:
    """`run_group` for each (world, jobs) of `groups`, all at once, each group of processes on its own
    port (their processes wait on each other's collectives: the groups fill what one leaves idle)."""
    t0 = time.perf_counter()
    env = dict(os.environ)
    ctxs = [mp.start_processes(_worker, args=(world, port, run, jobs, env), nprocs=world, join=False,
                               start_method="forkserver")
            for (world, jobs), port in zip(groups, free_ports(len(groups)), strict=True)]
    deadline = time.monotonic() + timeout
    pending = ctxs
    try:
        while pending:  # join raises as soon as a process of its group has failed
            pending = [ctx for ctx in pending if not ctx.join(timeout=1)]
            if pending and time.monotonic() > deadline:
                pytest.fail(f"{' + '.join(str(w) for w, _ in groups)} processes did not finish within {timeout} s")
    finally:  # a failed or late group ends them all
        for p in (p for ctx in ctxs for p in ctx.processes if p.is_alive()):
            p.kill()
            p.join()
    return time.perf_counter() - t0


def cli(rank: int, job: dict[str, Any]) -> None:
    """A job for `run_group`: `mixlab ARGV` (job["argv"]) as `torchrun -m mixlab ARGV` runs it in each
    process, its main; what it printed and returned go to files `{job["out"]}.{rank}.out`, `.err` and
    `.code`, read back by `cli_results`."""
    import contextlib
    import io

    from mixlab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(job["argv"])
        except SystemExit as e:  # argparse's usage errors (2), as the process would exit
            code = e.code if isinstance(e.code, int) else 1
    for suffix, text in ((".out", out.getvalue()), (".err", err.getvalue()), (".code", str(code))):
        Path(f"{job['out']}.{rank}{suffix}").write_text(text)


def cli_results(out: Path | str, world: int = 2) -> tuple[list[int], str, str]:
    """The exit codes of `cli`'s processes, and their stdout and stderr, each the ranks' in turn."""
    read = [[Path(f"{out}.{rank}{suffix}").read_text() for suffix in (".code", ".out", ".err")]
            for rank in range(world)]
    return [int(r[0]) for r in read], "".join(r[1] for r in read), "".join(r[2] for r in read)


def mixlab(args: list[str], *, nproc: int | None, script: Path | None = None,
           restarts: int = 0) -> subprocess.Popen[str]:
    """`torchrun --nproc-per-node N -m mixlab ARGS` on loopback (or `python -m mixlab ARGS`), this src;
    `script`: torchrun runs that file instead of `-m mixlab`; `restarts`: torchrun's --max-restarts."""
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "mixlab"] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "--max-restarts", str(restarts),
        *([str(script)] if script else ["-m", "mixlab"])]
    return subprocess.Popen(launch + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
