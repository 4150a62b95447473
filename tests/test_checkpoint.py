"""Checkpoint formats, round trips and atomic saves, checked against transformers.

Round trips compare every tensor bit for bit; "transformers loads it" compares logits exactly
(same weights, same code) after `from_pretrained` on what mixlab wrote.
"""

import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import hf_mistral, hf_mixtral
from mixlab import atomic, load_model, save_model
from mixlab.atomic import MANIFEST
from mixlab.checkpoint import CheckpointError, from_state_dict, meta_model, to_state_dict
from mixlab.checkpoint import io as ckio
from mixlab.checkpoint.keymaps import FORMATS, rules
from mixlab.cli import main
from mixlab.config import PRESETS, ModelConfig
from mixlab.model import Transformer


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                assert k not in out
                out[k] = h.get_tensor(k)
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k} differs"


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(tokens).logits


def our_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    assert isinstance(out, torch.Tensor)
    return out


TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense", "mini-moe", "mixtral-8x7b"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_key_maps_cover_the_model_exactly(name, fmt):
    cfg = PRESETS[name]
    if fmt == "hf-fused" and cfg.moe is None:
        return
    state = meta_model(cfg).state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items() if k != "output.weight" or not cfg.tie_embeddings}
    table = rules(cfg, fmt)
    assert {r.ours: r.shape for r in table} == expected
    names = [n for r in table for n in r.theirs]
    assert len(names) == len(set(names))


def test_transformers_to_mixlab_to_transformers_is_bit_identical(tmp_path):
    src = hf_mixtral(tmp_path / "hf", rope_theta=5e5)
    model = load_model(src)
    out = tmp_path / "ours"
    save_model(model, out, max_shard_bytes=40_000)  # several shards and an index
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert_same_tensors(tensors_of(src), tensors_of(out))
    assert torch.equal(hf_logits(out, TOKENS), hf_logits(src, TOKENS))


def test_max_shard_bytes_takes_sizes_and_refuses_nonsense(tmp_path):
    # 0 and -1 silently wrote one tensor per shard (41 files); "1GB" failed mid-write with a TypeError.
    model = load_model(hf_mixtral(tmp_path / "hf"))
    save_model(model, tmp_path / "one", max_shard_bytes="1GB")
    assert sorted(p.name for p in (tmp_path / "one").glob("*.safetensors")) == ["model.safetensors"]
    save_model(model, tmp_path / "kb", max_shard_bytes="40KB")
    assert len(list((tmp_path / "kb").glob("model-*-of-*.safetensors"))) > 2
    for bad in (0, -1, "lots", True):  # None: the default (5 GiB; one file for the Mistral format)
        with pytest.raises(ValueError, match="max_shard_bytes"):
            save_model(model, tmp_path / "bad", max_shard_bytes=bad)
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("kind", ["mixtral", "mistral"])
def test_mistral_format_round_trip_is_bit_identical(tmp_path, kind):
    src = (hf_mixtral if kind == "mixtral" else hf_mistral)(tmp_path / "hf")
    model = load_model(src)
    mis = tmp_path / "mistral"
    save_model(model, mis, fmt="mistral")
    assert sorted(p.name for p in mis.iterdir()) == [MANIFEST, "consolidated.safetensors", "params.json"]
    keys = set(tensors_of(mis))
    assert "layers.0.attention.wq.weight" in keys and "tok_embeddings.weight" in keys
    if kind == "mixtral":
        assert "layers.1.feed_forward.experts.3.w1.weight" in keys and "layers.0.feed_forward.gate.weight" in keys
    back = load_model(mis)
    torch.testing.assert_close(our_logits(back, TOKENS), hf_logits(src, TOKENS), atol=1e-4, rtol=0)
    hf2 = tmp_path / "hf2"
    save_model(back, hf2, fmt="hf")
    assert_same_tensors(tensors_of(src), tensors_of(hf2))
    assert torch.equal(hf_logits(hf2, TOKENS), hf_logits(src, TOKENS))


def test_the_mistral_format_is_one_file_unless_asked(tmp_path, monkeypatch):
    """mistral-inference's Transformer.from_folder reads consolidated.safetensors alone: save_model and
    `convert --to mistral` sharded at 5 GiB by default, so a Mistral 7B export was
    consolidated-00001-of-00003.safetensors that it could not load. transformers' formats keep 5 GiB."""
    import mixlab.checkpoint as ckpt

    shards: list[int] = []
    real = ckpt.write_sharded
    monkeypatch.setattr(ckpt, "write_sharded", lambda *a, **kw: shards.append(kw["max_shard_bytes"]) or real(*a, **kw))
    src = hf_mistral(tmp_path / "hf")
    model = load_model(src)
    save_model(model, tmp_path / "m", fmt="mistral")
    save_model(model, tmp_path / "h", fmt="hf")
    save_model(model, tmp_path / "m2", fmt="mistral", max_shard_bytes="1MB")
    assert main(["convert", str(src), str(tmp_path / "m3"), "--to", "mistral", "--quiet"]) == 0
    assert main(["convert", str(src), str(tmp_path / "h3"), "--quiet"]) == 0
    assert shards[0] >= 2**62 and shards[1] == 5 * 2**30 and shards[2] == "1MB"
    assert shards[3] >= 2**62 and shards[4] == 5 * 2**30


