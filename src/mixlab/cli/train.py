"""`mixlab data prepare` / `check`, `mixlab train` and `mixlab demo`: thin wrappers over mixlab.train."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from mixlab.cli import (
    _finite,
    _parse,
    add_quiet_arg,
    add_resume_args,
    dtype_choice,
    fraction,
    names,
    non_negative,
    note,
    positive,
    resume_arg,
    user_path,
)
from mixlab.errors import ConfigError, SettingsFileError, UsageError


def data_prepare(args: argparse.Namespace) -> int:
    from mixlab.train.data import prepare, read_documents

    meta = prepare(read_documents(args.sources, domains=args.domains), args.out, tokenizer=args.tokenizer,
                   valid_fraction=args.valid_fraction, seed=args.seed, progress=not args.quiet,
                   sources=args.sources, overwrite=args.overwrite)
    for split, per in meta["splits"].items():
        tokens = sum(v["tokens"] for v in per.values())
        docs = sum(v["docs"] for v in per.values())
        if not per:  # e.g. no valid split: --valid-fraction 0 and no valid.* files
            print(f"{split}: none")
            continue
        print(f"{split}: {tokens:,} tokens in {docs:,} documents over {len(per)} domain(s) ({', '.join(per)})")
    tokenizer = meta["tokenizer"].get("name", meta["tokenizer"]["type"])  # bytes, mixtral or the file's path
    print(f"wrote {args.out} (tokenizer {tokenizer}, vocabulary {meta['vocab_size']}, "
          f"{meta['dtype']})")
    return 0


def data_check(args: argparse.Namespace) -> int:
    from mixlab.train.data import TokenDataset

    ds = TokenDataset(args.dataset)
    n = ds.check_ids(progress=not args.quiet)
    print(f"{args.dataset}: {n:,} tokens, every id below the vocabulary of {ds.vocab_size}; sizes and document "
          "offsets as meta.json says")
    return 0


def _overrides(args: argparse.Namespace) -> dict:
    keys = ("data", "out", "model", "seq_len", "batch_size", "grad_accum", "steps", "lr", "warmup", "clip",
            "weight_decay", "dtype", "device", "seed", "threads", "eval_every", "ckpt_every", "keep", "log_every",
            "init_from", "data_offset")
    over = {k: getattr(args, k) for k in keys}
    for flag in ("activation_checkpointing", "compile", "deterministic"):
        if getattr(args, flag):
            over[flag] = True
    if args.quiet:
        over["progress"] = False
    if args.set:
        mo: dict = {}
        for item in args.set:
            key, eq, val = item.partition("=")
            if not eq or not key:
                raise UsageError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set dim=256")
            try:
                value = json.loads(val)
            except (json.JSONDecodeError, RecursionError):  # text, refused by the field's check
                value = val
            if key.startswith("moe."):
                mo.setdefault("moe", {})[key[4:]] = value
            else:
                mo[key] = value
        over["model_overrides"] = mo
    return over


@contextmanager
def flag_errors(args: argparse.Namespace) -> Iterator[None]:
    """A ConfigError of the run's settings (load_train_config's or load_finetune_config's, with the checks
    the command adds) as the command line's: a usage error (exit 2) naming the flags given ("fine-tuning
    setting 'beta' (--beta) must be a finite number > 0, got 0.0", "--set dim=32: model_overrides: ..."), unless it is
    the config file's (a SettingsFileError: load_settings found that the file set the setting; exit 1:
    "run.toml: ...")."""
    try:
        yield
    except (UsageError, SettingsFileError):
        raise
    except ConfigError as e:
        raise UsageError(_flags_named(e, args)) from None


def _flags_named(e: ConfigError, args: argparse.Namespace) -> str:
    """A settings error of the flags' with the flag given named: `setting 'lora_alpha'` by --lora-alpha, a
    model field's (model_overrides': `model_overrides: ...`, `config field 'dim' ...`) by the --set items."""
    from mixlab.train.settings import setting_of

    message, name = str(e), setting_of(e)
    if name == "model_overrides" and getattr(args, "set", None):
        return f"--set {' --set '.join(args.set)}: {message}"
    if name is None:
        return message
    given, said = getattr(args, name, None), f"setting '{name}'"
    if given is None or given is False or f"{said} (--" in message:  # None, or a switch's False: not given
        return message
    return message.replace(said, f"{said} (--{name.replace('_', '-')})", 1)


def _parallel(args: argparse.Namespace, device: str, compile: bool) -> Any:
    """The process layout for --ep / --fsdp, or under torchrun (WORLD_SIZE > 1); None for one process."""
    if args.ep is None and not args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    if compile:
        raise UsageError("--compile is not supported with --ep / --fsdp or under torchrun yet")
    from mixlab.parallel.mesh import init
    from mixlab.parallel.train import DistributedTraining

    # init's check_ep: an --ep this world cannot hold is the command line's error (a UsageError, exit 2)
    return DistributedTraining(init(ep=1 if args.ep is None else args.ep, fsdp=args.fsdp, device=device))


def run_processes(run: Callable[[], Any], par: Any) -> Any:
    """`run()`, then the process group torchrun's processes joined shut down (`par`: their
    `DistributedTraining`, or None in one process). Its result on rank 0 (or the one process); None
    on the others, which report nothing."""
    try:
        result = run()
    finally:
        if par is not None:
            from mixlab.parallel.mesh import shutdown

            shutdown()
    return None if par is not None and not par.is_main else result


def stopped(result: Any) -> int:
    """A run stopped by a signal (checkpointed): the line that says so, and the exit code 128 + signal."""
    name = signal.Signals(result.stopped_by).name
    print(f"stopped by {name} at step {result.step}; checkpoint saved; continue with --resume", file=sys.stderr)
    return 128 + int(result.stopped_by)


_S = TypeVar("_S", bound=Any)  # TrainConfig or FinetuneConfig (imported late: start-up)


class SeqLenDefault:
    """seq_len's default (train's 256, sft's / dpo's 512), where neither the flag nor the config file sets it,
    lowered to a model of fewer positions, said once (as eval's --context is): it was refused ("seq_len 256 is
    beyond the model's context", the demo's model of 256 under sft's 512), though no length had been set. A
    value given past the model's context stays the settings check's error. `given` goes to load_settings,
    which fills it before the command's check calls `fit`; `apply` then lowers the loaded settings."""

    def __init__(self, command: str, rows: str) -> None:
        self.command, self.rows = command, rows  # rows: what a sequence of seq_len tokens is, in the note
        self.given: set[str] = set()  # the settings the file or a flag set
        self.context: int | None = None  # the model's, where the default was lowered to it

    def fit(self, cfg: _S, context: int) -> _S:
        """`cfg` with the default seq_len lowered to `context` where it is past it (remembered for `apply`)."""
        if "seq_len" in self.given or cfg.seq_len <= context:
            return cfg
        self.context = context
        return dataclasses.replace(cfg, seq_len=context)

    def apply(self, cfg: _S) -> _S:
        if self.context is None:
            return cfg
        if int(os.environ.get("RANK", "0") or 0) == 0:  # under torchrun: once, by rank 0
            note(self.command, f"--seq-len's default {cfg.seq_len} is past the model's {self.context} "
                               f"positions; {self.rows} of {self.context} tokens")
        return dataclasses.replace(cfg, seq_len=self.context)


def train_cmd(args: argparse.Namespace) -> int:
    from mixlab.train.data import TokenDataset
    from mixlab.train.loop import TrainConfig, build_model_config, eval_line, load_train_config, train
    from mixlab.train.settings import check_context, check_split

    seq = SeqLenDefault("train", "training rows")

    def model_config(cfg: TrainConfig) -> None:  # the one train builds: --set against --init-from, ...
        world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun each process reads its rows of a batch
        check_split(cfg.batch_size, world, what="training")
        if cfg.data:
            mc = build_model_config(cfg, TokenDataset(cfg.data), check_len=False)
            check_context(seq.fit(cfg, mc.max_seq_len).seq_len, mc)

    if args.ep is not None:  # before the dataset is read, as generate's
        from mixlab.parallel.mesh import check_ep

        check_ep(args.ep)
    with flag_errors(args):
        cfg = seq.apply(load_train_config(args.config, then=model_config, given=seq.given, **_overrides(args)))
    if not cfg.data:
        raise UsageError("no dataset: pass --data DIR (a folder written by `mixlab data prepare`)")
    par = _parallel(args, cfg.device, cfg.compile)
    result = run_processes(lambda: train(cfg, resume=resume_arg(args), parallel=par), par)
    if result is None:
        return 0
    if result.stopped_by is not None:
        return stopped(result)
    if result.evals:
        ev = result.evals[-1]
        print(f"step {result.step}: {eval_line(ev)}; " + ", ".join(
            f"{d} {v:.3f}" for d, v in ev["loss"].items()))
    print(f"run folder: {result.out}")
    return 0


def demo_cmd(args: argparse.Namespace) -> int:
    from mixlab.train.demo import run_demo

    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):  # -1: a step past it
        raise UsageError(f"--minutes must be a number > 0, got {args.minutes:g}")
    res = run_demo(steps=args.steps, minutes=args.minutes, data=args.data, out=args.out, seed=args.seed,
                   quiet=args.quiet)
    if res.get("stopped_by") is not None:  # no results (the demo went on to print them, and a model it had not saved)
        kept = f"; checkpoint in {os.path.join(args.out, 'run', 'checkpoints')}" if args.out else ""
        print(f"stopped by {signal.Signals(res['stopped_by']).name} at step {res['steps']}{kept}", file=sys.stderr)
        return 128 + res["stopped_by"]
    return 0


