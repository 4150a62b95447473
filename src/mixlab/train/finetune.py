"""Fine-tuning from existing weights: `FinetuneConfig` and `finetune(cfg)` for SFT (sft.py) and DPO
(dpo.py), full or LoRA (lora.py), with the trainer's checkpoints, exact resume, progress, metrics
and export (loop.py, checkpoints.py).

Shape legend: B batch rows, T tokens, V vocabulary.

Loss = task loss (SFT: cross-entropy on assistant tokens; DPO: dpo.dpo_loss) + aux_loss_coef x the
load-balancing loss (+ z_loss_coef x z-loss) over the real (non-padding) tokens: the router keeps
its balancing pressure during fine-tuning (TRL 1.16 keeps it too; older TRL dropped it in DPO,
huggingface/trl#1544).
`freeze_router` keeps the router's weights fixed (full fine-tuning; with LoRA the router is frozen
unless "router" is a LoRA target).

Run folder (`out`):

    metrics.jsonl                 one record per logged step and per evaluation (TRL's DPO names)
    checkpoints/step_*/           the trainable parameters (all, or the LoRA factors), optimizer,
                                  RNG, data position (checkpoints.py)
    reference_logps.safetensors   DPO: the frozen start model's log-probs of every pair (with LoRA:
                                  adapters at zero over the base as held, bf16 / int8), computed
                                  once before training; a resume reuses them (none with
                                  reference_free: no reference, no pass over the pairs)
    hf/                           the final model, plain transformers format (LoRA merged in; a
                                  LoRA run writes it only with export_hf = true, `--merge`)
    adapter/                      LoRA runs: the adapter in PEFT's format (lora.save_peft)

Data parallel (`parallel=`, `torchrun ... -m mixlab sft|dpo`): every process holds the whole model
and computes its rows of every global micro-batch; its loss is its share of the one-process loss, the
gradients are summed, and rank 0 alone writes the run folder (docs/training.md). Sharded (`--fsdp`
and / or `--ep E`, full fine-tuning: a `Sharded` parallel): the same shares over `mixlab train`'s
FSDP2 and expert-parallel model (parallel/train.py), each process holding 1/N of the weights,
gradients and AdamW states (FSDP) or E-th of the experts (--ep); every process writes its pieces of
each checkpoint (torch.distributed.checkpoint, rank 0 commits) and the hf/ export is gathered
tensor by tensor, rank 0 writing it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mixlab import atomic
from mixlab.checkpoint import meta_model, save_model
from mixlab.checkpoint.io import CheckpointError
from mixlab.config import ConfigError, ModelConfig, usable_threads
from mixlab.corpus import same_vocabulary
from mixlab.errors import TrainingError
from mixlab.model import Transformer
from mixlab.model.moe import MoEBlock
from mixlab.tokenizer import tokenizer_files as folder_tokenizer_files
from mixlab.train import checkpoints, dpo, sft
from mixlab.train.data import DataError, TrainTokenizer, get_tokenizer
from mixlab.train.loop import (
    _Metrics,
    _NoMetrics,
    check_export_folder,
    check_run_folder,
    enable_activation_checkpointing,
    keep_freed_memory,
    show_step,
    signalled,
)
from mixlab.train.lora import LoraConfig, apply_lora, merge, save_peft
from mixlab.train.losses import IGNORE, lm_loss, router_losses
from mixlab.train.settings import (
    INTEGERS,
    NUMBERS,
    OptimizerSettings,
    check_batch_fits,
    check_context,
    check_resume_settings,
    check_settings,
    check_split,
    load_settings,
    paths_as_text,
    real_paths,
)

TASKS = ("sft", "dpo")


@dataclass
class FinetuneConfig(OptimizerSettings):
    """A fine-tuning run's settings. The optimizer's are `OptimizerSettings`' (shared with
    pretraining), with fine-tuning's defaults: lr 1e-5, 100 steps, 10 warmup, no weight decay."""

    task: str = "sft"  # sft | dpo
    model: str = ""  # the starting weights: any folder `init_from` accepts (loop.TrainConfig)
    data: str = ""  # SFT: chat JSONL (`messages` or `prompt` + `completion`); DPO: pairs JSONL (`chosen`,
    # `rejected`, `prompt`|`messages`)
    valid_data: str = ""  # held-out file; default: hold out `valid_fraction` of `data` (seeded)
    valid_fraction: float = 0.05
    max_examples: int = 0  # use only the first N examples (non-empty lines) of `data` (0 = all)
    out: str = "runs/finetune"
    tokenizer: str = ""  # default: the checkpoint's (mixlab_data.json, tokenizer file), else mixtral
    seq_len: int = 512
    batch_size: int = 8  # SFT: packed rows; DPO: pairs
    grad_accum: int = 1
    # Optimisation: OptimizerSettings' fields; these defaults differ from pretraining's.
    steps: int = 100
    lr: float = 1e-5
    warmup: int = 10
    weight_decay: float = 0.0
    seed: int = 0
    dtype: str = "float32"  # autocast: float32 (off) or bfloat16
    device: str = "cpu"
    threads: int = 0
    # recompute each block's activations in backward (TRL's gradient_checkpointing): the same numbers,
    # less memory (with LoRA on experts: each layer's merged expert weights are not kept for backward)
    activation_checkpointing: bool = False
    aux_loss_coef: float | None = None  # None: the checkpoint's (MoEConfig.aux_loss_coef)
    freeze_router: bool = False
    # DPO.
    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid | ipo
    reference_free: bool = False
    label_smoothing: float = 0.0
    length_normalize: bool = False
    # LoRA (rank 0 = full fine-tuning).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "attention,experts"  # comma-separated: attention, experts, router
    lora_base_dtype: str = "float32"  # float32 | bfloat16 | int8 | int4
    # Bookkeeping (may change between a run and its resume).
    eval_every: int = 50
    ckpt_every: int = 50
    keep: int = 2
    log_every: int = 10
    # out/hf: plain weights, LoRA adapters merged in; None: for full fine-tuning only (a LoRA run's
    # result is out/adapter; True, or `--merge`, adds the merged model): `writes_hf`
    export_hf: bool | None = None
    export_peft: bool = True  # out/adapter for LoRA runs
    progress: bool = True
    tensorboard: bool = False

    @property
    def writes_hf(self) -> bool:
        """Whether the run exports out/hf: `export_hf`, by default for full fine-tuning only."""
        return self.export_hf if self.export_hf is not None else not self.lora_rank


# Fields that may differ between the processes of one run (each node its own copy of the data: its
# examples are compared; CPU threads; what only rank 0 does); everything else must match.
PER_PROCESS = {"data", "valid_data", "threads", "progress", "tensorboard"}
RUN_ONLY = {"out", "eval_every", "ckpt_every", "keep", "log_every", "export_hf", "export_peft", "progress",
            "tensorboard", "device", "threads", "activation_checkpointing"}


