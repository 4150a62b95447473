"""The settings of a training or fine-tuning run (`TrainConfig`, `FinetuneConfig`): what they share
(`OptimizerSettings`: AdamW, its schedule and clipping, defined once), reading them (a JSON or TOML
file of field names, then overrides), checking them (every bad value is an error naming the
setting: a TOML `lr = "fast"` or `--lr nan` fails here, not mid-training) and comparing them with a
checkpoint's on resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from mixlab.checkpoint import parse_device
from mixlab.checkpoint.io import CheckpointError
from mixlab.config import ConfigError, ModelConfig, did_you_mean, format_bytes, suffix_of
from mixlab.dtypes import full_name
from mixlab.errors import SettingsFileError
from mixlab.model.memory import available_memory

T = TypeVar("T")
# transformers' TrainingArguments, TRL's and PEFT's names for the settings mixlab calls otherwise (a TRL
# user's config file): an unknown one of these names mixlab's, where difflib finds nothing close.
PEER_NAMES = {"learning_rate": "lr", "max_steps": "steps", "warmup_steps": "warmup", "max_grad_norm": "clip",
              "adam_beta1": "beta1", "adam_beta2": "beta2", "adam_epsilon": "eps", "max_length": "seq_len",
              "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
              "eval_steps": "eval_every", "save_steps": "ckpt_every", "logging_steps": "log_every",
              "save_total_limit": "keep", "output_dir": "out", "model_name_or_path": "model", "loss_type": "loss",
              "lora_r": "lora_rank", "r": "lora_rank", "target_modules": "lora_targets",
              "lora_target_modules": "lora_targets", "gradient_checkpointing": "activation_checkpointing"}
# What a file may not set, only the command line: how the processes are laid out, whether to resume.
FLAG_ONLY = {"ep": "--ep", "fsdp": "--fsdp", "resume": "--resume", "auto_resume": "--auto-resume"}
PATHS = ("data", "valid_data", "out", "model", "init_from", "tokenizer")  # the settings that may name a file


@dataclass
class OptimizerSettings:
    """The optimisation settings training and fine-tuning share: AdamW (`adamw`), linear warmup over
    `warmup` steps then cosine decay to `min_lr_ratio * lr` at `steps` (`lr_at`), gradient clipping
    by global norm at `clip` (0: off; `max_grad_norm`).

    `TrainConfig` and `FinetuneConfig` inherit these fields: they keep their flat names in TOML/JSON
    files, flags, `train_config.json` / `finetune_config.json` and the settings a checkpoint stores,
    so checkpoints written before this class existed resume unchanged. A config with other defaults
    re-declares only the default (fine-tuning: smaller lr, shorter warmup, no weight decay)."""

    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1  # on matrices only: never on norms or other 1-D parameters
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0

    def lr_at(self, step: int) -> float:
        """Linear warmup over `warmup` steps, then cosine decay to `min_lr_ratio * lr` at `steps`."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        frac = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        lo = self.lr * self.min_lr_ratio
        return lo + 0.5 * (self.lr - lo) * (1 + math.cos(math.pi * frac))

    @property
    def max_grad_norm(self) -> float:
        return self.clip if self.clip > 0 else math.inf

    def adamw(self, groups: Iterable[tuple[Sequence[torch.nn.Parameter], bool]], *, device: str) -> torch.optim.AdamW:
        """AdamW over parameter groups given as (parameters, decay?): `weight_decay` where decay is
        True, 0 elsewhere. The groups are kept as given, even empty ones: a checkpoint's optimizer
        state loads only into the same number of groups."""
        # fused: one kernel per parameter for the whole update (CPU and CUDA); the foreach path falls
        # back to ~10 elementwise kernels per parameter on CPU, several times slower (BENCHMARKS.md).
        fused = torch.device(device).type in ("cpu", "cuda")
        return torch.optim.AdamW(
            [{"params": list(ps), "weight_decay": self.weight_decay if decay else 0.0} for ps, decay in groups],
            lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps, fused=fused, foreach=None if fused else True)


