"""`mixlab serve`: the OpenAI-compatible server (mixlab.serve) over the engine (mixlab.engine).
Thin: flags here; loading in cli.run._load; the server in mixlab.serve."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import math
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mixlab.cli import adapter_path, model_path, positive, sampling, user_path
from mixlab.cli.run import _load, add_runtime_args, print_stats, quant_flag, resolve_quant
from mixlab.config import format_bytes, parse_bytes
from mixlab.dtypes import dtype_name
from mixlab.errors import CheckpointError, UsageError
from mixlab.model.formats import expert_cache
from mixlab.model.inference import quant_of

if TYPE_CHECKING:
    from mixlab.checkpoint.adapter import Adapter


def _bytes(text: str) -> int:
    """A size as every mixlab flag reads one (`config.parse_bytes`: 2GB = 2 x 10^9, 2GiB = 2 x 2^30)."""
    try:
        return parse_bytes(text, what="")
    except ValueError as e:  # argparse names the flag: the message without parse_bytes's `what: `
        raise argparse.ArgumentTypeError(str(e).removeprefix(": ")) from None


def lora_module(text: str) -> tuple[str, str]:
    """An item of --lora-modules, vLLM's syntax: NAME=DIR, or JSON {"name": NAME, "path": DIR}."""
    if text.lstrip().startswith("{"):
        try:
            item = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise argparse.ArgumentTypeError(f"{text[:80]!r}: not valid JSON ({e})") from None
        name, path = (item.get("name"), item.get("path")) if isinstance(item, dict) else (None, None)
        if not (isinstance(name, str) and name and isinstance(path, str) and path):
            raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object with a non-empty \"name\" and "
                                             "\"path\"")
    else:
        name, _, path = text.partition("=")
        if not name or not path:
            raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=DIR (the adapter's name in the API, its PEFT "
                                             "folder)")
    return name, adapter_path(path)


def cache_line(total_bytes: int, slots: int, context: int, model_context: int, max_batch: int) -> str:
    """What the KV cache holds, said at startup: the context per request is what the cache budget
    leaves for `max_batch` sequences, which can be far below the model's own."""
    line = f"mixlab serve: KV cache {format_bytes(total_bytes)}: {slots} sequences of up to {context} tokens"
    if context < model_context:
        line += (f" (the model's context is {model_context}: --cache-bytes, --max-model-len or a smaller --max-batch "
                 "for longer requests)")
    elif slots < max_batch:
        line += f" (--max-batch {max_batch}: --cache-bytes or a smaller --max-model-len for more at once)"
    return line


def check_address(host: str, port: int) -> None:
    """Bind (and let go) each address `host` names, as uvicorn will once the model is loaded: a port in
    use, or a host that does not resolve, failed only after the load (minutes for a large model). An
    address of a family this machine lacks (::1 without IPv6) is skipped, as asyncio skips it."""
    try:
        bound, unavailable = 0, None
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                  flags=socket.AI_PASSIVE):
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
                try:
                    s.bind(address)
                    bound += 1
                except OSError as e:
                    if e.errno != errno.EADDRNOTAVAIL:
                        raise
                    unavailable = e
        if not bound and unavailable is not None:
            raise unavailable
    except OSError as e:
        raise ValueError(f"cannot listen on --host {host} --port {port}: {e.strerror or e}") from None


def served_name(model: str) -> str:
    """The name a model is served as without --served-model-name: its folder's or file's name (a GGUF file's
    with its suffix), and for a training run's export, `RUN/hf`, the run's (`checkpoints.is_training`; a
    demo's model was served as "hf"). Links are not followed: a hub snapshot's file links to a blob named
    by its hash."""
    from mixlab.train.checkpoints import is_training

    path = Path(os.path.abspath(os.path.expanduser(model)))
    if path.name == "hf" and is_training(path.parent):
        path = path.parent
    return path.name or "mixlab"


