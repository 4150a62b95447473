"""`mixlab generate` (complete a prompt) and `mixlab chat` (interactive, multi-turn): stream text
from a checkpoint. Thin: parsing and printing here, everything else in mixlab.generate/tokenizer."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mixlab.cli import (
    adapter_path,
    add_quiet_arg,
    device_choice,
    dtype_choice,
    model_path,
    positive,
    sampling,
    user_path,
)
from mixlab.config import ModelConfig, suffix_of, usable_threads
from mixlab.engine import Engine
from mixlab.engine.runner import bytes_per_token
from mixlab.errors import UsageError
from mixlab.generate import generate_stream
from mixlab.tokenizer import TextError, Tokenizer, check_text, load_tokenizer, model_tokenizer

_HELP = "commands: /reset clears the conversation, /exit (or Ctrl-D) quits; Ctrl-C stops a reply"


def _load(args: argparse.Namespace) -> tuple[Any, Tokenizer]:
    import torch

    from mixlab.checkpoint import load_model
    from mixlab.model.inference import prepare_for_inference

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and getattr(args, "ep", None) is None:  # N copies of one process's work, each printing
        if hasattr(args, "ep"):
            raise UsageError(f"torchrun started {world} processes, but mixlab {args.command} without --ep runs in "
                             f"one: pass --ep {world} to split the experts over them")
        raise UsageError(f"torchrun started {world} processes, but mixlab {args.command} runs in one (it takes no "
                         "--ep): run it without torchrun")

    resolve_quant(args)
    if args.threads is not None:
        torch.set_num_threads(usable_threads(args.threads))
    dtype = args.dtype
    if dtype == "auto":  # bf16 where the CPU computes it natively (AVX-512-bf16 / AMX), else as stored
        bf16_ok = str(args.device) != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        dtype = "bfloat16" if bf16_ok else None
    offload = _offload_args(args)
    # (a Namespace made in Python may lack these, as --ep)
    acts, adapter = getattr(args, "int4_activations", None), getattr(args, "adapter", None)
    # what a Q4_0 GGUF's int4 matrices refuse, known from its header: it was told once the file had loaded
    held = (acts is not None or args.quant == "int8" or adapter is not None) and _holds_int4(args.model)
    if args.quant == "int8" and held:
        raise UsageError(f"--quant int8 applies to float weights; {args.model} holds Q4_0 (int4) matrices: pass "
                         "--quant int4 (its float matrices made int4 too) or none")
    if adapter is not None and held:
        raise UsageError(f"--adapter merges into float weights; {args.model} holds Q4_0 (int4) matrices: load a float "
                         "checkpoint (or an f32 / f16 / bf16 GGUF file) with --adapter, and --quant int4 quantises "
                         "the merged weights")
    if acts is not None and args.quant != "int4" and not held:
        gguf = f" ({args.model} holds no Q4_0 matrices)" if suffix_of(args.model) == ".gguf" else ""
        raise UsageError(f"--int4-activations {args.int4_activations} applies to int4 weights{gguf}: pass --quant "
                         "int4 too (or a GGUF Q4_0 model)")
    acts8 = getattr(args, "int8_activations", None)
    if acts8 is not None and args.quant != "int8":  # it would do nothing
        raise UsageError(f"--int8-activations {acts8} applies to int8 weights: pass --quant int8 too")
    if offload and acts8 == "int8":
        raise UsageError("--int8-activations int8 does not combine with --max-memory: offloaded experts run "
                         "per-layer kernels that multiply exact float32 activations (as --int8-activations float32)")
    if offload and acts == "int8":  # a resident model's native decoding mode
        raise UsageError("--int4-activations int8 does not combine with --max-memory: offloaded experts run "
                         "per-layer kernels that multiply exact float32 activations (as --int4-activations float32)")
    if offload and adapter is not None:  # load_model's refusal, told with the flags before the tokenizer loads
        raise UsageError("--adapter does not combine with --max-memory: offloaded experts stay on disk, where no "
                         "adapter is merged into them; save the merged model first (mixlab.save_model("
                         "mixlab.load_model(MODEL, adapter=ADAPTER), OUT)) and offload that")
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None  # a wrong --tokenizer: told before a long load
    layout, device = None, args.device
    if getattr(args, "ep", None) is not None:  # experts split over the processes (torchrun); PyTorch's kernels
        from mixlab.parallel.mesh import init

        if offload:
            raise UsageError("--max-memory (expert offloading) does not combine with --ep")
        layout = init(ep=args.ep, device=args.device)
        device = layout.device  # this process's GPU (its LOCAL_RANK's): "cuda" before init is every process's GPU 0
    # Under --ep the model is built split, each process reading its experts only (a folder's or a GGUF
    # file's, Q4_0 matrices kept int4 as one process keeps them, an --adapter merged into them).
    quant = None if args.quant == "none" else args.quant
    if getattr(args, "quant_auto", None):  # told once the flags have passed their checks
        from mixlab.cli import note

        note(args.command, f"{Path(args.model).name} holds {args.quant_auto} matrices: loading them as {quant} "
                           f"(--quant auto; --quant none loads floats)")
    if layout is None and not offload and str(args.device) == "cpu":
        check_memory(args.model, dtype, None if adapter is not None else quant)
    # where --quant is applied below, each matrix is quantised as it is read (peak: the quantised model plus
    # one weight's floats, not every float); an --adapter is merged into the floats first, then quantised
    at_load = quant is not None and adapter is None and (layout is not None or str(args.device) == "cpu")
    if layout is not None and layout.ep > 1:
        from mixlab.parallel.expert import load_expert_parallel

        model = load_expert_parallel(args.model, layout, dtype=dtype, device=device, adapter=adapter,
                                     quant=quant if at_load else None)
    else:
        with _told_as_flag("max_memory", "--max-memory"):
            model = load_model(args.model, dtype=dtype, device=device, adapter=adapter, **offload,
                               quant=quant if at_load else None)
    if layout is not None:  # --ep: each process quantises its own experts; PyTorch's kernels, no native decoder
        if quant is not None:  # (it would bypass the MoE layers' all-to-all)
            model = prepare_for_inference(model, quant=quant, int4_activations=acts, int8_activations=acts8,
                                          decoder=False)
        elif acts is not None:  # a Q4_0 GGUF file's int4 matrices, kept as read
            model.int4_activations = acts
        # PyTorch's int4 products round activations as the native steps do (the model's int4_activations,
        # "int8" by default: `ops.quant.rounds_activations`): the tokens of one process's run in either mode
    elif str(args.device) == "cpu":  # pre-packed (or int8) weights for fast CPU decoding
        with _told_as_flag("max_memory", "--max-memory"):  # the expert cache's budget, checked in its format
            model = prepare_for_inference(model, quant=quant, int4_activations=acts, int8_activations=acts8)
    if tok is None:
        tok = model_tokenizer(args.model)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer {tok.path} has {tok.vocab_size} tokens but the model's vocabulary has "
                         f"{model.config.vocab_size}; pass the matching --tokenizer")
    structured = getattr(args, "structured", None)
    if structured is not None:  # built over this vocabulary: an output none of its tokens begins is the flag's error
        try:
            structured.prepare(tok)
        except ValueError as e:
            raise _structured_error(args.structured_flag, structured.kind, e) from None
    return model, tok


def resolve_quant(args: argparse.Namespace) -> None:
    """--quant auto (the default) as what it stands for, in `args.quant`: none, except for a quantised
    GGUF file on the CPU, which runs in the format nearest its own (`gguf_read.file_quant`: int4 for
    Q4_0 / Q4_K_M files, int8 for Q5_K_M / Q6_K / Q8_0 ones); `args.quant_auto` names the file's type
    where auto chose a format. Idempotent."""
    if getattr(args, "quant", None) != "auto":
        return
    args.quant, args.quant_auto = "none", None
    path = Path(args.model)
    if str(args.device) != "cpu" or suffix_of(path) != ".gguf" or not path.is_file():
        return
    from mixlab.checkpoint.gguf_read import file_quant, read_header

    quant, ftype = file_quant(read_header(path))
    if quant is not None:
        args.quant, args.quant_auto = quant, ftype


def quant_flag(args: argparse.Namespace) -> str:
    """The flag that set the weights' format, as a message names it: `--quant int4`, or where --quant
    auto chose it, `--quant auto (int4 for X.gguf's Q4_K matrices)`."""
    if getattr(args, "quant_auto", None):
        return f"--quant auto ({args.quant} for {Path(args.model).name}'s {args.quant_auto} matrices)"
    return f"--quant {args.quant}"


def _checked_config(path: str | Path) -> ModelConfig | None:
    """The config of the model at `path`, its weights' names and shapes checked against it from the
    headers alone, as the load checks them first (a config.json claiming a million layers is that
    error, not a size); None when `_config` cannot read it (the load then says why)."""
    from mixlab.cli.model import _config

    try:
        name, cfg = _config(str(path))
    except Exception:  # noqa: BLE001 - what the path is, the load itself says
        return None
    from mixlab.train.checkpoints import is_training

    if suffix_of(name) == ".gguf" and Path(name).is_file():
        from mixlab.checkpoint.gguf_read import _plan, read_header

        _plan(read_header(name), cfg)
    elif Path(name).is_dir() and not is_training(Path(path)):
        from mixlab.checkpoint import plan

        plan(Path(name), cfg)
    return cfg


def check_memory(path: str | Path, dtype: str | None, quant: str | None, *, flags: bool = True) -> None:
    """Refuse, before reading a byte of weights, a model whose weights alone cannot fit in the memory
    available (RAM and free swap): the load would end in the kernel's out-of-memory kill, minutes in
    (`model.memory.shortfall`; `load_model` makes the same check, in the API's words). The one line says
    the formats that would fit, and expert offloading (`flags` False: a command without --quant and
    --max-memory, whose line says only the sizes)."""
    from mixlab.config import format_bytes
    from mixlab.model.memory import available_memory, shortfall

    cfg = _checked_config(path) if available_memory() else None
    if cfg is None:
        return
    kept = False
    if suffix_of(path) == ".gguf" and Path(path).is_file():  # its header read once for both facts
        from mixlab.checkpoint.gguf_read import default_dtype, int4_weights, read_header
        from mixlab.dtypes import dtype_name

        h = read_header(path)
        kept = bool(int4_weights(h))  # Q4_0 matrices copied as stored
        dtype = dtype or dtype_name(default_dtype(h))  # as the load gives it: a quantised file's float32
    short = shortfall(cfg, dtype, quant, kept=kept, alternatives=flags)
    if short is None:
        return
    fits = [f"--quant {q} (~{format_bytes(n)})" for q, n in short.formats.items()]
    if short.cache:
        fits.append(f"--max-memory {short.cache} (the experts stay on disk, read on demand into a cache of that "
                    "many bytes)")
    if not fits:
        fits.append("a machine with more memory")
    raise UsageError(f"{path}: its weights need at least {format_bytes(short.need)} as {quant or dtype or 'stored'}, "
                     f"but {format_bytes(short.ram)} of memory is available and {format_bytes(short.swap)} of swap: "
                     f"{'pass ' if fits[0].startswith('--') else 'it needs '}{' or '.join(fits)}")


def _holds_int4(path: Path) -> bool:
    """Whether the model at `path` loads with int4 weights: a GGUF file's Q4_0 matrices, from its header
    (its tensors unread; --int4-activations on an f32 / q8_0 one was told after the load, in the API's
    words); a folder holds none."""
    if suffix_of(path) != ".gguf" or Path(path).is_dir():
        return False
    from mixlab.checkpoint.gguf_read import int4_weights, read_header

    return bool(int4_weights(read_header(path)))


@contextmanager
def _told_as_flag(param: str, flag: str) -> Iterator[None]:
    """A library error inside that names `param` (load_model's max_memory) is told with the CLI's `flag`."""
    try:
        yield
    except ValueError as e:
        if param not in str(e):
            raise
        raise UsageError(str(e).replace(param, flag)) from None


def _offload_args(args: argparse.Namespace) -> dict[str, Any]:
    """load_model's expert-offloading arguments from --max-memory / --offload-policy / --no-prefetch."""
    from mixlab.config import parse_bytes

    if getattr(args, "max_memory", None) is None:
        if getattr(args, "offload_policy", None) is not None or getattr(args, "no_prefetch", False):
            raise UsageError("--offload-policy and --no-prefetch are for offloaded experts: pass --max-memory too")
        return {}
    try:
        max_memory = parse_bytes(args.max_memory, what="--max-memory")
    except ValueError as e:
        raise UsageError(str(e)) from None
    return dict(max_memory=max_memory, policy=args.offload_policy, prefetch=not args.no_prefetch)


def print_stats(args: argparse.Namespace, model: Any) -> None:
    """With --stats, the expert cache's hit rate, bytes read and waiting time (stderr)."""
    from mixlab.model.formats import expert_cache

    if not getattr(args, "stats", False):
        return
    cache = expert_cache(model)
    if cache is None:
        print("stats: the experts are resident (no --max-memory): nothing to report", file=sys.stderr)
        return
    print(f"{cache.stats.summary()}; {cache.num_slots} of {cache.num_layers * cache.num_experts} experts fit "
          f"({cache.fmt.kind}, {cache.expert_bytes} bytes each)", file=sys.stderr)


def add_offload_args(p: argparse.ArgumentParser) -> None:
    """--max-memory, --offload-policy, --no-prefetch, --stats (generate, chat, serve, eval)."""
    g = p.add_argument_group("expert offloading")
    g.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="keep the experts on disk and cache at most SIZE bytes of them in memory "
                        "(e.g. 4GB, 512MiB); attention, norms and embeddings stay resident")
    g.add_argument("--offload-policy", choices=["lru", "lfu"], default=None,
                   help="expert cache eviction (default lru)")
    g.add_argument("--no-prefetch", action="store_true",
                   help="do not guess and read the next layer's experts in the background")
    g.add_argument("--stats", action="store_true", help="report the expert cache's hit rate, bytes read, time waited")


def _sampling(args: argparse.Namespace, tok: Tokenizer) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, seed=args.seed,
                stop=args.stop or None, tokenizer=tok, structured=args.structured,
                speculative_tokens=args.speculative_tokens)


