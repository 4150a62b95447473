"""`mixlab upcycle`: a dense Mistral/Llama checkpoint in, a Mixtral-style MoE checkpoint out."""

from __future__ import annotations

import argparse

from mixlab.cli import add_quiet_arg, dtype_choice, model_path, non_negative, sampling, user_path
from mixlab.cli.model import shard_bytes
from mixlab.errors import UsageError


def upcycle(args: argparse.Namespace) -> int:
    from mixlab.config import ConfigError, MoEConfig, get_preset
    from mixlab.train.upcycle import upcycle as run

    try:  # the MoE part's own checks (on a tiny model), before the checkpoint is read: a usage error, exit 2
        get_preset("tiny-moe").replace(moe=MoEConfig(num_experts=args.experts, top_k=args.top_k))
    except ConfigError as e:  # the library's words: "--experts 8 --top-k 9: config field 'moe.top_k' must be ..."
        raise UsageError(f"--experts {args.experts} --top-k {args.top_k}: {e}") from None
    report = run(args.src, args.out, num_experts=args.experts, top_k=args.top_k, router_init=args.router_init,
                 router_std=args.router_std, noise=args.noise, seed=args.seed, dtype=args.dtype,
                 max_shard_bytes=args.max_shard_bytes, overwrite=args.overwrite,
                 progress=not args.quiet)
    c = report.config
    assert c.moe is not None
    print(f"wrote {args.out}: {c.moe.num_experts} experts, top-{c.moe.top_k}, {c.n_layers} layers; "
          f"{report.dense_params:,} dense -> {report.moe_params:,} total / {report.moe_active_params:,} active "
          f"parameters ({report.n_tensors} tensors)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from mixlab.train.upcycle import ROUTER_INITS

    p = sub.add_parser("upcycle", help="make a Mixtral-style MoE from a dense Mistral/Llama checkpoint "
                                       "(sparse upcycling: every expert starts as the layer's FFN)")
    p.add_argument("--from", type=model_path, dest="src", required=True, metavar="DENSE_DIR",
                   help="dense checkpoint folder: transformers (MistralForCausalLM or LlamaForCausalLM) or "
                        "Mistral format (params.json), or a mixlab train run of a dense model (its hf/ export)")
    p.add_argument("--out", type=user_path, required=True, metavar="DIR", help="output folder (written atomically)")
    p.add_argument("--experts", type=int, default=8, help="experts per layer (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--router-init", choices=ROUTER_INITS, default="normal",
                   help="router weights: zeros, normal (std --router-std) or uniform (nn.Linear's default); "
                        "the upcycled model computes the dense function whatever this is")
    p.add_argument("--router-std", type=non_negative, default=0.02, help="std of the normal router init (default 0.02)")
    p.add_argument("--noise", type=non_negative, default=0.0, metavar="STD",
                   help="add independent Gaussian noise to each expert copy of each matrix, std = STD x that "
                        "dense matrix's own std (default 0: exact copies)")
    p.add_argument("--seed", type=sampling("seed", int), default=0,  # torch.Generator's range, as generate's
                   help="seed for the router and the noise (default 0)")
    p.add_argument("--dtype", type=dtype_choice("float32", "bfloat16", "float16"), default=None,
                   help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--max-shard-gb", dest="max_shard_bytes", type=shard_bytes, default=2 * 2**30,
                   metavar="SIZE", help="largest output shard: a number of GiB, or a size with its unit, 2GB "
                                        "(10^9 bytes) or 500MiB (default 2 GiB); peak memory is about one shard")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it holds files mixlab did not write (never the input folder)")
    add_quiet_arg(p)
    p.set_defaults(func=upcycle)
