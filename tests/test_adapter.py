"""PEFT LoRA adapters merged into a loaded model (checkpoint/adapter.py, `load_model(adapter=)`,
`--adapter`): adapters PEFT itself made give PEFT's logits, mixlab's own exports load back onto their
base, and what cannot be merged is refused naming the file, tensor or field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixlab import generate, load_model, save_model
from mixlab.checkpoint import CheckpointError, merge_adapter
from mixlab.config import ModelConfig, MoEConfig, get_preset
from mixlab.model import Transformer
from mixlab.train.lora import LoraConfig, apply_lora, merge, save_peft

CFG = ModelConfig(vocab_size=128, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=48,
                  max_seq_len=128, rope_theta=1e4, moe=MoEConfig(num_experts=4, top_k=2))
X = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS_ROUTER = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]


def _hf_base(tmp_path: Path, dense: bool = False) -> Any:
    """A transformers Mixtral (or Mistral) of random weights, saved as tmp_path/base."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, max_position_embeddings=128)
    torch.manual_seed(0)
    if dense:
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(**kw))
    else:
        hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**kw, num_local_experts=4,
                                                                        num_experts_per_tok=2))
    hf.save_pretrained(tmp_path / "base")
    return hf.eval()


def _peft(hf: Any, path: Path, **kw: Any) -> Any:
    """PEFT's LoRA over `hf` with random (non-zero) B, saved to `path` with save_pretrained."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(1)
    pm = get_peft_model(hf, PeftLoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw)).eval()
    pm.save_pretrained(path)
    return pm


def _check_equals_peft(tmp_path: Path, pm: Any) -> None:
    got = load_model(tmp_path / "base", adapter=tmp_path / "adapter")(X)
    with torch.no_grad():
        torch.testing.assert_close(got, pm(input_ids=X).logits, rtol=0, atol=1e-5)
        plain = load_model(tmp_path / "base")(X)
        assert (got - plain).abs().max() > 1e-2  # the adapter did something
        torch.testing.assert_close(got, pm.merge_and_unload()(input_ids=X).logits, rtol=0, atol=1e-5)


@torch.no_grad()
def test_a_peft_mixtral_adapter_gives_peft_logits(tmp_path: Path) -> None:
    """Attention modules, the fused experts and the router as PEFT target_parameters (transformers >= 5)."""
    pm = _peft(_hf_base(tmp_path), tmp_path / "adapter", target_modules=ATTN, target_parameters=EXPERTS_ROUTER)
    _check_equals_peft(tmp_path, pm)


@torch.no_grad()
def test_a_peft_mistral_adapter_gives_peft_logits(tmp_path: Path) -> None:
    pm = _peft(_hf_base(tmp_path, dense=True), tmp_path / "adapter",
               target_modules=[*ATTN, "gate_proj", "up_proj", "down_proj"])
    _check_equals_peft(tmp_path, pm)


@torch.no_grad()
def test_rslora_and_per_module_rank_and_alpha(tmp_path: Path) -> None:
    """use_rslora scales by alpha / sqrt(r); rank_pattern / alpha_pattern give modules their own r and
    alpha, matched by the end of the name as PEFT matches them."""
    hf = _hf_base(tmp_path)
    pm = _peft(hf, tmp_path / "adapter", target_modules=ATTN, target_parameters=EXPERTS_ROUTER, use_rslora=True)
    _check_equals_peft(tmp_path, pm)
    hf = _hf_base(tmp_path)
    pm = _peft(hf, tmp_path / "adapter", target_modules=ATTN, target_parameters=EXPERTS_ROUTER,
               rank_pattern={"q_proj": 2, "layers.1.mlp.experts.down_proj": 3},
               alpha_pattern={"o_proj": 5, "layers.0.mlp.gate.weight": 3})
    shapes = {k: v.shape for k, v in load_file(tmp_path / "adapter" / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (2, 32)
    assert shapes["base_model.model.model.layers.1.mlp.experts.lora_A.weight"] == (4 * 3, 48)
    _check_equals_peft(tmp_path, pm)


@pytest.mark.parametrize("layout", ["fused", "modules", "dense"])
@torch.no_grad()
def test_mixlabs_own_adapter_loads_back_onto_its_base(tmp_path: Path, layout: str) -> None:
    """save_peft's adapter (a fine-tuning run's RUN/adapter; "modules": transformers < 5's
    block_sparse_moe.experts.N.w1 names) merged onto the base equals the merged model (RUN/hf)."""
    cfg = CFG.replace(moe=None) if layout == "dense" else CFG
    base = Transformer(cfg)
    base.init_weights(std=0.1, seed=0)
    save_model(base, tmp_path / "base")
    targets = ("attention", "experts") if layout == "dense" else ("attention", "experts", "router")
    m = apply_lora(base, LoraConfig(rank=4, alpha=8, targets=targets))
    g = torch.Generator().manual_seed(0)
    for n, p in m.named_parameters():
        if n.endswith("lora_B"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_peft(m, tmp_path / "adapter", expert_layout="modules" if layout == "modules" else "fused")
    save_model(merge(m), tmp_path / "hf")
    got = load_model(tmp_path / "base", adapter=tmp_path / "adapter")
    want = load_model(tmp_path / "hf")
    for (k, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=k)


def test_adapters_outside_the_experts_export_without_transformers(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the MoE layers' PEFT names depend on the installed transformers: a dense model's adapters
    (or attention alone) were not exported without it (save_peft asked for it first)."""
    from mixlab.train import lora

    def no_transformers() -> str:
        raise ImportError("no transformers")

    monkeypatch.setattr(lora, "hf_expert_layout", no_transformers)
    for cfg, targets in ((CFG.replace(moe=None), ("attention", "experts")), (CFG, ("attention",))):
        save_peft(apply_lora(Transformer(cfg), LoraConfig(rank=2, targets=targets)), tmp_path / "a")
        assert "q_proj" in json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
    with pytest.raises(ImportError, match="no transformers"):  # the experts' names: its version's
        save_peft(apply_lora(Transformer(CFG), LoraConfig(rank=2, targets=("experts",))), tmp_path / "b")


