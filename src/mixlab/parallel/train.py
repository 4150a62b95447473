"""Training over several processes: `DistributedTraining`, the `mixlab.train.loop.Parallel` that
`mixlab train --ep E [--fsdp]` (under torchrun) hands to the one training loop.

Each of the `world` processes computes the mean loss of its share of the global batch; the gradient
of the global mean loss is then the mean of their gradients:

- dense weights: averaged over all processes (all-reduce, or FSDP2's reduce-scatter);
- expert weights with expert parallelism: each shard already holds the sum of its expert group's
  contributions (the all-to-all's backward brought them), so it is summed over the `dp` replicas
  and divided by `world` (FSDP averages over `dp`; `sync_grads` divides by `ep`. FSDP's
  `set_gradient_divide_factor` would do it in the reduce-scatter, but gloo has no PREMUL_SUM).

Fine-tuning (`mixlab sft|dpo --ep E [--fsdp]`, train/finetune.py) gives each process its share of
the global loss instead of a mean: `sum_grads` combines the gradients the same way without the
division (`_combine`, the one home of both).

The load-balancing loss's fractions f are summed over the processes (`router_losses(reduce=)`), so
losses and gradients equal the one-process run's on the whole batch (tests/test_parallel.py).
"""

from __future__ import annotations

import copy
import math
import secrets
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from mixlab.config import ModelConfig
from mixlab.dtypes import parse_dtype
from mixlab.errors import OutputError
from mixlab.model import Transformer
from mixlab.model.moe import MoEBlock
from mixlab.parallel import checkpoint as dcp_ckpt
from mixlab.parallel.expert import apply_expert_parallel, expert_param_names
from mixlab.parallel.mesh import Layout, check_same
from mixlab.train import checkpoints


def apply_fsdp(model: Transformer, layout: Layout, *, dtype: str = "float32") -> None:
    """FSDP2 (`fully_shard`) per block, the experts of each MoE layer as their own unit over the `dp`
    ranks (sharded on dim 1: a rank may hold fewer experts than there are replicas), everything
    else over all ranks; the root holds the embedding, final norm and output.

    `dtype`: the run's autocast dtype. Under bfloat16 the blocks' and the experts' units gather their
    matrices in bf16 and reduce-scatter their gradients in float32 (`MixedPrecisionPolicy`, as
    torchtitan's `mixed_precision_param` / `mixed_precision_reduce`): half the all-gather bytes and
    half the gathered block, while the sharded float32 master weights and AdamW's states stay. What
    autocast computes from float32 weights without FSDP gathers in float32: the router (a unit of
    its own: it routes in float32), each block's two RMSNorm scales (a unit of their own, one
    all-gather of 2 x dim values: autocast leaves their products float32; in bf16 a scale moves in
    steps of 2^-8, coarser than AdamW's first updates, and two processes' SFT losses moved 10x further
    from one process's), and the root (embedding, final norm, output). No unit casts its inputs
    (`cast_forward_inputs=False`): the residual stream stays float32, autocast casts each matmul's
    input, so one step's forward is one process's under autocast, product for product
    (tests/test_fsdp_mixed_precision.py)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    full = MixedPrecisionPolicy()  # the parameters' own dtype: float32
    low = full if dtype == "float32" else MixedPrecisionPolicy(
        param_dtype=parse_dtype(dtype), reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.layers:
        if isinstance(block.ffn, MoEBlock):
            # The experts' unit is the MoE layer, not the experts module: FSDP gathers a unit's weights
            # when its forward runs, and only `sorted` / `grouped` call the experts' forward; the
            # whole-layer kernels (native, reference, decode, triton) read the weights in `mix`. The
            # router, a dense weight, is a unit of its own over all ranks, gathered in float32: it
            # routes in float32 (model/moe.py `Router.forward`), from its float32 weights.
            fully_shard(block.ffn.gate, mesh=layout.world_mesh, mp_policy=full)
            fully_shard(block.ffn, mesh=layout.mesh["dp"], shard_placement_fn=lambda p: Shard(1), mp_policy=low)
            # Its output is a view (`[T, D]` -> `[B, T, D]`), which FSDP warns of at every forward in
            # case the caller adds to it in place; `Block.feed_forward` adds out of place.
            warnings.filterwarnings("ignore", r"FSDP2-wrapped module \(FSDPMoEBlock\) returned a view", UserWarning)
        if low is not full:  # the norms' scales float32 (see above): one unit, unsharded from attn_norm to ffn_norm
            norms = cast("list[torch.nn.Module]", [block.attn_norm, block.ffn_norm])
            fully_shard(norms, mesh=layout.world_mesh, mp_policy=full)
        fully_shard(block, mesh=layout.world_mesh, mp_policy=low)
    fully_shard(model, mesh=layout.world_mesh, mp_policy=full)
    if hasattr(model, "forward_output"):  # the training loop's entry point, besides forward
        register_fsdp_forward_method(model, "forward_output")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t`'s squares in float64 (each square exact), the copy squared in place: one float64
    copy of one gradient alive at a time, not a copy and its square (16 bytes per element of the
    largest local gradient: 268 MB for a 212M model on 2 processes; the same sums)."""
    d = t.detach().to(torch.float64, copy=True)
    return d.mul_(d).sum()


