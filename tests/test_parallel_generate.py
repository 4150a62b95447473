"""`generate` / `chat --ep N` read each process's experts straight from the files
(`parallel.expert.load_expert_parallel`): every process ends with the tensors the old path gave it
(`load_model` of the whole checkpoint, or `load_gguf(keep_int4=False)` of a GGUF file, an adapter
merged, then `apply_expert_parallel`), bit for bit, from transformers', Mistral's and GGUF files (F32,
BF16, Q4_0 dequantised, split in parts) in every dtype, with a PEFT adapter's expert factors narrowed
to the process's experts, and never holds the whole model while it does. A Q4_0 file's matrices stay
int4 by default (each process's experts' bytes as read), and `--quant int8 / int4` quantises each
process's share: both equal one process's quantised model.

Like tests/test_parallel_init.py, a group of processes (gloo, loopback, forked) runs a list of jobs."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import hf_mixtral
from mixlab import load_model, save_model
from processes import run_group


def _whole(src: str, dtype: str | None, adapter: str | None = None) -> Any:
    """The model as `generate --ep` loaded it whole before it was split: `load_model`, or for a GGUF
    file `load_gguf` with its Q4_0 matrices dequantised; an adapter merged."""
    from mixlab.checkpoint import merge_adapter
    from mixlab.checkpoint.gguf_read import load_gguf
    from mixlab.dtypes import parse_dtype

    if not src.endswith(".gguf"):
        return load_model(src, dtype=dtype, adapter=adapter)
    model = load_gguf(src, dtype=parse_dtype(dtype), keep_int4=False)
    return model if adapter is None else merge_adapter(model, adapter)


def _compare_job(rank: int, job: dict[str, Any]) -> None:
    """For each source (a checkpoint and an adapter or None) and dtype: `load_expert_parallel` equals
    the whole load then `apply_expert_parallel`, each local tensor bit for bit (dtype, device,
    values), and so do the logits (both models' forwards exchange tokens with the other process's)."""
    from mixlab.parallel.expert import apply_expert_parallel, load_expert_parallel
    from mixlab.parallel.mesh import init

    layout = init(ep=2)
    for src, adapter, dtypes in job["sources"]:
        for dtype in dtypes:
            want = _whole(src, dtype, adapter)
            apply_expert_parallel(want, layout)
            got = load_expert_parallel(src, layout, dtype=dtype, adapter=adapter, keep_int4=False)
            params = dict(want.named_parameters())
            assert params.keys() == dict(got.named_parameters()).keys()
            for name, p in got.named_parameters():
                q = params[name]
                assert p.dtype == q.dtype and p.shape == q.shape and torch.equal(p, q), (src, adapter, dtype, rank,
                                                                                           name)
            assert not got.training and got.config == want.config
            x = torch.randint(0, got.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                assert torch.equal(got(x), want(x)), (src, adapter, dtype, rank)


def _memory_job(rank: int, job: dict[str, Any]) -> None:
    """`generate --ep 2`'s load (`cli.run._load`), measured: writes how much the process's peak
    resident memory grew and the whole model's bytes."""
    from mixlab.cli.run import _load
    from mixlab.config import get_preset
    from mixlab.model import Transformer
    from mixlab.parallel.mesh import init
    from mixlab.tokenizer import load_tokenizer

    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak() -> int:
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(ln.split()[1] for ln in status if ln.startswith("VmHWM:"))) * 1024  # kB

    init(ep=2)  # the process group, the tokenizer (read again by _load, a few MB), the meta device: not measured
    load_tokenizer()
    if job["model"].endswith(".gguf"):  # nor the gguf package's import (~45 MB) and a header's first read (16 MB)
        from mixlab.checkpoint.gguf_read import read_header

        read_header(job["model"])
    with torch.device("meta"):
        Transformer(get_preset("tiny-moe"))
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) := the current resident memory
    before = resident()
    args = argparse.Namespace(command="generate", ep=2, model=job["model"], tokenizer=None, threads=None,
                              dtype="float32", device="cpu", quant="none", max_memory=None, adapter=job.get("adapter"))
    model, _ = _load(args)
    with torch.device("meta"):
        whole = sum(p.numel() * p.element_size() for p in Transformer(model.config).parameters())
    local = sum(p.numel() * p.element_size() for p in model.parameters())
    Path(f"{job['report']}.{rank}.json").write_text(json.dumps({"grown": peak() - before,
                                                                              "model": whole, "local": local}))


