"""Read llama.cpp's GGUF files: `mixlab.load_model("model.gguf")`, validated as strictly as safetensors.

The format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian: magic `GGUF`,
version (2 or 3), tensor count and key/value count (uint64), the key/values (string key, uint32 type,
value; strings and arrays carry a uint64 length), the tensor infos (name, uint32 rank, uint64 dims
fastest-first, uint32 ggml type, uint64 offset into the data section), padding to
`general.alignment` (default 32), then the data. `read_header` parses all of it through one bounds
checked cursor and checks everything before any tensor data is read: every length against the bytes
left, counts against what the file can hold, ranks 1-4, dims >= 1 with products that do not
overflow, known types with whole blocks per row, offsets aligned, inside the file and not
overlapping, no duplicate keys or names. A malformed file raises `CheckpointError` naming the file,
the field and what was expected. A GGUF split in parts (llama.cpp's `gguf-split`) is read from its
first part, `PREFIX-00001-of-0000N.gguf`: its metadata, and every part's tensors from their own files.

Mixtral/Mistral/Llama files (`general.architecture = llama`, as llama.cpp's `convert_hf_to_gguf.py`
and mixlab's own `write_gguf` write them) become a mixlab `Transformer`:
- F32, F16 and BF16 tensors are read straight into torch tensors (in `dtype` if given);
- Q4_0 matrices stay 4-bit: mixlab's int4 layout is Q4_0's (`mixlab.ops.quant`), so a block's f16
  scale and 16 nibble bytes are split apart and nothing is requantised (the embedding, a lookup
  table, is dequantised);
- Q8_0 is dequantised exactly (int8 x f16 is exact in float32); the K-quants of the common Q4_K_M /
  Q5_K_M / Q6_K files (Q2_K to Q6_K) and Q4_1, Q5_0, Q5_1 by mixlab's torch code (`gguf_dequant`: equal
  to llama.cpp's values bit for bit, 1.5-3.4x numpy's speed); every other type through the `gguf`
  package's `quants.dequantize`; a type it has no dequantisation for (Q8_1, F64, the integer types)
  is refused, naming the tensor, before any tensor is read;
- with `quant="int4"` (`load_model`'s), every matrix not kept as Q4_0 is rounded to int4 as soon as it
  is read (a K-quant's values rounded a second time); with `quant="int8"` every matrix of a file
  without Q4_0 ones is rounded to int8 as it is read.
The q and k rows are put back from llama.cpp's adjacent-pairs rotary layout to mixlab's rotate-half
layout (the inverse of `gguf.rope_permute`). The tokenizer comes from the metadata
(`mixlab.tokenizer.load_tokenizer("model.gguf")`): a SentencePiece model is rebuilt from the
`llama` vocabulary (pieces, scores, types).

Shape legend: E experts, F expert FFN width, D width, X output rows.
"""

from __future__ import annotations

import functools
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixlab.checkpoint import gguf_dequant
from mixlab.checkpoint.io import CheckpointError, all_finite
from mixlab.config import GGUF_SPLIT_NAME, ConfigError, ModelConfig, MoEConfig, _in_file

MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME (with the terminating zero)
MAX_ELEMENTS = 2**60
MAX_HEADER = 1 << 31  # the most of a file read for its header
FIRST_READ = 16 << 20  # a Mixtral header, with its 32,000-token vocabulary, takes ~1 MB
CHUNK = 4 << 20  # float32 bytes converted at a time: a tensor's temporaries are a chunk's, not its own size

# ggml types mixlab reads itself: type id -> (name, elements per block, bytes per block).
F32, F16, Q4_0, Q8_0, BF16 = 0, 1, 2, 8, 30
CORE_TYPES = {F32: ("F32", 1, 4), F16: ("F16", 1, 2), Q4_0: ("Q4_0", 32, 18), Q8_0: ("Q8_0", 32, 34),
              BF16: ("BF16", 1, 2), **gguf_dequant.BLOCKS}
_AS_TORCH = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}  # read as they are

# GGUF metadata value types: id -> (struct format, size) for scalars; 8 string, 9 array.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
       12: "<f8"}
STRING, ARRAY = 8, 9


def _type_table() -> dict[int, tuple[str, int, int]]:
    """Every ggml type the `gguf` package knows (for validation), else mixlab's own (`CORE_TYPES`)."""
    table = dict(CORE_TYPES)
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        return table
    for t, (block, size) in GGML_QUANT_SIZES.items():
        table.setdefault(int(t), (GGMLQuantizationType(t).name, int(block), int(size)))
    return table


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type: int
    shape: tuple[int, ...]  # torch order (slowest first): GGUF's dims reversed
    start: int  # absolute byte offset in the file
    nbytes: int
    file: Path  # the part of a split GGUF holding it (else the file itself)

    @property
    def type_name(self) -> str:
        return _type_table()[self.type][0]

    def rows(self, lo: int, hi: int) -> GGUFTensor:
        """Rows lo..hi-1 of the tensor seen as [rows, last dim]: one run of its bytes (each row holds
        whole blocks)."""
        per = self.nbytes // math.prod(self.shape[:-1])
        return replace(self, shape=(hi - lo, self.shape[-1]), start=self.start + lo * per, nbytes=(hi - lo) * per)

    def experts(self, lo: int, hi: int) -> GGUFTensor:
        """Experts lo..hi-1 of a stacked experts tensor [E, ...]: one run of its bytes (dim 0 is the slowest)."""
        r = math.prod(self.shape[1:-1])  # rows per expert
        return replace(self.rows(lo * r, hi * r), shape=(hi - lo, *self.shape[1:]))


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    data_start: int


class _ShortRead(Exception):
    """The header runs past the bytes read so far, and the file has more: read more and parse again."""


