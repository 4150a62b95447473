"""The benchmark harness runs end to end on a tiny preset (no timing is asserted)."""

from __future__ import annotations

import pytest

from mixlab.cli.benchmark import BenchPlan, run_bench


def test_bench_runs_end_to_end_on_a_tiny_preset(tmp_path):
    pytest.importorskip("transformers")
    plan = BenchPlan.quick()
    plan.reps = 1
    report = run_bench(plan, log=lambda s: None, workdir=tmp_path)
    text = report.format()
    peers = {r.peer for r in report.rows}
    assert {"mixlab", "mixlab-packed", "mixlab-int8", "transformers-eager", "transformers-grouped_mm"} <= peers
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert any("llama" in n for n in report.notes)
    else:
        assert {"llama.cpp-bf16", "llama.cpp-q8_0"} <= peers
    assert all(r.value > 0 and r.median_s > 0 and r.limit_s > 0 for r in report.rows)
    for section in ("Prefill", "Decode", "MoE layer alone"):
        assert f"## {section}" in text
    assert "B=2 | mixlab" in text and "T=16 | transformers-eager" in text
    assert list(tmp_path.iterdir()) == []  # temporary checkpoints are removed


def test_a_dense_preset_is_refused():
    with pytest.raises(ValueError, match="dense"):
        run_bench(BenchPlan(preset="tiny-dense"), log=lambda s: None)
