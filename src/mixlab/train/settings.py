"""Reading and checking the settings of a training or fine-tuning run (`TrainConfig`,
`FinetuneConfig`): a JSON or TOML file of field names, then overrides; every bad value is an error
naming the setting (a TOML `lr = "fast"` or `--lr nan` fails here, not mid-training)."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from mixlab.checkpoint import parse_device
from mixlab.config import ConfigError

T = TypeVar("T")

AUTOCAST_DTYPES = ("float32", "bfloat16")  # float32: autocast off
# The numeric settings both runs have: (finite numbers >= 0, integers >= 0).
NUMBERS = ("eps", "lr", "min_lr_ratio", "weight_decay", "clip", "beta1", "beta2")
INTEGERS = ("warmup", "threads", "eval_every", "ckpt_every", "keep", "log_every", "seed")


def read_settings(cls: type[T], path: str | Path | None, overrides: dict[str, Any], *, what: str) -> T:
    """A `cls` dataclass from a JSON or TOML file (keys = field names), then `overrides` (None =
    unset); `what` ("training", "fine-tuning") names the settings in errors."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
            d = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"{p}: {what} config file not found") from None
        except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'JSON'} ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{p}: expected a table / object of {what} settings")
    d.update({k: v for k, v in overrides.items() if v is not None})
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"unknown {what} setting(s): {', '.join(unknown)}; known: {', '.join(known)}")
    return cls(**d)


def check_settings(cfg: Any, *, what: str, numbers: tuple[str, ...] = NUMBERS,
                   integers: tuple[str, ...] = INTEGERS) -> None:
    """The settings every run has: batch shape and steps positive integers, the autocast dtype, the
    numbers finite and in range, the device one this torch has."""
    for name in ("seq_len", "batch_size", "grad_accum", "steps"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{what} setting {name!r} must be a positive integer, got {v!r}")
    if cfg.dtype not in AUTOCAST_DTYPES:
        raise ConfigError(f"{what} setting 'dtype' must be 'float32' or 'bfloat16', got {cfg.dtype!r}")
    for name in numbers:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0 or \
                (name == "eps" and v == 0):
            want = "a finite number > 0" if name == "eps" else "a finite number >= 0"
            raise ConfigError(f"{what} setting {name!r} must be {want}, got {v!r}")
    for name in integers:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 2**63 - 1:
            raise ConfigError(f"{what} setting {name!r} must be an integer in [0, {2**63 - 1}], got {v!r}")
    try:
        parse_device(cfg.device)
    except ValueError as e:
        raise ConfigError(f"{what} setting 'device': {e}") from None
    for name in ("beta1", "beta2", "min_lr_ratio"):
        if getattr(cfg, name) > 1:
            raise ConfigError(f"{what} setting {name!r} must be at most 1, got {getattr(cfg, name)!r}")
