"""The native CPU decoding kernels of `decode.c`: built on request, loaded with ctypes, checked.

Nothing here builds or loads anything by itself. `load()` does, and only these callers ask for it:
inference preparation (`mixlab.model.inference.prepare_for_inference`, and `load_model(quant="int4")`,
whose int4 rounding and K-quant dequantisation then run here), the engine's `Runner` (so
`generate`, `chat` and `serve`), `mixlab bench`, the ahead-of-time build (`python -m
mixlab.ops.native`, `mixlab build-kernels`) and tests. Until then `library()` is None
and every kernel choice (`mixlab.ops.registry`) takes PyTorch's kernels, so loading a model and
running a forward pass never starts a compiler. `MIXLAB_NATIVE=0` turns the kernels off.

The build runs `cc -O3 -march=native -fopenmp -ffp-contract=off` (`$CC` overrides `cc`; GCC's and
clang's builds compute the same bits) once per source version, compiler and CPU; the result is
cached in `$MIXLAB_CACHE` (default `$XDG_CACHE_HOME/mixlab`, that is `~/.cache/mixlab`; where that
cannot be written, `$TMPDIR/mixlab-UID` if that folder is ours alone) under a name that hashes all
three, written to a temporary file and renamed, so concurrent builds never load a half-written
library; a cached file that is not whole (`intact`: cut short by a crash or a full disk) is rebuilt,
never loaded (the loader would die of SIGBUS on its missing pages).
Without a compiler, a library an earlier build left for this source and CPU is used; so is one in a
cache that has become read-only (a container run with --read-only), rather than building again.

Loading checks the library against this file (`check_abi`): its ABI version, the sizes of the
structures of `mixlab.h` and the offsets of their fields must equal ours, and the SIMD instructions
it was compiled with must be ones this CPU has (detected at run time with cpuid); otherwise it is refused with a message
(`NativeABIError`), never called with pointers it would misread.

Why ctypes and not a PyTorch C++ extension: `decode.c` needs no PyTorch headers (it works on raw
pointers the caller owns), so it compiles in a second instead of a minute, and one `ctypes` call per
block costs microseconds. OpenMP: the library links `libgomp.so.1`, which resolves to the copy
PyTorch has already loaded, so both use one thread pool. `mixlab.ops.native.ops` wraps the entry
points as PyTorch operators (`torch.library.custom_op`), which is what the rest of mixlab calls.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from struct import calcsize, unpack_from

import torch

HERE = Path(__file__).parent
SOURCES = (HERE / "mixlab.h", HERE / "decode.c")
SOURCE = HERE / "decode.c"  # the file that is compiled; it includes mixlab.h

# mixlab.h's MX_ABI_VERSION: bump both when a structure, enum or entry point changes.
ABI_VERSION = 12

# Element types as mixlab.h numbers them (int4: MX_Q4_32 + log2(group / 32); with activations
# rounded to int8, MX_Q4_32_A8 + log2(group / 32); int8 with them, I8_A8).
F32, BF16, I8, Q4_32, Q4_32_A8, I8_A8 = 0, 1, 2, 3, 6, 9
TYPE_CODES = {torch.float32: F32, torch.bfloat16: BF16, torch.int8: I8}
INT4_GROUPS = (32, 64, 128)


def type_code(w: torch.Tensor, scale: torch.Tensor | None = None, *, act8: bool = False) -> int:
    """mixlab.h's type of weight `w`: its dtype's, or for int4 (uint8, float16 group scales) the
    MX_Q4_* of its group size. `act8` (int4 and int8): MX_Q4_*_A8 / MX_I8_A8, activations rounded to
    int8 per block of 32 (`mixlab.ops.quant.round_activations_q8`)."""
    if w.dtype == torch.int8 and act8:
        if w.shape[-1] % 32:
            raise ValueError(f"int8 weights times int8 activations need a multiple of 32 inputs per row, "
                             f"not {w.shape[-1]}")
        return I8_A8
    if w.dtype != torch.uint8:
        return TYPE_CODES[w.dtype]
    if scale is None or scale.dtype != torch.float16:
        raise ValueError("int4 weights need float16 group scales")
    group = 2 * w.shape[-1] // scale.shape[-1]
    if group not in INT4_GROUPS:
        raise ValueError(f"native int4 kernels take groups of {INT4_GROUPS}, not {group}")
    return (Q4_32_A8 if act8 else Q4_32) + INT4_GROUPS.index(group)


def scale_arg(w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor | None:
    """The scales as C reads them: float32 row scales (int8), float16 group scales as stored (int4)."""
    if scale is None:
        return None
    return scale.contiguous() if w.dtype == torch.uint8 else scale.float().contiguous()
# mixlab.h's MX_SIMD_* bits.
SIMD_AVX512, SIMD_AVX512_BF16, SIMD_AVX512_VNNI = 1, 2, 4

_P, _I64, _F, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


class NativeABIError(RuntimeError):
    """A native library that does not match this Python code (or this CPU)."""


class Layer(ctypes.Structure):
    """mixlab.h's `mx_layer`: one layer's weights (scales only for int8; router None when dense)."""

    _fields_ = [(name, _P) for name in (
        "attn_norm", "wqkv", "wqkv_scale", "wo", "wo_scale", "ffn_norm", "router", "w13", "w13_scale",
        "w2", "w2_scale", "k_cache", "v_cache", "wqkv_p", "wo_p", "w13_p", "w2_p")]


class Model(ctypes.Structure):
    """mixlab.h's `mx_model`: shapes, types and the weights outside the layers."""

    _fields_ = [*[(name, _I64) for name in ("D", "H", "G", "Hd", "E", "K", "F", "V", "L", "window")],
                ("eps", _F), ("wt", _I), ("ct", _I), ("et", _I),
                *[(name, _P) for name in ("inv_freq", "embed", "out_norm", "out", "out_scale", "layers", "out_p")]]


