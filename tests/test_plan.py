"""`mixlab plan`: exact parameter counts from the meta-device model, and the memory arithmetic
checked against published figures for Mixtral 8x7B and against the tensors autograd really saves."""

import math
import re

import pytest
import torch

from mixlab.cli import main
from mixlab.config import PRESETS, get_preset, parse_bytes
from mixlab.model import Transformer
from mixlab.parallel.plan import GB, activation_elements_per_token, count_params, plan

MIXTRAL = get_preset("mixtral-8x7b")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_meta_counts_equal_config_counts(name):
    cfg = get_preset(name)
    ps = count_params(cfg)
    assert ps.total == cfg.param_counts()["total"]
    assert ps.experts + ps.dense == ps.total
    if cfg.moe is None:
        assert ps.experts == 0


def test_mixtral_published_sizes():
    ps = count_params(MIXTRAL)
    # Mistral AI: "46.7B total parameters"; the experts are 96.6% of them.
    assert ps.total == 46_702_792_704
    assert ps.experts == 32 * 8 * 3 * 4096 * 14336
    # "93 GB in bf16" (46.7B x 2 bytes); int8 about half; int4 as llama.cpp's Q4_0
    # (TheBloke/Mixtral-8x7B-v0.1-GGUF: mixtral-8x7b-v0.1.Q4_0.gguf is 26.44 GB).
    w = {q: plan(MIXTRAL, mode="infer", quant=q).memory for q in (None, "int8", "int4")}
    assert w[None]["weights (bfloat16)"] / GB == pytest.approx(93.4, abs=0.05)
    assert 46.7 < w["int8"]["weights (int8)"] / GB < 47.0
    assert w["int4"]["weights (int4)"] / GB == pytest.approx(26.44, rel=0.01)
    # int8's row scales are in --dtype, as prepare_for_inference keeps them (the plan took 4 bytes)
    f32 = plan(MIXTRAL, mode="infer", quant="int8", dtype="float32").memory["weights (int8)"]
    rows = MIXTRAL.n_layers * (MIXTRAL.q_dim + 2 * MIXTRAL.kv_dim + MIXTRAL.dim + 8 * (2 * 14336 + 4096)) + 32000
    assert f32 - w["int8"]["weights (int8)"] == 2 * (ps.embedding + ps.router + ps.norms) + 2 * rows
    # KV cache: 32 layers x 8 KV heads x 128 x (K, V) x 2 bytes = 128 KiB per token; 32k context 4.29 GB.
    p = plan(MIXTRAL, mode="infer", seq=32768)
    assert p.memory["KV cache (bfloat16)"] == 32768 * 131072


def test_loading_peaks_are_planned_and_decide_whether_it_fits():
    """A quantised load holds the quantised weights and one stacked w13 in --dtype, each matrix rounded
    as it is read (`load_model(quant=)`: ~28.3 GB for Mixtral int4, measured 27.3 GB from a bf16 folder,
    BENCHMARKS.md "Loading as int4 or int8"; 48.7 GB in int8, which held every float first: 98 GB); under
    --ep, each process its share and its share of a w13 (`load_expert_parallel(quant=)`). A device
    between the run's total and the load's peak does not fit."""
    w13 = 8 * 2 * 14336 * 4096
    p = plan(MIXTRAL, mode="infer", quant="int4")
    assert p.load_peak == p.memory["weights (int4)"] + 2 * w13 and p.total < p.load_peak < 28.5 * GB
    assert "| peak while loading | 28.34 |" in p.table() and p.as_dict()["load_peak"] == p.load_peak
    assert not plan(MIXTRAL, mode="infer", quant="int4", device_mem=int(28 * GB)).fits  # its total (27.16) would
    assert plan(MIXTRAL, mode="infer", quant="int4", device_mem=int(29 * GB)).fits
    int8 = plan(MIXTRAL, mode="infer", quant="int8", device_mem=int(64 * GB))
    assert int8.load_peak == int8.memory["weights (int8)"] + 2 * w13 and 48.6 * GB < int8.load_peak < 48.8 * GB
    assert int8.fits and "the int8 weights and one weight's bfloat16 (1.88 GB" in int8.notes[-1]
    assert not plan(MIXTRAL, mode="infer", quant="int8", seq=4096, device_mem=int(48 * GB)).fits  # its total would
    for quant in ("int8", "int4"):
        ep = plan(MIXTRAL, mode="infer", quant=quant, devices=2, ep=2)
        assert ep.load_peak == ep.memory[f"weights ({quant})"] + 2 * w13 / 2, quant
        assert "its share of a layer's stacked w13" in ep.notes[-1]
    assert plan(MIXTRAL, mode="infer").load_peak == 0  # plain weights: loading holds what the run holds


