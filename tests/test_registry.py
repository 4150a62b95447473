"""The kernel registry (`mixlab.ops.registry`): what it chooses, and that nothing but inference
preparation (or an explicit build) ever starts a C compiler."""

from __future__ import annotations

import subprocess

import pytest
import torch

from mixlab.checkpoint import load_model, save_model
from mixlab.config import get_preset
from mixlab.generate import generate
from mixlab.model import Transformer
from mixlab.model.inference import prepare_for_inference
from mixlab.ops import native, registry


def test_a_forward_on_an_unprepared_model_never_starts_a_compiler(monkeypatch, tmp_path):
    """Load a saved model and run forward passes (few tokens without grad, as decoding would; a
    training forward) with the native kernels not loaded: no subprocess may start and nothing may
    be built or loaded."""
    model = Transformer(get_preset("tiny-moe"))
    model.init_weights(seed=0)
    save_model(model, tmp_path / "m")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a forward pass started a process or a build: {args!r}")

    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    for name in ("build", "compile_library", "load_library", "load"):
        monkeypatch.setattr(native, name, refuse)

    loaded = load_model(tmp_path / "m")
    tokens = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        loaded(tokens)
        loaded(tokens[:, :1])
    loaded(tokens).float().sum().backward()
    assert native.library() is None


def test_generate_loads_the_kernels_without_a_preparation_call(monkeypatch, tmp_path):
    """`load_model` + `generate` gets the native path (issue 13, "fast by default"): the engine under
    `generate` loads the kernels (an inference entry point, as `prepare_for_inference` is), and its
    lone-token steps then run the native decoder over the unprepared model's own weights."""
    model = Transformer(get_preset("tiny-moe"))
    model.init_weights(seed=0)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", None)
    calls: list[int] = []
    real_load = native.load

    def counting_load():  # type: ignore[no-untyped-def]
        calls.append(1)
        return real_load()

    monkeypatch.setattr(native, "load", counting_load)
    prompt = torch.randint(3, 256, (5,)).tolist()
    out = generate(loaded, [prompt], max_new_tokens=4)
    assert calls, "generate never asked for the native kernels"
    if native.library() is None or not native.fast(torch.float32):
        pytest.skip("native kernels unavailable here (no C compiler, MIXLAB_NATIVE=0 or no AVX-512)")
    from mixlab.model import native as native_decoding

    dec = native_decoding.shared_decoder(loaded)
    assert dec is not None and loaded.native_decoder is None  # the model itself was not prepared
    steps: list[int] = []
    real_run = dec._run
    monkeypatch.setattr(dec, "_run", lambda *a, **k: steps.append(1) or real_run(*a, **k))
    assert generate(loaded, [prompt], max_new_tokens=4) == out
    assert len(steps) == 3  # the 3 tokens after the prefill's, one native call each
    # preparing the model in place drops that decoder (it would keep the unconverted weights alive)
    prepare_for_inference(loaded, quant="int8")
    assert native_decoding._SHARED.get(loaded) is None
    assert loaded.native_decoder is not None  # the engine uses the model's own from now on


