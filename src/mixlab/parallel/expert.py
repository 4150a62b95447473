"""Expert parallelism, applied to a built single-device model from outside.

Each rank of an expert-parallel group of size P keeps E / P consecutive experts of every MoE layer
(dim 0 of the stacked `Experts.w13` / `w2`). The layer's forward becomes (GShard arXiv 2006.16668
§2.2, without capacity: dropless, as torchtitan's and Megatron-Core's token dispatchers):

    route locally -> rows grouped by (global) expert (`dispatch`) -> all-to-all to the experts' owners
    -> regroup the received rows by local expert -> `Experts.forward(xs, counts)` -> the reverse
    permutation and all-to-all -> `combine` (weights, each token's K rows summed)

The splits are uneven (as many rows as were routed), so the all-to-all is `all_to_all_single` with
split sizes, which gloo supports (its list form `all_to_all` it does not); its autograd form sends
the gradients back the same way. The counts are exchanged first with one small all-to-all.

Shape legend: T tokens, D width, E experts (global), L = E / P local experts, P group size,
N rows grouped by expert, R rows received.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from mixlab.model import Transformer
from mixlab.model.moe import MoEBlock, Routing
from mixlab.ops.moe import combine, dispatch
from mixlab.parallel.mesh import Layout


def expert_param_names(model: Transformer) -> set[str]:
    """The names of the stacked expert weights (those expert parallelism shards on dim 0)."""
    return {f"layers.{i}.ffn.experts.{w}" for i, b in enumerate(model.layers) if isinstance(b.ffn, MoEBlock)
            for w in ("w13", "w2")}


def local_experts(w_E: torch.Tensor, layout: Layout) -> torch.Tensor:
    """This rank's E / ep consecutive experts of a stacked expert weight (a view of dim 0)."""
    L = w_E.shape[0] // layout.ep
    return w_E[layout.ep_rank * L: (layout.ep_rank + 1) * L]


def _segments_index(sizes_PL: torch.Tensor) -> torch.Tensor:
    """Rows arrive source-major (source p's rows for local experts 0..L-1, then p+1's); the index that
    reorders them expert-major (expert 0's rows from every source first), as `Experts` expects."""
    P, L = sizes_PL.shape
    starts_PL = (sizes_PL.reshape(-1).cumsum(0) - sizes_PL.reshape(-1)).view(P, L)
    sizes, starts = sizes_PL.t().reshape(-1).tolist(), starts_PL.t().reshape(-1).tolist()
    parts = [torch.arange(s, s + n) for s, n in zip(starts, sizes, strict=True) if n]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    y = funcol.all_to_all_single_autograd(x, out_splits, in_splits, group)
    return funcol.wait_tensor(y) if isinstance(y, funcol.AsyncCollectiveTensor) else y


def ep_forward(ffn: MoEBlock, layout: Layout, x_BTD: torch.Tensor) -> tuple[torch.Tensor, Routing]:
    """The MoE layer with its experts spread over the expert-parallel group (see the module docstring)."""
    B, T, D = x_BTD.shape
    x_TD = x_BTD.reshape(-1, D)
    routing = ffn.gate(x_TD)
    P = layout.ep
    E = routing.logits_TE.shape[1]
    L = E // P
    xs_ND, d = dispatch(x_TD, routing.idx_TK, E, pad_to=1)
    send_PL = torch.tensor(d.counts, dtype=torch.long).view(P, L)
    # The counts first (NCCL exchanges device tensors, gloo CPU ones).
    send_dev = send_PL.to(layout.device)
    recv_dev = torch.empty_like(send_dev)
    dist.all_to_all_single(recv_dev, send_dev, group=layout.ep_group)
    recv_PL = recv_dev.cpu()
    send, recv = send_PL.sum(1).tolist(), recv_PL.sum(1).tolist()
    xr_RD = _all_to_all(xs_ND, recv, send, layout.ep_group)
    order_R = _segments_index(recv_PL).to(x_TD.device)
    ys_RD = ffn.experts(xr_RD.index_select(0, order_R), recv_PL.sum(0).tolist())
    back_R = torch.empty_like(order_R)
    back_R[order_R] = torch.arange(len(order_R), device=order_R.device)
    ys_ND = _all_to_all(ys_RD.index_select(0, back_R), send, recv, layout.ep_group)
    y_TD = combine(ys_ND, routing.weight_TK, d, x_TD.dtype)
    return y_TD.view(B, T, D), routing