class Buffers(ctypes.Structure):
    """mixlab.h's `mx_bufs`: the work buffers of one step."""

    _fields_ = [(name, _P) for name in (
        "x", "h", "qkv", "att", "scores", "o", "g", "a", "y", "mix", "hb", "attb", "ab", "chosen", "top")]


class MoEArgs(ctypes.Structure):
    """mixlab.h's `mx_moe_args`: shapes, pointers and work buffers of `mx_moe`."""

    _fields_ = [*[(name, _I64) for name in ("T", "D", "F", "E", "K")], ("wt", _I),
                *[(name, _P) for name in ("x", "idx", "mix", "w13", "w13_scale", "w2", "w2_scale", "out",
                                          "xs", "xsb", "g", "a", "ab", "ys", "order", "inverse")]]


class Batch(ctypes.Structure):
    """mixlab.h's `mx_batch`: one engine step of T tokens (`mx_decode_batch`) and its work buffers."""

    _fields_ = [*[(name, _I64) for name in ("T", "C", "nt", "R")],
                *[(name, _P) for name in (
                    "token", "pos", "seq", "rows", "cache_pos", "k_cache", "v_cache", "logits", "chosen", "x", "h", "o",
                    "qkv", "att", "rope", "scores", "mix", "hb", "attb", "idx", "xs", "g", "a", "ys", "xsb", "ab",
                    "order", "inverse", "top")],
                ("invariant", _I64), ("J", _I64), ("lora", _P), ("adapter", _P), ("lora_u", _P), ("lora_ld", _I64)]


class Lora(ctypes.Structure):
    """mixlab.h's `mx_lora`: one LoRA adapter's update of one weight (A [R, I] and B transposed, [R, X],
    float32, the scale folded into B; A None: none)."""

    _fields_ = [("A", _P), ("B", _P), ("R", _I64)]


# mixlab.h's MX_LORA_*: the weights of a layer an adapter can update, in `mx_batch.lora`'s order
LORA_SITES = ("wqkv", "wo", "router", "w13", "w2")

# mx_sizeof's structure numbers (mixlab.h MX_SIZEOF_*), in order.
STRUCTS: tuple[type[ctypes.Structure], ...] = (Layer, Model, Buffers, MoEArgs, Batch, Lora)

_SIGNATURES: dict[str, tuple[type | None, list[type]]] = {
    "mx_abi_version": (_I, []),
    "mx_sizeof": (_I64, [_I]),
    "mx_offsetof": (_I64, [_I, _I]),
    "mx_simd": (_I, []),
    "mx_cpu_features": (_I, []),
    # model, buffers, token, pos, cache_pos, C, slot, n, logits, threads
    "mx_decode_step": (None, [_P, _P, _I64, _I64, _P, _I64, _I64, _I64, _P, _I]),
    "mx_decode_batch": (None, [_P, _P, _I]),  # model, batch, threads
    "mx_gemv": (None, [_I, _P, _P, _I64, _I64, _P, _P, _P, _I]),
    "mx_amx": (_I, [_I]),  # want: 1 on, 0 off, -1 ask
    # wt w scale N K M X XB Y threads
    "mx_linear": (None, [_I, _P, _P, _I64, _I64, _I64, _P, _P, _P, _I, _I]),
    "mx_moe": (None, [_P, _I]),
    "mx_pack_bf16": (None, [_P, _I64, _I64, _P, _I]),  # w N K P threads
    # w P N K M X XB Y threads
    "mx_linear_packed": (None, [_P, _P, _I64, _I64, _I64, _P, _P, _P, _I]),
    "mx_quantize_q4": (None, [_I, _P, _I64, _I64, _I64, _P, _P, _I]),  # xt x R D G q s threads
    "mx_dequantize": (_I, [_I, _P, _I64, _I, _P, _I]),  # ggml type, blocks, B, yt, y, threads
}

