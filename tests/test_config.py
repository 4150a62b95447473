import pytest
import torch

from mixlab.config import PRESETS, ConfigError, ModelConfig, MoEConfig, get_preset
from mixlab.model import Transformer


def test_mixtral_8x7b_counts_match_the_paper():
    counts = get_preset("mixtral-8x7b").param_counts()
    assert counts["total"] == 46_702_792_704
    assert counts["active"] == 12_879_925_248


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_counts_equal_the_meta_model(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = Transformer(cfg)
    numel = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    assert cfg.param_counts()["total"] == numel


def test_mini_moe_is_about_079b():
    assert 0.78e9 < get_preset("mini-moe").param_counts()["total"] < 0.80e9


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"dim": -4}, "dim"),
        ({"n_layers": 0}, "n_layers"),
        ({"ffn_dim": 10**12}, "ffn_dim"),
        ({"n_heads": 6, "n_kv_heads": 4}, "n_heads"),
        ({"head_dim": 7}, "head_dim"),
        ({"rope_theta": float("nan")}, "rope_theta"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"moe": MoEConfig(num_experts=4, top_k=5)}, "moe.top_k"),
        # training-only fields (`--set moe.aux_loss_coef=nan` ended in a TypeError mid-run)
        ({"moe": MoEConfig(num_experts=4, aux_loss_coef=float("nan"))}, "moe.aux_loss_coef"),
        ({"moe": MoEConfig(num_experts=4, jitter=-1)}, "moe.jitter"),
        ({"moe": MoEConfig(num_experts=4, z_loss_coef="x")}, "moe.z_loss_coef"),  # type: ignore[arg-type]
        ({"moe": MoEConfig(num_experts=4, capacity_factor="x")}, "moe.capacity_factor"),  # type: ignore[arg-type]
    ],
)
def test_out_of_range_values_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        get_preset("tiny-moe").replace(**changes)


def test_hf_and_mistral_dicts_round_trip():
    for cfg in PRESETS.values():
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()).replace(moe=cfg.moe) == cfg
        back = ModelConfig.from_mistral_dict(cfg.to_mistral_dict())
        assert back.replace(moe=cfg.moe, bos_id=cfg.bos_id, eos_id=cfg.eos_id) == cfg


def test_the_moe_training_settings_round_trip_through_config_json():
    """A transformers-format export keeps the router's training settings, z-loss included (Mixtral's
    config has no field for it: mixlab writes Switch Transformers' `router_z_loss_coef`), so that
    fine-tuning the export trains as the run did; without one, z-loss is off."""
    moe = MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001, jitter=0.05)
    cfg = get_preset("tiny-moe").replace(moe=moe)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()).moe == moe
    d = get_preset("tiny-moe").to_hf_dict()
    assert "router_z_loss_coef" not in d and ModelConfig.from_hf_dict(d).moe.z_loss_coef == 0.0


def test_params_json_without_rope_theta_follows_the_published_models():
    # The rule of mistral-inference at Mixtral's release (and the published models'): 1e4 with a sliding window
    # (Mistral 7B v0.1), else 1e6 (Mixtral, Mistral 7B v0.2); a dense file without a window was given 1e4.
    base = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 96, "vocab_size": 128}
    assert ModelConfig.from_mistral_dict({**base, "sliding_window": 4096}).rope_theta == 1e4
    assert ModelConfig.from_mistral_dict(base).rope_theta == 1e6
    assert ModelConfig.from_mistral_dict({**base, "sliding_window": None}).rope_theta == 1e6
    moe = {"num_experts": 8, "num_experts_per_tok": 2}
    assert ModelConfig.from_mistral_dict({**base, "moe": moe}).rope_theta == 1e6


@pytest.mark.parametrize("key,value", [("lora", {"rank": 8, "scaling": 2.0}), ("vision_encoder", {"hidden_size": 1024}),
                                       ("quantization", {"qformat_weight": "fp8_e4m3"})])
