"""`mixlab eval`: perplexity, bits per byte and word perplexity per domain (lm-eval's conventions),
as a table and optionally JSON. Thin: the work is in mixlab.eval."""

from __future__ import annotations

import argparse
import json
import sys
from array import array

from mixlab import atomic
from mixlab.cli import add_quiet_arg, model_path, names, note, user_path
from mixlab.cli.run import _load, add_runtime_args, print_stats
from mixlab.errors import UsageError


def _num(x: float, width: int, places: int) -> str:
    """`x` right-aligned in `width` columns, at least one blank before it: fixed point, or as 5.0403e+16
    where that does not fit (an untrained model's word perplexity), so columns never run together."""
    text = f"{x:.{places}f}"
    return f"{text if len(text) < width else f'{x:.4e}':>{width}}"


def _batch_that_fits(batch_size: int, scored: int, context: int, vocab_size: int) -> int:
    """`--batch-size`, or fewer windows where a batch's float32 logits (and their log-softmax) would
    not fit in the free memory: the windows of one long document are batched together, and
    --batch-size 100000 on a book asked for terabytes. A window has logits for the `scored` tokens it
    predicts (the stride) alone, but a document's first scores all `context` of its tokens. Batching
    groups windows; it changes a score by float32 rounding alone."""
    from mixlab.config import format_bytes
    from mixlab.engine.runner import available_memory

    free, per_window = available_memory(), 2 * 4 * scored * vocab_size
    fit = max((free - 2 * 4 * (context - scored) * vocab_size) // per_window, 1)
    if free and batch_size > fit:
        note("eval", f"--batch-size {batch_size}: a batch's logits take {format_bytes(per_window)} a window "
                     f"scoring {scored} tokens and {format_bytes(free)} of memory is free; scoring at most {fit} "
                     "at a time")
        return fit
    return batch_size


def evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mixlab.corpus import data_split
    from mixlab.eval.data import documents
    from mixlab.eval.perplexity import evaluate_texts
    from mixlab.model.inference import quant_of
    from mixlab.model.native import int4_activations, int8_activations

    asked = 2048 if args.context is None else args.context  # a shorter model takes the default quietly
    if asked < 1:
        raise UsageError(f"--context must be >= 1, got {asked}")
    if args.max_docs is not None and args.max_docs < 1:
        raise UsageError(f"--max-docs must be >= 1, got {args.max_docs}")
    if args.stride is not None and not 1 <= args.stride <= asked:
        raise UsageError(f"--stride must be between 1 and --context ({asked}); got {args.stride}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    split = data_split(args.data, args.split)  # `--split Valid` reads valid.jsonl; a file is read whole
    docs = list(documents(args.data, split=split, max_docs=args.max_docs, domains=args.domains))
    if not docs:
        raise ValueError(f"{args.data}: no documents to evaluate")
    if not any(text for _, text in docs):  # else a table of perplexity 1.000 over 0 tokens
        raise ValueError(f"{args.data}: no text to evaluate (every document is empty)")
    adapter = [args.adapter] if getattr(args, "adapter", None) else []  # --adapter (a Namespace may lack it)
    to_stdout = args.json == "-"  # the JSON is stdout (for jq); the table goes to stderr
    if args.json and not to_stdout:  # a folder, the data or the model (--json DATA.jsonl), refused before the work
        from mixlab.checkpoint import input_files

        atomic.check_json_destination(args.json, sources=[args.data, args.model, *adapter],
                                      inputs=input_files(args.model))  # a split GGUF's other parts too
    model, tok = _load(args)
    context = min(asked, model.config.max_seq_len)
    if args.stride is not None and args.stride > context:  # it failed in rolling_windows, naming no flag
        raise UsageError(f"--stride {args.stride} is past the model's {context} positions, the windows' length: "
                         f"give --stride {context} or less")
    if args.context is not None and args.context > context:
        note("eval", f"--context {args.context} is past the model's {context} positions; scoring windows of {context}")
    batch_size = _batch_that_fits(args.batch_size, args.stride or context, context, model.config.vocab_size)
    # Each text encoded once, before scoring: the bar's total (tokens), so it shows the time left. An
    # array: 4 bytes a token, as the text itself (a list of ints took 9 times that).
    ids = {text: array("I", tok.encode(text, bos=False)) for _, text in docs}
    with tqdm(desc="eval", unit="tok", total=sum(len(ids[text]) for _, text in docs),
              disable=True if args.quiet else None, file=sys.stderr) as bar:
        report = evaluate_texts(model, ids.__getitem__, docs, prefix=tok.bos_id, context=context,
                                stride=args.stride, batch_size=batch_size, progress=bar.update)
    # the dtype that ran: --dtype auto's choice, and bf16 as bfloat16 (the weights may be int8 / int4: --quant)
    dtype = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    # what ran, as for the dtype: a GGUF file's Q4_0 matrices are int4 without --quant (its JSON said "none", as
    # a float file's), and int4 products round activations or not (two runs' numbers differ; their JSON did not)
    quant = quant_of(model, args.quant)
    report.settings.update(model=str(args.model), adapter=str(adapter[0]) if adapter else None,
                           data=str(args.data), split=split, dtype=dtype, quant=quant,
                           int4_activations=int4_activations(model) if quant == "int4" else None,
                           int8_activations=int8_activations(model) if quant == "int8" else None,
                           tokenizer=str(tok.path), domains=args.domains, max_docs=args.max_docs)
    result = report.to_json()
    rows = [(d, s.metrics()) for d, s in report.domains.items()] + [("overall", report.overall().metrics())]
    table = sys.stderr if to_stdout else sys.stdout
    print(f"{'domain':<16}{'docs':>6}{'tokens':>10}{'token ppl':>12}{'bits/byte':>11}{'word ppl':>12}", file=table)
    for d, m in rows:
        print(f"{d:<16}{m['docs']:>6}{m['tokens']:>10}{_num(m['token_perplexity'], 12, 3)}"
              f"{_num(m['bits_per_byte'], 11, 4)}{_num(m['word_perplexity'], 12, 3)}", file=table)
    if to_stdout:
        print(json.dumps(result, indent=2, allow_nan=False))
    elif args.json:
        atomic.write_text(args.json, json.dumps(result, indent=2, allow_nan=False) + "\n")
    print_stats(args, model)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity, bits per byte and word perplexity per domain")
    p.add_argument("--model", type=model_path, required=True,
                   help="checkpoint folder (or a file mixlab loads), or a run folder (its hf/ export)")
    p.add_argument("--data", type=user_path, required=True,
                   help="corpus folder (<domain>/<split>.jsonl, or domain folders of .txt / .jsonl files) or "
                        "one domain's folder (as analyze reads them), a .jsonl or a text file (read whole; its "
                        "domain its stem, its folder's name for a split's file, a row's 'domain' field, as data "
                        "prepare names it)")
    p.add_argument("--domains", type=names, default=None,
                   help="comma-separated domains, as analyze takes them (default: all but chat/)")
    p.add_argument("--split", default=None, help="read each domain's files of this split, as analyze and data "
                   "prepare name them (default: valid: valid, validation, val, dev, test files; train; test; ...; "
                   "'' for all files; a file given as --data is read whole)")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per window (default 2048, or the model's context where shorter)")
    p.add_argument("--stride", type=int, default=None,
                   help="new tokens scored per window (default: = context, disjoint windows as lm-eval)")
    p.add_argument("--batch-size", type=int, default=4, help="windows scored together (default 4)")
    p.add_argument("--max-docs", type=int, default=None, help="at most this many documents per domain")
    p.add_argument("--json", type=user_path, nargs="?", const="-", default=None, metavar="PATH",
                   help="the results as JSON: with no PATH (or -) on stdout, as info and plan print theirs, the "
                        "table then on stderr; else written to the file PATH")
    p.add_argument("--tokenizer", type=user_path, default=None,
                   help="mixtral (Mixtral's v1, from mistral-common), bytes, a tokenizer.model / "
                        "tokenizer.json or a folder holding one (default: the model's, else mixtral)")
    add_quiet_arg(p)
    add_runtime_args(p)
    p.set_defaults(func=evaluate)
