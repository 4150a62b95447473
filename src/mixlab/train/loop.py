"""The training loop: `TrainConfig` (one flat dataclass, read from JSON / TOML plus overrides) and
`train(config)`.

Shape legend: B batch, T sequence length, V vocabulary, L MoE layers, E experts.

One optimizer step = `grad_accum` micro-batches of B windows of T tokens; loss = cross-entropy +
aux_loss_coef * load-balancing loss + z_loss_coef * router z-loss (see losses.py). AdamW with linear
warmup then cosine decay to `min_lr_ratio * lr`; gradient clipping by global norm; optional bf16
autocast (the router stays float32: model/moe.py computes it outside autocast), activation
checkpointing per block, and torch.compile.

Run folder (`out`):

    metrics.jsonl            one JSON record per logged step and per evaluation (`eval_loss` and
                             `eval_bpb`, bits per byte, over all domains; `eval`, `eval_ppl` and
                             `eval_domain_bpb` per domain)
    checkpoints/step_*/      crash-safe checkpoints (checkpoints.py), the newest `keep`
    hf/                      the final model in transformers format (+ mixlab_data.json: tokenizer)

SIGINT / SIGTERM finish the current step, save a checkpoint and return; `resume=True` continues
from the newest checkpoint exactly (same batches, RNG, optimizer state and schedule).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from mixlab import atomic
from mixlab.checkpoint import save_model
from mixlab.checkpoint.io import CheckpointError
from mixlab.config import ConfigError, ModelConfig, MoEConfig, get_preset, suffix_of, usable_threads
from mixlab.corpus import same_vocabulary
from mixlab.errors import OutputError, TrainingError
from mixlab.eval.perplexity import Score, score_windows
from mixlab.model import Transformer
from mixlab.model.transformer import ModelOutput
from mixlab.train import checkpoints
from mixlab.train.data import BatchLoader, DataError, TokenDataset, eval_windows
from mixlab.train.losses import expert_load, lm_loss, router_losses
from mixlab.train.plot import read_metrics
from mixlab.train.settings import (
    INTEGERS,
    NUMBERS,
    OptimizerSettings,
    check_batch_fits,
    check_context,
    check_resume_settings,
    check_settings,
    load_settings,
    paths_as_text,
    real_paths,
)


@dataclass
class TrainConfig(OptimizerSettings):
    """A pretraining run's settings. The optimizer's (steps, lr, min_lr_ratio, warmup, weight_decay,
    beta1, beta2, eps, clip) are `OptimizerSettings`', shared with fine-tuning."""

    data: str = ""  # a prepared dataset folder (`mixlab data prepare`)
    out: str = "runs/train"
    # Model: a preset name or a checkpoint folder's config, then field overrides ("moe" a dict).
    model: str = "tiny-moe"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_std: float = 0.02
    # Start from these weights instead of a random init: any checkpoint folder mixlab loads
    # (transformers or Mistral format, an upcycled model), a training checkpoint `step_*` folder, or
    # a run folder (its `hf/` export, else its newest checkpoint). The model config is the
    # checkpoint's (`model` is ignored); `model_overrides` may change training-only fields.
    init_from: str = ""
    # Data and batch.
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    data_offset: int = 0  # training windows to skip first (continue the stream an earlier run stopped in)
    # Optimisation: OptimizerSettings' fields, with its defaults.
    # A step whose loss or gradient norm is NaN/Inf stops training with an error naming the step;
    # with skip_nonfinite, the step's update is skipped instead (counted in metrics as "skipped").
    skip_nonfinite: bool = False
    # Numerics and speed.
    dtype: str = "float32"  # autocast dtype: float32 (off) or bfloat16
    device: str = "cpu"
    # CPU threads (0 = torch's default). On an oversubscribed CPU, 1 thread can be much faster than 2 (BENCHMARKS.md):
    # OpenMP workers spin-wait for siblings that are descheduled.
    threads: int = 0
    activation_checkpointing: bool = False
    compile: bool = False
    deterministic: bool = False
    moe_impl: str = "auto"
    # Bookkeeping (these may change between a run and its resume).
    eval_every: int = 200
    eval_windows: int = 16  # per domain
    ckpt_every: int = 200
    keep: int = 3
    log_every: int = 10
    export_hf: bool = True
    progress: bool = True
    tensorboard: bool = True


# Fields that may differ between the processes of one run (each node its own copy of the data: its
# contents are compared; CPU threads; what only rank 0 does); everything else must match.
PER_PROCESS = {"data", "threads", "progress", "tensorboard"}
# Fields that may differ between a run and its resumption; everything else must match.
RUN_ONLY = {"data", "out", "eval_every", "eval_windows", "ckpt_every", "keep", "log_every", "export_hf", "progress",
            "tensorboard", "compile", "activation_checkpointing", "device", "moe_impl", "threads", "skip_nonfinite"}


