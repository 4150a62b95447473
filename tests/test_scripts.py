"""Installing mixlab: scripts/setup.sh, run against a stand-in `.venv/bin/python` that records what
it is asked and fails where a test says (a real setup installs torch and takes minutes); pyproject's
extras and package data; the version."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mixlab.cli import main

ROOT = Path(__file__).resolve().parents[1]

# A stand-in interpreter: logs its arguments; `pip install` exits with $PIP_STATUS after an error line.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../calls"
if [ "$1 $2 $3" = "-m pip install" ]; then
    echo "WARNING: Location 'file:///x' is ignored"
    [ "${PIP_STATUS:-0}" = 0 ] || { echo "ERROR: Could not build wheels for llama-cpp-python"; exit "$PIP_STATUS"; }
fi
exit 0
"""


def _setup(tmp_path: Path, *args: str, pip_status: int = 0) -> subprocess.CompletedProcess[str]:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    python = tmp_path / ".venv" / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh"), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PIP_STATUS": str(pip_status)}, timeout=60)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_setup_fails_when_pip_fails(tmp_path):
    """pip failing to install an extra (llama-cpp-python without a compiler, no network) stops setup
    with an error; it went on and ended with 0, since `grep || true` ate pip's status, and test.sh
    then ran without the packages."""
    proc = _setup(tmp_path, "dev,peers", pip_status=1)
    assert proc.returncode == 1
    assert "ERROR: Could not build wheels" in proc.stdout and "WARNING: Location" not in proc.stdout
    assert proc.stderr == "setup failed: pip could not install .[dev,peers] (its message is above)\n"
    assert "import mixlab" not in (tmp_path / ".venv" / "calls").read_text()


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_setup_installs_the_extras_asked_for(tmp_path):
    proc = _setup(tmp_path, "plot")
    assert proc.returncode == 0 and proc.stdout == proc.stderr == ""
    calls = (tmp_path / ".venv" / "calls").read_text().splitlines()
    assert calls == ["-c import torch", "-m pip install -q -e .[plot]", "-c import mixlab"]


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_the_extras_ask_for_nothing_without_wheels_off_linux(platform):
    """Triton publishes Linux wheels only: `pip install -e '.[dev]'` (scripts/test.sh) and `.[gpu]`
    failed on macOS and Windows ('No matching distribution found for triton')."""
    tomllib = pytest.importorskip("tomllib")
    requirements = pytest.importorskip("packaging.requirements")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    env = {"sys_platform": platform, "platform_system": {"darwin": "Darwin", "win32": "Windows"}[platform]}
    for extra in ("dev", "gpu"):
        wanted = [requirements.Requirement(r) for r in extras[extra]]
        names = {r.name for r in wanted if r.marker is None or r.marker.evaluate(env)}
        assert "triton" not in names, extra
    linux = [requirements.Requirement(r) for r in extras["gpu"]]
    assert [r.name for r in linux if r.marker is None or r.marker.evaluate({"sys_platform": "linux"})] == ["triton"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("python", ["python3", "python9"])
def test_setup_needs_python_3_11(tmp_path, python):
    """An older python3 (or none) is refused before a .venv is made; pip failed later on with
    'requires a different Python' and left a .venv of that Python, which every rerun reused."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts")
    (tmp_path / "bin").mkdir()
    old = tmp_path / "bin" / "python3"
    old.write_text("#!/usr/bin/env bash\n[ \"$1\" = -V ] && { echo 'Python 3.10.12'; exit 0; }\nexit 1\n")
    old.chmod(0o755)
    proc = subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh")], capture_output=True, text=True,
                          env={"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "PYTHON": python}, timeout=60)
    found = "Python 3.10.12" if python == "python3" else "not found"
    assert proc.returncode == 1 and not (tmp_path / ".venv").exists()
    assert proc.stderr.endswith(f"setup failed: mixlab needs Python 3.11 or newer; {python}: {found} "
                                f"(PYTHON=python3.11 bash {tmp_path / 'scripts' / 'setup.sh'})\n")


def test_every_data_file_of_the_package_ships_in_the_wheel():
    """Each file under src/mixlab that is not Python (the C sources, the chat page, py.typed) is
    matched by pyproject's package-data, so a wheel install has it; py.typed was missing, so type
    checkers ignored an installed mixlab's annotations ('missing library stubs or py.typed')."""
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    src = ROOT / "src"
    files = [p for p in (src / "mixlab").rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc", ".so")
             and "__pycache__" not in p.parts]
    assert src / "mixlab" / "py.typed" in files
    globs = [(src.joinpath(*package.split(".")), glob) for package, globs in data.items() for glob in globs]
    for path in files:
        assert any(path.is_relative_to(root) and path.relative_to(root).match(glob) for root, glob in globs), (
            f"{path.relative_to(ROOT)} is not package data")


def test_mixlab_version(capsys):
    """`mixlab --version`, what a bug report asks for first (it was 'unrecognized arguments')."""
    import mixlab

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"mixlab {mixlab.__version__}\n"
