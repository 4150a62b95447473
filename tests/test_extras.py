"""mixlab with only its core dependencies (pyproject's `dependencies`): what needs an optional extra
says which, in one line, instead of a traceback. A package is made absent by `sys.modules[name] =
None` (importing it then raises ImportError)."""

from __future__ import annotations

import dataclasses
import importlib
import runpy
import subprocess
import sys

import pytest

from mixlab.checkpoint import save_model
from mixlab.cli import main
from mixlab.config import get_preset
from mixlab.model import Transformer
from mixlab.train.plot import plot_loss_curve


def test_convert_to_gguf_without_the_gguf_package_names_the_extra(tmp_path, monkeypatch, capsys):
    model = Transformer(get_preset("tiny-moe"))
    model.init_weights(seed=0)
    save_model(model, tmp_path / "hf")
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf")]) == 1  # a traceback from write_gguf
    assert capsys.readouterr().err == ("mixlab convert: error: writing GGUF files needs the gguf package: "
                                       "pip install 'mixlab[gguf]'\n")
    assert not (tmp_path / "m.gguf").exists()


def test_the_harness_without_lm_eval_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, "mixlab.eval.harness", raising=False)
    with pytest.raises(ImportError, match=r"^mixlab.eval.harness needs lm-eval: pip install 'mixlab\[eval\]'"):
        importlib.import_module("mixlab.eval.harness")
    with pytest.raises(SystemExit, match=r"^python -m mixlab.eval.harness needs lm-eval: pip install 'mixlab\[eval\]'"):
        runpy.run_module("mixlab.eval.harness", run_name="__main__")  # python -m: it was a traceback


