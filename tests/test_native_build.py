"""Building, caching and loading the native kernels (`mixlab.ops.native`) where things go wrong: a
damaged cached library, a compiler that is missing or fails. Each ends in PyTorch's kernels after at
most one warning, never a crash. Stub libraries stand in for decode.c where the test is about the
file, not the kernels (compiling decode.c takes seconds)."""

from __future__ import annotations

import copy
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from mixlab.ops import native

CC = native.compiler()
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")


def _stub(path, body: str = "int mx_abi_version(void) { return 1; }\n"):  # type: ignore[no-untyped-def]
    src = path.with_suffix(".c")
    src.write_text(body)
    subprocess.run([*native.command(CC), "-shared", "-fPIC", str(src), "-o", str(path)], check=True)
    return path


@needs_cc
def test_a_truncated_cached_library_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    """A cached library cut short (a crash before its bytes reached the disk) is rebuilt: loading it
    killed the process with SIGBUS, which no warning or fallback could catch."""
    monkeypatch.setenv("MIXLAB_CACHE", str(tmp_path))
    path = native.cached_path(CC)
    whole = _stub(tmp_path / "whole.so").read_bytes()
    assert native.intact(tmp_path / "whole.so")
    built: list[str] = []
    monkeypatch.setattr(native, "compile_library", lambda cc, out: built.append(cc) or shutil.copy(
        tmp_path / "whole.so", out) and out)
    for cut in (0, 100, len(whole) // 2, len(whole) - 1):
        path.write_bytes(whole[:cut])
        assert not native.intact(path)
        assert native.build() == path and built == [CC]
        assert path.read_bytes() == whole
        assert native.build() == path and built == [CC]  # whole now: cached
        built.clear()


@needs_cc
def test_loading_a_truncated_library_is_refused_not_a_crash(tmp_path):
    lib = _stub(tmp_path / "lib.so")
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])
    code = (f"from mixlab.ops import native\ntry:\n    native.load_library({str(lib)!r})\n"
            "except native.NativeABIError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]  # it was -7 (SIGBUS)
    assert f"{lib}: not a whole library (truncated or empty)" in proc.stdout


@needs_cc
def test_cc_may_carry_arguments(tmp_path, monkeypatch):
    """`CC="ccache gcc"`, `CC="gcc -m64"`: split as make and setuptools split it (it was run as one
    program name: "No such file or directory: 'cc -m64'", and no native kernels)."""
    monkeypatch.setenv("CC", f"{CC} -m64")
    assert native.compiler() == f"{CC} -m64" and native.command(native.compiler()) == [CC, "-m64"]
    spaced = tmp_path / "my tools" / "cc"  # a path with a space is one program
    spaced.parent.mkdir()
    spaced.symlink_to(shutil.which(CC) or CC)
    assert native.command(str(spaced)) == [str(spaced)]
    stub = _stub(tmp_path / "stub.so")
    runs: list[list[str]] = []
    real_run = subprocess.run

    def run(cmd, **kw):  # type: ignore[no-untyped-def]
        runs.append(cmd)
        if cmd[-1] == "--version":
            return real_run(cmd, **kw)
        shutil.copy(stub, cmd[cmd.index("-o") + 1])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setenv("MIXLAB_CACHE", str(tmp_path / "cache"))
    path = native.build()
    assert native.intact(path) and [r[:2] for r in runs] == [[CC, "-m64"], [CC, "-m64"]]
    assert runs[1][2:3] == ["-O3"]


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes")
def test_the_temporary_cache_is_never_a_folder_someone_else_can_write(tmp_path, monkeypatch):
    """An unwritable cache (a read-only home) falls back to $TMPDIR/mixlab-UID. On a shared /tmp
    anyone could have made that folder first, with a library of theirs under the name we would
    load: it is reused only when it is ours and nobody else can write it, else a private folder."""
    (tmp_path / "home-file").write_text("")
    monkeypatch.setenv("MIXLAB_CACHE", str(tmp_path / "home-file" / "cache"))  # cannot be made
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    shared = tmp_path / f"mixlab-{os.getuid()}"
    assert native._cache_dir() == shared and stat.S_IMODE(shared.stat().st_mode) == 0o700
    assert native._cache_dir() == shared  # ours: reused
    shared.chmod(0o777)  # as someone else's would be
    other = native._cache_dir()
    assert other != shared and other.parent == tmp_path and stat.S_IMODE(other.stat().st_mode) == 0o700
    shared.rmdir()
    shared.symlink_to(other)
    assert native._cache_dir() not in (shared, other)


@pytest.mark.parametrize(("cc", "message"), [
    ("false", r"^false failed to build decode.c \(exit status 1\), no message$"),  # it ended in ":\n"
    # it said "[Errno 2] No such file or directory: '/nonexistent/cc'", not what that file was
    ("/nonexistent/cc", r"^the C compiler /nonexistent/cc \(\$CC\) cannot be run: No such file or directory, and no "
                        r"library built earlier"),
])
def test_a_compiler_that_fails_or_is_missing_leaves_pytorch_kernels_after_one_warning(cc, message, tmp_path,
                                                                                       monkeypatch):
    if cc == "false" and shutil.which("false") is None:
        pytest.skip("no `false` program")
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("MIXLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", None)
    with pytest.warns(UserWarning, match="native kernels unavailable") as caught:
        assert native.load() is None and native.load() is None
    assert len(caught) == 1
    assert re.search(message, native._failed or "")
    assert native.library() is None and not native.fast(torch.float32)
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_build_kernels_errors_are_one_line_of_the_command(tmp_path, monkeypatch, capsys):
    """`mixlab build-kernels` printed 'mixlab: native kernels ...' where every other command says
    `mixlab COMMAND: error: ...` (README), and exits 1 as they do when they fail; switched off by
    MIXLAB_NATIVE=off, it also said MIXLAB_NATIVE=0."""
    from mixlab.cli import main

    monkeypatch.setenv("MIXLAB_NATIVE", "off")
    assert main(["build-kernels"]) == 1
    err = capsys.readouterr().err
    assert err == "mixlab build-kernels: error: native kernels are switched off (MIXLAB_NATIVE=off)\n"
    monkeypatch.setenv("MIXLAB_NATIVE", "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("MIXLAB_CACHE", str(tmp_path))
    assert main(["build-kernels"]) == 1
    assert capsys.readouterr().err.startswith("mixlab build-kernels: error: native kernels unavailable: ")


@needs_cc
def test_a_built_library_is_readable_as_any_file_the_user_makes(tmp_path, monkeypatch):
    """The library gets the umask's mode (0755 under umask 022), as the linker gives any library,
    so the other users of a shared `$MIXLAB_CACHE` can load it; it was 0711 (a temporary file's
    0600 plus x): loading it failed for them with 'Permission denied'."""
    monkeypatch.setattr(native, "SOURCE", tmp_path / "stub.c")  # the flags and steps of decode.c's build
    native.SOURCE.write_text("int mx_abi_version(void) { return 1; }\n")
    out = native.compile_library(CC, tmp_path / "lib.so")
    (tmp_path / "plain").write_text("")
    assert stat.S_IMODE(out.stat().st_mode) & 0o444 == stat.S_IMODE((tmp_path / "plain").stat().st_mode) & 0o444
    assert native.intact(out) and sorted(p.name for p in tmp_path.iterdir()) == ["lib.so", "plain", "stub.c"]


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    """$MIXLAB_CACHE, else $XDG_CACHE_HOME/mixlab, else ~/.cache/mixlab; an empty variable counts
    as unset (an empty MIXLAB_CACHE cached into the working directory); no home directory at all
    (Path.home() raises) falls back to the temporary directory (it left no native kernels)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MIXLAB_CACHE", str(tmp_path / "mine"))
    assert native._cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("MIXLAB_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native._cache_dir() == tmp_path / "xdg" / "mixlab"  # it was ~/.cache/mixlab, XDG ignored
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert native._cache_dir() == tmp_path / "home" / ".cache" / "mixlab"  # it was "." for MIXLAB_CACHE=""
    monkeypatch.delenv("MIXLAB_CACHE")

    def no_home() -> None:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(native.Path, "home", no_home)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert native._cache_dir().parent == tmp_path / "tmp"


@pytest.mark.parametrize(("value", "on"), [("0", False), ("false", False), ("OFF", False), ("no", False),
                                           (" 0 ", False), ("1", True), ("", True), ("yes", True)])
def test_mixlab_native_switches_the_kernels_off_in_the_usual_spellings(value, on, monkeypatch):
    """MIXLAB_NATIVE=false / off / no turned nothing off (only "0" did): the kernels still ran."""
    monkeypatch.setenv("MIXLAB_NATIVE", value)
    assert native.enabled() is on
    if not on:
        monkeypatch.setattr(native, "build", lambda: pytest.fail("built while switched off"))
        assert native.load() is None and native.library() is None and not native.fast(torch.float32)


@needs_cc
@pytest.mark.slow  # builds decode.c (seconds)
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 SIMD flags")
def test_a_cpu_without_avx512_bf16_keeps_pytorch_kernels_for_bf16(tmp_path, monkeypatch):
    """A CPU without AVX512-BF16, simulated by a library built without it (CC="cc -mno-avx512bf16",
    as -march=native there would build it): bf16 models decode with PyTorch's kernels, token for
    token as with the kernels switched off; float32 ones still take the native kernels (where the
    CPU has AVX-512) and equal them too."""
    from mixlab.config import get_preset
    from mixlab.generate import generate
    from mixlab.model import Transformer

    monkeypatch.setenv("CC", f"{CC} -mno-avx512bf16")
    monkeypatch.setenv("MIXLAB_CACHE", str(tmp_path))
    lib, simd = native.load_library(native.build())
    assert not simd & native.SIMD_AVX512_BF16
    model = Transformer(get_preset("tiny-moe"))
    model.init_weights(seed=0, std=0.1)
    prompts = [torch.randint(3, 256, (7,)).tolist(), torch.randint(3, 256, (3,)).tolist()]
    for dtype in (torch.bfloat16, torch.float32):
        m = model.to(dtype).eval().requires_grad_(False)
        monkeypatch.setenv("MIXLAB_NATIVE", "0")
        off = [generate(copy.deepcopy(m), [p], max_new_tokens=12, stop_at_eos=False) for p in prompts]
        off.append(generate(copy.deepcopy(m), prompts, max_new_tokens=12, stop_at_eos=False))
        monkeypatch.setenv("MIXLAB_NATIVE", "1")
        monkeypatch.setattr(native, "_lib", lib)
        monkeypatch.setattr(native, "_simd", simd)
        assert native.fast(dtype) == (dtype == torch.float32 and bool(simd & native.SIMD_AVX512))
        on = [generate(copy.deepcopy(m), [p], max_new_tokens=12, stop_at_eos=False) for p in prompts]
        on.append(generate(copy.deepcopy(m), prompts, max_new_tokens=12, stop_at_eos=False))
        assert on == off, dtype


@needs_cc
def test_without_a_compiler_a_library_built_earlier_for_this_cpu_is_used(tmp_path, monkeypatch):
    """An HPC job without the compiler module, a shell without the conda environment's compiler:
    the library `mixlab build-kernels` built for this source and CPU is loaded (the cache's name
    hashed the compiler's --version output, so without a compiler it could not be found, and
    the kernels were off). A damaged one is not; none at all is one warning naming the cache."""
    monkeypatch.setenv("MIXLAB_CACHE", str(tmp_path))
    path = native.cached_path(CC)
    _stub(path)
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert native.compiler() is None
    assert native.build() == path
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=f"^no C compiler found \\(set CC\\), and no library built earlier for "
                                           f"this mixlab and CPU in {re.escape(str(tmp_path))}$"):
        native.build()


@needs_cc
def test_a_cc_that_cannot_be_run_is_no_compiler_and_a_library_built_earlier_is_used(tmp_path, monkeypatch):
    """CC naming a compiler that is not there (a shell profile's CC=gcc-13, the module not loaded):
    the library built earlier was not looked for, and the kernels were off, where a missing
    compiler uses it (README: 'without a compiler (unless `mixlab build-kernels` built them ...)')."""
    monkeypatch.setenv("MIXLAB_CACHE", str(tmp_path))
    path = _stub(native.cached_path(CC))
    monkeypatch.setenv("CC", str(tmp_path / "gcc-13"))
    assert native.build() == path
    path.unlink()
    with pytest.raises(RuntimeError, match=f"^the C compiler {re.escape(str(tmp_path))}/gcc-13 \\(\\$CC\\) cannot be "
                                           f"run: No such file or directory, and no library built earlier for this "
                                           f"mixlab and CPU in {re.escape(str(tmp_path))}$"):
        native.build()


@needs_cc
@pytest.mark.parametrize("with_compiler", [True, False])
def test_a_library_in_a_read_only_cache_is_used(tmp_path, monkeypatch, with_compiler):
    """A container run with --read-only whose image built the kernels into ~/.cache/mixlab: the
    library there is loaded, not built again in the temporary directory (and, without a compiler
    in the container, not lost)."""
    home = tmp_path / "home-cache"
    monkeypatch.setenv("MIXLAB_CACHE", str(home))
    home.mkdir()
    path = native.cached_path(CC)
    assert path.parent == home
    _stub(path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and not (
        mode == os.W_OK and Path(p) == home))  # as a read-only mount answers
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert native._cache_dir().parent == tmp_path / "tmp"
    monkeypatch.setattr(native, "compile_library", lambda *a: pytest.fail("built again"))
    if not with_compiler:
        monkeypatch.setenv("CC", "")
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert native.build() == path


def test_switches_from_the_environment_take_the_usual_spellings(monkeypatch: pytest.MonkeyPatch) -> None:
    """MIXLAB_NATIVE and MIXLAB_CUDA_GRAPHS (the engine's) read the same way: 0/false/no/off are off."""
    from mixlab.ops.native import env_on

    monkeypatch.delenv("MIXLAB_CUDA_GRAPHS", raising=False)
    assert env_on("MIXLAB_CUDA_GRAPHS")
    for off in ("0", "false", "No", " OFF "):
        monkeypatch.setenv("MIXLAB_CUDA_GRAPHS", off)
        assert not env_on("MIXLAB_CUDA_GRAPHS"), off
    monkeypatch.setenv("MIXLAB_CUDA_GRAPHS", "1")
    assert env_on("MIXLAB_CUDA_GRAPHS")



def _bits_of_a_build(cc: str, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """What decode.c built by `cc` computes (in its own library, cache `$MIXLAB_CACHE`): int4 x int8
    and int8 x int8 products (100 tokens, one token) and the native decoding steps of a float32, an
    int4 (int8 activations, the default) and an int8 model with int8 activations."""
    from mixlab.cache import KVCache
    from mixlab.config import get_preset
    from mixlab.model import Transformer
    from mixlab.model.inference import prepare_for_inference
    from mixlab.ops.quant import quantize_int4, quantize_int8

    monkeypatch.setenv("CC", cc)
    lib, simd = native.load_library(native.build())
    if not simd & native.SIMD_AVX512:
        pytest.skip("no AVX-512: the kernels are not used here")
    monkeypatch.setattr(native, "_lib", lib)
    monkeypatch.setattr(native, "_simd", simd)
    g = torch.Generator().manual_seed(0)
    q, s = quantize_int4(torch.randn(40, 1120, generator=g), 32)
    x = torch.randn(100, 1120, generator=g)
    out = [native.linear(x, q, s, act8=True), native.gemv(q, x[7], s, act8=True)]
    q8, s8 = quantize_int8(torch.randn(40, 1120, generator=g))
    q8[0, :3] = -128  # |w| = 128 without VNNI: still no saturation
    out += [native.linear(x, q8, s8, act8=True), native.gemv(q8, x[7], s8, act8=True)]
    model = Transformer(get_preset("tiny-moe"))
    model.init_weights(seed=0, std=0.1)
    tokens = torch.randint(0, 256, (1, 10), generator=g)
    for quant in (None, "int4", "int8"):
        m = prepare_for_inference(copy.deepcopy(model).eval(), quant=quant,
                                  int8_activations="int8" if quant == "int8" else None)
        assert m.native_decoder is not None and m.native_decoder.act8 == (quant is not None)
        cache = KVCache(m.config, batch_size=1, max_len=10, dtype=torch.float32)
        with torch.inference_mode():
            m(tokens[:, :4], cache=cache)
            out += [m.native_decoder.step(int(tokens[0, t]), t, cache) for t in range(4, 10)]
    return out


@pytest.mark.slow  # builds decode.c twice (~15 s)
@pytest.mark.skipif(not (shutil.which("gcc") and shutil.which("clang")), reason="needs gcc and clang")
def test_gcc_and_clang_builds_compute_the_same_bits(tmp_path, monkeypatch):
    """decode.c built by GCC and by clang (`CC=clang`) gives the same bits (`_bits_of_a_build`). They
    did not: clang fused `a * b + c` into FMAs where GCC (-std=c11) rounds twice (logits 1e-4 apart,
    an int4 rounding tie moving a greedy token: now -ffp-contract=off), the horizontal sums were
    `_mm512_reduce_add_ps`, whose order is the compiler's (now `hsum`), and clang 14's library was
    refused on CPUs with AVX512-BF16 (its `__builtin_cpu_supports` lacks it)."""
    monkeypatch.setenv("MIXLAB_CACHE", str(tmp_path))
    gcc, clang = _bits_of_a_build("gcc", monkeypatch), _bits_of_a_build("clang", monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(gcc, clang, strict=True))


@needs_cc
@pytest.mark.slow  # builds decode.c once (~5-10 s)
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 SIMD flags")
def test_a_cpu_without_avx512_vnni_rounds_int4_activations_to_the_same_bits(tmp_path, monkeypatch):
    """A CPU with AVX-512 but no VNNI (Skylake-SP/X), simulated by a library built without it: int4
    models still multiply int8-rounded activations (their `int4_activations`; int8 models in
    `int8_activations="int8"`), in the same integer sums from AVX512-BW, so the same bits as with
    VNNI. Its native steps multiplied exact float32 activations instead: other logits than the same
    model's elsewhere. The library with VNNI is the
    one every other test runs (the cache's, built once: a build of its own was a second compile)."""
    with_vnni = _bits_of_a_build(CC, monkeypatch)
    monkeypatch.setenv("MIXLAB_CACHE", str(tmp_path))
    assert not native.load_library(native.build(f"{CC} -mno-avx512vnni"))[1] & native.SIMD_AVX512_VNNI
    without = _bits_of_a_build(f"{CC} -mno-avx512vnni", monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(with_vnni, without, strict=True))
