"""Sparse upcycling: turn a dense Mistral/Llama-style checkpoint into a Mixtral-style MoE checkpoint.

Komatsuzaki et al., "Sparse Upcycling" (arXiv 2212.05055): every expert of a layer starts as a copy
of that layer's dense FFN, the router is new, everything else (embeddings, attention, norms, output
head) is copied unchanged. Mixtral 8x7B is widely believed to have been started this way from
Mistral 7B (the Mixtral paper does not say).

Why the MoE computes exactly the dense function right after upcycling (without noise): the MoE
output is sum_k weight_k * FFN_{e_k}(x); the top-k weights are a softmax over the chosen logits, so
they sum to 1, and every FFN_e is the same function, so the sum is FFN(x) whatever the router chose
(zero, random or any other router init). Only float rounding of the weighted sum differs.

The conversion streams: after every name and shape is checked, tensors are read one key-map rule
(at most one layer's FFN) at a time and handed to `write_sharded` as a generator, so peak memory is
about the distinct data of one output shard (`max_shard_bytes`), not the model; exact expert
copies share the dense tensor.

Shape legend: E experts, D model width, F FFN width.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixlab.checkpoint import hub_hint, input_files, untied_head_error
from mixlab.checkpoint.io import DTYPES, FLOAT_DTYPES, CheckpointError, TensorReader, tensor_files, write_sharded
from mixlab.checkpoint.keymaps import Rule, detect_format, rules
from mixlab.config import ConfigError, ModelConfig, MoEConfig, read_json_object, suffix_of
from mixlab.dtypes import dtype_name, parse_dtype
from mixlab.tokenizer import tokenizer_files

__all__ = ["ROUTER_INITS", "UpcycleReport", "upcycle", "upcycle_config"]

ROUTER_INITS = ("zeros", "normal", "uniform")


_DENSE_TYPES = ("mistral", "llama")


@dataclass(frozen=True)
class UpcycleReport:
    """What `upcycle` wrote: the MoE config and parameter counts before and after."""

    config: ModelConfig
    dense_params: int
    moe_params: int
    moe_active_params: int
    n_tensors: int


def _check_hf_config(d: dict[str, Any], source: str) -> None:
    """Refuse dense configs whose architecture does not map onto Mistral's (and so Mixtral's)."""
    model_type = d.get("model_type")
    if model_type == "mixtral" or "num_local_experts" in d or "num_experts" in d:
        raise ConfigError(f"{source}: this checkpoint is already a mixture of experts (model_type {model_type!r}); "
                          "upcycling needs a dense Mistral- or Llama-style model")
    if model_type not in _DENSE_TYPES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported for upcycling "
                          f"(expected one of {', '.join(_DENSE_TYPES)})")
    # hidden_act, biases and RoPE scaling are ModelConfig.from_hf_dict's to refuse.


def upcycle_config(dense: ModelConfig, *, num_experts: int, top_k: int) -> ModelConfig:
    """The MoE config: the dense one with an E-expert, top-k MoE in place of each FFN."""
    if dense.moe is not None:
        raise ConfigError("the model is already a mixture of experts")
    return dense.replace(moe=MoEConfig(num_experts=num_experts, top_k=top_k))


def _read_dense_config(root: Path) -> tuple[ModelConfig, dict[str, Any], str, Path]:
    """The dense config, the file's fields, the tensors' format ("hf" for a transformers config.json,
    "mistral" for Mistral's params.json) and the config file."""
    f = root / "config.json"
    if f.is_file():  # read first, as ModelConfig.from_dir does
        d = read_json_object(f)
        _check_hf_config(d, str(f))
        return ModelConfig.from_hf_dict(d, source=str(f)), d, "hf", f
    f = root / "params.json"
    if not f.is_file():  # neither file: from_dir raises, naming the folder to use for a training run or checkpoint
        ModelConfig.from_dir(root)
    d = read_json_object(f)
    if d.get("moe") is not None:
        raise ConfigError(f"{f}: this checkpoint is already a mixture of experts (field 'moe'); upcycling "
                          "needs a dense Mistral- or Llama-style model")
    return ModelConfig.from_mistral_dict(d, source=str(f)), d, "mistral", f


def _layer_of(rule: Rule) -> int:
    m = re.match(r"layers\.(\d+)\.", rule.ours)
    return int(m.group(1)) if m else -1


def _router(generator: torch.Generator, *, init: str, std: float, E: int, D: int) -> torch.Tensor:
    if init == "zeros":
        # All logits tie; top-k then picks by index. Training breaks the tie through the aux loss.
        return torch.zeros(E, D)
    if init == "normal":
        return torch.randn(E, D, generator=generator) * std
    if init == "uniform":  # nn.Linear's default (Kaiming-uniform with a=sqrt(5)): U(-1/sqrt(D), 1/sqrt(D))
        bound = 1 / math.sqrt(D)
        return torch.rand(E, D, generator=generator) * (2 * bound) - bound
    raise ValueError(f"unknown router init {init!r}; expected one of {', '.join(ROUTER_INITS)}")


def _expert_copies(
    pieces: list[torch.Tensor], names: tuple[str, ...], *, E: int, noise: float, generator: torch.Generator
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every expert's copy of the dense `pieces` ([w1, w3] or [w2]); `names` lists
    them expert by expert (w1_0, w3_0, w1_1, ...), as the MoE key-map rule does.

    Exact copies are the dense tensors themselves: the shard writer streams each tensor's bytes, so
    E names can share one tensor and a layer's experts cost no extra memory. With `noise` > 0, each
    copy of each matrix gets its own additive Gaussian perturbation N(0, (noise * std(W))^2), with
    std(W) the spread of that dense matrix's entries (so the noise is relative to each matrix's own
    scale), drawn in float32 and cast back to the stored dtype."""
    scales = [noise * w.float().std() for w in pieces]
    k = len(pieces)
    for e in range(E):
        for name, w, scale in zip(names[e * k:(e + 1) * k], pieces, scales, strict=True):
            if noise <= 0:
                yield name, w
            else:
                eps = torch.randn(w.shape, generator=generator, dtype=torch.float32)
                yield name, (w.float() + scale * eps).to(w.dtype)


def upcycle(
    src: str | Path,
    dst: str | Path,
    *,
    num_experts: int = 8,
    top_k: int = 2,
    router_init: str = "normal",
    router_std: float = 0.02,
    noise: float = 0.0,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int | str = 2 * 2**30,
    overwrite: bool = False,
    progress: bool = False,
) -> UpcycleReport:
    """Write at `dst` a Mixtral checkpoint (transformers format, legacy per-expert names) made from
    the dense Mistral/Llama checkpoint at `src` (transformers' config.json, or Mistral's params.json
    and consolidated tensors).

    `router_init`: "zeros", "normal" (std `router_std`) or "uniform" (nn.Linear's default);
    `noise`: relative std of the independent additive Gaussian noise on each expert copy (0 = exact
    copies); `seed` (an integer) seeds router and noise. `dtype`: convert to this dtype or dtype name
    ("bfloat16"; default: as stored). Atomic; an
    existing `dst` holding files mixlab did not write is replaced only with `overwrite`. `progress`: a
    bar of the tensors written, where stderr is a terminal.
    """
    root, out = Path(src), Path(dst)
    dtype = parse_dtype(dtype)
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**64:  # torch.Generator's range
        raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
    if router_init not in ROUTER_INITS:
        raise ValueError(f"unknown router init {router_init!r}; expected one of {', '.join(ROUTER_INITS)}")
    if not (isinstance(noise, int | float) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    if not (isinstance(router_std, int | float) and math.isfinite(router_std) and router_std >= 0):
        raise ValueError(f"router std must be a finite number >= 0, got {router_std!r}")
    if out.resolve() == root.resolve():
        raise ValueError(f"{out}: the output folder must differ from the input folder")
    if root.is_file():  # it said "not a checkpoint folder" of a GGUF or of the checkpoint's own file
        hint = (f"`mixlab convert {root} DIR` writes it as one (upcycling streams safetensors)"
                if suffix_of(root) == ".gguf" else "pass the folder holding it (with its config.json or params.json)")
        raise CheckpointError(f"{root}: a file, not a checkpoint folder: {hint}")
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such checkpoint folder{hub_hint(root)}")
    dense, raw, src_fmt, config_file = _read_dense_config(root)
    try:
        moe = upcycle_config(dense, num_experts=num_experts, top_k=top_k)
    except ConfigError as e:
        raise ConfigError(f"--experts {num_experts} --top-k {top_k}: {e}") from None

    where = tensor_files(root)
    reader = TensorReader(where)
    keys = reader.keys()
    try:
        fmt = detect_format(keys)
    except ValueError as e:
        raise CheckpointError(f"{root}: {e}") from None
    moe_keys = sorted(k for k in keys if ".experts." in k or "block_sparse_moe" in k or k.endswith(".gate.weight"))
    if moe_keys:  # a router or experts behind a dense config
        raise CheckpointError(f"{root}: tensor {moe_keys[0]!r} shows a mixture of experts; upcycling needs a "
                              "dense checkpoint")
    if fmt != src_fmt:
        raise CheckpointError(f"{root}: the tensors are named in the {fmt!r} format, but {config_file.name} is "
                              f"a {'transformers' if src_fmt == 'hf' else 'Mistral'} config")
    dense_rules = rules(dense, src_fmt)
    moe_rules = {r.ours: r for r in rules(moe, "hf")}
    wanted = {n for r in dense_rules for n in r.theirs}
    missing = sorted(wanted - keys)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{root}: missing tensors: {', '.join(missing[:5])}{more}")
    ignorable = {"lm_head.weight" if src_fmt == "hf" else "output.weight"} if dense.tie_embeddings else set()
    unexpected = sorted(k for k in keys - wanted - ignorable if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        # e.g. q_proj.bias (attention_bias) or a vision tower: weights Mixtral has no place for.
        raise CheckpointError(f"{where[unexpected[0]]}: tensor {unexpected[0]!r} (and {len(unexpected) - 1} more) "
                              "has no counterpart in a Mixtral model; refusing to drop it")
    head = next(iter(ignorable & keys), None)  # a tied config's own head: dropped only when it equals the embeddings
    embed = next(r.theirs[0] for r in dense_rules if r.ours == "tok_embeddings.weight")
    if head is not None and tuple(reader.shape(head)) == tuple(reader.shape(embed)):
        with TensorReader(where) as check:
            if not torch.equal(check.get(head), check.get(embed)):
                raise untied_head_error(where[head], head)
    for r in dense_rules:  # every shape, before anything is read or written
        for n, want in zip(r.theirs, r.shapes, strict=True):
            if tuple(reader.shape(n)) != tuple(want):
                raise CheckpointError(f"{where[n]}: tensor {n!r} has shape {list(reader.shape(n))}, but "
                                      f"{config_file} implies {list(want)}")

    E, D = num_experts, dense.dim
    g = torch.Generator().manual_seed(seed)
    # Group rules by layer (globals first) so each layer's tensors are written next to each other.
    ordered = sorted(dense_rules, key=_layer_of)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        with reader:
            for r in ordered:
                ts = [reader.get(n) for n in r.theirs]
                for n, t in zip(r.theirs, ts, strict=True):
                    if not t.is_floating_point():
                        raise CheckpointError(f"{where[n]}: tensor {n!r} has dtype {t.dtype}, expected a float dtype")
                t = r.join([t.to(dtype) for t in ts] if dtype is not None else ts)
                layer = _layer_of(r)
                if r.ours.endswith(".ffn.w13.weight"):  # the router, then [2F, D] -> E x (w1, w3)
                    gate = _router(g, init=router_init, std=router_std, E=E, D=D).to(t.dtype)
                    yield from zip(moe_rules[f"layers.{layer}.ffn.gate.weight"].theirs, [gate], strict=True)
                if r.ours.endswith((".ffn.w13.weight", ".ffn.w2.weight")):
                    names = moe_rules[r.ours.replace(".ffn.", ".ffn.experts.").removesuffix(".weight")].theirs
                    yield from _expert_copies(r.split(t), names, E=E, noise=noise, generator=g)
                else:  # embeddings, attention, norms, head: same tensors under the same names
                    yield from zip(moe_rules[r.ours].theirs, moe_rules[r.ours].split(t), strict=True)

    cfg = moe.to_hf_dict()
    # transformers >= 5 reads rope_theta from rope_parameters; older versions from rope_theta.
    cfg["rope_parameters"] = {"rope_theta": moe.rope_theta, "rope_type": "default"}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # keep lists (Llama 3) and pads as given
        if key in raw:
            cfg[key] = raw[key]
    n_written = 0

    def counted() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal n_written
        from tqdm import tqdm

        total = sum(len(r.theirs) for r in moe_rules.values())
        for item in tqdm(tensors(), total=total, desc=f"writing {out}", unit="tensor", leave=False,
                         disable=None if progress else True):  # terminal only
            n_written += 1
            yield item

    stored = reader.dtype(dense_rules[0].theirs[0])  # the embeddings
    if dtype is None:
        dtype = DTYPES[stored] if stored in FLOAT_DTYPES else torch.float32
    cfg["dtype"] = cfg["torch_dtype"] = dtype_name(dtype)  # transformers >= 5 reads "dtype"
    # so the MoE folder is usable as is: the tokenizer's files, and mixlab_data.json (the tokenizer a `mixlab train`
    # export was trained with, e.g. bytes; without it the upcycled model would be read with Mixtral's)
    side = tokenizer_files(root) + [f for f in [root / "mixlab_data.json"] if f.is_file()]
    write_sharded(counted(), out, extra_files={"config.json": json.dumps(cfg, indent=2) + "\n"}, copy_files=side,
                  max_shard_bytes=max_shard_bytes, metadata={"mixlab": "upcycled", "source": root.name},
                  sources=[root], overwrite=overwrite, inputs=input_files(root))
    return UpcycleReport(
        config=moe,
        dense_params=dense.param_counts()["total"],
        moe_params=moe.param_counts()["total"],
        moe_active_params=moe.param_counts()["active"],
        n_tensors=n_written,
    )