def test_a_compiled_model_saves_the_model_it_wraps(tmp_path):
    # torch.compile(model) was refused: "save_model saves a mixlab Transformer, not OptimizedModule".
    model = Transformer(PRESETS["tiny-moe"])
    save_model(torch.compile(model), tmp_path / "c")
    back = load_model(tmp_path / "c").state_dict()
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_keys_left_out_of_config_json_take_transformers_defaults(tmp_path):
    """A Mistral config.json without rms_norm_eps and sliding_window is 1e-6 and 4096 to transformers;
    mixlab read 1e-5 and no window (other logits, without a word)."""
    from transformers import AutoConfig

    src = hf_mistral(tmp_path / "hf", rms_norm_eps=1e-6, sliding_window=4096)
    cfg = json.loads((src / "config.json").read_text())
    for key in ("rms_norm_eps", "sliding_window", "max_position_embeddings", "rope_parameters"):
        del cfg[key]
    (src / "config.json").write_text(json.dumps(cfg))
    ref, ours = AutoConfig.from_pretrained(src), load_model(src)
    got = ours.config
    assert (got.norm_eps, got.sliding_window, got.max_seq_len, got.rope_theta) == (
        ref.rms_norm_eps, ref.sliding_window, ref.max_position_embeddings, ref.rope_parameters["rope_theta"])
    torch.testing.assert_close(our_logits(ours, TOKENS), hf_logits(src, TOKENS), atol=1e-5, rtol=0)


def test_a_folder_holding_both_formats_loads(tmp_path):
    """Mistral's Hub repositories ship transformers' files and Mistral's consolidated ones side by
    side; without an index both sets of names were read and refused as unexpected tensors."""
    src = hf_mistral(tmp_path / "both")
    save_model(load_model(src), tmp_path / "mistral", fmt="mistral")
    for name in ("consolidated.safetensors", "params.json"):
        shutil.copy(tmp_path / "mistral" / name, src)
    assert torch.equal(our_logits(load_model(src), TOKENS), hf_logits(src, TOKENS))


