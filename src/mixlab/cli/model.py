"""`mixlab info` and `mixlab convert`: thin wrappers over mixlab.config and mixlab.checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
from pathlib import Path

from mixlab.cli import adapter_path, add_quiet_arg, dtype_choice, note, user_path
from mixlab.config import PRESETS, ConfigError, ModelConfig, did_you_mean, get_preset, parse_bytes, suffix_of
from mixlab.errors import UsageError

CONVERT_FORMATS = ["hf", "hf-fused", "mistral", "gguf"]


def shard_bytes(text: str) -> int:
    """argparse type of --max-shard-gb, in bytes: a positive, finite number of GiB (5), or a size with
    its unit as transformers' `max_shard_size` takes it (5GB = 5 x 10^9 bytes, 5GiB = 5 x 2^30)."""
    try:
        v = float(text)
    except ValueError:
        try:
            return parse_bytes(text, what="")
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of GiB or a size such as 5GB or 500MiB, "
                                             f"got {text!r}") from None
    if not (math.isfinite(v) and v * 2**30 >= 1):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of GiB, got {text!r}")
    return int(v * 2**30)


def _config(spec: str) -> tuple[str, ModelConfig]:
    """The folder or file read (a training run's: its hf/ export, else its newest checkpoint) and its config."""
    p = Path(spec)
    if p.is_dir():
        from mixlab.train.checkpoints import init_config, is_training, resolve_weights

        if is_training(p):  # a run folder or its checkpoints/step_*: as --init-from reads them
            p = resolve_weights(p)
            return str(p), init_config(p)
        return str(p), ModelConfig.from_dir(p)
    if suffix_of(p) == ".gguf" and p.is_file():  # as load_model: the metadata is the config (the header only is read)
        from mixlab.checkpoint.gguf_read import config_from_header, read_header

        return str(p), config_from_header(read_header(p))
    if spec in PRESETS:
        return spec, get_preset(spec)
    if p.exists() and not p.is_file():  # a FIFO named x.gguf: it was "a file, not a checkpoint folder"
        raise ConfigError(f"{spec}: not a regular file (a FIFO, a device or a socket): pass a checkpoint folder, "
                          "a .gguf file or a preset")
    if p.exists():  # a checkpoint's own file (model.safetensors, config.json): as load_model refuses it
        raise ConfigError(f"{spec}: a file, not a checkpoint folder: pass the folder holding it (with its "
                          "config.json or params.json), a .gguf file or a preset")
    from mixlab.checkpoint import hub_hint

    if "/" in spec or suffix_of(p) == ".gguf":  # a path (or a hub id: its hint), not a misspelt preset
        raise ConfigError(f"{spec}: no such file or folder{hub_hint(spec)}")
    raise ConfigError(f"{spec!r} is neither a checkpoint folder, a GGUF file nor a preset{did_you_mean(spec)}"
                      f"{hub_hint(spec)}; "
                      f"presets: {', '.join(sorted(PRESETS))}")