def load_train_config(path: str | Path | None = None, *, then: Callable[[TrainConfig], object] | None = None,
                      given: set[str] | None = None, **overrides: Any) -> TrainConfig:
    """A `TrainConfig` from a JSON or TOML file (keys = field names), then `overrides` (None = unset),
    checked (`check_train_config`, then `then`: `mixlab train`'s model config) as `load_settings` has it
    (`given`: filled with the settings the file or an override set)."""
    return load_settings(TrainConfig, path, overrides, what="training", check=check_train_config, then=then,
                         given=given)


def check_train_config(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with every setting checked (ConfigError naming the first bad one) and its path settings as
    text: what `load_train_config` returns, and what `train` makes of a `TrainConfig` built in Python
    (whose lr="3e-4" failed inside AdamW, dtype="fp16" trained in float32 without a word)."""
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"train takes a TrainConfig (load_train_config(path, **overrides) reads one), "
                          f"not {type(cfg).__name__}")
    cfg = paths_as_text(cfg)
    check_settings(cfg, what="training", numbers=(*NUMBERS, "init_std"), integers=(*INTEGERS, "eval_windows"))
    if not isinstance(cfg.data_offset, int) or cfg.data_offset < 0:
        raise ConfigError(f"training setting 'data_offset' must be a non-negative integer, got {cfg.data_offset!r}",
                          setting="data_offset")
    return cfg


# the fields that shape the weights: an `init_from` run cannot override them
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")


def build_model_config(cfg: TrainConfig, dataset: TokenDataset, *, check_len: bool = True) -> ModelConfig:
    """The preset (or checkpoint config) with overrides; vocabulary and BOS/EOS from the dataset.
    With `init_from`, the starting checkpoint's config (its vocabulary must cover the dataset's, and
    the tokenizer it names be the dataset's: `check_same_tokenizer`). `check_len`: cfg.seq_len checked
    against the model's context (`check_context`; `mixlab train` checks it after lowering its default)."""
    over = dict(cfg.model_overrides)
    moe_over = over.pop("moe", None)
    if moe_over is not None and not isinstance(moe_over, dict):
        raise ConfigError(f"model_overrides: 'moe' must be a table of fields (moe.num_experts, ...), got {moe_over!r}",
                          setting="model_overrides")
    for fields, given, prefix in ((ModelConfig, over, ""), (MoEConfig, moe_over or {}, "moe.")):
        known = [f.name for f in dataclasses.fields(fields) if f.name != "moe"]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ConfigError(f"model_overrides: unknown model field(s) {', '.join(prefix + k for k in unknown)}; "
                              f"known: {', '.join(prefix + k for k in known)}", setting="model_overrides")
    if cfg.init_from:
        base = checkpoints.init_config(cfg.init_from)
        check_same_tokenizer(cfg.init_from, dataset)
        over.setdefault("vocab_size", base.vocab_size)
        over.setdefault("bos_id", base.bos_id)
        over.setdefault("eos_id", base.eos_id)
    else:
        if Path(cfg.model).is_file():  # it said "unknown preset" of a checkpoint's file or a GGUF
            raise ConfigError(f"training setting 'model': {cfg.model} is a file; the model is a preset or a "
                              "checkpoint folder (its config.json or params.json)" + (
                                  f": `mixlab convert {cfg.model} DIR` writes the GGUF as one"
                                  if suffix_of(cfg.model) == ".gguf" else ""), setting="model")
        if Path(cfg.model).is_dir():
            base = ModelConfig.from_dir(cfg.model)
        elif os.sep in cfg.model or cfg.model.startswith("."):  # a folder's path (it said "unknown preset")
            raise CheckpointError(f"{cfg.model}: no such checkpoint folder (the model is one, or a preset)")
        else:
            try:
                base = get_preset(cfg.model)
            except ConfigError as e:  # the setting named: `--model tiny-mo`'s error names the flag
                raise ConfigError(f"training setting 'model': {e}", setting="model") from None
        over.setdefault("vocab_size", dataset.vocab_size)
    if over["vocab_size"] < dataset.vocab_size:
        named, setting = (("model_overrides:", "model_overrides") if "vocab_size" in cfg.model_overrides else
                          ("model", "model") if not cfg.init_from else
                          (f"init_from (--init-from) {cfg.init_from}:", "init_from"))
        raise ConfigError(f"{named} vocab_size {over['vocab_size']} is smaller than the dataset's tokenizer "
                          f"vocabulary ({dataset.vocab_size})", setting=setting)
    over.setdefault("bos_id", dataset.bos_id)
    over.setdefault("eos_id", dataset.eos_id)
    if base.extra_eos_ids and "extra_eos_ids" not in over:  # a Llama 3's EOS list: its ids besides the data's
        same = over["vocab_size"] == base.vocab_size      # EOS where the data's vocabulary is the model's
        over["extra_eos_ids"] = tuple(i for i in base.eos_ids if i != over["eos_id"]) if same else ()
    if cfg.init_from:  # the starting weights fix the shape: a file's override was blamed on the checkpoint
        shape = [(k, v, getattr(base, k)) for k, v in over.items() if k in SHAPE_FIELDS and v != getattr(base, k)]
        if moe_over and base.moe is not None and moe_over.get("num_experts", base.moe.num_experts) != \
                base.moe.num_experts:
            shape.append(("moe.num_experts", moe_over["num_experts"], base.moe.num_experts))
        if shape:
            k, v, was = shape[0]
            raise ConfigError(f"model_overrides: {k} = {v!r}, but the weights of init_from {cfg.init_from} have "
                              f"{k} = {was!r}; the starting weights fix the model's shape: remove {k} from "
                              "model_overrides (the config file's [model_overrides], or --set)",
                              setting="model_overrides")
    try:
        mc = base.replace(**over)
        if moe_over:
            if mc.moe is None:
                raise ConfigError("model_overrides.moe given for a dense model")
            mc = mc.replace(moe=dataclasses.replace(mc.moe, **moe_over))
    except TypeError as e:
        raise ConfigError(f"model_overrides: {e}", setting="model_overrides") from None
    except ConfigError as e:  # a field out of range (`config field 'dim' must be ...`, as ModelConfig says it)
        e.setting = "model_overrides"
        raise
    if check_len:
        check_context(cfg.seq_len, mc)
    return mc


def check_same_tokenizer(init_from: str, dataset: TokenDataset) -> None:
    """Refuse training the weights of `init_from` on data another tokenizer wrote, where the checkpoint
    names its own (`checkpoints.trained_tokenizer`) and it can be read: its vocabulary covering the
    data's ids is not enough (a model of Mixtral's tokenizer trained on `bytes` data, `data prepare`'s
    default, was trained without a word on its byte pieces alone)."""
    try:
        trained = checkpoints.trained_tokenizer(init_from)
        tok = dataset.tokenizer() if trained is not None else None
    except (ValueError, OSError):  # a tokenizer file moved or damaged since: training does not need it
        return
    if trained is None or tok is None or same_vocabulary(trained[0], tok):
        return
    raise ConfigError(f"init_from (--init-from) {init_from}: its tokenizer ({trained[0].name}) is not the one "
                      f"{dataset.path} was prepared with ({tok.name}, meta.json's); prepare the data again with "
                      f"--tokenizer {trained[0].name}", setting="init_from")


def lr_at(step: int, cfg: OptimizerSettings) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to `min_lr_ratio * lr` at `steps`."""
    return cfg.lr_at(step)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # No weight decay on norms (1-D) — decay pulls RMSNorm gains toward 0 (as nanoGPT / torchtitan).
    # Sharded parameters (DTensors) on different device meshes (FSDP's dense weights over all ranks,
    # experts over the data-parallel ranks) go in separate groups: one fused update cannot mix them.
    groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for p in model.parameters():
        groups.setdefault((id(getattr(p, "device_mesh", None)), p.dim() >= 2), []).append(p)
    return cfg.adamw([(ps, decay) for (_, decay), ps in sorted(groups.items(), key=lambda kv: not kv[0][1])],
                     device=cfg.device)


def enable_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in backward (use_reentrant=False also replays router jitter)."""
    for block in model.layers:
        fwd = block.forward
        block.forward = functools.partial(activation_checkpoint, fwd, use_reentrant=False)


def keep_freed_memory() -> bool:
    """Ask the C library's malloc (glibc) to keep freed memory for reuse rather than return it to the
    operating system. A training step frees and reallocates the same activation and gradient buffers
    every step; by default glibc serves large blocks with mmap and unmaps them on free, so each step
    page-faults them all in again (about 20,000 faults per step in benchmarks/train.py, 10-15% of
    its step time). Process-wide; peak memory is unchanged. False where there is no `mallopt`."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # malloc.h
    return all([mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1, mallopt(M_TOP_PAD, 64 << 20) == 1,
                mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1])  # 32 MiB: the largest glibc accepts


def compile_model(model: Transformer) -> Callable[..., Any]:
    """torch.compile of the model as one graph (forward and backward): the sorted MoE path's
    per-expert row counts (`.tolist()`) are captured as symbolic sizes instead of breaking the graph
    once per MoE layer (tests/test_train_fastpaths.py checks that nothing else breaks it)."""
    torch._dynamo.config.capture_scalar_outputs = True
    return torch.compile(model.forward_output)


def autocast(cfg: TrainConfig) -> torch.autocast:
    dev = torch.device(cfg.device).type
    return torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


@torch.no_grad()
def evaluate(model: Transformer, dataset: TokenDataset, cfg: TrainConfig, *, split: str = "valid",
             forward: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Loss, perplexity, bits per byte and expert load `[L, E]` per domain on fixed windows of
    `split`, scored by mixlab.eval's `score_windows` (the code behind `mixlab eval`).

    Bits per byte = NLL / ln 2 / the bytes of text the scored tokens stand for: their count times the
    split's bytes per token (`TokenDataset.bytes_per_token`, from `prepare`). Exact when the windows
    cover the split, an evenly spread sample's estimate otherwise; the BOS/EOS targets count, as in
    the loss, so it differs slightly from `mixlab eval`'s per-document figure (lm-eval's convention).
    `bpb` / `mean_bpb` are absent for a dataset without byte counts (another tokenizer, prepared
    before they were recorded)."""
    fwd = forward if forward is not None else model.forward_output  # not `or`: a compiled function has no truth value
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {"loss": {}, "ppl": {}, "bpb": {}, "load": {}}
    total = Score()
    total_bytes: float | None = 0.0
    E = model.config.moe.num_experts if model.config.moe else 0
    loads: list[torch.Tensor] = []  # expert load [L, E] of each batch, weighted by its tokens

    def logits(x_BT: torch.Tensor) -> torch.Tensor:
        with autocast(cfg):
            o = fwd(x_BT)
        assert o.logits_BTV is not None
        if E:
            loads.append(expert_load(o.routing, E) * x_BT.numel())
        return o.logits_BTV

    for domain in dataset.split_domains(split):
        w = eval_windows(dataset, split=split, domain=domain, seq_len=cfg.seq_len, max_windows=cfg.eval_windows)
        if len(w) == 0:
            continue
        loads.clear()
        s = score_windows(logits, w, batch_size=cfg.batch_size, device=cfg.device)
        out["loss"][domain] = s.loss
        out["ppl"][domain] = math.exp(min(s.loss, 50.0))
        bpt = dataset.bytes_per_token(split, domain)
        if bpt:
            out["bpb"][domain] = s.nll / (s.tokens * bpt) / math.log(2)
            total_bytes = None if total_bytes is None else total_bytes + s.tokens * bpt
        else:
            total_bytes = None
        if loads:
            load = loads[0]
            for ld in loads[1:]:
                load = load + ld
            out["load"][domain] = (load / s.tokens).tolist()
        total.add(s)
    out["mean_loss"] = total.loss
    if total_bytes:  # over all domains, weighted by their bytes
        out["mean_bpb"] = total.nll / total_bytes / math.log(2)
    model.train(was_training)
    return out


def eval_line(ev: dict[str, Any]) -> str:
    """`evaluate`'s result in one progress line: mean validation loss, perplexity, bits per byte."""
    bpb = f", {ev['mean_bpb']:.4f} bits/byte" if "mean_bpb" in ev else ""
    return f"valid loss {ev['mean_loss']:.4f} (ppl {math.exp(min(ev['mean_loss'], 50)):.2f}{bpb})"


class Parallel(Protocol):
    """How `train` runs over several processes (`mixlab.parallel.train.DistributedTraining` builds
    one: expert parallelism, FSDP, distributed checkpoints). `None` means one process."""

    rank: int
    world: int
    is_main: bool  # writes metrics, progress and the export

    def check_same(self, values: dict[str, Any]) -> None: ...  # refuse a run whose processes disagree on them
    def check_shared(self, folder: Path) -> None: ...  # refuse a folder some process does not see as rank 0 does
    def parallelize(self, model: Transformer) -> None: ...  # shard it, in place, before the optimizer
    # the sharded model as init_weights (or load_init of init_from) then parallelize would make it,
    # never holding the whole model; dtype: the autocast dtype (FSDP gathers bfloat16's blocks in bf16)
    def build(self, config: ModelConfig, *, device: torch.device, std: float, seed: int,
              init_from: str = "", dtype: str = "float32") -> Transformer: ...
    def all_sum(self, t: torch.Tensor) -> torch.Tensor: ...  # summed over all processes
    def sync_grads(self, model: Transformer) -> None: ...  # gradients of the global batch's mean loss
    def clip_grad_norm(self, model: Transformer, max_norm: float) -> float: ...
    def save(self, root: Path, *, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
             state: dict[str, Any], keep: int) -> Path: ...
    def load(self, ckpt: Path, *, model: Transformer, optimizer: torch.optim.Optimizer,
             checksums: bool = True) -> dict[str, Any]: ...
    # write(model, path, weights=): `export`, each tensor from weights(name) as the writer reaches it
    def export(self, model: Transformer, path: Path, write: Callable[..., None]) -> None: ...


@dataclass
class TrainResult:
    step: int
    history: list[dict[str, Any]]  # one record per optimizer step of this run
    evals: list[dict[str, Any]]
    stopped_by: int | None  # the signal number that stopped the run, if any
    model: Transformer
    out: Path


class _Metrics:
    def __init__(self, out: Path, *, resume_step: int | None, tensorboard: bool) -> None:
        self.path = out / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            # Drop records written after the checkpoint we resume from: they will be redone.
            # A torn last line (the process was killed mid-write) is dropped; damage elsewhere is an error.
            keep = [rec for rec in read_metrics(self.path) if rec.get("step", 0) <= resume_step]
            atomic.write_text(self.path, "".join(json.dumps(rec) + "\n" for rec in keep))
        elif self.path.exists():
            self.path.unlink()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # A resume redoes the steps after its checkpoint: TensorBoard hides those the killed run
                # logged (else each shows twice, the curve folding back on itself).
                self.tb = SummaryWriter(str(out / "tensorboard"),
                                        purge_step=None if resume_step is None else resume_step + 1)
            except ImportError:
                pass

    def write(self, rec: dict[str, Any]) -> None:
        # Append-only (not atomic): a crash can tear only the last line, which a resume drops.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])
                elif isinstance(v, dict):
                    for kk, vv in v.items():
                        if isinstance(vv, (int, float)):
                            self.tb.add_scalar(f"{k}/{kk}", vv, rec["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _NoMetrics(_Metrics):
    """Ranks other than the first write nothing."""

    def __init__(self) -> None:
        self.tb = None

    def write(self, rec: dict[str, Any]) -> None:
        pass


def _check_resume(state: dict[str, Any], cfg: TrainConfig, mc: ModelConfig, fingerprint: dict, ckpt: Path) -> None:
    saved_model = state.get("model_config")
    if saved_model != mc.to_hf_dict() | {"moe": dataclasses.asdict(mc.moe) if mc.moe else None}:
        now = mc.to_hf_dict() | {"moe": dataclasses.asdict(mc.moe) if mc.moe else None}
        diff = sorted(k for k in set(now) | set(saved_model or {}) if (saved_model or {}).get(k) != now.get(k))
        raise CheckpointError(f"{ckpt}: saved with a different model config (fields: {', '.join(diff)}); "
                              "use the original settings or a new --out folder")
    check_resume_settings(state.get("train_config", {}), cfg, run_only=RUN_ONLY, ckpt=ckpt, what="training",
                          paths=state.get("paths"))
    if state.get("data") != fingerprint:
        raise CheckpointError(f"{ckpt}: saved for a different dataset (tokenizer or token counts differ from "
                              f"{cfg.data})")


def check_run_folder(out: Path, sources: Sequence[str]) -> list[str]:
    """Refuse, before any training, a run folder (`--out`) that is a file (mkdir's bare 'File exists') or
    one of the run's `sources`, its data or starting weights (`sft --model M --out M` filled the model's
    folder with the run's). The sources that are files or folders (a preset's name is not), for
    `check_export_folder`."""
    paths = [s for s in sources if s and os.path.exists(s)]
    for s in paths:
        if os.path.realpath(s) == os.path.realpath(out):
            raise OutputError(f"{out}: refusing to write the run there: it is the source {s}; choose another --out")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; the run folder goes there: choose another --out")
    above = next((p for p in out.parents if os.path.lexists(p)), None)
    if not out.exists() and above is not None and not above.is_dir():  # mkdir's bare 'Not a directory'
        raise OutputError(f"{out}: {above} is a file, not a folder; the run folder goes there: choose another --out")
    return paths


def check_export_folder(path: Path, sources: Sequence[str]) -> None:
    """Refuse, before any training, a run whose final export could not replace `path` (it holds
    files mixlab did not write) or would replace one of its `sources` (`sft --model RUN/hf --out RUN`
    replaced its starting weights with the result): the run would otherwise fail only at its end."""
    if path.is_dir() and (foreign := atomic.foreign_entries(path)):
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(f"{path}: holds files mixlab did not write ({shown}); the run exports its model "
                          "there at the end: move them or choose another --out")
    atomic.check_destination(path, sources=sources)  # e.g. a file of that name


def train(cfg: TrainConfig, *, resume: bool | str = False, stop_after: int | None = None,
          on_step: Callable[[dict[str, Any]], bool | None] | None = None,
          parallel: Parallel | None = None) -> TrainResult:
    """Train per `cfg`. `resume`: continue from the newest checkpoint in `cfg.out` (an error if there
    is none); "auto": continue from it when there is one, else start. `stop_after`: stop (with a
    checkpoint) after this many steps in total, as if killed. `on_step(record)` is called after every
    step; returning True ends the run there (checkpointed, exported). `parallel`: run as one of
    several processes (see `Parallel`); the global batch, the schedule and the checkpoints' contents
    are those of a one-process run."""
    cfg = check_train_config(cfg)
    dataset = TokenDataset(cfg.data)
    mc = build_model_config(cfg, dataset)
    check_batch_fits(mc, batch_size=cfg.batch_size, seq_len=cfg.seq_len, device=cfg.device,
                     processes=parallel.world if parallel is not None else 1)
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    sources = check_run_folder(out, [cfg.data, cfg.init_from, cfg.model])
    # one run at a time in OUT (rank 0 holds it for all of a distributed run's processes)
    with atomic.exclusive(out, what="run folder") if parallel is None or parallel.is_main else nullcontext():
        # "auto": a command rerun as it was (torchrun --max-restarts, a scheduler's requeue)
        newest = checkpoints.to_resume(out, resume)
        resume = newest is not None
        if cfg.export_hf:  # on every rank (--out is shared): all refuse together, none waits for the others
            check_export_folder(out / "hf", sources)
        was_deterministic, was_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
        if cfg.deterministic:
            # cuBLAS is deterministic only with a fixed workspace; the variable must be set before its
            # first use (torch raises at the first matmul otherwise).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        if cfg.threads > 0:
            torch.set_num_threads(usable_threads(cfg.threads, what="threads"))
        keep_freed_memory()
        try:
            return _train(cfg, dataset, mc, out, ckpt_root, newest, resume=resume, stop_after=stop_after,
                          on_step=on_step, par=parallel)
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            torch.set_num_threads(was_threads)


def _train(cfg: TrainConfig, dataset: TokenDataset, mc: ModelConfig, out: Path, ckpt_root: Path,
           newest: Path | None, *, resume: bool, stop_after: int | None,
           on_step: Callable[[dict[str, Any]], bool | None] | None, par: Parallel | None = None) -> TrainResult:
    if par is not None:  # before any other collective: processes started apart would hang or train apart
        par.check_same({k: v for k, v in dataclasses.asdict(cfg).items() if k not in PER_PROCESS}
                       | {f"model.{k}": v for k, v in mc.to_hf_dict().items()}
                       | {"model.moe": dataclasses.asdict(mc.moe) if mc.moe else None,
                          "the data (tokenizer, token counts)": dataset.fingerprint(), "--resume": resume,
                          # each process picks the newest it sees: a stale listing on one node (NFS) is another
                          "the checkpoint resumed": newest.name if newest is not None else None})
        par.check_shared(out)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    if par is not None:  # only this process's shards are ever made (also from init_from's files)
        model = par.build(mc, device=device, std=cfg.init_std, seed=cfg.seed, init_from=cfg.init_from,
                          dtype=cfg.dtype)
    else:
        if cfg.init_from:
            model = checkpoints.load_init(cfg.init_from, mc)
        else:
            model = Transformer(mc)
            model.init_weights(std=cfg.init_std, seed=cfg.seed)
        model.to(device)
    model.train()
    model.set_moe_impl(cfg.moe_impl)
    main = par is None or par.is_main
    optimizer = make_optimizer(model, cfg)
    loader = BatchLoader(dataset, split="train", seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                         shard=(par.rank, par.world) if par is not None else (0, 1))
    loader.skip(cfg.data_offset)
    # a domain whose training text is shorter than seq_len + 1 tokens gives no window: it was never trained on
    untrained = [d for d, n in zip(loader.domains, loader.counts, strict=True) if n == 0]
    if untrained and main:
        warnings.warn(f"{dataset.path}: the 'train' split of {', '.join(untrained)} has no window of {cfg.seq_len + 1} "
                      "tokens, so the run never trains on them; use a shorter seq_len or more training data",
                      stacklevel=2)
    # a valid split shorter than seq_len + 1 tokens in every domain has no window: its loss would read 0;
    # in some domains, those were missing from every evaluation (and its mean) without a word
    valid = dataset.split_domains("valid")
    short = [d for d in valid if not len(eval_windows(dataset, split="valid", domain=d, seq_len=cfg.seq_len,
                                                      max_windows=1))]
    evaluates = cfg.eval_every > 0 and len(short) < len(valid)
    if cfg.eval_every > 0 and not evaluates and main:
        warnings.warn(f"{dataset.path}: the 'valid' split has no window of {cfg.seq_len + 1} tokens, so there is no "
                      "validation loss; use a shorter seq_len or more validation data", stacklevel=2)
    elif evaluates and short and main:
        warnings.warn(f"{dataset.path}: the 'valid' split of {', '.join(short)} has no window of {cfg.seq_len + 1} "
                      "tokens, so the validation loss leaves them out; use a shorter seq_len or more validation "
                      "data", stacklevel=2)
    fingerprint = dataset.fingerprint()
    step = 0
    if resume:
        assert newest is not None
        state = checkpoints.validate(newest, checksums=False)  # to_resume hashed every byte of it
        _check_resume(state, cfg, mc, fingerprint, newest)
        load_ckpt = par.load if par is not None else checkpoints.load
        state = load_ckpt(newest, model=model, optimizer=optimizer, checksums=False)
        loader.load_state_dict(state["data_position"])
        step = int(state["step"])
    out.mkdir(parents=True, exist_ok=True)
    if main:
        atomic.write_text(out / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    metrics = _Metrics(out, resume_step=step if resume else None, tensorboard=cfg.tensorboard) if main \
        else _NoMetrics()
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    forward: Callable[..., ModelOutput] = compile_model(model) if cfg.compile else model.forward_output
    moe: MoEConfig | None = mc.moe
    aux_coef, z_coef = (moe.aux_loss_coef, moe.z_loss_coef) if moe else (0.0, 0.0)
    E = moe.num_experts if moe else 0

    # The step of this run's newest checkpoint, which decides whether the end needs one: every process
    # decides alike from it, not from a listing of the folder (another node's can be stale: NFS caches
    # folders, and a process that missed the last one began a save the others never joined).
    saved = step if resume else -1

    def save() -> Path:
        nonlocal saved
        saved = step
        return (par.save if par is not None else checkpoints.save)(
            ckpt_root, step=step, model=model, optimizer=optimizer, keep=cfg.keep, state={
            "model_config": mc.to_hf_dict() | {"moe": dataclasses.asdict(mc.moe) if mc.moe else None},
            "train_config": dataclasses.asdict(cfg), "data": fingerprint, "data_position": loader.state_dict(),
            "paths": real_paths(cfg, ("init_from", "model")),  # a preset's name is no path: not listed
        })

    # Signals only set a flag: the step in flight finishes, then a checkpoint is written.
    stop: list[int] = []
    handlers: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            handlers[sig] = signal.signal(sig, lambda s, _f: stop.append(s))
        except ValueError:  # not the main thread: no signal handling
            pass
    bar = None
    if cfg.progress and main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True, disable=None)
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    tok_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    # A record's tokens_per_s is over the steps since the last logged one (their own time: evaluations and
    # checkpoints fall between steps), not the last step's alone: one step's speed is noisy, slow after an
    # evaluation or a checkpoint, and a line every log_every steps stood for all of them.
    interval_tokens, interval_s = 0, 0.0
    last_stop = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
    try:
        requested_stop = False  # on_step returned True (e.g. the demo's time budget ran out)
        while step < last_stop and not requested_stop:
            if signalled(stop, par.all_sum if par is not None else None):
                break
            t0 = time.perf_counter()
            lr = cfg.lr_at(step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            ce_sum = aux_sum = z_sum = 0.0
            dropped = 0  # (token, slot) pairs over capacity, in all micro-batches (and processes)
            load = torch.zeros(mc.n_layers if moe else 0, E)
            for _ in range(cfg.grad_accum):
                x_BT, y_BT, _dom = loader.next_batch()
                x_BT, y_BT = x_BT.to(device), y_BT.to(device)
                with autocast(cfg):
                    o = forward(x_BT)
                    logits_BTV, routings = o.logits_BTV, o.routing
                    assert logits_BTV is not None
                ce = lm_loss(logits_BTV, y_BT)
                aux, z = router_losses(routings, reduce=par.all_sum if par is not None else None)
                loss = ce + aux_coef * aux + z_coef * z
                (loss / cfg.grad_accum).backward()
                ce_sum, aux_sum, z_sum = ce_sum + ce.item(), aux_sum + aux.item(), z_sum + z.item()
                if E:
                    load += expert_load(routings, E).cpu() / cfg.grad_accum
                dropped += sum(int(getattr(r, "dropped", 0) or 0) for r in routings)
            max_norm = cfg.max_grad_norm
            if par is not None:
                par.sync_grads(model)
                gnorm = par.clip_grad_norm(model, max_norm)
                # The logged values: means over the processes' equal shares = the global batch's.
                sums = par.all_sum(torch.tensor([ce_sum, aux_sum, z_sum, dropped], dtype=torch.float64))
                ce_sum, aux_sum, z_sum = (float(v) / par.world for v in sums[:3])
                dropped = int(sums[3])
                load = par.all_sum(load) / par.world
            else:
                gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            bad = not all(math.isfinite(v) for v in (ce_sum, aux_sum, z_sum, gnorm))
            if bad and not cfg.skip_nonfinite:
                optimizer.zero_grad(set_to_none=True)
                raise TrainingError(
                    f"non-finite loss at step {step + 1} (loss {ce_sum / cfg.grad_accum:g}, gradient norm {gnorm:g}, "
                    f"lr {lr:g}); lower the learning rate, or set skip_nonfinite = true to skip such steps. "
                    f"{checkpoints.before_it(ckpt_root)}")
            if not bad:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            interval_tokens += tok_per_step
            interval_s += time.perf_counter() - t0
            rec: dict[str, Any] = {
                "step": step, "loss": ce_sum / cfg.grad_accum, "aux_loss": aux_sum / cfg.grad_accum,
                "z_loss": z_sum / cfg.grad_accum, "lr": lr, "grad_norm": gnorm,
                "tokens_per_s": interval_tokens / interval_s,
            }
            if bad:
                rec["skipped"] = True  # a non-finite step: no update (skip_nonfinite)
            if moe and moe.capacity_factor is not None:
                rec["dropped"] = dropped
            history.append(rec)
            logged = step % cfg.log_every == 0 or step == last_stop
            if logged:
                metrics.write(rec | {"expert_load": [[round(v, 4) for v in row] for row in load.tolist()]})
                interval_tokens, interval_s = 0, 0.0
            if bar is not None:
                # Per-layer load as E * max_e f_e: 1.00 is perfectly balanced, E is total collapse.
                imb = " ".join(f"{E * float(row.max()):.2f}" for row in load) if E else "-"
                show_step(bar, step, cfg.steps, logged,
                          f"loss {rec['loss']:.3f} aux {rec['aux_loss']:.3f} tok/s {rec['tokens_per_s']:,.0f} "
                          f"load/layer {imb}")
            if on_step is not None and on_step(rec):
                requested_stop = True
            if evaluates and (step % cfg.eval_every == 0 or step == cfg.steps):
                # Eager, even with --compile: a no-grad graph would be a second compile (and more for
                # the last, shorter batch) to save seconds, and evaluation runs inference kernels
                # (ops/native) that torch.compile cannot trace.
                ev = evaluate(model, dataset, cfg)
                ev_rec = {"step": step, "eval_loss": ev["mean_loss"], "eval": ev["loss"], "eval_ppl": ev["ppl"]}
                if "mean_bpb" in ev:
                    ev_rec |= {"eval_bpb": ev["mean_bpb"], "eval_domain_bpb": ev["bpb"]}
                metrics.write(ev_rec)
                evals.append(ev | {"step": step})
                if bar is not None:
                    bar.write(f"step {step}: {eval_line(ev)}", file=sys.stderr)
            if cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0:
                save()
        if step == cfg.steps or stop or requested_stop or (stop_after is not None and step == stop_after):
            if saved != step:
                save()
        if (step == cfg.steps or requested_stop) and cfg.export_hf:
            if par is not None:
                par.export(model, out / "hf", functools.partial(export, dataset=dataset))
            else:
                export(model, out / "hf", dataset)
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
        for sig, h in handlers.items():
            signal.signal(sig, h)
    # a signal during the last step or the final export: the run is complete, not stopped
    stopped_by = stop[0] if stop and step < cfg.steps else None
    return TrainResult(step=step, history=history, evals=evals, stopped_by=stopped_by,
                       model=model, out=out)


def signalled(stop: list[int], all_sum: Callable[[torch.Tensor], torch.Tensor] | None) -> bool:
    """Whether the run stops before its next step: a signal arrived (`stop`, the handler's list). Over
    several processes (`all_sum`) all stop at the same step, on what the exchange says: a signal that
    arrives during it is the next step's (else that process alone would stop); a process whose peer
    was signalled records that signal in `stop`."""
    if all_sum is None:
        return bool(stop)
    got = all_sum(torch.tensor([float(signal.SIGINT in stop), float(signal.SIGTERM in stop)]))
    if got.any() and not stop:
        stop.append(signal.SIGINT if got[0] > 0 else signal.SIGTERM)
    return bool(got.any())


def show_step(bar: Any, step: int, steps: int, logged: bool, text: str) -> None:
    """A finished step on the progress bar. Where stderr is not a terminal (a log file, a pipe), tqdm
    (disable=None) draws nothing: a line per metrics record instead of a bar redrawn at every step."""
    if not bar.disable:
        bar.set_postfix_str(text, refresh=False)
        bar.update(1)
    elif logged:
        print(f"step {step}/{steps}: {text}", file=sys.stderr, flush=True)


def export(model: Transformer, path: Path, dataset: TokenDataset,
           weights: Callable[[str], torch.Tensor] | None = None) -> None:
    """Save in transformers format, plus `mixlab_data.json` naming the tokenizer and domains
    (`weights`: as `save_model`'s)."""
    save_model(model, path, fmt="hf", extra_files=checkpoints.data_file(dataset.fingerprint()), weights=weights)


__all__ = ["DataError", "TrainConfig", "TrainResult", "evaluate", "load_train_config", "train"]
