"""The benchmark harness runs end to end on a tiny preset (no timing is asserted); the bandwidth
probe reads on past a slow start."""

from __future__ import annotations

import time

import pytest
import torch

from mixlab.cli.benchmark import BenchPlan, run_bench, sustained_bandwidth
from mixlab.model import Transformer


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


def test_q4_k_m_peers_run_llama_cpps_own_file_in_both(tmp_path, monkeypatch):
    """`--peers q4_k_m`: a Q4_K_M file made by llama.cpp's quantiser, decoded by llama.cpp and by mixlab
    with every matrix int4 (as `generate --model FILE --quant int4`); no other llama.cpp file is run."""
    pytest.importorskip("llama_cpp")
    plan = BenchPlan.quick()
    plan.reps, plan.peers, plan.prefill, plan.moe_tokens, plan.decode_batch = 1, ("q4_k_m",), (), (), (1,)
    plan.layers = 1  # (--layers: the preset's first layer only, the model every peer runs)
    import mixlab.cli.benchmark as benchmark

    built = []
    monkeypatch.setattr(benchmark, "Transformer", lambda cfg: built.append(cfg) or Transformer(cfg))
    report = run_bench(plan, log=lambda s: None, workdir=tmp_path)
    assert {r.peer for r in report.rows} == {"llama.cpp-q4_k_m", "mixlab-q4_k_m"}
    assert [c.n_layers for c in built] == [1] and report.settings["preset"].startswith("tiny-moe (first 1 layers)")
    assert not any("one layer" in n for n in report.notes)  # no prefill asked: nothing to warn of
    assert "mixlab-q4_k_m ÷ this" in report.format()


def test_a_one_layer_prefill_is_reported_as_measuring_little(tmp_path):
    plan = BenchPlan.quick()
    plan.reps, plan.peers, plan.prefill, plan.moe_tokens, plan.decode_batch = 1, ("mixlab",), (8,), (), ()
    plan.layers = 1
    report = run_bench(plan, log=lambda s: None, workdir=tmp_path)
    assert [r.case for r in report.rows] == ["P=8"]
    assert any(n.startswith("one layer: the prefill's layer is also its last") for n in report.notes)