def test_mixtral_training_states_are_16_bytes_per_parameter():
    """ZeRO (arXiv 1910.02054 §3.1): mixed-precision Adam holds 16 bytes per parameter; sharded with
    EP=8 and FSDP on 8 devices, the devices together hold exactly that (747 GB), no more."""
    p = plan(MIXTRAL, mode="train", devices=8, ep=8, fsdp=True)
    states = sum(v for k, v in p.memory.items() if k.split(" ")[0] in ("parameters", "gradients", "optimizer"))
    assert states * 8 == pytest.approx(16 * 46_702_792_704)
    assert not p.fits  # 93 GB of states per 80 GB device: full AdamW training needs more than 8 x 80 GB
    # Without FSDP the dense 1.6B are replicated: (1.6B + 45.1B / 8) x 16 bytes per device.
    q = plan(MIXTRAL, mode="train", devices=8, ep=8)
    assert q.memory["optimizer (AdamW, 2 x float32)"] == pytest.approx(8 * (1_605_636_096 + 45_097_156_608 / 8))
    # Two nodes (16 devices, EP=8 x DP=2) with FSDP and activation checkpointing fit.
    r = plan(MIXTRAL, mode="train", devices=16, ep=8, fsdp=True, activation_checkpointing=True)
    assert r.fits and r.total < 60 * GB


def test_all_to_all_bytes():
    # EP=8: every token's 2 copies of a 4096-wide bf16 row, 7/8 leaving the rank, 4 times per layer.
    p = plan(MIXTRAL, mode="train", devices=8, ep=8, seq=4096, batch=8)
    assert p.comm["all-to-all (expert parallel), per step"] == pytest.approx(4 * 32 * 4096 * 2 * 4096 * 2 * 7 / 8)
    assert "all-to-all (expert parallel), per step" not in plan(MIXTRAL, mode="train", devices=8).comm


def test_activation_estimate_matches_saved_tensors():
    """The per-block activation count against what autograd actually saves (tiny model, float32);
    the CPU attention kernel also keeps its T x T probabilities, hence the margin."""

    def saved_bytes(n_layers):
        cfg = get_preset("tiny-moe").replace(n_layers=n_layers)
        model = Transformer(cfg)
        model.init_weights(seed=0)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = {}

        def pack(t):
            if t.is_floating_point() and t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(0)))
        return sum(saved.values())

    per_block = (saved_bytes(3) - saved_bytes(1)) / 2
    est = 4 * 128 * activation_elements_per_token(get_preset("tiny-moe")) * 4
    assert 0.9 < per_block / est < 1.3


