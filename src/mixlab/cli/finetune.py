"""`mixlab sft` and `mixlab dpo`: thin wrappers over mixlab.train.finetune."""

from __future__ import annotations

import argparse
import os

from mixlab.cli import add_quiet_arg, add_resume_args, dtype_choice, resume_arg, user_path
from mixlab.errors import UsageError


def _run(args: argparse.Namespace, task: str) -> int:
    from mixlab.cli.train import SeqLenDefault, flag_errors, run_processes, stopped
    from mixlab.train.checkpoints import init_config
    from mixlab.train.finetune import (
        FinetuneConfig,
        check_fits,
        eval_line,
        finetune,
        load_finetune_config,
        resolve_tokenizer,
    )
    from mixlab.train.settings import check_split

    if args.ep is not None:  # before the data is read, as train's
        from mixlab.parallel.mesh import check_ep

        check_ep(args.ep)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun each process computes its rows of a batch

    keys: tuple[str, ...] = (
        "model", "data", "valid_data", "out", "tokenizer", "seq_len", "batch_size", "grad_accum", "steps", "lr",
        "warmup", "weight_decay", "clip", "seed", "threads", "dtype", "device", "aux_loss_coef",
            "eval_every", "ckpt_every", "keep", "log_every", "valid_fraction", "max_examples",
            "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_base_dtype")
    if task == "dpo":
        keys += ("beta", "loss", "label_smoothing")
    over = {k: getattr(args, k) for k in keys}
    over["task"] = task
    for flag in ("freeze_router", "reference_free", "length_normalize", "activation_checkpointing"):
        if getattr(args, flag, False):
            over[flag] = True
    if args.quiet:
        over["progress"] = False
    if args.merge:
        over["export_hf"] = True
    seq = SeqLenDefault(task, "packing rows" if task == "sft" else "pairs cut to sequences")

    def fits(cfg: FinetuneConfig) -> None:  # --seq-len and --tokenizer against the model, before the data is read
        if args.merge and not cfg.lora_rank:  # the flag's or the config file's rank
            raise UsageError("--merge merges LoRA adapters: it needs lora_rank (--lora-rank R, or in the config "
                             "file; full fine-tuning writes hf/ anyway)")
        sharding = "--fsdp" if args.fsdp else "--ep" if args.ep is not None and args.ep > 1 else None
        if sharding and cfg.lora_rank:  # the flag's or the config file's rank
            raise UsageError(f"{sharding} with --lora-rank: {sharding} shards full fine-tuning; a LoRA run's "
                             f"trainable part is small: run it data parallel (leave out {sharding})")
        mc = init_config(cfg.model)
        if args.ep is not None and args.ep > 1:  # before the data is read (build would find it after)
            E = mc.moe.num_experts if mc.moe is not None else 0
            if not E:
                raise UsageError(f"--ep {args.ep}: the model is dense (no MoE layer), there are no experts to "
                                 f"split; leave out --ep (under torchrun, mixlab {task} then runs data parallel)")
            if E % args.ep:
                raise UsageError(f"--ep {args.ep} must divide the number of experts ({E})")
        cfg = seq.fit(cfg, mc.max_seq_len)
        check_fits(cfg, mc, resolve_tokenizer(cfg)[0])
        check_split(cfg.batch_size, world, what="fine-tuning")

    with flag_errors(args):
        cfg = seq.apply(load_finetune_config(args.config, then=fits, given=seq.given, **over))
    par = None
    if world > 1 or args.fsdp or args.ep is not None:  # --fsdp alone: a world of one, as `mixlab train --fsdp`
        from mixlab.parallel.mesh import init
        from mixlab.parallel.train import DistributedTraining

        par = DistributedTraining(init(ep=1 if args.ep is None else args.ep, device=cfg.device, fsdp=args.fsdp))
    result = run_processes(lambda: finetune(cfg, resume=resume_arg(args), parallel=par), par)
    if result is None:
        return 0
    if result.stopped_by is not None:
        return stopped(result)
    if result.evals:
        ev = result.evals[-1]
        print(f"step {result.step}: {eval_line(ev)}")
    print(f"run folder: {result.out}")
    return 0


# Where sft and dpo read a setting otherwise than train (packed conversations, or pairs).
SFT_HELP = {"seq_len": "tokens per packed row (a longer conversation is cut); the default is lowered to a model of "
                      "fewer positions",
            "batch_size": "packed rows per micro-batch, each holding as many whole conversations as fit (under "
                          "torchrun: over all processes)"}
