"""Distributed training checkpoints (`torch.distributed.checkpoint`) and the consolidated export.

Every rank writes the pieces it owns into one folder in DCP's safetensors format
(`HuggingFaceStorageWriter(save_distributed=True)`'s files, streamed from the tensors by
`_StreamingWriter`): each file is a plain safetensors file whose header records each piece's offset
in the whole tensor, so reading one needs no pickle and any number of processes can read it back
(DCP's planner reshards). The tensor names are those of a single-process checkpoint
(`train/checkpoints.py`): parameters by name, optimizer state as `state.<param>.<key>`. Hence:

- a single-process run resumes a sharded checkpoint (`checkpoints.load` reads this format), and a
  sharded run resumes a single-process checkpoint (DCP's reader takes its `model.safetensors` and
  `optimizer.safetensors` as whole tensors), on any number of processes;
- crash safety is a one-process checkpoint's (`mixlab.atomic`): DCP writes its own shards, into
  the temporary folder rank 0's `atomic_folder` made (all ranks), never into `step_*` itself; after
  a barrier rank 0 writes `rng.safetensors`, `state.json` and the manifest (sizes, SHA-256), fsyncs
  and renames the folder into place: that rename is the commit. A failure before it (any rank's
  DCP write, rank 0's files) deletes the temporary and leaves the older checkpoints as they were
  (tests/test_atomic.py).

The state dict describes each tensor globally: FSDP parameters are DTensors already; the local
expert shards of expert parallelism become DTensors on the (dp, ep) mesh, Shard(0) over ep (and
FSDP's Shard(1) over dp, or replicated over dp without FSDP), wrapping the same storage, so DCP
loads in place.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._hf_utils import (
    CUSTOM_METADATA_KEY,
    DCP_VERSION_KEY,
    FORMAT_KEY,
    FORMAT_VALUE,
    HF_DCP_VERSION,
    SAVED_OFFSETS_KEY,
    _gen_file_name,
)
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.futures import Future

from mixlab.atomic import atomic_folder
from mixlab.checkpoint import meta_model
from mixlab.checkpoint.io import write_safetensors
from mixlab.errors import CheckpointError
from mixlab.model import Transformer
from mixlab.parallel.mesh import Layout
from mixlab.train import checkpoints


def _global(t: torch.Tensor, layout: Layout, expert: bool) -> torch.Tensor:
    """`t` as DCP should see it: the whole tensor's layout (see the module docstring)."""
    if not expert or layout.ep == 1:
        return t
    local = t.to_local() if isinstance(t, DTensor) else t
    dp_place = t.placements[0] if isinstance(t, DTensor) else Replicate()
    shape = list(t.shape)
    shape[0] *= layout.ep
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, layout.mesh, [dp_place, Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=stride)


class _StreamingWriter(dcp.HuggingFaceStorageWriter):
    """DCP's safetensors writer with each rank's file streamed from its tensors
    (`checkpoint.io.write_safetensors`): the same name, tensors and header (`DCP_SHARDING_INFO`: each
    piece's offsets in the whole tensor), read back by `HuggingFaceStorageReader` alike. DCP's own
    (torch 2.13, `filesystem._write_files_from_queue`) writes the bytes `safetensors.torch.save`
    returns, the whole file made in memory, which the Rust serializer builds and then copies: every
    checkpoint held twice this rank's weights and AdamW states at once (+2.5 GB per process at 212M
    parameters on 2 processes, the largest peak of the run; BENCHMARKS.md "fsdp_memory")."""

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        results: list[WriteResult] = []
        if plan.items:  # as DCP's: a rank with nothing to write writes no file
            name = _gen_file_name(1, 1, plan.storage_data.get("shard_index"))  # prepare_global_plan's
            pieces: list[tuple[str, torch.Tensor]] = []
            offsets: dict[str, dict[str, list[int]]] = {}
            start = 0
            for item in plan.items:
                t = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO or not isinstance(t, torch.Tensor) or item.tensor_data is None:
                    raise TypeError(f"{item.index.fqn}: a checkpoint holds tensors only, not {type(t).__name__}")
                pieces.append((item.index.fqn, t.detach()))
                offsets[item.index.fqn] = {SAVED_OFFSETS_KEY: list(item.tensor_data.chunk.offsets)}
                n = t.numel() * t.element_size()
                results.append(WriteResult(index=item.index, size_in_bytes=n,
                                           storage_data=_StorageInfo(name, start, n)))
                start += n
            write_safetensors(Path(self.path) / name, pieces, {CUSTOM_METADATA_KEY: json.dumps(offsets),
                                                              DCP_VERSION_KEY: str(HF_DCP_VERSION),
                                                              FORMAT_KEY: FORMAT_VALUE})
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done