class _Cursor:
    """Bounds-checked little-endian reads from the file's first bytes (`whole`: all of them, or as
    many as a header may take); errors name the field being read."""

    def __init__(self, path: Path, buf: memoryview, whole: bool) -> None:
        self.path, self.buf, self.pos, self.whole = path, buf, 0, whole

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what} (at byte {self.pos} of {len(self.buf)})")

    def past_end(self, what: str) -> Exception:
        """Running past the bytes read: the file's end (an error naming `what`), or only the
        bytes read so far (`_ShortRead`: read more)."""
        return self.fail(what) if self.whole else _ShortRead()

    def take(self, n: int, what: str) -> memoryview:
        if n < 0:
            raise self.fail(f"{what}: a negative length {n}")
        if n > len(self.buf) - self.pos:
            raise self.past_end(f"truncated GGUF: {what} needs {n} bytes, {len(self.buf) - self.pos} left")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, size: int, what: str) -> Any:
        return struct.unpack(fmt, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return int(self.scalar("<I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<Q", 8, what))

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        if n > len(self.buf) - self.pos:
            raise self.past_end(f"{what}: a string of {n} bytes runs past the end of the file")
        raw = bytes(self.take(n, what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what}: not valid UTF-8") from None

    def value(self, vtype: int, what: str, *, in_array: bool = False) -> Any:
        if vtype == 6:  # a float32 as the shortest decimal it holds: 1e-05, not 9.999999747378752e-06
            return float(str(np.float32(self.scalar("<f", 4, what))))
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype], what)
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            if in_array:
                raise self.fail(f"{what}: nested arrays are not supported")
            itype = self.u32(f"the item type of {what}")
            n = self.u64(f"the length of {what}")
            if itype in _SCALARS:
                size = _SCALARS[itype][1]
                if n > (len(self.buf) - self.pos) // size:
                    raise self.past_end(f"{what}: an array of {n} items of {size} bytes runs past the end of the file")
                return np.frombuffer(self.take(n * size, what), dtype=_NP[itype]).copy()
            if itype == STRING:
                if n > (len(self.buf) - self.pos) // 8:  # every string has at least its 8-byte length
                    raise self.past_end(f"{what}: an array of {n} strings runs past the end of the file")
                return [self.string(f"{what}[{i}]") for i in range(n)]
            if itype == ARRAY:
                raise self.fail(f"{what}: nested arrays are not supported")
            raise self.fail(f"{what}: unknown array item type {itype} (expected 0-12)")
        raise self.fail(f"{what}: unknown value type {vtype} (expected 0-12)")


def read_header(path: str | Path) -> GGUFHeader:
    """Parse and validate a GGUF file's metadata and tensor infos (no tensor data is read); for the
    first part of a split GGUF, every part's tensors (`_join_parts`)."""
    h = _read_one(Path(path))
    return _join_parts(h) if "split.count" in h.metadata else h