def _keep_in_graph(experts: nn.Module, args: tuple[Any, ...], ys_ND: torch.Tensor) -> torch.Tensor | None:
    """A forward hook on `Experts` (args: xs_ND, counts): a zero added to the output that keeps the
    (empty) input and the weights in the autograd graph when this rank received no row at all: every
    rank then runs the all-to-all's backward (a collective), and the weights' gradient is zeros rather
    than missing, so gradient reduction (FSDP's reduce-scatter, the all-reduce) sees the same tensors
    on every rank. A hook, not a wrapped `forward` holding the module: that reference cycle kept each
    layer's float experts alive after `prepare_for_inference(quant=)` replaced them, until a gc pass."""
    xs_ND, counts = args[0], args[1]
    if sum(counts) == 0 and torch.is_grad_enabled():
        return ys_ND + (xs_ND.sum() + sum(p.sum() for p in experts.parameters())) * 0.0
    return None


def apply_expert_parallel(model: Transformer, layout: Layout) -> None:
    """Keep this rank's E / ep experts of every MoE layer and route tokens to the others' by
    all-to-all. In place; the model must hold all E experts (plain float `Experts`)."""
    if layout.ep == 1:
        return
    if not any(isinstance(b.ffn, MoEBlock) for b in model.layers):  # else N copies of one process's work
        raise ValueError(f"--ep {layout.ep}: the model is dense (no MoE layer), there are no experts to split; "
                         "leave out --ep (under torchrun, mixlab train then runs data parallel)")
    for i, block in enumerate(model.layers):
        ffn = block.ffn
        if not isinstance(ffn, MoEBlock):
            continue
        experts = ffn.experts
        E = experts.num_experts
        if E % layout.ep:
            raise ValueError(f"--ep {layout.ep} must divide the number of experts ({E})")
        if not all(isinstance(getattr(experts, w, None), nn.Parameter) for w in ("w13", "w2")):
            raise ValueError(f"layer {i}: expert parallelism needs plain float experts (w13, w2), not "
                             f"{type(experts).__name__}")
        with torch.no_grad():
            for w in ("w13", "w2"):
                full = getattr(experts, w)
                setattr(experts, w, nn.Parameter(local_experts(full, layout).clone(), requires_grad=full.requires_grad))
        experts.num_experts = E // layout.ep
        experts.register_forward_hook(_keep_in_graph, prepend=True)  # before FSDP's post-forward reshard
        ffn.forward = functools.partial(ep_forward, ffn, layout)  # type: ignore[method-assign]


