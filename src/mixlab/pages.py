"""2 MiB pages for the big buffers the CPU kernels stream (weights, KV cache, the expert cache's
slots): on this project's hosts a thread streams ~17 GB/s over 4 KiB pages and ~33 GB/s over 2 MiB
pages (the page walks; BENCHMARKS.md, "Attention at long contexts"). PyTorch does not ask for
transparent huge pages, and Linux gives them only on request (`madvise` mode) on such machines."""

from __future__ import annotations

import ctypes
import sys

import torch

__all__ = ["HUGE", "huge_empty", "huge_pages", "zeros"]

HUGE = 2 << 20  # x86-64's 2 MiB pages
_MADV_HUGEPAGE = 14  # back a range with huge pages as it is first written
_MADV_COLLAPSE = 25  # Linux >= 6.1: back a range with huge pages now, whatever the THP setting


def _advise_huge(t: torch.Tensor, advice: int) -> bool:
    """`madvise(advice)` over the whole 2 MiB pages inside tensor t's memory; whether Linux took it
    (False elsewhere, for a tensor smaller than a page, or when refused)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return False
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    start = (t.data_ptr() + HUGE - 1) & ~(HUGE - 1)
    end = (t.data_ptr() + t.numel() * t.element_size()) & ~(HUGE - 1)
    return end > start and madvise(start, end - start, advice) == 0


def huge_pages(tensors: list[torch.Tensor]) -> int:
    """Ask Linux to back the whole 2 MiB pages inside each tensor with huge pages (`MADV_COLLAPSE`,
    contents unchanged); returns how many ranges it collapsed (0 elsewhere, or when refused).

    A decoding step streams every weight once, 4 KiB pages at a time by default (PyTorch does not
    ask for transparent huge pages, which this machine only gives on request): one TLB miss and page
    walk per 4 KiB. With 2 MiB pages the int4 mini-moe step took 9% less time (BENCHMARKS.md, issue 16)."""
    return sum(_advise_huge(t, _MADV_COLLAPSE) for t in tensors)


def huge_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor whose whole 2 MiB pages Linux backs with huge pages as
    they are first written (`MADV_HUGEPAGE` before any write: nothing to collapse later); a plain
    `torch.empty` elsewhere."""
    out = torch.empty(shape, dtype=dtype)
    _advise_huge(out, _MADV_HUGEPAGE)
    return out


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.zeros`, on 2 MiB pages on CPU (`huge_empty`): the KV caches, which decoding attention
    streams (on 4 KiB pages the page walks hold one thread to ~17 GB/s)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return huge_empty(shape, dtype).zero_()