def _rope_interleaved(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Mistral's reference rotary (mistral-inference rope.py): rotate consecutive pairs as complex numbers."""
    hd = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    angles = pos[:, None].float() * freqs  # [T, hd/2]
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], hd // 2, 2))
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def test_mistral_q_k_rows_are_in_mistral_rotary_order(tmp_path):
    """Independent of our own inverse: attention scores computed the way mistral-inference does
    (interleaved rotary on the Mistral-format wq/wk) equal transformers' (rotate-half on its wq/wk)."""
    from transformers import AutoModelForCausalLM

    src = hf_mixtral(tmp_path / "hf")
    save_model(load_model(src), tmp_path / "mistral", fmt="mistral")
    ours = tensors_of(tmp_path / "mistral")
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    cfg = ref.config
    H, G, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    x = torch.randn(7, cfg.hidden_size)
    pos = torch.arange(7)
    theta = cfg.rope_parameters["rope_theta"]
    from transformers.models.mixtral.modeling_mixtral import apply_rotary_pos_emb

    attn = ref.model.layers[0].self_attn
    q = (x @ attn.q_proj.weight.T).view(7, H, hd).transpose(0, 1)
    k = (x @ attn.k_proj.weight.T).view(7, G, hd).transpose(0, 1)
    emb = torch.cat([pos[:, None].float() * (1.0 / theta ** (torch.arange(0, hd, 2).float() / hd))] * 2, -1)
    q, k = apply_rotary_pos_emb(q[None], k[None], emb.cos()[None], emb.sin()[None])
    theirs = q[0] @ k[0].repeat_interleave(H // G, 0).transpose(-1, -2)
    qm = _rope_interleaved((x @ ours["layers.0.attention.wq.weight"].T).view(7, H, hd).transpose(0, 1), pos, theta)
    km = _rope_interleaved((x @ ours["layers.0.attention.wk.weight"].T).view(7, G, hd).transpose(0, 1), pos, theta)
    mine = qm @ km.repeat_interleave(H // G, 0).transpose(-1, -2)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_reads_transformers_v5_fused_expert_keys(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(3)
    ref = MixtralForCausalLM(MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)).eval()
    state = ref.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state and "model.layers.0.mlp.gate.weight" in state
    folder = tmp_path / "fused"
    ref.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    model = load_model(folder)
    with torch.no_grad():
        theirs = ref(TOKENS).logits
    torch.testing.assert_close(our_logits(model, TOKENS), theirs, atol=1e-4, rtol=0)
    # ... and writes them: transformers reads mixlab's fused save natively.
    save_model(model, tmp_path / "fused2", fmt="hf-fused")
    assert_same_tensors(tensors_of(folder), tensors_of(tmp_path / "fused2"))
    assert torch.equal(hf_logits(tmp_path / "fused2", TOKENS), theirs)


def test_state_dicts_in_memory_are_transformers_models_own(tmp_path):
    """to_state_dict(model, fmt="hf-fused") loads strictly into transformers' MixtralForCausalLM built
    from the model's config (same logits), and from_state_dict takes that model's state_dict() back,
    bit for bit; every format (a tied and a dense model too) round-trips in memory. There was no way
    but a checkpoint on disk."""
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    model = load_model(hf_mixtral(tmp_path / "hf"))
    hf = MixtralForCausalLM(MixtralConfig(**model.config.to_hf_dict())).eval()
    hf.load_state_dict(to_state_dict(model, fmt="hf-fused"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, our_logits(model, TOKENS), atol=1e-5, rtol=0)
    back = from_state_dict(hf.state_dict(), ModelConfig.from_hf_dict(hf.config.to_dict()))
    assert not back.training
    assert_same_tensors(back.state_dict(), model.state_dict())
    q = to_state_dict(model)["model.layers.0.self_attn.q_proj.weight"]  # a view, not a copy
    assert q.data_ptr() == model.layers[0].attn.wqkv.weight.data_ptr() and not q.requires_grad
    tied = load_model(hf_mistral(tmp_path / "tied", tie_word_embeddings=True))
    dense = AutoModelForCausalLM.from_pretrained(hf_mistral(tmp_path / "dense"), dtype=torch.float32)
    assert_same_tensors(from_state_dict(dense.state_dict(), load_model(tmp_path / "dense").config).state_dict(),
                        load_model(tmp_path / "dense").state_dict())
    for m in (model, tied):
        for fmt in FORMATS if m.config.moe else ("hf", "mistral"):
            again = from_state_dict(to_state_dict(m, fmt=fmt), m.config)
            assert_same_tensors(again.state_dict(), m.state_dict())
        assert_same_tensors(from_state_dict(m.state_dict(), m.config).state_dict(), m.state_dict())  # mixlab's names
    assert again.output.weight is again.tok_embeddings.weight


def test_from_state_dict_names_what_does_not_fit(tmp_path):
    model = load_model(hf_mixtral(tmp_path / "hf"))
    state = to_state_dict(model)
    with pytest.raises(ValueError, match=r"missing model.norm.weight; unexpected none"):
        from_state_dict({k: v for k, v in state.items() if k != "model.norm.weight"}, model.config)
    with pytest.raises(ValueError, match=r"missing none; unexpected model.layers.2.input_layernorm.weight"):
        from_state_dict({**state, "model.layers.2.input_layernorm.weight": state["model.norm.weight"]}, model.config)
    with pytest.raises(ValueError, match=r"model.norm.weight: expected shape \[64\], found \[63\]"):
        from_state_dict({**state, "model.norm.weight": state["model.norm.weight"][:63]}, model.config)
    with pytest.raises(ValueError, match="tensor names match no known format"):
        from_state_dict({"weight": state["model.norm.weight"]}, model.config)
    with pytest.raises(ValueError, match="does not match this config.*Missing key.*layers.1.ffn.gate.weight"):
        from_state_dict({k: v for k, v in model.state_dict().items() if k != "layers.1.ffn.gate.weight"},
                        model.config)
    # An integer tensor was torch's multi-line RuntimeError ("Only Tensors of floating point ... can require
    # gradients"), in either naming; a value that is no tensor an AttributeError.
    own = model.state_dict()
    with pytest.raises(CheckpointError, match=r"^state dict: 'model.norm.weight' is dtype torch.int32, expected a "
                                              r"floating-point tensor$"):
        from_state_dict({**state, "model.norm.weight": state["model.norm.weight"].int()}, model.config)
    with pytest.raises(CheckpointError, match=r"'layers.0.ffn.experts.w13' is dtype torch.int8"):
        from_state_dict({**own, "layers.0.ffn.experts.w13": own["layers.0.ffn.experts.w13"].to(torch.int8)},
                        model.config)
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' is a list, expected a floating-point tensor"):
        from_state_dict({**state, "model.norm.weight": [1.0] * 64}, model.config)
    with pytest.raises(ValueError, match="config must be a mixlab ModelConfig"):
        from_state_dict(state, model.config.to_hf_dict())
    with pytest.raises(ValueError, match="cannot save format 'gguf'"):
        to_state_dict(model, fmt="gguf")
    with pytest.raises(ValueError, match="to_state_dict takes a mixlab Transformer, not dict"):
        to_state_dict(state)


def test_tied_embeddings(tmp_path):
    src = hf_mistral(tmp_path / "hf", tie_word_embeddings=True)
    model = load_model(src)
    assert model.output.weight is model.tok_embeddings.weight
    torch.testing.assert_close(our_logits(model, TOKENS), hf_logits(src, TOKENS), atol=1e-4, rtol=0)
    for fmt in ("hf", "mistral"):
        save_model(model, tmp_path / f"out-{fmt}", fmt=fmt)
        assert not {"lm_head.weight", "output.weight"} & set(tensors_of(tmp_path / f"out-{fmt}"))
        again = load_model(tmp_path / f"out-{fmt}")
        assert again.output.weight is again.tok_embeddings.weight
        assert torch.equal(our_logits(again, TOKENS), our_logits(model, TOKENS))
    assert torch.equal(hf_logits(tmp_path / "out-hf", TOKENS), hf_logits(src, TOKENS))


def test_dtype_chosen_at_load(tmp_path):
    src = hf_mixtral(tmp_path / "hf")
    f32 = load_model(src)
    bf16 = load_model(src, dtype="bfloat16")
    for (k, a), (_, b) in zip(f32.state_dict().items(), bf16.state_dict().items(), strict=True):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), k
    save_model(bf16, tmp_path / "bf16")
    assert {t.dtype for t in tensors_of(tmp_path / "bf16").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_model(tmp_path / "bf16").tok_embeddings.weight.dtype == torch.bfloat16  # default: as stored


def test_the_nan_check_reads_bf16_weights_without_converting_them(tmp_path, monkeypatch):
    # sum(dtype=torch.float32) converted bf16 element by element: ~25x slower than bf16's own sum,
    # half the time of loading the bf16 mini-moe checkpoint (12.9 s -> 6.1 s under load)
    src = hf_mixtral(tmp_path / "hf")
    sums, sum_ = [], torch.Tensor.sum

    def spy(t, *args, **kwargs):
        sums.append((t.dtype, kwargs.get("dtype")))
        return sum_(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "sum", spy)
    load_model(src, dtype="bfloat16")
    assert sums and set(sums) == {(torch.bfloat16, None)}  # one per tensor read, none converting
    monkeypatch.undo()
    # float16's own sum overflows where float32's would not: its extremes are checked instead
    big = torch.full((70_000,), 60_000.0, dtype=torch.float16)
    assert big.sum().isinf() and ckio.all_finite(big)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for bad in (float("nan"), float("inf"), -float("inf")):
            x = torch.ones(1000, dtype=dt)
            x[500] = bad
            assert not ckio.all_finite(x) and not ckio.all_finite(x[::4][100:]), (dt, bad)
        assert ckio.all_finite(torch.ones(3, dtype=dt)) and ckio.all_finite(torch.ones(0, dtype=dt))


# -- atomic saves -----------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def test_crash_mid_save_leaves_the_old_folder_intact(tmp_path, monkeypatch):
    model = load_model(hf_mixtral(tmp_path / "hf"))
    dst = tmp_path / "out"
    save_model(model, dst, max_shard_bytes=40_000)
    before = snapshot(dst)
    real = ckio.write_safetensors
    calls = []

    def crash_after_first_shard(*a, **kw):
        if calls:
            raise OSError("disk full (simulated)")
        calls.append(1)
        real(*a, **kw)

    monkeypatch.setattr(ckio, "write_safetensors", crash_after_first_shard)
    with pytest.raises(OSError, match="simulated"):
        save_model(model, dst, fmt="mistral", max_shard_bytes=40_000)
    assert snapshot(dst) == before and leftovers(dst) == []


def test_crash_between_the_renames_is_recovered(tmp_path, monkeypatch):
    src = hf_mixtral(tmp_path / "hf")
    model = load_model(src)
    dst = tmp_path / "out"
    save_model(model, dst, fmt="mistral")  # the old copy
    monkeypatch.setattr(atomic, "_EXCHANGE", None)  # the two-rename fallback (no RENAME_EXCHANGE)
    real = os.rename

    def die_before_swapping_in(a, b):
        if str(a).endswith(".out.new"):
            raise SystemExit("killed (simulated)")
        real(a, b)

    monkeypatch.setattr(ckio.os, "rename", die_before_swapping_in)
    with pytest.raises(SystemExit):
        save_model(model, dst, fmt="hf")  # the new copy, committed but not swapped in
    monkeypatch.setattr(ckio.os, "rename", real)
    assert not dst.exists() and leftovers(dst) == [".out.new", ".out.old"]
    loaded = load_model(dst)  # finishes the save
    assert (dst / "config.json").exists() and leftovers(dst) == []
    assert torch.equal(our_logits(loaded, TOKENS), our_logits(model, TOKENS))


def test_recovery_from_every_crash_point(tmp_path):
    model = load_model(hf_mixtral(tmp_path / "hf"))
    dst = tmp_path / "out"
    save_model(model, tmp_path / "new", fmt="hf")
    save_model(model, tmp_path / "old", fmt="mistral")
    states = {  # what a crash after each step of the protocol leaves
        "committed": {"out": "old", ".out.new": "new"},
        "old moved away": {".out.old": "old", ".out.new": "new"},
        "new swapped in": {"out": "new", ".out.old": "old"},
    }
    for state in states.values():
        for name, which in state.items():
            shutil.copytree(tmp_path / which, tmp_path / name)
        load_model(dst)
        assert (dst / "config.json").exists() and leftovers(dst) == []  # the new copy won
        shutil.rmtree(dst)


def test_save_cleans_dead_temporaries_and_refuses_foreign_side_files(tmp_path):
    model = load_model(hf_mixtral(tmp_path / "hf"))
    dst = tmp_path / "out"
    save_model(model, dst)
    dead = tmp_path / ".out.tmp-999999999-x"  # a pid no process has
    dead.mkdir()
    save_model(model, dst, fmt="mistral")
    assert not dead.exists()
    assert sorted(p.name for p in dst.iterdir()) == [MANIFEST, "consolidated.safetensors", "params.json"]
    (dst / "tokenizer.json").write_text("{}")  # the user's: replaced only on request
    with pytest.raises(ValueError, match="tokenizer.json"):
        save_model(model, dst)
    save_model(model, dst, copy_files=[dst / "tokenizer.json"], overwrite=True)
    assert (dst / "tokenizer.json").read_text() == "{}" and (dst / "config.json").exists()


def test_relative_paths_without_a_name(tmp_path, monkeypatch):
    model = load_model(hf_mixtral(tmp_path / "hf"))
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    save_model(model, ".", fmt="mistral")  # replaces the folder we are in (cwd is then a deleted folder)
    monkeypatch.chdir(tmp_path)
    save_model(model, "out/../out", fmt="hf")
    monkeypatch.chdir(tmp_path / "out")
    assert torch.equal(our_logits(load_model("."), TOKENS), our_logits(model, TOKENS))
    assert leftovers(tmp_path / "out") == [] and (tmp_path / "out" / "config.json").exists()


def test_save_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path):
    model = load_model(hf_mixtral(tmp_path / "hf"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match="holds files mixlab did not write"):
        save_model(model, tmp_path / "notes")
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "x"


# -- CLI --------------------------------------------------------------------------------------


def test_cli_convert_round_trip(tmp_path, capsys):
    src = hf_mixtral(tmp_path / "hf")
    (src / "tokenizer.json").write_text("{}")
    assert main(["convert", str(src), str(tmp_path / "m"), "--to", "mistral"]) == 0
    assert (tmp_path / "m" / "params.json").exists() and (tmp_path / "m" / "tokenizer.json").exists()
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "h"), "--to", "hf"]) == 0
    assert_same_tensors(tensors_of(src), tensors_of(tmp_path / "h"))
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "x"), "--to", "hf"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nope" in err and err.startswith("mixlab convert: error:")
    assert not (tmp_path / "x").exists()