_lib: ctypes.CDLL | None = None
_simd = 0  # SIMD bits usable here: compiled into the library and present on this CPU
_failed: str | None = None  # why the last load failed (warned once)


def env_on(name: str) -> bool:
    """A switch from the environment, on by default: False when `name` is 0, false, no or off (any case)."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def enabled() -> bool:
    """False when `MIXLAB_NATIVE` is 0, false, no or off (any case)."""
    return env_on("MIXLAB_NATIVE")


def _cpu_id() -> str:
    """What `-march=native` depends on: the CPU model and its feature flags (Linux), else the arch."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


def compiler() -> str | None:
    """`$CC` as given (it may carry arguments: "ccache gcc", "gcc -m64"), else the first of cc, gcc
    and clang on the PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def command(cc: str) -> list[str]:
    """The compiler `cc` as the start of a command line: split as a shell splits `$CC`, unless it
    names a file (a path with spaces)."""
    return [cc] if os.path.isfile(cc) else shlex.split(cc)


# -ffp-contract=off: `a * b + c` stays two roundings, as PyTorch computes it, with any compiler (GCC's
# -std=c11 implies it; clang fuses such expressions into FMAs by default, which moved logits past the
# tests' 1e-4 against PyTorch's and an int4 x int8 rounding tie, one request's greedy tokens with it).
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c11", "-ffp-contract=off", "-shared", "-fPIC")


def _home_cache() -> Path:
    """`$MIXLAB_CACHE`, else `$XDG_CACHE_HOME/mixlab`, else `~/.cache/mixlab` (an empty variable
    counts as unset: Path("") is the working directory); RuntimeError without a home directory."""
    return Path(os.environ.get("MIXLAB_CACHE") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mixlab")


def _cache_dir() -> Path:
    """The folder builds go to: `_home_cache()`, else (not writable, no home directory) one in the
    temporary directory."""
    try:
        cache = _home_cache()
        cache.mkdir(parents=True, exist_ok=True)
        if not os.access(cache, os.W_OK):
            raise PermissionError(cache)
    except (OSError, RuntimeError):  # a read-only home (CI, containers): build in the temporary directory instead
        cache = Path(tempfile.gettempdir()) / f"mixlab-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        # A shared /tmp: anyone may have made that folder first and put a library of theirs in it, which
        # we would load. Only a folder that is ours and that nobody else can write is reused.
        try:
            cache.mkdir(mode=0o700, exist_ok=True)
            st = cache.lstat()
            ours = not hasattr(os, "getuid") or (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
                                                 and not st.st_mode & 0o022)
        except OSError:
            ours = False
        if not ours:
            cache = Path(tempfile.mkdtemp(prefix="mixlab-"))  # private to this process; built again
    return cache


def compile_library(cc: str, out: Path, *, defines: tuple[str, ...] = ()) -> Path:
    """Compile `decode.c` into `out` (atomically: a temporary file renamed into place). `defines`:
    extra `-D` flags (tests build deliberately mismatched libraries with them)."""
    # The linker makes the file in a private folder, so it gets the mode of any library it writes
    # (umask's, readable by a shared cache's other users), not a temporary file's 0600 plus x.
    tmp_dir = tempfile.mkdtemp(dir=out.parent, prefix=".mixlab-build-")
    tmp = os.path.join(tmp_dir, out.name)
    try:
        for flags in (FLAGS, tuple(f for f in FLAGS if f != "-fopenmp")):  # no OpenMP: one thread, still fast
            cmd = [*command(cc), *flags, *(f"-D{d}" for d in defines), f"-I{HERE}", str(SOURCE), "-o", tmp, "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(tmp, out)
                return out
        err = proc.stderr.strip()[-2000:]
        raise RuntimeError(f"{cc} failed to build {SOURCE.name} (exit status {proc.returncode})"
                           + (f":\n{err}" if err else ", no message"))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _source_key() -> str:
    """The part of a cached library's name that the source, the flags and the CPU decide."""
    text = "\0".join(p.read_text() for p in SOURCES)
    return hashlib.sha256("\0".join([text, " ".join(FLAGS), _cpu_id()]).encode()).hexdigest()[:16]