def split_parts(path: Path) -> list[Path]:
    """Every part of the split GGUF that `path` is a part of, by llama.cpp's names (PREFIX-0000K-of-0000N.gguf),
    `path` included: what a load of it reads; [path] for a file not named so."""
    m = GGUF_SPLIT_NAME.fullmatch(path.name)
    n = int(m[3]) if m else 0
    return [path.with_name(f"{m[1]}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)] if m and n else [path]


def _join_parts(h: GGUFHeader) -> GGUFHeader:
    """A GGUF split in parts, as llama.cpp's `gguf-split` and `convert_hf_to_gguf.py --split-max-*`
    write them and llama.cpp loads them (`PREFIX-00001-of-0000N.gguf` first, holding the metadata;
    each part its own header and tensors): the first part's header with every part's tensors, each
    read from its own file."""
    n, no = _meta(h, "split.count", int), _meta(h, "split.no", int, 0)
    if n <= 1:
        return h
    m = GGUF_SPLIT_NAME.fullmatch(h.path.name)
    if no != 0:
        raise CheckpointError(f"{h.path}: part {no + 1} of a GGUF split in {n}: pass its first part, named "
                              f"PREFIX-00001-of-{n:05d}.gguf (as llama.cpp takes it)")
    if m is None or (int(m[2]), int(m[3])) != (1, n):  # the other parts are found by their names
        raise CheckpointError(f"{h.path}: the first part of a GGUF split in {n}, not named PREFIX-00001-of-{n:05d}"
                              ".gguf as its parts must be (llama.cpp's names, by which they are found): rename it")
    tensors = dict(h.tensors)
    for i in range(1, n):
        path = h.path.with_name(f"{m[1]}-{i + 1:05d}-of-{n:05d}.gguf")
        if not path.is_file():
            raise CheckpointError(f"{h.path}: part {i + 1} of this GGUF split in {n}, {path.name}, is missing")
        part = _read_one(path)
        if (part.metadata.get("split.no"), part.metadata.get("split.count")) != (i, n):
            raise CheckpointError(f"{path}: not part {i + 1} of {n} of {h.path.name} (its split.no and split.count "
                                  f"are {part.metadata.get('split.no')} and {part.metadata.get('split.count')})")
        twice = sorted(tensors.keys() & part.tensors.keys())
        if twice:
            raise CheckpointError(f"{path}: tensor {twice[0]!r} is also in an earlier part")
        tensors.update(part.tensors)
    want = h.metadata.get("split.tensors.count", len(tensors))
    if want != len(tensors):
        raise CheckpointError(f"{h.path}: its {n} parts hold {len(tensors)} tensors, split.tensors.count says {want}")
    return replace(h, tensors=tensors)


def _read_one(p: Path) -> GGUFHeader:
    if not p.is_file():  # a FIFO named x.gguf exists: "no such GGUF file" was wrong
        raise CheckpointError(f"{p}: not a regular file (a FIFO, a device or a socket)" if p.exists() else
                              f"{p}: no such GGUF file")
    size = p.stat().st_size
    cap = min(size, MAX_HEADER)
    n = min(cap, FIRST_READ)
    with open(p, "rb") as f:
        while True:
            # Never more than the file, nor than MAX_HEADER: a huge declared count or length is
            # caught against the bytes that exist, before anything is allocated for it. A header
            # longer than the bytes read is parsed again from more (x8), not read whole at once.
            f.seek(0)
            buf = memoryview(f.read(n))
            try:
                return _parse_header(p, buf, size, whole=n >= cap)
            except _ShortRead:
                n = min(cap, 8 * n)


def _parse_header(p: Path, buf: memoryview, size: int, *, whole: bool) -> GGUFHeader:
    c = _Cursor(p, buf, whole)
    if bytes(c.take(4, "the magic")) != MAGIC:
        raise CheckpointError(f"{p}: not a GGUF file (the first 4 bytes are not 'GGUF')")
    version = c.u32("the version")
    if version not in (2, 3):
        big = int.from_bytes(version.to_bytes(4, "little"), "big") in (2, 3)  # gguf-py's --bigendian files
        raise CheckpointError(f"{p}: a big-endian GGUF file; mixlab reads little-endian ones (as llama.cpp writes "
                              "them on x86 and ARM)" if big else f"{p}: unsupported GGUF version {version} "
                              "(expected 2 or 3)")
    n_tensors, n_kv = c.u64("the tensor count"), c.u64("the key/value count")
    # Each tensor info takes at least 8 + 4 + 8 + 4 + 8 bytes, each key/value at least 8 + 4 + 1.
    if n_tensors > size // 32:
        raise c.fail(f"the tensor count {n_tensors} is more than a file of {size} bytes can hold")
    if n_kv > size // 13:
        raise c.fail(f"the key/value count {n_kv} is more than a file of {size} bytes can hold")
    meta: dict[str, Any] = {}
    for i in range(n_kv):
        key = c.string(f"key {i}")
        if key in meta:
            raise c.fail(f"duplicate metadata key {key!r}")
        meta[key] = c.value(c.u32(f"the type of {key!r}"), repr(key))
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{p}: general.alignment must be a positive power of two, not {alignment!r}")
    types = _type_table()
    infos: list[tuple[str, int, tuple[int, ...], int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = c.string(f"the name of tensor {i}")
        if len(name.encode()) >= MAX_NAME:
            raise c.fail(f"tensor {i}: name {name[:80]!r} is longer than {MAX_NAME - 1} bytes")
        if name in seen:
            raise c.fail(f"duplicate tensor name {name!r}")
        seen.add(name)
        rank = c.u32(f"the rank of {name!r}")
        if not 1 <= rank <= MAX_DIMS:
            raise c.fail(f"tensor {name!r}: rank {rank} (expected 1 to {MAX_DIMS})")
        dims = [c.u64(f"dimension {j} of {name!r}") for j in range(rank)]
        n = 1
        for d in dims:
            if d < 1 or d > MAX_ELEMENTS:
                raise c.fail(f"tensor {name!r}: dimension {d} (expected 1 to 2**60)")
            n *= d
            if n > MAX_ELEMENTS:
                raise c.fail(f"tensor {name!r}: dimensions {dims} hold more than 2**60 elements")
        ttype = c.u32(f"the type of {name!r}")
        if ttype not in types and len(types) == len(CORE_TYPES):  # an IQ type, say
            own = ", ".join(n for n, _, _ in CORE_TYPES.values())
            raise CheckpointError(f"{p}: tensor {name!r} has ggml type {ttype}, which mixlab reads through the gguf "
                                  f"package: pip install 'mixlab[gguf]' (without it: {own})")
        if ttype not in types:
            raise c.fail(f"tensor {name!r}: unknown ggml type {ttype}")
        tname, block, _ = types[ttype]
        if dims[0] % block:
            raise c.fail(f"tensor {name!r}: rows of {dims[0]} elements are not whole {tname} blocks of {block}")
        offset = c.u64(f"the offset of {name!r}")
        if offset % alignment:
            raise c.fail(f"tensor {name!r}: offset {offset} is not a multiple of the alignment {alignment}")
        infos.append((name, ttype, tuple(reversed(dims)), offset))
    data_start = -(-c.pos // alignment) * alignment
    tensors: dict[str, GGUFTensor] = {}
    for name, ttype, shape, offset in infos:
        _, block, bsize = types[ttype]
        nbytes = math.prod(shape) // block * bsize
        if data_start + offset + nbytes > size:
            raise CheckpointError(f"{p}: tensor {name!r} ({types[ttype][0]} {list(shape)}, {nbytes} bytes at data "
                                  f"offset {offset}) runs past the end of the file ({size} bytes; truncated?)")
        tensors[name] = GGUFTensor(name, ttype, shape, data_start + offset, nbytes, p)
    spans = sorted((t.start, t.start + t.nbytes, t.name) for t in tensors.values())
    for (_, end0, a), (start1, _, b) in zip(spans, spans[1:], strict=False):
        if start1 < end0:
            raise CheckpointError(f"{p}: tensors {a!r} and {b!r} overlap in the data section")
    return GGUFHeader(p, version, meta, tensors, data_start)


# --------------------------------------------------------------------------------------------------
# Metadata -> ModelConfig


def _meta(h: GGUFHeader, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    v = h.metadata.get(key, default)
    if v is None:
        raise CheckpointError(f"{h.path}: metadata key {key!r} is missing")
    if isinstance(v, np.generic):
        v = v.item()
    if kind is int and isinstance(v, bool) or not isinstance(v, kind):
        expected = {str: "a string", int: "an integer", (float, int): "a number"}.get(kind, str(kind))
        raise CheckpointError(f"{h.path}: metadata {key!r} = {v!r} has the wrong type (expected {expected})")
    return v


# mixlab field -> the metadata key that holds it, so that an error names the key (as config.py's
# tables do for config.json and params.json)
_KEYS = {"vocab_size": "llama.vocab_size", "dim": "llama.embedding_length", "n_layers": "llama.block_count",
         "n_heads": "llama.attention.head_count", "n_kv_heads": "llama.attention.head_count_kv",
         "head_dim": "llama.attention.key_length", "ffn_dim": "llama.feed_forward_length",
         "norm_eps": "llama.attention.layer_norm_rms_epsilon", "rope_theta": "llama.rope.freq_base",
         "max_seq_len": "llama.context_length", "moe.num_experts": "llama.expert_count",
         "moe.top_k": "llama.expert_used_count", "bos_id": "tokenizer.ggml.bos_token_id",
         "eos_id": "tokenizer.ggml.eos_token_id", "extra_eos_ids": "tokenizer.ggml.eot_token_id / eom_token_id"}
# Besides EOS, the ids llama.cpp ends generation at (`llama_vocab_is_eog`, llama-vocab.cpp): those a file names
# by key, end of turn (Llama 3's <|eot_id|>) and end of message (<|eom_id|>), and tokens it knows by their text
# alone (ChatML's <|im_end|> in a Mixtral fine-tune's vocabulary, which a file's EOS need not name). Its list of
# texts grows between versions, with exceptions for other vocabularies (gpt-oss's <|end|>): these are the
# chat-turn ends in it (each an EOG token to the llama.cpp of llama-cpp-python 0.3.36, as the tests check).
EOG_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
EOG_TEXTS = frozenset({"<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>",
                       "<end_of_turn>", "<EOT>"})


def config_from_header(h: GGUFHeader) -> ModelConfig:
    """The mixlab config of a `llama`-architecture GGUF file (Llama, Mistral, Mixtral)."""
    arch = _meta(h, "general.architecture", str)
    if arch != "llama":
        raise CheckpointError(f"{h.path}: architecture {arch!r} is not supported (expected 'llama': "
                              "Llama, Mistral and Mixtral files)")
    a = "llama."
    scaling = h.metadata.get(a + "rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise CheckpointError(f"{h.path}: rope scaling {scaling!r} is not supported")
    if "rope_freqs.weight" in h.tensors:  # written without a rope.scaling.type; llama.cpp divides by its factors
        raise CheckpointError(f"{h.path}: rope_freqs.weight holds per-frequency rotary factors (Llama 3.1's 'llama3' "
                              "rope scaling), which mixlab's rotary embedding does not implement")
    n_heads = _meta(h, a + "attention.head_count", int)
    dim = _meta(h, a + "embedding_length", int)
    if n_heads < 1:
        raise CheckpointError(f"{h.path}: metadata {a + 'attention.head_count'!r} = {n_heads}: expected at least 1")
    if a + "attention.key_length" not in h.metadata and dim % n_heads:  # the head size is their quotient
        raise CheckpointError(f"{h.path}: metadata {a + 'embedding_length'!r} = {dim} is not a multiple of "
                              f"{a + 'attention.head_count'!r} = {n_heads}, and no {a + 'attention.key_length'!r} "
                              "gives the head size")
    emb = h.tensors.get("token_embd.weight")
    if emb is None or len(emb.shape) != 2:
        raise CheckpointError(f"{h.path}: no 2-D tensor 'token_embd.weight'")
    vocab = _meta(h, a + "vocab_size", int, emb.shape[0])
    n_experts = _meta(h, a + "expert_count", int, 0)
    moe = MoEConfig(num_experts=n_experts, top_k=_meta(h, a + "expert_used_count", int)) if n_experts else None
    head_dim = _meta(h, a + "attention.key_length", int, dim // n_heads)
    if _meta(h, a + "attention.value_length", int, head_dim) != head_dim:
        raise CheckpointError(f"{h.path}: key and value head sizes differ; mixlab needs them equal")
    rope_dims = _meta(h, a + "rope.dimension_count", int, head_dim)
    if rope_dims != head_dim:
        raise CheckpointError(f"{h.path}: metadata {a + 'rope.dimension_count'!r} = {rope_dims}: rotary embedding on "
                              f"{rope_dims} of {head_dim} head dimensions ({a + 'attention.key_length'!r}, else "
                              f"{a + 'embedding_length'!r} / {a + 'attention.head_count'!r}) is not supported (mixlab "
                              "rotates whole heads)")
    try:
        return ModelConfig(
            vocab_size=vocab, dim=dim, n_layers=_meta(h, a + "block_count", int), n_heads=n_heads,
            n_kv_heads=_meta(h, a + "attention.head_count_kv", int, n_heads), head_dim=head_dim,
            ffn_dim=_meta(h, a + "feed_forward_length", int),
            norm_eps=float(_meta(h, a + "attention.layer_norm_rms_epsilon", (float, int))),
            rope_theta=float(_meta(h, a + "rope.freq_base", (float, int), 10000.0)),
            max_seq_len=_meta(h, a + "context_length", int), sliding_window=None,
            tie_embeddings="output.weight" not in h.tensors, moe=moe,
            bos_id=_meta(h, "tokenizer.ggml.bos_token_id", int, 1),
            eos_id=_meta(h, "tokenizer.ggml.eos_token_id", int, 2),
            extra_eos_ids=_eog_ids(h, vocab),
        )
    except ConfigError as e:
        raise CheckpointError(str(_in_file(e, str(h.path), _KEYS))) from None


def _eog_ids(h: GGUFHeader, vocab: int) -> tuple[int, ...]:
    """The ids besides EOS that llama.cpp ends generation at: `EOG_KEYS`' values, then the tokens of `EOG_TEXTS`.
    A keyed id outside the vocabulary is left out with a warning, as llama.cpp does ("bad special token")."""
    keyed = []
    for k in EOG_KEYS:
        if k in h.metadata:
            i = _meta(h, k, int)
            if 0 <= i < vocab:
                keyed.append(i)
            else:
                warnings.warn(f"{h.path}: metadata {k!r} = {i} is not a token id in [0, {vocab}); ignored, as "
                              "llama.cpp ignores it", stacklevel=2)
    tokens = h.metadata.get("tokenizer.ggml.tokens")
    named = [i for i, t in enumerate(tokens[:vocab]) if t in EOG_TEXTS] if isinstance(tokens, list) else []
    return tuple(dict.fromkeys(keyed + named))


# --------------------------------------------------------------------------------------------------
# Tensor data


def _rope_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `gguf.rope_permute` on the rows (works on packed int4 rows and their scales too)."""
    X = w.shape[0]
    Hd = X // n_heads
    return w.reshape(n_heads, Hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class _Reader:
    def __init__(self, h: GGUFHeader) -> None:
        self.h = h
        self.fds = {f: os.open(f, os.O_RDONLY) for f in sorted({t.file for t in h.tensors.values()})}

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)

    def raw(self, t: GGUFTensor, out: np.ndarray | None = None) -> np.ndarray:
        """The bytes of `t`, in `out` (`t.nbytes` uint8) if given."""
        out = np.empty(t.nbytes, dtype=np.uint8) if out is None else out
        view, done = memoryview(out.data), 0
        while done < t.nbytes:
            n = os.preadv(self.fds[t.file], [view[done:]], t.start + done)
            if n <= 0:
                raise CheckpointError(f"{t.file}: unexpected end of file reading tensor {t.name!r}")
            done += n
        return out

    def q4(self, t: GGUFTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A Q4_0 tensor as mixlab int4: (packed uint8 [..., X, D/2], float16 scales [..., X, D/32])."""
        *lead, D = t.shape
        blocks = self.raw(t).reshape(*lead, D // 32, 18)
        scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16).reshape(*lead, D // 32)
        packed = np.ascontiguousarray(blocks[..., 2:]).reshape(*lead, D // 2)
        return torch.from_numpy(packed), torch.from_numpy(scales)

    def floats(self, t: GGUFTensor, dtype: torch.dtype) -> torch.Tensor:
        """Any tensor as floats in `dtype` (dequantised where quantised)."""
        return self.floats_into(t, torch.empty(t.shape, dtype=dtype))

    def floats_into(self, t: GGUFTensor, out: torch.Tensor) -> torch.Tensor:
        """`floats(t, out.dtype)` written into `out` (of `t`'s shape; its rows a view of it): its bytes
        read straight in where they are `out`'s float type, else converted a few MB of rows at a time
        (`CHUNK`): a whole tensor's dequantisation took ~1.5x its float32 size in temporaries."""
        rows_XD = out.view(-1, t.shape[-1])
        if _AS_TORCH.get(t.type) == out.dtype and out.device.type == "cpu" and out.is_contiguous():
            self.raw(t, rows_XD.view(torch.uint8).view(-1).numpy())
            return out
        step = max(1, CHUNK // (4 * t.shape[-1]))
        direct = _native_dequant(t.type, out)
        for lo in range(0, rows_XD.shape[0], step):
            hi = min(lo + step, rows_XD.shape[0])
            if direct:  # no float32 temporary: the kernel writes out's rows in its dtype (`native.dequantize`)
                from mixlab.ops import native

                native.dequantize(torch.from_numpy(self.raw(t.rows(lo, hi))), t.type, out=rows_XD[lo:hi])
            else:
                rows_XD[lo:hi].copy_(self._as_floats(t.rows(lo, hi)))
        return out

    def _as_floats(self, t: GGUFTensor) -> torch.Tensor:
        """Some rows `t` [X, D] as floats: float32 where dequantised, else in the file's type (`copy_`
        converts them as `.to` did, so the values equal a whole tensor's conversion)."""
        if t.type == Q4_0:  # `q4` reads the bytes itself (reading them here first read a Q4_0 tensor twice)
            from mixlab.ops.quant import dequantize_int4

            q, s = self.q4(t)
            return dequantize_int4(q, s, torch.float32)
        raw = self.raw(t)
        if t.type == F32:
            x = torch.from_numpy(raw.view(np.float32))
        elif t.type == F16:
            x = torch.from_numpy(raw.view(np.float16))
        elif t.type == BF16:
            x = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        elif t.type == Q8_0:
            blocks = raw.reshape(-1, 34)
            d = np.ascontiguousarray(blocks[:, :2]).view(np.float16).astype(np.float32)
            x = torch.from_numpy((blocks[:, 2:].view(np.int8).astype(np.float32) * d).reshape(-1))
        elif t.type in gguf_dequant.BLOCKS:  # K-quants, Q4_1, Q5_0, Q5_1: 1.5-3.4x the gguf package's numpy
            x = _dequantize(torch.from_numpy(raw), t.type)
        else:  # a type `_readable` accepted (checked before any tensor is read)
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize

            row_bytes = t.nbytes // math.prod(t.shape[:-1])
            x = torch.from_numpy(dequantize(raw.reshape(-1, row_bytes), GGMLQuantizationType(t.type)).reshape(-1))
        return x.reshape(t.shape)


def _native_dequant(ttype: int, out: torch.Tensor | None = None) -> bool:
    """Whether the native kernels dequantise `ttype` (into `out`): loaded, and a type they take (Q4_K,
    Q5_K, Q6_K: `native.dequantize`, the same bits as `gguf_dequant`, 3-8x faster on one thread); `out`
    contiguous float32 or bf16 on the CPU."""
    from mixlab.ops import registry

    if out is None:
        return registry.convert_impl("dequantize", device="cpu", dtype=torch.float32, ggml_type=ttype) == "native"
    return out.is_contiguous() and registry.convert_impl("dequantize", device=out.device.type, dtype=out.dtype,
                                                         ggml_type=ttype) == "native"


def _dequantize(raw: torch.Tensor, ttype: int) -> torch.Tensor:
    """`gguf_dequant.dequantize`, by the native kernels where they take the type (`_native_dequant`)."""
    from mixlab.ops import native

    return native.dequantize(raw, ttype) if _native_dequant(ttype) else gguf_dequant.dequantize(raw, ttype)


@functools.cache
def _readable(ttype: int) -> bool:
    """Whether `_Reader.floats` reads this ggml type: one of mixlab's own (`CORE_TYPES`), or one the
    gguf package dequantises (it has no dequantisation for some, e.g. Q8_1, F64 and the integer types)."""
    if ttype in CORE_TYPES:
        return True
    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
    except ImportError:
        return False
    try:
        dequantize(np.zeros((1, _type_table()[ttype][2]), np.uint8), GGMLQuantizationType(ttype))  # one block
    except NotImplementedError:
        return False
    return True


def _expect(h: GGUFHeader, name: str, shape: tuple[int, ...]) -> GGUFTensor:
    t = h.tensors.get(name)
    if t is None:
        raise CheckpointError(f"{h.path}: missing tensor {name!r}{_missing_why(h, name)}")
    if t.shape != shape:
        raise CheckpointError(f"{h.path}: tensor {name!r} has shape {list(t.shape)} (torch order), "
                              f"expected {list(shape)} for this config")
    return t


def _missing_why(h: GGUFHeader, name: str) -> str:
    """Which metadata made the config expect `name`, where the file's tensors say otherwise: a block count
    beyond the blocks stored, or stacked experts without an expert count (both read 'missing tensor')."""
    a = h.metadata.get("general.architecture", "llama")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m is None:
        return ""
    blocks = {k.split(".")[1] for k in h.tensors if k.startswith("blk.")}
    if m[1] not in blocks:
        n = h.metadata.get(a + ".block_count")
        return f" (metadata '{a}.block_count' = {n}, but the file holds {len(blocks)} blocks)"
    if f"blk.{m[1]}.{m[2]}_exps.weight" in h.tensors:  # ffn_gate / ffn_up / ffn_down read as a dense layer's
        return f" (it holds stacked experts, 'blk.{m[1]}.{m[2]}_exps.weight', but no '{a}.expert_count')"
    return ""


def _plan(h: GGUFHeader, cfg: ModelConfig) -> list[tuple[str, list[GGUFTensor], str]]:
    """(mixlab name, GGUF tensors concatenated along dim 0 (dim 1 for stacked experts), kind) with
    kind "norm", "embed", "router", "matrix", "q", "k" (rotary rows), "experts"."""
    D, V, F_, q, kv = cfg.dim, cfg.vocab_size, cfg.ffn_dim, cfg.q_dim, cfg.kv_dim
    out: list[tuple[str, list[GGUFTensor], str]] = [("tok_embeddings.weight", [_expect(h, "token_embd.weight", (V, D))],
                                                     "embed")]
    for i in range(cfg.n_layers):
        b, m = f"blk.{i}.", f"layers.{i}."
        out += [
            (m + "attn_norm.weight", [_expect(h, b + "attn_norm.weight", (D,))], "norm"),
            (m + "attn.wqkv.weight", [_expect(h, b + "attn_q.weight", (q, D)), _expect(h, b + "attn_k.weight", (kv, D)),
                                      _expect(h, b + "attn_v.weight", (kv, D))], "qkv"),
            (m + "attn.wo.weight", [_expect(h, b + "attn_output.weight", (D, q))], "matrix"),
            (m + "ffn_norm.weight", [_expect(h, b + "ffn_norm.weight", (D,))], "norm"),
        ]
        if cfg.moe is not None:
            E = cfg.moe.num_experts
            if b + "ffn_gate_exps.weight" not in h.tensors and b + "ffn_gate.0.weight" in h.tensors:
                raise CheckpointError(f"{h.path}: the experts are stored one tensor each ({b}ffn_gate.0.weight, ...: "
                                      "GGUF files converted before llama.cpp stacked them in 2024, which its current "
                                      "versions do not load either); convert the original checkpoint again")
            out += [
                (m + "ffn.gate.weight", [_expect(h, b + "ffn_gate_inp.weight", (E, D))], "router"),
                (m + "ffn.experts.w13", [_expect(h, b + "ffn_gate_exps.weight", (E, F_, D)),
                                 _expect(h, b + "ffn_up_exps.weight", (E, F_, D))], "experts"),
                (m + "ffn.experts.w2", [_expect(h, b + "ffn_down_exps.weight", (E, D, F_))], "experts"),
            ]
        else:
            out += [
                (m + "ffn.w13.weight",
                 [_expect(h, b + "ffn_gate.weight", (F_, D)), _expect(h, b + "ffn_up.weight", (F_, D))], "matrix"),
                (m + "ffn.w2.weight", [_expect(h, b + "ffn_down.weight", (D, F_))], "matrix"),
            ]
    out.append(("norm.weight", [_expect(h, "output_norm.weight", (D,))], "norm"))
    if not cfg.tie_embeddings:
        out.append(("output.weight", [_expect(h, "output.weight", (V, D))], "matrix"))
    for _, ts, _ in out:
        for t in ts:
            if not _readable(t.type):
                types = _type_table()
                readable = ", ".join(types[k][0] for k in sorted(types, key=lambda k: types[k][0]) if _readable(k))
                raise CheckpointError(f"{h.path}: tensor {t.name!r} is {t.type_name}, a type mixlab cannot read as "
                                      f"weights (it reads {readable})")
    wanted = {t.name for _, ts, _ in out for t in ts}
    extra = sorted(set(h.tensors) - wanted)
    if extra:
        more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
        raise CheckpointError(f"{h.path}: unexpected tensors for a {'MoE' if cfg.moe else 'dense'} llama model: "
                              f"{', '.join(extra[:5])}{more}")
    return out


def describe(path: str | Path) -> str:
    """What a GGUF file stores, from its header alone (`mixlab info`), checked against its config as
    `load_gguf` checks it: version, tensor count and bytes per ggml type."""
    h = read_header(path)
    _plan(h, config_from_header(h))
    by: dict[str, int] = {}
    for t in h.tensors.values():
        by[t.type_name] = by.get(t.type_name, 0) + t.nbytes
    parts = len({t.file for t in h.tensors.values()})
    split = f" in {parts} parts" if parts > 1 else ""
    return f"GGUF v{h.version}{split}, {len(h.tensors)} tensors: " + ", ".join(
        f"{k} {v:,} bytes" for k, v in sorted(by.items(), key=lambda kv: -kv[1]))


def _check_finite(h: GGUFHeader, parts: list[GGUFTensor], x: torch.Tensor) -> None:
    """Warn, as a safetensors load does, when the values read (or an int4 tensor's scales) hold NaN or
    Inf (`all_finite`)."""
    if not all_finite(x):
        warnings.warn(f"{h.path}: tensor {' / '.join(repr(t.name) for t in parts)} holds NaN or Inf values; the "
                      "model's outputs will be NaN", stacklevel=4)


def default_dtype(h: GGUFHeader) -> torch.dtype:
    """The float type of most of the file's matrix elements, a quantised matrix's counting as float32
    (what it dequantises to): a q8_0 / q4_0 file whose few matrices blocks do not fit are f16 (as
    llama.cpp's quantiser and `write_gguf` store them) loads in float32, not all in float16."""
    by = {F16: 0, BF16: 0, F32: 0}
    for t in h.tensors.values():
        if len(t.shape) >= 2:
            by[t.type if t.type in by else F32] += math.prod(t.shape)
    return {F16: torch.float16, BF16: torch.bfloat16, F32: torch.float32}[max(by, key=lambda k: by[k])]


def file_quant(h: GGUFHeader) -> tuple[str | None, str]:
    """The weight format nearest the file's own that mixlab runs natively, never coarser (what the
    CLI's `--quant auto` loads it as), and the ggml type it follows. That type is the one holding most
    matrix elements, not counting the embedding, the output matrix and the routers. A float type gives
    None (floats); a type of at most 5 bits a weight (Q4_0, Q4_1, Q4_K, Q3_K, Q2_K, IQ4_XS, ...) gives
    "int4"; more (Q5_*, Q6_K, Q8_0) gives "int8". So Q4_K_M files run as int4 and Q5_K_M, Q6_K and
    Q8_0 files as int8. Where some matrix's inputs are not whole groups of 32 (small test models), int4
    gives way: to None for a file whose Q4_0 matrices stay int4 as stored, else to int8."""
    by: dict[int, int] = {}
    for name, t in h.tensors.items():
        if len(t.shape) >= 2 and name not in ("token_embd.weight", "output.weight") and "ffn_gate_inp" not in name:
            by[t.type] = by.get(t.type, 0) + math.prod(t.shape)
    if not by:
        return None, "F32"
    top = max(by, key=lambda k: by[k])
    name, block, size = _type_table().get(top, (str(top), 1, 4))
    if block == 1:  # F32 / F16 / BF16 (and plain types no loader writes)
        return None, name
    if size * 8 > 5 * block:
        return "int8", name
    cfg = config_from_header(h)
    if all(k % 32 == 0 for k in (cfg.dim, cfg.ffn_dim, cfg.q_dim)):  # every matrix's inputs: whole groups of 32
        return "int4", name
    # int4 cannot hold them all: a Q4_0 file keeps its Q4_0 matrices int4 anyway (int8 is refused beside
    # them) and the others as floats; anything else is held at int8
    return (None if _int4_names(_plan(h, cfg)) else "int8"), name


def _joined_shape(parts: list[GGUFTensor], kind: str) -> list[int]:
    """The shape of a weight of `_plan`: its parts joined along dim 0 (dim 1 for stacked experts)."""
    cat = 1 if kind == "experts" else 0
    return [sum(t.shape[i] for t in parts) if i == cat else n for i, n in enumerate(parts[0].shape)]


def _float_weight(reader: _Reader, cfg: ModelConfig, parts: list[GGUFTensor], kind: str, dtype: torch.dtype,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """One weight of `_plan` (its GGUF `parts`, of `kind`) as floats in `dtype`: dequantised where
    quantised, q / k rows put back in mixlab's rotary layout, the parts joined, NaN / Inf warned of.
    Each part is read into its place in the joined tensor (`floats_into`: no temporary of its size):
    `out` if given (contiguous, of its shape, in `dtype`), as safetensors' `read_into` does."""
    f32 = kind in ("norm", "router")  # tiny, kept float32 as in every mixlab model... cast below
    cat = 1 if kind == "experts" else 0
    x = torch.empty(_joined_shape(parts, kind), dtype=torch.float32 if f32 else dtype) if out is None else out
    at = 0
    for i, t in enumerate(parts):
        n = t.shape[cat]
        if kind == "experts":  # an expert's rows of this part are one run of x's: [E, gate rows + up rows, D]
            for e in range(t.shape[0]):
                reader.floats_into(t.experts(e, e + 1), x[e : e + 1, at : at + n])
        else:
            reader.floats_into(t, x[at : at + n])
            if kind == "qkv" and i < 2:
                x[at : at + n] = _rope_unpermute(x[at : at + n], cfg.n_heads if i == 0 else cfg.n_kv_heads)
        at += n
    _check_finite(reader.h, parts, x)
    return x.to(dtype)


def _quantised_experts(reader: _Reader, cfg: ModelConfig, parts: list[GGUFTensor], dtype: torch.dtype, quant: str,
                       group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_weight(_float_weight(...))` of a stacked experts weight, one expert at a time through
    one float buffer (the same bytes: an expert's rows are rounded alone): the whole stack's fresh
    float32 (3.8 GB for a Mixtral w13) cost more in page faults than the native conversions."""
    from mixlab.model.inference import quantize_weight

    E = parts[0].shape[0]
    buf = torch.empty(_joined_shape([t.experts(0, 1) for t in parts], "experts"), dtype=dtype)
    out: tuple[torch.Tensor, torch.Tensor] | None = None
    for e in range(E):
        x = _float_weight(reader, cfg, [t.experts(e, e + 1) for t in parts], "experts", dtype, out=buf)
        q, s = quantize_weight(x, quant, group=group, scale_dtype=dtype)
        if out is None:
            out = (q.new_empty(E, *q.shape[1:]), s.new_empty(E, *s.shape[1:]))
        out[0][e : e + 1].copy_(q)
        out[1][e : e + 1].copy_(s)
    assert out is not None
    return out


def int4_weights(h: GGUFHeader) -> dict[str, tuple[torch.Size, torch.Size]]:
    """The weights `load_gguf` keeps int4 (mixlab's names): the shapes of their packed codes and
    float16 scales (stacked experts: all of them). The file is checked against its config first."""
    plan = _plan(h, config_from_header(h))
    out = {}
    for name in _int4_names(plan):
        parts, kind = next((ps, k) for n, ps, k in plan if n == name)
        *lead, D = _joined_shape(parts, kind)
        out[name] = torch.Size((*lead, D // 2)), torch.Size((*lead, D // 32))
    return out


def _int4_names(plan: list[tuple[str, list[GGUFTensor], str]]) -> set[str]:
    """The weights of `_plan` kept int4: matrices stored as Q4_0, a layer's experts only where both
    of its expert weights are (one format per `Int4Experts`)."""
    q4 = {name for name, parts, kind in plan
          if kind in ("qkv", "matrix", "experts") and all(t.type == Q4_0 for t in parts)}
    return {n for n in q4 if ".experts." not in n or {n.rsplit(".", 1)[0] + w for w in (".w13", ".w2")} <= q4}


def _read_int4(reader: _Reader, cfg: ModelConfig, parts: list[GGUFTensor], kind: str) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """One Q4_0 weight of `_plan` as mixlab int4 (packed codes, float16 scales): q / k rows put back
    in mixlab's rotary layout, the parts joined, NaN / Inf scales warned of."""
    qs = [reader.q4(t) for t in parts]
    if kind == "qkv":
        qs[0] = (_rope_unpermute(qs[0][0], cfg.n_heads), _rope_unpermute(qs[0][1], cfg.n_heads))
        qs[1] = (_rope_unpermute(qs[1][0], cfg.n_kv_heads), _rope_unpermute(qs[1][1], cfg.n_kv_heads))
    cat = 1 if kind == "experts" else 0
    q, s = torch.cat([q for q, _ in qs], cat).contiguous(), torch.cat([s for _, s in qs], cat).contiguous()
    _check_finite(reader.h, parts, s)
    return q, s


def check_quant_over_q4_0(path: Path, holds_q4_0: bool, quant: str | None, group: int) -> None:
    """prepare_for_inference's refusals of `quant` for a file whose Q4_0 matrices are kept int4 (in groups
    of 32), told before anything is read (`load_gguf`, `load_expert_parallel`)."""
    if holds_q4_0 and quant == "int8":
        raise ValueError(f"{path}: this model already holds int4 weights; int8 applies to float models (its Q4_0 "
                         "matrices are kept as stored): pass quant='int4' (its float matrices made int4 too) or none")
    if holds_q4_0 and quant == "int4" and group != 32:
        raise ValueError(f"{path} holds Q4_0 (int4) matrices in groups of 32, kept as stored; quant='int4' "
                         f"converts its float matrices in the same groups, not {group}: pass group=32")


def read_gguf_pieces(h: GGUFHeader, pieces: dict[str, tuple[torch.Tensor, tuple[slice, ...]]],
                     int4: dict[str, tuple[torch.Tensor, torch.Tensor, slice]] | None = None) -> None:
    """Fill each `pieces[name] = (dest, index)` with `whole[index]` of weight `name` (mixlab's name) of
    the GGUF file `h`, as `load_gguf(keep_int4=False)` reads it in `dest`'s dtype: the GGUF
    counterpart of `train.checkpoints.read_pieces`, for expert parallelism. `index` takes whole
    tensors, or some experts (dim 0) of a stacked experts weight: only those experts' bytes are read,
    into `dest` (`_float_weight`: straight in where they need no conversion). `int4[name] = (codes,
    scales, experts)`: a weight `load_gguf` keeps int4 (`int4_weights`), its bytes copied as they are
    (of `experts`, a slice of dim 0, for stacked experts; else whole).
    The file is checked against its config (`_plan`) before anything is read."""
    cfg = config_from_header(h)
    plan = {name: (parts, kind) for name, parts, kind in _plan(h, cfg)}
    int4 = int4 or {}
    if (set(pieces) | set(int4)) - set(plan):
        raise ValueError(f"no weight {sorted((set(pieces) | set(int4)) - set(plan))[0]!r} in {h.path}")
    reader = _Reader(h)
    try:
        with torch.no_grad():
            for name, (q_dest, s_dest, experts) in int4.items():
                parts, kind = plan[name]
                if kind == "experts":
                    parts = [t.experts(experts.start, experts.stop) for t in parts]
                q, s = _read_int4(reader, cfg, parts, kind)
                q_dest.copy_(q)
                s_dest.copy_(s)
            for name, (dest, index) in pieces.items():
                parts, kind = plan[name]
                first = 1 if kind == "experts" else 0  # dim 0 of stacked experts: any of them
                if [(s.start, s.stop) for s in index[first:]] != [(0, n) for n in dest.shape[first:]]:
                    raise ValueError(f"{name}: a GGUF piece is a whole tensor or some experts, not {index}")
                if kind == "experts":
                    parts = [t.experts(index[0].start, index[0].stop) for t in parts]
                if dest.is_contiguous():
                    _float_weight(reader, cfg, parts, kind, dest.dtype, out=dest)
                else:
                    dest.copy_(_float_weight(reader, cfg, parts, kind, dest.dtype))
    finally:
        reader.close()


def load_gguf(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
              max_memory: int | None = None, policy: str = "lru", prefetch: bool = True,
              keep_int4: bool = True, quant: str | None = None, group: int = 32) -> Any:
    """A mixlab `Transformer` from a GGUF file (see the module docstring); eval mode. Matrices stored
    as Q4_0 are int4 modules (`Int4Linear`, int4 expert buffers), or with `keep_int4=False` floats
    (dequantised: a plain model that saves and trains, as `mixlab convert` needs); everything else is
    float in `dtype` (default: the float type of most matrix elements, a quantised one's float32). `max_memory`: the
    experts stay in the file, read on demand into an expert cache of that many bytes
    (`mixlab.checkpoint.offload`). `quant="int8"` / `"int4"`: every other matrix the format covers is
    quantised (int4: groups of `group`) as soon as it is read (`load_model`'s); int8 refuses a file
    whose Q4_0 matrices are kept int4, as prepare_for_inference refuses its model."""
    from mixlab.checkpoint import meta_model
    from mixlab.model.inference import keep_quantised_modules, quant_names, quantize_weight

    h = read_header(path)
    cfg = config_from_header(h)
    plan = _plan(h, cfg)
    quantise: set[str] = set()
    kept = _int4_names(plan) if keep_int4 else set()
    check_quant_over_q4_0(h.path, bool(kept), quant, group)
    if quant is not None:
        quantise = quant_names(meta_model(cfg), quant, group=group) - kept
    offload = max_memory is not None
    if offload:
        from mixlab.checkpoint.offload import check_offloadable

        check_offloadable(cfg, h.path, device)
        plan = [p for p in plan if p[2] != "experts"]
    want = dtype or default_dtype(h)
    if torch.device(device).type == "cpu" and not offload:  # one that cannot fit: refused now, not killed minutes in
        from mixlab.dtypes import dtype_name
        from mixlab.model.memory import refuse_if_short

        refuse_if_short(str(h.path), cfg, dtype_name(want), quant, kept=bool(kept))
    reader = _Reader(h)
    state: dict[str, torch.Tensor] = {}
    quantised: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        for name, parts, kind in plan:
            if name in kept:
                q, s = _read_int4(reader, cfg, parts, kind)
                quantised[name] = q.to(device), s.to(device)
                continue
            if quant is not None and name in quantise and kind == "experts" and torch.device(device).type == "cpu":
                quantised[name] = _quantised_experts(reader, cfg, parts, want, quant, group)
                continue
            x = _float_weight(reader, cfg, parts, kind, want).to(device)
            if quant is not None and name in quantise:  # rounded now: one weight's floats at a time
                quantised[name] = quantize_weight(x, quant, group=group, scale_dtype=want)
            else:
                state[name] = x
            del x  # a quantised weight's floats go now, not once the next weight is allocated
    finally:
        reader.close()
    if quant is not None and "output.weight" in quantise and cfg.tie_embeddings:  # the embeddings, quantised
        quantised["output.weight"] = quantize_weight(state["tok_embeddings.weight"], quant, group=group,
                                                     scale_dtype=want)

    model = meta_model(cfg)
    keep_quantised_modules(model, quantised)  # swap the float modules / parameters for quantised ones
    tied = cfg.tie_embeddings and "output.weight" not in quantised
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, assign=True, strict=False)
    if offload:
        from mixlab.checkpoint.offload import GGUFSource, offload_experts
        from mixlab.ops.offload import SlotFormat

        assert max_memory is not None
        source = GGUFSource(h, cfg)
        fmt = SlotFormat("int4", want, 32) if source.int4() else SlotFormat(quant or "plain", want, group)
        offload_experts(model, source, max_memory=max_memory, fmt=fmt, policy=policy, prefetch=prefetch)
        if quant == "int4":  # offloaded int4 products take exact activations (as prepare_for_inference sets them)
            model.int4_activations = "float32"
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:  # a bug, not a file problem: every tensor was planned
        raise RuntimeError(f"GGUF load left tensors unset: {missing[:5]}")
    if tied:
        model.output.weight = model.tok_embeddings.weight
    if quantised or offload:
        model.requires_grad_(False)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Tokenizer: a SentencePiece model rebuilt from the `llama` vocabulary


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    return _varint(num << 3 | wire) + payload


def _pb_bytes(num: int, b: bytes) -> bytes:
    return _field(num, 2, _varint(len(b)) + b)


def _pb_int(num: int, v: int) -> bytes:
    return _field(num, 0, _varint(v & (2**64 - 1)))


def sentencepiece_proto(path: str | Path, header: GGUFHeader | None = None) -> bytes:
    """A serialised SentencePiece `ModelProto` (BPE, byte fallback) equal to the GGUF file's `llama`
    vocabulary: its pieces, scores and token types (GGUF numbers them as SentencePiece does), and
    its special ids. Written with the protobuf wire format directly (no protobuf dependency).
    `header`: the file's, when the caller has read it already."""
    h = header or read_header(path)
    model = h.metadata.get("tokenizer.ggml.model")
    if model != "llama":
        raise CheckpointError(f"{h.path}: tokenizer {model!r} in the GGUF metadata is not supported (expected "
                              "'llama', a SentencePiece vocabulary); pass a tokenizer file instead")
    tokens = h.metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise CheckpointError(f"{h.path}: tokenizer.ggml.tokens is missing or not a list of strings")
    n = len(tokens)
    scores = h.metadata.get("tokenizer.ggml.scores", np.zeros(n, np.float32))
    types = h.metadata.get("tokenizer.ggml.token_type", np.ones(n, np.int32))
    if len(scores) != n or len(types) != n:
        raise CheckpointError(f"{h.path}: {n} tokens but {len(scores)} scores and {len(types)} token types")
    parts = []  # joined once: `+=` on bytes copied the whole vocabulary per piece (~0.8 s for 32k)
    for tok, score, ttype in zip(tokens, scores, types, strict=True):
        t = int(ttype)
        if not 1 <= t <= 6:
            t = 1
        body = _pb_bytes(1, tok.encode("utf-8")) + _field(2, 5, struct.pack("<f", float(score))) + _pb_int(3, t)
        parts.append(_pb_bytes(1, body))
    pieces = b"".join(parts)

    def special(key: str, default: int) -> int:
        v = h.metadata.get(key, default)
        return int(v) if isinstance(v, (int, np.integer)) and 0 <= int(v) < n else -1

    trainer = (_pb_int(3, 2) + _pb_int(4, n) + _pb_int(35, 1)  # model_type BPE, vocab_size, byte_fallback
               + _pb_int(40, max(special("tokenizer.ggml.unknown_token_id", 0), 0))
               + _pb_int(41, special("tokenizer.ggml.bos_token_id", 1))
               + _pb_int(42, special("tokenizer.ggml.eos_token_id", 2))
               + _pb_int(43, special("tokenizer.ggml.padding_token_id", -1)))
    prefix = bool(h.metadata.get("tokenizer.ggml.add_space_prefix", True))
    normalizer = (_pb_bytes(1, b"identity") + _pb_int(3, int(prefix)) + _pb_int(4, 0) + _pb_int(5, 1))
    return pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)
