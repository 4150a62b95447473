"""The static-cache decoder that CUDA graphs capture, run eagerly on the CPU: its logits equal a full
recompute at every step, its tokens equal `mixlab.generate`, across a sliding window; the capture
itself runs where CUDA exists."""

from __future__ import annotations

import pytest
import torch

from mixlab.config import ModelConfig, MoEConfig
from mixlab.generate import generate
from mixlab.graphs import StaticDecoder
from mixlab.model import Transformer


def _model(window: int | None = None, *, moe: bool = True, device: str = "cpu") -> Transformer:
    base = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                       max_seq_len=128, sliding_window=window,
                       moe=MoEConfig(num_experts=4, top_k=2) if moe else None)
    m = Transformer(base)
    m.init_weights(std=0.1, seed=3)
    return m.eval().to(device)


def _prompts(lengths, seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("moe", [True, False])
def test_logits_equal_full_recompute_each_step(window, moe):
    model = _model(window, moe=moe)
    prompts = _prompts((5, 9, 3))
    dec = StaticDecoder(model, batch_size=4, max_len=40, prefill_chunk=4, graph=False)
    seqs = [list(p) for p in prompts]
    last = torch.stack([dec.prefill(r, p) for r, p in enumerate(prompts)])
    for _ in range(12):
        with torch.no_grad():
            want = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])
        torch.testing.assert_close(last[:3], want, rtol=1e-5, atol=1e-5)
        nxt = want.argmax(-1)
        for s, t in zip(seqs, nxt.tolist(), strict=True):
            s.append(t)
        tokens = torch.zeros(4, dtype=torch.long)
        tokens[:3] = nxt
        last = dec.step(tokens)


def test_generate_equals_mixlab_generate():
    model = _model(8)
    prompts = _prompts((4, 11, 7, 2), seed=1)
    dec = StaticDecoder(model, batch_size=4, max_len=64, prefill_chunk=5, graph=False)
    assert dec.generate(prompts, 20) == generate(model, prompts, max_new_tokens=20)


def test_bad_arguments_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="context length"):
        StaticDecoder(model, batch_size=1, max_len=10_000)
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(model, batch_size=1, max_len=16, graph=True)
    for kw in ({"batch_size": 0}, {"max_len": -3}, {"prefill_chunk": 0}, {"batch_size": 1.5}):  # torch's errors
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be an integer >= 1"):
            StaticDecoder(model, **{"batch_size": 1, "max_len": 16, **kw})  # type: ignore[arg-type]
    dec = StaticDecoder(model, batch_size=1, max_len=16, graph=False)
    with pytest.raises(ValueError, match="batch size 1"):
        dec.generate([[1], [2]], 2)
    with pytest.raises(ValueError, match="non-empty list"):  # torch.stack's 'expects a non-empty TensorList'
        dec.generate([], 2)
    with pytest.raises(ValueError, match="max_len=16"):
        dec.generate([[1] * 10], 10)
    for bad in (model.config.vocab_size, -1):  # an IndexError on CPU, a device-side assert on CUDA
        with pytest.raises(ValueError, match=f"token id {bad} outside"):
            dec.generate([[1, bad]], 2)
    for prompts in ([[1, 2.5]], ["ab"]):  # 2.5 was token 2, without a word; "ab" a TypeError from a comparison
        with pytest.raises(ValueError, match="a prompt is a list of integer token ids"):
            dec.generate(prompts, 2)
    for n in (0, -1, 2.0):  # -1 and 0 returned [[]]
        with pytest.raises(ValueError, match=f"max_new_tokens={n}"):
            dec.generate([[1]], n)  # type: ignore[arg-type]


def test_steps_past_max_len_and_rows_past_the_batch_are_refused():
    """docs/gpu.md's `prefill(row, ids) + step(tokens_B)`: a step past max_len wrapped the row round
    its slots, so attention silently lost the first tokens (logits off by ~0.1), and a row past the
    batch size was a reshape error from inside the forward pass."""
    model = _model()
    dec = StaticDecoder(model, batch_size=2, max_len=8, graph=False)
    seq = [5, 6, 7, 8, 9, 10]
    dec.prefill(0, seq)
    for t in (11, 12):
        last = dec.step(torch.tensor([t, 0]))[0]
        seq.append(t)
    with torch.no_grad():
        torch.testing.assert_close(last, model(torch.tensor([seq]))[0, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sequence 0 holds max_len=8 tokens"):
        dec.step(torch.tensor([13, 0]))
    dec.prefill(0, [5])  # the row starts over; row 1 (never prefilled) is not in use and not counted
    dec.step(torch.tensor([6, 0]))
    with pytest.raises(ValueError, match=r"row must be an integer in \[0, 2\)"):
        dec.prefill(2, [1, 2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_equals_eager():
    pytest.importorskip("triton")
    model = _model(None, device="cuda")
    prompts = _prompts((5, 9, 3))
    eager = StaticDecoder(model, batch_size=4, max_len=48, graph=False).generate(prompts, 16)
    graphed = StaticDecoder(model, batch_size=4, max_len=48, graph=True).generate(prompts, 16)
    assert graphed == eager