def cached_path(cc: str) -> Path:
    """Where the library for this source, compiler `cc` and CPU is cached (built or not)."""
    try:
        version = subprocess.run([*command(cc), "--version"], capture_output=True, text=True, check=False).stdout
    except OSError as e:  # the bare "[Errno 2] No such file or directory: '/x'" did not say what /x was
        named = " ($CC)" if os.environ.get("CC") == cc else ""
        raise RuntimeError(f"the C compiler {cc}{named} cannot be run: {e.strerror or e}") from e
    compiler_key = hashlib.sha256(f"{cc}\0{version}".encode()).hexdigest()[:8]
    return _cache_dir() / f"mixlab-decode-{_source_key()}-{compiler_key}.so"


def intact(path: str | os.PathLike[str]) -> bool:
    """Whether a library file is whole: an ELF file is at least as long as its header says (its
    program and section header tables; linkers write the latter last). A truncated one (a crash
    before its bytes reached the disk, a full disk while copying a cache) may not fail to load but
    kill the process with SIGBUS when the loader touches the missing pages. Other formats (Mach-O):
    not empty."""
    try:
        with open(path, "rb") as f:
            head, size = f.read(64), os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if head[:4] != b"\x7fELF":
        return size > 0 and sys.platform != "linux"
    if len(head) < 64 or head[4] not in (1, 2) or head[5] not in (1, 2):
        return False
    order, (word, at) = "<>"[head[5] - 1], (("I", 28), ("Q", 32))[head[4] - 1]  # ELF32 / ELF64 fields
    phoff, shoff = unpack_from(order + 2 * word, head, at)
    phent, phnum, shent, shnum = unpack_from(order + "4H", head, at + 2 * calcsize(word) + 6)
    return size >= max(phoff + phent * phnum, shoff + shent * shnum)


def build(cc: str | None = None) -> Path:
    """The built library for this source, compiler and CPU (compiled now unless cached whole).
    Without a compiler (none on the PATH, or a `$CC` that cannot be run), one an earlier build left
    for this source and CPU (`mixlab build-kernels` where a compiler was at hand: an HPC job without
    the compiler module, a conda environment not activated), built by any compiler."""
    cc = cc or compiler()
    # Where to look: the build folder and, when that is the temporary fallback, the home cache
    # (read-only, but it may hold a library built before: a container run with --read-only).
    cache = _cache_dir()
    places = [cache]
    try:
        if _home_cache() != cache:
            places.insert(0, _home_cache())
    except RuntimeError:  # no home directory
        pass
    why = "no C compiler found (set CC)"
    if cc is not None:
        try:
            out = cached_path(cc)  # in `cache`; a damaged one there is replaced
        except RuntimeError as e:  # a $CC that cannot be run (a module not loaded): as without a compiler
            why = str(e)
        else:
            return next((d / out.name for d in places if intact(d / out.name)), None) or compile_library(cc, out)
    built = [p for d in places for p in d.glob(f"mixlab-decode-{_source_key()}-*.so") if intact(p)]
    if not built:
        raise RuntimeError(f"{why}, and no library built earlier for this mixlab and CPU in "
                           f"{' or '.join(map(str, places))}")
    return max(built, key=lambda p: p.stat().st_mtime)