def test_cli_convert_to_mistral_writes_one_tokenizer_named_by_its_template(tmp_path, capsys):
    """mistral-inference's load_tokenizer refuses a folder with two tokenizer files, and mistral-common reads the
    template from the name (`tokenizer.model` is v1). convert copied a transformers folder's `tokenizer.model`
    beside its `tokenizer.model.v3` (Mistral 7B v0.3's: refused), and a v3 `tokenizer.model` alone (Mixtral
    8x22B's) under that name: mistral-common then wrote the v1 prompt, mixlab the v3 one."""
    from mistral_common.tokens.tokenizers.sentencepiece import is_sentencepiece

    from mixlab.tokenizer import load_tokenizer

    v3 = next(load_tokenizer().path.parent.glob("mistral_instruct_tokenizer_*.model.v3"))
    v1 = load_tokenizer().path
    src = hf_mixtral(tmp_path / "hf")
    for names, content, want in [(["tokenizer.model", "tokenizer.model.v3"], v3, "tokenizer.model.v3"),
                                 (["tokenizer.model"], v3, "tokenizer.model.v3"),
                                 (["tokenizer.model"], v1, "tokenizer.model")]:
        for f in src.glob("tokenizer.model*"):
            f.unlink()
        for name in names:
            shutil.copyfile(content, src / name)
        dst = tmp_path / "m"
        assert main(["convert", str(src), str(dst), "--to", "mistral", "--overwrite", "--quiet"]) == 0
        assert [f.name for f in sorted(dst.iterdir()) if is_sentencepiece(f)] == [want]
        assert (dst / want).read_bytes() == content.read_bytes()
    capsys.readouterr()


