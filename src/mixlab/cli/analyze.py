"""`mixlab analyze`: the routing analysis of the Mixtral paper §5 for any MoE checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from mixlab.cli import add_quiet_arg, device_choice, dtype_choice, model_path, names, note, positive, user_path
from mixlab.errors import UsageError


def analyze(args: argparse.Namespace) -> int:
    from mixlab.analysis import analyze as run
    from mixlab.analysis import parse_layers
    from mixlab.analysis.collect import check_vocabulary, load_analysis_tokenizer, tokenizer_name
    from mixlab.analysis.report import check_report_folder
    from mixlab.checkpoint import load_model
    from mixlab.config import ModelConfig, suffix_of
    from mixlab.corpus import check_domains, data_split, find_domains

    split = data_split(args.data, args.split)  # `--split Valid` reads valid.jsonl; a file is read whole
    if suffix_of(args.model) == ".gguf" and Path(args.model).is_file():  # its metadata is the config
        from mixlab.checkpoint.gguf_read import config_from_header, read_header

        config = config_from_header(read_header(args.model))
    else:
        config = ModelConfig.from_dir(args.model)
    if config.moe is None:  # fail before reading weights or data
        raise ValueError(f"{args.model}: the model is dense (no MoE layer, so no router); routing analysis "
                         "needs a mixture-of-experts model")
    found = find_domains(args.data, names=args.domains)  # read once: a file given alone is kept in memory
    check_domains(found, split=split)
    check_report_folder(args.out, sources=[args.data, args.model])  # refused now, not after reading the model
    try:  # every layer of an MoE config is an MoE layer; its errors are the flag's ("--layers: ..."): exit 2
        parse_layers(args.layers, list(range(config.n_layers)))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.samples < 0:
        raise UsageError(f"--samples must be >= 0, got {args.samples}")
    if args.seq_len is not None and args.seq_len < 2:  # as collect_routing requires, before the weights are read
        raise UsageError(f"--seq-len must be >= 2 (windows of one token have no consecutive pair), got {args.seq_len}")
    tokenizer = load_analysis_tokenizer(args.model, path=args.tokenizer)
    check_vocabulary(tokenizer, config.vocab_size)
    if str(args.device) == "cpu":  # its floats whole, before minutes of reading (a Mixtral's: 93 GB in bf16)
        from mixlab.cli.run import check_memory

        check_memory(args.model, args.dtype, None, flags=False)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    seq_len = min(args.seq_len or 512, model.config.max_seq_len)  # the default quietly lowered, as eval's --context
    if args.seq_len is not None and seq_len < args.seq_len:  # as `mixlab eval --context`
        note("analyze", f"--seq-len {args.seq_len} is past the model's {model.config.max_seq_len} positions; "
                        f"routing sequences of {seq_len}")
    report = run(model, tokenizer, args.data, out=args.out, layers=args.layers, domains=args.domains,
                 split=split or None, max_tokens=args.max_tokens, seq_len=seq_len,
                 batch_size=args.batch_size, samples_per_domain=args.samples, sample_tokens=args.sample_tokens,
                 meta={"model": str(args.model), "tokenizer": tokenizer_name(tokenizer)},
                 progress=not args.quiet, found=found)
    base = report["random_baseline"]
    print(f"wrote {Path(args.out) / 'index.html'} ({len(report['domains'])} domains, "
          f"{sum(d['tokens'] for d in report['domains'].values()):,} tokens)")
    rf, ro = report["all_domains"]["repeat_first_choice"], report["all_domains"]["repeat_topk_overlap"]
    if report["all_domains"]["pairs"]:  # else the rates are None: no two tokens of one window
        print(f"repeat rate of consecutive tokens, layers {report['moe_layers'][0]}..{report['moe_layers'][-1]}: "
              f"first choice {min(rf):.3f}-{max(rf):.3f} (random {base['first_choice']:.3f}), "
              f"top-{report['top_k']} overlap {min(ro):.3f}-{max(ro):.3f} (random {base['topk_overlap']:.3f})")
    try:  # as write_figures decides: without matplotlib, no figures; the page said so, the terminal did not
        import matplotlib  # noqa: F401
    except ImportError:
        note("analyze", "the report has no figures: pip install 'mixlab[plot]' (matplotlib) draws them")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="routing analysis (Mixtral paper §5): experts per domain, layer and token")
    p.add_argument("--model", type=model_path, required=True,
                   help="checkpoint folder (transformers or Mistral format), GGUF file or run folder (its hf/ export)")
    p.add_argument("--data", type=user_path, required=True,
                   help="corpus folder with one subfolder per domain (.jsonl with 'text', "
                        ".txt), one domain folder, or a .jsonl or text file (read whole; its domain its stem, "
                        "a row's 'domain' field), as eval and data prepare read them")
    p.add_argument("--out", type=user_path, required=True, help="report folder to write")
    p.add_argument("--layers", default=None, help="layers shown in the per-expert figures and token view: "
                   "'all' or e.g. 0,15,31 (default: first, middle, last)")
    p.add_argument("--domains", type=names, default=None,
                   help="comma-separated domain folders (default: all but chat/)")
    p.add_argument("--split", default=None, help="read each domain's files of this split, as eval and data "
                   "prepare name them (default: valid: valid, validation, val, dev, test files; train; test; ...; "
                   "'' for all files; a file given as --data is read whole)")
    p.add_argument("--max-tokens", type=positive, default=50_000, help="tokens per domain (default 50000)")
    p.add_argument("--seq-len", type=positive, default=None, help="tokens per model sequence (default 512; at most the "
                   "model's context length)")
    p.add_argument("--batch-size", type=positive, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--samples", type=int, default=1, help="documents per domain in the token view (default 1)")
    p.add_argument("--sample-tokens", type=positive, default=150,
                   help="tokens shown per document in the token view (default 150; at most --seq-len: "
                        "the document's first window)")
    p.add_argument("--tokenizer", type=user_path, default=None,
                   help="mixtral, bytes, a tokenizer file or a folder holding one (default: the model folder's "
                        "tokenizer.model / tokenizer.json or the one its mixlab_data.json names, else Mixtral's v1)")
    p.add_argument("--dtype", type=dtype_choice("float32", "bfloat16", "float16"), default=None,
                   help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--device", type=device_choice, default="cpu", help="cpu (default), cuda or cuda:N")
    add_quiet_arg(p)
    p.set_defaults(func=analyze)