def test_bad_layouts_and_sizes():
    assert parse_bytes("80GB", what="--device-mem") == 80 * 10**9 and parse_bytes("80GiB", what="-") == 80 * 2**30
    with pytest.raises(ValueError, match="--device-mem: 'eighty' is not a size"):
        parse_bytes("eighty", what="--device-mem")
    with pytest.raises(ValueError, match=r"--ep must divide --devices \(8\), got 3"):
        plan(MIXTRAL, mode="train", devices=8, ep=3)
    with pytest.raises(ValueError, match="number of experts"):
        plan(MIXTRAL, mode="train", devices=16, ep=16)
    with pytest.raises(ValueError, match="--quant applies"):
        plan(MIXTRAL, mode="train", quant="int8")
    # inference plans neither: the header said "fsdp" over the unsharded figures
    with pytest.raises(ValueError, match="--fsdp applies to --mode train or finetune only"):
        plan(MIXTRAL, mode="infer", devices=2, fsdp=True)
    with pytest.raises(ValueError, match="--activation-checkpointing applies to --mode train or finetune only"):
        plan(MIXTRAL, mode="infer", activation_checkpointing=True)


def test_infer_seq_past_the_context_is_planned_at_the_context():
    """The KV cache was capped at the model's context but the prompt's all-to-all and the header
    used the --seq given."""
    cfg = get_preset("tiny-moe")  # context 512
    p, at = plan(cfg, mode="infer", devices=2, ep=2, seq=4096), plan(cfg, mode="infer", devices=2, ep=2, seq=512)
    assert p.seq == 512 and p.memory == at.memory and p.comm == at.comm
    assert p.notes == ["--seq 4096 is past the model's context: planned at its 512 tokens"] and not at.notes