def check_abi(lib: ctypes.CDLL, path: str | os.PathLike[str]) -> int:
    """Refuse (`NativeABIError`) a library that does not match this code or this CPU; return the
    SIMD bits it may use here."""
    try:
        lib.mx_abi_version.restype, lib.mx_abi_version.argtypes = _I, []
        version = lib.mx_abi_version()
    except AttributeError:
        raise NativeABIError(f"{path}: no mx_abi_version; a library from an older decode.c (ABI 1) or not "
                             f"mixlab's; expected ABI {ABI_VERSION}. Delete it and rebuild "
                             f"(python -m mixlab.ops.native)") from None
    if version != ABI_VERSION:
        raise NativeABIError(f"{path}: native library ABI version {version}, but this mixlab expects "
                             f"{ABI_VERSION}; rebuild it (python -m mixlab.ops.native)")
    try:
        lib.mx_sizeof.restype, lib.mx_sizeof.argtypes = _I64, [_I]
        lib.mx_offsetof.restype, lib.mx_offsetof.argtypes = _I64, [_I, _I]
        lib.mx_simd.restype, lib.mx_cpu_features.restype = _I, _I
    except AttributeError as e:
        raise NativeABIError(f"{path}: ABI {version} but an entry point is missing ({e})") from None
    compiled, cpu = lib.mx_simd(), lib.mx_cpu_features()
    if compiled & ~cpu:
        raise NativeABIError(f"{path}: built with SIMD bits {compiled} but this CPU has {cpu} (a library built "
                             f"for another CPU); rebuild it on this machine (python -m mixlab.ops.native)")
    for i, struct in enumerate(STRUCTS):
        size, ours = lib.mx_sizeof(i), ctypes.sizeof(struct)
        if size != ours:
            raise NativeABIError(f"{path}: structure {struct.__name__} is {size} bytes in the native library but "
                                 f"{ours} in Python (mixlab.h and ops/native/__init__.py disagree; ABI {version})")
        theirs = [lib.mx_offsetof(i, j) for j in range(len(struct._fields_) + 1)]
        mine = [getattr(struct, name).offset for name, *_ in struct._fields_] + [-1]
        if theirs != mine:
            bad = next(j for j, (a, b) in enumerate(zip(theirs, mine, strict=True)) if a != b)
            field = struct._fields_[bad][0] if bad < len(struct._fields_) else "(end)"
            raise NativeABIError(f"{path}: structure {struct.__name__} field {bad} ({field}) is at offset "
                                 f"{theirs[bad]} in the native library but {mine[bad]} in Python (mixlab.h and "
                                 f"ops/native/__init__.py disagree; ABI {version})")
    return compiled & cpu


def load_library(path: str | os.PathLike[str]) -> tuple[ctypes.CDLL, int]:
    """Open and check one library file: (library, usable SIMD bits)."""
    if os.path.exists(path) and not intact(path):
        raise NativeABIError(f"{path}: not a whole library (truncated or empty); delete it and rebuild "
                             f"(python -m mixlab.ops.native)")
    lib = ctypes.CDLL(str(path))
    simd = check_abi(lib, path)
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is None:
            raise NativeABIError(f"{path}: no entry point {name} (ABI {ABI_VERSION}); rebuild it "
                                 f"(python -m mixlab.ops.native)")
        fn.argtypes = argtypes
        fn.restype = restype
    return lib, simd


def load() -> ctypes.CDLL | None:
    """Build (unless cached) and load the native kernels; None, after one warning, when they cannot
    be had (`MIXLAB_NATIVE=0`, no C compiler, a failed build, a refused library). The only function
    here that compiles."""
    global _lib, _simd, _failed
    if not enabled():
        return None
    if _lib is not None or _failed is not None:
        return _lib
    try:
        _lib, _simd = load_library(build())
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _failed = str(e)
        warnings.warn(f"mixlab: native kernels unavailable ({e}); PyTorch kernels run instead", stacklevel=2)
        return None
    _lib.mx_amx(1 if env_on("MIXLAB_AMX") else 0)
    return _lib


def amx(on: bool | None = None) -> bool:
    """Whether the engine step's bf16 panels (`pack_bf16`) run on AMX's tile unit (an Intel Xeon's,
    Linux; `decode.c`'s `mx_amx`), where they stream the weights at the memory's speed for 1 to 16
    tokens; turned on by `load` where this CPU and kernel allow it, unless `MIXLAB_AMX=0`. `on`
    switches it (tests, A/B benchmarks; True only where it is allowed). False without the kernels."""
    if on is not None and not isinstance(on, bool):
        raise TypeError(f"amx(on={on!r}): expected True, False or None (only ask)")
    lib = library()
    if lib is None:
        return False
    return bool(lib.mx_amx(-1 if on is None else int(on)))


def library() -> ctypes.CDLL | None:
    """The loaded native kernels, or None: never builds or loads (see `load`)."""
    return _lib if enabled() else None


def fast(dtype: torch.dtype) -> bool:
    """Whether the loaded kernels for weights of `dtype` are vectorised on this CPU (AVX-512, and
    AVX512-BF16 for bf16): only then do they beat PyTorch's, so only then does mixlab use them.
    Reads what `load` found (no call into C): cheap, and traceable by torch.compile."""
    if _lib is None or (dtype not in TYPE_CODES and dtype != torch.uint8) or not enabled():
        return False
    return bool(_simd & (SIMD_AVX512_BF16 if dtype == torch.bfloat16 else SIMD_AVX512))