AUTOCAST_DTYPES = ("float32", "bfloat16")  # float32: autocast off
# The numeric settings both runs have: (finite numbers >= 0, integers in [0, LARGEST], integers in [1, LARGEST]).
NUMBERS = tuple(f.name for f in dataclasses.fields(OptimizerSettings) if f.type == "float")
INTEGERS = ("warmup", "threads", "eval_every", "ckpt_every", "keep", "seed")
POSITIVE = ("seq_len", "batch_size", "grad_accum", "steps", "log_every")  # log_every 0: a division by zero
LARGEST = 2**63 - 1  # an integer setting's largest value (an int64: the seed, the step counters)


def read_settings(cls: type[T], path: str | Path | None, overrides: dict[str, Any], *,
                  what: str) -> tuple[T, set[str]]:
    """A `cls` dataclass from a JSON or TOML file (keys = field names), then `overrides` (None =
    unset; a table is merged into the file's, key by key), and the settings the file set that no
    override replaced; `what` ("training", "fine-tuning") names the settings in errors."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
            d = tomllib.loads(text) if suffix_of(p) == ".toml" else json.loads(text)
        except FileNotFoundError:
            raise SettingsFileError(f"{p}: {what} config file not found") from None
        except IsADirectoryError:  # `mixlab train data/corpus`: the dataset where the config file goes
            raise SettingsFileError(f"{p}: a folder, not a {what} config file (.toml or .json), which the "
                                    "command's first argument names; a dataset or model folder goes to --data or "
                                    "--model") from None
        except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            # a name other than .toml / .json is read as JSON: say so (TRL's `--config x.yaml` is YAML)
            read_as = "" if suffix_of(p) in (".toml", ".json") else \
                f"; a {what} config file is TOML (named .toml) or JSON, not YAML or another format"
            raise SettingsFileError(f"{p}: not valid {'TOML' if suffix_of(p) == '.toml' else 'JSON'} ({e}){read_as}") \
                from None
        except RecursionError:  # the parsers' own error for '[[[[...'
            raise SettingsFileError(f"{p}: nested too deeply") from None
        if not isinstance(d, dict):
            raise SettingsFileError(f"{p}: expected a table / object of {what} settings")
    from_file = set(d) - {k for k, v in overrides.items() if v is not None}
    for k, v in overrides.items():
        if v is not None:  # a table (model_overrides) is merged field by field: `--set` keeps the file's others
            d[k] = _merged(d[k], v) if isinstance(d.get(k), dict) and isinstance(v, dict) else v
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(d) - set(known))
    if unknown:  # a file's key, or an override's (made in Python): name the file where one was read
        named = ", ".join(k + (f" (mixlab's name: {PEER_NAMES[k]!r})" if PEER_NAMES.get(k) in known
                               else f" (a command-line flag, not a setting: {FLAG_ONLY[k]})" if k in FLAG_ONLY
                               else did_you_mean(k, known)) for k in unknown)
        message = f"unknown {what} setting(s): {named}; known: {', '.join(known)}"
        if path is not None:
            raise SettingsFileError(f"{path}: {message}")
        raise ConfigError(message)
    for k in PATHS:  # a file's `out = "~/runs/a"` (no shell expands it) is in the home folder, not ./~/runs/a
        if isinstance(d.get(k), str):
            d[k] = os.path.expanduser(d[k])
    if isinstance(d.get("dtype"), str):  # `dtype = "bf16"`, as --dtype bf16 takes it
        d["dtype"] = full_name(d["dtype"])
    return paths_as_text(cls(**d)), from_file


def load_settings(cls: type[T], path: str | Path | None, overrides: dict[str, Any], *, what: str,
                  check: Callable[[T], T], then: Callable[[T], object] | None = None,
                  given: set[str] | None = None) -> T:
    """`check(cfg)` of the settings `read_settings` reads, then `then(cfg)` (a caller's further check:
    the commands' of the model they will build). A ConfigError on a setting (`setting_of`) the file set,
    that no override replaced, is the file's: a SettingsFileError naming it (`run.toml: training setting
    'lr' must be ...`; exit 1 from the command); one on an override's, a default's or none is left as it
    is (the command line's: cli/train.py's `flag_errors` names the flag, exit 2). `given`, where passed, is
    filled before `then` runs with the settings the file or an override set (the rest are defaults: `mixlab
    sft` lowers seq_len's to a shorter model's context), so the file is read once."""
    cfg, from_file = read_settings(cls, path, overrides, what=what)  # its own errors name the file
    if given is not None:
        given.update(from_file, (k for k, v in overrides.items() if v is not None))
    try:
        cfg = check(cfg)
        if then is not None:
            then(cfg)
        return cfg
    except ConfigError as e:
        if (setting := setting_of(e)) in from_file:
            raise SettingsFileError(f"{path}: {e}", setting=setting) from None
        raise


def setting_of(e: ConfigError) -> str | None:
    """The setting a ConfigError of the checks is about: its `setting`, else (a check that does not say) the one
    its message names as `... setting 'lr' ...`, a model field's (`config field 'dim' ...`): model_overrides,
    else its first word."""
    if e.setting is not None:
        return e.setting
    m = re.match(r"[\w-]+ setting '(\w+)'|(config field)|(\w+)", str(e))
    return (m[1] or m[3] or "model_overrides") if m else None


def paths_as_text(cfg: T) -> T:
    """`cfg` with each path setting (`PATHS`) given as a `Path` turned into its text: settings made in
    Python may name files by `Path`, but they are stored as JSON with every checkpoint (a `Path` there
    was a TypeError once the first step had run)."""
    paths = {k: os.fspath(v) for k in PATHS if isinstance(v := getattr(cfg, k, None), os.PathLike)}
    return dataclasses.replace(cfg, **paths) if paths else cfg  # type: ignore[type-var]


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def check_settings(cfg: Any, *, what: str, numbers: tuple[str, ...] = NUMBERS,
                   integers: tuple[str, ...] = INTEGERS, above_zero: tuple[str, ...] = ("eps",)) -> None:
    """The settings every run has: batch shape and steps positive integers, the autocast dtype, the
    numbers finite and in range (those of `numbers` in `above_zero` > 0, the rest >= 0: a config's
    `beta = "x"` is told what `--beta 0` is), the device one this torch has; text, switch and table
    settings of their type (a TOML `compile = "yes"` or `model = 5` fails here, not mid-run)."""
    for f in dataclasses.fields(cfg):
        v, kind = getattr(cfg, f.name), str(f.type)
        if kind == "str" and not isinstance(v, str):
            raise ConfigError(f"{what} setting {f.name!r} must be a string, got {v!r}", setting=f.name)
        if kind in ("bool", "bool | None") and not (isinstance(v, bool) or v is None and kind != "bool"):
            raise ConfigError(f"{what} setting {f.name!r} must be true or false, got {v!r}", setting=f.name)
        if kind.startswith("dict") and not isinstance(v, dict):
            raise ConfigError(f"{what} setting {f.name!r} must be a table of fields, got {v!r}", setting=f.name)
    for name in POSITIVE:  # at most LARGEST: grad_accum 10**20 was an OverflowError in the loss's division
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= LARGEST:
            raise ConfigError(f"{what} setting {name!r} must be an integer in [1, {LARGEST}], got {v!r}",
                              setting=name)
    if cfg.dtype not in AUTOCAST_DTYPES:
        raise ConfigError(f"{what} setting 'dtype' must be 'float32' or 'bfloat16', got {cfg.dtype!r}",
                          setting="dtype")
    for name in numbers:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0 or \
                (name in above_zero and v == 0):
            want = "a finite number > 0" if name in above_zero else "a finite number >= 0"
            raise ConfigError(f"{what} setting {name!r} must be {want}, got {v!r}", setting=name)
    for name in integers:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= LARGEST:
            raise ConfigError(f"{what} setting {name!r} must be an integer in [0, {LARGEST}], got {v!r}",
                              setting=name)
    try:
        parse_device(cfg.device)
    except ValueError as e:
        raise ConfigError(f"{what} setting 'device': {e}", setting="device") from None
    for name in ("beta1", "beta2", "min_lr_ratio"):
        if getattr(cfg, name) > 1:
            raise ConfigError(f"{what} setting {name!r} must be at most 1, got {getattr(cfg, name)!r}",
                              setting=name)


def check_context(seq_len: int, mc: ModelConfig) -> None:
    """A run's seq_len fits the model's positions."""
    if seq_len > mc.max_seq_len:
        raise ConfigError(f"seq_len {seq_len} is beyond the model's context (max_seq_len {mc.max_seq_len}); "
                          f"set --seq-len (seq_len in a config file) to {mc.max_seq_len} or less",
                          setting="seq_len")


def check_batch_fits(mc: ModelConfig, *, batch_size: int, seq_len: int, device: str, rows_per_item: int = 1,
                     processes: int = 1) -> None:
    """ConfigError when one micro-batch cannot fit in the memory free on `device`: a batch_size of
    10^11 otherwise grew the loader's rows until the machine struggled. The estimate is a floor (the
    float32 logits and each layer's bf16 input, not the weights, the optimizer or the rest of a
    block's activations), so no batch that fits is refused. `rows_per_item`: DPO's 2 sequences per
    pair; `processes`: a distributed run's, each holding its share of the rows."""
    dev = parse_device(device)
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
    elif dev.type == "cpu":
        free = available_memory()
    else:
        return
    per_item = rows_per_item * seq_len * (4 * mc.vocab_size + 2 * mc.dim * mc.n_layers)
    need = -(-batch_size // processes) * per_item
    if free and need > free:
        share = " a process's share of" if processes > 1 else ""
        raise ConfigError(f"batch_size {batch_size} cannot fit:{share} one micro-batch ({rows_per_item * seq_len} "
                          f"tokens an item) needs at least {format_bytes(need)} for its logits and layer inputs "
                          f"alone, where {format_bytes(free)} of memory is free on {dev.type}; at most "
                          f"{free // per_item * processes} fit (grad_accum makes larger steps)",
                          setting="batch_size")


def check_split(batch_size: int, processes: int, *, what: str) -> None:
    """ConfigError unless `batch_size` (the global one) splits evenly over the `processes` of a
    data-parallel run: each computes its equal share of the rows of every micro-batch."""
    if batch_size % processes:
        raise ConfigError(f"{what} setting 'batch_size' must be a multiple of the number of processes ({processes}), "
                          f"got {batch_size}", setting="batch_size")


def real_paths(cfg: Any, names: tuple[str, ...]) -> dict[str, str]:
    """Where each setting of `names` that names an existing file or folder points (a checkpoint's
    `paths`, for `check_resume_settings`)."""
    return {k: os.path.realpath(v) for k in names if isinstance(v := getattr(cfg, k, None), str) and v
            and os.path.exists(v)}


def _shown(v: Any, other: Any) -> str:
    """`v` as a resume refusal shows it: a float setting's number as a float beside a float (a TOML
    `lora_alpha = 8` read back as 8 showed "checkpoint 8 vs now 16.0")."""
    if isinstance(v, int) and not isinstance(v, bool) and isinstance(other, float):
        return repr(float(v))
    return repr(v)


def check_resume_settings(saved: dict[str, Any], cfg: Any, *, run_only: set[str], ckpt: Path, what: str,
                          paths: dict[str, str] | None = None) -> None:
    """CheckpointError unless `cfg` has the settings the checkpoint `ckpt` was saved with (`saved`:
    its stored `asdict(cfg)`), except those in `run_only`. A field added after the checkpoint was
    written is absent from it: its default is what that run used. `paths`: the checkpoint's
    `real_paths`; a path setting naming the same file or folder otherwise (`./base`, an absolute path,
    another working directory) is the same setting (the strings alone refused such a resume)."""
    now = dataclasses.asdict(cfg)
    saved = dict(saved)
    for k, real in (paths or {}).items():
        if k in now and real_paths(cfg, (k,)).get(k) == real:
            saved[k] = now[k]
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    diff = sorted(k for k in now if k not in run_only and saved.get(k, defaults.get(k)) != now[k])
    if diff:
        detail = ", ".join(f"{k}: checkpoint {_shown(saved.get(k), now[k])} vs now {_shown(now[k], saved.get(k))}"
                           for k in diff[:4])
        raise CheckpointError(f"{ckpt}: saved with different {what} settings ({detail}); "
                              "use the original settings or a new --out folder")