def reshard(model: torch.nn.Module) -> None:
    """Every FSDP module of `model` back to its shards. A forward without backward (an evaluation)
    leaves the FSDP root's parameters unsharded (FSDP2 keeps the root's for the backward it expects):
    the module then holds other tensors than the optimizer's (norm, embedding, output), whose states
    would be missing from a checkpoint, and an optimizer made then would hold the gathered tensors."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer, layout: Layout,
               expert_names: set[str]) -> dict[str, torch.Tensor]:
    """Parameters and optimizer state, named as a single-process checkpoint names them (`model`'s
    `named_parameters()`; its FSDP modules resharded first)."""
    reshard(model)
    sd: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        ex = name in expert_names
        sd[name] = _global(p.detach(), layout, ex)
        for key, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                sd[f"state.{name}.{key}"] = _global(v, layout, ex) if v.dim() > 0 else v
    return sd


def weights(model: torch.nn.Module, layout: Layout, expert_names: set[str]) -> dict[str, torch.Tensor]:
    """The parameters alone, as `state_dict` names them (what `--init-from` reads of a sharded run's
    checkpoint)."""
    return {n: _global(p.detach(), layout, n in expert_names) for n, p in model.named_parameters()}


def save(root: Path, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
         keep: int, layout: Layout, expert_names: set[str]) -> Path:
    """Write checkpoint `step` under `root` from all ranks (collective), atomically; keep the newest `keep`."""
    name = f"step_{step:08d}"
    if layout.is_main:
        checkpoints.remove_leftovers(root)
    # Rank 0 owns the atomic folder (mixlab.atomic: temporary sibling, manifest with SHA-256, fsync,
    # rename); every rank writes its pieces into the temporary it names.
    folder = atomic_folder(root / name, kind="training-checkpoint", checksums=True, overwrite=True) \
        if layout.is_main else contextlib.nullcontext(None)
    with folder as made:
        box: list[Any] = [str(made) if made is not None else None]
        dist.broadcast_object_list(box, src=0)
        tmp = Path(box[0])
        try:
            dcp.save(state_dict(model, optimizer, layout, expert_names),
                     storage_writer=_StreamingWriter(str(tmp), save_distributed=True))
        except dcp.CheckpointException as e:  # a BaseException: it went through as a traceback on every rank
            rank, (cause, _) = next(iter(e.failures.items()))
            raise CheckpointError(f"{root / name}: cannot write the checkpoint (rank {rank}: "
                                  f"{str(cause).splitlines()[0][:300]})") from None
        dist.barrier()
        if layout.is_main:
            checkpoints.save_rng(tmp / "rng.safetensors")
            names = [n for n, _ in model.named_parameters()]
            groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
                      for g in optimizer.param_groups]
            files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.suffix == ".safetensors"}
            full = {**state, "step": step, "format": "dcp", "world": layout.world, "ep": layout.ep,
                    "fsdp": layout.fsdp, "optimizer": {"param_groups": groups, "scalars": {}, "param_names": names},
                    "files": files}
            (tmp / "state.json").write_text(json.dumps(full, indent=1), encoding="utf-8")
    dist.barrier()  # committed
    if layout.is_main:
        for old in checkpoints.list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    return root / name


def load(ckpt: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, layout: Layout,
         expert_names: set[str], checksums: bool = True) -> dict[str, Any]:
    """Load a checkpoint of either format (sharded by any number of processes, or single-process) into
    this layout, in place; returns its state.json (`checksums`: as `checkpoints.load`)."""
    state = checkpoints.validate(ckpt, checksums=checksums)
    if optimizer is not None:
        checkpoints.init_optimizer_state(optimizer)
    sd = state_dict(model, optimizer, layout, expert_names) if optimizer is not None else weights(
        model, layout, expert_names)
    checkpoints.dcp_load(sd, ckpt)
    checkpoints.load_rng(ckpt / "rng.safetensors")
    return state


def export(model: Transformer, path: Path, *, layout: Layout, expert_names: set[str],
           write: Callable[..., None]) -> None:
    """One consolidated checkpoint from a sharded model, streamed: rank 0's writer, `write(meta, path,
    weights=)` (`save_model(..., weights=)`: size-bounded safetensors shards, each written as it fills,
    and the index, in one atomic folder), asks for each tensor in turn; rank 0 names it to the other
    ranks and all gather it whole (collective). Rank 0 holds the shard being filled and the tensor
    being gathered, never the whole model; the other ranks one tensor at a time."""
    params = dict(model.named_parameters())

    def announce(name: str | None) -> str | None:  # rank 0's name to every rank; None: the writer is done
        box: list[Any] = [name]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(name: str) -> torch.Tensor:  # collective
        t = _global(params[name].detach(), layout, name in expert_names)
        return t.full_tensor() if isinstance(t, DTensor) else t

    def weights(name: str) -> torch.Tensor:  # on the host: the writer keeps a shard's tensors until it fills
        announce(name)
        return gather(name).cpu()

    if layout.is_main:
        try:
            write(meta_model(model.config), path, weights=weights)
        finally:  # also when the write failed: the other ranks stop waiting for a tensor
            announce(None)
    else:
        while (name := announce(None)) is not None:
            gather(name)
    dist.barrier()