def _need() -> ctypes.CDLL:
    if _lib is None:
        raise RuntimeError("native kernels not loaded (mixlab.ops.native.load())")
    return _lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check_weight(what: str, w: torch.Tensor, scale: torch.Tensor | None, D: int) -> None:
    """ValueError unless weight `w` (`[..., X, D]`, int4 `[..., X, D / 2]`) and its scales (int8
    `[..., X]`, int4 `[..., X, groups]`) take activations of width D: C reads them with these shapes."""
    if (w.dtype in (torch.int8, torch.uint8)) != (scale is not None):
        raise ValueError(f"{what}: int8 / int4 weights need scales, and only they take them")
    width = w.shape[-1] * (2 if w.dtype == torch.uint8 else 1)
    rows = None if scale is None else scale.shape[:-1] if w.dtype == torch.uint8 else scale.shape
    if width != D or (rows is not None and rows != w.shape[:-1]):
        scales = "" if scale is None else f" with scales {tuple(scale.shape)}"
        raise ValueError(f"{what}: weights {tuple(w.shape)} ({width} inputs per row){scales} do not take "
                         f"activations of width {D}")


def gemv(w_XD: torch.Tensor, x_D: torch.Tensor, scale_X: torch.Tensor | None = None, *,
         act8: bool = False) -> torch.Tensor:
    """y = w @ x with the native kernel (float32 out): float32, bf16, int8 (+ float32 row scales) or
    int4 (uint8 + float16 group scales) weights; `act8` (int4, int8): x rounded to int8 per block of 32."""
    lib = _need()
    X, D = w_XD.shape
    _check_weight("gemv", w_XD, scale_X, x_D.numel())
    w_XD = w_XD.contiguous()
    x = x_D.float().contiguous()
    xb = torch.empty(D, dtype=torch.int16)
    y = torch.empty(X, dtype=torch.float32)
    s = scale_arg(w_XD, scale_X)
    if w_XD.dtype == torch.uint8:
        D *= 2
        x = x_D.float().contiguous()
        xb = torch.empty(D, dtype=torch.int16)
    lib.mx_gemv(type_code(w_XD, scale_X, act8=act8), w_XD.data_ptr(), _ptr(s), X, D, x.data_ptr(), xb.data_ptr(),
                y.data_ptr(), torch.get_num_threads())
    return y


# decode.c's stack arrays hold this many experts (`mx_moe`'s grouping, the router's logits): the
# registry gives stacks of more (an offloaded model's pool of slots can be one) to PyTorch.
MAX_EXPERTS = 256

# Up to this many rows of activations (batched decoding), `linear`, which reads each weight once for
# all rows at close to the memory bandwidth, beats PyTorch's GEMMs (BENCHMARKS.md).
MAX_ROWS = 16


def linear(x_ND: torch.Tensor, w_XD: torch.Tensor, scale_X: torch.Tensor | None = None, *,
           act8: bool = False) -> torch.Tensor:
    """x @ w.T (times the row scales for int8 weights) for a few rows: each weight row read once.
    `act8` (int4 and int8 weights): the rows of x rounded to int8 per block of 32 (MX_Q4_*_A8, MX_I8_A8).
    int8 weights times bf16 x (without act8) multiply as bf16 (decode.c's `act16`: exact, x being bf16
    already), in panels for many rows, as a bf16 model's engine step does.
    The kernel itself; callers use the operator `torch.ops.mixlab.linear` (`ops.py`)."""
    lib = _need()
    lead, X, D = x_ND.shape[:-1], w_XD.shape[0], x_ND.shape[-1]
    _check_weight("linear", w_XD, scale_X, D)
    x = x_ND.reshape(-1, D).float().contiguous()
    w = w_XD.contiguous()
    M = x.shape[0]
    y = torch.empty(M, X, dtype=torch.float32)
    act16 = w.dtype == torch.int8 and not act8 and x_ND.dtype == torch.bfloat16 and D % 32 == 0
    xb = torch.empty(M * D if w.dtype == torch.bfloat16 or act16 else 0, dtype=torch.int16)
    s = scale_arg(w, scale_X)
    lib.mx_linear(type_code(w, scale_X, act8=act8), w.data_ptr(), _ptr(s), X, D, M, x.data_ptr(), xb.data_ptr(),
                  y.data_ptr(), int(act16), torch.get_num_threads())
    return y.to(x_ND.dtype).reshape(*lead, X)