def serve(args: argparse.Namespace) -> int:
    try:
        from mixlab.engine import Engine
        from mixlab.serve import ServerConfig, create_app, run_server
        from mixlab.serve.common import api_key_problem
    except ImportError as e:
        raise ValueError(f"serving needs the serve extra: pip install 'mixlab[serve]' ({e})") from None
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if args.api_key is None:  # read here, so that a bad one is named where it came from
        args.api_key = os.environ.get("MIXLAB_API_KEY") or None
        where = "$MIXLAB_API_KEY (the environment's key; --api-key not given)"
    else:
        where = "--api-key"
    if args.api_key is not None and (why := api_key_problem(args.api_key)):  # a key file's newline, say
        raise UsageError(f"{where} {why}")
    if not 0 < args.read_timeout < math.inf:
        raise UsageError(f"--read-timeout must be a number of seconds > 0, got {args.read_timeout}")
    if not 0 <= args.drain_timeout < math.inf:
        raise UsageError(f"--drain-timeout must be a number of seconds >= 0, got {args.drain_timeout}")
    if args.responses_store < 0:
        raise UsageError(f"--responses-store must be an integer >= 0 (0: none), got {args.responses_store}")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and args.api_key is None:
        print(f"mixlab serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "address can use the model", file=sys.stderr)
    check_address(args.host, args.port)
    name = args.served_model_name or served_name(args.model)
    resolve_quant(args)  # --quant auto: what the checks below see
    _check_engine_flags(args)
    adapters = _read_lora_modules(args.lora_modules or [], name)  # before the long load
    model, tok = _load(args)
    kw = dict(max_batch=args.max_batch, max_queue=args.max_queue, token_budget=args.token_budget,
              pack_weights={"auto": None, "yes": True, "no": False}[args.pack_weights])
    if args.cache_bytes is not None:
        kw["cache_bytes"] = args.cache_bytes
    if args.prefill_chunk is not None:
        kw["prefill_chunk"] = args.prefill_chunk
    if args.batch_invariant:
        kw["batch_invariant"] = True
    if args.max_model_len is not None:
        if not 2 <= args.max_model_len <= model.config.max_seq_len:
            raise UsageError(f"--max-model-len must be in [2, {model.config.max_seq_len}] (the model's context), "
                             f"got {args.max_model_len}")
        kw["max_seq_len"] = args.max_model_len
    try:
        engine = Engine(model, tok, adapters=adapters, **kw)
    except CheckpointError:  # an adapter that does not fit the model: its own one-line error
        raise
    except ValueError as e:  # the budgets do not fit together: say which flags set them
        if str(e).startswith("adapter "):
            raise UsageError(f"--lora-modules: {e}") from None
        if "batch_invariant" in str(e):
            raise UsageError(f"--batch-invariant: {e}") from None
        if "pack_weights" in str(e):  # weights the flags could not tell before the load (a GGUF's, this CPU's)
            raise UsageError(f"--pack-weights yes: {e}") from None
        raise UsageError(f"{e} (the flags: --cache-bytes, --max-model-len, --max-batch)") from None
    runner = getattr(engine, "runner", None)
    context = int(getattr(engine, "max_len", None) or getattr(runner, "max_len", None) or model.config.max_seq_len)
    moe = model.config.moe
    # the matrices as loaded: a Q4_0 GGUF's are int4 without --quant (/v1/models said "none")
    quant = quant_of(model, args.quant)
    dtype = dtype_name(model.tok_embeddings.weight.dtype)
    info = {"layers": model.config.n_layers, "experts": moe.num_experts if moe else 0,
            "experts_per_token": moe.top_k if moe else 0, "vocab_size": model.config.vocab_size,
            "dtype": dtype, "quant": quant}
    # on a loopback address only IP addresses and localhost by default (DNS rebinding, docs/serving.md);
    # on another, any name (the machine's names and a proxy's cannot be told from the address)
    hosts = args.allowed_hosts if args.allowed_hosts is not None else ([] if loopback else ["*"])
    cfg = ServerConfig(model_name=name, context_len=context, max_tokens_limit=args.max_tokens_limit,
                       api_key=args.api_key, max_body_bytes=args.max_body_bytes, read_timeout_s=args.read_timeout,
                       max_connections=args.max_connections, responses_store=args.responses_store,
                       cors_origins=args.allowed_origins, allowed_hosts=None if "*" in hosts else hosts,
                       model_info=info, model_root=str(args.model),
                       adapters={n: str(a.root) for n, a in adapters.items()},
                       speculative_tokens=args.speculative_tokens)
    app = create_app(engine, tok, cfg)
    # before the engine's thread starts stepping: where the adapters' updates run (the native step's table)
    native = bool(adapters) and runner is not None and runner.adapters_run_natively()
    how = ("their updates run inside the native step" if native
           else "their requests' steps run PyTorch's kernels, not the native ones")
    engine.start()
    packed = getattr(runner, "packed_bytes", 0)
    if packed:
        print(f"mixlab serve: the bf16 weights also kept in the native kernels' panels (+{format_bytes(packed)} of "
              "memory; --pack-weights no saves it, for slower steps)", file=sys.stderr)
    if args.batch_invariant:
        print("mixlab serve: batch-invariant steps: each request's tokens and logprobs are those of its run alone, "
              "whatever else runs (steps ~10% slower)", file=sys.stderr)
    cache = expert_cache(model)
    if cache is not None:
        print(f"mixlab serve: experts offloaded: {cache.num_slots} of {cache.num_layers * cache.num_experts} fit in "
              f"{format_bytes(cache.num_slots * cache.expert_bytes)} ({cache.fmt.kind}, {cache.policy}, prefetch "
              f"{'on' if cache.prefetch_enabled else 'off'}); /metrics: mixlab_expert_cache_*", file=sys.stderr)
    if adapters:
        print(f"mixlab serve: LoRA adapters {', '.join(adapters)} (the API's model names): {how}", file=sys.stderr)
    if runner is not None:
        print(cache_line(runner.total_bytes, runner.n_slots, context, model.config.max_seq_len, args.max_batch),
              file=sys.stderr)
    where = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address in a URL is bracketed

    def listening(port: int) -> None:  # once bound: --port 0 says the port the system chose
        weights = dtype if quant == "none" else f"{dtype}, {quant} matrices"
        print(f"mixlab serve: {name} ({weights}, from {args.model}) on http://{where}:{port} (chat page at /, API "
              "under /v1)", file=sys.stderr, flush=True)

    try:
        run_server(app, host=args.host, port=args.port, drain_timeout=args.drain_timeout, log_level=args.log_level,
                   on_start=listening)
    finally:
        engine.shutdown(timeout=10)
    print_stats(args, model)
    print("mixlab serve: stopped", file=sys.stderr)
    return 0


def _check_engine_flags(args: argparse.Namespace) -> None:
    """Engine flags that cannot work beside another flag: a usage error naming both before the load (the
    engine told them after it, in the API's words, or ignored --pack-weights yes, silently); what only the
    loaded model tells (a GGUF's int4 matrices, a CPU without AVX512-BF16) the engine refuses once built."""
    if args.lora_modules and args.max_memory is not None:
        raise UsageError("--lora-modules does not combine with --max-memory: an adapter's steps need the experts "
                         "resident; serve the adapters without offloading")
    if args.lora_modules and args.batch_invariant:
        raise UsageError("--lora-modules does not combine with --batch-invariant: its invariant kernels take no "
                         "adapter's updates; serve the adapters without it, or merge one into the weights (--adapter)")
    if args.batch_invariant:  # the native kernels' invariant arithmetic runs bf16 or float32 weights, resident
        if args.pack_weights == "yes":
            raise UsageError("--pack-weights yes has no use with --batch-invariant (its steps never read the panels)")
        other = (quant_flag(args) if args.quant != "none" else "--dtype float16" if args.dtype == "float16"
                 else "--max-memory (offloaded experts: no whole-model step)" if args.max_memory is not None else None)
        if other is not None:
            floats = " (--quant none loads the file's floats)" if getattr(args, "quant_auto", None) else ""
            raise UsageError(f"--batch-invariant does not combine with {other}: its steps run the native kernels' "
                             f"invariant arithmetic over resident bf16 or float32 weights only{floats}")
    if args.pack_weights != "yes":
        return
    other = (f"{quant_flag(args)} (its matrices {args.quant})" if args.quant != "none"
             else f"--dtype {args.dtype} (its weights {args.dtype})" if args.dtype in ("float32", "float16")
             else "--max-memory (offloaded experts: no native decoder)" if args.max_memory is not None else None)
    if other is not None:
        raise UsageError(f"--pack-weights yes keeps bf16 weights a second time in the native kernels' panels, which "
                         f"{other} leaves none of: pass --pack-weights auto or no")


def _read_lora_modules(items: list[tuple[str, str]], model_name: str) -> dict[str, Adapter]:
    """--lora-modules' adapters, each folder read and checked (`read_adapter`) before the model loads; a
    name given twice, or the served model's own, is a usage error naming the item (exit 2), a missing or bad
    folder the item's CheckpointError (exit 1, as `--adapter DIR`'s)."""
    from mixlab.checkpoint.adapter import read_adapter

    out: dict[str, Adapter] = {}
    for name, path in items:
        if name == model_name:
            raise UsageError(f"--lora-modules {name}={path}: {name!r} is the served model's name (--served-model-name "
                             "or the model folder's name); give the adapter another")
        if name in out:
            raise UsageError(f"--lora-modules {name}={path}: the name {name!r} is given twice")
        try:
            out[name] = read_adapter(path)
        except CheckpointError as e:  # a missing or bad folder: exit 1, as --adapter's (a usage error: 2)
            raise CheckpointError(f"--lora-modules {name}={path}: {e}") from None
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a chat page that shows the experts")
    p.add_argument("--model", type=model_path, required=True,
                   help="checkpoint folder (or a file mixlab loads), or a run folder (its hf/ export)")
    p.add_argument("--tokenizer", type=user_path, default=None,
                   help="mixtral (Mixtral's v1, from mistral-common), bytes, a tokenizer.model / "
                        "tokenizer.json or a folder holding one (default: the model's, else mixtral)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default 8000; 0: a free port, named in the startup line)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize and /tokenizer_info "
                        "(default: $MIXLAB_API_KEY, which other users cannot read in the process list as they can "
                        "the command line)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: folder name)")
    p.add_argument("--allowed-origins", nargs="*", default=[], metavar="ORIGIN",
                   help="enable CORS for these origins (default: CORS off)")
    p.add_argument("--allowed-hosts", nargs="*", default=None, metavar="NAME",
                   help="host names the server answers to besides IP addresses and localhost, '*' for any (default "
                        "on a loopback --host: none, against DNS rebinding; on another: any)")
    add_runtime_args(p)
    p.add_argument("--lora-modules", nargs="+", type=lora_module, default=None, metavar="NAME=DIR",
                   help="PEFT LoRA adapters served beside the model, vLLM's syntax (NAME=DIR or JSON {\"name\": ..., "
                        "\"path\": ...}): a request whose model is NAME runs under that adapter, kept apart from the "
                        "weights (--adapter merges one into them); on CPU its updates run inside the native step")
    e = p.add_argument_group("engine budgets and limits")
    e.add_argument("--max-batch", type=positive, default=16, help="sequences decoded together (default 16)")
    e.add_argument("--cache-bytes", type=_bytes, default=None, help="KV cache budget, e.g. 2GB (default: engine's)")
    e.add_argument("--max-model-len", type=positive, default=None,
                   help="tokens per request, prompt and reply (default: the model's context, halved until "
                        "--max-batch sequences fit in the KV cache budget; with it set, fewer may run at once)")
    e.add_argument("--max-queue", type=positive, default=256, help="waiting requests before 429 (default 256)")
    e.add_argument("--token-budget", type=positive, default=512, help="tokens per engine step (default 512)")
    e.add_argument("--prefill-chunk", type=positive, default=None,
                   help="the longest piece of one prompt per step: smaller keeps the other streams' inter-token "
                        "time lower while a long prompt prefills, larger brings that prompt's first token sooner "
                        "when others are decoding (default: the engine's, 128)")
    e.add_argument("--pack-weights", default="auto", choices=["auto", "yes", "no"],
                   help="keep bf16 weights a second time in the native kernels' panels: faster engine steps, "
                        "twice the weights' memory (auto: with --max-batch over 1, when that fits in half the memory "
                        "available)")
    e.add_argument("--batch-invariant", action="store_true",
                   help="every step through kernels whose arithmetic for a request does not depend on the others: "
                        "its tokens and logprobs are bit for bit those of its run alone, in bf16 too (CPU native "
                        "kernels, bf16 or float32 weights; slower steps)")
    e.add_argument("--speculative-tokens", type=sampling("speculative_tokens", int), default=0, metavar="K",
                   help="greedy requests: draft up to K tokens a step by prompt lookup and verify them in one pass "
                        "(the same outputs, in fewer steps where they repeat the prompt; 0 = off, the default; "
                        "sampled requests decode a token a step)")
    e.add_argument("--max-tokens-limit", type=positive, default=None,
                   help="largest max_tokens a request may ask (default: the context length)")
    e.add_argument("--max-body-bytes", type=_bytes, default=4 << 20, help="request body limit (default 4MiB)")
    e.add_argument("--max-connections", type=positive, default=512,
                   help="open connections at most (idle keep-alive ones too); a request on one more gets 503 and "
                        "its connection is closed (default 512: above --max-queue + --max-batch, below the usual "
                        "1024 open files)")
    e.add_argument("--read-timeout", type=float, default=60.0,
                   help="seconds a request's headers, then its body, may take to arrive, and a response may wait for "
                        "a client that reads none of it (slow clients; default 60)")
    e.add_argument("--responses-store", type=int, default=1000, metavar="N",
                   help="finished /v1/responses responses kept in memory (with their conversations, 256 MiB at most) "
                        "for previous_response_id and GET / DELETE /v1/responses/{id}; the least recently used go "
                        "first (default 1000; 0: none, the Responses API stateless)")
    e.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests may take to finish; then, or at a second signal, "
                        "those left are ended, each answered with an error (default 30)")
    e.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level, on stderr (default info: a line per request too)")
    p.set_defaults(func=serve)
