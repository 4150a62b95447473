"""mixlab with only its core dependencies (pyproject's `dependencies`): what needs an optional extra
says which, in one line, instead of a traceback. A package is made absent by `sys.modules[name] =
None` (importing it then raises ImportError)."""

from __future__ import annotations

import importlib
import runpy
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
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf")]) == 2  # a traceback from write_gguf
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
