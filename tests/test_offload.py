"""Expert offloading (`load_model(..., max_memory=)`, `mixlab.ops.offload`): the outputs equal the
resident model's at every budget, in every expert format (float32, int8, int4), with LRU and LFU,
with and without prefetch, from every checkpoint layout (transformers per-expert and fused,
Mistral, GGUF float and Q4_0); clear errors for budgets and sizes; the prefetch thread stops."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import torch

from mixlab import generate, load_model, save_model
from mixlab.checkpoint import CheckpointError
from mixlab.cli import main
from mixlab.config import MoEConfig, get_preset, parse_bytes
from mixlab.model import Transformer
from mixlab.model.formats import OffloadedExperts, expert_cache
from mixlab.model.inference import inference_format, prepare_for_inference
from mixlab.ops.offload import SlotFormat

CFG = get_preset("tiny-moe").replace(n_layers=3, moe=MoEConfig(num_experts=8, top_k=2), max_seq_len=128)
EXPERTS = CFG.n_layers * CFG.moe.num_experts  # type: ignore[union-attr]


def _model(vocab_size: int = CFG.vocab_size) -> Transformer:
    model = Transformer(CFG.replace(vocab_size=vocab_size))
    model.init_weights(std=0.1, seed=0)
    with torch.no_grad():  # decisive routing: different tokens choose different experts
        for block in model.layers:
            block.ffn.gate.weight.mul_(10)  # type: ignore[union-attr]
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("offload") / "hf"
    save_model(_model(), path)
    return path


def _expert_bytes(kind: str) -> int:
    dtype = torch.float32 if kind != "int8" else torch.float32
    return SlotFormat(kind, dtype).expert_bytes(CFG.dim, CFG.ffn_dim)


def _budget(kind: str, fraction: float) -> int:
    return max(2, int(fraction * EXPERTS)) * _expert_bytes(kind)


def _outputs(model: Transformer, tokens: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    with torch.no_grad():
        logits = model(tokens)
    return logits, generate(model, [tokens[0].tolist()], max_new_tokens=6)


TOKENS = torch.randint(0, CFG.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 1.0])
def test_equals_resident_every_format_and_budget(ckpt, quant, fraction):
    kind = quant or "plain"
    # Offloaded int4 experts multiply exact activations: the resident model's "float32" mode.
    ref = prepare_for_inference(load_model(ckpt), quant=quant, int4_activations="float32" if quant == "int4" else None)
    want_logits, want_ids = _outputs(ref, TOKENS)
    # Every policy x prefetch combination once (float32 at half the experts), two elsewhere: keeps it fast.
    combos = [("lru", True), ("lfu", False)]
    if quant is None and fraction == 0.5:
        combos += [("lru", False), ("lfu", True)]
    for policy, prefetch in combos:
        model = prepare_for_inference(load_model(ckpt, max_memory=_budget(kind, fraction), policy=policy,
                                                 prefetch=prefetch), quant=quant)
        cache = expert_cache(model)
        assert cache is not None and cache.fmt.kind == kind
        cache.prefetch_gate = False  # read every guess (these reads are too short for the default to bother)
        logits, ids = _outputs(model, TOKENS)
        # One pass per layer (the batch's experts fit): the same kernel on the same bytes, bit for
        # bit. More distinct experts than slots: passes summed in another order (float rounding).
        tol = 0 if cache.stats.passes == 0 else 1e-5
        torch.testing.assert_close(logits, want_logits, atol=tol, rtol=tol)
        assert ids == want_ids, (policy, prefetch)
        if fraction == 1.0:  # everything fits: each expert read once
            assert cache.stats.misses + cache.stats.prefetched <= EXPERTS
        assert cache.stats.hits + cache.stats.misses > 0 and cache.stats.bytes_read > 0
        assert cache.stats.prefetch_failed == 0
        cache.close()


@pytest.mark.parametrize("fmt", ["hf-fused", "mistral"])
def test_other_safetensors_layouts(tmp_path, fmt):
    path = tmp_path / fmt
    save_model(_model(), path, fmt=fmt)
    want = load_model(path)(TOKENS)
    model = load_model(path, max_memory=_budget("plain", 0.3))
    torch.testing.assert_close(model(TOKENS), want, atol=1e-5, rtol=1e-5)
    assert expert_cache(model).stats.misses > 0  # type: ignore[union-attr]


def test_bf16_checkpoint_reads_straight_into_slots(tmp_path):
    path = tmp_path / "bf16"
    save_model(_model(), path, dtype="bfloat16")
    model = load_model(path, max_memory=_budget("plain", 0.5))
    assert expert_cache(model).fmt.dtype == torch.bfloat16  # type: ignore[union-attr]
    with torch.no_grad():  # the resident model's inference kernels (not its differentiable path)
        torch.testing.assert_close(model(TOKENS), load_model(path)(TOKENS), atol=0, rtol=0)


@pytest.mark.parametrize("quant", ["f32", "q4_0"])
def test_gguf(tmp_path, quant):
    from mixlab.checkpoint.gguf import write_gguf

    path = write_gguf(_model(32000), tmp_path / "m.gguf", quant=quant)  # llama.cpp: Mixtral's vocabulary
    # offloaded int4 experts multiply exact activations: the resident model's with int4_activations="float32"
    ref = prepare_for_inference(load_model(path), int4_activations="float32" if quant == "q4_0" else None)
    model = prepare_for_inference(load_model(path, max_memory=_budget("int4" if quant == "q4_0" else "plain", 0.4)))
    assert expert_cache(model).fmt.kind == ("int4" if quant == "q4_0" else "plain")  # type: ignore[union-attr]
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), ref(TOKENS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("source", ["int8", "gguf-q4_0"])
def test_prefetch_reads_when_generate_allocates_the_pool(tmp_path, ckpt, source):
    # generate's first forward allocates the pool under torch.inference_mode(); the prefetch thread
    # must still write into it (it once failed every converting read: none of the full-size run's
    # guesses was used).
    if source == "int8":
        path, quant, kind = ckpt, "int8", "int8"
    else:
        from mixlab.checkpoint.gguf import write_gguf

        path, quant, kind = write_gguf(_model(32000), tmp_path / "m.gguf", quant="q4_0"), None, "int4"
    want = generate(prepare_for_inference(load_model(path), quant=quant), [TOKENS[0].tolist()], max_new_tokens=8)
    model = prepare_for_inference(load_model(path, max_memory=_budget(kind, 0.5), prefetch=True), quant=quant)
    cache = expert_cache(model)
    assert cache is not None and cache.fmt.kind == kind
    cache.prefetch_gate = False
    assert generate(model, [TOKENS[0].tolist()], max_new_tokens=8) == want
    assert cache.stats.prefetched > 0 and cache.stats.prefetch_failed == 0
    cache.close()


def test_modules_and_format(ckpt):
    model = load_model(ckpt, max_memory="1GB")
    assert all(isinstance(b.ffn.experts, OffloadedExperts) for b in model.layers)  # type: ignore[union-attr]
    assert inference_format(model) == "offloaded"
    with pytest.raises(ValueError, match="offloaded"):
        model.layers[0].ffn.experts.weights()  # type: ignore[union-attr, operator]
    # said "offloaded inference weights (prepared for inference, or loaded from a Q4_0 GGUF)": neither
    with pytest.raises(ValueError, match=r"experts are offloaded \(load_model\(..., max_memory=\)\): load it without"):
        save_model(model, ckpt.parent / "never")
    with pytest.raises(ValueError, match="packed=True"):
        prepare_for_inference(model, packed=True)
    assert expert_cache(load_model(ckpt)) is None


def test_budget_too_small_for_top_k(ckpt):
    per = _expert_bytes("plain")
    with pytest.raises(ValueError, match=r"holds 1 experts .* top-2: give at least"):
        load_model(ckpt, max_memory=per + 1)(TOKENS)  # checked on first use without preparation
    with pytest.raises(ValueError, match=r"holds 1 experts .* top-2: give at least"):
        prepare_for_inference(load_model(ckpt, max_memory=per + 1))
    budget = 2 * _expert_bytes("int4")  # enough for int4, not for float32 or int8
    prepare_for_inference(load_model(ckpt, max_memory=budget), quant="int4")
    with pytest.raises(ValueError, match=r"\(int8\); .* top-2"):
        prepare_for_inference(load_model(ckpt, max_memory=budget), quant="int8")


def test_budget_too_small_for_any_format_is_refused_at_load(ckpt):
    least = 2 * SlotFormat("int4", torch.float32, 128).expert_bytes(CFG.dim, CFG.ffn_dim)
    with pytest.raises(ValueError, match=r"max_memory .* cannot hold one token's top-2 experts in any format: "
                                         r"give at least .*\(int4, group 128\), .* as loaded \(plain\)"):
        load_model(ckpt, max_memory=least - 1)
    model = load_model(ckpt, max_memory=least)  # int4 could fit: checked when the format is final
    with pytest.raises(ValueError, match=r"holds 0 experts .* top-2"):
        prepare_for_inference(model)
    with pytest.raises(ValueError, match=r"holds 0 experts .* top-2"):  # or by the first forward pass
        load_model(ckpt, max_memory=least)(TOKENS)  # (it was range()'s 'arg 3 must not be zero')


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_int8_activations_are_refused_for_offloaded_experts(ckpt, capsys, quant):
    """Offloaded experts have no native whole-model step, whose int8 activations int4_activations
    (int8_activations) chooses: asking for them is refused before any conversion (it was ignored, and
    the tokens differed from the resident model's); "float32", what they do, is accepted."""
    setting = f"{quant}_activations"
    model = load_model(ckpt, max_memory="1GB")
    with pytest.raises(ValueError, match=f"{setting}='int8' applies to resident models"):
        prepare_for_inference(model, quant=quant, **{setting: "int8"})
    assert getattr(model, setting) is None and expert_cache(model).fmt.kind == "plain"  # type: ignore[union-attr]
    prepare_for_inference(model, quant=quant, **{setting: "float32"})
    flag = f"--{quant}-activations"
    rc = main(["generate", "--model", str(ckpt), "--prompt", "x", "--max-new-tokens", "2", "--max-memory", "1GB",
               "--quant", quant, flag, "int8"])
    assert rc == 2 and f"{flag} int8 does not combine with --max-memory" in capsys.readouterr().err


def test_int4_experts_of_an_odd_width_are_refused_at_preparation(tmp_path):
    """An ffn_dim that int4's groups do not divide: refused by `prepare_for_inference`, as for
    resident experts, not by the first forward pass that reads an expert in."""
    path = tmp_path / "odd"
    model = Transformer(CFG.replace(ffn_dim=48))
    model.init_weights(std=0.02, seed=0)
    save_model(model, path)
    with pytest.raises(ValueError, match=r"groups of 32 needs a multiple of 32 inputs per row; layers.0.ffn has 48"):
        prepare_for_inference(load_model(path, max_memory=1 << 20), quant="int4")


def test_int4_refused_for_an_attention_width_leaves_the_model_unchanged(tmp_path):
    """Width and ffn_dim that int4's groups divide, but 3 heads of 40 (wo takes 120 inputs): the
    refusal names wo and comes before anything is converted. It came from the first linear that
    failed, after the expert cache had become int4 and wqkv an Int4Linear: a retry with int8 was
    then refused ('already holds int4 weights'), and decoding mixed int4 and float matrices."""
    path = tmp_path / "heads"
    model = Transformer(CFG.replace(n_heads=3, n_kv_heads=1, head_dim=40))
    model.init_weights(std=0.1, seed=0)
    save_model(model, path)
    offloaded = load_model(path, max_memory=1 << 20)
    with pytest.raises(ValueError, match=r"multiple of 32 inputs per row; layers.0.attn.wo has 120 .* unchanged"):
        prepare_for_inference(offloaded, quant="int4")
    assert inference_format(offloaded) == "offloaded" and expert_cache(offloaded).fmt.kind == "plain"  # type: ignore[union-attr]
    prepare_for_inference(offloaded, quant="int8")
    torch.testing.assert_close(offloaded(TOKENS), prepare_for_inference(model, quant="int8")(TOKENS))


def test_a_pool_of_more_slots_than_the_native_kernel_holds(tmp_path):
    """2 layers of 144 experts and room for all 288: more slots than decode.c's MoE kernel holds
    (`native.MAX_EXPERTS`, as Mixtral-8x22B's 448 experts with a budget above 256 of them). The
    pool's layers run PyTorch's experts and equal the resident model; they failed with 'native MoE
    supports up to 256 experts' once the native kernels were loaded."""
    from mixlab.ops import native

    cfg = CFG.replace(n_layers=2, dim=16, ffn_dim=16, head_dim=8, max_seq_len=32, moe=MoEConfig(144, 2))
    model = Transformer(cfg)
    model.init_weights(std=0.1, seed=0)
    save_model(model, tmp_path / "m")
    native.load()
    offloaded = load_model(tmp_path / "m", max_memory=1 << 20, prefetch=False)
    assert expert_cache(offloaded).num_slots == 2 * 144 > native.MAX_EXPERTS  # type: ignore[union-attr]
    tokens = TOKENS[:, :5] % cfg.vocab_size
    torch.testing.assert_close(offloaded(tokens), model.eval()(tokens), atol=1e-5, rtol=1e-5)
    assert generate(offloaded, [[1, 2, 3]], max_new_tokens=3) == generate(model, [[1, 2, 3]], max_new_tokens=3)


def test_budget_of_exactly_top_k_runs_batches_in_passes(ckpt):
    want = load_model(ckpt)(TOKENS)
    model = load_model(ckpt, max_memory=2 * _expert_bytes("plain"))
    torch.testing.assert_close(model(TOKENS), want, atol=1e-5, rtol=1e-5)
    assert expert_cache(model).stats.passes > 0  # type: ignore[union-attr]


def test_a_failed_read_leaves_the_cache_usable(tmp_path):
    """A demand read that failed (here the file cut short after loading) left the layer's reads after
    it marked as loading: the next forward pass waited for them forever (a server's next request
    hung). It now fails again, naming the file and tensor, and once the file is whole the outputs
    are the resident model's."""
    path = tmp_path / "hf"
    save_model(_model(), path)
    want = load_model(path)(TOKENS)
    model = load_model(path, max_memory=_budget("plain", 0.3), prefetch=False)
    f = path / "model.safetensors"
    whole = f.read_bytes()

    def forward() -> torch.Tensor | Exception:
        out: list[torch.Tensor | Exception] = []

        def run() -> None:
            try:
                with torch.no_grad():
                    out.append(model(TOKENS))
            except Exception as e:  # noqa: BLE001
                out.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(30)
        assert not t.is_alive(), "the forward pass after a failed read hangs"
        return out[0]

    f.write_bytes(whole[: len(whole) // 2])
    for _ in range(2):
        err = forward()
        assert isinstance(err, CheckpointError) and re.search(r"model.safetensors: file ended while reading "
                                                              r"'model.layers.0.*' \(truncated\?\)", str(err))
    f.write_bytes(whole)
    torch.testing.assert_close(forward(), want, atol=1e-5, rtol=1e-5)


def test_prefetch_thread_stops_cleanly(ckpt):
    model = load_model(ckpt, max_memory=_budget("plain", 0.5), prefetch=True)
    cache = expert_cache(model)
    assert cache is not None
    cache.prefetch_gate = False
    generate(model, [TOKENS[0].tolist()], max_new_tokens=4)
    assert cache.prefetching and cache.stats.prefetched > 0
    thread = cache._thread
    cache.close()
    assert not cache.prefetching and thread is not None and not thread.is_alive()
    assert thread not in threading.enumerate()
    cache.close()  # twice is harmless


def test_lru_and_lfu_evict_differently():
    from mixlab.ops.offload import ExpertCache

    class Source:
        reads: list[tuple[int, int]] = []

        def read(self, layer, expert, fmt, slot, *, pause=None):
            self.reads.append((layer, expert))
            slot.w13.fill_(expert)
            slot.w2.fill_(expert)
            return 1

        def close(self):
            pass

    def run(policy: str) -> list[tuple[int, int]]:
        src = Source()
        src.reads = []
        fmt = SlotFormat("plain", torch.float32)
        cache = ExpertCache(src, num_layers=1, num_experts=4, top_k=1, dim=2, ffn_dim=2,
                            budget=2 * fmt.expert_bytes(2, 2), fmt=fmt, policy=policy, prefetch=False)
        for e in (0, 0, 0, 1, 2, 0):  # LRU evicts 0 for 2 (then misses 0); LFU keeps the frequent 0
            cache.release(cache.acquire(0, [e]))
        assert cache.pool()["w13"][cache.acquire(0, [e])[0]].eq(e).all()
        return src.reads

    assert run("lru") == [(0, 0), (0, 1), (0, 2), (0, 0)]
    assert run("lfu") == [(0, 0), (0, 1), (0, 2)]


def test_wrong_guess_is_cancelled_and_slow_reads_are_not_guessed():
    import time

    from mixlab.ops.offload import ExpertCache

    class Source:  # prefetch reads come in 200 chunks of 5 ms; demand reads are instant
        def read(self, layer, expert, fmt, slot, *, pause=None):
            for _ in range(200 if pause is not None else 0):
                time.sleep(0.005)
                pause(1)
            slot.w13.fill_(10 * layer + expert)
            slot.w2.fill_(10 * layer + expert)
            return 1

        def close(self):
            pass

    fmt = SlotFormat("plain", torch.float32)
    cache = ExpertCache(Source(), num_layers=2, num_experts=4, top_k=1, dim=2, ffn_dim=2,
                        budget=3 * fmt.expert_bytes(2, 2), fmt=fmt, policy="lru", prefetch=True)
    cache.release(cache.acquire(0, [0], prefetch=(1, [1])))  # guesses expert 1 of layer 1: a 1 s read starts
    deadline = time.monotonic() + 10
    while cache.stats.prefetched == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    (s,) = cache.acquire(1, [2])  # layer 1 wants expert 2: the guess is abandoned part way, its slot freed
    assert cache.pool()["w13"][s].eq(12).all()
    cache.release([s])
    while cache.stats.prefetch_cancelled == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert cache.stats.prefetch_cancelled == 1 and cache.stats.prefetch_used == 0
    assert cache.cached() == {(0, 0), (1, 2)}
    # A read longer than the compute between two layers: guesses are counted, not read.
    cache.read_s_mean, cache.window_s_mean = 0.02, 0.004
    cache.prefetch(1, [0, 2])  # (1, 2) is cached: only (1, 0) is a guess to skip
    assert cache.stats.prefetch_skipped == 1 and cache.stats.prefetched == 1
    cache.close()


def test_pickle_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(tmp_path, max_memory="1GB")


def test_dense_models_and_bad_values_are_refused(tmp_path, ckpt):
    dense = tmp_path / "dense"
    m = Transformer(get_preset("tiny-dense"))
    m.init_weights(seed=0)
    save_model(m, dense)
    with pytest.raises(ValueError, match="dense"):
        load_model(dense, max_memory="1GB")
    with pytest.raises(ValueError, match="unknown eviction policy 'mru'"):
        load_model(ckpt, max_memory="1GB", policy="mru")
    with pytest.raises(ValueError, match="prefetch must be True or False, not 'no'"):
        load_model(ckpt, max_memory="1GB", prefetch="no")


def test_offload_options_without_max_memory_are_refused(ckpt, capsys):
    """policy= / prefetch= (--offload-policy / --no-prefetch) alone would do nothing: refused."""
    with pytest.raises(ValueError, match=r"policy='lfu' without max_memory: .* pass max_memory= too"):
        load_model(ckpt, policy="lfu")
    with pytest.raises(ValueError, match=r"prefetch=False without max_memory"):
        load_model(ckpt, prefetch=False)
    for flag in (["--offload-policy", "lfu"], ["--no-prefetch"]):
        rc = main(["generate", "--model", str(ckpt), "--prompt", "x", "--max-new-tokens", "2", *flag])
        assert rc == 2 and "are for offloaded experts: pass --max-memory too" in capsys.readouterr().err
    assert isinstance(load_model(ckpt, max_memory="1GB", policy="lfu").layers[0].ffn.experts, OffloadedExperts)


@pytest.mark.parametrize("text,want", [("4GB", 4 * 10**9), ("4GiB", 4 << 30), ("4g", 4 << 30), ("512MB", 512 * 10**6),
                                       ("1.5GB", 1_500_000_000), ("1000", 1000), (" 2 KiB ", 2048), (77, 77)])
def test_parse_bytes(text, want):
    assert parse_bytes(text, what="--max-memory") == want


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "4XB", "0", "0.1", "nan", "inf", "1e9", "4 G B", "1,000"])
def test_parse_bytes_errors(text):
    with pytest.raises(ValueError, match="--max-memory"):
        parse_bytes(text, what="--max-memory")


@pytest.mark.parametrize("value,message", [("4XB", "--max-memory: '4XB' is not a size"),
                                           ("0", "--max-memory: '0' must be at least one byte"),
                                           ("10", "give at least")])
def test_cli_bad_max_memory(ckpt, capsys, value, message):
    rc = main(["generate", "--model", str(ckpt), "--prompt", "x", "--max-new-tokens", "2", "--max-memory", value])
    assert rc == 2 and message in capsys.readouterr().err


def test_cli_generate_with_stats(tmp_path, capsys):
    ckpt = tmp_path / "m"
    save_model(_model(32000), ckpt)  # Mixtral's vocabulary: the CLI's default tokenizer
    argv = ["generate", "--model", str(ckpt), "--prompt", "hello world", "--max-new-tokens", "5", "--dtype", "float32"]
    assert main(argv) == 0
    want = capsys.readouterr().out
    assert main([*argv, "--max-memory", str(_budget("plain", 0.5)), "--offload-policy", "lfu", "--stats"]) == 0, \
        capsys.readouterr().err
    out, err = capsys.readouterr()
    assert out == want
    assert "expert cache: hit rate" in err and "read" in err and "waited" in err


def test_clear_empties_the_cache(ckpt):
    model = load_model(ckpt, max_memory=_budget("plain", 0.5), prefetch=False)
    cache = expert_cache(model)
    assert cache is not None
    with torch.no_grad():
        want = model(TOKENS)
        assert cache.cached()
        cache.clear()
        assert not cache.cached()
        cache.reset_stats()
        torch.testing.assert_close(model(TOKENS), want, atol=0, rtol=0)
    assert cache.stats.hits == 0 or cache.stats.misses > 0


def test_engine_stats_and_server_metrics_report_the_expert_cache(ckpt):
    from mixlab.engine import Engine, SamplingParams
    from mixlab.serve.metrics import Metrics

    model = prepare_for_inference(load_model(ckpt, max_memory=_budget("plain", 0.3)))
    cache = expert_cache(model)
    with Engine(model, max_batch=2) as engine:
        for h in [engine.submit(TOKENS[i].tolist(), SamplingParams(max_tokens=4, ignore_eos=True)) for i in (0, 1)]:
            list(h)
        s = engine.stats()["expert_cache"]
    assert s["hits"] == cache.stats.hits and s["misses"] == cache.stats.misses > 0 and s["slots"] == cache.num_slots
    text = Metrics(lambda: {"expert_cache": s}).render().decode()
    values = {name: float(v) for name, v in re.findall(r"^(mixlab_expert_cache_\w+) (\S+)$", text, re.M)}
    assert values["mixlab_expert_cache_misses_total"] == s["misses"]
    assert values["mixlab_expert_cache_read_bytes_total"] == s["bytes_read"] > 0
    assert values["mixlab_expert_cache_bytes"] == cache.num_slots * cache.expert_bytes
    with Engine(load_model(ckpt), max_batch=1) as resident:  # resident experts: no such entry
        assert "expert_cache" not in resident.stats()