def _structured(args: argparse.Namespace) -> None:
    """--json / --json-schema FILE / --regex R / --grammar-file FILE as `args.structured` (checked before
    the model loads): a bad file, schema, regex or grammar is one line naming the flag (exit 2; a missing
    file or llguidance: 1)."""
    from mixlab.engine import Structured

    args.structured = None
    flags = (("json_object", "--json", args.json or None), ("json_schema", "--json-schema", args.json_schema),
             ("regex", "--regex", args.regex), ("grammar", "--grammar-file", args.grammar_file))
    asked = [(kind, flag, v) for kind, flag, v in flags if v is not None]  # argparse lets one through
    if not asked:
        return
    kind, flag, given = asked[0]
    value: Any = None if kind == "json_object" else given
    shown = f"{flag} {given}" if kind in ("json_schema", "grammar") else flag
    if kind in ("json_schema", "grammar"):
        try:
            text = Path(given).read_text(encoding="utf-8")
            value = json.loads(text) if kind == "json_schema" else text
        except OSError as e:  # missing, a folder, unreadable: the run failed (exit 1), the flag named
            raise ValueError(f"{shown}: {e.strerror or e}") from None
        except ValueError as e:  # not UTF-8, not JSON
            what = "a JSON" if kind == "json_schema" else "a UTF-8 text"
            raise UsageError(f"{shown}: not {what} file ({e})") from None
    try:
        args.structured, args.structured_flag = Structured(kind, value), shown
    except ImportError as e:
        raise ValueError(f"{flag}: {e}") from None
    except ValueError as e:
        raise _structured_error(shown, kind, e) from None


