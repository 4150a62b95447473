"""Model configuration: one dataclass with a nested MoE part, presets, parameter counts, and the
translation to and from transformers' `config.json` and Mistral's `params.json`.

Nothing here allocates weights; `mixlab info` works on a 141B-parameter preset on a laptop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixlab.errors import ConfigError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int, *, what: str) -> int:
    """A byte count from `4GB` (10^9), `4GiB` / `4G` (2^30), `512MB`, `1.5GB` or a plain integer;
    ValueError naming `what` and the value otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        n: float = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _UNITS:
            raise ValueError(f"{what}: {text!r} is not a size; expected a number of bytes with an optional unit "
                             "(B, KB, MB, GB, TB: powers of 1000; KiB, MiB, GiB, TiB or K, M, G, T: powers of 1024), "
                             "e.g. 4GB")
        n = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(n) or n < 1:
        raise ValueError(f"{what}: {text!r} must be at least one byte")
    return int(n)


def as_path(value: object, *, what: str) -> Path:
    """`value` (a str or os.PathLike) as a Path; ValueError naming `what` otherwise (pathlib's
    "expected str, bytes or os.PathLike object, not int" named no parameter)."""
    if not isinstance(value, str | os.PathLike):
        raise ValueError(f"{what} must be a str or pathlib.Path, not {type(value).__name__}")
    return Path(value)


def suffix_of(path: str | os.PathLike[str]) -> str:
    """A file name's extension, lower-cased: what picks a file's format (`X.GGUF`, `tokenizer.JSON`), by
    the same rule wherever one does (a name's case says nothing of its contents, as llama.cpp reads it)."""
    return Path(path).suffix.lower()


GGUF_SPLIT_NAME = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.gguf")  # llama.cpp's names of a split GGUF's parts


def _gguf_files(folder: Path) -> list[Path]:
    """The GGUF files in `folder`, sorted; of a split file (PREFIX-0000K-of-0000N.gguf) its first part alone,
    the one that loads it."""
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if suffix_of(f) == ".gguf" and f.is_file()
                  and ((m := GGUF_SPLIT_NAME.fullmatch(f.stem + ".gguf")) is None or int(m[2]) == 1))


def usable_threads(n: int, *, what: str = "--threads") -> int:
    """`n` CPU threads for torch, at most this machine's CPUs, warned of: more threads than cores only make
    OpenMP workers wait for each other, and torch.set_num_threads crashed the process beyond them (99999:
    SIGSEGV; 2**63 - 1: OverflowError). `what`: the flag or setting that asked for them."""
    cpus = os.cpu_count() or 1
    if n > cpus:
        warnings.warn(f"{what} {n} is more than the {cpus} CPUs here; using {cpus}", stacklevel=2)
    return min(n, cpus)


def format_bytes(n: float) -> str:
    """A byte count as `parse_bytes` reads it back (powers of 1000): 2.15 GB, 512.00 MB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# mixlab field -> the key that holds it in transformers' config.json / Mistral's params.json, so
# errors name the key the user sees in the file.
_HF_KEYS = {"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
            "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
            "ffn_dim": "intermediate_size", "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
            "max_seq_len": "max_position_embeddings", "sliding_window": "sliding_window",
            "moe.num_experts": "num_local_experts", "moe.top_k": "num_experts_per_tok", "bos_id": "bos_token_id",
            "eos_id": "eos_token_id", "extra_eos_ids": "eos_token_id"}
# transformers' defaults (MistralConfig, MixtralConfig, LlamaConfig) for keys a config.json may
# leave out: without rms_norm_eps a Mistral is 1e-6 to transformers, and has a 4096-token window.
# (A missing num_key_value_heads stays n_heads: the weights' shapes then say if it is wrong.)
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mistral": {"rms_norm_eps": 1e-6, "rope_theta": 1e4, "sliding_window": 4096,
                "max_position_embeddings": 131072},
    "mixtral": {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
                "max_position_embeddings": 131072},
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 1e4, "sliding_window": None, "max_position_embeddings": 2048},
}
_MISTRAL_KEYS = {"ffn_dim": "hidden_dim", "moe.num_experts": "moe.num_experts",
                 "moe.top_k": "moe.num_experts_per_tok"}
# params.json fields of mistral-inference's TransformerArgs (and of Mistral's quantised releases) that
# change the weights mixlab would read: a file with one set was loaded as if it were absent.
_MISTRAL_UNSUPPORTED = {
    "lora": "LoRA layers in the model; merge the adapter into the weights first",
    "vision_encoder": "a vision-language model such as Pixtral",
    "quantization": "quantised weights",
}


def _in_file(e: ConfigError, source: str, keys: dict[str, str]) -> ConfigError:
    """`e` prefixed with the file, naming the file's own key for the field."""
    msg = str(e)
    for ours, theirs in keys.items():
        if f"'{ours}'" in msg and ours != theirs:
            msg = msg.replace(f"'{ours}'", f"'{ours}' ({theirs!r} in this file)", 1)
            break
    return ConfigError(f"{source}: {msg}")