def _one_process_quantised(src: str, quant: str, acts: str | None = None, *, decoder: bool = False) -> Any:
    """One process's `generate --quant ... [--int4-activations acts]` model: `load_model` (a GGUF
    file's Q4_0 matrices kept int4), quantised by `prepare_for_inference`, float32; by default without
    a native decoder attached, so its forward is PyTorch's kernels as under --ep (`generate` builds
    one over it, `native.shared_decoder`: its int4 products round activations as PyTorch's do)."""
    from mixlab.model.inference import prepare_for_inference

    return prepare_for_inference(load_model(src, dtype="float32"), quant=None if quant == "none" else quant,
                                 decoder=decoder, int4_activations=acts)


def _greedy(model: Any, tok: Any, prompt: list[int], sync_token: Any = None) -> tuple[list[int], list[float]]:
    """An engine's greedy tokens and their logprobs for `prompt` (under --ep every token rank 0's,
    as `generate --ep` decodes)."""
    from mixlab.engine import Engine, SamplingParams

    engine = Engine(model, tok, max_batch=1, sync_token=sync_token)
    h = engine.submit(prompt, SamplingParams(max_tokens=8, logprobs=0, ignore_eos=True))
    with torch.inference_mode():
        engine.run_until_idle()
    outs = [o for o in h.result() if o.token_id is not None]
    return [o.token_id for o in outs], [float(o.logprob) for o in outs]  # type: ignore[arg-type]


def _quant_job(rank: int, job: dict[str, Any]) -> None:
    """For each source and --quant: `_load` under --ep 2 (the split load, then `prepare_for_inference`
    of this process's share) holds the slices of one process's quantised tensors, bit for bit, and its
    logits are one process's to float32 rounding; no native decoder is attached or built. Then
    `mixlab generate --ep 2` of the last source through `cli.main`: rank 0 writes the text printed to
    `job["out"]`."""
    import contextlib
    import io

    from mixlab.cli import main
    from mixlab.cli.run import _load
    from mixlab.model import native
    from mixlab.parallel.mesh import init

    init(ep=2)
    for src, quant in job["sources"]:
        args = argparse.Namespace(command="generate", ep=2, model=src, tokenizer=None, threads=None,
                                  dtype="float32", device="cpu", quant=quant, max_memory=None, adapter=None)
        got, _ = _load(args)
        one = _one_process_quantised(src, quant)
        theirs = dict(one.named_buffers()) | dict(one.named_parameters())
        mine = dict(got.named_buffers()) | dict(got.named_parameters())
        assert mine.keys() == theirs.keys(), (src, quant)
        for name, t in mine.items():
            want = theirs[name]
            if ".experts." in name:
                L = want.shape[0] // 2
                want = want[rank * L:(rank + 1) * L]
            assert t.dtype == want.dtype and torch.equal(t, want), (src, quant, rank, name)
        assert got.native_decoder is None and native.shared_decoder(got) is None, (src, quant)
        x = torch.randint(0, got.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(got(x), one(x), rtol=1e-5, atol=1e-5, msg=f"{src} {quant} {rank}")
    src, quant = job["sources"][-1]  # once: generate ends with the process group's shutdown
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["generate", "--model", src, "--prompt", "Bonjour, le monde", "--max-new-tokens", "8",
                     "--dtype", "float32", "--threads", "1", "--ep", "2", "--quant", quant])
    assert code == 0, (src, quant)
    if rank == 0:
        Path(job["out"]).write_text(out.getvalue())


def _acts_job(rank: int, job: dict[str, Any]) -> None:
    """For each `--int4-activations` (None: left out) with `--quant int4`: `_load` under --ep 2 keeps
    the mode, and rank 0 writes an engine's greedy tokens and logprobs over the split model to
    `job["out"]`. Then `mixlab generate --ep 2 --quant int4 --int4-activations int8` through
    `cli.main` (it was refused): rank 0 writes the text printed to `job["text"]`."""
    import contextlib
    import io

    from mixlab.cli import main
    from mixlab.cli.run import _load
    from mixlab.parallel.expert import rank0_token
    from mixlab.parallel.mesh import init

    init(ep=2)
    got = {}
    for acts in job["modes"]:
        args = argparse.Namespace(command="generate", ep=2, model=job["src"], tokenizer=None, threads=None,
                                  dtype="float32", device="cpu", quant="int4", max_memory=None, adapter=None,
                                  int4_activations=acts)
        model, tok = _load(args)
        assert model.int4_activations == acts, (acts, model.int4_activations)
        got[str(acts)] = _greedy(model, tok, job["prompt"], rank0_token(model.tok_embeddings.weight.device))
    if rank == 0:
        Path(job["out"]).write_text(json.dumps(got))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["generate", "--model", job["src"], "--prompt", "Bonjour, le monde", "--max-new-tokens", "8",
                     "--dtype", "float32", "--threads", "1", "--ep", "2", "--quant", "int4",
                     "--int4-activations", "int8"])
    assert code == 0
    if rank == 0:
        Path(job["text"]).write_text(out.getvalue())