# Settings that name a file or folder: a resume compares where they point (`paths` in a checkpoint's
# state, settings.real_paths), so `--model ./base`, an absolute path or another working directory
# resume the run `--model base` started (the strings alone refused it as "different fine-tuning settings").
PATHS = ("model", "data", "valid_data", "tokenizer")


class DataParallel(Protocol):
    """How `finetune` runs over several processes, data parallel: each holds the whole model and
    computes its share of every batch (`mixlab.parallel.train.DistributedTraining` is one). `None`
    means one process."""

    rank: int
    world: int
    is_main: bool  # writes metrics, progress, checkpoints and the exports

    def check_same(self, values: dict[str, Any]) -> None: ...  # refuse a run whose processes disagree on them
    def all_sum(self, t: torch.Tensor) -> torch.Tensor: ...  # summed over all processes
    def sum_grads(self, params: list[nn.Parameter]) -> None: ...  # each gradient summed over all processes


class Sharded(DataParallel, Protocol):
    """A `DataParallel` whose `fsdp` is True or whose `ep` is over 1 (`DistributedTraining` under
    `--fsdp`, `--ep E`): the model is `build`'s, sharded over the processes (FSDP: parameters,
    gradients, AdamW states; expert parallelism: each process holds E-th of the experts, tokens
    travel to them by all-to-all); every process writes its pieces of each checkpoint and joins the
    export. Its forward is collective: every process runs every forward the others run (evaluations
    included)."""

    fsdp: bool
    ep: int

    def check_shared(self, folder: Path) -> None: ...  # refuse a folder some process does not see as rank 0 does
    def build(self, config: ModelConfig, *, device: torch.device, std: float, seed: int, init_from: str = "",
              dtype: str = "float32") -> Transformer: ...  # load_init(init_from) sharded; dtype: autocast's
    def clip_grad_norm(self, model: Transformer, max_norm: float) -> float: ...  # the global norm, clipped
    def reshard(self, model: Transformer) -> None: ...  # back to the shards after a forward without backward
    def save(self, root: Path, *, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             state: dict[str, Any], keep: int) -> Path: ...
    def load(self, ckpt: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
             checksums: bool = True) -> dict[str, Any]: ...
    def export(self, model: Transformer, path: Path, write: Callable[..., None]) -> None: ...


def sharded(par: DataParallel | None) -> Sharded | None:
    """`par` when it shards the model (`fsdp`, or `ep` over 1), else None."""
    if par is None or not (getattr(par, "fsdp", False) or getattr(par, "ep", 1) > 1):
        return None
    return par  # type: ignore[return-value]


def load_finetune_config(path: str | Path | None = None, *,
                         then: Callable[[FinetuneConfig], object] | None = None, given: set[str] | None = None,
                         **overrides: Any) -> FinetuneConfig:
    """A `FinetuneConfig` from a JSON or TOML file (keys = field names), then `overrides` (None = unset),
    checked (`check_finetune_config`, then `then`: `mixlab sft`'s model checks) as `load_settings` has it
    (`given`: filled with the settings the file or an override set)."""
    return load_settings(FinetuneConfig, path, overrides, what="fine-tuning", check=check_finetune_config,
                         then=then, given=given)


def check_finetune_config(cfg: FinetuneConfig) -> FinetuneConfig:
    """`cfg` with every setting checked (ConfigError naming the first bad one) and its path settings as
    text: what `load_finetune_config` returns, and what `finetune` makes of a `FinetuneConfig` built in
    Python (as `check_train_config`)."""
    if not isinstance(cfg, FinetuneConfig):
        raise ConfigError(f"finetune takes a FinetuneConfig (load_finetune_config(path, **overrides) reads one), "
                          f"not {type(cfg).__name__}")
    cfg = paths_as_text(cfg)
    check_settings(cfg, what="fine-tuning", numbers=(*NUMBERS, "beta", "label_smoothing", "valid_fraction"),
                   integers=(*INTEGERS, "max_examples", "lora_rank"), above_zero=("eps", "beta"))
    a = cfg.aux_loss_coef  # a NaN here trained to NaN weights without a word
    if a is not None and (isinstance(a, bool) or not isinstance(a, int | float) or not math.isfinite(a) or a < 0):
        raise ConfigError(f"fine-tuning setting 'aux_loss_coef' must be a finite number >= 0, got {a!r}",
                          setting="aux_loss_coef")
    if not 0 <= cfg.valid_fraction < 1:  # it was refused once the data had been read
        raise ConfigError(f"fine-tuning setting 'valid_fraction' must be in [0, 1), got {cfg.valid_fraction}",
                          setting="valid_fraction")
    if cfg.task not in TASKS:
        raise ConfigError(f"fine-tuning setting 'task' must be one of {', '.join(TASKS)}, got {cfg.task!r}",
                          setting="task")
    if cfg.loss not in dpo.LOSSES:
        raise ConfigError(f"fine-tuning setting 'loss' must be one of {', '.join(dpo.LOSSES)}, got {cfg.loss!r}",
                          setting="loss")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"fine-tuning setting 'label_smoothing' must be in [0, 0.5), got {cfg.label_smoothing}",
                          setting="label_smoothing")
    if cfg.label_smoothing and cfg.loss != "sigmoid":  # dpo_loss's IPO has none: it was ignored without a word
        raise ConfigError(f"fine-tuning setting 'label_smoothing' applies to the sigmoid loss only (conservative "
                          f"DPO), not to loss {cfg.loss!r}; remove it or use loss 'sigmoid'", setting="label_smoothing")
    if not cfg.model:
        raise ConfigError("no starting model: pass --model DIR (any checkpoint mixlab loads)")
    if not cfg.data:
        raise ConfigError("no data: pass --data FILE.jsonl")
    if not cfg.lora_rank:  # --lora-alpha 32 without --lora-rank: full fine-tuning, the LoRA settings ignored
        given = [f.name for f in dataclasses.fields(cfg)
                 if f.name.startswith("lora_") and f.name != "lora_rank" and getattr(cfg, f.name) != f.default]
        if given:
            raise ConfigError(f"fine-tuning setting {given[0]!r} applies to LoRA, but lora_rank is 0 (full "
                              "fine-tuning): give lora_rank too, or remove it", setting=given[0])
    if cfg.lora_rank:
        try:
            lc = lora_config(cfg)
        except ValueError as e:  # LoraConfig's message names its field ('LoRA alpha ...'): name the setting
            field = next((f for f in ("rank", "alpha", "dropout", "targets", "base dtype")
                          if str(e).startswith(f"LoRA {f}")), None)
            name = f"lora_{field.replace(' ', '_')}" if field else None
            # the setting alone: whoever reports it adds where it came from (the config file, or the flag)
            raise ConfigError(f"fine-tuning setting '{name}': {e}" if name else str(e), setting=name) from None
        if cfg.freeze_router and "router" in lc.targets:  # the router's adapter trained without a word
            raise ConfigError("fine-tuning setting 'freeze_router' keeps the router fixed, but 'router' is one of "
                              "the LoRA targets; remove one of them", setting="freeze_router")
    return cfg