def test_choices():
    c = registry.choose
    kw = dict(device="cpu", fmt="plain", dtype=torch.float32, training=False)
    loaded = native.fast(torch.float32)
    # the native kernels only when loaded, for inference, on CPU, for few tokens
    assert c("linear", tokens=4, **kw) == ("native" if loaded else "torch")
    assert c("linear", tokens=registry.NATIVE_MAX_ROWS + 1, **kw) == "torch"
    assert c("linear", tokens=4, **{**kw, "training": True}) == "torch"
    assert c("linear", tokens=4, **{**kw, "device": "cuda"}) == "torch"
    assert c("linear", tokens=4, **{**kw, "fmt": "packed"}) == "packed"
    assert c("linear", tokens=4, **{**kw, "fmt": "strided"}) == "torch"
    int8 = {**kw, "fmt": "int8", "dtype": torch.int8, "act_dtype": torch.bfloat16}
    assert c("linear", tokens=registry.INT8_A16_MAX_ROWS + 1, **int8) == "int8"
    # int8 x exact bf16 activations: native (as bf16, panels) up to INT8_A16_MAX_ROWS rows where AVX512-BF16 is
    a16 = "native" if native.fast(torch.int8) and native.fast(torch.bfloat16) else "int8"
    assert c("linear", tokens=registry.INT8_A16_MAX_ROWS, **int8) == a16
    assert c("linear", tokens=registry.INT8_A16_MAX_ROWS, **{**int8, "act_dtype": torch.float32}) == "int8"
    assert c("linear", tokens=registry.INT8_A16_MAX_ROWS, **{**int8, "training": True}) == "int8"
    # int4 x int8 activations: the native kernel for any number of rows (panels for many)
    int4 = {**kw, "fmt": "int4", "dtype": torch.uint8, "act_dtype": torch.bfloat16}
    big = 512
    native4 = native.fast(torch.uint8)
    assert c("linear", tokens=big, act8=True, **int4) == ("native" if native4 else "int4")
    assert c("linear", tokens=big, **int4) == "int4"  # float activations: no many-row kernel
    assert c("linear", tokens=big, act8=True, **{**int4, "training": True}) == "int4"
    assert c("linear", tokens=big, act8=True, **{**int4, "device": "cuda"}) == "int4"
    # int8 x int8 activations: native for many rows against float32 activations, not bf16 ones
    assert c("linear", tokens=big, act8=True, **{**int8, "act_dtype": torch.float32}) == (
        "native" if native.fast(torch.int8) else "int8")
    assert c("linear", tokens=big, act8=True, **int8) == "int8"
    assert c("linear", tokens=big, **{**int8, "act_dtype": torch.float32}) == "int8"
    assert c("moe", tokens=3, **{**kw, "training": True}) == "sorted"
    assert c("moe", tokens=1, **{**kw, "fmt": "packed"}) == "decode"
    assert c("moe", tokens=registry.NATIVE_MAX_TOKENS + 1, **kw) == "sorted"
    assert c("moe", tokens=3, experts=native.MAX_EXPERTS, **kw) == ("native" if loaded else "sorted")
    assert c("moe", tokens=3, experts=native.MAX_EXPERTS + 1, **kw) == "sorted"  # decode.c's arrays hold 256
    assert c("moe", tokens=3, **{**kw, "device": "meta"}) == "sorted"
    # int8 experts times bf16 activations: the sorted segments (their products native as bf16), one token aside
    e8 = {**kw, "fmt": "int8", "dtype": torch.int8, "act_dtype": torch.bfloat16}
    assert c("moe", tokens=3, **e8) == "sorted"
    assert c("moe", tokens=1, **e8) == ("native" if native.fast(torch.int8) else "decode")
    exact = "native" if native.fast(torch.int8) else "sorted"
    assert c("moe", tokens=3, **{**e8, "act_dtype": torch.float32}) == exact
    assert c("decode_step", tokens=2, **kw) == "torch"
    with pytest.raises(ValueError, match="unknown weight format 'nf4'"):
        c("linear", tokens=1, **{**kw, "fmt": "nf4"})
    with pytest.raises(ValueError, match="unknown operation 'conv'"):
        c("conv", tokens=1, **kw)


def test_without_the_kernels_nothing_chooses_them(monkeypatch):
    monkeypatch.setattr(native, "_lib", None)
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    assert registry.linear_impl(x, w) == "torch"
    assert registry.moe_impl(x, torch.randn(3, 8, 8)) == "sorted"
    assert registry.decode_impl(torch.zeros(1, 1, dtype=torch.long), w) == "torch"


def test_weight_formats():
    w = torch.randn(4, 6)
    assert registry.weight_format(w) == "plain"
    assert registry.weight_format(w.t()) == "strided"
    assert registry.weight_format(w.to(torch.int8), torch.ones(4)) == "int8"
