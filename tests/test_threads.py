"""Several Python threads generating with one prepared model (issue 11 point 4): the native decoder's
work buffers and bound cache are shared, so concurrent steps must be serialised; each thread's
output equals the same call made alone."""

from __future__ import annotations

import threading

import pytest
import torch

from mixlab.config import get_preset
from mixlab.generate import generate
from mixlab.model import Transformer
from mixlab.model.inference import prepare_for_inference


def test_four_threads_with_different_prompts_and_cache_sizes_equal_single_thread():
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny-moe"))
    model.init_weights(seed=0, std=0.1)
    model = prepare_for_inference(model.eval().requires_grad_(False))
    if getattr(model, "native_decoder", None) is None:
        pytest.skip("no native decoder on this machine (no compiler or no AVX-512): nothing shared to race on")
    g = torch.Generator().manual_seed(1)
    # Different prompt lengths and max_new_tokens give different cache capacities per thread.
    jobs = [(torch.randint(3, 256, (n,), generator=g).tolist(), m) for n, m in
            [(3, 40), (17, 25), (60, 33), (5, 50), (30, 12), (9, 45), (41, 20), (2, 30)]]
    alone = [generate(model, [p], max_new_tokens=m)[0] for p, m in jobs]
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(k: int) -> None:
        try:
            start.wait()
            for rep in range(3):
                for j in range(k, len(jobs), 4):
                    out = generate(model, [jobs[j][0]], max_new_tokens=jobs[j][1])[0]
                    if rep == 0:
                        got[j] = out
                    elif out != got[j]:
                        raise AssertionError(f"job {j} changed between repetitions")
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[0]
    assert [got[j] for j in range(len(jobs))] == alone