def check_fits(cfg: FinetuneConfig, mc: ModelConfig, tok: TrainTokenizer) -> None:
    """The tokenizer's vocabulary and seq_len within the model's (`mc`); ConfigError naming the setting."""
    if tok.vocab_size > mc.vocab_size and cfg.tokenizer:
        raise ConfigError(f"fine-tuning setting 'tokenizer': {cfg.tokenizer} has {tok.vocab_size} tokens, more than "
                          f"the model's vocabulary ({mc.vocab_size})", setting="tokenizer")
    if tok.vocab_size > mc.vocab_size:
        raise ConfigError(f"the tokenizer's vocabulary ({tok.vocab_size}) is larger than the model's ({mc.vocab_size})")
    check_context(cfg.seq_len, mc)


def lora_config(cfg: FinetuneConfig) -> LoraConfig:
    return LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                      targets=tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip()),
                      base_dtype=cfg.lora_base_dtype, seed=cfg.seed)


def load_with_lora(path: str | Path, config: ModelConfig, lora: LoraConfig) -> Transformer:
    """`apply_lora(checkpoints.load_init(path, config), lora)`, the same model (tested), without ever
    holding the whole base in float32: the weights outside the blocks first, then each block's, in
    float32, just before `apply_lora` converts its targets to the held dtype. So a base held int4
    peaks at one block in float32 beside the held model (Mixtral 8x7B: ~6 GB + ~27 GB, not 187 GB).
    A checkpoint written by a sharded run (torch.distributed.checkpoint) is loaded whole."""
    p = checkpoints.resolve_weights(path)
    if checkpoints.is_step(p) and checkpoints.validate(p).get("format") == "dcp":
        return apply_lora(checkpoints.load_init(p, config), lora)
    model = meta_model(config)

    def load(names: list[str]) -> None:
        pieces: dict[str, checkpoints.Piece] = {}
        for name in names:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            t = torch.empty(getattr(module, attr).shape, dtype=torch.float32)
            setattr(module, attr, nn.Parameter(t, requires_grad=False))  # apply_lora freezes the base anyway
            pieces[name] = (t, tuple(slice(0, n) for n in t.shape))
        checkpoints.load_init_pieces(p, config, pieces, sharded=lambda: {})

    load([n for n, _ in model.named_parameters() if not n.startswith("layers.")])
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return apply_lora(model, lora, load_block=lambda i, block: load(
        [f"layers.{i}.{n}" for n, _ in block.named_parameters()]))


def resolve_tokenizer(cfg: FinetuneConfig) -> tuple[TrainTokenizer, dict[str, Any]]:
    """The tokenizer: `cfg.tokenizer`, else the one the checkpoint names (`checkpoints.trained_tokenizer`:
    its training data's, a tokenizer file in its folder), else Mixtral's."""
    try:
        trained = checkpoints.trained_tokenizer(cfg.model)
    except (ValueError, OSError):
        if not cfg.tokenizer:
            raise
        trained = None  # the one given is used: a checkpoint's unreadable one is no reason to refuse it
    if cfg.tokenizer:
        tok = get_tokenizer(cfg.tokenizer)
        if trained is not None and not same_vocabulary(trained[0], tok):  # `--tokenizer bytes` on a Mixtral model
            raise ConfigError(f"fine-tuning setting 'tokenizer': {cfg.tokenizer} is not the tokenizer {cfg.model} "
                              f"names ({trained[0].name}): their vocabularies differ; leave it out to use the "
                              "checkpoint's", setting="tokenizer")
        return tok, tok.spec()
    if trained is not None:
        return trained
    tok = get_tokenizer("mixtral")
    return tok, tok.spec()


class _Trainable(nn.Module):
    """The trainable parameters, in the optimizer's order, as a module for checkpoints.save/load
    (which name optimizer state by `named_parameters()` position). `owner`: the model they belong to,
    its modules this one's (a sharded checkpoint reshards the model's FSDP modules first)."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], owner: nn.Module | None = None) -> None:
        super().__init__()
        self._named = named
        if owner is not None:
            self.owner = owner

    def named_parameters(self, *args: Any, **kwargs: Any) -> Any:
        return iter(self._named)


class PairLoader:
    """Seeded, resumable batches of pair indices: a permutation per (seed, epoch), position (epoch, cursor)."""

    def __init__(self, n: int, *, batch_size: int, seed: int) -> None:
        if n < 1:
            raise DataError("no training pairs")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.cursor = 0, 0

    def _perm(self) -> list[int]:
        import numpy as np

        return [int(i) for i in np.random.default_rng([self.seed, self.epoch]).permutation(self.n)]

    def next_indices(self) -> list[int]:
        out = []
        perm = self._perm()
        for _ in range(self.batch_size):
            if self.cursor >= self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                perm = self._perm()
            out.append(perm[self.cursor])
            self.cursor += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "batch_size": self.batch_size, "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seed", "batch_size"):
            if state.get(k) != getattr(self, k):
                raise DataError(f"data position in the checkpoint has {k}={state.get(k)!r}, "
                                f"this run {getattr(self, k)!r}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def _autocast(cfg: FinetuneConfig) -> torch.autocast:
    return torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16,
                          enabled=cfg.dtype == "bfloat16")


def logits_and_routing(model: nn.Module, tokens: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, list]:
    """Logits and each MoE layer's routing, through `forward_output` where the model has it, else
    `forward(return_routing=True)`."""
    fo = getattr(model, "forward_output", None)
    if fo is not None:
        o = fo(tokens, **kw)
        return o.logits_BTV, list(o.routing)
    logits, routings = model(tokens, return_routing=True, **kw)
    return logits, routings


def sft_forward(model: nn.Module, b: sft.Packed, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(summed assistant-token cross-entropy, number of assistant tokens, routings) of a packed batch."""
    logits, routings = sft_logits(model, b, device)
    tgt = b.targets.to(device)
    n = (tgt != -100).sum()
    return lm_loss(logits, tgt) * n.clamp(min=1), n, routings


def sft_logits(model: nn.Module, b: sft.Packed, device: torch.device) -> tuple[torch.Tensor, list]:
    """The logits `[B, T, V]` and routings of a packed batch.

    A batch whose rows each hold one conversation (segment 0 from position 0, then right padding:
    every row at seq_len 256 of chat/sft.jsonl) needs no block-diagonal mask: plain causal attention
    gives its real tokens the same attention, and SDPA takes its causal kernel without building
    and reading a `[B, 1, T, T]` mask per layer. The padding's outputs are unused either way."""
    if bool((b.segments <= 0).all()):
        return logits_and_routing(model, b.tokens.to(device))
    return logits_and_routing(model, b.tokens.to(device), positions_BT=b.positions.to(device),
                              segments_BT=b.segments.to(device))


