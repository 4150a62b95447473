"""The native CPU decoding kernels of `decode.c`: built at first use, loaded with ctypes.

`library()` returns the loaded kernels, or None when they cannot be had (`MIXLAB_NATIVE=0`, no C
compiler, a failed build); callers then keep PyTorch's kernels, so mixlab runs everywhere and is
fast where a compiler is at hand. The build runs `cc -O3 -march=native -fopenmp` (`$CC` overrides
`cc`) once per source version, compiler and CPU; the result is cached in `$MIXLAB_CACHE` (default
`~/.cache/mixlab`) under a name that hashes all three, written to a temporary file and renamed, so
concurrent first uses never load a half-written library. It takes about a second.

Why ctypes and not a PyTorch C++ extension: `decode.c` needs no PyTorch headers (it works on raw
pointers the caller owns), so it compiles in a second instead of a minute, and one `ctypes` call per
block costs microseconds. OpenMP: the library links `libgomp.so.1`, which resolves to the copy
PyTorch has already loaded, so both use one thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode.c")

# Element types as decode.c numbers them.
F32, BF16, I8 = 0, 1, 2
TYPE_CODES = {torch.float32: F32, torch.bfloat16: BF16, torch.int8: I8}

_P, _I64, _F, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


class Layer(ctypes.Structure):
    """decode.c's `mx_layer`: one layer's weights (scales only for int8; router None when dense)."""

    _fields_ = [(name, _P) for name in (
        "attn_norm", "wqkv", "wqkv_scale", "wo", "wo_scale", "ffn_norm", "router", "w13", "w13_scale",
        "w2", "w2_scale", "k_cache", "v_cache")]


class Model(ctypes.Structure):
    """decode.c's `mx_model`: shapes, types and the weights outside the layers."""

    _fields_ = [*[(name, _I64) for name in ("D", "H", "G", "Hd", "E", "K", "F", "V", "L", "window")],
                ("eps", _F), ("wt", _I), ("ct", _I), ("et", _I),
                *[(name, _P) for name in ("inv_freq", "embed", "out_norm", "out", "out_scale", "layers")]]


class Buffers(ctypes.Structure):
    """decode.c's `mx_bufs`: the work buffers of one step."""

    _fields_ = [(name, _P) for name in (
        "x", "h", "qkv", "att", "scores", "o", "g", "a", "y", "mix", "hb", "attb", "ab", "chosen")]


_SIGNATURES: dict[str, list[type]] = {
    # model, buffers, token, pos, cache_pos, C, slot, n, logits, threads
    "mx_decode_step": [_P, _P, _I64, _I64, _P, _I64, _I64, _I64, _P, _I],
    "mx_gemv": [_I, _P, _P, _I64, _I64, _P, _P, _P, _I],
    # wt w scale N K M X XB Y threads
    "mx_linear": [_I, _P, _P, _I64, _I64, _I64, _P, _P, _P, _I],
    # T D F E K x idx mix | wt w13 s w2 s | out xs xsb g a ab ys order inverse threads
    "mx_moe": [_I64, _I64, _I64, _I64, _I64, _P, _P, _P, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P,
               _P, _I],
}

_lib: ctypes.CDLL | None = None
_tried = False


def enabled() -> bool:
    return os.environ.get("MIXLAB_NATIVE", "1") != "0"


def _cpu_id() -> str:
    """What `-march=native` depends on: the CPU model and its feature flags (Linux), else the arch."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(cc: str) -> Path:
    cache = Path(os.environ.get("MIXLAB_CACHE", Path.home() / ".cache" / "mixlab"))
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    flags = ["-O3", "-march=native", "-fopenmp", "-std=c11", "-shared", "-fPIC"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(flags), _cpu_id()]).encode())
    name = f"mixlab-decode-{key.hexdigest()[:16]}.so"
    if (cache / name).exists():
        return cache / name
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if not os.access(cache, os.W_OK):
            raise PermissionError(cache)
    except OSError:  # a read-only home (CI, containers): build in the temporary directory instead
        cache = Path(tempfile.gettempdir()) / f"mixlab-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        cache.mkdir(parents=True, exist_ok=True)
    out = cache / name
    if out.exists():
        return out
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
    os.close(fd)
    try:
        for attempt in (flags, [f for f in flags if f != "-fopenmp"]):  # no OpenMP: one thread, still fast
            proc = subprocess.run([cc, *attempt, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(tmp, out)
                return out
        raise RuntimeError(f"{cc} failed to build {SOURCE.name}:\n{proc.stderr.strip()[-2000:]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library() -> ctypes.CDLL | None:
    """The native kernels, building them on first use; None (after one warning) if unavailable."""
    global _lib, _tried
    if _tried or not enabled():
        return _lib if enabled() else None
    _tried = True
    cc = _compiler()
    if cc is None:
        warnings.warn("mixlab: no C compiler found (set CC); decoding uses PyTorch kernels", stacklevel=2)
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"mixlab: native decoding kernels unavailable ({e}); decoding uses PyTorch kernels",
                      stacklevel=2)
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None
    lib.mx_simd.restype = ctypes.c_int
    _lib = lib
    return _lib


def fast(dtype: torch.dtype) -> bool:
    """Whether the kernels for weights of `dtype` are vectorised on this CPU (AVX-512, and
    AVX512-BF16 for bf16): only then do they beat PyTorch's, so only then does mixlab use them."""
    lib = library()
    if lib is None or dtype not in TYPE_CODES:
        return False
    return bool(lib.mx_simd() & (2 if dtype == torch.bfloat16 else 1))


