"""mixlab with only its core dependencies (pyproject's `dependencies`): what needs an optional extra
says which, in one line, instead of a traceback. A package is made absent by `sys.modules[name] =
None` (importing it then raises ImportError)."""

from __future__ import annotations

import sys

from mixlab.checkpoint import save_model
from mixlab.cli import main
from mixlab.config import get_preset
from mixlab.model import Transformer


def test_convert_to_gguf_without_the_gguf_package_names_the_extra(tmp_path, monkeypatch, capsys):
    model = Transformer(get_preset("tiny-moe"))
    model.init_weights(seed=0)
    save_model(model, tmp_path / "hf")
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf")]) == 2  # a traceback from write_gguf
    assert capsys.readouterr().err == ("mixlab convert: error: writing GGUF files needs the gguf package: "
                                       "pip install 'mixlab[gguf]'\n")
    assert not (tmp_path / "m.gguf").exists()