def _at_load_job(rank: int, job: dict[str, Any]) -> None:
    """For each source and quant: `load_expert_parallel(quant=)` (each matrix of the share quantised as
    it is read) holds the modules and tensors, bit for bit, that the split float load then
    `prepare_for_inference(quant=, decoder=False)` held (what `generate --ep --quant` ran before); rank 0
    writes both models' greedy tokens to `job["out"]`."""
    from mixlab.model.inference import prepare_for_inference
    from mixlab.parallel.expert import load_expert_parallel, rank0_token
    from mixlab.parallel.mesh import init
    from mixlab.tokenizer import load_tokenizer

    layout = init(ep=2)
    tok = load_tokenizer()
    tokens = {}
    for src, quant in job["sources"]:
        got = load_expert_parallel(src, layout, dtype="float32", quant=quant)
        want = prepare_for_inference(load_expert_parallel(src, layout, dtype="float32"), quant=quant, decoder=False)
        assert [(n, type(m)) for n, m in got.named_modules()] == [(n, type(m)) for n, m in want.named_modules()]
        a, b = got.state_dict(), want.state_dict()
        assert a.keys() == b.keys() and not any(p.requires_grad for p in got.parameters()), (src, quant)
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), (src, quant, rank, name)
        sync = rank0_token(got.tok_embeddings.weight.device)
        tokens[f"{src} {quant}"] = [_greedy(m, tok, job["prompt"], sync)[0] for m in (got, want)]
    if rank == 0:
        Path(job["out"]).write_text(json.dumps(tokens))


def _job(rank: int, job: dict[str, Any]) -> None:
    {"compare": _compare_job, "memory": _memory_job, "quant": _quant_job, "acts": _acts_job,
     "at_load": _at_load_job}[job["kind"]](rank, job)