def _structured_error(shown: str, kind: str, e: ValueError) -> UsageError:
    """The flag's value is wrong: a usage error (exit 2) naming it, in llguidance's words."""
    return UsageError(f"{shown}: {str(e).removeprefix(f'invalid structured {kind}: ')}")


MAX_NEW_TOKENS = 256  # --max-new-tokens' default where the model's context leaves room for it


def _max_new(args: argparse.Namespace, context: int, prompt: int | None = None) -> tuple[int, str]:
    """--max-new-tokens, or its default: 256, fewer in a shorter context (`mixlab demo`'s model has 256
    positions): what a prompt of `prompt` tokens leaves of it (generate), else half of it (chat, whose
    messages take the rest; generate --truncate of a prompt that fills it). And the flag as an error
    tells it: a default is said to be one (it read as a value the user had passed)."""
    if args.max_new_tokens is not None:
        return int(args.max_new_tokens), f"--max-new-tokens {args.max_new_tokens}"
    room = context - prompt if prompt is not None and prompt < context else context // 2
    n = max(1, min(MAX_NEW_TOKENS, room))
    return n, f"--max-new-tokens {n} (its default here)"


def _speed(n: int, seconds: float) -> str:
    return f"{n} tokens in {seconds:.2f} s ({n / seconds if seconds > 0 else float('inf'):.1f} tokens/s)"


