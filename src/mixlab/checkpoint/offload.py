"""Expert offloading from checkpoint files: `load_model(path, max_memory=...)` loads attention,
norms, embeddings and routers as usual and leaves every MoE layer's experts on disk, read on demand
into an `ExpertCache` (`mixlab.ops.offload`) by the sources here.

A source knows each expert's byte ranges in the files, checked with the rest of the checkpoint
(safetensors: `io.scan` and the key map; GGUF: `gguf_read.read_header`), and `pread`s them (no
mmap: the files' pages never count in the process's memory):
- safetensors, per-expert tensors (transformers `experts.{e}.w1/w3/w2`, Mistral) or fused per layer
  (transformers v5 `gate_up_proj` `[E, 2F, D]`: one expert is one contiguous slice);
- GGUF: `ffn_{gate,up,down}_exps` `[E, F, D]`, E the slowest dimension, so an expert is one slice
  of each; Q4_0 experts stay int4 (scales and nibbles split apart, as `load_gguf` does), other
  types are converted to floats a chunk of rows at a time and put in the slot's format.
A slot of the cache's format is filled straight from the file when the stored bytes are that format
(same float dtype, or Q4_0 into int4 groups of 32), else through one temporary per expert
(safetensors) or per chunk of rows (GGUF).
Prefetch reads come in chunks of `CHUNK` bytes with the cache's `pause` called after each, so that
a demand read never queues behind a whole guessed expert.

Shape legend: E experts, D width, F expert FFN width.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mixlab.checkpoint.io import DTYPES, CheckpointError, TensorInfo
from mixlab.checkpoint.keymaps import Rule
from mixlab.config import ModelConfig, format_bytes
from mixlab.model.formats import OffloadedExperts
from mixlab.model.moe import MoEBlock
from mixlab.model.transformer import Transformer
from mixlab.ops.offload import CHUNK, ExpertCache, Pause, Slot, SlotFormat
from mixlab.ops.quant import INT4_GROUPS


@dataclass(frozen=True)
class _Range:
    """`nbytes` bytes at `start` of `file`, holding `numel` elements of `dtype` (a safetensors name)."""

    file: Path
    start: int
    nbytes: int
    dtype: str
    what: str  # for errors: the tensor (and expert)


class _Files:
    """One read-only descriptor per file, opened up front (two threads read at once)."""

    def __init__(self, files: set[Path]) -> None:
        self.fds = {f: os.open(f, os.O_RDONLY) for f in sorted(files)}
        self.lock = threading.Lock()
        # Benchmarks: drop each range from the page cache once read, so that every miss reads the
        # disk (a machine whose memory cannot hold the file as well as the cache).
        self.drop_pages = False

    def read(self, r: _Range, dest: memoryview, pause: Pause | None = None) -> None:
        fd, done = self.fds[r.file], 0
        step = r.nbytes if pause is None else CHUNK
        try:
            while done < r.nbytes:
                n = os.preadv(fd, [dest[done : min(done + step, r.nbytes)]], r.start + done)
                if n <= 0:
                    raise CheckpointError(f"{r.file}: file ended while reading {r.what} (truncated?)")
                done += n
                if pause is not None:
                    pause(n)
        finally:
            if self.drop_pages:
                os.posix_fadvise(fd, r.start, done, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        with self.lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()


def _bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, writable, without a copy."""
    arr: Any = t.reshape(-1).view(torch.uint8).numpy()
    return memoryview(arr).cast("B")


def _expert_ranges(rule: Rule, infos: dict[str, TensorInfo], E: int, e: int) -> list[_Range]:
    """Expert `e`'s parts of the stacked tensor `rule` makes, in its row-major order: whole per-expert
    tensors (`experts.{e}.w1`, `.w3`) or the e-th slice of one fused tensor `[E, ...]`."""
    if len(rule.theirs) % E == 0 and len(rule.theirs) >= E:
        m = len(rule.theirs) // E
        return [_Range(infos[n].file, infos[n].start, infos[n].nbytes, infos[n].dtype, repr(n))
                for n in rule.theirs[e * m : (e + 1) * m]]
    (name,) = rule.theirs
    info = infos[name]
    per = info.nbytes // E
    return [_Range(info.file, info.start + e * per, per, info.dtype, f"{name!r} expert {e}")]