def sum_grads(params: list[torch.nn.Parameter], *, group: dist.ProcessGroup | None, size: int,
              divide: float = 1.0) -> None:
    """The gradients of `params` summed over the `size` processes of `group` in one all-reduce of a
    flat buffer, then divided by `divide`; a missing gradient (a weight unused here: no token reached
    it) counts as zeros."""
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch._utils._flatten_dense_tensors(grads)
    if size > 1:
        dist.all_reduce(flat, group=group)
    if divide != 1:
        flat /= divide
    for g, new in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(new)


class DistributedTraining:
    """Expert parallelism (`ep`), optional FSDP2, distributed checkpoints and the consolidated export
    for `mixlab.train.loop.train(parallel=)`."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.rank, self.world, self.is_main = layout.rank, layout.world, layout.is_main
        # fine-tuning: with either, the model is `build`'s, sharded (`finetune.Sharded`)
        self.fsdp, self.ep = layout.fsdp, layout.ep
        self.expert_names: set[str] = set()
        self._experts: set[int] = set()  # `build`'s expert-parallel parameters (ids), for `sum_grads`

    def parallelize(self, model: Transformer, *, dtype: str = "float32") -> None:
        """Shard `model` in place; `dtype`: the run's autocast dtype (`apply_fsdp`'s mixed precision)."""
        self.expert_names = expert_param_names(model)
        apply_expert_parallel(model, self.layout)
        if self.layout.fsdp:
            apply_fsdp(model, self.layout, dtype=dtype)

    def build(self, config: ModelConfig, *, device: torch.device, std: float, seed: int,
              init_from: str | Path = "", dtype: str = "float32") -> Transformer:
        """The model as `Transformer(config).init_weights(std=, seed=)` (or, with `init_from`,
        `checkpoints.load_init(init_from, config)`) then `parallelize` would make it, without ever
        holding the whole model: built on the meta device (no memory), sharded there, then only this
        process's pieces allocated on `device` (`to_empty`) and filled: with their part of each
        parameter's full initial value, drawn one parameter at a time from the same generator, or with
        the elements they hold, read from the checkpoint's files (`checkpoints.load_init_pieces`).
        Peak memory: the shards plus one full parameter (on the CPU) while initialising, plus one
        piece (or one Mistral-format wqkv) while reading a checkpoint; not the whole float32 model
        (torchtitan's meta-device initialisation). `dtype`: the run's autocast dtype (`parallelize`)."""
        with torch.device("meta"):
            model = Transformer(config)
        values = None if init_from else copy.deepcopy(model).initial_values(std=std, seed=seed)  # still on meta
        self.parallelize(model, dtype=dtype)
        model.to_empty(device=device)
        if config.tie_embeddings:  # to_empty gives each module its own plain tensor (DTensors it keeps shared)
            model.output.weight = model.tok_embeddings.weight
        params = dict(model.named_parameters())
        if self.layout.ep > 1:
            self._experts = {id(p) for name, p in params.items() if name in self.expert_names}
        if values is None:
            checkpoints.load_init_pieces(
                init_from, config, {name: (_local(p), self.piece(name, p)) for name, p in params.items()},
                lambda: dcp_ckpt.weights(model, self.layout, self.expert_names))
            return model
        with torch.no_grad():
            for name, full in values:
                p = params[name]
                _local(p).copy_(full[self.piece(name, p)])
                del full  # before the next one is drawn
        return model

    def piece(self, name: str, p: torch.Tensor) -> tuple[slice, ...]:
        """Which part of the whole weight `name` this process's parameter `p` holds (its experts, its
        FSDP shard), one slice per dimension."""
        start, shape = [0] * p.dim(), list(p.shape)  # a DTensor's shape is its whole tensor's
        if name in self.expert_names:  # E / ep consecutive experts (`local_experts`)
            start[0] = self.layout.ep_rank * shape[0]
        if isinstance(p, DTensor):  # an FSDP shard of them
            local, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            shape, start = list(local), [s + o for s, o in zip(start, offset, strict=True)]
        return tuple(slice(s, s + n) for s, n in zip(start, shape, strict=True))

    def check_same(self, values: dict[str, Any]) -> None:
        check_same(values)

    def reshard(self, model: Transformer) -> None:
        """The model's FSDP modules back to their shards, as after a backward (`parallel.checkpoint.reshard`)."""
        dcp_ckpt.reshard(model)

    def check_shared(self, folder: Path) -> None:
        """Refuse a run folder that some process does not see as rank 0 does (not on a filesystem all
        nodes share): every process writes its pieces of each checkpoint into it and rank 0 commits
        the folder, so such a process's pieces were missing from every checkpoint without a word,
        found only by a resume that could not load them. Collective; every rank raises the same error."""
        probe = folder / f".mixlab-shared-{secrets.token_hex(8)}"
        if self.is_main:
            probe.touch()
        box: list[Any] = [probe.name]
        dist.broadcast_object_list(box, src=0)
        seen: list[Any] = [None] * self.world
        dist.all_gather_object(seen, (folder / box[0]).is_file())
        if self.is_main:
            probe.unlink()
        blind = [rank for rank, ok in enumerate(seen) if not ok]
        if blind:
            who = f"rank {blind[0]}" if len(blind) == 1 else f"ranks {', '.join(map(str, blind))}"
            raise OutputError(f"{folder}: {who} of {self.world} cannot see the files rank 0 writes there; every "
                              "process writes its pieces of each checkpoint into --out: put it on a filesystem all "
                              "nodes share")

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        x = t.detach().to(self.layout.device, copy=True)
        dist.all_reduce(x)
        return x.to(t.device)

    def _split(self, model: Transformer) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        dense: list[torch.nn.Parameter] = []
        experts: list[torch.nn.Parameter] = []
        for name, p in model.named_parameters():
            (experts if name in self.expert_names and self.layout.ep > 1 else dense).append(p)
        return dense, experts

    def _combine(self, dense: list[torch.nn.Parameter], experts: list[torch.nn.Parameter], *, divide: int) -> None:
        """Each gradient summed over the processes that share its weight, then divided by `divide`:
        dense weights over all of them; expert shards, which the all-to-all's backward has already
        given their expert group's contributions, over the `dp` replicas. With FSDP the backward's
        reduce-scatter has made each shard the mean over its unit's mesh (all processes, or the dp
        ones): times that mesh's size over `divide` (exact: one divides the other)."""
        if self.layout.fsdp:
            for p in dense + experts:
                if p.grad is None or not isinstance(p, DTensor):
                    continue
                n = p.device_mesh.size()
                if n > divide:
                    _local(p.grad).mul_(n // divide)
                elif n < divide:
                    _local(p.grad).div_(divide // n)
            return
        for params, group, size in ((dense, None, self.world), (experts, self.layout.dp_group, self.layout.dp)):
            sum_grads(params, group=group, size=size, divide=divide)

    def sync_grads(self, model: Transformer) -> None:
        """Average the gradients over the processes (see the module docstring)."""
        dense, experts = self._split(model)
        self._combine(dense, experts, divide=self.world)

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Each of `params`' gradients summed over the processes (data-parallel or sharded fine-tuning,
        where each process's loss is its share of the global batch's; `_combine`). One that no process
        has (a weight no token reached) stays None, as in one process, where AdamW then leaves it be
        (expert shards always have one: `expert._keep_in_graph`)."""
        if not self.layout.fsdp:
            used = self.all_sum(torch.tensor([p.grad is not None for p in params], dtype=torch.float32))
            params = [p for p, u in zip(params, used.tolist(), strict=True) if u]
        self._combine([p for p in params if id(p) not in self._experts],
                      [p for p in params if id(p) in self._experts], divide=1)

    def clip_grad_norm(self, model: Transformer, max_norm: float) -> float:
        """The global gradient norm (every weight counted once) and clipping to `max_norm`, as
        `torch.nn.utils.clip_grad_norm_` on the one-process model."""
        dense, experts = self._split(model)
        sq = torch.zeros((), dtype=torch.float64)
        for params, replicas in ((dense, self.world), (experts, self.layout.dp)):
            for p in params:
                if p.grad is None:
                    continue
                # A sharded gradient counts each piece once; a replicated one once over its replicas.
                w = 1.0 if isinstance(p.grad, DTensor) else 1.0 / replicas
                sq += _sum_of_squares(_local(p.grad)).cpu() * w
        total = math.sqrt(float(self.all_sum(sq)))
        coef = min(1.0, max_norm / (total + 1e-6))
        if coef < 1.0:
            for p in model.parameters():
                if p.grad is not None:
                    _local(p.grad).mul_(coef)
        return total

    def save(self, root: Path, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             state: dict[str, Any], keep: int) -> Path:
        return dcp_ckpt.save(root, step=step, model=model, optimizer=optimizer, state=state, keep=keep,
                             layout=self.layout, expert_names=self.expert_names)

    def load(self, ckpt: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             checksums: bool = True) -> dict[str, Any]:
        return dcp_ckpt.load(ckpt, model=model, optimizer=optimizer, layout=self.layout,
                             expert_names=self.expert_names, checksums=checksums)

    def export(self, model: Transformer, path: Path, write: Callable[..., None]) -> None:
        dcp_ckpt.export(model, path, layout=self.layout, expert_names=self.expert_names, write=write)