DPO_HELP = {"seq_len": "tokens per sequence, prompt + reply (a longer pair is cut); the default is lowered to a "
                      "model of fewer positions",
            "batch_size": "preference pairs per micro-batch (under torchrun: over all processes)"}


def register(sub: argparse._SubParsersAction) -> None:
    from mixlab.cli.train import add_setting_args
    from mixlab.train.finetune import FinetuneConfig

    for task, help_ in (("sft", "supervised fine-tuning on chat JSONL (messages, or prompt + completion), loss on "
                                "assistant turns, packed"),
                        ("dpo", "Direct Preference Optimisation on JSONL pairs (chosen, rejected, prompt|messages, or "
                                "chosen and rejected whole conversations)")):
        p = sub.add_parser(task, help=help_, description="Flags override the config file's settings, which "
                                                           "override the defaults shown.")
        p.add_argument("config", type=user_path, nargs="?", default=None,
                       help="fine-tuning config file (.toml or .json)")
        p.add_argument("--model", type=user_path, default=None,
                       help="starting weights: any checkpoint mixlab loads, or a run folder")
        p.add_argument("--data", type=user_path, default=None, help="JSONL file")
        p.add_argument("--valid-data", type=user_path, dest="valid_data", default=None,
                       help="held-out JSONL file (default: hold out --valid-fraction of --data)")
        p.add_argument("--out", type=user_path, default=None,
                       help="run folder (checkpoints, metrics.jsonl, hf/, adapter/) (default runs/finetune)")
        p.add_argument("--tokenizer", type=user_path, default=None,
                       help="bytes, mixtral or a path (default: the checkpoint's)")
        add_setting_args(p, (("seq_len", int), ("batch_size", int), ("grad_accum", int), ("steps", int),
                             ("lr", float), ("warmup", int), ("weight_decay", float), ("clip", float), ("seed", int),
                             ("threads", int), ("aux_loss_coef", float), ("eval_every", int), ("ckpt_every", int),
                             ("keep", int), ("log_every", int), ("valid_fraction", float), ("max_examples", int),
                             ("lora_rank", int), ("lora_alpha", float), ("lora_dropout", float)), FinetuneConfig,
                         SFT_HELP if task == "sft" else DPO_HELP)
        p.add_argument("--lora-targets", dest="lora_targets", default=None,
                       help="comma-separated: attention, experts, router (default attention,experts)")
        p.add_argument("--lora-base-dtype", dest="lora_base_dtype", choices=["float32", "bfloat16", "int8", "int4"],
                       default=None, help="how the frozen base is held (int8, int4: QLoRA-style) (default float32)")
        p.add_argument("--merge", action="store_true", help="LoRA: also write the merged plain checkpoint (out/hf)")
        p.add_argument("--freeze-router", dest="freeze_router", action="store_true",
                       help="keep the router's weights fixed")
        p.add_argument("--activation-checkpointing", dest="activation_checkpointing", action="store_true",
                       help="recompute each block's activations in backward: the same run in less memory")
        p.add_argument("--dtype", type=dtype_choice("float32", "bfloat16"), default=None, metavar="{float32,bfloat16}",
                       help="autocast dtype (default float32)")
        p.add_argument("--device", default=None, help="cpu (default) or cuda")
        add_resume_args(p)
        add_quiet_arg(p)
        p.add_argument("--ep", type=int, default=None, metavar="E",
                       help="full fine-tuning under torchrun: each process holds E-th of the experts (expert "
                            "parallelism, as train's; E divides the processes and the experts); not with --lora-rank")
        p.add_argument("--fsdp", action="store_true",
                       help="full fine-tuning under torchrun: shard weights, gradients and AdamW states over the "
                            "processes (FSDP2, as train's); not with --lora-rank")
        if task == "dpo":
            p.add_argument("--beta", type=float, default=None, help="DPO beta (default 0.1)")
            p.add_argument("--loss", choices=["sigmoid", "ipo"], default=None, help="DPO loss (default sigmoid)")
            p.add_argument("--label-smoothing", dest="label_smoothing", type=float, default=None,
                           help="sigmoid loss: conservative DPO's label smoothing (default 0)")
            p.add_argument("--reference-free", dest="reference_free", action="store_true",
                           help="reference log-probs 0: no reference model")
            p.add_argument("--length-normalize", dest="length_normalize", action="store_true",
                           help="the loss compares per-token log-ratios (sum / reply tokens): TRL's ipo "
                                "and sigmoid_norm; the logged rewards stay sums")
        p.set_defaults(func=lambda a, t=task: _run(a, t))