def pair_logps(model: nn.Module, b: dpo.PairBatch, device: torch.device) -> tuple[torch.Tensor, list]:
    """Sequence log-probs `[2N]` (chosen then rejected; sums over the reply) and the routings. Padding
    is on the right, so plain causal attention never lets a real token see it: no mask (SDPA's causal
    kernel); the padding's own outputs are ignored and the router losses mask it out."""
    logits, routings = logits_and_routing(model, b.tokens.to(device))
    return dpo.sequence_logps(logits, b.targets.to(device), b.reply.to(device)), routings


def _turns(n: int, par: DataParallel | None) -> Iterator[tuple[int, bool]]:
    """The batches (k, keep) this process computes of an evaluation's `n`: every world-th, whole
    batches in turn. A sharded model's forward is collective, so there every process runs as many:
    where the last round has no batch left for it, it computes batch 0 again (keep False: discarded)."""
    if par is None:
        yield from ((k, True) for k in range(n))
    elif sharded(par) is None:
        yield from ((k, True) for k in range(par.rank, n, par.world))
    else:
        for first in range(0, n, par.world):
            k = first + par.rank
            yield (k, True) if k < n else (0, False)


@torch.no_grad()
def reference_logps(model: nn.Module, pairs: list[dpo.Pair], cfg: FinetuneConfig,
                    par: DataParallel | None = None, *,
                    done: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """The frozen model's log-probs of every pair's chosen and rejected reply (sums; eval mode, float32).
    `par`: each process computes every world-th batch of batch_size pairs (the one-process run's
    batches, so the same numbers), and every process gets them all. `done(n)`: after each batch, the
    pairs up to the end of it (for a progress bar)."""
    was = model.training
    model.eval()
    dev = torch.device(cfg.device)
    ch, rj = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    for k, keep in _turns(-(-len(pairs) // cfg.batch_size), par):
        i = k * cfg.batch_size
        idx = list(range(i, min(i + cfg.batch_size, len(pairs))))
        b = dpo.collate_pairs([pairs[j] for j in idx], idx, cfg.seq_len)
        with _autocast(cfg):
            lp, _ = pair_logps(model, b, dev)
        if keep:
            ch[idx], rj[idx] = lp[: len(idx)].float().cpu(), lp[len(idx):].float().cpu()
        if done is not None:
            done(idx[-1] + 1 if keep else len(pairs))
    model.train(was)
    if par is not None:  # the other processes' entries are zeros here
        ch, rj = par.all_sum(torch.stack([ch, rj])).unbind(0)
    return {"chosen": ch, "rejected": rj}


def _reference_progress(n_pairs: int, rf: Path) -> Any:
    """The DPO reference pass's progress: a bar of pairs on a terminal; elsewhere (tqdm draws nothing
    there) one line saying what runs before the first step."""
    from tqdm import tqdm

    bar = tqdm(total=n_pairs, desc="reference log-probs", unit="pair", dynamic_ncols=True, disable=None,
               leave=False)
    if bar.disable:
        print(f"reference log-probs of {n_pairs:,} pairs (the starting model, once, before step 1; stored in {rf})",
              file=sys.stderr, flush=True)
    return bar


def eval_line(ev: dict[str, Any]) -> str:
    """An evaluation's result in one progress line (counts as integers, the rest to 4 decimals)."""
    return ", ".join(f"{k} {v:,.0f}" if k.endswith("_tokens") else f"{k} {v:.4f}" for k, v in ev.items() if k != "step")


@torch.no_grad()
def evaluate_sft(model: nn.Module, examples: list[sft.Example], cfg: FinetuneConfig,
                 par: DataParallel | None = None) -> dict[str, float]:
    """Cross-entropy per assistant token over the held-out conversations (token-weighted), and the
    share of those tokens that are the model's most likely next token (TRL's mean_token_accuracy).
    `par`: each process scores every world-th batch, the sums added up."""
    was = model.training
    model.eval()
    total, n, correct = 0.0, 0, 0
    device = torch.device(cfg.device)
    batches = sft.PackedLoader(examples, seq_len=cfg.seq_len, batch_size=cfg.batch_size, shuffle=False).all_batches()
    for i, keep in _turns(len(batches), par):
        b = batches[i]
        tgt = b.targets.to(device)
        k = int((tgt != IGNORE).sum()) if keep else 0
        with _autocast(cfg):
            logits, _ = sft_logits(model, b, device)
            total, n = total + (float(lm_loss(logits, tgt) * max(k, 1)) if keep else 0.0), n + k
        correct += int((logits.argmax(-1) == tgt).sum()) if keep else 0  # IGNORE is never a token id
    model.train(was)
    if par is not None:
        got = par.all_sum(torch.tensor([total, n, correct], dtype=torch.float64))
        total, n, correct = float(got[0]), int(got[1]), int(got[2])
    return {"eval_loss": total / max(n, 1), "eval_tokens": n, "eval_mean_token_accuracy": correct / max(n, 1)}


@torch.no_grad()
def evaluate_dpo(model: nn.Module, pairs: list[dpo.Pair], ref: dict[str, torch.Tensor],
                 cfg: FinetuneConfig, *, policy: dict[str, torch.Tensor] | None = None,
                 par: DataParallel | None = None) -> dict[str, float]:
    """Held-out DPO loss, implicit-reward preference accuracy and margin, and the policy's own
    chosen - rejected log-prob margin and accuracy (chosen more likely than rejected: summed over the
    reply, and per reply token), over the held-out pairs. Before any DPO step the implicit rewards
    are all 0 (policy = reference; pass `policy=ref` to skip recomputing it). `par`: the policy's
    log-probs split over the processes (`reference_logps`)."""
    pol = reference_logps(model, pairs, cfg, par) if policy is None else policy
    n_c = torch.tensor([len(dpo.fit(p.prompt, p.chosen, cfg.seq_len + 1)[1]) for p in pairs], dtype=torch.float32)
    n_r = torch.tensor([len(dpo.fit(p.prompt, p.rejected, cfg.seq_len + 1)[1]) for p in pairs], dtype=torch.float32)
    loss, m = dpo.dpo_loss(pol["chosen"], pol["rejected"], ref["chosen"], ref["rejected"], beta=cfg.beta,
                           loss_type=cfg.loss, label_smoothing=cfg.label_smoothing,
                           reference_free=cfg.reference_free, lengths=(n_c, n_r) if cfg.length_normalize else None)
    per_c, per_r = pol["chosen"] / n_c, pol["rejected"] / n_r
    return {"eval_loss": float(loss), "eval_rewards/chosen": float(m["rewards/chosen"]),
            "eval_rewards/rejected": float(m["rewards/rejected"]),
            "eval_rewards/accuracies": float(m["rewards/accuracies"]),
            "eval_rewards/margins": float(m["rewards/margins"]),
            "eval_logps/margin": float((pol["chosen"] - pol["rejected"]).mean()),
            "eval_logps/accuracy": float((pol["chosen"] > pol["rejected"]).float().mean()),
            "eval_logps/accuracy_per_token": float((per_c > per_r).float().mean()),
            "eval_logps/chosen": float(m["logps/chosen"]), "eval_logps/rejected": float(m["logps/rejected"])}


@dataclass
class FinetuneResult:
    step: int
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    stopped_by: int | None
    model: Transformer
    out: Path


def _data(cfg: FinetuneConfig, tok: TrainTokenizer, *, context: int | None = None) -> tuple[list[Any], list[Any]]:
    """The training and held-out examples of `cfg`'s files, checked. `context`: the model's max_seq_len; where
    seq_len already is it, the advice on cut examples says so instead of telling to raise --seq-len."""
    # A row reads seq_len + 1 tokens and feeds seq_len of them: check_context bounds seq_len, not seq_len + 1, by the
    # context. At it, "raise --seq-len" was advice the next run refused.
    at_limit = context is not None and cfg.seq_len >= context
    raise_it = (f"the model's context is {context} positions, so seq_len (--seq-len) cannot be raised" if at_limit
                else "raise seq_len (--seq-len)")
    keep = (f"the model's context is {context} positions, so they cannot be kept whole" if at_limit
            else "raise --seq-len to keep them whole")
    read: Callable[[str, TrainTokenizer], list[Any]] = sft.read_sft if cfg.task == "sft" else dpo.read_pairs
    items: list[Any] = read(cfg.data, tok)
    if cfg.max_examples:
        items = items[: cfg.max_examples]
    if cfg.valid_data:
        train, valid = items, read(cfg.valid_data, tok)
        if Path(cfg.valid_data).resolve() == Path(cfg.data).resolve():
            warnings.warn(f"{cfg.valid_data}: the held-out file is the training file, so the evaluation measures "
                          "the training loss; pass another file, or leave out valid_data (--valid-data) to hold out "
                          "valid_fraction of the data", stacklevel=2)
    else:
        train, valid = sft.split_holdout(items, cfg.valid_fraction, cfg.seed)
        if not train:
            raise DataError(f"{cfg.data}: all {len(items)} example(s) are held out for validation (valid_fraction "
                            f"{cfg.valid_fraction}); add examples, or pass --valid-data FILE or --valid-fraction 0")
    for what, items, f in (("training", train, cfg.data), ("held-out", valid if cfg.eval_every > 0 else [],
                                                             cfg.valid_data or cfg.data)):
        if cfg.task == "sft" and items and not any(any(ex.train) for ex in items):  # only "weight": 0 does this
            raise DataError(f"{f}: every assistant message of the {what} conversations has \"weight\": 0 (context, "
                            "not trained), so there is nothing to train on or measure")
    # A conversation is cut to its first seq_len + 1 tokens (sft.collate): if that leaves no
    # assistant token anywhere, the run would train on nothing (loss 0) without a word.
    if cfg.task == "sft" and not any(any(ex.train[1: cfg.seq_len + 1]) for ex in train):
        raise DataError(f"{cfg.data}: no conversation has an assistant token within its first seq_len + 1 = "
                        f"{cfg.seq_len + 1} tokens, so there is nothing to train on; {raise_it}"
                        + (": shorten what comes before the replies" if at_limit else ""))
    # The same for the held-out ones: their evaluation reported eval_loss 0.0000 over 0 tokens.
    if cfg.task == "sft" and cfg.eval_every > 0 and valid and not any(any(ex.train[1: cfg.seq_len + 1])
                                                                      for ex in valid):
        raise DataError(f"{cfg.valid_data or cfg.data}: no held-out conversation has an assistant token within its "
                        f"first seq_len + 1 = {cfg.seq_len + 1} tokens, so the evaluation would measure nothing; "
                        f"{raise_it}"
                        + (": hold out other conversations" if at_limit else ", or hold out other conversations"))
    if cfg.task == "sft":  # some cut: say how many, and how many of those lose every trained token
        cut = [ex for ex in train if len(ex.ids) > cfg.seq_len + 1]
        if cut:
            empty = [ex for ex in cut if not any(ex.train[1: cfg.seq_len + 1])]
            lost = f"; {len(empty)} of them keep no assistant token and train nothing (first: {empty[0].where})" \
                if empty else ""
            warnings.warn(f"{cfg.data}: {len(cut)} of {len(train)} training conversations are longer than "
                          f"seq_len + 1 = {cfg.seq_len + 1} tokens and are cut to it{lost}; {keep}", stacklevel=3)
    if cfg.task == "dpo":
        # A pair whose replies are the same text (a tie, as in UltraFeedback's binarised rows) has h = 0 and no
        # gradient (dpo.py): it only dilutes the mean loss; all of them trained nothing, without a word.
        ties = [p for p in train if p.chosen == p.rejected]
        if len(ties) == len(train):
            raise DataError(f"{cfg.data}: every training pair's 'chosen' and 'rejected' are the same reply, so "
                            "there is no preference to learn")
        if ties:
            warnings.warn(f"{cfg.data}: {len(ties)} of {len(train)} training pairs have the same 'chosen' and "
                          f"'rejected' reply (first: {ties[0].where}): no preference and no gradient, they only dilute "
                          "the batch's mean; drop them", stacklevel=3)
    if cfg.task == "dpo":  # the same for pairs (dpo.fit), which were cut without a word
        L = cfg.seq_len + 1
        cut = [p for p in train if len(p.prompt) + max(len(p.chosen), len(p.rejected)) > L]
        if cut:
            ends = sum(len(dpo.fit(p.prompt, r, L)[1]) < len(r) for p in cut for r in (p.chosen, p.rejected))
            warnings.warn(f"{cfg.data}: {len(cut)} of {len(train)} training pairs are longer than seq_len + 1 = {L} "
                          f"tokens and are cut to it (the prompt's start goes first; {ends} of their replies lose "
                          f"their end, </s> included); {keep}", stacklevel=3)
    return train, valid


def _fingerprint(items: list[Any]) -> str:
    """A hash of the tokenized training examples (SFT conversations or DPO pairs), in order."""
    h = hashlib.sha256()
    for x in items:
        h.update(repr([v for k, v in vars(x).items() if k != "where"]).encode())
    return h.hexdigest()


def finetune(cfg: FinetuneConfig, *, resume: bool | str = False, stop_after: int | None = None,
             on_step: Callable[[dict[str, Any]], bool | None] | None = None,
             parallel: DataParallel | None = None) -> FinetuneResult:
    """Fine-tune per `cfg` (see the module docstring). `resume`: continue from the newest checkpoint in
    `cfg.out`; "auto": continue from it when there is one, else start. `stop_after`: stop (with a
    checkpoint) after this many steps in total, as if killed. `parallel`: run as one of several
    processes, data parallel (see `DataParallel`): batch_size stays the global batch's, split evenly
    over them; losses, gradients, evaluations and checkpoints are the one-process run's. A `Sharded`
    parallel (`--fsdp`, `--ep E`) also shards the model: full fine-tuning only."""
    cfg = check_finetune_config(cfg)
    if parallel is not None:
        check_split(cfg.batch_size, parallel.world, what="fine-tuning")
    shard = sharded(parallel)
    if shard is not None and cfg.lora_rank:
        flag = "--fsdp" if shard.fsdp else "--ep"
        raise ConfigError(f"fine-tuning setting 'lora_rank': {flag} shards full fine-tuning; a LoRA run's trainable "
                          f"part is small: run it data parallel (leave out {flag})", setting="lora_rank")
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    sources = check_run_folder(out, [cfg.model, cfg.data, cfg.valid_data])
    # one run at a time in OUT (rank 0 holds it for all of a data-parallel run's processes)
    with atomic.exclusive(out, what="run folder") if parallel is None or parallel.is_main else nullcontext():
        # "auto": a command rerun as it was (torchrun --max-restarts, a scheduler's requeue)
        newest = checkpoints.to_resume(out, resume)
        resume = newest is not None
        if cfg.writes_hf:
            check_export_folder(out / "hf", sources)
        if cfg.lora_rank and cfg.export_peft:
            check_export_folder(out / "adapter", sources)
        was_threads = torch.get_num_threads()
        if cfg.threads > 0:
            torch.set_num_threads(usable_threads(cfg.threads, what="threads"))
        keep_freed_memory()
        try:
            return _finetune(cfg, out, ckpt_root, newest, resume=resume, stop_after=stop_after, on_step=on_step,
                             par=parallel)
        finally:
            torch.set_num_threads(was_threads)


def _finetune(cfg: FinetuneConfig, out: Path, ckpt_root: Path, newest: Path | None, *, resume: bool,
              stop_after: int | None, on_step: Callable[[dict[str, Any]], bool | None] | None,
              par: DataParallel | None) -> FinetuneResult:
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    tok, tok_spec = resolve_tokenizer(cfg)
    mc = checkpoints.init_config(cfg.model)
    check_fits(cfg, mc, tok)
    check_batch_fits(mc, batch_size=cfg.batch_size, seq_len=cfg.seq_len, device=cfg.device,
                     rows_per_item=2 if cfg.task == "dpo" else 1, processes=par.world if par is not None else 1)
    # LoRA first: the DPO reference is the policy before its first step, the adapters at zero over the
    # base as held (PEFT's disable_adapter() in TRL): over a bf16, int8 or int4 base that is not the float32
    # checkpoint, and a reference from the checkpoint started DPO at h != 0 (loss != log 2).
    shard = sharded(par)
    model: Transformer | None = None
    if shard is None:  # a sharded model is built after check_same: reading a sharded checkpoint is collective
        model = (load_with_lora(cfg.model, mc, lora_config(cfg)) if cfg.lora_rank
                 else checkpoints.load_init(cfg.model, mc)).to(device)
    main = par is None or par.is_main
    with warnings.catch_warnings():
        if not main:  # rank 0 says it once
            warnings.simplefilter("ignore")
        train_items, valid_items = _data(cfg, tok, context=mc.max_seq_len)
    data_fp = _fingerprint(train_items)  # the loader position in a checkpoint means something only for these
    if par is not None:  # before any other collective: processes started apart would hang or train apart
        par.check_same({k: v for k, v in dataclasses.asdict(cfg).items() if k not in PER_PROCESS}
                       | {"the model's config": mc.to_hf_dict(), "the training examples": data_fp,
                          "the held-out examples": _fingerprint(valid_items), "--resume": resume,
                          "the checkpoint resumed": newest.name if newest is not None else None})
    if resume:  # before the DPO reference file's check, which would blame that file for a changed setting
        assert newest is not None
        state = checkpoints.validate(newest, checksums=False)  # to_resume hashed every byte of it
        check_resume_settings(state.get("finetune_config", {}), cfg, run_only=RUN_ONLY, ckpt=newest,
                              what="fine-tuning", paths=state.get("paths"))
        if state.get("data", data_fp) != data_fp:  # absent in checkpoints written before it was stored
            raise CheckpointError(f"{newest}: saved for different data ({cfg.data} or the held-out split changed "
                                  "since); use the original data or a new --out folder")
    if main:
        out.mkdir(parents=True, exist_ok=True)
    if shard is not None:  # every process writes its pieces of each checkpoint into out
        shard.check_shared(out)
        model = shard.build(mc, device=device, std=0.0, seed=cfg.seed, init_from=cfg.model, dtype=cfg.dtype)
    assert model is not None

    if cfg.freeze_router and not cfg.lora_rank:
        for block in model.layers:
            if isinstance(block.ffn, MoEBlock):
                block.ffn.gate.weight.requires_grad_(False)

    ref: dict[str, torch.Tensor] = {}
    vref: dict[str, torch.Tensor] = {}
    if cfg.task == "dpo" and cfg.reference_free:  # no reference model: its log-probs are 0 (dpo.dpo_loss)
        ref = {"chosen": torch.zeros(len(train_items)), "rejected": torch.zeros(len(train_items))}
        vref = {"chosen": torch.zeros(len(valid_items)), "rejected": torch.zeros(len(valid_items))}
    elif cfg.task == "dpo":
        # "mean": False: the file holds sums (one of means, which length_normalize once stored, is not reused)
        ref_settings = {"model": str(Path(cfg.model).resolve()), "seq_len": cfg.seq_len, "mean": False,
                        "dtype": cfg.dtype} | ({"base_dtype": cfg.lora_base_dtype} if cfg.lora_rank and
                                               cfg.lora_base_dtype != "float32" else {})
        fp = dpo.reference_fingerprint(train_items + valid_items, ref_settings)
        rf = out / "reference_logps.safetensors"
        t = None
        if rf.is_file():
            from safetensors import safe_open

            with safe_open(str(rf), "pt") as f:
                stored = (f.metadata() or {}).get("fingerprint")
            if (stored != fp and resume and cfg.length_normalize and stored == dpo.reference_fingerprint(
                    train_items + valid_items, ref_settings | {"mean": True})):
                raise CheckpointError(
                    f"{rf}: holds per-token means of the reference log-probs, as --length-normalize stored them "
                    "before mixlab's DPO log-probs and rewards became sums over each reply (the division by its token "
                    "count now happens in the loss: the loss is the same, but rewards/* and logps/* are logged as "
                    "sums, and the file's means cannot be reused); finish this run with the mixlab version that "
                    f"started it, or start it again into another --out (or after removing {out})")
            if stored != fp and resume:  # the checkpoint matched the settings and training pairs above
                raise CheckpointError(f"{rf}: reference log-probs for other held-out pairs "
                                      f"({cfg.valid_data or cfg.data} changed since the run started); resume with the "
                                      "original ones, or use another --out")
            # a fresh run (no checkpoint in --out) computes its own over a file of other data or settings
            # (one left by a run that ended before its first checkpoint)
            t = load_file(str(rf)) if stored == fp else None
        elif resume:
            raise CheckpointError(f"{rf}: missing (a DPO run stores its reference log-probs before training)")
        if par is not None:  # all compute them together, or none
            par.check_same({f"{rf} (reused)": t is not None})
        if t is None:  # each process its share (reference_logps), rank 0 writes them
            # a pass over every pair before the first step: minutes on a large model, so it shows progress
            # (a bar on a terminal, else a line), as the steps do
            bar: Any = _reference_progress(len(train_items) + len(valid_items), rf) if cfg.progress and main else None

            def shown(start: int) -> Callable[[int], None] | None:  # the held-out pairs count after the training ones
                return None if bar is None else lambda n: bar.update(start + n - bar.n)

            try:
                t = {f"{k}.{s}": v for k, items, start in (("train", train_items, 0),
                                                           ("valid", valid_items, len(train_items))) if items
                     for s, v in reference_logps(model, items, cfg, par, done=shown(start)).items()}
            finally:
                if bar is not None:
                    bar.close()
            if main:
                with atomic.atomic_file(rf) as tmp:
                    save_file(t, str(tmp), metadata={"fingerprint": fp})
        ref = {"chosen": t["train.chosen"], "rejected": t["train.rejected"]}
        if valid_items:
            vref = {"chosen": t["valid.chosen"], "rejected": t["valid.rejected"]}

    if shard is not None:  # the reference pass left the root's weights gathered: the optimizer takes the shards
        shard.reshard(model)
    model.train()
    if cfg.activation_checkpointing:  # after the reference pass, which keeps nothing for backward anyway
        enable_activation_checkpointing(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in named if p.dim() >= 2]
    no_decay = [(n, p) for n, p in named if p.dim() < 2]
    # Both groups always, the second empty for LoRA: checkpoints hold two groups' settings. Sharded, a
    # group per device mesh as well (FSDP's dense weights over all processes, experts over the dp ones):
    # one fused update cannot mix them (loop.make_optimizer); a sharded checkpoint names states by parameter.
    groups: list[tuple[list[nn.Parameter], bool]] = [([p for _, p in decay], True), ([p for _, p in no_decay], False)]
    if shard is not None:
        by_mesh: dict[tuple[bool, int], list[nn.Parameter]] = {}
        for (_, p), dec in [(x, True) for x in decay] + [(x, False) for x in no_decay]:
            by_mesh.setdefault((dec, id(getattr(p, "device_mesh", None))), []).append(p)
        groups = [(ps, dec) for (dec, _), ps in by_mesh.items()]
    optimizer = cfg.adamw(groups, device=cfg.device)
    trainable = _Trainable(decay + no_decay, owner=model if shard is not None else None)

    if cfg.task == "sft":
        loader: Any = sft.PackedLoader(train_items, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed)
    else:
        loader = PairLoader(len(train_items), batch_size=cfg.batch_size, seed=cfg.seed)
    step = 0
    if resume:
        assert newest is not None
        state = (shard.load if shard is not None else checkpoints.load)(newest, model=trainable, optimizer=optimizer,
                                                                         checksums=False)
        loader.load_state_dict(state["data_position"])
        step = int(state["step"])
    if main:
        atomic.write_text(out / "finetune_config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    metrics = _Metrics(out, resume_step=step if resume else None, tensorboard=cfg.tensorboard) if main \
        else _NoMetrics()
    moe = mc.moe
    aux_coef = (cfg.aux_loss_coef if cfg.aux_loss_coef is not None else moe.aux_loss_coef) if moe else 0.0
    z_coef = moe.z_loss_coef if moe else 0.0

    # The step of the newest checkpoint, which decides whether the end needs one: every process decides
    # alike from it (a sharded checkpoint is written by all), not from a listing of the folder (loop.py).
    saved = step if resume else -1

    def save() -> None:  # rank 0's (the trainable parameters and the optimizer are the same on every
        nonlocal saved   # process), or, sharded, every process's pieces
        saved = step
        if shard is None and not main:
            return
        (shard.save if shard is not None else checkpoints.save)(
            ckpt_root, step=step, model=trainable, optimizer=optimizer, keep=cfg.keep, state={
                "finetune_config": dataclasses.asdict(cfg), "data_position": loader.state_dict(), "tokenizer": tok_spec,
                "data": data_fp, "paths": real_paths(cfg, PATHS)})

    def run_eval() -> dict[str, float]:
        if not valid_items:
            return {}
        if cfg.task == "sft":
            return evaluate_sft(model, valid_items, cfg, par)
        # Before the first step the policy is the reference, whose held-out log-probs are stored already.
        same = step == 0 and not cfg.reference_free
        return evaluate_dpo(model, valid_items, vref, cfg, policy=vref if same else None, par=par)

    stop: list[int] = []
    handlers: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            handlers[sig] = signal.signal(sig, lambda s, _f: stop.append(s))
        except ValueError:
            pass
    bar = None
    if cfg.progress and main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True, disable=None)
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    if step == 0 and cfg.eval_every > 0 and valid_items:
        ev = {"step": 0, **run_eval()}
        metrics.write(ev)
        evals.append(ev)
    last_stop = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
    requested_stop = False
    interval_tokens, interval_s = 0, 0.0  # tokens_per_s: since the last logged record, steps' own time (loop.py)
    # Data parallel: every process reads the whole of each micro-batch (the loader's position is the
    # global batch's, so a checkpoint resumes on any number of processes that splits it) and computes
    # its rows. Each computes its share of the one-process loss: the global counts (assistant tokens,
    # pairs, the router losses' valid tokens) divide its sums, so the shares' gradients add up to the
    # one-process gradient.
    world, rank = (par.world, par.rank) if par is not None else (1, 0)
    mine = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    reduce = par.all_sum if par is not None else None
    try:
        while step < last_stop and not requested_stop and not signalled(stop, reduce):
            t0 = time.perf_counter()
            lr = cfg.lr_at(step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            sums: dict[str, float] = {}
            n_tok = 0
            if cfg.task == "sft":
                # The step's loss is the mean over all its micro-batches' assistant tokens, as one batch
                # of grad_accum x batch_size rows would give (not the mean of per-micro-batch means,
                # which weights a token by 1 / its micro-batch's count; transformers' num_items_in_batch).
                batches = [loader.next_batch() for _ in range(cfg.grad_accum)]
                n_step = max(1, sum(int((b.targets != IGNORE).sum()) for b in batches))
            for micro in range(cfg.grad_accum):
                with _autocast(cfg):
                    if cfg.task == "sft":
                        whole = batches[micro]
                        b = sft.Packed(whole.tokens[mine], whole.targets[mine], whole.positions[mine],
                                       whole.segments[mine])
                        s, _, routings = sft_forward(model, b, device)
                        task_loss = s * (cfg.grad_accum / n_step)  # (loss / grad_accum) below: s / n_step
                        valid, n_valid = b.valid, int(whole.valid.sum())
                        parts = {"loss": task_loss}
                    else:
                        idx = loader.next_indices()
                        whole_pb = dpo.collate_pairs([train_items[i] for i in idx], idx, cfg.seq_len)
                        N = len(idx)
                        rows = torch.cat([torch.arange(N)[mine], N + torch.arange(N)[mine]])  # chosen, rejected
                        pb = dpo.PairBatch(whole_pb.tokens[rows], whole_pb.targets[rows], whole_pb.positions[rows],
                                           whole_pb.reply[rows], whole_pb.index[mine])
                        lp, routings = pair_logps(model, pb, device)
                        M = len(pb.index)
                        n = pb.reply.sum(-1).to(device)  # reply tokens
                        task_loss, m = dpo.dpo_loss(lp[:M], lp[M:], ref["chosen"][pb.index].to(device),
                                                    ref["rejected"][pb.index].to(device), beta=cfg.beta,
                                                    loss_type=cfg.loss, label_smoothing=cfg.label_smoothing,
                                                    reference_free=cfg.reference_free,
                                                    lengths=(n[:M], n[M:]) if cfg.length_normalize else None)
                        task_loss, m = task_loss * (M / N), {k: v * (M / N) for k, v in m.items()}  # means over pairs
                        valid, n_valid = pb.positions >= 0, int((whole_pb.positions >= 0).sum())
                        parts = {"loss": task_loss, **m}
                    # f over the whole micro-batch's tokens (`reduce`), P and z over this process's: their
                    # means, weighted by its share of the valid tokens
                    aux, z = router_losses(routings, valid.to(device), reduce=reduce)
                    aux, z = (x * (int(valid.sum()) / max(n_valid, 1)) for x in (aux, z))
                    n_tok += n_valid
                loss = task_loss + aux_coef * aux + z_coef * z
                (loss / cfg.grad_accum).backward()
                for k, v in {**parts, "aux_loss": aux, "z_loss": z}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            params = [p for _, p in named]
            if par is not None:  # the shares' sums: the one-process gradient and logged values, on every process
                par.sum_grads(params)
                sums = dict(zip(sums, par.all_sum(torch.tensor(list(sums.values()), dtype=torch.float64)).tolist(),
                                strict=True))
            gnorm = shard.clip_grad_norm(model, cfg.max_grad_norm) if shard is not None else \
                float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            # As `mixlab train`: a NaN / Inf step stops the run (it trained on and exported NaN weights,
            # exit 0). The values are the global batch's on every process, so all stop together.
            if not all(math.isfinite(v) for v in (sums["loss"], sums["aux_loss"], sums["z_loss"], gnorm)):
                optimizer.zero_grad(set_to_none=True)
                raise TrainingError(
                    f"non-finite loss at step {step + 1} (loss {sums['loss']:g}, gradient norm {gnorm:g}, lr {lr:g}); "
                    f"lower the learning rate (--lr). {checkpoints.before_it(ckpt_root)}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            interval_tokens += n_tok
            interval_s += time.perf_counter() - t0
            rec: dict[str, Any] = {"step": step, **sums, "lr": lr, "grad_norm": gnorm, "tokens": n_tok,
                                   "tokens_per_s": interval_tokens / interval_s}
            history.append(rec)
            logged = step % cfg.log_every == 0 or step == last_stop
            if logged:
                metrics.write(rec)
                interval_tokens, interval_s = 0, 0.0
            if bar is not None:
                extra = f" acc {rec['rewards/accuracies']:.2f}" if "rewards/accuracies" in rec else ""
                show_step(bar, step, cfg.steps, logged,
                          f"loss {rec['loss']:.4f}{extra} aux {rec['aux_loss']:.3f} tok/s {rec['tokens_per_s']:,.0f}")
            if on_step is not None and on_step(rec):
                requested_stop = True
            if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.steps) and valid_items:
                ev = {"step": step, **run_eval()}
                metrics.write(ev)
                evals.append(ev)
                if bar is not None:
                    bar.write(f"step {step}: {eval_line(ev)}", file=sys.stderr)
            if cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0:
                save()
        if (step == cfg.steps or stop or requested_stop or (stop_after is not None and step == stop_after)) \
                and saved != step:
            save()
        if step == cfg.steps or requested_stop:
            if shard is not None:  # gathered tensor by tensor, rank 0 writing
                shard.export(model, out / "hf", lambda meta, path, weights: save_model(
                    meta, path, fmt="hf", extra_files=_export_info(tok_spec), weights=weights,
                    copy_files=tokenizer_files(cfg.model)))
            elif main:
                export(model, out, cfg, tok_spec)
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
        for sig, h in handlers.items():
            signal.signal(sig, h)
    if par is not None:  # every process returns once rank 0's files are written
        par.all_sum(torch.zeros(1))
    # a signal during the last step or the final export: the run is complete, not stopped
    stopped_by = stop[0] if stop and step < cfg.steps else None
    return FinetuneResult(step=step, history=history, evals=evals, stopped_by=stopped_by,
                          model=model, out=out)


def tokenizer_files(model: str) -> list[Path]:
    """The tokenizer, chat template and generation config files (`mixlab.tokenizer.tokenizer_files`) of the folder
    `model` resolves to, copied into hf/ as TRL's trainers save the tokenizer beside the model (none for a training
    checkpoint `step_*`, which holds none)."""
    src = checkpoints.resolve_weights(model)
    return [] if checkpoints.is_step(src) else folder_tokenizer_files(src)


def _export_info(tok_spec: dict[str, Any]) -> dict[str, str]:
    return {"mixlab_data.json": json.dumps({"tokenizer": tok_spec}, indent=2) + "\n"}


def export(model: Transformer, out: Path, cfg: FinetuneConfig, tok_spec: dict[str, Any]) -> None:
    """out/hf: plain weights (LoRA merged in); out/adapter: the LoRA adapter in PEFT's format. When
    PEFT cannot express the adapters, the reason goes to out/adapter_not_exported.txt and the merged
    weights to out/hf."""
    # Each export is one atomic folder with mixlab_data.json inside it (written with the weights, so
    # the folder's manifest lists it and a later export may replace the folder).
    info = _export_info(tok_spec)
    merged_instead = False
    if cfg.lora_rank and cfg.export_peft:
        # The base, for peft's AutoPeftModelForCausalLM.from_pretrained(out / "adapter"): a folder
        # transformers loads (not a Mistral one or a training checkpoint, which it cannot).
        base = checkpoints.resolve_weights(cfg.model).resolve()
        try:
            save_peft(model, out / "adapter", extra_files=info,
                      base_model=str(base) if (base / "config.json").is_file() else None)
        except (ValueError, ImportError) as e:  # PEFT cannot hold these adapters: merged weights instead
            atomic.write_text(out / "adapter_not_exported.txt", f"{e}\n")
            warnings.warn(f"the LoRA adapter was not exported in PEFT's format ({e}); the merged weights are in "
                          f"{out / 'hf'}", stacklevel=2)
            merged_instead = True
    if cfg.writes_hf or merged_instead:
        plain = merge(model) if cfg.lora_rank else model
        save_model(plain, out / "hf", fmt="hf", extra_files=info, copy_files=tokenizer_files(cfg.model))


__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "load_finetune_config"]
