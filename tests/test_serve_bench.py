"""benchmarks/serve.py's accounting: the weight-streaming limit and the ceilings the machine's
measured matmul peak puts under it (what the BENCHMARKS.md numbers for issue 14 rest on)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from mixlab.cli.benchmark import _matmul_flops_per_token
from mixlab.config import get_preset

pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).parents[1] / "benchmarks" / "serve.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("preset", ["mini-moe", "tiny-moe"])
def test_load_flops_counts_each_position_once_and_each_sampled_token_output(bench: Any, preset: str) -> None:
    """One prompt token, one generated token: one position through the layers, one row of logits:
    `mixlab bench`'s FLOPs per token. A request of P prompt and G generated tokens runs P + G - 1
    positions (the last token is never fed back), each attending to every earlier key, and G rows
    of logits."""
    cfg = get_preset(preset)
    dense, experts = bench.load_flops(cfg, [(1, 1)])
    assert dense + experts == _matmul_flops_per_token(cfg, 1)
    out = 2 * cfg.vocab_size * cfg.dim
    P, G = 5, 3
    want = sum(_matmul_flops_per_token(cfg, c) for c in range(1, P + G)) - (P + G - 1 - G) * out
    assert sum(bench.load_flops(cfg, [(P, G)])) == want
    assert sum(bench.load_flops(cfg, [(P, G), (1, 1)])) == want + dense + experts


def test_ceilings_against_the_limit(bench: Any) -> None:
    """The limit's streaming time is the tokens over `step_limit`; with unbounded FLOPs the machine
    allows all of it; when the FLOPs take longer than the streaming, no server gets above their
    ratio, and running the dense products and the experts one after the other allows no more."""
    cfg = get_preset("mini-moe")
    load = [(bench.PROMPT_LENS[(c + r) % 5], 48) for c in range(16) for r in range(2)]
    run = {"clients": 16, "tokens": 48 * 32, "load": load}
    bw = 50e9
    c = bench.ceilings(cfg, run, bw, 1e18)
    assert c["stream_s"] == pytest.approx(run["tokens"] / bench.step_limit(cfg, bw, 16), rel=1e-12)
    assert c["any"] == 1.0 and c["serial"] == pytest.approx(1.0, rel=1e-9)
    slow = bench.ceilings(cfg, run, bw, c["flops"] / (2 * c["stream_s"]))  # FLOPs take twice the streaming
    assert slow["any"] == pytest.approx(0.5, rel=1e-9)
    assert slow["serial"] <= slow["any"]
    # this machine's class (65 GB/s, 410 GFLOP/s bf16): the FLOPs alone cap any server near 83%
    assert 0.8 < bench.ceilings(cfg, run, 65e9, 410e9)["any"] < 0.86


def test_breakdown_splits_a_run_and_rates_it_against_its_own_full_step(bench: Any) -> None:
    """A run of 2 clients: one prompt step (0.5 s), decoding-only steps of 2 (0.1, 0.3, 0.2 s) and
    of 1 (0.05 s), 0.15 s between them: 10 tokens in 1.3 s against its median 2-sequence step
    (0.2 s, i.e. 10 tok/s) is 77%; without a 2-sequence step there is nothing to rate against."""
    cfg = get_preset("mini-moe")
    steps = [(0.5, 30, 28), (0.1, 2, 0), (0.3, 2, 0), (0.2, 2, 0), (0.05, 1, 0)]
    run = {"bandwidth": 50e9, "steps": steps, "clients": 2, "tokens": 10, "wall_s": 1.3}
    b = bench.breakdown(cfg, run)
    assert b["prompt_s"] == pytest.approx(0.5) and b["decode_s"] == pytest.approx(0.65)
    assert b["gaps_s"] == pytest.approx(0.15)
    assert b["full_step_s"] == pytest.approx(0.2) and b["own"] == pytest.approx(10 / 1.3 / 10)
    lone = bench.breakdown(cfg, {**run, "steps": [(0.5, 30, 28), (0.05, 1, 0)]})
    assert lone["own"] != lone["own"]  # NaN