def generate(args: argparse.Namespace) -> int:
    from_stdin = args.prompt == "-"
    # The prompt from stdin (a file, a pipe): one final newline dropped, as llama.cpp's -f. Under
    # torchrun the processes share one stdin: the first reads it and sends it to the others (below).
    if from_stdin and not (args.ep is not None and int(os.environ.get("RANK", "0") or 0) > 0):
        _keep_bad_bytes()
        text = sys.stdin.read()
        args.prompt = text[:-1] if text.endswith("\n") else text
    check_text(args.prompt, "--prompt - (stdin)" if from_stdin else "--prompt")  # before the model loads
    _structured(args)
    if args.ep is not None:  # every process decodes the same tokens; the first one prints them
        import torch.distributed as dist

        from mixlab.parallel.expert import rank0_token
        from mixlab.parallel.mesh import check_ep, check_same, shutdown

        check_ep(args.ep)  # before reading the checkpoint
        out, err = sys.stdout, sys.stderr
        try:
            model, tok = _load(args)
            if from_stdin:
                box = [args.prompt]
                dist.broadcast_object_list(box, src=0)
                args.prompt = box[0]
            # Processes that would stop after different numbers of steps (another --max-new-tokens,
            # --stop, --seed, model) would leave the others in an all-to-all. Paths may differ per node.
            check_same({"--" + k.replace("_", "-"): v for k, v in vars(args).items()
                        if k not in ("func", "model", "tokenizer", "threads")} | {"the model config": model.config})
            if dist.get_rank() != 0:
                sys.stdout = sys.stderr = io.StringIO()
            return _generate(args, model, tok, sync_token=rank0_token(model.tok_embeddings.weight.device))
        finally:
            sys.stdout, sys.stderr = out, err
            shutdown()
    model, tok = _load(args)
    return _generate(args, model, tok)