# What each numeric run-setting flag of train / sft / dpo sets; its default is read off the config class.
SETTING_HELP = {
    "data_offset": "training windows to skip first, to continue the stream an earlier run stopped in",
    "seq_len": "tokens per training row; the default is lowered to a model of fewer positions",
    "batch_size": "rows per micro-batch over all processes",
    "grad_accum": "micro-batches per optimizer step", "steps": "optimizer steps", "lr": "peak learning rate",
    "warmup": "linear warm-up steps before the cosine decay", "clip": "gradient clipping by global norm; 0: off",
    "weight_decay": "AdamW weight decay on matrices", "seed": "data order and initialisation",
    "threads": "CPU threads for torch; 0: torch's default", "eval_every": "steps between evaluations; 0: none",
    "ckpt_every": "steps between checkpoints; 0: none", "keep": "newest checkpoints kept; 0: all",
    "log_every": "steps between metrics records", "aux_loss_coef": "load-balancing loss coefficient",
    "valid_fraction": "share of --data held out when there is no --valid-data",
    "max_examples": "use only the first N examples (non-empty lines) of --data; 0: all",
    "lora_rank": "LoRA rank; leave it out for full fine-tuning", "lora_alpha": "LoRA scale numerator: alpha / rank",
    "lora_dropout": "dropout on LoRA inputs (attention only)",
}


