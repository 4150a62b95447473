"""The engine's CUDA-graph decode step (`mixlab.engine.cuda_graphs`), run eagerly on the CPU: the
same tokens and experts as the runner's ordinary batched step, across bucket sizes (padded rows)
and a sliding window; recorded and replayed where CUDA exists."""

from __future__ import annotations

import pytest
import torch

from mixlab.config import get_preset
from mixlab.engine import Engine, SamplingParams
from mixlab.engine.cuda_graphs import GraphedDecode, buckets
from mixlab.model import Transformer


def _model(device: str = "cpu", **kw) -> Transformer:
    cfg = get_preset("tiny-moe").replace(vocab_size=128, max_seq_len=128, **kw)
    model = Transformer(cfg).eval()
    model.init_weights(std=0.5, seed=0)
    return model.to(device)


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


PARAMS = [SamplingParams(max_tokens=14, ignore_eos=True, return_experts=True),
          SamplingParams(max_tokens=10, temperature=0.9, seed=3, ignore_eos=True),
          SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2),
          SamplingParams(max_tokens=9, temperature=0.7, min_p=0.1, seed=11, ignore_eos=True)]


def _run(engine: Engine, prompts):
    handles = []
    for p, params in zip(prompts, PARAMS, strict=False):
        handles.append(engine.submit(p, params))
        engine.step()
    engine.run_until_idle()
    return [[(o.token_id, o.experts, o.top_logprobs) for o in h if o.token_id is not None] for h in handles]


def _same(got, want):
    """Tokens and experts exactly; logprobs to float32 rounding (the eager graph step attends with
    SDPA over the whole slot, the runner's step with its own decoding attention or the native kernel)."""
    assert [[(t, e) for t, e, _ in r] for r in got] == [[(t, e) for t, e, _ in r] for r in want]
    for r, w in zip(got, want, strict=True):
        for (_, _, a), (_, _, b) in zip(r, w, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert [t for t, _ in a] == [t for t, _ in b]
                assert [lp for _, lp in a] == pytest.approx([lp for _, lp in b], abs=1e-4)


def test_buckets_cover_every_batch():
    assert buckets(1) == [1] and buckets(6) == [1, 2, 4, 6] and buckets(8) == [1, 2, 4, 8]


@pytest.mark.parametrize("window", [None, 5])
def test_graphed_decode_equals_the_batched_step(window):
    model = _model(sliding_window=window)
    prompts = _prompts((5, 11, 3, 8))
    want = _run(Engine(model, max_batch=6, token_budget=8), prompts)
    engine = Engine(model, max_batch=6, token_budget=8)
    calls = []
    graphed = GraphedDecode(engine.runner, capture=False)
    real = graphed.decode
    graphed.decode = lambda items: calls.append(len(items)) or real(items)  # type: ignore[method-assign]
    engine.runner.graphed = graphed
    _same(_run(engine, prompts), want)
    assert {1, 3, 4} & set(calls), "decode-only steps of several sizes (padded buckets) must have run"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_recorded_graphs_equal_eager_on_cuda():
    model = _model("cuda")
    prompts = _prompts((5, 11, 3, 8))
    eager = Engine(model, max_batch=6, token_budget=8)
    eager.runner.graphed = None
    graphed = Engine(model, max_batch=6, token_budget=8)
    assert graphed.runner.graphed is not None and graphed.runner.graphed.capture
    tokens = [[[t for t, _, _ in r] for r in _run(e, prompts)] for e in (graphed, eager)]
    assert tokens[0] == tokens[1]