class SafetensorsSource:
    """Experts of a safetensors checkpoint (see the module docstring); `tables[i]` = (w13 rule,
    w2 rule) of MoE layer i."""

    def __init__(self, infos: dict[str, TensorInfo], tables: list[tuple[Rule, Rule]], config: ModelConfig) -> None:
        assert config.moe is not None
        self.infos, self.tables, self.E = infos, tables, config.moe.num_experts
        self.D, self.F = config.dim, config.ffn_dim
        files = {infos[n].file for r13, r2 in tables for n in (*r13.theirs, *r2.theirs)}
        self.files = _Files(files)

    def read(self, layer: int, expert: int, fmt: SlotFormat, slot: Slot, *, pause: Pause | None = None) -> int:
        r13, r2 = self.tables[layer]
        parts13 = _expert_ranges(r13, self.infos, self.E, expert)
        parts2 = _expert_ranges(r2, self.infos, self.E, expert)
        stored = {p.dtype for p in parts13 + parts2}
        n = sum(p.nbytes for p in parts13 + parts2)
        if fmt.kind == "plain" and stored == {_name(fmt.dtype)}:  # straight into the slot
            for dest, parts in ((slot.w13, parts13), (slot.w2, parts2)):
                buf, at = _bytes(dest), 0
                for p in parts:
                    self.files.read(p, buf[at : at + p.nbytes], pause)
                    at += p.nbytes
            return n
        w13 = self._floats(parts13, (2 * self.F, self.D), pause)
        w2 = self._floats(parts2, (self.D, self.F), pause)
        fmt.fill(slot, w13, w2)
        return n

    def _floats(self, parts: list[_Range], shape: tuple[int, int], pause: Pause | None) -> torch.Tensor:
        rows = []
        for p in parts:
            t = torch.empty(p.nbytes // DTYPES[p.dtype].itemsize, dtype=DTYPES[p.dtype])
            self.files.read(p, _bytes(t), pause)
            rows.append(t)
        return (torch.cat(rows) if len(rows) > 1 else rows[0]).view(shape)

    def close(self) -> None:
        self.files.close()


def _name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


class GGUFSource:
    """Experts of a GGUF file: per layer the `ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps` tensors."""

    def __init__(self, header: object, config: ModelConfig) -> None:
        from mixlab.checkpoint.gguf_read import GGUFHeader

        assert isinstance(header, GGUFHeader) and config.moe is not None
        self.h, self.F = header, config.ffn_dim
        self.layers = [tuple(header.tensors[f"blk.{i}.ffn_{p}_exps.weight"] for p in ("gate", "up", "down"))
                       for i in range(config.n_layers)]
        self.files = _Files({t.file for ts in self.layers for t in ts})
        self._buffers = threading.local()
        from mixlab.checkpoint.gguf_read import Q4_0

        self._int4 = all(t.type == Q4_0 for ts in self.layers for t in ts)

    def int4(self) -> bool:
        """Whether every expert tensor is Q4_0 (then the experts stay int4, groups of 32)."""
        return self._int4

    def read(self, layer: int, expert: int, fmt: SlotFormat, slot: Slot, *, pause: Pause | None = None) -> int:
        from mixlab.checkpoint.gguf_read import _Reader

        # each [1, rows, D], named with its expert in errors
        subs = [replace(t.experts(expert, expert + 1), name=f"{t.name} expert {expert}") for t in self.layers[layer]]
        n = sum(s.nbytes for s in subs)
        gate, up, down = subs
        if fmt.kind == "int4" and fmt.group == 32 and self.int4():
            assert slot.w13_scale is not None and slot.w2_scale is not None
            F = self.F
            for t, q, s in ((gate, slot.w13[:F], slot.w13_scale[:F]), (up, slot.w13[F:], slot.w13_scale[F:]),
                            (down, slot.w2, slot.w2_scale)):
                # Blocks of 2 scale bytes + 16 nibble bytes, split straight into the slot by torch's
                # strided copy (~2 GB/s on this machine, against ~0.6 GB/s through numpy temporaries).
                rows, nb = q.shape[0], t.shape[-1] // 32
                blocks = self._raw(t, pause).view(rows, nb, 18)
                s.view(torch.uint8).view(rows, nb, 2).copy_(blocks[..., :2])
                q.view(rows, nb, 16).copy_(blocks[..., 2:])
            return n
        if pause is not None:
            pause(0)
        reader = _Reader.__new__(_Reader)  # its conversions, over this source's descriptor
        reader.h, reader.fds = self.h, self.files.fds
        # Other types: converted a chunk of rows at a time (at most CHUNK bytes of file) into a buffer kept
        # per thread, in the model's float dtype (as load_gguf reads resident experts), and rounded
        # straight into the slot: a whole expert's floats (352 MB for Mixtral in bf16) were fresh memory
        # on every read, their page faults costing more than the native conversions themselves.
        for t, which, at in ((gate, "w13", 0), (up, "w13", self.F), (down, "w2", 0)):
            rows, D = t.shape[-2], t.shape[-1]
            step = max(1, CHUNK // (t.nbytes // rows))
            buf = self._floats(step * D, fmt.dtype)
            for lo in range(0, rows, step):
                part = t.rows(lo, min(lo + step, rows))
                x = buf[: part.shape[0] * D].view(part.shape[0], D)
                reader.floats_into(part, x)
                fmt.fill_rows(slot, which, at + lo, x)
                if pause is not None:
                    pause(part.nbytes)
        return n

    def _floats(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A float buffer of at least `numel` elements of `dtype`, kept per reading thread."""
        buf: torch.Tensor | None = getattr(self._buffers, "floats", None)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._buffers.floats = torch.empty(numel, dtype=dtype)
        return buf

    def _raw(self, t: object, pause: Pause | None = None) -> torch.Tensor:
        """The bytes of `t`, in a buffer kept per reading thread (a fresh one per read costs its page faults)."""
        from mixlab.checkpoint.gguf_read import GGUFTensor

        assert isinstance(t, GGUFTensor)
        buf: torch.Tensor | None = getattr(self._buffers, "buf", None)
        if buf is None or buf.numel() < t.nbytes:
            buf = self._buffers.buf = torch.empty(t.nbytes, dtype=torch.uint8)
        out = buf[: t.nbytes]
        self.files.read(_Range(t.file, t.start, t.nbytes, "U8", repr(t.name)), _bytes(out), pause)
        return out

    def close(self) -> None:
        self.files.close()


def offload_experts(model: Transformer, source: SafetensorsSource | GGUFSource, *, max_memory: int,
                    fmt: SlotFormat, policy: str = "lru", prefetch: bool = True) -> ExpertCache:
    """Give every MoE layer of `model` `OffloadedExperts` over one `ExpertCache` of `max_memory`
    bytes reading from `source`; returns the cache."""
    cfg = model.config
    assert cfg.moe is not None
    # Refused now if no format fits a token's experts (a format that might is checked when it is final:
    # `prepare_for_inference(quant=...)` can still make the slots smaller).
    least = SlotFormat("int4", fmt.dtype, max(INT4_GROUPS)).expert_bytes(cfg.dim, cfg.ffn_dim)
    if max_memory < cfg.moe.top_k * least:
        raise ValueError(
            f"max_memory {format_bytes(max_memory)} cannot hold one token's top-{cfg.moe.top_k} experts in any "
            f"format: give at least {format_bytes(cfg.moe.top_k * least)} (int4, group {max(INT4_GROUPS)}), "
            f"{format_bytes(cfg.moe.top_k * fmt.expert_bytes(cfg.dim, cfg.ffn_dim))} as loaded ({fmt.kind})")
    cache = ExpertCache(source, num_layers=cfg.n_layers, num_experts=cfg.moe.num_experts, top_k=cfg.moe.top_k,
                        dim=cfg.dim, ffn_dim=cfg.ffn_dim, budget=max_memory, fmt=fmt, policy=policy,
                        prefetch=prefetch)
    blocks = [b.ffn for b in model.layers]
    for i, ffn in enumerate(blocks):
        assert isinstance(ffn, MoEBlock)
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        ffn.experts = OffloadedExperts(cache, i, cfg.moe.num_experts, nxt.gate if isinstance(nxt, MoEBlock) else None)
    return cache


def check_offloadable(config: ModelConfig, path: Path, device: torch.device | str) -> None:
    if config.moe is None:
        raise ValueError(f"{path}: max_memory offloads experts; this model is dense (no experts)")
    if torch.device(device).type != "cpu":
        raise ValueError(f"max_memory (expert offloading) runs on cpu, not {device}")


def expert_bytes_on_disk(rules: list[Rule], infos: dict[str, TensorInfo]) -> int:
    return sum(infos[n].nbytes for r in rules for n in r.theirs)


def resident_bytes(model: Transformer) -> int:
    """Bytes of the model's parameters and buffers outside offloaded experts (what stays in memory)."""
    seen: set[int] = set()
    n = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        n += t.numel() * t.element_size()
    return n
