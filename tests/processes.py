"""Groups of processes for the tests of torch.distributed code: `torch.multiprocessing` spawns them on
loopback (gloo), each runs its jobs with one thread, and the group is bounded in time."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

Job = Callable[[int, dict[str, Any]], None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, run: Job, jobs: list[dict[str, Any]]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from mixlab.parallel.mesh import shutdown

    try:
        for job in jobs:
            run(rank, job)
    finally:
        shutdown()


def run_group(run: Job, jobs: list[dict[str, Any]], *, world: int = 2, timeout: float = 300) -> float:
    """`run(rank, job)` for each job in turn on `world` processes (`run` a module-level function: the
    processes import it); the wall time. Fails the test after `timeout` seconds, the processes killed."""
    t0 = time.perf_counter()
    ctx = mp.start_processes(_worker, args=(world, free_port(), run, jobs), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} processes did not finish within {timeout} s")
    return time.perf_counter() - t0