def test_a_q4_k_m_file_is_measured_by_its_matrices_bytes(tmp_path):
    """The roofline of a mixed file (Q4_K, Q6_K) counts its matrices' bytes per weight: between Q4_K's
    4.5 bits and Q6_K's 6.5625 (the embedding, router and norms left out)."""
    pytest.importorskip("llama_cpp")
    from conftest import gguf_test_model
    from mixlab.checkpoint.gguf import write_gguf
    from mixlab.cli.benchmark import _int4_of_gguf, _matrix_bytes_per_weight, llama_quantize
    from mixlab.model.inference import is_quantised
    from mixlab.ops.quant import Int4Linear

    cfg = gguf_test_model("moe").config.replace(dim=256, ffn_dim=256, head_dim=64, n_layers=1)  # K-quant rows
    small = Transformer(cfg)
    small.init_weights(std=0.1, seed=0)
    src = write_gguf(small.eval(), tmp_path / "m.gguf", quant="f32")
    path = llama_quantize(src, tmp_path / "m-q4_k_m.gguf", "Q4_K_M")
    assert 4.5 / 8 < _matrix_bytes_per_weight(path) < 6.5625 / 8
    model = _int4_of_gguf(path)
    assert is_quantised(model) and isinstance(model.output, Int4Linear)
    assert not [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_a_dense_preset_is_refused():
    with pytest.raises(ValueError, match="dense"):
        run_bench(BenchPlan(preset="tiny-dense"), log=lambda s: None)


def test_llama_cpp_peer_decodes_greedily_with_its_own_logits(tmp_path):
    """The llama.cpp peer feeds each step the argmax of the logits llama.cpp just computed (its
    greedy sampler), as a greedy decoding loop does, so its routing changes from token to token. (It
    once read `Llama.scores`, which `eval` leaves unwritten without `logits_all`: token 0 every step.)"""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np
    import torch

    from conftest import gguf_test_model
    from mixlab.checkpoint.gguf import write_gguf
    from mixlab.cli.benchmark import LlamaCppPeer

    path = write_gguf(gguf_test_model("moe"), tmp_path / "m.gguf", quant="f32")
    prompt = torch.randint(3, 32000, (1, 8), generator=torch.Generator().manual_seed(0))
    peer = LlamaCppPeer(path, "llama.cpp-f32", 2, 64, 4.0)
    peer.start_decode(prompt, 12)
    for _ in range(12):
        peer.decode()
    fed = peer.llm.input_ids[8 : peer.llm.n_tokens].tolist() + [peer.next]  # what decoding fed, then the next
    peer.close()
    ref = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    ref.eval(prompt[0].tolist() + fed[:-1])
    want = [int(np.argmax(ref.scores[i])) for i in range(7, 7 + len(fed))]
    ref.close()
    assert fed == want
    assert len(set(fed)) > 1


def test_sustained_bandwidth_reads_on_and_ignores_the_slow_start():
    """The first reads after idle time run slow: the estimate is the median of the second half of
    reads made without a break, not of the first few."""
    calls = []

    def probe():  # 5 slow reads (20 ms), then fast ones (2 ms)
        calls.append(1)
        time.sleep(0.02 if len(calls) <= 5 else 0.002)

    bw = sustained_bandwidth(probe, 10**6, seconds=0.3)
    assert len(calls) > 40  # it kept reading for the whole window
    assert 10**6 / 0.004 < bw <= 10**6 / 0.002  # the fast reads' speed (sleep overshoots a little)


@pytest.mark.parametrize(("argv", "said"), [
    (["--peers", "mixlab,llamacpp"], "unknown peer(s) 'llamacpp'"),
    (["--reps", "0"], "--reps: expected an integer >= 1, got 0"),
    (["--threads", "0"], "--threads: expected an integer >= 1, got 0"),
    (["--decode-batch", "1,0"], "--decode-batch: expected comma-separated integers >= 1, got '1,0'"),
    (["--prefill", "-3"], "--prefill: expected comma-separated integers >= 1, got '-3'"),
    (["--moe-tokens", "x"], "--moe-tokens: expected comma-separated integers >= 1, got 'x'"),
    # a flag's value: exit 2 (it exited 1, a failed run, once the plan ran)
    (["--preset", "mixtral-8x7"], "--preset: unknown preset 'mixtral-8x7' (did you mean 'mixtral-8x7b'?)"),
    (["--preset", "tiny-dense"], "--preset: preset 'tiny-dense' is dense; the benchmark needs an MoE preset: mini-moe"),
    (["--layers", "0"], "--layers: expected an integer >= 1, got 0"),
])
def test_bench_refuses_bad_arguments_before_measuring(argv, said, capsys):
    from mixlab.cli import main

    with pytest.raises(SystemExit) as e:  # argparse's error: before any model is built
        main(["bench", "--quick", *argv])
    assert e.value.code == 2
    assert said in capsys.readouterr().err


def test_more_layers_than_the_preset_has_are_refused_before_measuring(capsys):
    from mixlab.cli import main

    assert main(["bench", "--quick", "--layers", "3"]) == 2  # a flag's value (tiny-moe has 2 layers)
    assert capsys.readouterr().err == "mixlab bench: error: --layers 3: preset 'tiny-moe' has 2 layers\n"


def test_bench_progress_is_on_stderr_and_quiet_drops_it(monkeypatch, capsys):
    """`mixlab bench > report.md` got "measuring machine limits ..." and the other progress lines in the report."""
    import mixlab.cli.benchmark as benchmark
    from mixlab.cli import main

    class Report:
        def format(self) -> str:
            return "| the report |"

    def run_bench(plan, *, log):
        log("measuring machine limits ...")
        return Report()

    monkeypatch.setattr(benchmark, "run_bench", run_bench)
    assert main(["bench", "--quick"]) == 0
    assert capsys.readouterr() == ("| the report |\n", "measuring machine limits ...\n")
    assert main(["bench", "--quick", "--quiet"]) == 0
    assert capsys.readouterr() == ("| the report |\n", "")


def test_bench_threads_beyond_the_cpu_count_are_bounded_with_a_warning(monkeypatch, capsys):
    """--threads 10**20 was 'error: Overflow when unpacking long long', naming no flag (exit 1)."""
    import os

    import mixlab.cli.benchmark as benchmark
    from mixlab.cli import main

    plans = []

    class Report:
        def format(self) -> str:
            return ""

    monkeypatch.setattr(benchmark, "run_bench", lambda plan, *, log: plans.append(plan) or Report())
    assert main(["bench", "--quick", "--threads", str(10**20)]) == 0
    assert plans[0].threads == (os.cpu_count() or 1)
    assert f"mixlab bench: warning: --threads {10**20} is more than the" in capsys.readouterr().err


def test_bench_refuses_an_out_folder_before_measuring(tmp_path, capsys):
    from mixlab.cli import main

    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 1
    assert f"{tmp_path}: is a folder; give a file name" in capsys.readouterr().err


def test_bench_refuses_an_out_file_that_is_not_json_before_measuring(tmp_path, capsys):
    """`bench --out MODEL/model.safetensors` replaced a model's weights with the results: a file is replaced only
    if it is empty or holds JSON (`eval --json` too)."""
    from mixlab import atomic
    from mixlab.cli import main

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert main(["bench", "--quick", "--out", str(weights)]) == 1
    assert f"{weights}: exists and is not a JSON file" in capsys.readouterr().err
    assert weights.read_bytes().startswith(b"\x08")
    for text in ("", ' \n{"old": 1}', "[1]"):  # empty, or JSON: replaced
        (tmp_path / "r.json").write_text(text)
        assert atomic.check_json_destination(tmp_path / "r.json") == tmp_path / "r.json"


@pytest.mark.parametrize("peers", [("transformers-eager", "llama.cpp-bf16"), ("mixlab", "transformers-eager")])
def test_every_table_row_has_the_headers_cells(peers):
    """`--peers transformers` (no mixlab peer, so no ratio column) wrote a header of five cells over a
    delimiter row of four: not a Markdown table, shown as text."""
    from mixlab.cli.benchmark import Report, Row

    rows = [Row("Prefill (tokens/s, batch 1)", "P=8", p, 100.0 + i, "tokens/s", 0.01, 0.02)
            for i, p in enumerate(peers)]
    text = Report(settings={}, limits={"bandwidth": 1e10, "matmul": 1e10}, rows=rows).format()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(peers)
    assert len({line.count("|") for line in table}) == 1, table
    assert all("|  |" not in line for line in table[:2])


def test_bench_with_every_section_skipped_is_refused(monkeypatch, capsys):
    """All three sections 'none' measured the machine, built the model and its GGUF files for minutes,
    then printed a report without a table."""
    import mixlab.cli.benchmark as benchmark
    from mixlab.cli import main

    monkeypatch.setattr(benchmark, "run_bench", lambda *a, **kw: pytest.fail("it measured"))
    assert main(["bench", "--prefill", "none", "--decode-batch", "none", "--moe-tokens", "none"]) != 0
    assert "all 'none': nothing to measure" in capsys.readouterr().err


def test_help_states_the_plan_defaults():
    """--decode-batch and --moe-tokens said 'e.g. 1,4,16' of their defaults, and --reps 'default 5' under
    --quick too (2): each help names the plan's default and --quick's."""
    import argparse

    from mixlab.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub.choices["bench"]._actions}
    full, quick = BenchPlan(), BenchPlan.quick()
    for name in ("reps", "prefill", "decode_batch", "moe_tokens"):
        want = [getattr(plan, name) for plan in (full, quick)]
        shown = [str(v) if isinstance(v, int) else ",".join(map(str, v)) for v in want]
        assert f"default {shown[0]}" in helps[name] and f"--quick: {shown[1]}" in helps[name], (name, helps[name])


def test_int8_act8_peer_decodes_int8_weights_with_int8_activations(tmp_path):
    """`--peers mixlab-int8-act8`: int8 weights times int8-rounded activations (`int8_activations="int8"`),
    beside mixlab-int8's float32 activations, with a column of ratios to it."""
    plan = BenchPlan.quick()
    plan.reps, plan.peers, plan.prefill, plan.moe_tokens, plan.decode_batch = 1, ("mixlab-int8", "mixlab-int8-act8"), \
        (), (), (1,)
    report = run_bench(plan, log=lambda s: None, workdir=tmp_path)
    assert {r.peer for r in report.rows} == {"mixlab-int8", "mixlab-int8-act8"}
    assert "mixlab-int8-act8 ÷ this" in report.format()