def test_cli(capsys):
    assert main(["plan", "mixtral-8x7b", "--mode", "train", "--devices", "8", "--ep", "8", "--fsdp",
                 "--device-mem", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "all-to-all" in out and "optimizer" in out
    assert main(["plan", "mixtral-8x7b", "--mode", "infer", "--quant", "int4"]) == 0
    assert "fits" in capsys.readouterr().out
    assert main(["plan", "mixtral-8x7b", "--devices", "8", "--ep", "3"]) == 2  # a flag's value
    assert "--ep" in capsys.readouterr().err


def test_cli_takes_trains_names_for_seq_and_batch(capsys):
    """`mixlab plan ... --seq-len 2048 --batch-size 16`, as the train run it plans is written, was refused."""
    assert main(["plan", "mixtral-8x7b", "--devices", "8", "--seq", "2048", "--batch", "16", "--json"]) == 0
    short = capsys.readouterr().out
    assert main(["plan", "mixtral-8x7b", "--devices", "8", "--seq-len", "2048", "--batch-size", "16", "--json"]) == 0
    assert capsys.readouterr().out == short and '"batch": 16' in short


def test_python_dash_m_mixlab():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mixlab", "plan", "tiny-moe", "--mode", "infer"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "weights (bfloat16)" in r.stdout, r.stderr


def test_does_not_fit_suggests_only_what_the_layout_lacks():
    """With --fsdp --activation-checkpointing on, the note still said to try both."""
    both = plan(MIXTRAL, mode="train", devices=8, ep=8, fsdp=True, activation_checkpointing=True)
    assert not both.fits and both.notes == ["does not fit: try more --devices, a smaller --seq/--batch, or "
                                            "optimizer-state offload (not implemented here)"]
    neither = plan(MIXTRAL, mode="train", devices=8, ep=8)
    assert neither.notes[0].startswith("does not fit: try --fsdp, --activation-checkpointing, more --devices")


def test_train_seq_past_the_context_is_noted():
    """--seq 4096 (the default) on a 512-token model planned a training run that mixlab train refuses."""
    cfg = get_preset("tiny-moe")  # context 512
    assert plan(cfg, mode="train", seq=4096).notes[0] == (
        "--seq 4096 is past the model's context (512 tokens): mixlab train refuses such a seq_len")
    assert not plan(cfg, mode="train", seq=512).notes


def test_a_q4_0_gguf_is_planned_as_int4(tmp_path, capsys):
    """load_model keeps a GGUF's Q4_0 matrices 4-bit: `plan FILE.gguf --mode infer` plans int4 by
    default (it planned bf16 weights, 3.6x the memory), --quant none still plans floats."""
    import json

    pytest.importorskip("gguf")
    from mixlab.checkpoint.gguf import write_gguf

    model = Transformer(get_preset("tiny-moe").replace(vocab_size=32000))
    model.init_weights(seed=0)
    q4, f32 = write_gguf(model, tmp_path / "q4.gguf", quant="q4_0"), write_gguf(model, tmp_path / "f.gguf", quant="f32")
    for path, flags, want in ((q4, [], "int4"), (q4, ["--quant", "none"], None), (f32, [], None)):
        assert main(["plan", str(path), "--mode", "infer", "--json", *flags]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["quant"] == want, (path, flags)
        assert ("mixlab plan: note: planned as int4" in err) == (want == "int4")  # prefixed as every note


TINY = get_preset("tiny-moe")  # D 64, 2 layers, 4 experts of F 128, 4 heads x 16, 2 KV heads, vocab 256


def test_finetune_lora_int4_by_hand():
    """`--mode finetune --lora-rank 4 --lora-targets attention,experts,router --lora-base-dtype int4`
    on tiny-moe, each row computed by hand from the meta model's parameter shapes."""
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Transformer(TINY).named_parameters()}
    wqkv, wo = shapes["layers.0.attn.wqkv.weight"], shapes["layers.0.attn.wo.weight"]  # [128, 64], [64, 64]
    w13, w2 = shapes["layers.0.ffn.experts.w13"], shapes["layers.0.ffn.experts.w2"]  # [4, 256, 64], [4, 64, 128]
    gate = shapes["layers.0.ffn.gate.weight"]  # [4, 64]
    n = {k: math.prod(s) for k, s in (("wqkv", wqkv), ("wo", wo), ("w13", w13), ("w2", w2), ("gate", gate))}
    r, L = 4, 2
    p = plan(TINY, mode="finetune", seq=128, batch=2, dtype="float32", lora_rank=r,
             lora_targets="attention,experts,router", lora_base_dtype="int4")
    m = p.memory
    int4 = n["wqkv"] + n["wo"] + n["w13"] + n["w2"]
    assert m["frozen base, targeted (int4)"] == L * (int4 / 2 + int4 / 32 * 2 + 4 * n["gate"])  # router float32
    assert m["frozen weights, the rest (float32)"] == 4 * (sum(math.prod(s) for s in shapes.values())
                                                            - L * sum(n.values()))
    factors = L * ((r * 64 + 128 * r) + (r * 64 + 64 * r) + 4 * (r * 64 + 256 * r) + 4 * (r * 128 + 64 * r)
                   + (r * 64 + 4 * r))
    assert factors == 19_488
    assert (m["adapters (float32)"], m["adapter gradients (float32)"], m["optimizer (AdamW, 2 x float32)"]) == \
        (4 * factors, 4 * factors, 8 * factors)
    assert m["activations"] == 256 * L * activation_elements_per_token(TINY) * 4
    assert m["logits + gradient (float32)"] == 2 * 256 * 256 * 4
    # every layer's merged expert and router weights (float32) and attention's dequantised base
    assert m["weights kept for backward"] == L * 4 * (n["w13"] + n["w2"] + n["gate"] + n["wqkv"] + n["wo"])
    assert m["transient: the largest expert matrix, twice in float32"] == 2 * 4 * n["w13"]
    assert p.total == sum(m.values()) and p.lora_rank == 4 and p.lora_base_dtype == "int4"
    # with activation checkpointing: one layer's weights and activations, each block's input
    ac = plan(TINY, mode="finetune", seq=128, batch=2, dtype="float32", lora_rank=r,
              lora_targets="attention,experts,router", lora_base_dtype="int4", activation_checkpointing=True).memory
    assert ac["weights kept for backward"] == m["weights kept for backward"] / L
    assert ac["activations"] == 256 * (L * 64 + activation_elements_per_token(TINY)) * 4
    # under bf16 autocast: the bf16 copy of every matrix a block multiplies (not norms, not the float32
    # router) and of the output head; attention's base is then kept only as that copy
    bf = plan(TINY, mode="finetune", seq=128, batch=2, lora_rank=r, lora_targets="attention,experts,router",
              lora_base_dtype="int4").memory
    assert bf["weights kept for backward"] == L * (4 * (n["w13"] + n["w2"] + n["gate"])
                                                   + 2 * (n["wqkv"] + n["wo"] + n["w13"] + n["w2"])) + 2 * 256 * 64


@pytest.mark.parametrize("base", ["float32", "bfloat16", "int8", "int4"])
def test_finetune_held_bytes_are_apply_loras(base):
    """The plan's frozen base, other weights and adapter factors against the bytes of the tensors
    `apply_lora` leaves in a real tiny model (float32, bf16, int8 + row scales, int4 + group scales)."""
    from mixlab.train.lora import LoraConfig, apply_lora

    model = Transformer(TINY)
    model.init_weights(seed=0)
    apply_lora(model, LoraConfig(rank=4, targets=("attention", "experts", "router"), base_dtype=base))
    held = rest = factors = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "rope" in name or "freqs" in name or not t.numel():
            continue
        nbytes = t.numel() * t.element_size()
        if name.endswith(("lora_A", "lora_B")):
            factors += nbytes
        elif ".base." in name:
            held += nbytes
        else:
            rest += nbytes
    m = plan(TINY, mode="finetune", seq=128, lora_rank=4, lora_targets="attention,experts,router",
             lora_base_dtype=base).memory
    assert (m[f"frozen base, targeted ({base})"], m["frozen weights, the rest (float32)"],
            m["adapters (float32)"]) == (held, rest, factors)


def test_full_finetuning_is_trainings_states():
    p, t = plan(TINY, mode="finetune", seq=128), plan(TINY, mode="train", seq=128)
    assert p.memory == t.memory and p.lora_rank == 0 and p.lora_targets == ()


@pytest.mark.parametrize("lora", [{}, {"lora_rank": 4, "lora_base_dtype": "int4"}])
def test_finetune_data_parallel_holds_the_whole_model_and_its_rows(lora):
    """`--mode finetune --devices 2` (torchrun ... sft): each device holds what one process holds, with
    the activations of its share of the batch, and all-reduces the trainable parameters' gradients."""
    one = plan(TINY, mode="finetune", seq=128, batch=2, **lora)
    two = plan(TINY, mode="finetune", seq=128, batch=4, devices=2, **lora)
    assert two.memory == one.memory and not one.comm
    trainable = (one.memory["adapter gradients (float32)"] if lora else one.memory["gradients (float32)"])
    assert two.comm == {("gradient all-reduce (adapters), per step" if lora else "gradient all-reduce, per step"):
                        pytest.approx(trainable)}  # ring: 2 (n-1)/n = 1 x the float32 gradients


def test_finetune_fsdp_shards_the_states_and_gathers_a_block_at_a_time():
    """`--mode finetune --fsdp` (sft --fsdp): AdamW's 16 bytes per parameter / N, plus two blocks
    gathered, under bf16 their matrices in bf16 and their norm scales and router in float32
    (`apply_fsdp`'s mixed precision), the root (embedding, final norm, output) gathered in float32,
    and autocast's bf16 copy of the output head; under float32 the blocks gathered in float32.
    Mixtral 8x7B in full: 8 x 80 GB do not hold it, 16 do with activation checkpointing (without it,
    41 GB of activations per device do not fit)."""
    ps = count_params(MIXTRAL)
    L, D, V = MIXTRAL.n_layers, MIXTRAL.dim, MIXTRAL.vocab_size
    block, f32, root = ps.block_dense + ps.block_experts, 2 * D + 8 * D, 2 * V * D + D
    for n, fits in ((8, False), (16, True)):
        p = plan(MIXTRAL, mode="finetune", devices=n, batch=n, fsdp=True, activation_checkpointing=True)
        states = sum(v for k, v in p.memory.items() if k.split(" ")[0] in ("parameters", "gradients", "optimizer"))
        assert states * n == pytest.approx(16 * ps.total)
        assert p.memory["FSDP gathered blocks (2, bfloat16 matrices)"] == 2 * ((block - f32) * 2 + f32 * 4)
        assert p.memory["FSDP gathered root (embedding, norm, output; float32)"] == 4 * root
        assert p.memory["bf16 weight copies kept for backward"] == 2 * V * D  # the output head's, no block's
        assert p.fits == fits, p.table()
    assert p.comm["FSDP reduce-scatter (gradients), per step"] == pytest.approx(4 * ps.total * 15 / 16)
    # the blocks in forward and backward (bf16 matrices: half of float32's bytes), the root once
    gathered = 2 * (L * (block - f32) * 2 + L * f32 * 4) + 4 * root
    assert p.comm["FSDP all-gather (forward + backward), per step"] == pytest.approx(gathered * 15 / 16)
    f = plan(MIXTRAL, mode="finetune", devices=16, batch=16, fsdp=True, activation_checkpointing=True,
             dtype="float32")
    assert f.memory["FSDP gathered blocks (2, float32)"] == 2 * block * 4
    assert "bf16 weight copies kept for backward" not in f.memory
    assert f.comm["FSDP all-gather (forward + backward), per step"] == pytest.approx(
        (2 * 4 * L * block + 4 * root) * 15 / 16)
    assert f.comm["FSDP all-gather (forward + backward), per step"] > 1.99 * gathered * 15 / 16
    q = plan(MIXTRAL, mode="finetune", devices=16, batch=16, fsdp=True)
    assert q.memory["activations"] > 40 * GB and not q.fits
    assert q.notes[-1].startswith("does not fit: try --activation-checkpointing, more --devices, --lora-rank "
                                  "(without --fsdp), ")
    assert plan(MIXTRAL, mode="finetune", devices=16, batch=16).notes[-1].startswith(
        "does not fit: try --fsdp, --activation-checkpointing, --lora-rank, ")  # more devices: each the whole model


@pytest.mark.parametrize("fsdp", [False, True])
def test_finetune_ep_plans_as_train_s_layout(fsdp):
    """`--mode finetune --ep E [--fsdp]` (sft / dpo --ep): full fine-tuning holds what training does in
    that layout (its experts / ep, the all-to-all), and the experts' share shrinks with ep."""
    kw = {"devices": 8, "batch": 8, "fsdp": fsdp, "activation_checkpointing": True}
    p = plan(MIXTRAL, mode="finetune", ep=8, **kw)
    t = plan(MIXTRAL, mode="train", ep=8, **kw)
    assert (p.memory, p.comm) == (t.memory, t.comm)
    assert p.comm["all-to-all (expert parallel), per step"] > 0
    ps = count_params(MIXTRAL)
    local = ps.dense / (8 if fsdp else 1) + ps.experts / 8
    assert p.memory["optimizer (AdamW, 2 x float32)"] == pytest.approx(8 * local)
    if not fsdp:  # data parallel: each device the whole model
        assert p.total < plan(MIXTRAL, mode="finetune", **kw).total - 0.8 * 16 * ps.experts


@pytest.mark.parametrize("kw, msg", [
    ({"devices": 2, "batch": 3}, "--batch must be a positive multiple of --devices (2) for training, got 3"),
    ({"devices": 2, "ep": 2, "lora_rank": 4}, "--ep 2 with --lora-rank: mixlab sft / dpo shard full fine-tuning "
                                              "only (a LoRA run's trainable part is small: plan it without --ep)"),
    ({"fsdp": True, "lora_rank": 4}, "--fsdp with --lora-rank: mixlab sft / dpo shard full fine-tuning only"),
    ({"quant": "int4"}, "--quant applies to --mode infer only"),
    ({"dtype": "float16"}, "--dtype float16: fine-tuning autocasts to float32 or bfloat16 only"),
    ({"lora_targets": "attention"}, "--lora-targets applies to LoRA, and --lora-rank is absent"),
    ({"lora_rank": 4, "lora_targets": "attention,mlp"},
     "--lora-targets: LoRA targets ['attention', 'mlp']: expected some of"),
    ({"lora_rank": 4, "lora_base_dtype": "int3"}, "--lora-base-dtype: LoRA base dtype 'int3'"),
    ({"lora_rank": -1}, "--lora-rank: LoRA rank must be a positive integer"),
])
def test_finetune_refusals(kw, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        plan(TINY, mode="finetune", seq=128, **kw)


def test_finetune_refusals_elsewhere():
    with pytest.raises(ValueError, match="--lora-rank applies to --mode finetune only"):
        plan(TINY, mode="train", lora_rank=4)
    with pytest.raises(ValueError, match=re.escape("--ep must divide --devices (4), got 3")):
        plan(TINY, mode="finetune", devices=4, ep=3, batch=4)
    with pytest.raises(ValueError, match="--lora-targets router: the model is dense"):
        plan(get_preset("tiny-dense"), mode="finetune", seq=128, lora_rank=4, lora_targets="attention,router")
    with pytest.raises(ValueError, match="groups of 32 inputs; attention.wqkv has 48"):
        plan(TINY.replace(dim=48, n_heads=3, n_kv_heads=1), mode="finetune", seq=128, lora_rank=4,
             lora_base_dtype="int4")


def test_finetune_cli(capsys):
    import json

    assert main(["plan", "tiny-moe", "--mode", "finetune", "--lora-rank", "8", "--lora-base-dtype", "int4",
                 "--seq-len", "128", "--activation-checkpointing", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert main(["plan", "tiny-moe", "--mode", "infer", "--json"]) == 0
    assert set(got) == set(json.loads(capsys.readouterr().out))  # the same keys as every mode's
    assert (got["mode"], got["lora_rank"], got["lora_targets"], got["lora_base_dtype"]) == \
        ("finetune", 8, ["attention", "experts"], "int4")
    assert got["total"] == pytest.approx(sum(got["memory"].values()))
    assert main(["plan", "tiny-moe", "--mode", "finetune", "--lora-rank", "8", "--seq", "128"]) == 0
    assert "LoRA rank 8 on attention,experts, base float32" in capsys.readouterr().out
    assert main(["plan", "tiny-moe", "--mode", "finetune", "--devices", "2", "--ep", "2", "--lora-rank", "4"]) == 2
    err = capsys.readouterr().err
    assert "--ep 2 with --lora-rank: mixlab sft / dpo shard full fine-tuning only" in err and "Traceback" not in err
    assert main(["plan", "tiny-moe", "--mode", "infer", "--lora-rank", "8"]) == 2
    assert "--lora-rank applies to --mode finetune only" in capsys.readouterr().err
    assert main(["plan", "tiny-moe", "--mode", "finetune", "--lora-rank", "8", "--lora-targets", "mlp"]) == 2
    assert "--lora-targets: LoRA targets ['mlp']: expected some of attention, experts, router" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's own refusal (its type), exit 2
        main(["plan", "tiny-moe", "--mode", "finetune", "--lora-rank", "0"])
    assert e.value.code == 2 and "--lora-rank: expected an integer >= 1, got 0" in capsys.readouterr().err


def test_finetune_does_not_fit_suggests_what_is_not_used():
    assert plan(MIXTRAL, mode="finetune").notes == [
        "does not fit: try --fsdp, --activation-checkpointing, --lora-rank, --lora-base-dtype int4, a smaller "
        "--seq/--batch"]
    assert plan(MIXTRAL, mode="finetune", lora_rank=16, lora_base_dtype="int4", activation_checkpointing=True,
                seq=4096, batch=64).notes == ["does not fit: try a smaller --seq/--batch"]