def packable(w: torch.Tensor) -> bool:
    """Whether `pack_bf16` takes this matrix (or stack of matrices): bf16, rows and row length
    multiples of 32, and the bf16 kernels vectorised here."""
    return (w.dtype == torch.bfloat16 and w.dim() >= 2 and w.shape[-1] % 32 == 0
            and (w.numel() // w.shape[-1]) % 32 == 0 and fast(torch.bfloat16))


def pack_bf16(w: torch.Tensor) -> torch.Tensor:
    """The rows of bf16 matrix `w` [..., N, K] (every leading index a block of rows: a stack of
    experts) in 32-row panels, as decode.c's kernels for a few tokens read them (`mx_pack_bf16` in
    mixlab.h gives the layout). Same shape and dtype; only the native kernels can read it."""
    if not packable(w):
        raise ValueError(f"pack_bf16 needs a bf16 matrix with rows and row length multiples of 32 (and "
                         f"AVX512-BF16), not {w.dtype} {tuple(w.shape)}")
    P = torch.empty_like(w, memory_format=torch.contiguous_format)
    pack_into(w, P)
    return P


def pack_into(w: torch.Tensor, P: torch.Tensor) -> None:
    """`pack_bf16(w)` written into P (a contiguous tensor of w's shape and dtype)."""
    if not packable(w) or P.shape != w.shape or P.dtype != w.dtype or not P.is_contiguous():
        raise ValueError(f"pack_into needs a packable bf16 matrix and a contiguous tensor of its shape, not "
                         f"{w.dtype} {tuple(w.shape)} into {P.dtype} {tuple(P.shape)}")
    w = w.detach().contiguous()
    _need().mx_pack_bf16(w.data_ptr(), w.numel() // w.shape[-1], w.shape[-1], P.data_ptr(), torch.get_num_threads())


def linear_packed(x_ND: torch.Tensor, w_XD: torch.Tensor, packed_XD: torch.Tensor) -> torch.Tensor:
    """`linear` for bf16 weights that also have their panels (`pack_bf16(w_XD)`): whole 32-row
    panels from `packed_XD`, rows outside them from `w_XD` (tests, benchmarks)."""
    lib = _need()
    lead, X, D = x_ND.shape[:-1], w_XD.shape[0], x_ND.shape[-1]
    if (w_XD.dtype != torch.bfloat16 or w_XD.dim() != 2 or packed_XD.shape != w_XD.shape
            or packed_XD.dtype != torch.bfloat16 or w_XD.shape[1] != D):
        raise ValueError(f"linear_packed needs a bf16 matrix [X, {D}] and its panels of the same shape, not "
                         f"{w_XD.dtype} {tuple(w_XD.shape)} and {packed_XD.dtype} {tuple(packed_XD.shape)}")
    x = x_ND.reshape(-1, D).float().contiguous()
    w, P = w_XD.contiguous(), packed_XD.contiguous()
    M = x.shape[0]
    y = torch.empty(M, X, dtype=torch.float32)
    xb = torch.empty(M * D, dtype=torch.int16)
    lib.mx_linear_packed(w.data_ptr(), P.data_ptr(), X, D, M, x.data_ptr(), xb.data_ptr(), y.data_ptr(),
                         torch.get_num_threads())
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
    """The experts of an MoE layer for a few tokens (decode.c's `mx_moe`); see `mixlab.ops.moe`.
    The kernel itself; callers use the operator `torch.ops.mixlab.moe` (`ops.py`)."""
    lib = _need()
    (T, D), (E, F2), K = x_TD.shape, w13_E2FD.shape[:2], idx_TK.shape[1]
    F = F2 // 2
    if E > MAX_EXPERTS:
        raise ValueError(f"native MoE supports up to {MAX_EXPERTS} experts, not {E}")
    _check_weight("moe w13", w13_E2FD, w13_scale_E2F, D)
    _check_weight("moe w2", w2_EDF, w2_scale_ED, F)
    if w2_EDF.shape[:2] != (E, D) or idx_TK.shape != weight_TK.shape or idx_TK.shape[0] != T:
        raise ValueError(f"native MoE: w2 {tuple(w2_EDF.shape)} must be [E={E}, D={D}, F], idx and weight [T={T}, K], "
                         f"not {tuple(idx_TK.shape)} and {tuple(weight_TK.shape)}")
    N = T * K
    x = x_TD.float().contiguous()
    idx = idx_TK.to(torch.int64).contiguous()
    mix = weight_TK.float().contiguous()
    w13, w2 = w13_E2FD.contiguous(), w2_EDF.contiguous()
    bf = w13.dtype == torch.bfloat16
    out = torch.empty(T, D, dtype=torch.float32)
    f32 = [torch.empty(n, dtype=torch.float32) for n in (N * D, N * 2 * F, N * F, N * D)]
    b16 = [torch.empty(n if bf else 0, dtype=torch.int16) for n in (N * D, N * F)]
    i32 = [torch.empty(N, dtype=torch.int32) for _ in range(2)]
    s13, s2 = scale_arg(w13, w13_scale_E2F), scale_arg(w2, w2_scale_ED)
    if w13.dtype == torch.uint8 and type_code(w13, w13_scale_E2F) != type_code(w2, w2_scale_ED):
        raise ValueError("native int4 experts need one group size for w13 and w2")
    args = MoEArgs(T, D, F, E, K, type_code(w13, w13_scale_E2F), x.data_ptr(), idx.data_ptr(), mix.data_ptr(),
                   w13.data_ptr(), _ptr(s13), w2.data_ptr(), _ptr(s2), out.data_ptr(),
                   f32[0].data_ptr(), b16[0].data_ptr(), f32[1].data_ptr(), f32[2].data_ptr(), b16[1].data_ptr(),
                   f32[3].data_ptr(), i32[0].data_ptr(), i32[1].data_ptr())
    lib.mx_moe(ctypes.byref(args), torch.get_num_threads())
    return out.to(x_TD.dtype)


def quantize_int4(w_RD: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of float32 or bf16 values (contiguous, on the CPU) as int4: (packed uint8 [R, D/2],
    float16 scales [R, D/G]), `mx_quantize_q4`'s bytes, equal to `mixlab.ops.quant._quantize_int4_rows`'
    (which callers reach through `mixlab.ops.quant.quantize_int4`)."""
    lib = _need()
    R, D = w_RD.shape
    if (w_RD.dtype not in (torch.float32, torch.bfloat16) or w_RD.device.type != "cpu" or not w_RD.is_contiguous()
            or group not in INT4_GROUPS or D % group):
        raise ValueError(f"native quantize_int4 needs contiguous CPU float32 or bf16 rows of a multiple of a "
                         f"group of {INT4_GROUPS}, not {w_RD.dtype} {tuple(w_RD.shape)} on {w_RD.device} in groups "
                         f"of {group}")
    q = torch.empty(R, D // 2, dtype=torch.uint8)
    s = torch.empty(R, D // group, dtype=torch.float16)
    lib.mx_quantize_q4(TYPE_CODES[w_RD.dtype], w_RD.data_ptr(), R, D, group, q.data_ptr(), s.data_ptr(),
                       torch.get_num_threads())
    return q, s


# ggml's block types `mx_dequantize` takes (mixlab.h MX_GGML_*): Q4_K, Q5_K, Q6_K -> bytes per 256 values
DEQUANT_TYPES = {12: 144, 13: 176, 14: 210}


def dequantize(raw: torch.Tensor, ttype: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Whole blocks of ggml K-quant type `ttype` (a key of `DEQUANT_TYPES`), as bytes (uint8, any shape),
    as float32 [number of values]: `mx_dequantize`'s, equal to `mixlab.checkpoint.gguf_dequant.dequantize`.
    `out`: written there instead (a contiguous CPU float32 or bf16 tensor of that many elements, any
    shape); bf16 gets the float32 values rounded as PyTorch's `copy_` rounds them (a NaN's payload apart)."""
    lib = _need()
    size = DEQUANT_TYPES.get(ttype)
    if size is None or raw.dtype != torch.uint8 or raw.numel() % size:
        raise ValueError(f"native dequantize takes whole blocks (uint8) of ggml types {sorted(DEQUANT_TYPES)}, not "
                         f"{raw.numel()} {raw.dtype} elements of type {ttype}")
    raw = raw.contiguous()
    B = raw.numel() // size
    if out is None:
        out = torch.empty(B * 256, dtype=torch.float32)
    elif (out.dtype not in (torch.float32, torch.bfloat16) or out.device.type != "cpu" or not out.is_contiguous()
          or out.numel() != B * 256):
        raise ValueError(f"native dequantize writes {B * 256} values into a contiguous CPU float32 or bf16 tensor, "
                         f"not {out.dtype} {tuple(out.shape)} on {out.device}")
    lib.mx_dequantize(ttype, raw.data_ptr(), B, TYPE_CODES[out.dtype], out.data_ptr(), torch.get_num_threads())
    return out