def _generate(args: argparse.Namespace, model: Any, tok: Tokenizer,
              sync_token: Callable[[int], int] | None = None) -> int:
    ids = tok.encode(args.prompt)
    context = model.config.max_seq_len
    new, told = _max_new(args, context, len(ids))
    args.max_new_tokens = new
    if new >= context:  # generate_stream's checks, told with the flags
        raise UsageError(f"{told} leaves no room for a prompt in the model's context of {context} "
                         "tokens")
    if len(ids) + new > context and not args.truncate:
        raise UsageError(f"the prompt has {len(ids)} tokens; with {told} that needs {len(ids) + new} "
                         f"positions but the model's context is {context} (--truncate keeps its last "
                         f"{context - new} tokens)")
    engine = None
    if sync_token is not None:  # --ep: generate_stream's own engine (one prompt), every token rank 0's
        longest = max(min(len(ids) + args.max_new_tokens, model.config.max_seq_len), 2)
        engine = Engine(model, tok, max_batch=1, token_budget=512, prefill_chunk=512, max_seq_len=longest,
                        cache_bytes=longest * bytes_per_token(model), prefix_cache=False, sync_token=sync_token)
    start = time.perf_counter()
    steps = generate_stream(model, [ids], truncate=args.truncate, engine=engine, **_sampling(args, tok))
    first = None
    n = 0
    try:
        for step in steps:
            first = first or time.perf_counter()
            # the engine's text: it ends before a --stop string (with no token: what a refused token left held)
            sys.stdout.write(step.text[0] if step.text else "")
            sys.stdout.flush()
            if step.tokens[0] is None:
                break
            n += 1
    except BaseException:  # Ctrl-C, a failed step: the text so far ends its line, before main's word on stderr
        if n:
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    sys.stdout.write("\n")
    end = time.perf_counter()
    first = first or end  # no step: a constraint that could not take the first token
    # The first new token costs a prefill; the rest are decode steps. --truncate kept the prompt's
    # last `room` tokens (generate_stream's rule): those are what the prefill ran.
    room = model.config.max_seq_len - args.max_new_tokens
    kept = f" (the last of {len(ids)}: --truncate)" if len(ids) > room else ""
    if not args.quiet:
        print(f"prompt: {_speed(min(len(ids), room), first - start)}{kept}; "
              f"decode: {_speed(max(n - 1, 0), end - first)}", file=sys.stderr)
    print_stats(args, model)
    return 0


