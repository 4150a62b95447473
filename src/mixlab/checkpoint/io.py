"""Checkpoint folders on disk: safetensors files (single or sharded with an index), validated
before any data is read, read straight into preallocated tensors, and written atomically.
Pickle files (`.bin`, `.pt`, `.pth`, ...) are refused, never unpickled.

Reading does not memory-map: the header is parsed and checked here (offsets inside the file,
byte counts matching dtype x shape, no overlaps), then each tensor's bytes are `pread` into the
destination tensor's memory. A mapped file would count its touched pages in the process's
resident memory on top of the copies; reading into place keeps peak memory at the model's size.
The format: 8-byte little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}}`
(offsets relative to the data section), then the raw bytes
(https://github.com/huggingface/safetensors#format).

Saves (`write_sharded`) go through mixlab.atomic: all or nothing, a manifest of the files
written, and an existing folder replaced only if mixlab wrote everything in it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixlab.atomic import atomic_folder
from mixlab.config import parse_bytes, suffix_of
from mixlab.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAMES = ("model.safetensors.index.json", "consolidated.safetensors.index.json")
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit

# safetensors dtype names; the float ones are what a model can be loaded from.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_NAMES = {v: k for k, v in DTYPES.items()}


def _pickle_hint(path: Path) -> str:
    """The refusal of the pickle file `path`, with a command that converts it (every shard of a
    transformers sharded one, whose index sits beside it; tensors sharing memory, as a tied head
    and embeddings do, copied apart: save_file refuses shared tensors). Mistral's consolidated.00.pth
    becomes consolidated.00.safetensors, the name mistral-inference reads too."""
    sharded = (path.parent / "pytorch_model.bin.index.json").is_file() and path.name.startswith("pytorch_model-")
    files = "sorted(glob.glob('pytorch_model-*.bin'))" if sharded else repr([path.name])
    out = path.with_suffix(".safetensors").name if path.name.startswith("consolidated") else "model.safetensors"
    return (
        f"{path}: pickle checkpoints are never unpickled by mixlab (unpickling can run arbitrary code). "
        f"Convert {'its shards' if sharded else 'it'} once, in an environment you trust, to safetensors, e.g. "
        "`python -c \"import glob, torch; from safetensors.torch import save_file; "
        "save_file({k: v.clone(memory_format=torch.contiguous_format) for f in "
        f"{files} for k, v in torch.load(f, weights_only=True).items()}}, '{out}')\"`, "
        "or load it with transformers and call save_pretrained(out_dir) (which writes safetensors)."
    )


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: `file`, absolute byte range [start, end), dtype name, shape."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header; CheckpointError naming the file and tensor on any fault."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block the read forever
            raise CheckpointError(f"{path}: not a regular file")
        size = st.st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(
                    f"{path}: truncated or corrupt safetensors file: header claims {n} bytes, the file has {size}"
                )
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} bytes)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = isinstance(dtype, str) and all(isinstance(x, int) and x >= 0 for x in (*shape, b, end)) and b <= end
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {entry!r}")
        if dtype in DTYPES:
            want = math.prod(shape) * DTYPES[dtype].itemsize
            if end - b != want:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header: tensor {name!r} ({dtype} {list(shape)}) needs {want} "
                    f"bytes, its offsets span {end - b}"
                )
        out[name] = TensorInfo(path, dtype, shape, base + b, base + end)
    need = max((t.end for t in out.values()), default=base)
    if need > size:
        raise CheckpointError(f"{path}: truncated safetensors file: tensors need {need} bytes, the file has {size}")
    spans = sorted((t.start, t.end, k) for k, t in out.items() if t.nbytes)
    for (_, e0, k0), (b1, _, k1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensors {k0!r} and {k1!r} overlap")
    return out


def _inside(root: Path, name: str, index: Path) -> Path:
    """The shard `name` of an index, which must stay inside `root`.

    Symlinks out of the folder are refused, with one exception: the Hugging Face hub cache, where
    `snapshots/REV/FILE` links to `../../blobs/SHA` of the same repository.
    """
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise CheckpointError(f"{index}: weight_map entry {name!r} points outside the checkpoint folder")
    if suffix_of(p) != ".safetensors":
        raise CheckpointError(f"{index}: weight_map entry {name!r} is not a .safetensors file")
    full = root / p
    _check_inside(root, full, f"{index}: weight_map entry {name!r}")
    return full


def _check_inside(root: Path, full: Path, what: str) -> None:
    real, real_root = full.resolve(), root.resolve()
    hub_blobs = real_root.parent.parent / "blobs" if real_root.parent.name == "snapshots" else None
    if real_root not in real.parents and real.parent != hub_blobs:
        raise CheckpointError(f"{what} resolves to {real}, outside the checkpoint folder (a symlink out?)")


def _load_index(index: Path) -> dict[str, str]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise CheckpointError(f"{index}: tensor {k!r} is listed twice in the index ({out[k]!r} and {v!r})")
            out[k] = v
        return out

    if not index.is_file():
        raise CheckpointError(f"{index}: not a regular file")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=no_duplicates)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{index}: not a valid index (expected a JSON object with a 'weight_map')") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
    return weight_map


def scan(root: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint folder `root`, by name, with its file and byte range.

    Validates the index (shards present, inside the folder, each tensor in exactly one shard and
    where the index says) and every header; reads no tensor data.
    """
    if not root.is_dir():
        if root.is_file() and suffix_of(root) in PICKLE_SUFFIXES:
            raise CheckpointError(_pickle_hint(root))
        raise CheckpointError(f"{root}: not a checkpoint folder")
    index = next((root / n for n in INDEX_NAMES if (root / n).is_file()), None)
    declared: dict[str, Path] = {}
    if index is not None:
        for tname, fname in _load_index(index).items():
            declared[tname] = _inside(root, fname, index)
        files = sorted(set(declared.values()))
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: shard {f.name!r} is named in the index but missing from {root}")
    else:
        files = sorted(root.glob("*.safetensors"))
        # Mistral's repositories hold both formats side by side: transformers' files and Mistral's
        # consolidated ones. Read transformers', as an index next to both would (INDEX_NAMES' order).
        hf = [f for f in files if not f.name.startswith("consolidated")]
        files = hf or files
        if not files:
            pickles = sorted(p for p in root.iterdir() if suffix_of(p) in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(_pickle_hint(pickles[0]))
            raise CheckpointError(f"{root}: no *.safetensors files found")
        for f in files:
            _check_inside(root, f, str(f))
    where: dict[str, TensorInfo] = {}
    for f in files:
        for k, info in read_header(f).items():
            if k in where:
                raise CheckpointError(f"{root}: tensor {k!r} appears in two files: {where[k].file.name} and {f.name}")
            if index is not None and k not in declared:
                raise CheckpointError(f"{f}: tensor {k!r} is not listed in {index.name}")
            where[k] = info
    for tname, f in declared.items():
        if tname not in where or where[tname].file != f:
            raise CheckpointError(f"{index}: tensor {tname!r} is mapped to {f.name} but is not in that file")
    return where


def tensor_files(root: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it (see `scan`)."""
    return {k: v.file for k, v in scan(Path(root)).items()}


def _pread_into(fd: int, buf: memoryview, offset: int, info: TensorInfo, name: str) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{info.file}: file ended while reading tensor {name!r} (truncated?)")
        done += n


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, writable, without a copy."""
    arr: Any = t.reshape(-1).view(torch.uint8).numpy()
    return memoryview(arr).cast("B")


def all_finite(x: torch.Tensor) -> bool:
    """Whether `x` holds no NaN or Inf, by one reduction with no temporary of its size: NaN and Inf
    propagate into a sum, and weights never sum past float32's range, which bf16's shares (a float16
    sum can pass its own, so float16 is checked by its extremes). Not `sum(dtype=torch.float32)`:
    on CPU that converts bf16 element by element, ~25x slower than bf16's own sum, which accumulates
    in float32 anyway (it was half of loading a bf16 checkpoint)."""
    if x.numel() == 0:
        return True
    if x.dtype == torch.float16:
        return all(math.isfinite(float(v)) for v in x.aminmax())
    return math.isfinite(float(x.sum()))


class TensorReader:
    """Read tensors of a checkpoint by name, straight from the files (no memory map).

    `TensorReader(scan(root))` or, for older callers, `TensorReader(tensor_files(root))`.
    """

    def __init__(self, where: dict[str, TensorInfo] | dict[str, Path]) -> None:
        infos: dict[str, TensorInfo] = {}
        headers: dict[Path, dict[str, TensorInfo]] = {}
        for k, v in where.items():
            if isinstance(v, TensorInfo):
                infos[k] = v
            else:
                if v not in headers:
                    headers[v] = read_header(v)
                infos[k] = headers[v][k]
        self.infos = infos
        self.where = {k: v.file for k, v in infos.items()}
        self._fds: dict[Path, int] = {}

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def keys(self) -> set[str]:
        return set(self.infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def dtype(self, name: str) -> str:
        return self.infos[name].dtype

    def _fd(self, f: Path) -> int:
        if f not in self._fds:
            self._fds[f] = os.open(f, os.O_RDONLY)
        return self._fds[f]

    def read_into(self, name: str, dest: torch.Tensor, *, offset: int | None = None) -> None:
        """Fill `dest` (any layout, dtype or device, same number of elements) with tensor `name`,
        in the stored tensor's row-major order. Reads in place when `dest` is a contiguous CPU
        tensor of the stored dtype; otherwise through one temporary of `dest`'s size.

        `offset`: read only `dest.numel()` elements from element `offset` on (a piece of the tensor,
        e.g. one process's rows; the other bytes are never read)."""
        info = self.infos[name]
        if info.dtype not in DTYPES:
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, which torch cannot read")
        stored = DTYPES[info.dtype]
        total = math.prod(info.shape)
        if dest.numel() + (offset or 0) > total or (offset is None and dest.numel() != total):
            raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected "
                                  f"{dest.numel()} elements" + (f" from element {offset}" if offset else ""))
        start = info.start + (offset or 0) * stored.itemsize
        if dest.dtype == stored and dest.device.type == "cpu" and dest.is_contiguous():
            _pread_into(self._fd(info.file), _bytes_of(dest), start, info, name)
            return
        tmp = torch.empty(dest.shape if offset is not None else info.shape, dtype=stored)
        _pread_into(self._fd(info.file), _bytes_of(tmp), start, info, name)
        dest.copy_(tmp.view(dest.shape))

    def get(self, name: str) -> torch.Tensor:
        """A new CPU tensor holding `name`, as stored."""
        info = self.infos[name]
        if info.dtype not in DTYPES:
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, which torch cannot read")
        t = torch.empty(info.shape, dtype=DTYPES[info.dtype])
        self.read_into(name, t)
        return t


# -- writing ----------------------------------------------------------------------------------


def write_safetensors(path: Path, tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """Write one safetensors file, streaming each tensor's bytes (no copy of contiguous tensors)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors:
        if t.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be written to safetensors here")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the library writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in tensors:
            if t.numel():
                f.write(_bytes_of(t.detach().to("cpu").contiguous()))
        f.flush()
        os.fsync(f.fileno())


_WEIGHT_FILES = ("config.json", "params.json")


def _is_weight_file(name: str) -> bool:
    return name.lower().endswith((".safetensors", ".index.json", *PICKLE_SUFFIXES, ".gguf")) or name in _WEIGHT_FILES


def write_sharded(
    tensors: Iterable[tuple[str, torch.Tensor]],
    dst: Path,
    *,
    extra_files: dict[str, str],
    max_shard_bytes: int | str = 5 * 2**30,
    single_name: str = "model.safetensors",
    metadata: dict[str, str] | None = None,
    copy_files: Sequence[Path] = (),
    sources: Sequence[str | Path] = (),
    overwrite: bool = False,
    inputs: Mapping[Path, str] | None = None,
) -> None:
    """Write tensors as safetensors shards of at most `max_shard_bytes` (bytes, or a size such as
    "2GB"; a larger tensor gets a shard of its own; an index when more than one), plus `extra_files`
    (name -> text) and `copy_files` (copied as they are), atomically (mixlab.atomic).

    An existing `dst` is replaced only if it holds nothing but what a previous mixlab save wrote
    (or `overwrite`); a `dst` that is or contains one of `sources` or `inputs` (the files a source
    reads beyond itself, `mixlab.checkpoint.input_files`) is refused (OutputError).
    """
    # Checked first: 0 or -1 wrote one tensor per shard, a size string failed mid-write.
    shard_bytes = parse_bytes(max_shard_bytes, what="max_shard_bytes")
    with atomic_folder(dst, sources=sources, overwrite=overwrite, kind="checkpoint", inputs=inputs) as tmp:
        stem = single_name.removesuffix(".safetensors")
        meta = {"format": "pt", **(metadata or {})}
        seen: set[str] = set()
        parts: list[list[str]] = []
        shard: list[tuple[str, torch.Tensor]] = []
        size = 0

        def flush() -> None:
            nonlocal shard, size
            if shard:
                write_safetensors(tmp / f"{stem}-part{len(parts) + 1:05d}.safetensors", shard, meta)
                parts.append([name for name, _ in shard])
                shard, size = [], 0

        for name, t in tensors:
            if name in seen:
                raise ValueError(f"tensor {name!r} is written twice")
            seen.add(name)
            nbytes = t.numel() * t.element_size()
            if shard and size + nbytes > shard_bytes:
                flush()
            shard.append((name, t))
            size += nbytes
        flush()
        total = 0
        if len(parts) == 1:
            (tmp / f"{stem}-part00001.safetensors").rename(tmp / single_name)
        else:
            weight_map: dict[str, str] = {}
            for k, names in enumerate(parts):
                final = f"{stem}-{k + 1:05d}-of-{len(parts):05d}.safetensors"
                (tmp / f"{stem}-part{k + 1:05d}.safetensors").rename(tmp / final)
                total += sum(i.nbytes for i in read_header(tmp / final).values())
                weight_map.update(dict.fromkeys(names, final))
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / f"{single_name}.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for fname, text in extra_files.items():
            (tmp / fname).write_text(text, encoding="utf-8")
        for src in copy_files:
            if not (tmp / src.name).exists():
                shutil.copyfile(src, tmp / src.name)