def count(text: str, least: int = 0) -> int:
    """argparse type of an integer run setting (--warmup, --threads, --seed, ...): in [least, 2**63 - 1], as
    check_settings takes a config file's (least 1: the batch shape, steps and log_every, POSITIVE)."""
    from mixlab.train.settings import LARGEST

    v = int(_parse(text, int))
    if not least <= v <= LARGEST:
        raise argparse.ArgumentTypeError(f"expected an integer in [{least}, {LARGEST}], got {v}")
    return v


def lora_rank(text: str) -> int:
    """argparse type of --lora-rank: an integer >= 1 (0, which a config file's lora_rank takes as full
    fine-tuning, would be the flag silently doing nothing; `count`'s range said 0 was fine)."""
    from mixlab.train.settings import LARGEST

    v = int(_parse(text, int))
    if not 1 <= v <= LARGEST:
        raise argparse.ArgumentTypeError(f"expected a positive integer (leave out --lora-rank for full fine-tuning), "
                                         f"got {v}")
    return v


def add_setting_args(p: argparse.ArgumentParser, settings: tuple[tuple[str, type], ...], config: Any,
                     helps: dict[str, str] | None = None) -> None:
    """One flag per numeric run setting (default None: the config file's value, else `config`'s default);
    `helps`: a command's own wording of some (SETTING_HELP's otherwise). A flag's value out of the range
    that check_settings gives a config file's is refused by its type, naming the flag (a usage error, exit
    2): an integer >= 1 for the batch shape and steps, >= 0 for the others; a finite number >= 0."""
    from mixlab.train.settings import POSITIVE

    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    helps = SETTING_HELP | (helps or {})
    for name, typ in settings:
        shown = "the checkpoint's" if defaults[name] is None else f"{defaults[name]:g}"
        text = helps[name] if name == "lora_rank" else f"{helps[name]} (default {shown})"
        # lora_alpha: any finite number here, so that -1 and 0 get LoraConfig's one refusal ('> 0'), where '>= 0'
        # told `--lora-alpha -1` a 0 that was refused next
        check = (_finite if name == "lora_alpha" else non_negative) if typ is float else \
            functools.partial(count, least=1) if name in POSITIVE else lora_rank if name == "lora_rank" else count
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=check, default=None, help=text)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """--ep / --fsdp: training over several processes (launch with torchrun; docs/scaling.md)."""
    p.add_argument("--ep", type=int, default=None, metavar="E",
                   help="expert-parallel size: each process keeps E-th of the experts (divides the processes)")
    p.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimizer states (FSDP2)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="training data tools")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = dsub.add_parser("prepare", help="tokenize text / JSONL files into packed, memory-mapped token shards")
    q.add_argument("sources", type=user_path, nargs="+",
                   help="files or folders (shared corpus layout: <domain>/train.jsonl, "
                        "<domain>/valid.jsonl; else domain = top-level subfolder, or the folder's own name for "
                        "its files; two folders giving one domain are refused; a file given alone: its stem, "
                        "its folder's name for a split's file such as github/valid.jsonl, a .jsonl row's "
                        "'domain' field, as eval and analyze name them)")
    q.add_argument("--out", type=user_path, required=True, help="dataset folder to write")
    q.add_argument("--tokenizer", type=user_path, default="bytes",
                   help="bytes (default), mixtral, or a path: a SentencePiece .model, a tokenizer.json or a folder "
                        "holding one")
    q.add_argument("--domains", type=names, default=None, help="comma-separated domains to keep (default: all)")
    q.add_argument("--valid-fraction", type=fraction, default=0.05,
                   help="documents held out per domain when it has no valid file (default 0.05)")
    q.add_argument("--seed", type=int, default=0, help="which documents are held out (default 0)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it holds files mixlab did not write (never one holding a source)")
    add_quiet_arg(q)
    q.set_defaults(func=data_prepare)
    q = dsub.add_parser("check", help="read a prepared dataset in full: every file's size, document offsets and "
                                      "token ids (training checks each window's ids as it reads it)")
    q.add_argument("dataset", type=user_path, help="dataset folder (`data prepare`'s --out)")
    add_quiet_arg(q)
    q.set_defaults(func=data_check)

    from mixlab.train.loop import TrainConfig

    p = sub.add_parser("train", help="train a (MoE) model on a prepared dataset",
                       description="Flags override the config file's settings, which override the defaults shown.")
    p.add_argument("config", type=user_path, nargs="?", default=None, help="training config file (.json or .toml)")
    p.add_argument("--data", type=user_path, default=None, help="prepared dataset folder")
    p.add_argument("--out", type=user_path, default=None, help="run folder (checkpoints, metrics.jsonl, hf/)")
    p.add_argument("--model", type=user_path, default=None, help="preset name (default tiny-moe) or checkpoint folder")
    p.add_argument("--init-from", type=user_path, default=None, metavar="DIR",
                   help="start from these weights: any checkpoint folder mixlab loads (transformers, Mistral, "
                        "an upcycled model), a checkpoints/step_* folder or a run folder; the model config "
                        "is the checkpoint's")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="model config override, e.g. --set dim=256 --set moe.num_experts=8 (repeatable)")
    add_setting_args(p, (("data_offset", int), ("seq_len", int), ("batch_size", int), ("grad_accum", int),
                         ("steps", int), ("lr", float), ("warmup", int), ("clip", float), ("weight_decay", float),
                         ("seed", int), ("threads", int), ("eval_every", int), ("ckpt_every", int), ("keep", int),
                         ("log_every", int)), TrainConfig)
    p.add_argument("--dtype", type=dtype_choice("float32", "bfloat16"), default=None, metavar="{float32,bfloat16}",
                   help="autocast dtype (default float32)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in the backward pass instead of keeping its activations")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms")
    add_resume_args(p)
    add_quiet_arg(p)
    add_parallel_args(p)
    p.set_defaults(func=train_cmd)

    p = sub.add_parser("demo", help="train a tiny MoE on text every Python install carries, then generate "
                                    "and show which experts each kind of text uses")
    p.add_argument("--steps", type=positive, default=None, help="optimizer steps (default: fill --minutes)")
    p.add_argument("--minutes", type=float, default=None,
                   help="training time budget (default 4; with --steps, none: every step runs)")
    p.add_argument("--data", type=user_path, default=None, help="train on a corpus in the shared layout instead")
    p.add_argument("--out", type=user_path, default=None,
                   help="keep the run folder here, with loss.png and routing.png (default: a "
                        "temporary folder); an earlier demo's --out is replaced")
    p.add_argument("--seed", type=count, default=0,  # train's rule: refused after the corpus was built
                   help="corpus, held-out split, initialisation and data order (default 0)")
    add_quiet_arg(p)
    p.set_defaults(func=demo_cmd)