@dataclass(frozen=True)
class MoEConfig:
    """The sparse feed-forward part of a `ModelConfig` (Mixtral's defaults): `num_experts` experts per
    layer, `top_k` of them per token; the rest are training options. Checked by the `ModelConfig`
    that holds it."""

    num_experts: int = 8
    top_k: int = 2
    # Training-time options; they do not change inference.
    aux_loss_coef: float = 0.02  # Mixtral's router_aux_loss_coef
    z_loss_coef: float = 0.0  # ST-MoE router z-loss, arXiv 2202.08906
    jitter: float = 0.0  # multiplicative input noise on the router, training only
    capacity_factor: float | None = None  # None = dropless (Mixtral)


@dataclass(frozen=True)
class ModelConfig:
    """A model's shape (defaults: Mixtral 8x7B; `moe=None`: dense, as Mistral 7B), checked when made.
    Frozen and comparable; `replace(**changes)` makes a changed copy (checked again). To and from
    transformers' config.json (`to_hf_dict` / `from_hf_dict`), Mistral's params.json
    (`to_mistral_dict` / `from_mistral_dict`) and a checkpoint folder (`from_dir`); named sizes:
    `get_preset`."""

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    ffn_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_seq_len: int = 32768
    sliding_window: int | None = None  # None = full causal attention
    tie_embeddings: bool = False
    moe: MoEConfig | None = field(default_factory=MoEConfig)  # None = dense (Mistral 7B)
    bos_id: int = 1
    eos_id: int = 2
    # more ids that end generation as EOS does (Llama 3 Instruct's eos_token_id [128001, 128008, 128009]:
    # eos_id is the first, these the rest); `eos_ids` is them all
    extra_eos_ids: tuple[int, ...] = ()
    # generation_config.json's eos_token_id, where a transformers folder has one (`load_model` reads it): then
    # the ids that end generation in place of eos_id + extra_eos_ids, as in transformers' generate. Never written
    # to config.json (`save_model` writes it to generation_config.json, unless that file is copied in) and not
    # compared (it changes no shape).
    generation_eos_ids: tuple[int, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("extra_eos_ids", "generation_eos_ids"):  # from JSON or a model_overrides table: hashable
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    # -- validation -------------------------------------------------------------------------

    def validate(self) -> None:
        """ConfigError naming the first field out of range (called when a config is made)."""
        limit = 1 << 24  # 16M: far above any real width, far below an int overflow
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= limit:
                raise ConfigError(f"config field {name!r} must be an integer in [1, {limit}], got {v!r}")
        if not isinstance(self.max_seq_len, int) or not 1 <= self.max_seq_len <= 1 << 24:
            raise ConfigError(f"config field 'max_seq_len' must be in [1, {1 << 24}], got {self.max_seq_len!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"config field 'n_heads' ({self.n_heads}) must be a multiple of 'n_kv_heads' ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config field 'head_dim' must be even for rotary embeddings, got {self.head_dim}")
        if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1):
            raise ConfigError(f"config field 'norm_eps' must be in (0, 1), got {self.norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and math.isfinite(self.rope_theta) and self.rope_theta > 1):
            raise ConfigError(f"config field 'rope_theta' must be a finite number > 1, got {self.rope_theta!r}")
        if self.sliding_window is not None and not (
            isinstance(self.sliding_window, int) and self.sliding_window >= 1
        ):
            raise ConfigError(f"config field 'sliding_window' must be None or >= 1, got {self.sliding_window!r}")
        if self.moe is not None:
            m = self.moe
            if not isinstance(m.num_experts, int) or not 1 <= m.num_experts <= 4096:
                raise ConfigError(f"config field 'moe.num_experts' must be in [1, 4096], got {m.num_experts!r}")
            if not isinstance(m.top_k, int) or not 1 <= m.top_k <= m.num_experts:
                raise ConfigError(
                    f"config field 'moe.top_k' must be in [1, num_experts={m.num_experts}], got {m.top_k!r}"
                )
            for name in ("aux_loss_coef", "z_loss_coef", "jitter"):  # training-only, but a NaN or a string
                v = getattr(m, name)                                 # would fail mid-run
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise ConfigError(f"config field 'moe.{name}' must be a finite number >= 0, got {v!r}")
            c = m.capacity_factor
            if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c)
                                  or not c > 0):
                raise ConfigError(f"config field 'moe.capacity_factor' must be None or a finite number > 0, "
                                  f"got {c!r}")
        for name in ("bos_id", "eos_id"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < self.vocab_size:
                raise ConfigError(f"config field {name!r} must be a token id in [0, vocab_size={self.vocab_size}), "
                                  f"got {v!r}")
        for name in ("extra_eos_ids", "generation_eos_ids"):
            ids = getattr(self, name)
            if ids is None and name == "generation_eos_ids":
                continue
            if not isinstance(ids, tuple) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                     and 0 <= v < self.vocab_size for v in ids) \
                    or name == "generation_eos_ids" and not ids:
                shown = list(ids) if isinstance(ids, tuple) else ids
                what = "None or a non-empty list" if name == "generation_eos_ids" else "a list"
                raise ConfigError(f"config field {name!r} must be {what} of token ids in "
                                  f"[0, vocab_size={self.vocab_size}), got {shown!r}")
        total = self.param_counts()["total"]
        if total > 1 << 44:  # ~17.6T parameters: a typo, not a model
            raise ConfigError(f"config describes {total:,} parameters, more than 2**44; check the sizes")

    # -- derived fields ---------------------------------------------------------------------

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: `generation_eos_ids` where set, else `eos_id`, then `extra_eos_ids`."""
        if self.generation_eos_ids is not None:
            return tuple(dict.fromkeys(self.generation_eos_ids))
        return (self.eos_id, *(i for i in self.extra_eos_ids if i != self.eos_id))

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes` applied (and checked), e.g. `get_preset("tiny-moe").replace(vocab_size=32000)`."""
        return dataclasses.replace(self, **changes)

    def param_counts(self) -> dict[str, int]:
        """Exact parameter counts by part, without allocating anything.

        `active` is what one token touches: embedding row lookup is counted as the whole embedding
        matrix (as the Mixtral paper does to get 12.9B), attention, norms, router, top-k experts of
        every layer, and the output matrix.
        """
        D, F = self.dim, self.ffn_dim
        attn = D * self.q_dim + 2 * D * self.kv_dim + self.q_dim * D
        norms = 2 * D
        ffn_one = 3 * D * F
        if self.moe is not None:
            router = self.moe.num_experts * D
            experts = self.moe.num_experts * ffn_one
            experts_active = self.moe.top_k * ffn_one
        else:
            router, experts, experts_active = 0, ffn_one, ffn_one
        embed = self.vocab_size * D
        head = 0 if self.tie_embeddings else self.vocab_size * D
        per_layer = attn + norms + router + experts
        total = self.n_layers * per_layer + embed + head + D
        active = self.n_layers * (attn + norms + router + experts_active) + embed + head + D
        return {
            "total": total,
            "active": active,
            "embedding": embed,
            "output": head,
            "attention": self.n_layers * attn,
            "ffn": self.n_layers * experts,
            "router": self.n_layers * router,
            "norms": self.n_layers * norms + D,
        }

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Bytes of keys and values one token takes in every layer (default: 2 per element, bf16)."""
        return 2 * self.n_layers * self.kv_dim * bytes_per_element

    # -- transformers config.json -----------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        model_type = d.get("model_type")
        if model_type not in ("mixtral", "mistral", "llama"):
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported (expected 'mixtral', 'mistral' or 'llama')"
            )
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            if key not in d:
                raise ConfigError(f"{source}: required field {key!r} is missing")
        d = {**_HF_DEFAULTS[model_type], **d}
        n_heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        if not isinstance(n_heads, int) or n_heads <= 0:
            raise ConfigError(f"{source}: field 'num_attention_heads' must be a positive integer, got {n_heads!r}")
        head_dim = d.get("head_dim") or (hidden // n_heads if isinstance(hidden, int) else hidden)
        if d.get("head_dim") is None and isinstance(hidden, int) and hidden % n_heads:
            raise ConfigError(
                f"{source}: hidden_size ({hidden}) is not divisible by num_attention_heads ({n_heads}) "
                "and no head_dim is given"
            )
        rope = d.get("rope_parameters") or {}
        for key in ("rope_parameters", "rope_scaling"):
            v = d.get(key) or {}
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: field {key!r} must be an object, got {v!r}")
            rope_type = v.get("rope_type", v.get("type", "default"))  # "type": transformers < 4.45 files
            if rope_type not in (None, "default"):
                raise ConfigError(f"{source}: field {key!r} has rope type {rope_type!r}; only plain RoPE "
                                  "('default') is supported")
        rope_theta = _number(rope.get("rope_theta", d["rope_theta"]), source, "rope_theta")
        # Fields transformers honours that Mixtral / Mistral lack: refused, not silently ignored.
        # "swish" is transformers' other name for SiLU (ACT2FN maps both to it).
        for name, want, same in (("hidden_act", "silu", ("swish",)), ("attention_bias", False, ()),
                                 ("mlp_bias", False, ())):
            got = d.get(name, want)
            if got != want and got not in same:
                raise ConfigError(f"{source}: field {name!r} is {got!r}; only {want!r} is supported")
        moe = None
        if model_type == "mixtral":
            moe = MoEConfig(
                num_experts=d.get("num_local_experts", 8),
                top_k=d.get("num_experts_per_tok", 2),
                aux_loss_coef=d.get("router_aux_loss_coef", 0.02) or 0.0,
                jitter=d.get("router_jitter_noise", 0.0) or 0.0,
                z_loss_coef=d.get("router_z_loss_coef", 0.0) or 0.0,  # mixlab's exports (Switch Transformers' name)
            )
        try:
            return cls(
                vocab_size=d["vocab_size"],
                dim=hidden,
                n_layers=d["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=d.get("num_key_value_heads") or n_heads,
                head_dim=head_dim,
                ffn_dim=d["intermediate_size"],
                norm_eps=d["rms_norm_eps"],
                rope_theta=rope_theta,
                max_seq_len=d["max_position_embeddings"],
                sliding_window=d["sliding_window"] if model_type != "llama" else None,
                tie_embeddings=_flag(d.get("tie_word_embeddings", False), source, "tie_word_embeddings"),
                moe=moe,
                bos_id=_token_id(d.get("bos_token_id"), 1),
                eos_id=_token_id(d.get("eos_token_id"), 2),
                extra_eos_ids=_more_ids(d.get("eos_token_id")),
            )
        except ConfigError as e:
            raise _in_file(e, source, _HF_KEYS) from None

    def to_hf_dict(self) -> dict[str, Any]:
        """transformers' config.json (MixtralConfig; MistralConfig for a dense model); `from_hf_dict` reads it."""
        d: dict[str, Any] = {
            "architectures": ["MixtralForCausalLM" if self.is_moe else "MistralForCausalLM"],
            "model_type": "mixtral" if self.is_moe else "mistral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,  # transformers < 5
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},  # transformers >= 5
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_id,
            "eos_token_id": [self.eos_id, *more] if (more := [i for i in self.extra_eos_ids if i != self.eos_id])
            else self.eos_id,  # not generation_eos_ids: generation_config.json's
            "attention_dropout": 0.0,
            "dtype": "float32",  # transformers >= 5; save_model writes the stored dtype in both
            "torch_dtype": "float32",
        }
        if self.moe is not None:
            d["num_local_experts"] = self.moe.num_experts
            d["num_experts_per_tok"] = self.moe.top_k
            d["router_aux_loss_coef"] = self.moe.aux_loss_coef
            d["router_jitter_noise"] = self.moe.jitter
            if self.moe.z_loss_coef:  # not Mixtral's: kept so that fine-tuning an export trains as the run did
                d["router_z_loss_coef"] = self.moe.z_loss_coef
            d["output_router_logits"] = False
        return d

    # -- Mistral params.json ----------------------------------------------------------------

    @classmethod
    def from_mistral_dict(cls, d: dict[str, Any], *, source: str = "params.json") -> ModelConfig:
        """Read Mistral's `params.json`.

        Published files often omit `rope_theta`; mistral-inference's release with Mixtral (Dec 2023) then
        took 1e4 for a file with a `sliding_window` (Mistral 7B v0.1, trained so) and 1e6 for one without
        (Mixtral, Mistral 7B v0.2), and so does this. Its releases since May 2024 take 1e6 for any file
        without one (`rope_theta or 1e6`), which misreads Mistral 7B v0.1's. An absent `sliding_window` (or
        `_sliding_window`, read the same) means none.
        """
        if d.get("model_type", "transformer") != "transformer":  # mistral-inference's MambaArgs (Codestral Mamba)
            raise ConfigError(f"{source}: model_type {d['model_type']!r} is not supported (expected 'transformer', "
                              "mistral-inference's default)")
        for key in ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size"):
            if key not in d:
                raise ConfigError(f"{source}: required field {key!r} is missing")
        # Fields mistral-inference builds more than this model from: refused, not silently ignored.
        for key, what in _MISTRAL_UNSUPPORTED.items():
            if d.get(key) is not None:
                raise ConfigError(f"{source}: field {key!r} is not supported ({what}); mixlab loads plain "
                                  "Mistral/Mixtral weights only")
        moe_d = d.get("moe")
        moe = None
        if moe_d is not None and not isinstance(moe_d, dict):
            raise ConfigError(f"{source}: field 'moe' must be an object like {{\"num_experts\": 8, "
                              f"\"num_experts_per_tok\": 2}}, got {moe_d!r}")
        n_heads = d["n_heads"]
        if not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads <= 0:
            raise ConfigError(f"{source}: field 'n_heads' must be a positive integer, got {n_heads!r}")
        if d.get("head_dim") is None and (not isinstance(d["dim"], int) or d["dim"] % n_heads):
            raise ConfigError(f"{source}: dim ({d['dim']!r}) is not divisible by n_heads ({n_heads}) and no "
                              "head_dim is given")
        if moe_d is not None:  # both required, as mistral-inference's MoeArgs has no defaults for them
            for key in ("num_experts", "num_experts_per_tok"):
                if key not in moe_d:
                    raise ConfigError(f"{source}: required field 'moe.{key}' is missing (mistral-inference's "
                                      "MoeArgs has no default for it)")
            moe = MoEConfig(num_experts=moe_d["num_experts"], top_k=moe_d["num_experts_per_tok"])
        # mistral-inference reads "_sliding_window" as the window too (TransformerArgs.__post_init__).
        window = d.get("sliding_window")
        if window is None:
            window = d.get("_sliding_window")
        elif d.get("_sliding_window") is not None:
            raise ConfigError(f"{source}: set one of 'sliding_window' and '_sliding_window', not both")
        default_theta = 1e6 if window is None else 1e4  # mistral-inference's freqs_cis, Dec 2023 to May 2024
        try:
            return cls(
                vocab_size=d["vocab_size"],
                dim=d["dim"],
                n_layers=d["n_layers"],
                n_heads=d["n_heads"],
                # absent (or null): as for Mistral 7B v0.1's published file; a 0 is checked, not defaulted
                n_kv_heads=d["n_heads"] if d.get("n_kv_heads") is None else d["n_kv_heads"],
                head_dim=d["dim"] // d["n_heads"] if d.get("head_dim") is None else d["head_dim"],
                ffn_dim=d["hidden_dim"],
                norm_eps=d.get("norm_eps", 1e-5),
                rope_theta=_number(d.get("rope_theta") or default_theta, source, "rope_theta"),
                max_seq_len=d.get("max_seq_len", 32768),
                sliding_window=window,
                tie_embeddings=_flag(d.get("tied_embeddings", False), source, "tied_embeddings"),
                moe=moe,
            )
        except ConfigError as e:
            raise _in_file(e, source, _MISTRAL_KEYS) from None

    def to_mistral_dict(self) -> dict[str, Any]:
        """Mistral's params.json (mistral-inference); `from_mistral_dict` reads it back."""
        d: dict[str, Any] = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "head_dim": self.head_dim,
            "hidden_dim": self.ffn_dim,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "max_seq_len": self.max_seq_len,
        }
        if self.sliding_window is not None:
            d["sliding_window"] = self.sliding_window
        if self.tie_embeddings:
            d["tied_embeddings"] = True
        if self.moe is not None:
            d["moe"] = {"num_experts": self.moe.num_experts, "num_experts_per_tok": self.moe.top_k}
        return d

    # -- files -------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """The config of a checkpoint folder: transformers `config.json` or Mistral `params.json`."""
        p = Path(path)
        if not p.exists():  # it said "no config.json (transformers) or params.json (Mistral) found"
            raise ConfigError(f"{p}: no such checkpoint folder")
        for name, reader in (("config.json", cls.from_hf_dict), ("params.json", cls.from_mistral_dict)):
            f = p / name
            if f.is_file():
                return reader(read_json_object(f), source=str(f))
        hint = ""  # a training run's folders: name the one that holds a model, or the command that writes one
        merge = "a LoRA run writes hf/ with --merge; a finished one does with its command again plus --resume --merge"
        adapter = p if (p / "adapter_config.json").is_file() else p / "adapter"  # PEFT's, or a LoRA run's
        use = ""  # how to run the adapter without merging it first
        if (adapter / "adapter_config.json").is_file():
            try:
                base = read_json_object(adapter / "adapter_config.json").get("base_model_name_or_path")
            except ConfigError:
                base = None
            use = (f"generate, chat, serve and eval take {adapter} as --adapter over --model "
                   f"{base if isinstance(base, str) and base else 'BASE'} (its base model); ")
        if (p / "hf" / "config.json").is_file():  # `mixlab generate --model RUN`: the model is RUN/hf
            hint = f" (a training run folder: its exported model is {p / 'hf'})"
        elif adapter == p:  # RUN/adapter of `mixlab sft --lora-rank R`, or PEFT's
            hint = f" (a LoRA adapter in PEFT's format, not a model: {use}a mixlab run's merged model is its hf/ " \
                   f"folder; {merge})"
        elif (p / "finetune_config.json").is_file():  # a LoRA run without --merge: no hf/
            hint = f" (a fine-tuning run folder without an hf/ export; {use}{merge})"
        elif (p / "state.json").is_file():
            hint = f" (a training checkpoint: `mixlab convert {p} OUT` writes its model as a transformers checkpoint)"
        elif (p / "checkpoints").is_dir():
            hint = (f" (a training run folder without an hf/ export: `mixlab convert {p} OUT` exports its newest "
                    "checkpoint)")
        elif any(p.glob("step_*/state.json")):
            hint = " (a training run's checkpoints: `mixlab convert` writes one of its step_* folders as a model)"
        elif ggufs := _gguf_files(p):  # a hub snapshot of GGUF files: one is the model, as llama.cpp takes it
            shown = ", ".join(f.name for f in ggufs[:4]) + (f" (and {len(ggufs) - 4} more)" if len(ggufs) > 4 else "")
            what, which = ("a GGUF file", "it") if len(ggufs) == 1 else (f"{len(ggufs)} GGUF files", "one")
            hint = f" (it holds {what}, {shown}: pass {which} as the model, e.g. {ggufs[0]})"
        raise ConfigError(f"{p}: no config.json (transformers) or params.json (Mistral) found{hint}")