def gemv(w_XD: torch.Tensor, x_D: torch.Tensor, scale_X: torch.Tensor | None = None) -> torch.Tensor:
    """y = w @ x with the native kernel (float32 out): float32, bf16 or int8 (+ float32 row scales) weights."""
    lib = library()
    if lib is None:
        raise RuntimeError("native kernels unavailable")
    X, D = w_XD.shape
    if (w_XD.dtype == torch.int8) != (scale_X is not None):
        raise ValueError("int8 weights need row scales, and only int8 weights take them")
    w_XD = w_XD.contiguous()
    x = x_D.float().contiguous()
    xb = torch.empty(D, dtype=torch.int16)
    y = torch.empty(X, dtype=torch.float32)
    s = None if scale_X is None else scale_X.float().contiguous()
    lib.mx_gemv(TYPE_CODES[w_XD.dtype], w_XD.data_ptr(), None if s is None else s.data_ptr(), X, D,
                x.data_ptr(), xb.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y


def usable(*weights: torch.Tensor | None) -> bool:
    """Whether the native kernels can take these weights: plain contiguous CPU tensors of a supported
    dtype, nothing that needs a gradient, the library built, and no `torch.compile` tracing (dynamo
    cannot trace a ctypes call)."""
    if torch.compiler.is_compiling():
        return False
    for w in weights:
        if w is None:
            continue
        if (not isinstance(w, torch.Tensor) or w.is_mkldnn or w.device.type != "cpu" or not w.is_contiguous()
                or not fast(w.dtype) or (w.requires_grad and torch.is_grad_enabled())):
            return False
    return library() is not None


# Up to this many rows of activations (batched decoding), `linear`, which reads each weight once for
# all rows at close to the memory bandwidth, beats PyTorch's GEMMs (BENCHMARKS.md).
MAX_ROWS = 16


def takes(x_ND: torch.Tensor, w_XD: torch.Tensor) -> bool:
    """Whether `linear(x, w)` should run natively: a few CPU rows, no autograd, a usable weight."""
    return (x_ND.shape[:-1].numel() <= MAX_ROWS and x_ND.device.type == "cpu"
            and not (x_ND.requires_grad and torch.is_grad_enabled()) and usable(w_XD))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def linear(x_ND: torch.Tensor, w_XD: torch.Tensor, scale_X: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (times the row scales for int8 weights) for a few rows: each weight row read once."""
    lib = library()
    assert lib is not None
    lead, (X, D) = x_ND.shape[:-1], w_XD.shape
    x = x_ND.reshape(-1, D).float().contiguous()
    M = x.shape[0]
    y = torch.empty(M, X, dtype=torch.float32)
    xb = torch.empty(M * D if w_XD.dtype == torch.bfloat16 else 0, dtype=torch.int16)
    s = None if scale_X is None else scale_X.float().contiguous()
    lib.mx_linear(TYPE_CODES[w_XD.dtype], w_XD.data_ptr(), _ptr(s), X, D, M, x.data_ptr(), xb.data_ptr(),
                  y.data_ptr(), torch.get_num_threads())
    return y.to(x_ND.dtype).reshape(*lead, X)


def moe(
    x_TD: torch.Tensor,
    w13_E2FD: torch.Tensor,
    w2_EDF: torch.Tensor,
    idx_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    w13_scale_E2F: torch.Tensor | None = None,
    w2_scale_ED: torch.Tensor | None = None,
) -> torch.Tensor:
    """The experts of an MoE layer for a few tokens (decode.c's `mx_moe`); see `mixlab.ops.moe`."""
    lib = library()
    assert lib is not None
    (T, D), (E, F2, _), K = x_TD.shape, w13_E2FD.shape, idx_TK.shape[1]
    F = F2 // 2
    if E > 256:
        raise ValueError(f"native MoE supports up to 256 experts, not {E}")
    N = T * K
    x = x_TD.float().contiguous()
    idx = idx_TK.to(torch.int64).contiguous()
    mix = weight_TK.float().contiguous()
    bf = w13_E2FD.dtype == torch.bfloat16
    out = torch.empty(T, D, dtype=torch.float32)
    f32 = [torch.empty(n, dtype=torch.float32) for n in (N * D, N * 2 * F, N * F, N * D)]
    b16 = [torch.empty(n if bf else 0, dtype=torch.int16) for n in (N * D, N * F)]
    i32 = [torch.empty(N, dtype=torch.int32) for _ in range(2)]
    s13 = None if w13_scale_E2F is None else w13_scale_E2F.float().contiguous()
    s2 = None if w2_scale_ED is None else w2_scale_ED.float().contiguous()
    lib.mx_moe(T, D, F, E, K, x.data_ptr(), idx.data_ptr(), mix.data_ptr(), TYPE_CODES[w13_E2FD.dtype],
               w13_E2FD.data_ptr(), _ptr(s13), w2_EDF.data_ptr(), _ptr(s2), out.data_ptr(),
               f32[0].data_ptr(), b16[0].data_ptr(), f32[1].data_ptr(), f32[2].data_ptr(), b16[1].data_ptr(),
               f32[3].data_ptr(), i32[0].data_ptr(), i32[1].data_ptr(), torch.get_num_threads())
    return out.to(x_TD.dtype)
