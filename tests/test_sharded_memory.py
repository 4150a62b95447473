"""The memory of a sharded step and checkpoint: two processes under FSDP (gloo, loopback) take an
AdamW step and write a checkpoint (parallel/checkpoint.py `_StreamingWriter`). The step leaves
alive the gradients and AdamW's two states of each local shard and nothing else (no gathered
weight, reduce-scatter buffer or full tensor: `mixlab plan`'s 16 bytes per parameter). Each rank's
file is streamed from its tensors: no Python object of the file's size is made (DCP's own writer
wrote the bytes `safetensors.torch.save` returns, the whole file held twice in memory: +2.5 GB per
process at 212M parameters, BENCHMARKS.md); the files hold what DCP's own writer writes, the same
tensors bit for bit and the same header, and load back into a new model and optimizer. The global
gradient norm (`DistributedTraining.clip_grad_norm`) holds one float64 copy of one gradient at a time."""

from __future__ import annotations

import gc
import json
import math
import tracemalloc
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from processes import run_group

# Big enough that a rank's file (~19 MB: its half of 1.6M parameters and their two AdamW states)
# dwarfs the Python objects DCP's planning makes (0.3-0.6 MB).
CONFIG = {"vocab_size": 256, "dim": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 64,
          "ffn_dim": 256, "max_seq_len": 32}


def _live_bytes() -> int:
    """The bytes of every CPU tensor storage alive in this process (DTensors' local ones)."""
    from torch.distributed.tensor import DTensor

    storages = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and not o.is_meta:
            s = (o.to_local() if isinstance(o, DTensor) else o).untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _job(rank: int, job: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open

    from mixlab.config import ModelConfig, MoEConfig
    from mixlab.parallel import checkpoint as pc
    from mixlab.parallel.mesh import init
    from mixlab.parallel.train import DistributedTraining
    from mixlab.train import loop

    out = Path(job["out"])
    # Traced from before the process group's threads exist, and never stopped (the process ends with
    # os._exit): Python 3.11's tracemalloc.stop() frees its traceback buffer under a thread that waits
    # for the GIL inside its allocation hook, which then writes through NULL (CPython gh-128679, fixed
    # in 3.12.9 / 3.13.2), the rare segfault this test once had in a thread with no Python frame.
    tracemalloc.start()
    par = DistributedTraining(init(ep=1, fsdp=True))
    config = ModelConfig(**CONFIG, moe=MoEConfig(num_experts=4, top_k=2, jitter=0.0))

    def trained() -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
        model = par.build(config, device=torch.device("cpu"), std=0.02, seed=0)
        opt = loop.make_optimizer(model, loop.TrainConfig())
        before = _live_bytes()
        x_BT = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(rank))
        model(x_BT).float().square().mean().backward()
        opt.step()
        del x_BT
        return model, opt, _live_bytes() - before

    model, opt, added = trained()
    shard = sum(p.to_local().nbytes for p in model.parameters())
    assert 3 * shard <= added < 3 * shard + 2**16, (added, shard)  # gradients + exp_avg + exp_avg_sq (+ steps)
    peaks: list[int] = []
    save = dcp.save

    def measured(*a: Any, **kw: Any) -> Any:  # DCP's part of the save (not the manifest's hashing: 8 MiB)
        live = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        try:
            return save(*a, **kw)
        finally:
            peaks.append(tracemalloc.get_traced_memory()[1] - live)

    dcp.save = measured
    try:
        ckpt = par.save(out / "ours", step=1, model=model, optimizer=opt, state={}, keep=1)
    finally:
        dcp.save = save
    dcp.save(pc.state_dict(model, opt, par.layout, set()),
             storage_writer=dcp.HuggingFaceStorageWriter(str(out / "dcp"), save_distributed=True))
    name = f"shard-{rank + 1:05d}-model-00001-of-00001.safetensors"
    mine, theirs = ckpt / name, out / "dcp" / name
    # Python objects only (tracemalloc sees no torch storage): the old writer's bytes of the whole file
    assert len(peaks) == 1 and peaks[0] < mine.stat().st_size / 4, (peaks, mine.stat().st_size)
    with safe_open(mine, "pt") as a, safe_open(theirs, "pt") as b:
        assert json.loads(a.metadata().pop("DCP_SHARDING_INFO")) == json.loads(b.metadata().pop("DCP_SHARDING_INFO"))
        assert a.metadata() == b.metadata()
        assert sorted(a.keys()) == sorted(b.keys()) and len(a.keys()) > 20
        for k in a.keys():
            ta, tb = a.get_tensor(k), b.get_tensor(k)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), k
    fresh, fresh_opt, _ = trained()  # other values: the loads must replace them
    fresh_opt.step()
    par.load(ckpt, model=fresh, optimizer=fresh_opt)
    for (n, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p.to_local(), q.to_local()), n
        for key, v in opt.state[p].items():
            assert torch.equal(v.to_local() if v.dim() else v, fresh_opt.state[q][key].to_local() if v.dim() else
                               fresh_opt.state[q][key]), (n, key)


def test_a_sharded_step_keeps_only_its_states_and_a_checkpoint_no_copy_of_its_file(tmp_path: Path) -> None:
    run_group(_job, [{"out": str(tmp_path)}], world=2)


class _Peak(TorchDispatchMode):
    """The most bytes that the tensors made inside it (new storages, not views or in-place results)
    held at once, each counted until its Python object is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        had = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in had:
                n = t.untyped_storage().nbytes()
                had.add(t.untyped_storage().data_ptr())
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out


def test_the_gradient_norm_holds_one_float64_copy_of_one_gradient_at_a_time() -> None:
    """`DistributedTraining.clip_grad_norm` squares each local gradient in float64 (exact squares):
    it made a copy and then its square, 16 bytes per element of the largest gradient at once (268 MB
    for the 212M model's 2-process shard of `w13`); now the copy is squared in place, 8 bytes, and
    the norm and the clipped gradients are the old expression's bit for bit."""
    from mixlab.config import ModelConfig, MoEConfig
    from mixlab.model import Transformer
    from mixlab.parallel.train import DistributedTraining

    model = Transformer(ModelConfig(**CONFIG, moe=MoEConfig(num_experts=4, top_k=2, jitter=0.0)))
    model.init_weights(seed=0)
    model(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))).float().square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    total = math.sqrt(float(sum(g.double().square().sum() for g in grads)))  # the old expression's order
    coef = 1e-3 / (total + 1e-6)
    assert coef < 1  # it clips
    # one process, no FSDP: what clip_grad_norm reads of its layout
    par = DistributedTraining(cast(Any, SimpleNamespace(rank=0, world=1, is_main=True, fsdp=False, ep=1, dp=1)))
    with _Peak() as peak:
        norm = par.clip_grad_norm(cast(Any, model), 1e-3)
    largest = max(g.numel() for g in grads)
    assert largest * 8 <= peak.peak < largest * 12, (peak.peak, largest)
    assert norm == total
    for p, g in zip([p for p in model.parameters() if p.grad is not None], grads, strict=True):
        assert p.grad is not None and torch.equal(p.grad, g * coef)