def _number(v: Any, source: str, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConfigError(f"{source}: field {key!r} must be a number, got {v!r}")
    return float(v)


def _token_id(v: Any, default: int) -> int:
    """config.json's bos/eos_token_id: an id, or the first of a list of ids (Llama 3 Instruct's eos_token_id;
    the rest are `extra_eos_ids`)."""
    if isinstance(v, list) and v:
        v = v[0]
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def _more_ids(v: Any) -> tuple[int, ...]:
    """config.json's eos_token_id list past its first id (`extra_eos_ids`); () for a single id."""
    if not isinstance(v, list):
        return ()
    return tuple(i for i in v[1:] if isinstance(i, int) and not isinstance(i, bool))


def _flag(v: Any, source: str, key: str) -> bool:
    if not isinstance(v, bool):  # bool("false") is True
        raise ConfigError(f"{source}: field {key!r} must be true or false, got {v!r}")
    return v


def read_json_object(f: Path) -> dict[str, Any]:
    """A JSON file whose top level is an object, or ConfigError naming the file."""
    try:
        if not f.is_file():  # a FIFO or device would block the read forever
            raise ConfigError(f"{f}: not a regular file")
        if f.stat().st_size > 64 * 2**20:
            raise ConfigError(f"{f}: {f.stat().st_size:,} bytes is too large for a config file")
        d = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f}: not valid JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"{f}: JSON nested too deeply") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{f}: expected a JSON object at the top level")
    return d


