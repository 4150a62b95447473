"""Load and save models in every format users hold: transformers (legacy per-expert keys and v5
fused keys, single or sharded) and Mistral's consolidated format.

Loading builds the model on the meta device and assigns tensors read from memory-mapped
safetensors, so peak memory stays near the model's size and nothing is half-loaded on error:
every name, shape and dtype is checked before the first tensor is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from mixlab.checkpoint.io import CheckpointError, TensorReader, tensor_files, write_sharded
from mixlab.checkpoint.keymaps import Rule, detect_format, rules
from mixlab.config import ConfigError, ModelConfig
from mixlab.model import Transformer

__all__ = ["CheckpointError", "load_model", "load_state", "save_model"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPE_NAMES)}") from None


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Transformer(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_state(path: str | Path, config: ModelConfig, *, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (mixlab name, tensor) for every tensor of the checkpoint at `path`, after checking
    that names, shapes and dtypes all match `config`."""
    root = Path(path)
    where = tensor_files(root)
    reader = TensorReader(where)
    keys = reader.keys()
    try:
        fmt = detect_format(keys)
    except ValueError as e:
        raise CheckpointError(f"{root}: {e}") from None
    table: list[Rule] = rules(config, fmt)
    wanted = {name for r in table for name in r.theirs}
    missing = sorted(wanted - keys)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{root}: missing tensors: {', '.join(missing[:5])}{more}")
    # transformers writes lm_head even for tied embeddings; rotary caches are derived, not weights.
    ignorable = {"lm_head.weight", "output.weight"} if config.tie_embeddings else set()
    unexpected = sorted(k for k in keys - wanted - ignorable if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"{root}: unexpected tensors for this config: {', '.join(unexpected[:5])}{more} "
            "(does the config match the weights?)"
        )
    expected = _expected_shapes(config)
    # Check every shape and dtype before reading any data, by joining meta stand-ins.
    for r in table:
        shapes = [reader.shape(n) for n in r.theirs]
        try:
            joined = r.join([torch.empty(s, device="meta") for s in shapes])
        except (RuntimeError, IndexError) as e:
            raise CheckpointError(f"{root}: tensors {', '.join(r.theirs[:3])} have incompatible shapes {shapes}: {e}") from None
        if tuple(joined.shape) != expected[r.ours]:
            detail = ", ".join(f"{n} {list(s)}" for n, s in zip(r.theirs[:3], shapes[:3], strict=False))
            raise CheckpointError(
                f"{where[r.theirs[0]]}: wrong shape for {detail}: expected {list(expected[r.ours])} in total "
                f"for {r.ours}, found {list(joined.shape)}"
            )
    with reader:
        for r in table:
            ts = [reader.get(n) for n in r.theirs]
            for n, t in zip(r.theirs, ts, strict=True):
                if t.dtype not in _FLOAT_DTYPES:
                    raise CheckpointError(f"{where[n]}: tensor {n!r} has dtype {t.dtype}, expected a float dtype")
            t = r.join([t.to(dtype) for t in ts] if dtype is not None else ts)
            yield r.ours, t


def load_model(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    config: ModelConfig | None = None,
) -> Transformer:
    """Load a checkpoint folder (transformers or Mistral format) into a mixlab `Transformer`.

    `dtype`: convert every tensor at load (default: as stored). The model is in eval mode.
    """
    root = Path(path)
    if root.is_file() and root.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        from mixlab.checkpoint.io import _pickle_hint

        raise CheckpointError(_pickle_hint(root))
    try:
        config = config or ModelConfig.from_dir(root)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    want = parse_dtype(dtype)
    state = dict(load_state(root, config, dtype=want))
    with torch.device("meta"):
        model = Transformer(config)
    if config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device).eval()


def save_model(
    model: Transformer,
    path: str | Path,
    *,
    fmt: str = "hf",
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Save `model` as a checkpoint folder: `fmt="hf"` (transformers, legacy per-expert names, which
    every transformers version reads) or `"mistral"` (params.json + consolidated.safetensors).
    Atomic: a crash mid-save leaves any previous folder at `path` intact."""
    config: ModelConfig = model.config
    want = parse_dtype(dtype)
    if fmt not in ("hf", "mistral"):
        raise ValueError(f"cannot save format {fmt!r}; expected 'hf' or 'mistral'")
    state = model.state_dict()

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for r in rules(config, fmt):
            t = state[r.ours].detach().cpu()
            if want is not None:
                t = t.to(want)
            yield from zip(r.theirs, r.split(t), strict=True)
        if fmt == "hf" and config.tie_embeddings:
            pass  # transformers re-ties lm_head from embed_tokens

    dtype_name = str(want or next(iter(state.values())).dtype).removeprefix("torch.")
    if fmt == "hf":
        cfg = config.to_hf_dict()
        cfg["torch_dtype"] = dtype_name
        extra = {"config.json": json.dumps(cfg, indent=2) + "\n"}
        write_sharded(tensors(), Path(path), extra_files=extra, max_shard_bytes=max_shard_bytes)
    else:
        extra = {"params.json": json.dumps(config.to_mistral_dict(), indent=2) + "\n"}
        write_sharded(tensors(), Path(path), extra_files=extra, max_shard_bytes=max_shard_bytes,
                      single_name="consolidated.safetensors")