def test_cli_convert_to_hf_fused_loads_back_exactly(tmp_path, capsys):
    # save_model writes transformers >= 5's fused experts; convert's --to did not offer them.
    src = hf_mixtral(tmp_path / "hf")
    assert main(["convert", str(src), str(tmp_path / "fused"), "--to", "hf-fused", "--quiet"]) == 0
    assert "(hf-fused)" in capsys.readouterr().out
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors_of(tmp_path / "fused")
    assert_same_tensors(to_state_dict(load_model(src)), to_state_dict(load_model(tmp_path / "fused")))
    assert main(["convert", str(tmp_path / "fused"), str(tmp_path / "back"), "--quiet"]) == 0
    assert_same_tensors(tensors_of(src), tensors_of(tmp_path / "back"))


@pytest.mark.parametrize("dst", ["notes", "notes.gguf"])
def test_cli_convert_refuses_its_destination_before_reading_the_model(tmp_path, monkeypatch, capsys, dst):
    """A foreign folder (or file) as the destination was refused only after the whole model was read."""
    import mixlab.checkpoint

    if dst.endswith(".gguf"):
        pytest.importorskip("gguf")
    src = hf_mixtral(tmp_path / "hf")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("x")
    (tmp_path / "notes.gguf").write_text("not a GGUF file")

    def load_model(*a, **kw):
        raise AssertionError("the model was read")

    monkeypatch.setattr(mixlab.checkpoint, "load_model", load_model)
    assert main(["convert", str(src), str(tmp_path / dst), "--quant", "f32"] if dst.endswith(".gguf") else
                ["convert", str(src), str(tmp_path / dst)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "x"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("dst", ["h", "out.gguf"])
def test_cli_convert_shows_its_progress_on_a_terminal(tmp_path, monkeypatch, dst):
    """convert of a multi-GB model ran for half a minute without a word; --quiet (and a log file) keep it so."""
    src = hf_mixtral(tmp_path / "hf", vocab_size=32000, hidden_size=32, intermediate_size=48)
    for quiet in ([], ["--quiet"]):
        monkeypatch.setattr(sys, "stderr", _Terminal())
        assert main(["convert", str(src), str(tmp_path / dst), "--overwrite", *quiet]) == 0
        bar = sys.stderr.getvalue()
        assert (f"writing {tmp_path / dst}:" in bar and "tensor/s" in bar) != bool(quiet), bar


def test_cli_max_shard_gb_takes_a_size_as_transformers_does(tmp_path):
    """--max-shard-gb 5GB (transformers' max_shard_size="5GB") was refused: it took a number of GiB only."""
    from mixlab.cli.model import shard_bytes

    assert (shard_bytes("5"), shard_bytes("0.5")) == (5 * 2**30, 2**29)  # a number: GiB, as before
    assert (shard_bytes("5GB"), shard_bytes("5GiB"), shard_bytes("500MiB")) == (5 * 10**9, 5 * 2**30, 500 * 2**20)
    src = hf_mixtral(tmp_path / "hf")
    assert main(["convert", str(src), str(tmp_path / "h"), "--max-shard-gb", "4KB"]) == 0
    shards = sorted((tmp_path / "h").glob("model-*.safetensors"))
    assert len(shards) > 1
    assert_same_tensors(tensors_of(src), tensors_of(tmp_path / "h"))


def test_cli_convert_to_a_gguf_name_writes_gguf(tmp_path, capsys):
    """`convert SRC out.gguf` without --to: a GGUF file (it wrote a transformers folder named out.gguf)."""
    src = hf_mixtral(tmp_path / "hf", vocab_size=32000, hidden_size=32, intermediate_size=48)  # Mixtral's pieces
    assert main(["convert", str(src), str(tmp_path / "out.gguf"), "--quant", "f32"]) == 0
    assert (tmp_path / "out.gguf").is_file() and "(gguf, f32)" in capsys.readouterr().out
    a, b = load_model(src).state_dict(), load_model(tmp_path / "out.gguf").state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["convert", str(src), str(tmp_path / "plain")]) == 0  # any other name: a transformers folder
    assert (tmp_path / "plain" / "config.json").is_file()
    # GGUF-only flags on a folder were ignored (an unquantised folder for --quant q4_0): refused, nothing written
    capsys.readouterr()
    for flag, value in (("--quant", "q4_0"), ("--tokenizer", str(tmp_path / "tok.model"))):
        assert main(["convert", str(src), str(tmp_path / "q"), flag, value]) == 2
        assert f"{flag} applies to --to gguf only" in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_cli_info_prints_exact_counts(capsys):
    assert main(["info", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert "46,702,792,704" in out and "12,879,925,248" in out
    assert "weights:           bf16 86.99 GiB, int8 43.50 GiB, int4 21.75 GiB" in out
    assert "131,072 bytes (bf16); 4.00 GiB at full context" in out
    assert main(["info", "tiny-moe"]) == 0  # a small model's sizes read 0.00 GiB
    out = capsys.readouterr().out
    assert "bf16 0.49 MiB, int8 0.24 MiB, int4 0.12 MiB" in out and "0.12 MiB at full context" in out
    assert main(["info", "mixtral-8x22b"]) == 0  # 141B parameters: would not fit if allocated
    assert main(["info", "no-such-model"]) == 1
    assert "no-such-model" in capsys.readouterr().err


def test_cli_info_json_is_the_same_facts_for_scripts(tmp_path, capsys):
    """`mixlab info X --json | jq` had no --json (plan had one): scripts parsed the table."""
    import json

    src = hf_mixtral(tmp_path / "hf")
    cfg = load_model(src).config
    assert main(["info", str(src), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["parameters"] == cfg.param_counts() and got["config"]["moe"]["top_k"] == cfg.moe.top_k
    assert got["kv_cache_bytes_per_token"]["bf16"] == cfg.kv_cache_bytes_per_token(2)
    assert got["stored"].startswith("hf format")
    assert main(["info", "mixtral-8x7b", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["parameters"]["active"] == 12_879_925_248 and got["stored"] is None


def test_cli_info_on_a_checkpoint_reads_no_tensor_data(tmp_path, capsys, monkeypatch):
    src = hf_mixtral(tmp_path / "hf")
    cfg = load_model(src).config
    counts = cfg.param_counts()

    def no_reads(*a, **kw):
        raise AssertionError("info read tensor data")

    monkeypatch.setattr(ckio, "_pread_into", no_reads)
    assert main(["info", str(src)]) == 0
    out = capsys.readouterr().out
    assert f"{counts['total']:,}" in out and f"{counts['active']:,}" in out
    assert "hf format" in out and "float32" in out


def test_an_adapter_over_another_local_base_is_warned_about(tmp_path, monkeypatch):
    """An adapter whose base_model_name_or_path is a local folder was merged silently over any model of
    its shapes; now a warning names both. Its own base, however spelled, and a hub name are not warned about."""
    import json
    import warnings

    from mixlab.train.lora import LoraConfig, apply_lora, save_peft

    cfg = PRESETS["tiny-moe"]
    for name, seed in (("base", 0), ("other", 1)):
        m = Transformer(cfg)
        m.init_weights(std=0.1, seed=seed)
        save_model(m, tmp_path / name)
    save_peft(apply_lora(m, LoraConfig(rank=2, alpha=4)), tmp_path / "adapter", base_model=str(tmp_path / "base"))
    with pytest.warns(UserWarning) as record:
        load_model(tmp_path / "other", adapter=tmp_path / "adapter")
    assert [str(w.message) for w in record] == [
        f"{tmp_path / 'adapter' / 'adapter_config.json'}: the adapter was trained over {tmp_path / 'base'} (its "
        f"base_model_name_or_path), not {tmp_path / 'other'}: merged over other weights it gives other logits; load "
        f"it over {tmp_path / 'base'} unless {tmp_path / 'other'} holds the same weights (a conversion of it)"]
    monkeypatch.chdir(tmp_path)
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model("other/../base", adapter="adapter")  # its own base, spelled otherwise
        for base in ("mistralai/Mixtral-8x7B-v0.1", None):  # a hub name (never resolved here), none
            (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**conf, "base_model_name_or_path":
                                                                                   base}))
            load_model("other", adapter="adapter")


def test_cli_convert_of_a_gguf_file_warns_of_an_adapter_over_another_base(tmp_path, capsys):
    """convert --adapter warned of an adapter trained over another local folder (load_model's check) when
    the source was a folder, not when it was a GGUF file, which convert loads itself: now every source is
    checked, once, before it loads."""
    pytest.importorskip("gguf")
    from mixlab.checkpoint.gguf import write_gguf
    from mixlab.train.lora import LoraConfig, apply_lora, save_peft

    cfg = PRESETS["tiny-moe"].replace(vocab_size=32000, sliding_window=None)  # Mixtral's vocabulary, for the GGUF
    for name, seed in (("base", 0), ("other", 1)):
        m = Transformer(cfg)
        m.init_weights(std=0.1, seed=seed)
        save_model(m, tmp_path / name)
    write_gguf(m, tmp_path / "other.gguf", quant="f32")
    save_peft(apply_lora(m, LoraConfig(rank=2, alpha=4)), tmp_path / "adapter", base_model=str(tmp_path / "base"))
    conf = tmp_path / "adapter" / "adapter_config.json"
    for src in ("other.gguf", "other"):
        capsys.readouterr()
        assert main(["convert", str(tmp_path / src), str(tmp_path / f"out-{src}"), "--adapter",
                     str(tmp_path / "adapter"), "--quiet"]) == 0
        warned = [ln for ln in capsys.readouterr().err.splitlines() if ": warning: " in ln]
        assert warned == [f"mixlab convert: warning: {conf}: the adapter was trained over {tmp_path / 'base'} (its "
                          f"base_model_name_or_path), not {tmp_path / src}: merged over other weights it gives other "
                          f"logits; load it over {tmp_path / 'base'} unless {tmp_path / src} holds the same weights "
                          "(a conversion of it)"], src
    assert main(["convert", str(tmp_path / "base"), str(tmp_path / "out-base"), "--adapter", str(tmp_path / "adapter"),
                 "--quiet"]) == 0
    assert ": warning: " not in capsys.readouterr().err  # its own base


def test_cli_convert_merges_an_adapter(tmp_path, capsys):
    """convert had no --adapter: an adapter (or a LoRA run without hf/) could not become a model or a GGUF,
    and convert RUN said its checkpoint was 'not a model to start from'."""
    from mixlab.train.lora import LoraConfig, apply_lora, save_peft

    base = Transformer(PRESETS["tiny-moe"])
    base.init_weights(std=0.1, seed=0)
    save_model(base, tmp_path / "base")
    q = "model.layers.0.self_attn.q_proj.weight"
    before = to_state_dict(base)[q].clone()
    lora = apply_lora(base, LoraConfig(rank=2, alpha=4, targets=("attention", "experts")))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    save_peft(lora, tmp_path / "run" / "adapter", base_model=str(tmp_path / "base"))
    (tmp_path / "run" / "checkpoints").mkdir()
    assert main(["convert", str(tmp_path / "base"), str(tmp_path / "out"), "--to", "mistral", "--quiet",
                 "--adapter", str(tmp_path / "run" / "adapter")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'out'} (mistral, {tmp_path / 'run' / 'adapter'} merged)\n"
    want = to_state_dict(load_model(tmp_path / "base", adapter=tmp_path / "run" / "adapter"))
    assert_same_tensors(want, to_state_dict(load_model(tmp_path / "out")))
    assert not torch.equal(want[q], before)  # the adapter changed the weights
    for src in ("run", "run/adapter"):
        assert main(["convert", str(tmp_path / src), str(tmp_path / "x"), "--quiet"]) == 1
        assert capsys.readouterr().err == (
            f"mixlab convert: error: {tmp_path / src}: a LoRA adapter, not a model (a LoRA run without a merged hf/ "
            f"export); `mixlab convert {tmp_path / 'base'} {tmp_path / 'x'} --adapter {tmp_path / 'run' / 'adapter'}` "
            "writes its base with it merged\n")


def test_cli_info_describes_a_lora_adapter_folder(tmp_path, capsys, monkeypatch):
    """`mixlab info RUN/adapter` refused the folder (no config.json): it describes the adapter instead."""
    import json

    from mixlab.train.lora import LoraConfig, apply_lora, save_peft

    model = apply_lora(Transformer(PRESETS["tiny-moe"]), LoraConfig(rank=4, alpha=8, targets=("attention", "router")))
    save_peft(model, tmp_path / "adapter")
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = "mistralai/Mixtral-8x7B-v0.1"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(conf))
    tensors = tensors_of(tmp_path / "adapter")
    params, size = sum(t.numel() for t in tensors.values()), sum(t.nbytes for t in tensors.values())
    monkeypatch.setattr(ckio, "_pread_into", lambda *a, **kw: pytest.fail("info read tensor data"))
    assert main(["info", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"{tmp_path / 'adapter'}: LoRA adapter (PEFT) over mistralai/Mixtral-8x7B-v0.1; rank 4, alpha 8 "
                      "(scale 2)")
    assert "target modules:    k_proj, o_proj, q_proj, v_proj" in out
    assert f"tensors:           {len(tensors)} ({params:,} parameters) in adapter_model.safetensors: float32 " \
           f"{size:,} bytes ({size / 2**20:.2f} MiB)" in out
    assert out[-1].startswith(f"use:               --adapter {tmp_path / 'adapter'} --model mistralai/Mixtral-8x7B")
    assert main(["info", str(tmp_path / "adapter"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["r"], got["lora_alpha"], got["tensors"], got["parameters"]) == (4, 8, len(tensors), params)
    assert got["bytes_by_dtype"] == {"float32": size}
    assert got["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    # a LoRA run without a merged hf/ export (its checkpoints hold the factors alone) is its adapter
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "adapter").rename(tmp_path / "run" / "adapter")
    assert main(["info", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'run' / 'adapter'}: LoRA adapter (PEFT) over mistralai/")


def test_cli_info_on_a_truncated_checkpoint_is_one_error(tmp_path, capsys):
    """The checkpoint is checked before the summary is printed: a damaged one gets the error alone."""
    src = hf_mixtral(tmp_path / "hf")
    shard = next(src.glob("*.safetensors"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    assert main(["info", str(src)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "truncated" in err


def test_save_names_peft_layers_and_how_to_merge_them(tmp_path):
    """PEFT's get_peft_model on a mixlab model works (forward, generate); saving it was a bare KeyError
    'layers.0.attn.wqkv.weight' (its layers renamed the weights), the wrapper said only 'not PeftModel'."""
    peft = pytest.importorskip("peft")
    model = Transformer(PRESETS["tiny-moe"].replace(vocab_size=64)).eval()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["wqkv"]))
    with pytest.raises(ValueError, match=r"^save_model saves a mixlab Transformer, not PeftModel \(.*merge_and_unload"):
        save_model(wrapped, tmp_path / "a")
    with pytest.raises(ValueError, match=r"holding PEFT LoRA layers \(layers\.0\.attn\.wqkv\.base_layer\.weight\): "
                                         r"merge them first \(peft_model\.merge_and_unload\(\)"):
        save_model(model, tmp_path / "b")  # the model PEFT changed in place
    save_model(wrapped.merge_and_unload(), tmp_path / "c")
    assert (tmp_path / "c" / "config.json").is_file()