def with_generation_config(config: ModelConfig, folder: Path) -> ModelConfig:
    """`config` (read from `folder`'s config.json) with the eos_token_id of the folder's generation_config.json
    as `generation_eos_ids`, where it has one: transformers' generate takes that file's, an id or a list, in
    place of config.json's (Llama 3 Instruct's puts <|eot_id|> there alone). A file without the field, or with
    null, leaves config.json's (transformers' generate then stops at no EOS at all)."""
    f = folder / "generation_config.json"
    if not f.exists():
        return config
    v = read_json_object(f).get("eos_token_id")
    if v is None:
        return config
    ids = v if isinstance(v, list) else [v]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < config.vocab_size
                          for i in ids):
        raise ConfigError(f"{f}: field 'eos_token_id' must be a token id or a non-empty list of token ids in "
                          f"[0, vocab_size={config.vocab_size}), got {v!r}")
    return config.replace(generation_eos_ids=tuple(ids))


def _tiny(**kw: Any) -> ModelConfig:
    base: dict[str, Any] = dict(
        vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
        max_seq_len=512, moe=MoEConfig(num_experts=4, top_k=2),
    )
    base.update(kw)
    return ModelConfig(**base)


PRESETS: dict[str, ModelConfig] = {
    "mixtral-8x7b": ModelConfig(),
    "mixtral-8x22b": ModelConfig(
        vocab_size=32768, dim=6144, n_layers=56, n_heads=48, n_kv_heads=8, head_dim=128, ffn_dim=16384,
        max_seq_len=65536, rope_theta=1e6,
    ),
    "mistral-7b": ModelConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
        rope_theta=1e4, max_seq_len=32768, sliding_window=4096, moe=None,
    ),
    # Mixtral-shaped, small enough for a laptop: the performance issue's benchmark model (~0.79B).
    "mini-moe": ModelConfig(
        vocab_size=32000, dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, head_dim=64, ffn_dim=3584,
        rope_theta=1e6, max_seq_len=32768,
    ),
    # Test and demo sizes.
    "tiny-moe": _tiny(),
    "tiny-dense": _tiny(moe=None, sliding_window=32),
}


def get_preset(name: str) -> ModelConfig:
    """The `ModelConfig` of a named size (`PRESETS`: mixtral-8x7b, mixtral-8x22b, mistral-7b, mini-moe,
    and tiny-moe / tiny-dense for tests); ConfigError listing them otherwise, with the nearest name."""
    if not isinstance(name, str):  # else difflib's "'int' object is not iterable" (a list: "unhashable type")
        raise TypeError(f"get_preset takes a preset name (str), not {type(name).__name__}; known presets: "
                        f"{', '.join(sorted(PRESETS))}")
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}{did_you_mean(name)}; known presets: "
                          f"{', '.join(sorted(PRESETS))}") from None


def did_you_mean(name: str, choices: Iterable[str] = PRESETS) -> str:
    """' (did you mean 'tiny-moe'?)' for a name with a typo (a preset's; a command's, a flag's), else ''."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