def chat(args: argparse.Namespace) -> int:
    check_text(args.system or "", "--system")  # before the model loads (it was 'message 0's content', after)
    _structured(args)
    model, tok = _load(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[dict[str, str]] = []
    # One engine for the whole conversation: each turn prefills only what follows the prefix its
    # cache slot holds from the earlier turns (prefix reuse). Its context: the model's, or as much as
    # the engine's default cache budget holds.
    engine = Engine(model, tok, max_batch=1)
    context = engine.runner.max_len
    args.max_new_tokens, told = _max_new(args, context)
    room = context - args.max_new_tokens
    if room < 1:  # else every message would be refused
        raise UsageError(f"{told} leaves no room for a message in the context of {context} tokens")
    if system and (n := len(tok.encode_chat([*system, {"role": "user", "content": ""}]))) > room:
        raise UsageError(f"--system takes {n} tokens (in the chat template); with {told} only {room} fit in the "
                         f"context of {context}, so every message would be refused")
    if not args.quiet:
        print(f"mixlab chat: {_HELP}", file=sys.stderr)
    replies = 0
    _keep_bad_bytes()  # a bad byte reaches encode (one clear error), not input()
    # With piped input (a batch of messages) stdout holds only the replies, one per line.
    prompt = "> " if sys.stdin.isatty() else ""
    while True:
        try:
            line = input(prompt).strip()
        except EOFError:
            if prompt:
                print()
            print_stats(args, model)
            return 0
        except KeyboardInterrupt:  # at the prompt, Ctrl-C clears the line (as in a shell)
            print()
            continue
        if not line:
            continue
        if line in ("/exit", "/quit"):
            print_stats(args, model)
            return 0
        if line == "/reset":
            messages.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line!r}; {_HELP}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        try:  # forget the oldest exchanges to fit the context
            ids, forgotten = tok.encode_chat_within(system + messages, room)
        except TextError as e:  # reject this turn, keep the conversation
            messages.pop()
            print(f"error: {e}; the conversation is kept, type the message again", file=sys.stderr)
            continue
        del messages[:forgotten]
        if len(ids) > room:
            print(f"error: the message needs {len(ids)} tokens; with {told} only {room} fit in the context of "
                  f"{context}", file=sys.stderr)
            messages.pop()
            continue
        n, shown = 0, list[str]()
        start = time.perf_counter()
        try:
            # reply i samples with --seed + i: the same conversation again, but not the same draws every turn
            seed = None if args.seed is None else args.seed + replies
            replies += 1
            # the reply decoded alone (its first word without the leading space), --stop matched on that text
            for step in generate_stream(model, [ids], engine=engine, decode_alone=True,
                                        **{**_sampling(args, tok), "seed": seed}):
                # the engine's text: nothing from a --stop string on (with no token: what a refused token left held)
                delta = step.text[0] if step.text else ""
                shown.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
                if step.tokens[0] is None:
                    break
                n += step.tokens[0] not in model.config.eos_ids
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        if not args.quiet:
            print(f"({_speed(n, time.perf_counter() - start)})", file=sys.stderr)
        text = "".join(shown)
        if text:
            messages.append({"role": "assistant", "content": text})
        else:
            messages.pop()  # nothing to answer with: forget the question rather than send it twice


