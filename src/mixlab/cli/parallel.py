"""`mixlab plan`: per-device memory and communication of a training or inference layout
(thin: the arithmetic is mixlab.parallel.plan)."""

from __future__ import annotations

import argparse
import json

from mixlab.cli import dtype_choice, note, positive, user_path
from mixlab.errors import UsageError


def plan_cmd(args: argparse.Namespace) -> int:
    from mixlab.cli.model import _config
    from mixlab.config import parse_bytes, suffix_of
    from mixlab.parallel.plan import plan

    _, cfg = _config(args.model)
    quant = args.quant or "none"
    if args.quant is None and args.mode == "infer" and suffix_of(args.model) == ".gguf":
        from mixlab.checkpoint.gguf_read import file_quant, read_header

        # as generate / chat / serve / eval load it (their --quant auto): a Q4_0 / Q4_K_M file as int4, ...
        auto, ftype = file_quant(read_header(args.model))
        if auto is not None:
            quant = auto
            note("plan", f"planned as {auto}: the matrices of {args.model} are {ftype}, loaded as {auto} by "
                         "generate, chat, serve and eval (--quant none plans them as floats)")
    try:  # plan's ValueErrors are its arguments', the flags here: a usage error (exit 2), naming the flag
        p = plan(cfg, mode=args.mode, devices=args.devices, ep=args.ep,
                 device_mem=parse_bytes(args.device_mem, what="--device-mem"),
                 fsdp=args.fsdp, seq=args.seq, batch=args.batch, dtype=args.dtype,
                 quant=None if quant == "none" else quant, activation_checkpointing=args.activation_checkpointing,
                 lora_rank=args.lora_rank, lora_targets=args.lora_targets, lora_base_dtype=args.lora_base_dtype)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(json.dumps(p.as_dict(), indent=1) if args.json else p.table())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-device memory (parameters, gradients, optimizer, activations, KV cache) "
                                    "and all-to-all bytes of a training or inference layout")
    p.add_argument("model", type=user_path,
                   help="a preset name (e.g. mixtral-8x7b), a checkpoint folder or a .gguf file")
    p.add_argument("--mode", choices=["train", "finetune", "infer"], default="train",
                   help="train (AdamW, default), finetune (mixlab sft / dpo, data parallel: each device holds the "
                        "whole model; sharded with --fsdp; LoRA with --lora-rank) "
                        "or infer (weights and KV cache)")
    p.add_argument("--devices", type=int, default=1, help="number of devices (GPUs or processes)")
    p.add_argument("--device-mem", default="80GB", help="memory per device: 80GB (10^9 bytes) or 80GiB (2^30)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (divides --devices and the experts)")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer states (FSDP2; "
                   "finetune: full fine-tuning, sft --fsdp)")
    p.add_argument("--seq", "--seq-len", dest="seq", type=int, default=4096,
                   help="sequence length (training, train's --seq-len) / context (KV cache) (default 4096)")
    p.add_argument("--batch", "--batch-size", dest="batch", type=int, default=None,
                   help="global sequences per micro-batch (training, train's --batch-size; default one per device; "
                        "finetune: sft's --batch-size, twice dpo's) / in flight (inference, default 1)")
    p.add_argument("--dtype", type=dtype_choice("float32", "bfloat16", "float16"), default="bfloat16",
                   metavar="{float32,bfloat16,float16}",
                   help="training: autocast dtype (master weights stay float32); inference: weight dtype")
    p.add_argument("--quant", choices=["none", "int8", "int4"], default=None,
                   help="inference weight format (default none; a quantised GGUF file: the format generate loads it "
                        "as, int4 for Q4_0 / Q4_K_M files, int8 for Q5_K_M / Q6_K / Q8_0)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="training: keep only each block's input, recomputing the rest in the backward pass")
    p.add_argument("--lora-rank", type=positive, default=0,
                   help="finetune: LoRA adapters of this rank (absent: full fine-tuning), as sft's --lora-rank")
    p.add_argument("--lora-targets", default=None,
                   help="finetune: attention,experts[,router] (default attention,experts), as sft's")
    p.add_argument("--lora-base-dtype", default=None, choices=["float32", "bfloat16", "int8", "int4"],
                   help="finetune: how the frozen base of the targeted matrices is held (default float32)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON on stdout instead of the table")
    p.set_defaults(func=plan_cmd)
