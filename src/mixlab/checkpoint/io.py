"""Checkpoint folders on disk: safetensors files (single or sharded with an index), read lazily
and written atomically. Pickle files are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not match the model; the message names the file."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAMES = ("model.safetensors.index.json", "consolidated.safetensors.index.json")


def _pickle_hint(path: Path) -> str:
    return (
        f"{path}: pickle checkpoints are never unpickled by mixlab (loading one can run arbitrary code). "
        "Convert it once in a trusted environment, e.g. "
        "`python -c \"import torch; from safetensors.torch import save_file; "
        f"save_file(torch.load('{path.name}', weights_only=True), 'model.safetensors')\"`, "
        "or load it with transformers and call save_pretrained(..., safe_serialization=True)."
    )


def _check_header(path: Path) -> None:
    """Validate the safetensors header before handing the file to the library, for a clear message."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} bytes, file has {size})")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, the file has {size}"
        )


def _inside(root: Path, name: str, index: Path) -> Path:
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise CheckpointError(f"{index}: weight_map entry {name!r} points outside the checkpoint folder")
    full = root / p
    if full.resolve().parent != root.resolve() and root.resolve() not in full.resolve().parents:
        raise CheckpointError(f"{index}: weight_map entry {name!r} resolves outside the checkpoint folder")
    return full


def tensor_files(root: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it, validating index and headers."""
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint folder")
    index = next((root / n for n in INDEX_NAMES if (root / n).is_file()), None)
    files: list[Path]
    declared: dict[str, Path] = {}
    if index is not None:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
            raise CheckpointError(f"{index}: not a valid index (expected a JSON object with 'weight_map')") from None
        for tname, fname in weight_map.items():
            declared[tname] = _inside(root, str(fname), index)
        files = sorted(set(declared.values()))
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: shard {f.name!r} is named in the index but missing from {root}")
    else:
        files = sorted(root.glob("*.safetensors"))
        if not files:
            pickles = sorted(p for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(_pickle_hint(pickles[0]))
            raise CheckpointError(f"{root}: no *.safetensors files found")
    where: dict[str, Path] = {}
    for f in files:
        _check_header(f)
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                if k in where:
                    raise CheckpointError(f"{root}: tensor {k!r} appears in two files: {where[k].name} and {f.name}")
                where[k] = f
    for tname, f in declared.items():
        if where.get(tname) != f:
            raise CheckpointError(f"{index}: tensor {tname!r} is mapped to {f.name} but is not in that file")
    return where


class TensorReader:
    """Open safetensors files (memory-mapped) and read tensors by name."""

    def __init__(self, where: dict[str, Path]) -> None:
        self.where = where
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def keys(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        if f not in self._handles:
            self._handles[f] = self._stack.enter_context(safe_open(str(f), framework="pt"))
        return self._handles[f].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        f = self.where[name]
        if f not in self._handles:
            self._handles[f] = self._stack.enter_context(safe_open(str(f), framework="pt"))
        return tuple(self._handles[f].get_slice(name).get_shape())


def write_sharded(
    tensors: Iterator[tuple[str, torch.Tensor]],
    dst: Path,
    *,
    extra_files: dict[str, str],
    max_shard_bytes: int = 5 * 2**30,
    single_name: str = "model.safetensors",
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors as safetensors shards (with an index when more than one) plus `extra_files`
    (name -> text), atomically: everything goes to a temporary folder next to `dst`, which then
    replaces `dst` in one rename. A crash leaves the old `dst` untouched."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        stem = single_name.removesuffix(".safetensors")
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        names: list[list[str]] = [[]]
        shard_paths: list[Path] = []

        def flush(final: bool) -> None:
            nonlocal size
            if not shards[-1]:
                return
            p = tmp / f"{stem}-part{len(shard_paths) + 1:05d}.safetensors"
            save_file(shards[-1], str(p), metadata={"format": "pt", **(metadata or {})})
            shard_paths.append(p)
            shards[-1] = {}
            size = 0
            if not final:
                names.append([])

        for name, t in tensors:
            nbytes = t.numel() * t.element_size()
            if size and size + nbytes > max_shard_bytes:
                flush(final=False)
            shards[-1][name] = t.contiguous()
            names[-1].append(name)
            size += nbytes
        flush(final=True)
        n = len(shard_paths)
        if n == 1:
            shard_paths[0].rename(tmp / single_name)
        else:
            weight_map: dict[str, str] = {}
            total = 0
            for k, p in enumerate(shard_paths):
                final_name = f"{stem}-{k + 1:05d}-of-{n:05d}.safetensors"
                p.rename(tmp / final_name)
                with safe_open(str(tmp / final_name), framework="pt") as h:
                    for key in h.keys():
                        weight_map[key] = final_name
                total += (tmp / final_name).stat().st_size
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / f"{single_name}.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for fname, text in extra_files.items():
            (tmp / fname).write_text(text)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, dst: Path) -> None:
    """Swap `tmp` into place as `dst`; the old `dst` is only removed after the new one is in place."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
