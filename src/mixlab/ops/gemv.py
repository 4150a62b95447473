"""Matrix-vector products for decoding one token, compiled once by inductor.

Decoding one token is a chain of matrix-vector products (GEMV): every weight is read once and used
for one multiply-add, so the speed is the speed of reading memory. PyTorch's eager CPU kernels are
GEMM kernels that treat one row as a tiny matrix and reach only part of the bandwidth; inductor
compiles this reduction into a vectorised, multi-threaded C++ loop that streams the weight (bf16,
float32 or int8) once, converts it to float32 in registers and accumulates in float32. On the
benchmark CPU it beats eager `F.linear` on plain bf16 weights ~2x, oneDNN-packed weights ~1.2x and
torch's int8 kernel `aten._weight_int8pack_mm` ~1.3x in isolation (BENCHMARKS.md); inside the
whole model, plain weights with this kernel decode ~7% slower than packed weights, which is why
`prepare_for_inference` packs by default; unprepared models and int8 models use it.

Compiled with dynamic shapes, so one kernel serves every matrix size (one compile per weight dtype,
a few seconds each, once per process). If compilation is unavailable (no C++ compiler), or
`MIXLAB_COMPILE=0`, `gemv` returns None and callers use their eager kernel.

Shape legend: X output features, D input features.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch


def _gemv(x_1D: torch.Tensor, w_XD: torch.Tensor) -> torch.Tensor:
    """x @ w.T, accumulated in float32."""
    return (x_1D.float()[:, None, :] * w_XD.float()[None]).sum(-1).to(x_1D.dtype)


def _gemv_scaled(x_1D: torch.Tensor, w_XD: torch.Tensor, s_X: torch.Tensor) -> torch.Tensor:
    """x @ (w * s[:, None]).T for int8 weights with per-row scales, accumulated in float32."""
    return ((x_1D.float()[:, None, :] * w_XD.float()[None]).sum(-1) * s_X.float()).to(x_1D.dtype)


# One compiled function per variant, so that each keeps a handful of graphs (dynamo recompiles on
# every new variant and falls back to slow eager code past its recompile limit).
_compiled: dict[str, Callable[..., torch.Tensor]] = {}
_disabled = os.environ.get("MIXLAB_COMPILE", "1") == "0"


def enabled() -> bool:
    return not _disabled


def set_enabled(on: bool) -> None:
    """Switch the compiled kernel on or off (for comparisons; on by default)."""
    global _disabled
    _disabled = not on


def gemv(x_1D: torch.Tensor, w_XD: torch.Tensor, s_X: torch.Tensor | None = None) -> torch.Tensor | None:
    """The compiled GEMV for one CPU row and a plain weight, or None when it does not apply."""
    global _disabled
    if _disabled or x_1D.shape[0] != 1 or x_1D.device.type != "cpu" or w_XD.is_mkldnn or x_1D.requires_grad:
        return None
    # A fresh copy of the (tiny) input: its storage offset and strides then never vary. Duck sizing
    # off: equal sizes that are equal by coincidence (an offset and a width) must not become guards.
    x_1D = x_1D.clone()
    from torch.fx.experimental import _config as fx_config

    try:
        with fx_config.patch(use_duck_shape=False):  # type: ignore[attr-defined]
            if s_X is None:
                fn = _compiled.get("plain") or _compiled.setdefault("plain", torch.compile(_gemv, dynamic=True))
                return fn(x_1D, w_XD)
            fn = _compiled.get("scaled") or _compiled.setdefault("scaled", torch.compile(_gemv_scaled, dynamic=True))
            return fn(x_1D, w_XD, s_X)
    except Exception as e:  # no compiler, unsupported platform: fall back to eager kernels for good
        warnings.warn(f"mixlab: compiled GEMV unavailable ({type(e).__name__}: {e}); using eager kernels",
                      stacklevel=2)
        _disabled = True
        return None