def test_params_json_fields_that_change_the_weights_are_refused_by_name(key, value):
    # They were ignored: a Pixtral, LoRA or quantised params.json loaded as a plain Mistral.
    base = {"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 96, "vocab_size": 128}
    with pytest.raises(ConfigError, match=f"^params.json: field '{key}' is not supported"):
        ModelConfig.from_mistral_dict({**base, key: value})
    assert ModelConfig.from_mistral_dict({**base, key: None, "max_batch_size": 4}).dim == 64  # null / harmless: read


@pytest.mark.parametrize("key", ["n_kv_heads", "head_dim"])
def test_params_json_zero_head_counts_are_refused_not_defaulted(key):
    # A 0 was read as absent (n_kv_heads = n_heads, head_dim = dim / n_heads) and the model built.
    base = {"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "hidden_dim": 96,
            "vocab_size": 128}
    with pytest.raises(ConfigError, match=f"^params.json: config field '{key}' must be an integer in .1, .*got 0"):
        ModelConfig.from_mistral_dict({**base, key: 0})
    assert ModelConfig.from_mistral_dict({k: v for k, v in base.items() if k != key}).n_kv_heads in (2, 4)


def test_params_json_of_a_mamba_names_its_model_type():
    # Codestral Mamba's params.json (mistral-inference's MambaArgs) was "required field 'n_heads' is missing".
    mamba = {"dim": 64, "n_layers": 2, "vocab_size": 128, "n_groups": 8, "rms_norm": True, "model_type": "mamba"}
    with pytest.raises(ConfigError, match="^params.json: model_type 'mamba' is not supported .expected 'transformer'"):
        ModelConfig.from_mistral_dict(mamba)
    base = {"dim": 64, "n_layers": 1, "n_heads": 4, "hidden_dim": 96, "vocab_size": 128}
    assert ModelConfig.from_mistral_dict({**base, "model_type": "transformer"}).dim == 64


@pytest.mark.parametrize("key", ["num_experts", "num_experts_per_tok"])
def test_params_json_moe_block_needs_both_fields(key):
    # mistral-inference's MoeArgs has no defaults; a missing num_experts_per_tok was silently read as 2.
    base = {"dim": 64, "n_layers": 1, "n_heads": 4, "hidden_dim": 96, "vocab_size": 128}
    moe = {"num_experts": 8, "num_experts_per_tok": 2}
    moe.pop(key)
    with pytest.raises(ConfigError, match=f"^params.json: required field 'moe.{key}' is missing"):
        ModelConfig.from_mistral_dict({**base, "moe": moe})


def test_hf_config_heads_not_dividing_width_is_an_error():
    d = get_preset("tiny-moe").to_hf_dict()
    d.pop("head_dim")
    d["num_attention_heads"] = 5
    with pytest.raises(ConfigError, match="not divisible"):
        ModelConfig.from_hf_dict(d)


def test_params_json_tied_embeddings_must_be_a_bool():
    base = {"dim": 64, "n_layers": 1, "n_heads": 4, "hidden_dim": 96, "vocab_size": 128}
    assert ModelConfig.from_mistral_dict({**base, "tied_embeddings": True}).tie_embeddings
    with pytest.raises(ConfigError, match="'tied_embeddings' must be true or false, got 'no'"):
        ModelConfig.from_mistral_dict({**base, "tied_embeddings": "no"})  # was read as True


def test_params_json_underscore_sliding_window_is_the_window():
    # mistral-inference's TransformerArgs takes "_sliding_window" as the window; it was ignored.
    base = {"dim": 64, "n_layers": 1, "n_heads": 4, "hidden_dim": 96, "vocab_size": 128}
    cfg = ModelConfig.from_mistral_dict({**base, "_sliding_window": 16})
    assert (cfg.sliding_window, cfg.rope_theta) == (16, 1e4)
    with pytest.raises(ConfigError, match="not both"):
        ModelConfig.from_mistral_dict({**base, "_sliding_window": 16, "sliding_window": 32})


def test_hf_config_eos_token_id_list_takes_its_first_id_and_keeps_all():
    d = {**ModelConfig(vocab_size=1000, moe=None).to_hf_dict(), "model_type": "llama"}
    cfg = ModelConfig.from_hf_dict({**d, "bos_token_id": 500, "eos_token_id": [501, 509]})
    assert (cfg.bos_id, cfg.eos_id) == (500, 501)  # eos was 2, an ordinary token here
    assert cfg.to_hf_dict()["eos_token_id"] == [501, 509]  # the second was dropped
    assert cfg.eos_ids == (501, 509) and ModelConfig.from_hf_dict(d).eos_ids == (2,)
    assert ModelConfig.from_hf_dict({**d, "eos_token_id": None}).eos_id == 2
    assert ModelConfig(vocab_size=1000, extra_eos_ids=[7]).extra_eos_ids == (7,)  # as JSON gives it
    assert ModelConfig(vocab_size=1000, extra_eos_ids=(2,)).to_hf_dict()["eos_token_id"] == 2  # one id: no list
    with pytest.raises(ConfigError, match=r"'extra_eos_ids' \('eos_token_id' in this file\) must be a list of "
                                          r"token ids in \[0, vocab_size=1000\), got \[501, 1000\]"):
        ModelConfig.from_hf_dict({**d, "eos_token_id": [3, 501, 1000]})


def test_a_run_folder_given_as_a_model_names_its_export(tmp_path):
    """`mixlab generate --model RUN` (a train run folder) said only 'no config.json ... found'."""
    (tmp_path / "run" / "hf").mkdir(parents=True)
    (tmp_path / "run" / "hf" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=f"a training run folder: its exported model is {tmp_path / 'run' / 'hf'}"):
        ModelConfig.from_dir(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"found$"):
        ModelConfig.from_dir(tmp_path)


def test_a_preset_name_with_a_typo_names_the_nearest():
    """`mixlab train --model tiny-mo` listed the presets but left the reader to spot which was meant."""
    with pytest.raises(ConfigError, match=r"^unknown preset 'tiny-mo' \(did you mean 'tiny-moe'\?\); known presets: "):
        get_preset("tiny-mo")
    with pytest.raises(ConfigError, match=r"^unknown preset 'gpt2'; known presets"):
        get_preset("gpt2")
    # not a name: difflib's "'int' object is not iterable", a list's "unhashable type: 'list'"
    for bad in (3, ["tiny-moe"], None):
        with pytest.raises(TypeError, match=rf"^get_preset takes a preset name \(str\), not {type(bad).__name__};"):
            get_preset(bad)  # type: ignore[arg-type]


def test_generation_eos_ids_replace_the_stop_set_and_are_not_written():
    """generation_config.json's eos_token_id (`generation_eos_ids`, set by load_model) ends generation in place
    of config.json's list, as in transformers; config.json keeps its own."""
    cfg = ModelConfig(vocab_size=1000, extra_eos_ids=(9,), generation_eos_ids=[7, 2, 7])
    assert cfg.eos_ids == (7, 2) and cfg.to_hf_dict()["eos_token_id"] == [2, 9]
    assert cfg == cfg.replace(generation_eos_ids=None)  # no shape of its own
    for bad in ((), (1000,), ("7",)):
        with pytest.raises(ConfigError, match=r"'generation_eos_ids' must be None or a non-empty list of token ids"):
            ModelConfig(vocab_size=1000, generation_eos_ids=bad)