@pytest.mark.slow  # 2 processes: ~20 s on 2 busy cores
def test_ep_quantised_experts_equal_one_process_s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`generate --ep 2 --quant int8 / int4` was refused ("not supported with --ep yet"): each process
    now quantises its own experts (and the dense weights) after the split load, and its MoE layers run
    the quantised experts' forward between the same all-to-alls. A Q4_0 GGUF file's matrices were
    dequantised under --ep: they stay int4, each process's experts' bytes as read. Quantisation is
    per expert row (int8) or group (int4), so each share is bit for bit the slice of one process's
    quantised experts; the logits equal one process's forward to float32 rounding, not bit for bit
    (1.5e-6 of 4 here): the products are the same, their sums' order is not (an expert multiplies
    every process's rows at once, twice the rows here, and one process picks a whole-layer kernel),
    and the tokens printed are one process's running the kernels each --ep process runs: PyTorch's
    pass, whose int4 products take the native int4 x int8 kernel at any row count, with no native
    decoder (the native steps' differ here, and so does PyTorch's pass without the kernels,
    MIXLAB_NATIVE=0: the file's Q4_0 token embedding puts the first normed rows on int4's grid, where
    rounding them to int8 meets exact ties that a last-bit difference in the norm breaks either way,
    1.8e-2 in a logprob; a folder's int4 model: test_ep_int4_activations_in_either_mode_...)."""
    from mixlab import generate, load_tokenizer

    model = _tiny_moe()
    save_model(model, tmp_path / "model")
    src = str(tmp_path / "model")
    sources = [(src, "int8"), (src, "int4")]
    if importlib.util.find_spec("gguf") is not None:  # Q4_0 kept int4 (and the float matrices made int4), as read
        from mixlab.checkpoint.gguf import write_gguf

        q4 = str(write_gguf(model, tmp_path / "model.gguf", quant="q4_0"))
        sources += [(q4, "none"), (q4, "int4")]
    run_group(_job, [{"kind": "quant", "sources": sources, "out": str(tmp_path / "out")}])
    tok = load_tokenizer()
    prompt = tok.encode("Bonjour, le monde")
    for where in ("mixlab.generate", "mixlab.engine.runner"):  # no native decoder, as under --ep
        monkeypatch.setattr(importlib.import_module(where), "shared_decoder", lambda model: None)
    ids = [i for i in generate(_one_process_quantised(*sources[-1]), [prompt], max_new_tokens=8)[0]
           if i != tok.eos_id]
    printed = (tmp_path / "out").read_text()
    assert len(ids) > 1 and printed == tok.decode(prompt + ids)[len(tok.decode(prompt)):] + "\n", sources[-1]


def test_ep_quant_rounds_each_process_s_matrices_as_read(tmp_path: Path) -> None:
    """`generate --ep 2 --quant int8 / int4` loaded each process's float share, then quantised it: each
    process now rounds each matrix of its share as it reads it (`load_expert_parallel(quant=)`, one
    weight's floats at a time), into the same modules and tensors, bit for bit, with the same greedy
    tokens: a folder (tied embeddings: the head quantised from them) and, where gguf is installed, a
    Q4_0 file (its Q4_0 matrices kept, the others made int4) and an F32 one (int8)."""
    from mixlab.config import get_preset
    from mixlab.model import Transformer

    model = Transformer(get_preset("tiny-moe").replace(vocab_size=32000, sliding_window=None, tie_embeddings=True))
    model.init_weights(std=0.1, seed=0)
    save_model(model, tmp_path / "tied")
    sources = [(str(tmp_path / "tied"), "int8"), (str(tmp_path / "tied"), "int4")]
    if importlib.util.find_spec("gguf") is not None:
        from mixlab.checkpoint.gguf import write_gguf

        untied = _tiny_moe()
        sources += [(str(write_gguf(untied, tmp_path / "q4_0.gguf", quant="q4_0")), "int4"),
                    (str(write_gguf(untied, tmp_path / "f32.gguf", quant="f32")), "int8")]
    run_group(_job, [{"kind": "at_load", "sources": sources, "prompt": [1, 415, 2936, 9060],
                      "out": str(tmp_path / "out")}])
    tokens = json.loads((tmp_path / "out").read_text())
    assert len(tokens) == len(sources)
    for key, (got, want) in tokens.items():
        assert got == want and len(got) == 8, key


@pytest.mark.slow  # 2 processes: ~20 s on 2 busy cores
def test_ep_int4_activations_in_either_mode_give_one_process_s_tokens_and_logprobs(tmp_path: Path) -> None:
    """`generate --ep` refused `--int4-activations int8` and set every process's model to "float32"
    (PyTorch's pass did not round activations then); it rounds them now, as the native steps do, so
    an --ep 2 int4 run keeps the model's mode, "int8" by default: its greedy tokens are one
    process's (`generate --quant int4 [--int4-activations MODE]`, native decoding where the kernels
    are) and its logprobs too, within int4's tolerance (1e-4: the rows' sums run in another order),
    in both modes, whose logprobs differ by more; `generate --ep 2 --int4-activations int8` prints
    one process's text."""
    from mixlab import generate, load_tokenizer

    save_model(_tiny_moe(), tmp_path / "model")
    src = str(tmp_path / "model")
    tok = load_tokenizer()
    prompt = tok.encode("The quick brown fox jumps over the lazy dog, and then")
    modes = [None, "int8", "float32"]
    run_group(_job, [{"kind": "acts", "src": src, "prompt": prompt, "modes": modes, "out": str(tmp_path / "out"),
                      "text": str(tmp_path / "text")}])
    got = json.loads((tmp_path / "out").read_text())
    one = {acts: _greedy(_one_process_quantised(src, "int4", acts, decoder=True), tok, prompt) for acts in modes}
    for acts in modes:
        (ids, lps), (want_ids, want_lps) = got[str(acts)], one[acts]
        assert ids == want_ids, acts
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(want_lps), atol=1e-4, rtol=1e-4, msg=str(acts))
    assert max(abs(a - b) for a, b in zip(one["int8"][1], one["float32"][1], strict=True)) > 1e-3
    hello = tok.encode("Bonjour, le monde")
    ids = [i for i in generate(_one_process_quantised(src, "int4", "int8", decoder=True), [hello],
                               max_new_tokens=8)[0] if i != tok.eos_id]
    assert len(ids) > 1 and (tmp_path / "text").read_text() == tok.decode(hello + ids)[len(tok.decode(hello)):] + "\n"