def _binary(n: float) -> str:
    """A size in GiB, or MiB / KiB where GiB would read 0.00 (a small model's)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size / 100:
            return f"{n / size:,.2f} {unit}"
    return f"{n / 2**10:,.2f} KiB"


def _adapter_of(p: Path) -> Path | None:
    """The PEFT adapter folder `p` stands for where it holds no model: an adapter folder itself, or a LoRA
    run without a merged hf/ export (its checkpoints hold the factors alone)."""
    if any((p / f).is_file() for f in ("config.json", "params.json", "hf/config.json")):
        return None
    return next((a for a in (p, p / "adapter") if (a / "adapter_config.json").is_file()), None)


def _adapter_info(path: Path, as_json: bool) -> int:
    """`mixlab info` of a PEFT LoRA adapter folder (RUN/adapter, PEFT's save_pretrained): what it adapts
    and over which base, from its config and its file's header (checked as --adapter checks them)."""
    from mixlab.checkpoint.adapter import WEIGHTS, read_adapter
    from mixlab.checkpoint.io import DTYPES
    from mixlab.dtypes import dtype_name

    a = read_adapter(path)
    c = a.config
    by_dtype: dict[str, int] = {}
    for t in a.tensors.values():
        key = dtype_name(DTYPES[t.dtype]) if t.dtype in DTYPES else t.dtype
        by_dtype[key] = by_dtype.get(key, 0) + t.end - t.start
    params = sum(math.prod(t.shape) for t in a.tensors.values())
    base = c.get("base_model_name_or_path")  # a hub name, a local folder or null (mixlab's own exports)
    fields = ("base_model_name_or_path", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
              "target_modules", "target_parameters", "layers_to_transform")
    if as_json:
        print(json.dumps({"adapter": str(path), **{k: c.get(k) for k in fields}, "tensors": len(a.tensors),
                          "parameters": params, "bytes_by_dtype": by_dtype}, indent=1))
        return 0
    scale = c["lora_alpha"] / (math.sqrt(c["r"]) if c.get("use_rslora") else c["r"])
    patterns = len(c.get("rank_pattern") or {}) + len(c.get("alpha_pattern") or {})
    print(f"{path}: LoRA adapter (PEFT) over {base if isinstance(base, str) and base else 'a base it does not name'}"
          f"; rank {c['r']}, alpha {c['lora_alpha']:g} (scale {scale:g}{', rsLoRA' if c.get('use_rslora') else ''})"
          + (f", {patterns} per-module rank / alpha pattern(s)" if patterns else ""))
    for label, key in (("target modules:", "target_modules"), ("target params:", "target_parameters"),
                       ("layers:", "layers_to_transform")):
        v = c.get(key)
        if v:
            print(f"{label:<19}{', '.join(map(str, v)) if isinstance(v, list) else v}")
    print(f"tensors:           {len(a.tensors):,} ({params:,} parameters) in {WEIGHTS}: " + ", ".join(
        f"{k} {v:,} bytes" for k, v in by_dtype.items()) + f" ({_binary(sum(by_dtype.values()))})")
    print(f"use:               --adapter {path} --model {base if isinstance(base, str) and base else 'BASE'} "
          "(generate, chat, serve, eval: merged at load)")
    return 0


def info(args: argparse.Namespace) -> int:
    adapter = _adapter_of(Path(args.model))
    if adapter is not None:
        return _adapter_info(adapter, args.json)
    name, cfg = _config(args.model)  # arithmetic on the config only: no weights are allocated
    stored = runs_as = None
    from mixlab.train.checkpoints import describe_step, is_step

    if Path(name).is_dir() and is_step(Path(name)):
        stored = describe_step(Path(name))
    elif Path(name).is_dir():  # checked before anything is printed: a damaged checkpoint is one error
        from mixlab.checkpoint import describe, plan
        from mixlab.checkpoint.io import DTYPES
        from mixlab.dtypes import dtype_name

        plan(Path(name), cfg)  # names, shapes and dtypes checked against the config, as load_model does
        d = describe(name)  # headers only
        stored = f"{d.format} format, {d.tensors} tensors in {d.files} file(s): " + ", ".join(
            f"{dtype_name(DTYPES[k]) if k in DTYPES else k} {v:,} bytes" for k, v in d.bytes_by_dtype.items())
    elif suffix_of(args.model) == ".gguf":  # its tensors checked as load_model checks them
        from mixlab.checkpoint.gguf_read import describe as describe_gguf
        from mixlab.checkpoint.gguf_read import file_quant, read_header

        stored = describe_gguf(args.model)
        auto, ftype = file_quant(read_header(args.model))
        runs_as = f"{auto} (generate / chat / serve / eval's --quant auto, for its {ftype} matrices)" if auto else None
    counts = cfg.param_counts()
    if args.json:  # the same facts for scripts (`mixlab info DIR --json | jq .parameters.active`)
        print(json.dumps({"model": name, "config": dataclasses.asdict(cfg), "parameters": counts,
                          "kv_cache_bytes_per_token": {"bf16": cfg.kv_cache_bytes_per_token(2)},
                          "stored": stored, **({"runs_as": runs_as} if runs_as else {})}, indent=1))
        return 0
    kind = f"MoE, {cfg.moe.num_experts} experts, top-{cfg.moe.top_k}" if cfg.moe else "dense"
    window = f", sliding window {cfg.sliding_window}" if cfg.sliding_window else ""
    print(f"{name}: {kind}; {cfg.n_layers} layers, width {cfg.dim}, FFN {cfg.ffn_dim}, "
          f"{cfg.n_heads} query / {cfg.n_kv_heads} KV heads of {cfg.head_dim}, vocab {cfg.vocab_size}, "
          f"rope theta {cfg.rope_theta:g}, context {cfg.max_seq_len}{window}")
    print(f"total parameters:  {counts['total']:,}")
    print(f"active per token:  {counts['active']:,}  (attention, norms, router, top-{cfg.moe.top_k if cfg.moe else 1} "
          "FFN per layer, the whole embedding and output matrices)")
    for part in ("embedding", "output", "attention", "ffn", "router", "norms"):
        print(f"  {part + ':':<12}{counts[part]:>18,}")
    print("weights:           " + ", ".join(
        f"{n} {_binary(counts['total'] * b)}" for n, b in (("bf16", 2), ("int8", 1), ("int4", 0.5))))
    print(f"KV cache per token: {cfg.kv_cache_bytes_per_token(2):,} bytes (bf16); "
          f"{_binary(cfg.kv_cache_bytes_per_token(2) * cfg.max_seq_len)} at full context")
    if stored:
        print(f"stored:            {stored}")
    if runs_as:
        print(f"runs as:           {runs_as}")
    return 0


def _gguf_vocabulary(src: str, tmp: Path) -> Path | None:
    """A GGUF file's vocabulary as a SentencePiece `tokenizer.model` in `tmp` (None, with a note, if
    its metadata holds none)."""
    from mixlab.checkpoint import CheckpointError
    from mixlab.checkpoint.gguf_read import sentencepiece_proto

    try:
        (tmp / "tokenizer.model").write_bytes(sentencepiece_proto(src))
    except CheckpointError as e:
        note("convert", f"no tokenizer written ({e})")
        return None
    return tmp / "tokenizer.model"


def _trained_vocabulary(src: Path, extra: dict[str, str]) -> Path | None:
    """The SentencePiece file a model mixlab trained was trained with, as its `mixlab_data.json` (an
    export's, or the one `extra` holds for a checkpoint) names it: the vocabulary a GGUF must carry
    (Mixtral's, the default, would decode its ids as other text)."""
    from mixlab.tokenizer import tokenizer_file

    f = src / "mixlab_data.json"
    text = extra.get("mixlab_data.json") or (f.read_text(encoding="utf-8") if f.is_file() else None)
    spec = json.loads(text).get("tokenizer") if text else None
    if not isinstance(spec, dict):
        return None
    if spec.get("type") == "bytes":
        raise ValueError(f"{src} was trained with mixlab's bytes tokenizer, which llama.cpp has no vocabulary "
                         "type for: a GGUF needs a SentencePiece model (prepare the data with `mixlab data prepare "
                         "--tokenizer mixtral` or a .model, then train on it)")
    if spec.get("type") != "file" or spec.get("name") == "mixtral":
        return None  # Mixtral's (wherever mistral-common was when the data was prepared): write_gguf's default
    path = Path(str(spec.get("path", "")))
    if path.is_dir():  # data prepare --tokenizer FOLDER
        path = tokenizer_file(path) or path
    if not path.is_file():
        raise FileNotFoundError(f"{f if f.is_file() else src}: the model's tokenizer, {spec.get('path')}, is not "
                                "there; pass it with --tokenizer FILE.model")
    return path


def _vocabulary_file(text: str) -> Path:
    """convert's --tokenizer as the SentencePiece file a GGUF's vocabulary is read from, checked before
    the model loads: a name, as every --tokenizer takes it (mixtral; bytes has no SentencePiece model),
    a folder's tokenizer file, or a file."""
    from mixlab.tokenizer import default_tokenizer_path, tokenizer_file

    if text == "bytes":
        raise UsageError("--tokenizer bytes: llama.cpp has no vocabulary type for mixlab's bytes tokenizer; a GGUF "
                         "needs a SentencePiece model (--tokenizer mixtral or FILE.model)")
    p = default_tokenizer_path() if text == "mixtral" else Path(text)
    if p.is_dir():
        p = tokenizer_file(p) or p
    if not p.is_file():
        raise FileNotFoundError(f"--tokenizer {text}: " + ("no tokenizer.model in this folder" if p.is_dir()
                                                           else "no such file"))
    if suffix_of(p) == ".json":
        raise UsageError(f"--tokenizer {text}: a GGUF carries a SentencePiece vocabulary, not a .json tokenizer; "
                         "pass the SentencePiece model (FILE.model)")
    return p


def convert(args: argparse.Namespace) -> int:
    from mixlab.atomic import check_destination
    from mixlab.checkpoint import input_files, load_model, merge_adapter, save_model, side_files, warn_other_base
    from mixlab.tokenizer import tokenizer_file
    from mixlab.train import checkpoints

    if args.to is None:  # `convert SRC out.gguf` writes a GGUF file, not a folder named out.gguf
        args.to = "gguf" if suffix_of(args.dst) == ".gguf" else "hf"
    if args.to != "gguf":  # they would be ignored: an unquantised folder where a quantised one was asked for
        for flag, value in (("--quant", args.quant), ("--tokenizer", args.tokenizer)):
            if value is not None:
                raise UsageError(f"{flag} applies to --to gguf only (this writes a {args.to} folder)")
    args.quant = args.quant or "bf16"
    given = _vocabulary_file(args.tokenizer) if args.tokenizer is not None else None  # now, not after loading
    from mixlab.checkpoint.adapter import read_adapter

    lone = _adapter_of(Path(args.src))
    if lone is not None:  # no weights of its own: the base's, merged with it
        base = read_adapter(lone).config.get("base_model_name_or_path") or "BASE"
        raise ValueError(f"{args.src}: a LoRA adapter, not a model (a LoRA run without a merged hf/ export); "
                         f"`mixlab convert {base} {args.dst} --adapter {lone}` writes its base with it merged")
    peft = read_adapter(args.adapter) if args.adapter is not None else None  # checked now, not after loading
    if args.to == "gguf":  # the optional package, asked for now, not after loading the model
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise ValueError("writing GGUF files needs the gguf package: pip install 'mixlab[gguf]'") from None
    gguf_src = suffix_of(args.src) == ".gguf" and Path(args.src).is_file()
    src, extra = Path(args.src), {}
    training = not gguf_src and src.is_dir() and checkpoints.is_training(src)  # a run folder or its step_*
    if training:
        src = checkpoints.resolve_weights(src)  # the run's hf/ export, else its newest checkpoint
    # refused now, not after reading a model of many GB (save_model and write_gguf check it again); never
    # over what it reads: a run's export, a split GGUF's other part, a link's target, the --tokenizer
    inputs = input_files(args.src) | ({given: f"the --tokenizer {args.tokenizer}"} if given else {})
    read = [args.src, str(src), *([str(args.adapter)] if args.adapter is not None else [])]
    sources = list(dict.fromkeys([*read, *map(str, inputs)]))
    check_destination(args.dst, sources=read, inputs=inputs, overwrite=args.overwrite,
                      kind="file" if args.to == "gguf" else "folder", magic=b"GGUF" if args.to == "gguf" else None,
                      writes=None if args.to == "gguf" else "checkpoint")
    if peft is not None:  # an adapter over another base: said for every source (a GGUF, a checkpoint too)
        warn_other_base(src, peft)
    # q4_0 from a model loaded int4, each matrix rounded as it is read (write_gguf writes its bytes: the same
    # file, without the floats of the whole model in memory); floats for an adapter to merge, or where some
    # matrix's rows are not whole blocks of 32 (stored f16)
    int4 = (args.to == "gguf" and args.quant in ("q4_0", "int4") and peft is None
            and not (training and checkpoints.is_step(src)) and _whole_q4_blocks(src, gguf_src))
    quant = "int4" if int4 else None
    if gguf_src:
        from mixlab.checkpoint.gguf_read import load_gguf
        from mixlab.dtypes import parse_dtype

        # else Q4_0 matrices dequantised: an int4 model saves only as q4_0
        model = load_gguf(args.src, dtype=parse_dtype(args.dtype), keep_int4=int4, quant=quant)
    elif training:
        if checkpoints.is_step(src):  # the float32 weights, and the tokenizer the run's export names
            model = checkpoints.load_init(src, checkpoints.init_config(src))
            data = checkpoints.validate(src, checksums=False).get("data")  # load_init checked every byte
            extra = checkpoints.data_file(data) if data else {}
        else:
            model = load_model(src, dtype=args.dtype, quant=quant)
    else:
        model = load_model(args.src, dtype=args.dtype, quant=quant)
    if peft is not None:
        merge_adapter(model, peft)
    merged = f", {args.adapter} merged" if args.adapter is not None else ""
    with tempfile.TemporaryDirectory(prefix="mixlab-convert-") as tmp:
        if args.to == "gguf":
            from mixlab.checkpoint.gguf import write_gguf

            # the source's vocabulary (a GGUF's metadata, a folder's SentencePiece file), else Mixtral's
            tokenizer = given
            if tokenizer is None and gguf_src:
                tokenizer = _gguf_vocabulary(args.src, Path(tmp))
            elif tokenizer is None and src.is_dir():  # tokenizer.model, .v1, else Mistral's .v3 (Mistral 7B v0.3)
                tokenizer = tokenizer_file(src) or _trained_vocabulary(src, extra)
            if tokenizer is not None and suffix_of(tokenizer) == ".json":  # Mixtral's would be another vocabulary
                raise ValueError(f"{tokenizer}: a GGUF carries a SentencePiece vocabulary and this model's tokenizer "
                                 "is a tokenizer.json; pass its SentencePiece model with --tokenizer FILE.model")
            quant = "q4_0" if args.quant == "int4" else args.quant  # mixlab's int4 at groups of 32 is Q4_0
            write_gguf(model, args.dst, quant=quant, tokenizer=tokenizer, sources=sources,
                       overwrite=args.overwrite, progress=not args.quiet)
            print(f"wrote {args.dst} (gguf, {args.quant}{merged})")
            return 0
        if gguf_src:  # its vocabulary becomes the folder's tokenizer.model
            vocab = _gguf_vocabulary(args.src, Path(tmp))
            copy = [vocab] if vocab is not None else []
        else:
            copy = [] if checkpoints.is_step(src) else side_files(src)
        if args.to == "mistral":
            copy = _one_mistral_tokenizer(copy, Path(tmp))
        save_model(model, args.dst, fmt=args.to, dtype=args.dtype, max_shard_bytes=args.max_shard_bytes,
                   copy_files=copy, extra_files=extra, sources=sources, overwrite=args.overwrite,
                   progress=not args.quiet)
    print(f"wrote {args.dst} ({args.to}{f', from {src}' if src != Path(args.src) else ''}{merged})")
    return 0


def _whole_q4_blocks(src: Path, gguf_src: bool) -> bool:
    """Whether every matrix int4 covers in the model at `src` has rows of whole Q4_0 blocks (32 inputs)."""
    from mixlab.checkpoint import folder_config, meta_model
    from mixlab.checkpoint.gguf_read import config_from_header, read_header
    from mixlab.model.inference import quant_names

    c = config_from_header(read_header(src)) if gguf_src else folder_config(src)
    try:
        quant_names(meta_model(c), "int4", group=32)  # quantize_model_int4's own width check
    except ValueError:
        return False
    return True


def _one_mistral_tokenizer(files: list[Path], tmp: Path) -> list[Path]:
    """`files` with the SentencePiece tokenizer as mistral-inference's `load_tokenizer` reads it: one file of
    `tokenizer.model` or `tokenizer.model.v*` (it refuses a folder with two), whose name gives mistral-common
    the chat template (`tokenizer.model` is v1 to it). A transformers folder's `tokenizer.model` beside its
    `tokenizer.model.v3` (Mistral 7B v0.3's) is left out; one alone of another template than v1 (Mixtral
    8x22B's, a GGUF's vocabulary) is copied, from `tmp`, as `tokenizer.model.v{N}`."""
    from mixlab.tokenizer import load_tokenizer

    plain = next((f for f in files if f.name == "tokenizer.model"), None)
    if plain is None:
        return files
    rest = [f for f in files if f != plain]
    if any(f.name.startswith("tokenizer.model.v") for f in rest):
        return rest
    version = load_tokenizer(plain).chat_version
    if version == 1:
        return files
    named = tmp / f"tokenizer.model.v{version}"
    named.write_bytes(plain.read_bytes())
    return [*rest, named]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameter counts, memory and KV-cache sizes of a preset or checkpoint")
    p.add_argument("model", type=user_path,
                   help="a preset name (e.g. mixtral-8x7b), a checkpoint folder, a .gguf file, a training "
                        "checkpoint (RUN/checkpoints/step_*), a run folder or a PEFT LoRA adapter folder "
                        "(RUN/adapter: its base, rank, alpha, targets and tensors)")
    p.add_argument("--json", action="store_true", help="print the facts as JSON on stdout instead (the config, "
                   "parameter counts, KV-cache bytes, what a checkpoint stores)")
    p.set_defaults(func=info)
    p = sub.add_parser("convert", help="convert a checkpoint between formats (atomic write)")
    p.add_argument("src", type=user_path,
                   help="checkpoint folder (transformers or Mistral format), a GGUF file (quantised "
                        "matrices dequantised), a training checkpoint (RUN/checkpoints/step_*) or a run folder "
                        "(its hf/, else its newest checkpoint)")
    p.add_argument("dst", type=user_path,
                   help="output folder (or .gguf file), written atomically; an existing one is replaced "
                        "only if mixlab wrote it as a checkpoint (not a dataset or a training checkpoint)")
    p.add_argument("--to", choices=CONVERT_FORMATS, default=None,
                   help="output format: hf (transformers, per-expert tensors, which every version reads), hf-fused "
                        "(transformers >= 5's fused expert tensors, mlp.experts.gate_up_proj / down_proj), mistral "
                        "(params.json + consolidated.safetensors), gguf (default: gguf for a dst ending in .gguf, "
                        "else hf)")
    p.add_argument("--quant", choices=["f32", "f16", "bf16", "q8_0", "q4_0", "int4"], default=None,
                   help="GGUF only: how matrices are stored (default bf16; norms and router stay f32; int4 = q4_0, "
                        "mixlab's int4 layout; with q8_0/q4_0, a matrix whose rows are not a multiple of 32 is "
                        "stored as f16)")
    p.add_argument("--tokenizer", type=user_path, default=None,
                   help="GGUF only: the vocabulary's SentencePiece model: mixtral (Mixtral's, from mistral-common), "
                        "a .model file or a folder holding one (default: the source's: a GGUF's, a folder's "
                        "tokenizer.model, or the one a trained model's data used; else mixtral)")
    p.add_argument("--adapter", type=adapter_path, default=None, metavar="DIR",
                   help="a PEFT LoRA adapter folder (as PEFT, TRL and mixlab sft / dpo write it; a LoRA run folder: "
                        "its adapter/) merged into the weights before they are written, as PEFT's merge_and_unload "
                        "then save_pretrained")
    p.add_argument("--dtype", type=dtype_choice("float32", "bfloat16", "float16"), default=None,
                   help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--max-shard-gb", dest="max_shard_bytes", type=shard_bytes, default=None,
                   metavar="SIZE", help="largest shard: a number of GiB, or a size with its unit, 5GB (10^9 bytes) "
                                        "or 500MiB, as transformers' max_shard_size (default 5 GiB; --to mistral: "
                                        "one consolidated.safetensors, the one file mistral-inference reads)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace dst even if it holds files mixlab did not write (never one holding the source)")
    add_quiet_arg(p)
    p.set_defaults(func=convert)
