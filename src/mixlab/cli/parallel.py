"""`mixlab plan`: per-device memory and communication of a training or inference layout
(thin: the arithmetic is mixlab.parallel.plan)."""

from __future__ import annotations

import argparse
import json


def plan_cmd(args: argparse.Namespace) -> int:
    from mixlab.cli.model import _config
    from mixlab.config import parse_bytes
    from mixlab.parallel.plan import plan

    _, cfg = _config(args.model)
    p = plan(cfg, mode=args.mode, devices=args.devices, ep=args.ep,
             device_mem=parse_bytes(args.device_mem, what="--device-mem"),
             fsdp=args.fsdp, seq=args.seq, batch=args.batch, dtype=args.dtype,
             quant=None if args.quant == "none" else args.quant, activation_checkpointing=args.activation_checkpointing)
    print(json.dumps(p.as_dict(), indent=1) if args.json else p.table())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-device memory (parameters, gradients, optimizer, activations, KV cache) "
                                    "and all-to-all bytes of a training or inference layout")
    p.add_argument("model", help="a preset name (e.g. mixtral-8x7b), a checkpoint folder or a .gguf file")
    p.add_argument("--mode", choices=["train", "infer"], default="train",
                   help="train (AdamW, default) or infer (weights and KV cache)")
    p.add_argument("--devices", type=int, default=1, help="number of devices (GPUs or processes)")
    p.add_argument("--device-mem", default="80GB", help="memory per device: 80GB (10^9 bytes) or 80GiB (2^30)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (divides --devices and the experts)")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer states (FSDP2)")
    p.add_argument("--seq", type=int, default=4096, help="sequence length (training) / context (KV cache)")
    p.add_argument("--batch", type=int, default=None,
                   help="global sequences per step (training; default one per device) / in flight (inference, "
                        "default 1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                   help="training: autocast dtype (master weights stay float32); inference: weight dtype")
    p.add_argument("--quant", choices=["none", "int8", "int4"], default="none", help="inference weight format")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="training: keep only each block's input, recomputing the rest in the backward pass")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=plan_cmd)