def test_a_lora_model_is_saved_merged_not_as_it_is(tmp_path: Path) -> None:
    """save_model, to_state_dict and write_gguf of a model holding adapters (its weights parametrised)
    were a bare KeyError 'layers.0.attn.wqkv.weight'; they say to merge, and write nothing."""
    from mixlab import to_state_dict
    from mixlab.checkpoint.gguf import write_gguf

    m = apply_lora(Transformer(CFG), LoraConfig(rank=2))
    match = r"a model holding LoRA adapters \(layers.0.attn.wqkv.lora_A\): merge them first"
    for write in (lambda: save_model(m, tmp_path / "out"), lambda: to_state_dict(m),
                  lambda: write_gguf(m, tmp_path / "out.gguf", quant="f32")):
        with pytest.raises(ValueError, match=match):
            write()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    """mixlab's base checkpoint (tmp_path/base) and a PEFT adapter for it (tmp_path/adapter)."""
    base = Transformer(CFG)
    base.init_weights(std=0.1, seed=0)
    save_model(base, tmp_path / "base")
    m = apply_lora(base, LoraConfig(rank=4, alpha=8, targets=("attention", "experts", "router")))
    save_peft(m, tmp_path / "adapter", expert_layout="fused")
    return tmp_path / "adapter"


def _edit_config(path: Path, **kw: Any) -> None:
    conf = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**conf, **kw}))


