"""The process layout: a 2-D `DeviceMesh` over (dp, ep) and the process group it comes from.

World = dp * ep processes. Every process reads its own share of each global batch (data parallel
over all `world` ranks). Expert weights are split over the `ep` ranks of a row of the mesh (each
holds E / ep experts, tokens travel to them by all-to-all) and replicated (or FSDP-sharded) over the
`dp` rows; dense weights are replicated (or FSDP-sharded) over all ranks. Consecutive ranks form an
expert-parallel group, so with ep <= GPUs per node the all-to-all stays inside a node (as torchtitan).

gloo on CPU, NCCL on CUDA. Under `torchrun` the rank and world come from its environment; a plain
`python -m mixlab ... --ep 1 --fsdp` run becomes a world of one on a free loopback port.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mixlab.errors import ConfigError, UsageError


@dataclass
class Layout:
    rank: int
    world: int
    ep: int
    dp: int
    fsdp: bool
    device: torch.device
    mesh: DeviceMesh  # 2-D, dims ("dp", "ep")
    world_mesh: DeviceMesh  # 1-D over all ranks: dense weights' FSDP and data parallelism

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("ep")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("dp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_ep(ep: int) -> None:
    """Refuse an `--ep` this world cannot hold, before any process group is made (every rank
    raises the same error; the CLI prints rank 0's, exit 2: the flag's value). The world is torchrun's `WORLD_SIZE`,
    else one."""
    under_torchrun = dist.is_initialized() or "WORLD_SIZE" in os.environ
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if ep < 1:
        raise UsageError(f"--ep {ep}: the expert-parallel size must be at least 1")
    if world % ep == 0:
        return
    if not under_torchrun:
        raise UsageError(f"--ep {ep} needs {ep} processes (or a multiple of {ep}) and this is one: launch it "
                          f"with `torchrun --nproc-per-node {ep} -m mixlab ...`")
    raise UsageError(f"--ep {ep} must divide the number of processes ({world}): use --ep "
                      + " or ".join(str(d) for d in range(1, world + 1) if world % d == 0)
                      + f", or run a multiple of {ep} processes")


def _timeout() -> timedelta | None:
    """`MIXLAB_DIST_TIMEOUT` (seconds): how long a collective waits for a process that neither
    answers nor dies (a stopped or hung rank) before the run ends; unset: torch's default."""
    raw = os.environ.get("MIXLAB_DIST_TIMEOUT", "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"MIXLAB_DIST_TIMEOUT={raw!r}: expected a number of seconds > 0")
    return timedelta(seconds=seconds)


def check_same(values: dict[str, Any]) -> None:
    """Refuse a run whose processes disagree on `values` (settings, what a file holds): torchrun starts
    each node's processes from that node's command line and files, and processes started apart hang
    in a collective whose shapes differ (until the timeout) or train apart without a word. Collective
    over all ranks; every rank raises the same error (the CLI prints rank 0's)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, values)
    first = everyone[0]
    diff = [(rank, key) for rank, v in enumerate(everyone) for key in sorted(set(first) | set(v))
            if v.get(key) != first.get(key)]
    if diff:
        rank, key = diff[0]
        keys = list(dict.fromkeys(k for _, k in diff))
        raise ConfigError(f"the processes of this run were started differently ({', '.join(keys)}): rank {rank} has "
                          f"{key} = {_short(everyone[rank].get(key))}, rank 0 {_short(first.get(key))}; start every "
                          "process with the same command, config and data")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_saved_env: dict[str, str | None] = {}  # what the torchrun variables `init` set for a world of one were
_kept: dict[tuple[str, ...], dist.Store] = {}  # by (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE): one at most


def _attempt_store() -> dist.Store:
    """The store this run's process group meets in, seen through a prefix of this attempt's own
    (`_attempt_name`), so that no run reads what an earlier one left there.

    Under torchrun's agent (`TORCHELASTIC_USE_AGENT_STORE`): its store. torchrun keeps one store across
    the restarts of `--max-restarts`, and the process group of a restarted run read the addresses its
    dead predecessors left there (gloo: "Connection refused" with --master-addr, a hang with
    --standalone; torch 2.13, pytorch#135712). torch's own prefix, `TORCHELASTIC_RESTART_COUNT`, counts
    each node's failures: after one node's worker dies, that node's restart is attempt 1 and the
    healthy node's attempt 0, so the nodes' processes waited for each other under two prefixes
    (pytorch#108158). Rank 0 names the attempt instead.

    Elsewhere (MASTER_ADDR / MASTER_PORT): a store that rank 0 serves on MASTER_PORT for as long as its
    process lives, kept across the runs of one process (a notebook, a script calling `cli.main` in a
    loop). torch's own dies with each process group: a process that began its next run before rank 0
    had ended the last one met the last run's store, took the addresses left there and hung."""
    timeout = _timeout() or default_pg_timeout
    env = tuple(os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"))
    addr, port, rank, world = env[0], int(env[1]), int(env[2]), int(env[3])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store: dist.Store = dist.TCPStore(addr, port, is_master=False, timeout=timeout)
    else:
        if env not in _kept:
            _kept.clear()  # the store of another layout (a world of one's last port): served no more
            _kept[env] = dist.TCPStore(addr, port, is_master=rank == 0, timeout=timeout)
        store = _kept[env]
        store.set_timeout(timeout)
    name = _attempt_name(store, rank, world, timeout)
    return dist.PrefixStore(f"mixlab/attempt_{name}", store)


def _attempt_name(store: dist.Store, rank: int, world: int, timeout: timedelta) -> str:
    """A name every process of this attempt agrees on and no earlier attempt used. Rank 0 takes a new
    number and publishes it; another rank may read the number a dead rank 0 of an earlier attempt
    published (torchrun starts the new processes once the old ones are gone, in any order), so it
    asks rank 0 to confirm under a nonce of its own and reads the number again until one does."""
    if rank == 0:
        name = str(store.add("mixlab/attempts", 1))
        store.set("mixlab/attempt", name)
        for r in range(1, world):  # only this attempt's ranks write under the new name
            store.set(f"mixlab/{name}/ok_{store.get(f'mixlab/{name}/rank_{r}').decode()}", "1")
        return name
    nonce, deadline = secrets.token_hex(8), time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        name = store.get("mixlab/attempt").decode()
        store.set(f"mixlab/{name}/rank_{rank}", nonce)
        for _ in range(20):  # a second for that rank 0 to confirm (store.wait's timeout prints a warning)
            if store.check([f"mixlab/{name}/ok_{nonce}"]):
                return name
            time.sleep(0.05)
    raise dist.DistStoreError(f"rank 0 did not answer within {timeout.total_seconds():g} s (MIXLAB_DIST_TIMEOUT)")


def init(*, ep: int = 1, fsdp: bool = False, device: str = "cpu") -> Layout:
    """Join (or start, for a world of one) the process group and build the mesh. `device`: "cpu"
    (gloo) or "cuda" (NCCL, one GPU per process: `LOCAL_RANK`'s; `cuda:N` in a world of one)."""
    dev_type, index = torch.device(device).type, torch.device(device).index
    if dev_type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: distributed runs support cpu (gloo) and cuda (NCCL)")
    check_ep(ep)
    if index is not None and dev_type == "cuda" and "RANK" in os.environ and not dist.is_initialized():
        # every process would put its model on that GPU while NCCL used its LOCAL_RANK's
        raise ConfigError(f"--device {device}: under torchrun each process uses the GPU of its LOCAL_RANK; pass "
                          "--device cuda (CUDA_VISIBLE_DEVICES chooses which GPUs a node's processes get)")
    started = not dist.is_initialized()
    if started and "RANK" not in os.environ and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # half of torchrun's
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but RANK is not: launch with torchrun, "
                          "which sets both (and MASTER_ADDR, MASTER_PORT), or unset WORLD_SIZE")
    try:
        if started:
            if "RANK" not in os.environ:  # not under torchrun: a world of one (until `shutdown`)
                mine = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(_free_port()))
                _saved_env.update({k: os.environ.get(k) for k in mine})
                os.environ.update(mine)
            if dev_type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) if index is None else index)
            backend = "nccl" if dev_type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=_timeout(), store=_attempt_store(), rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]))
        check_same({"--ep": ep, "--fsdp": fsdp, "--device": dev_type})  # a mesh of another shape would hang
        world, rank = dist.get_world_size(), dist.get_rank()
        torch_dev = torch.device("cuda", torch.cuda.current_device()) if dev_type == "cuda" else torch.device("cpu")
        mesh = init_device_mesh(dev_type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
        world_mesh = init_device_mesh(dev_type, (world,), mesh_dim_names=("world",))
        return Layout(rank=rank, world=world, ep=ep, dp=world // ep, fsdp=fsdp, device=torch_dev, mesh=mesh,
                      world_mesh=world_mesh)
    except BaseException:
        if started:  # a failed run leaves no process group (nor a world of one's variables) to the next
            shutdown()
        raise


def shutdown() -> None:
    """End the process group; a world of one's environment goes too, so the process's next run (or its
    `check_ep`) sees no torchrun."""
    if dist.is_initialized():
        dist.destroy_process_group()
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env.clear()