@pytest.mark.slow  # 2 processes: ~20 s on 2 busy cores
def test_each_process_reads_the_experts_the_whole_load_gave_it(tmp_path: Path) -> None:
    """Sources: transformers' own save_pretrained of a random MixtralConfig (fused experts, float32
    and bfloat16; tied embeddings), mixlab's per-expert transformers names (bfloat16) and the Mistral
    format (rotary q / k rows); each read as stored, in float32 and in bfloat16."""
    from transformers import MixtralForCausalLM

    shape = dict(vocab_size=67, hidden_size=24, intermediate_size=20, num_attention_heads=3, num_key_value_heads=1,
                 head_dim=8)
    sources = [hf_mixtral(tmp_path / "transformers", **shape)]
    MixtralForCausalLM.from_pretrained(sources[0], dtype=torch.bfloat16).save_pretrained(tmp_path / "transformers-bf16")
    sources.append(tmp_path / "transformers-bf16")
    sources.append(hf_mixtral(tmp_path / "tied", **shape, tie_word_embeddings=True))
    model = load_model(sources[0])
    save_model(model, tmp_path / "per-expert", fmt="hf", dtype="bfloat16")
    save_model(model, tmp_path / "mistral", fmt="mistral")
    sources += [tmp_path / "per-expert", tmp_path / "mistral"]
    assert json.loads((sources[1] / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_model(sources[2]).config.tie_embeddings
    run_group(_job, [{"kind": "compare", "sources": [(str(s), None, (None, "float32", "bfloat16")) for s in sources]}])


def _tiny_moe() -> Any:
    """A random tiny MoE model with Mixtral's vocabulary (write_gguf's tokenizer) and no sliding window
    (llama.cpp's `llama` architecture has none)."""
    from mixlab.config import get_preset
    from mixlab.model import Transformer

    model = Transformer(get_preset("tiny-moe").replace(vocab_size=32000, sliding_window=None))
    model.init_weights(std=0.1, seed=0)
    return model


def _adapter(model: Any, path: Path, layout: str) -> Path:
    """A PEFT adapter over `model` (attention, experts, router; random B: its update is not zero), its
    experts as PEFT writes them for transformers < 5 ("modules": one matrix per expert) or >= 5
    ("fused": factors stacked over the experts)."""
    from mixlab.train.lora import LoraConfig, apply_lora, save_peft

    m = apply_lora(copy.deepcopy(model), LoraConfig(rank=4, alpha=8, targets=("attention", "experts", "router")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_peft(m, path, expert_layout=layout)
    return path


def _f32_gguf(model: Any, path: Path, *, parts: bool = False, edit: Any = lambda name, t: t) -> None:
    """`model` as an F32 GGUF file written tensor by tensor (`edit(name, tensor)`: the tensor written, or
    None for none), with `parts` split in parts of 8 tensors (gguf-py's own splitting, as llama.cpp's
    converter runs it: PATH-0000K-of-0000N.gguf)."""
    from mixlab.checkpoint.gguf import _tensors, gguf_writer

    w = gguf_writer(model.config, name="x", file_type=0)
    w.split_max_tensors = 8 if parts else 0
    for n, t, _ in _tensors(model, model.config):
        if (t := edit(n, t)) is not None:
            w.add_tensor(n, t.detach().float().contiguous().numpy())
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.slow  # 2 processes: ~15-25 s on 2 busy cores
def test_each_process_reads_its_experts_of_a_gguf_file_and_merges_an_adapter_into_them(tmp_path: Path) -> None:
    """GGUF files (F32, BF16, Q4_0 dequantised, split in parts) and PEFT adapters (fused and per-expert
    factors; over a folder and a GGUF file): each process's tensors and the logits equal the whole load,
    adapter merged, then split. Both were loaded whole in every process, then split."""
    pytest.importorskip("gguf")
    from mixlab.checkpoint.gguf import write_gguf

    model = _tiny_moe()
    save_model(model, tmp_path / "base")
    ggufs = {q: str(write_gguf(model, tmp_path / f"{q}.gguf", quant=q)) for q in ("f32", "bf16", "q4_0")}
    _f32_gguf(model, tmp_path / "m.gguf", parts=True)
    split = next(tmp_path.glob("m-00001-of-*.gguf"))
    fused, modules = (str(_adapter(model, tmp_path / f"adapter-{k}", k)) for k in ("fused", "modules"))
    assert not torch.equal(load_model(tmp_path / "base", adapter=fused).layers[0].ffn.experts.w13,
                           model.layers[0].ffn.experts.w13)  # the adapter changes the experts
    sources = [(ggufs["f32"], None, (None, "bfloat16")), (ggufs["bf16"], None, (None, "float32")),
               (ggufs["q4_0"], None, (None, "bfloat16")), (str(split), None, (None,)),
               (str(tmp_path / "base"), fused, (None, "bfloat16")), (str(tmp_path / "base"), modules, (None,)),
               (ggufs["bf16"], fused, (None,))]
    run_group(_job, [{"kind": "compare", "sources": sources}])


@pytest.mark.parametrize("quant", ["f32", "q4_0"])
def test_a_process_reads_only_its_experts_bytes_of_a_gguf_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                quant: str) -> None:
    """Both ranks' shares in one process (a layout of 2 without a process group): each reads every
    dense tensor whole and half of each stacked expert tensor's bytes, once (F32 straight into its
    tensors, Q4_0 kept int4 as `load_gguf` keeps it, or dequantised); together they are the whole
    load's tensors (int4: its codes and scales, bit for bit)."""
    from types import SimpleNamespace

    pytest.importorskip("gguf")
    from mixlab.checkpoint import gguf_read
    from mixlab.checkpoint.gguf import write_gguf
    from mixlab.parallel.expert import load_expert_parallel

    path = write_gguf(_tiny_moe(), tmp_path / "m.gguf", quant=quant)
    tensors = gguf_read.read_header(path).tensors
    raw = gguf_read._Reader.raw
    read: dict[str, int] = {}

    def count(self: Any, t: Any, out: Any = None) -> Any:
        read[t.name] = read.get(t.name, 0) + t.nbytes
        return raw(self, t, out)

    monkeypatch.setattr(gguf_read._Reader, "raw", count)
    for keep_int4 in (True, False) if quant == "q4_0" else (True,):
        whole = gguf_read.load_gguf(path, keep_int4=keep_int4)
        shares = []
        for rank in range(2):
            read.clear()
            layout: Any = SimpleNamespace(rank=rank, world=2, is_main=rank == 0, ep=2, ep_rank=rank, fsdp=False)
            shares.append(load_expert_parallel(path, layout, keep_int4=keep_int4))
            assert read == {n: t.nbytes // 2 if "_exps." in n else t.nbytes for n, t in tensors.items()}, rank
        tensors_of = [dict(m.named_buffers()) | dict(m.named_parameters()) for m in (whole, *shares)]
        assert tensors_of[1].keys() == tensors_of[0].keys() == tensors_of[2].keys()
        assert any(t.dtype == torch.uint8 for t in tensors_of[1].values()) == (quant == "q4_0" and keep_int4)
        for name, t in tensors_of[0].items():
            parts = [share[name] for share in tensors_of[1:]]
            assert torch.equal(torch.cat(parts) if ".experts." in name else parts[0], t), (keep_int4, name)


@pytest.mark.parametrize("fault", ["missing", "shape"])
def test_a_bad_gguf_file_is_one_line_naming_the_file_and_tensor(tmp_path: Path, fault: str) -> None:
    """A GGUF file without an expert tensor, or with one of another shape, is refused under --ep as it
    is when loaded whole (`_plan`'s checks, before any tensor is read): one line naming the file and
    the tensor."""
    from types import SimpleNamespace

    pytest.importorskip("gguf")
    from mixlab.checkpoint import CheckpointError
    from mixlab.parallel.expert import load_expert_parallel

    def edit(name: str, t: torch.Tensor) -> torch.Tensor | None:
        if name != "blk.1.ffn_down_exps.weight":
            return t
        return None if fault == "missing" else t[:-1]  # one expert short

    path = tmp_path / "bad.gguf"
    _f32_gguf(_tiny_moe(), path, edit=edit)
    layout: Any = SimpleNamespace(rank=0, world=2, is_main=True, ep=2, ep_rank=0, fsdp=False)
    want = "missing tensor 'blk.1.ffn_down_exps.weight'" if fault == "missing" else \
        r"tensor 'blk.1.ffn_down_exps.weight' has shape \[3, 64, 128\] \(torch order\), expected \[4, 64, 128\]"
    for load in (lambda: load_model(path), lambda: load_expert_parallel(path, layout)):
        with pytest.raises(CheckpointError, match=f"^{path}: {want}") as e:
            load()
        assert "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="resets and reads the peak memory in /proc")
@pytest.mark.parametrize("source", ["folder", "gguf", "adapter"])
def test_no_process_loads_the_whole_checkpoint(tmp_path: Path, source: str) -> None:
    """`generate --ep 2`'s load on a ~140 MB model whose experts are most of it (a folder, an F32 GGUF
    file, a folder with a PEFT adapter): each process reads its half of the experts; every process used
    to load the whole checkpoint (always for a GGUF file or with an adapter), then keep its share."""
    from mixlab.config import MoEConfig, get_preset
    from mixlab.model import Transformer

    cfg = get_preset("tiny-moe").replace(vocab_size=32000, dim=256, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=64,
                                         ffn_dim=512, tie_embeddings=True, sliding_window=None,
                                         moe=MoEConfig(num_experts=8, top_k=2))
    model = Transformer(cfg)
    model.init_weights(seed=0)
    job = {"kind": "memory", "model": str(tmp_path / "model"), "report": str(tmp_path / "mem")}
    if source == "gguf":
        pytest.importorskip("gguf")
        from mixlab.checkpoint.gguf import write_gguf

        job["model"] = str(write_gguf(model, tmp_path / "model.gguf", quant="f32"))
    else:
        save_model(model, tmp_path / "model")
    if source == "adapter":
        job["adapter"] = str(_adapter(model, tmp_path / "adapter", "fused"))
    del model
    run_group(_job, [job])
    for rank in range(2):
        got = json.loads((tmp_path / f"mem.{rank}.json").read_text())
        assert got["local"] < 0.7 * got["model"], got  # half the experts + the dense weights (tied embeddings)
        # this process's tensors (0.64 of the model) + slack for the allocator; grew 0.71 here (a folder), 0.85
        # (GGUF: + a header's 16 MB first read, twice: the model's, the tokenizer's), 0.73-0.75 (an adapter: + its
        # merge's float32 temporaries, one expert's). The old code loaded the whole model, then kept its share
        # (1.03, GGUF 1.16, adapter 1.44): each bound sits between, away from both
        assert got["grown"] < (1.0 if source == "gguf" else 0.875) * got["model"], (rank, got)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
def test_each_rank_s_share_on_its_device(tmp_path: Path, device: str) -> None:
    """Both ranks' shares in one process (a layout of 2 without a process group: reading needs none):
    a float32 checkpoint read as bfloat16 on `device` equals `load_model` there, then split, bit for
    bit, and the two shares together are the whole model's experts."""
    from types import SimpleNamespace

    from mixlab.parallel.expert import apply_expert_parallel, load_expert_parallel

    src = hf_mixtral(tmp_path / "transformers", num_local_experts=4)
    whole = load_model(src, dtype="bfloat16", device=device)
    shares = []
    for rank in range(2):
        layout: Any = SimpleNamespace(rank=rank, world=2, is_main=rank == 0, ep=2, ep_rank=rank, fsdp=False)
        want = load_model(src, dtype="bfloat16", device=device)
        apply_expert_parallel(want, layout)
        got = load_expert_parallel(src, layout, dtype="bfloat16", device=device)
        params = dict(want.named_parameters())
        for name, p in got.named_parameters():
            assert p.device.type == device and p.dtype == torch.bfloat16 and torch.equal(p, params[name]), name
        shares.append(got)
    for name, p in whole.named_parameters():
        parts = [dict(s.named_parameters())[name] for s in shares]
        assert torch.equal(torch.cat(parts) if ".experts." in name else parts[0], p), name
    assert shares[0].layers[0].ffn.experts.w13.shape[0] == 2


def test_an_adapter_merged_into_a_share_of_other_experts_is_refused(tmp_path: Path) -> None:
    """`merge_adapter(experts=)` names the weight whose experts are not the share given, before any
    weight changes."""
    from mixlab.checkpoint import merge_adapter

    model = _tiny_moe()
    before = {n: p.clone() for n, p in model.named_parameters()}
    adapter = _adapter(model, tmp_path / "adapter", "fused")
    with pytest.raises(ValueError, match=r"experts=range\(0, 2\): the model's layers.0.ffn.experts.w2 holds 4 "
                                         r"experts; expected 2"):
        merge_adapter(model, adapter, experts=range(0, 2))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    merge_adapter(model, adapter, experts=range(0, 4))  # all of them: the whole merge
    assert not torch.equal(model.layers[0].ffn.experts.w13, before["layers.0.ffn.experts.w13"])


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-memory", "1GB"], "--max-memory (expert offloading) does not combine with --ep"),
])
def test_a_flag_ep_does_not_take_is_one_line_naming_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str], flags: list[str],
                                                         message: str) -> None:
    """Rank 0 of `torchrun --nproc-per-node 2 ... generate --ep 2` with a flag --ep does not take:
    exit 2 and one line naming both flags, before any process group or weight (--quant is taken)."""
    from mixlab.cli import main

    save_model(_tiny_moe(), tmp_path / "model")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code = main(["generate", "--model", str(tmp_path / "model"), "--prompt", "Bonjour", "--ep", "2", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err == f"mixlab generate: error: {message}\n", err


def test_ep_1_quantised_prints_one_process_s_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`generate --ep 1 --quant int4` (a world of one, no torchrun) loads as one process does and
    quantises the same way; its int4 products round activations to int8 (the default mode), as the
    engine's native decoding of it does."""
    from mixlab import generate, load_tokenizer
    from mixlab.cli import main

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # init sets them for a world of one
        monkeypatch.delenv(key, raising=False)
    save_model(_tiny_moe(), tmp_path / "model")
    src = str(tmp_path / "model")
    assert main(["generate", "--model", src, "--prompt", "Bonjour, le monde", "--max-new-tokens", "8", "--dtype",
                 "float32", "--ep", "1", "--quant", "int4"]) == 0
    tok = load_tokenizer()
    prompt = tok.encode("Bonjour, le monde")
    ids = [i for i in generate(_one_process_quantised(src, "int4"), [prompt], max_new_tokens=8)[0] if i != tok.eos_id]
    assert len(ids) > 1 and capsys.readouterr().out == tok.decode(prompt + ids)[len(tok.decode(prompt)):] + "\n"


def test_an_adapter_over_a_q4_0_share_is_refused_as_over_one_process_s_model(tmp_path: Path) -> None:
    """A Q4_0 GGUF file's experts stay int4 under --ep, as in one process, where an adapter (which
    merges into float weights) is refused: the same one line, naming the adapter and what to load."""
    from types import SimpleNamespace

    pytest.importorskip("gguf")
    from mixlab.checkpoint import CheckpointError
    from mixlab.checkpoint.gguf import write_gguf
    from mixlab.parallel.expert import load_expert_parallel

    model = _tiny_moe()
    path = write_gguf(model, tmp_path / "m.gguf", quant="q4_0")
    adapter = _adapter(model, tmp_path / "adapter", "fused")
    layout: Any = SimpleNamespace(rank=0, world=2, is_main=True, ep=2, ep_rank=0, fsdp=False)
    with pytest.raises(CheckpointError) as whole:
        load_model(path, adapter=adapter)
    with pytest.raises(CheckpointError) as share:
        load_expert_parallel(path, layout, adapter=adapter)
    assert str(share.value) == str(whole.value), (share.value, whole.value)
    assert str(share.value).startswith(f"{adapter}: the model's weights are int4") and "\n" not in str(share.value)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantising_a_share_frees_its_float_experts_at_once(quant: str) -> None:
    """`apply_expert_parallel` wrapped each `Experts.forward` in a partial holding the module: a
    reference cycle, so the float experts `prepare_for_inference(quant=)` replaced stayed alive until
    a gc pass (a process of Mixtral 8x7B at --ep 2 then held its bf16 experts, 45 GB, beside the
    quantised ones). Its zero for a rank without rows is a forward hook now; with gc off, every
    layer's float experts are gone once the layer is converted, and a rank without rows still keeps
    the weights in the graph."""
    import gc
    import weakref
    from types import SimpleNamespace

    from mixlab.model.inference import prepare_for_inference
    from mixlab.parallel.expert import apply_expert_parallel

    model = _tiny_moe()
    layout: Any = SimpleNamespace(ep=2, ep_rank=0)
    apply_expert_parallel(model, layout)
    experts = model.layers[0].ffn.experts
    ys = experts(torch.zeros(0, model.config.dim), [0, 0])
    ys.sum().backward()  # the zero: the weights get a gradient (zeros), not none
    assert experts.w13.grad is not None and not experts.w13.grad.any()
    refs = [weakref.ref(b.ffn.experts.w13) for b in model.layers]
    del experts, ys
    gc.disable()
    try:
        prepare_for_inference(model, quant=quant, decoder=False)
        assert all(r() is None for r in refs)
    finally:
        gc.enable()