def _keep_bad_bytes() -> None:
    """Bytes of stdin that are not text in the locale's encoding read as surrogate escapes, for
    `check_text` to name: under a strict error handler (en_US.UTF-8's) reading them raised
    UnicodeDecodeError, which named neither the flag nor stdin."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def _stop(text: str) -> str:
    """argparse type of --stop: \\n, \\t, \\r and \\\\ read as the characters they name, as llama.cpp reads
    its reverse prompts (common/arg.cpp, `--escape` on by default): a shell passes `--stop '\\n'` as a
    backslash and an n, which matched only that text, not a new line; not empty (it would stop at once),
    and text a reply can hold."""
    text = re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)
    if not text:
        raise argparse.ArgumentTypeError("expected a non-empty string")
    try:
        check_text(text, f"stop string {text!r}")
    except TextError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=model_path, required=True,
                   help="checkpoint folder (transformers or Mistral format), a .gguf file, or a training or "
                        "fine-tuning run folder (its hf/ export)")
    p.add_argument("--tokenizer", type=user_path, default=None,
                   help="mixtral (Mixtral's v1, from mistral-common), bytes, a tokenizer.model / tokenizer.json or "
                        "a folder holding one (default: the model's, else mixtral)")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=positive, default=None,
                   help=f"(default {MAX_NEW_TOKENS}, fewer where the model's context is shorter: what the prompt "
                        "leaves of it (generate), half of it (chat))")
    g.add_argument("--temperature", type=sampling("temperature", float),
                   help="0 (below 1e-5) = greedy (default: 0 for generate, 0.7 for chat)")
    g.add_argument("--top-k", type=sampling("top_k", int), default=0, help="0 or -1 = off")
    g.add_argument("--top-p", type=sampling("top_p", float), default=1.0,
                   help="1 = off (default: 1 for generate, 0.95 for chat)")
    g.add_argument("--min-p", type=sampling("min_p", float), default=0.0, help="0 = off")
    g.add_argument("--repetition-penalty", type=sampling("repetition_penalty", float), default=1.0, help="1 = off")
    g.add_argument("--presence-penalty", type=sampling("presence_penalty", float), default=0.0,
                   help="OpenAI's: minus this from the logit of every token already generated (0 = off)")
    g.add_argument("--frequency-penalty", type=sampling("frequency_penalty", float), default=0.0,
                   help="OpenAI's: minus this times how often a token was generated (0 = off)")
    g.add_argument("--seed", type=sampling("seed", int), default=None, help="same seed, same sampled text")
    g.add_argument("--stop", type=_stop, action="append", default=[],
                   help="stop string (repeatable): the text ends before it; \\n, \\t, \\r, \\\\ as escapes")
    g.add_argument("--speculative-tokens", type=sampling("speculative_tokens", int), default=0, metavar="K",
                   help="greedy decoding: draft up to K tokens a step by prompt lookup and verify them in one pass "
                        "(the same output, in fewer steps where it repeats the prompt; 0 = off, the default; "
                        "sampling ignores it)")
    s = p.add_argument_group("structured output (one of them; the output ends once complete; needs llguidance: "
                             "pip install 'mixlab[serve]')").add_mutually_exclusive_group()
    s.add_argument("--json", action="store_true", help="a JSON object")
    s.add_argument("--json-schema", type=user_path, default=None, metavar="FILE",
                   help="JSON that FILE's schema accepts")
    s.add_argument("--regex", default=None, metavar="R", help="text that R matches as a whole (Rust's regex syntax)")
    s.add_argument("--grammar-file", type=user_path, default=None, metavar="FILE",
                   help="text that FILE's grammar (Lark, or llama.cpp's GBNF) accepts")
    add_runtime_args(p)
    add_quiet_arg(p)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """How `_load` loads the model: --adapter, --dtype, --quant, --device, --threads and expert offloading
    (generate, chat, serve, eval)."""
    r = p.add_argument_group("runtime")
    r.add_argument("--adapter", type=adapter_path, default=None, metavar="DIR",
                   help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors, as PEFT, TRL "
                        "and mixlab sft / dpo write it; a LoRA run folder: its adapter/) merged into the weights "
                        "(before --quant)")
    r.add_argument("--dtype", type=dtype_choice("auto", "float32", "bfloat16", "float16", quant=True), default="auto",
                   help="float32, bfloat16 or float16 (default auto: bfloat16 where the CPU supports it)")
    r.add_argument("--quant", choices=["auto", "none", "int8", "int4"], default="auto",
                   help="weight-only quantisation: int8 (per row) or int4 (groups of 32, Q4_0's arithmetic); auto "
                        "(default): none, except a quantised GGUF file on the CPU: int4 for files of at most 5 bits a "
                        "weight (Q4_0, Q4_K_M, ...), int8 for Q5_K_M, Q6_K and Q8_0 ones")
    r.add_argument("--int4-activations", choices=["int8", "float32"], default=None,
                   help="int4 decoding: activations rounded to int8 per block of 32 as llama.cpp does "
                        "(default, fast) or float32 (exact)")
    r.add_argument("--int8-activations", choices=["int8", "float32"], default=None,
                   help="int8 weights (--quant int8): activations float32 (default, exact) or rounded to int8 per "
                        "block of 32 as llama.cpp's Q8_0 does (faster where int8 is compute-bound)")
    r.add_argument("--device", type=device_choice, default="cpu", help="cpu (default), cuda or cuda:N")
    r.add_argument("--threads", type=positive, default=None, help="CPU threads for torch (default: torch's)")
    add_offload_args(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming the text to stdout")
    p.add_argument("--prompt", required=True, help="the text to continue (BOS added); - reads it from stdin")
    p.add_argument("--truncate", action="store_true", help="drop the oldest prompt tokens if it does not fit")
    p.add_argument("--ep", type=int, default=None, metavar="N",
                   help="expert parallelism: split the experts over N processes (launch with torchrun "
                        "--nproc-per-node N); the tokens equal one process's (one prompt; several through the API: "
                        "docs/scaling.md)")
    _add_common(p)
    p.set_defaults(func=generate, temperature=0.0)
    p = sub.add_parser("chat", help="interactive multi-turn chat with the Mixtral-Instruct template")
    p.add_argument("--system", default=None, help="system prompt")
    _add_common(p)
    p.set_defaults(func=chat, temperature=0.7, top_p=0.95)
    p = sub.add_parser("build-kernels", help="build and check the native CPU kernels ahead of time "
                       "(otherwise built when generate, chat, serve or eval first needs them)")
    p.set_defaults(func=build_kernels)


def build_kernels(args: argparse.Namespace) -> int:
    from mixlab.ops.native.__main__ import check

    try:
        print(check())
    except RuntimeError as e:  # one `mixlab build-kernels: error: ...` line and exit code 1, as every command
        raise ValueError(str(e)) from None
    return 0
