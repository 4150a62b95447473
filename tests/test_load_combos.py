"""The model-loading flags of `generate` / `serve` combined, as users combine them: a GGUF file (f32,
q8_0, q4_0) or a folder, of an MoE, a dense sliding-window and a tied-embeddings model, x --dtype x
--quant x --int4-activations x --max-memory (+ --offload-policy, --no-prefetch, --stats) x --adapter x
--threads x --speculative-tokens, and serve's --pack-weights, --batch-invariant and --lora-modules.

A table of combinations each gives the greedy tokens of the plain reference: the same file loaded
resident in float32 (the adapter merged, the same quantisation; offloaded int4 experts take exact
activations, so --int4-activations float32), decoded by full forward passes `model(tokens)`. Float32
makes that exact. Pairs that cannot work are refused before the model loads, naming both flags (a
Q4_0 GGUF's int4 matrices are known from its header). Every pair of flag values was walked once this
way (bf16's roundings aside, which differ between kernels); the table keeps one of each kind."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import gguf_test_model
from mixlab.checkpoint import load_model, save_model
from mixlab.cli import main
from mixlab.config import get_preset
from mixlab.model import Transformer
from mixlab.model.formats import expert_cache
from mixlab.model.inference import prepare_for_inference
from mixlab.tokenizer import load_tokenizer
from mixlab.train.lora import LoraConfig, apply_lora, save_peft

pytest.importorskip("gguf")

PROMPT = "Once upon a time, in a land far away, there lived"  # 13 tokens: past the sliding window of 8
N = 6


@pytest.fixture(autouse=True)
def _threads() -> Any:
    """--threads sets torch's for the process: given back after each test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _model(kind: str) -> Transformer:
    if kind in ("moe", "dense"):
        return gguf_test_model(kind)
    cfg = (get_preset("tiny-moe").replace(vocab_size=32000, tie_embeddings=True) if kind == "tied"
           else get_preset("tiny-dense").replace(vocab_size=32000, sliding_window=8))
    model = Transformer(cfg)
    model.init_weights(std=0.1, seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROOT/KIND/{hf, f32.gguf, q8_0.gguf, q4_0.gguf, adapter} for each kind of model (no GGUF of the
    sliding-window one: llama.cpp's `llama` architecture has none)."""
    from mixlab.checkpoint.gguf import write_gguf

    root = tmp_path_factory.mktemp("combos")
    for kind in ("moe", "dense", "tied", "sw"):
        model = _model(kind)
        save_model(model, root / kind / "hf")
        if kind != "sw":
            for quant in ("f32", "q8_0", "q4_0"):
                write_gguf(model, root / kind / f"{quant}.gguf", quant=quant)
        targets = ("attention", "experts", "router") if model.config.moe else ("attention",)
        lora = apply_lora(model, LoraConfig(rank=4, alpha=8, targets=targets))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        save_peft(lora, root / kind / "adapter")
    return root


# (kind, file, flags): each generate's greedy text equals the plain reference's
GENERATE = [
    # 30KB: two int4 experts of the four, so a prompt's layer runs in passes
    ("moe", "q4_0.gguf", ["--max-memory", "30KB", "--threads", "1", "--speculative-tokens", "3", "--stats"]),
    ("moe", "q8_0.gguf", ["--quant", "int8", "--max-memory", "250KB", "--offload-policy", "lfu", "--no-prefetch"]),
    ("moe", "f32.gguf", ["--quant", "int4", "--int4-activations", "int8", "--adapter", "adapter", "--threads", "2"]),
    ("moe", "q4_0.gguf", ["--quant", "int4", "--int4-activations", "float32", "--speculative-tokens", "3"]),
    ("tied", "q8_0.gguf", ["--quant", "int4", "--max-memory", "30KB", "--threads", "2"]),
    ("tied", "hf", ["--adapter", "adapter", "--quant", "int8", "--speculative-tokens", "3"]),
    ("dense", "q4_0.gguf", ["--int4-activations", "int8", "--threads", "1"]),
    ("dense", "f32.gguf", ["--adapter", "adapter", "--quant", "int4", "--speculative-tokens", "3"]),
    ("sw", "hf", ["--adapter", "adapter", "--quant", "int8", "--threads", "1", "--speculative-tokens", "3"]),
    ("sw", "hf", ["--quant", "int4", "--int4-activations", "float32"]),
]


def _flag(flags: list[str], name: str) -> str | None:
    return flags[flags.index(name) + 1] if name in flags else None


def _reference(path: Path, flags: list[str], adapter: Path | None) -> str:
    """The greedy continuation by full forward passes over the same weights resident, in float32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a Q4_0 file's float output matrix: no native decoding (not used here)
        model = load_model(path, dtype="float32", adapter=adapter)
        quant, acts = _flag(flags, "--quant"), _flag(flags, "--int4-activations")
        if "--max-memory" in flags:
            acts = "float32" if quant == "int4" or path.name == "q4_0.gguf" else None
        if quant or acts or path.name == "q4_0.gguf":
            model = prepare_for_inference(model, quant=quant, int4_activations=acts, decoder=False)
    tok = load_tokenizer()
    ids = tok.encode(PROMPT)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(N):
            new.append(int(model(torch.tensor([ids + new]))[0, -1].argmax()))
    return tok.decode(ids + new)[len(tok.decode(ids)):] + "\n"


@pytest.mark.parametrize(("kind", "file", "flags"), GENERATE, ids=[f"{k}-{f}-{' '.join(x)}" for k, f, x in GENERATE])
def test_generate_combinations_give_the_plain_references_tokens(root: Path, kind: str, file: str, flags: list[str],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    flags = [str(root / kind / "adapter") if f == "adapter" else f for f in flags]
    path = root / kind / file
    rc = main(["generate", "--model", str(path), "--prompt", PROMPT, "--max-new-tokens", str(N), "--dtype", "float32",
               "--quiet", *flags])
    out, err = capsys.readouterr()
    assert rc == 0, err
    adapter = Path(flags[flags.index("--adapter") + 1]) if "--adapter" in flags else None
    # an adapter over an f32 GGUF file: the reference merges it into the folder's same weights
    assert out == _reference(root / kind / "hf" if adapter and file == "f32.gguf" else path, flags, adapter)
    if adapter is not None:  # and it mattered
        assert out != _reference(path, flags, None)
    if "--stats" in flags:  # the expert cache's line, not "nothing to report"
        assert "hit rate" in err and "experts fit" in err, err


def test_offloading_takes_the_quantisation_policy_and_prefetch(root: Path) -> None:
    """--quant, --offload-policy and --no-prefetch reach the expert cache of a GGUF's offloaded experts."""
    from mixlab.cli import _build_parser_interruptible, _parse_args
    from mixlab.cli.run import _load

    for file, quant, kind in (("q8_0.gguf", "int8", "int8"), ("q8_0.gguf", "int4", "int4"),
                              ("q4_0.gguf", "none", "int4"), ("f32.gguf", "none", "plain")):
        args = _parse_args(_build_parser_interruptible(), [
            "generate", "--model", str(root / "moe" / file), "--prompt", "x", "--dtype", "float32", "--quant", quant,
            "--max-memory", "250KB", "--offload-policy", "lfu", "--no-prefetch"])
        model, _ = _load(args)
        cache: Any = expert_cache(model)
        assert (cache.fmt.kind, cache.policy, cache.prefetch_enabled) == (kind, "lfu", False), file


def _no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model load fails the test: the refusal must come before it."""
    import mixlab.checkpoint

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(mixlab.checkpoint, "load_model", boom)


# (kind, file, flags, what the one line says): refused before the load, exit code 2 (a usage error)
REFUSED = [
    ("moe", "q8_0.gguf", ["--int4-activations", "float32"],
     r"--int4-activations float32 applies to int4 weights \(.*q8_0.gguf holds no Q4_0 matrices\): pass --quant int4"),
    ("moe", "f32.gguf", ["--int4-activations", "int8", "--quant", "int8"],
     r"--int4-activations int8 applies to int4 weights \(.*f32.gguf holds no Q4_0 matrices\)"),
    ("moe", "q4_0.gguf", ["--quant", "int8"],
     r"--quant int8 applies to float weights; .*q4_0.gguf holds Q4_0 \(int4\)"),
    ("dense", "q4_0.gguf", ["--adapter", "adapter"],
     r"--adapter merges into float weights; .*q4_0.gguf holds Q4_0 \(int4\) matrices: load a float checkpoint"),
    ("moe", "hf", ["--adapter", "adapter", "--max-memory", "250KB"], r"--adapter does not combine with --max-memory"),
    ("tied", "f32.gguf", ["--adapter", "adapter", "--max-memory", "250KB"],
     r"--adapter does not combine with --max-memory"),
]


@pytest.mark.parametrize(("kind", "file", "flags", "message"), REFUSED,
                         ids=[f"{k}-{f}-{' '.join(x)}" for k, f, x, _ in REFUSED])
def test_generate_pairs_that_cannot_work_are_refused_before_the_load(root: Path, kind: str, file: str, flags: list[str],
                                                                      message: str, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """They were told once the file had loaded (a Mixtral-sized one: minutes), in the API's words
    (`int4_activations='float32'`, `adapter=`), with exit code 1, or by a CheckpointError."""
    import re

    _no_load(monkeypatch)
    flags = [str(root / kind / "adapter") if f == "adapter" else f for f in flags]
    rc = main(["generate", "--model", str(root / kind / file), "--prompt", "x", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err


SERVE_REFUSED = [
    (["--pack-weights", "yes", "--quant", "int8"], "--pack-weights yes keeps bf16 weights .* which --quant int8"),
    (["--pack-weights", "yes", "--dtype", "float32"], "--pack-weights yes .* which --dtype float32"),
    (["--pack-weights", "yes", "--max-memory", "250KB"], "--pack-weights yes .* which --max-memory"),
    (["--pack-weights", "yes", "--batch-invariant"], "--pack-weights yes has no use with --batch-invariant"),
    (["--batch-invariant", "--quant", "int4"], "--batch-invariant does not combine with --quant int4"),
    (["--batch-invariant", "--dtype", "float16"], "--batch-invariant does not combine with --dtype float16"),
    (["--batch-invariant", "--max-memory", "250KB"], "--batch-invariant does not combine with --max-memory"),
    (["--lora-modules", "a=adapter", "--max-memory", "250KB"], "--lora-modules does not combine with --max-memory"),
    (["--lora-modules", "a=adapter", "--batch-invariant"], "--lora-modules does not combine with --batch-invariant"),
]


@pytest.mark.parametrize(("flags", "message"), SERVE_REFUSED, ids=[" ".join(f) for f, _ in SERVE_REFUSED])
def test_serve_pairs_that_cannot_work_are_refused_before_the_load(root: Path, flags: list[str], message: str,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """--pack-weights yes beside a flag that leaves no bf16 weights did nothing, silently; --lora-modules
    beside --max-memory or --batch-invariant, and --batch-invariant beside --quant, --dtype float16 or
    --max-memory (as "native kernels unavailable"), were refused once the model had loaded, in the API's
    words."""
    import re

    import mixlab.cli.serve

    _no_load(monkeypatch)
    monkeypatch.setattr(mixlab.cli.serve, "check_address", lambda host, port: None)
    flags = [f"a={root / 'moe' / 'adapter'}" if f == "a=adapter" else f for f in flags]
    rc = main(["serve", "--model", str(root / "moe" / "hf"), "--port", "0", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_serve_names_the_format_quant_auto_chose_when_refusing(root: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A Q4_0 file runs as int4 without --quant (auto); a refusal says so, and how to get floats."""
    import mixlab.cli.serve

    _no_load(monkeypatch)
    monkeypatch.setattr(mixlab.cli.serve, "check_address", lambda host, port: None)
    rc = main(["serve", "--model", str(root / "moe" / "q4_0.gguf"), "--port", "0", "--batch-invariant"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert ("--batch-invariant does not combine with --quant auto (int4 for q4_0.gguf's Q4_0 matrices)" in err
            and err.rstrip().endswith("(--quant none loads the file's floats)")), err


def test_serve_refuses_pack_weights_over_what_only_the_load_tells(root: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A Q4_0 GGUF's int4 matrices leave no bf16 weights for the panels: told once loaded, naming the flag."""
    import mixlab.cli.serve
    import mixlab.serve

    monkeypatch.setattr(mixlab.cli.serve, "check_address", lambda host, port: None)
    monkeypatch.setattr(mixlab.serve, "run_server", lambda app, **kw: None)  # (it served, and never returned)
    rc = main(["serve", "--model", str(root / "dense" / "q4_0.gguf"), "--port", "0", "--dtype", "bfloat16", "--quant",
               "none", "--pack-weights", "yes", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--pack-weights yes: pack_weights=True keeps bf16 weights" in err and "int4" in err, err


@pytest.mark.parametrize("how", ["float32", "int8", "offloaded"])
def test_engine_refuses_pack_weights_with_nothing_to_pack(root: Path, how: str) -> None:
    """Engine(pack_weights=True) over weights the panels do not take (float32, int8, offloaded experts)
    kept no panels and said nothing; refused, saying why. (A bf16 model's panels: test_native_batch.)"""
    from mixlab.engine import Engine

    model = load_model(root / "moe" / "hf", dtype="float32", max_memory="250KB" if how == "offloaded" else None)
    model = prepare_for_inference(model, quant="int8" if how == "int8" else None)
    why = {"float32": "its weights are float32", "int8": "its matrices are int8",
           "offloaded": "its experts are offloaded"}[how]
    with pytest.raises(ValueError, match=rf"pack_weights=True keeps bf16 weights .* none to keep \({why}"):
        Engine(model, max_batch=2, pack_weights=True)
    Engine(model, max_batch=2, pack_weights=None)  # automatic: nothing packed, nothing said


def test_engine_names_offloaded_experts_and_int4_when_refusing_batch_invariance(root: Path) -> None:
    """Engine(batch_invariant=True) over offloaded experts said "native kernels unavailable" (they are
    available: it is the whole-model step that offloading leaves out), over a Q4_0 GGUF's int4 matrices
    "native kernels over torch.uint8"."""
    from mixlab.engine import Engine

    model = prepare_for_inference(load_model(root / "moe" / "hf", dtype="float32", max_memory="250KB"))
    with pytest.raises(ValueError, match="native kernels without a whole-model step: the experts are offloaded"):
        Engine(model, max_batch=2, batch_invariant=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its float output matrix: no native decoding (one shared_decoder builds)
        model = prepare_for_inference(load_model(root / "moe" / "q4_0.gguf", dtype="float32"), quant="int4")
    with pytest.raises(ValueError, match=r"native kernels over int4 matrices\)"):
        Engine(model, max_batch=2, batch_invariant=True)