def load_expert_parallel(path: str | Path, layout: Layout, *, dtype: str | torch.dtype | None = None,
                         device: str | torch.device = "cpu", adapter: str | Path | None = None,
                         keep_int4: bool = True, quant: str | None = None, group: int | None = None) -> Transformer:
    """`load_model(path, dtype=, device=, adapter=, quant=, group=)` then `apply_expert_parallel(model,
    layout)`, without ever holding the whole model: built and split on the meta device, then only this
    process's tensors allocated in `dtype` (default: as stored, as `load_model`) on `device` and
    filled straight from the files, its experts' elements only (a transformers or Mistral folder:
    `train.checkpoints.read_pieces`, `load_model`'s key maps, conversion and NaN / Inf warnings; a
    GGUF file: `gguf_read.read_gguf_pieces`, its Q4_0 matrices kept int4 as `load_gguf` keeps them,
    this process's experts' bytes as they are, or with `keep_int4=False` dequantised). `adapter`:
    a PEFT LoRA adapter folder merged into this process's tensors, its expert factors narrowed to
    this process's experts (`merge_adapter(experts=)`). `quant` ("int8" / "int4", groups of `group`):
    each matrix of this process's share that the format covers is read into one float temporary and
    quantised at once (`quantize_weight`), as `load_model(quant=)` does: the process holds its share
    quantised plus one weight's floats, never its share's floats; each quantised tensor is the slice of
    one process's (quantisation is per row or group). The split model's MoE layers run the experts'
    own `forward` (any format: `prepare_for_inference(quant=, decoder=False)` quantises each process's
    float share after the load, and leaves one loaded quantised as it is)."""
    from mixlab.checkpoint import (
        _stored_dtype,
        check_quant_args,
        folder_config,
        merge_adapter,
        meta_model,
        parse_device,
        plan,
        read_adapter,
        warn_other_base,
    )
    from mixlab.checkpoint.gguf_read import (
        check_quant_over_q4_0,
        config_from_header,
        default_dtype,
        int4_weights,
        read_gguf_pieces,
        read_header,
    )
    from mixlab.config import as_path, suffix_of
    from mixlab.dtypes import parse_dtype
    from mixlab.model.inference import keep_quantised_modules, quant_names, quantised_buffers, quantize_weight
    from mixlab.parallel.train import DistributedTraining
    from mixlab.train.checkpoints import Piece, read_pieces

    root = as_path(path, what="load_expert_parallel's path")
    dev = parse_device(device)
    group = check_quant_args(quant, group, adapter)  # load_model's refusals
    peft = None if adapter is None else read_adapter(adapter)  # a wrong adapter is told before a long load
    if peft is not None:
        warn_other_base(root, peft)
    gguf = suffix_of(root) == ".gguf" and not root.is_dir()
    int4: dict[str, tuple[torch.Size, torch.Size]] = {}
    if gguf:
        header = read_header(root)
        config = config_from_header(header)
        stored = default_dtype(header)
        int4 = int4_weights(header) if keep_int4 else {}
    else:
        config = folder_config(root)
        _, table, infos = plan(root, config)
        stored = _stored_dtype(table, infos)
    check_quant_over_q4_0(root, bool(int4), quant, group)  # load_gguf's refusals, before anything is read
    quantise = quant_names(meta_model(config), quant, group=group) - set(int4) if quant else set()
    want = parse_dtype(dtype) or stored
    model = meta_model(config)
    par = DistributedTraining(layout)  # its `piece`: which experts this process's tensors hold
    par.parallelize(model)
    model.to(dtype=want)
    L = config.moe.num_experts // layout.ep if config.moe else 0  # a dense model only with --ep 1
    mine = slice(layout.ep_rank * L, (layout.ep_rank + 1) * L)
    # Quantised weights (a GGUF file's Q4_0 matrices, those `quant` rounds as read): modules of this
    # process's shapes on the meta device, allocated by `to_empty` below.
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}  # experts [L, ...]
    meta: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
        name: (torch.empty((L, *q[1:]) if ".experts." in name else q, dtype=torch.uint8, device="meta"),
               torch.empty((L, *s[1:]) if ".experts." in name else s, dtype=torch.float16, device="meta"))
        for name, (q, s) in int4.items()}
    for name in quantise:  # the layout `quantize_weight` gives, from one row on the meta device
        assert quant is not None
        *lead, D = shapes[name]
        q1, s1 = quantize_weight(torch.empty(1, D, dtype=want, device="meta"), quant, group=group, scale_dtype=want)
        meta[name] = (torch.empty((*lead, *q1.shape[1:]), dtype=q1.dtype, device="meta"),
                      torch.empty((*lead, *s1.shape[1:]), dtype=s1.dtype, device="meta"))
    keep_quantised_modules(model, meta)
    model.to_empty(device=dev)
    if config.tie_embeddings and "output.weight" not in meta:  # to_empty gives each module its own tensor
        model.output.weight = model.tok_embeddings.weight
    pieces: dict[str, Piece] = {name: (p, par.piece(name, p)) for name, p in model.named_parameters()}
    if gguf:
        codes = {name: (*quantised_buffers(model, name), mine) for name in int4}
        read_gguf_pieces(header, pieces, codes)
    else:
        read_pieces(root, table, infos, pieces)
    with torch.no_grad():
        for name in sorted(quantise):  # each read into one float temporary, then quantised into its buffers
            assert quant is not None
            if config.tie_embeddings and name == "output.weight":  # a tied head: the embeddings, quantised
                floats = model.tok_embeddings.weight
            else:
                floats = torch.empty(shapes[name], dtype=want, device=dev)
                one = {name: (floats, par.piece(name, floats))}
                if gguf:
                    read_gguf_pieces(header, one)
                else:
                    read_pieces(root, table, infos, one)
            # set_: the buffers hold the new tensors themselves (to_empty's, never written, are freed)
            for dest, t in zip(quantised_buffers(model, name), quantize_weight(floats, quant, group=group,
                                                                                scale_dtype=want), strict=True):
                dest.set_(t)  # type: ignore[call-overload]
            del floats  # before the next one is allocated
    if peft is not None:
        merge_adapter(model, peft, experts=range(mine.start, mine.stop) if L else None)
    if meta:  # as load_gguf's int4 model, load_model(quant=)'s: inference only
        model.requires_grad_(False)
    return model.eval()


def rank0_token(device: torch.device) -> Callable[[int], int]:
    """`Engine(sync_token=...)` for expert-parallel decoding: every process continues with the token
    rank 0 sampled. Each process samples from its own generator (unseeded: another draw per process)
    and its own logits (another node's kernels may round differently); a process that took another
    token would stop at another step and leave the others waiting in an all-to-all."""
    def sync(token: int) -> int:
        t = torch.tensor([token], dtype=torch.long, device=device)  # NCCL sends device tensors
        dist.broadcast(t, src=0)
        return int(t.item())
    return sync