def _edit_tensors(path: Path, fn: Any) -> None:
    f = path / "adapter_model.safetensors"
    save_file(fn(load_file(f)), f)


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
REFUSALS: list[tuple[str, Any, str]] = [
    ("peft_type", lambda p: _edit_config(p, peft_type="IA3"), r"peft_type is 'IA3'; mixlab merges LoRA"),
    ("dora", lambda p: _edit_config(p, use_dora=True), r"use_dora is true: DoRA adapters .* are not supported"),
    ("bias", lambda p: _edit_config(p, bias="all"), r"bias is 'all': adapters that train biases"),
    ("lora_bias", lambda p: _edit_config(p, lora_bias=True), r"lora_bias is true: a bias on lora_B is not supported"),
    ("layer_replication", lambda p: _edit_config(p, layer_replication=[[0, 2], [1, 2]]),
     r"layer_replication is \[\[0, 2\], \[1, 2\]\]: adapters over duplicated layers"),
    ("modules_to_save", lambda p: _edit_config(p, modules_to_save=["lm_head"]), r"modules_to_save is \['lm_head'\]"),
    ("embedding", lambda p: _edit_config(p, target_modules=["q_proj", "embed_tokens"]),
     r"adapts embed_tokens: LoRA on the embedding or lm_head is not supported"),
    ("alpha", lambda p: _edit_config(p, lora_alpha="16"), r"field 'lora_alpha' is '16'; expected a finite positive "
                                                          r"number"),
    ("infinite alpha", lambda p: _edit_config(p, lora_alpha=float("inf")),  # merged weights of inf and NaN
     r"field 'lora_alpha' is inf; expected a finite positive number"),
    ("pissa", lambda p: _edit_config(p, init_lora_weights="pissa_niter_4"),  # merged as if over the original base
     r"init_lora_weights is 'pissa_niter_4': that initialisation changes the base weights .* "
     r"path_initial_model_for_weight_conversion"),
    ("alora", lambda p: _edit_config(p, alora_invocation_tokens=[5, 6]),
     r"alora_invocation_tokens is \[5, 6\]: activated LoRA \(aLoRA\) adapts only the tokens after"),
    ("integer factor", lambda p: _edit_tensors(p, lambda t: {**t, Q_A: t[Q_A].to(torch.int32)}),  # merged as floats
     rf"tensor '{Q_A}' has dtype I32, expected a floating-point dtype"),
    ("rank", lambda p: _edit_config(p, r=8), r"'base_model.model.model.layers.0.mlp.experts.lora_A.weight' has rank "
                                             r"4, but adapter_config.json gives model.layers.0.mlp.experts.down_proj "
                                             r"r=8 \(r\)"),
    ("rank_pattern", lambda p: _edit_config(p, rank_pattern={"q_proj": 2}), r"gives .*q_proj r=2 \(rank_pattern\)"),
    ("bad pattern", lambda p: _edit_config(p, alpha_pattern={"q_proj(": 2}),  # was re.error, deep down
     r"field 'alpha_pattern': key 'q_proj\(' is not a valid regular expression"),
    ("embedding tensor", lambda p: _edit_tensors(p, lambda t: {
        **t, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 128)}),
     r"unexpected tensor 'base_model.model.model.embed_tokens.lora_embedding_A': an embedding adapter"),
    ("trainable tokens", lambda p: _edit_tensors(p, lambda t: {  # as PEFT's trainable_token_indices saves them
        **t, "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": torch.zeros(2, 32)}),
     r"'base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta': trainable token embeddings "
     r"\(PEFT's trainable_token_indices\): not supported; merge it with PEFT"),
    ("saved embeddings", lambda p: _edit_tensors(p, lambda t: {  # save_pretrained(save_embedding_layers=True)
        **t, "base_model.model.lm_head.weight": torch.zeros(130, 32)}),
     r"'base_model.model.lm_head.weight': a whole embedding or lm_head matrix \(PEFT's save_embedding_layers"),
    ("lone A", lambda p: _edit_tensors(p, lambda t: {k: v for k, v in t.items() if "q_proj.lora_B" not in k}),
     r"'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has no lora_B partner"),
    ("shape", lambda p: _edit_tensors(p, lambda t: {**t, Q_A: torch.zeros(4, 64)}),
     rf"'{Q_A}' \[4, 64\] and .* do not fit model.layers.0.self_attn.q_proj.weight \[32, 32\]: lora_A \[r, 32\]"),
    ("another layer", lambda p: _edit_tensors(p, lambda t: {k.replace("layers.1.", "layers.7."): v
                                                            for k, v in t.items()}),
     r"adapts 'model.layers.7.mlp.experts', which is not a weight of this model \(a Mixtral model of 2 layers"),
    ("norm", lambda p: _edit_tensors(p, lambda t: {  # was a bare "not enough values to unpack"
        **t, **{f"base_model.model.model.layers.0.input_layernorm.lora_{x}.weight": torch.zeros(s) for x, s in
                (("A", (4, 32)), ("B", (32, 4)))}}),
     r"adapts 'model.layers.0.input_layernorm', which LoRA cannot adapt here: expected attention"),
    ("empty", lambda p: _edit_tensors(p, lambda t: {}), r"holds no LoRA tensors"),
    ("pickle", lambda p: (p / "adapter_model.safetensors").rename(p / "adapter_model.bin"),
     r"adapter_model.bin: pickle checkpoints are never unpickled .* save_pretrained"),
    ("deep config", lambda p: (p / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000),  # a RecursionError
     r"adapter_config.json: JSON nested too deeply"),
    ("no config", lambda p: (p / "adapter_config.json").unlink(), r"not a PEFT adapter folder \(no adapter_config"),
]