def test_serve_without_fastapi_names_the_extra_once(tmp_path, monkeypatch, capsys):
    """The message said `mixlab serve: error: mixlab serve needs ...`: the command named twice."""
    model = Transformer(get_preset("tiny-moe"))
    model.init_weights(seed=0)
    save_model(model, tmp_path / "hf")
    monkeypatch.setitem(sys.modules, "fastapi", None)
    for name in [m for m in sys.modules if m == "mixlab.serve" or m.startswith("mixlab.serve.")]:
        monkeypatch.delitem(sys.modules, name)
    assert main(["serve", "--model", str(tmp_path / "hf"), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mixlab serve: error: serving needs the serve extra: pip install 'mixlab[serve]' (")
    assert err.count("mixlab serve") == 1 and err.count("\n") == 1


def test_the_loss_curve_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"^plotting needs matplotlib: pip install 'mixlab\[plot\]'"):
        plot_loss_curve(tmp_path, tmp_path / "loss.png")
    monkeypatch.setattr(sys, "argv", ["plot", str(tmp_path), str(tmp_path / "loss.png")])
    monkeypatch.delitem(sys.modules, "mixlab.train.plot")
    with pytest.raises(SystemExit, match=r"^python -m mixlab.train.plot: error: plotting needs matplotlib: "
                                         r"pip install 'mixlab\[plot\]'"):
        runpy.run_module("mixlab.train.plot", run_name="__main__")
    assert not (tmp_path / "loss.png").exists()


def test_the_loss_curve_plot_s_help_goes_to_stdout(monkeypatch, capsys):
    # --help printed the usage to stderr and exited 1, as an error
    monkeypatch.setattr(sys, "argv", ["plot", "--help"])
    monkeypatch.delitem(sys.modules, "mixlab.train.plot", raising=False)
    with pytest.raises(SystemExit) as e:
        runpy.run_module("mixlab.train.plot", run_name="__main__")
    out, err = capsys.readouterr()
    assert e.value.code == 0 and "RUN_DIR" in out and "OUT.png" in out and err == ""



def test_the_loss_curve_plot_takes_a_home_folder_path(tmp_path, monkeypatch):
    """'~/run' (quoted, or after `=`: no shell expands it) was read as a folder named '~'."""
    pytest.importorskip("matplotlib")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["plot", "~/run", "~/loss.png"])
    monkeypatch.delitem(sys.modules, "mixlab.train.plot", raising=False)
    runpy.run_module("mixlab.train.plot", run_name="__main__")
    assert (tmp_path / "loss.png").is_file()


# Installed here for tests and peers, absent from a core install (pyproject's extras, and what they bring).
OPTIONAL = ("gguf", "matplotlib", "lm_eval", "accelerate", "llama_cpp", "fastapi", "uvicorn", "starlette",
            "prometheus_client", "triton", "transformers", "tokenizers", "peft", "trl", "psutil", "httpx", "openai")
EXTRA_PACKAGES = ("mixlab.serve", "mixlab.eval.harness")  # the extras' own modules


@pytest.mark.slow  # a fresh interpreter importing every module (~5 s)
def test_analyze_without_matplotlib_says_on_the_terminal_that_the_report_has_no_figures(tmp_path, monkeypatch,
                                                                                       capsys):
    """Only the report page said 'No figures: install matplotlib': the terminal showed a report
    written as with them, where `mixlab demo` says '(no plots: pip install 'mixlab[plot]' ...)'."""
    model = Transformer(dataclasses.replace(get_preset("tiny-moe"), vocab_size=259))  # the bytes tokenizer's
    model.init_weights(seed=0)
    save_model(model, tmp_path / "hf")
    (tmp_path / "data.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8)
    argv = ["analyze", "--model", str(tmp_path / "hf"), "--data", str(tmp_path / "data.txt"), "--tokenizer", "bytes",
            "--seq-len", "32", "--quiet"]
    with monkeypatch.context() as m:  # then matplotlib as it was (absent, or imported whole)
        m.setitem(sys.modules, "matplotlib", None)
        assert main([*argv, "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().err == ("mixlab analyze: note: the report has no figures: pip install 'mixlab[plot]' "
                                       "(matplotlib) draws them\n")
    assert not list((tmp_path / "r").glob("*.png"))
    if importlib.util.find_spec("matplotlib") is not None:  # with it: figures, and no note
        assert main([*argv, "--out", str(tmp_path / "r2")]) == 0
        assert "note" not in capsys.readouterr().err and list((tmp_path / "r2").glob("*.png"))


def test_bench_names_the_extra_of_the_peers_it_skips(monkeypatch):
    """`mixlab bench` on a core install skipped transformers and llama.cpp with 'is not installed:
    skipped', and no word of the `peers` extra that installs both."""
    from mixlab.cli.benchmark import BenchPlan, run_bench

    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    plan = BenchPlan.quick()
    plan.reps, plan.peers = 1, ("transformers", "llama.cpp")
    plan.prefill, plan.decode_batch, plan.moe_tokens = (), (), (1,)  # the least that runs
    text = run_bench(plan, log=lambda _: None).format()
    extra = "(pip install 'mixlab[peers]')"
    assert f"- note: transformers is not installed: skipped {extra}\n" in text
    assert f"- note: llama-cpp-python (or gguf) is not installed: llama.cpp skipped {extra}\n" in text


def test_the_core_install_imports_every_module_and_runs_the_cli():
    """With every optional package absent, each module outside the extras' own imports (nothing at
    a module's top imports an optional package) and `mixlab --help` / `mixlab info` work."""
    code = f"""
import contextlib, io, pkgutil, sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None
import mixlab
from mixlab.cli import main
bad = []
for m in pkgutil.walk_packages(mixlab.__path__, "mixlab."):
    if not m.name.startswith({EXTRA_PACKAGES!r}) and not m.name.endswith("__main__"):
        try:
            __import__(m.name)
        except ImportError as e:
            bad.append(f"{{m.name}}: {{e}}")
assert not bad, bad
with contextlib.redirect_stdout(io.StringIO()) as out:
    assert main(["info", "tiny-moe"]) == 0
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
assert "total parameters:" in out.getvalue() and "build-kernels" in out.getvalue()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]



def test_the_loss_curve_plot_shows_a_fine_tuning_runs_held_out_loss(tmp_path, monkeypatch):
    """`mixlab sft` / `dpo` log `eval_loss` without train's per-domain `eval`: their held-out loss
    was left out of the figure (only the training batches were drawn)."""
    pytest.importorskip("matplotlib")
    import json

    from matplotlib.figure import Figure

    recs = [{"step": 0, "eval_loss": 2.5}, {"step": 4, "loss": 2.4}, {"step": 4, "eval_loss": 2.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    drawn, real = {}, Figure.savefig

    def savefig(self, *a, **k):
        drawn.update((ln.get_label(), list(ln.get_ydata())) for ln in self.axes[0].get_lines())
        real(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", savefig)
    plot_loss_curve(tmp_path, tmp_path / "loss.png")
    assert drawn == {"train (batch)": [2.4], "valid": [2.5, 2.2]}
