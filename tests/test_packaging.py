"""What `pip install mixlab` gets: the wheel and the sdist built from this tree (setuptools'
build_meta, as pip and `python -m build` call it, on a copy: ~2 s) hold the package with the files it
reads at run time (the native kernels' C sources, the chat page, py.typed), the licence and the
version, and nothing of the repository's own (tests, benchmarks, caches)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import mixlab

pytest.importorskip("setuptools")

ROOT = Path(__file__).resolve().parents[1]
# what setuptools reads (pyproject.toml, MANIFEST.in, the readme, the licence, src/), and what must
# stay out of the archives: tests/ and benchmarks/ (copied, so that a rule that let them in would show)
COPIED = ("pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "src", "tests", "benchmarks")
# (an sdist's src/mixlab.egg-info/ is setuptools' own: it reads it back when building from the sdist)
JUNK = re.compile(r"(^|/)(tests|benchmarks|__pycache__|\.venv|build)/|\.py[cod]$|\.so$")


def _build(tmp_path: Path) -> tuple[list[str], list[str], str]:
    """(the wheel's names, the sdist's names without its top folder, the wheel's METADATA)."""
    tree = tmp_path / "tree"
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so"))
        elif src.exists():
            tree.mkdir(exist_ok=True)
            shutil.copy2(src, tree / name)
    (tree / "tests" / "__pycache__").mkdir()  # a cache the build must leave out
    (tree / "tests" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"")
    dist = tmp_path / "dist"
    for hook in ("build_sdist", "build_wheel"):  # a process each, as pip and `python -m build` call them
        code = f"import sys; from setuptools import build_meta; build_meta.{hook}(sys.argv[1])"
        proc = subprocess.run([sys.executable, "-c", code, str(dist)], cwd=tree, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel_path,), (sdist_path,) = dist.glob("*.whl"), dist.glob("*.tar.gz")
    with zipfile.ZipFile(wheel_path) as z:
        wheel = z.namelist()
        metadata = z.read(f"mixlab-{mixlab.__version__}.dist-info/METADATA").decode()
    with tarfile.open(sdist_path) as t:
        sdist = [n.partition("/")[2] for n in t.getnames() if t.getmember(n).isfile()]
    return wheel, sdist, metadata


def test_the_wheel_and_sdist_hold_the_package_and_nothing_of_the_repository(tmp_path):
    wheel, sdist, metadata = _build(tmp_path)
    modules = sorted(str(p.relative_to(ROOT / "src")) for p in (ROOT / "src" / "mixlab").rglob("*.py"))
    data = ["mixlab/py.typed", "mixlab/ops/native/decode.c", "mixlab/ops/native/mixlab.h",
            "mixlab/serve/static/index.html", "mixlab/serve/static/chat.js", "mixlab/serve/static/chat.css"]
    assert set(modules + data) <= set(wheel), sorted(set(modules + data) - set(wheel))
    assert {f"src/{n}" for n in modules + data} | {"LICENSE", "README.md", "pyproject.toml"} <= set(sdist)
    assert f"mixlab-{mixlab.__version__}.dist-info/licenses/LICENSE" in wheel
    assert re.search(rf"^Version: {re.escape(mixlab.__version__)}$", metadata, re.M)
    assert "License-Expression: Apache-2.0" in metadata
    # the sdist held tests/test_*.py (setuptools' default) without the conftest.py and helpers they import
    assert [n for n in wheel if JUNK.search(n)] == []
    assert [n for n in sdist if JUNK.search(n)] == []