def test_a_pickled_adapter_file_is_refused_in_any_case(tmp_path: Path) -> None:
    """A pickled adapter file given itself (--adapter x/adapter_model.BIN) is never unpickled: the
    suffix is read in any case, as load_model reads it (its capitals were 'not a PEFT adapter folder')."""
    from mixlab.checkpoint.adapter import read_adapter

    for name in ("adapter_model.bin", "adapter_model.BIN"):
        (f := tmp_path / name).write_bytes(b"\x80\x02")
        with pytest.raises(CheckpointError, match=rf"{name}: pickle checkpoints are never unpickled"):
            read_adapter(f)


def test_load_model_reads_the_adapters_files_once(adapter: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_model(adapter=) checked the adapter before loading and merge_adapter read it again: its
    config and safetensors header were read twice."""
    from mixlab.checkpoint import adapter as module

    reads: list[Path] = []
    read_header = module.read_header
    monkeypatch.setattr(module, "read_header", lambda f: reads.append(f) or read_header(f))
    load_model(adapter.parent / "base", adapter=adapter)
    assert reads == [adapter / "adapter_model.safetensors"]


@pytest.mark.parametrize(("edit", "match"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_what_cannot_be_merged_is_refused_by_name(adapter: Path, edit: Any, match: str) -> None:
    early = not any(s in match for s in ("rank", "do not fit", "not a weight", "cannot adapt"))
    edit(adapter)
    model = load_model(adapter.parent / "base")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=match):
        merge_adapter(model, adapter)
    for k, v in model.state_dict().items():  # nothing half-merged
        assert torch.equal(v, before[k]), k
    if early:  # what needs no model is told before the model loads
        with pytest.raises(CheckpointError, match=match):
            load_model(adapter.parent / "no-such-base", adapter=adapter)


def test_nan_factors_warn_as_nan_weights_do(adapter: Path) -> None:
    """A NaN in an adapter merged in silence (a checkpoint's own NaN weights are warned about)."""
    _edit_tensors(adapter, lambda t: {**t, Q_A: t[Q_A] * float("nan")})
    with pytest.warns(UserWarning, match=rf"adapter_model.safetensors: tensor '{Q_A}' or .* holds NaN or Inf values"):
        load_model(adapter.parent / "base", adapter=adapter)


def test_an_adapter_for_another_architecture_is_refused(adapter: Path, tmp_path: Path) -> None:
    """A Mixtral adapter on a dense model names the weight it adapts and what the model is."""
    _edit_config(adapter, base_model_name_or_path="mistralai/Mixtral-8x7B-v0.1")
    dense = Transformer(CFG.replace(moe=None))
    dense.init_weights(std=0.1, seed=0)
    with pytest.raises(CheckpointError, match=r"adapts 'model.layers.0.mlp.experts', which is not a weight of this "
                       r"model \(a dense Mistral model of 2 layers, dim 32\) \(the adapter was made for "
                       r"mistralai/Mixtral-8x7B-v0.1\)"):
        merge_adapter(dense, adapter)
    with pytest.raises(CheckpointError, match=r"keeps its adapter in .*run/adapter"):
        (tmp_path / "run").mkdir()
        adapter.rename(tmp_path / "run" / "adapter")
        merge_adapter(dense, tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"no such adapter folder \(a Hugging Face repo id\? .*`hf download "
                       r"someone/mixtral-lora --local-dir DIR`"):  # as a hub adapter's name is given to PEFT
        merge_adapter(dense, "someone/mixtral-lora")
    with pytest.raises(ValueError, match="adapter= does not combine with max_memory"):
        load_model(tmp_path / "base", adapter=tmp_path / "run" / "adapter", max_memory="1GB")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Transformer]:
    """A checkpoint of Mixtral's vocabulary (ROOT/base), a LoRA model over it and its adapter (ROOT/adapter)."""
    root = tmp_path_factory.mktemp("tiny")
    base = Transformer(get_preset("tiny-moe").replace(vocab_size=32000, max_seq_len=128))
    base.init_weights(std=0.3, seed=0)
    save_model(base, root / "base")
    m = apply_lora(base, LoraConfig(rank=4, alpha=8, targets=("attention", "experts", "router")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_peft(m, root / "adapter")
    return root, m


def test_generate_with_an_adapter_merges_it_before_quantising(tiny: tuple[Path, Transformer],
                                                              capsys: pytest.CaptureFixture) -> None:
    from mixlab.cli import main
    from mixlab.model.inference import prepare_for_inference
    from mixlab.tokenizer import load_tokenizer

    tmp_path, m = tiny
    tok = load_tokenizer()
    prompt = tok.encode("Bonjour, le monde")
    for quant in ("none", "int8"):
        assert main(["generate", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                     "--prompt", "Bonjour, le monde", "--max-new-tokens", "8", "--dtype", "float32",
                     "--quant", quant]) == 0
        merged = merge(m) if quant == "none" else prepare_for_inference(merge(m), quant="int8")
        ids = [i for i in generate(merged, [prompt], max_new_tokens=8)[0] if i != tok.eos_id]
        assert capsys.readouterr().out == tok.decode(prompt + ids)[len(tok.decode(prompt)):] + "\n"
    plain = [i for i in generate(load_model(tmp_path / "base"), [prompt], max_new_tokens=8)[0] if i != tok.eos_id]
    assert plain != generate(merge(m), [prompt], max_new_tokens=8)[0][:len(plain)]  # the adapter mattered


def test_a_lora_run_folder_is_its_adapter_wherever_an_adapter_is_given(tiny: tuple[Path, Transformer], tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """`--adapter RUN` of a `mixlab sft --lora-rank` run (the folder it prints as 'run folder:') failed with
    'not a PEFT adapter folder ...; a mixlab fine-tuning run keeps its adapter in RUN/adapter', as --model RUN
    did before it read the run's hf/: the run is read as its adapter/ in generate, chat, serve, eval, convert
    and serve's --lora-modules."""
    import shutil

    from mixlab.cli import build_parser, main

    root, _ = tiny
    run = tmp_path / "run"
    shutil.copytree(root / "adapter", run / "adapter")
    (run / "finetune_config.json").write_text("{}")
    base, parser = str(root / "base"), build_parser()
    for argv in (["generate", "--model", base, "--prompt", "a"], ["chat", "--model", base], ["serve", "--model", base],
                 ["eval", "--model", base, "--data", "d.jsonl"], ["convert", base, str(tmp_path / "out")]):
        assert parser.parse_args([*argv, "--adapter", str(run)]).adapter == str(run / "adapter"), argv[0]
        assert parser.parse_args([*argv, "--adapter", str(root / "adapter")]).adapter == str(root / "adapter")
    args = parser.parse_args(["serve", "--model", base, "--lora-modules", f"sql={run}"])
    assert args.lora_modules == [("sql", str(run / "adapter"))]
    flags = ["--model", base, "--prompt", "Bonjour", "--max-new-tokens", "6", "--dtype", "float32", "--quiet"]
    assert main(["generate", *flags, "--adapter", str(root / "adapter")]) == 0
    merged = capsys.readouterr().out
    assert main(["generate", *flags, "--adapter", str(run)]) == 0
    assert capsys.readouterr().out == merged


def test_generate_ep_of_a_gguf_file_merges_an_adapter_and_warns_of_another_base(tiny: tuple[Path, Transformer],
                                                                                 tmp_path: Path) -> None:
    """`generate --ep` of a GGUF file loads it itself (not through load_model): an adapter over another
    local folder merged silently there; it is warned of, as load_model warns, and the tokens are one
    process's over the merged model. (Two processes forked from tests/processes.py's server, each
    running `mixlab generate`'s main as torchrun's would, not a torchrun launch: 3 fresh interpreters
    importing torch, most of this test's time.)"""
    import shutil

    pytest.importorskip("gguf")
    from mixlab.checkpoint.gguf import write_gguf
    from mixlab.tokenizer import load_tokenizer
    from processes import cli, cli_results, run_group

    root, m = tiny
    write_gguf(load_model(root / "base"), tmp_path / "base.gguf", quant="f32")
    shutil.copytree(root / "adapter", tmp_path / "adapter")
    conf = tmp_path / "adapter" / "adapter_config.json"
    conf.write_text(json.dumps(json.loads(conf.read_text()) | {"base_model_name_or_path": str(root / "base")}))
    argv = ["generate", "--model", str(tmp_path / "base.gguf"), "--adapter", str(tmp_path / "adapter"), "--ep", "2",
            "--prompt", "Bonjour", "--max-new-tokens", "6", "--dtype", "float32", "--threads", "1"]
    run_group(cli, [{"argv": argv, "out": str(tmp_path / "run")}])
    codes, stdout, stderr = cli_results(tmp_path / "run")
    assert codes == [0, 0], stderr[-3000:]
    warned = [ln for ln in stderr.splitlines() if ln.startswith("mixlab generate: warning: ")]
    assert len(warned) == 2 and all(f"the adapter was trained over {root / 'base'}" in ln and
                                    f"not {tmp_path / 'base.gguf'}" in ln for ln in warned), stderr[-3000:]
    tok = load_tokenizer()
    prompt = tok.encode("Bonjour")
    ids = [i for i in generate(merge(m), [prompt], max_new_tokens=6)[0] if i != tok.eos_id]
    assert stdout == tok.decode(prompt + ids)[len(tok.decode(prompt)):] + "\n"


def test_a_quantised_model_is_refused(adapter: Path) -> None:
    """An adapter merges into float weights: a Q4_0 GGUF file's int4 matrices (or a prepared model's) are
    named, with what to load instead."""
    from mixlab.model.inference import prepare_for_inference

    for quant, match in (("int4", r"weights are int4 \(a Q4_0 GGUF file's, or quantised\)"),
                         ("int8", r"prepared for inference \(int8\); merge an adapter into the weights as loaded")):
        with pytest.raises(CheckpointError, match=match):
            merge_adapter(prepare_for_inference(Transformer(get_preset("tiny-moe")).eval(), quant=quant), adapter)


@torch.no_grad()
def test_a_fine_tuning_runs_adapter_on_its_base_equals_its_merged_model(tmp_path: Path) -> None:
    """RUN/adapter of `mixlab sft --lora-rank R` merged onto the checkpoint the run started from gives
    RUN/hf's logits."""
    from mixlab.train.finetune import finetune, load_finetune_config

    base = Transformer(CFG.replace(vocab_size=259, max_seq_len=256))
    base.init_weights(std=0.1, seed=0)
    save_model(base, tmp_path / "base")
    (tmp_path / "base" / "mixlab_data.json").write_text(json.dumps({"tokenizer": {"type": "bytes"}}))
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(12)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with torch.enable_grad():
        finetune(load_finetune_config(None, model=str(tmp_path / "base"), data=str(tmp_path / "chats.jsonl"),
                                      out=str(tmp_path / "run"), seq_len=64, batch_size=2, steps=1, warmup=0, lr=1e-2,
                                      eval_every=0, ckpt_every=0, log_every=1, progress=False, threads=1,
                                      lora_rank=2, lora_targets="attention,experts,router", export_hf=True))
    x = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    got = load_model(tmp_path / "base", adapter=tmp_path / "run" / "adapter")(x)
    torch.testing.assert_close(got, load_model(tmp_path / "run" / "hf")(x), rtol=0, atol=1e-5)
    assert (got - load_model(tmp_path / "base")(x)).abs().max() > 1e-4  # the run trained something


def test_eval_with_an_adapter_records_it_and_keeps_it(tiny: tuple[Path, Transformer], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """eval --adapter A --json A/adapter_config.json overwrote the adapter's config with the report (the
    model's folder is refused as --json); the report's settings did not say an adapter was merged."""
    from mixlab.cli import main

    root, _ = tiny
    (tmp_path / "valid.jsonl").write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n")
    flags = ["eval", "--model", str(root / "base"), "--adapter", str(root / "adapter"), "--data",
             str(tmp_path / "valid.jsonl"), "--dtype", "float32", "--quiet"]
    config = (root / "adapter" / "adapter_config.json").read_text()
    assert main([*flags, "--json", str(root / "adapter" / "adapter_config.json")]) == 1
    assert (root / "adapter" / "adapter_config.json").read_text() == config
    assert main([*flags, "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["adapter"] == str(root / "adapter")
