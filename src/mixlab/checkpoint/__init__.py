"""Load and save models in every format users hold: transformers (legacy per-expert keys and v5
fused keys, single or sharded) and Mistral's consolidated format.

Loading checks everything before reading any data (names, shapes, dtypes, index, headers; see
io.py), builds the model on the meta device, allocates each parameter once in the wanted dtype
and reads the file bytes straight into it: peak memory is the model's size plus one tensor, and
an error leaves nothing half-loaded (no model is returned).
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixlab.atomic import recover
from mixlab.atomic import sibling as _sibling
from mixlab.checkpoint.adapter import Adapter, adapter_factors, merge_adapter, read_adapter
from mixlab.checkpoint.io import (
    DTYPES,
    FLOAT_DTYPES,
    PICKLE_SUFFIXES,
    CheckpointError,
    TensorInfo,
    TensorReader,
    _is_weight_file,
    _pickle_hint,
    all_finite,
    scan,
    write_sharded,
)
from mixlab.checkpoint.keymaps import FORMATS, Rule, detect_format, rules
from mixlab.config import ConfigError, ModelConfig, as_path, suffix_of, with_generation_config
from mixlab.dtypes import dtype_name, parse_dtype
from mixlab.model import Transformer
from mixlab.model.inference import (
    QUANTS,
    Quantised,
    inference_format,
    keep_quantised_modules,
    quant_names,
    quantize_weight,
)
from mixlab.model.memory import refuse_if_short
from mixlab.ops.quant import INT4_GROUPS

__all__ = ["CheckpointError", "adapter_factors", "describe", "from_state_dict", "load_model", "load_state",
           "merge_adapter", "meta_model", "save_model", "to_state_dict"]


def parse_device(device: str | torch.device) -> torch.device:
    """A device weights can be loaded onto, or ValueError naming it: not `meta` (holds no data), and
    CUDA only where this torch has it."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; expected cpu, cuda or cuda:N") from None
    if d.type == "meta":
        raise ValueError("device 'meta' holds no data: load onto cpu or cuda")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available (this torch {torch.__version__} "
                         f"{'has no CUDA support' if torch.version.cuda is None else 'sees no GPU'}); use cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: there are {torch.cuda.device_count()} CUDA devices")
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r}: mixlab runs on cpu or cuda")
    return d


def _names(xs: list[str]) -> str:
    more = f" (and {len(xs) - 5} more)" if len(xs) > 5 else ""
    return ", ".join(xs[:5]) + more


def _hf_field(root: Path, key: str) -> Any:
    """Field `key` of the folder's transformers config.json, for an error to name; None where there is
    none or the file does not read (config.py names what is wrong with it)."""
    f = root / "config.json"
    try:
        return json.loads(f.read_text(encoding="utf-8")).get(key) if f.is_file() else None
    except (OSError, ValueError, RecursionError, AttributeError):
        return None


def _refuse_quantised(root: Path) -> None:
    """A transformers checkpoint quantised by GPTQ, AWQ, bitsandbytes, FP8, ... (`quantization_config`
    in its config.json) holds packed integer weights and scales: named as such, not as a list of
    "missing tensors" (its `...weight` are `...qweight`)."""
    f = root / "config.json"
    q = _hf_field(root, "quantization_config")
    if q:
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise CheckpointError(f"{f}: quantization_config (quant_method {method!r}): a quantised checkpoint, whose "
                              "packed weights and scales mixlab does not read; load the float checkpoint it was made "
                              "from (then --quant int8 / int4, or prepare_for_inference), or a GGUF file")


def _refuse_moe_mismatch(root: Path, config: ModelConfig, infos: dict[str, TensorInfo], fmt: str) -> None:
    """A config that says dense over weights holding experts (a Mixtral saved with model_type "llama"),
    or the reverse, named as such rather than as a list of "missing tensors": what the config should say."""
    experts = sorted(k for k in infos if ".experts." in k)
    if bool(experts) == config.is_moe:
        return
    f = root / ("params.json" if fmt == "mistral" else "config.json")
    said = f", model_type {_hf_field(root, 'model_type')!r}" if fmt != "mistral" and f.is_file() else ""
    if experts:
        fused = [k for k in experts if k.endswith("experts.gate_up_proj")]
        n = infos[fused[0]].shape[0] if fused else len({m.group(1) for k in experts
                                                        if (m := re.search(r"\.experts\.(\d+)\.", k))})
        fix = (f'a "moe" block, {{"num_experts": {n}, "num_experts_per_tok": K}}' if fmt == "mistral" else
               f"model_type 'mixtral', architectures ['MixtralForCausalLM'], num_local_experts {n} and "
               "num_experts_per_tok")
        raise CheckpointError(f"{root}: the config describes a dense model ({f.name}{said}) but the weights hold "
                              f"{n} MoE experts per layer ({experts[0]}, ...): an MoE checkpoint's {f.name} has {fix}")
    dense = next((k for k in sorted(infos) if re.search(r"(mlp\.(gate|up|down)_proj|feed_forward\.w\d)\.weight$", k)),
                 None)
    if dense is None:  # neither: the list of missing tensors says more
        return
    fix = 'no "moe" block' if fmt == "mistral" else "model_type 'mistral' or 'llama'"
    raise CheckpointError(f"{root}: the config describes an MoE model ({config.moe.num_experts if config.moe else 0} "
                          f"experts; {f.name}{said}) but the weights hold a dense feed-forward ({dense}, ...): a "
                          f"dense checkpoint's {f.name} has {fix} (`mixlab upcycle` makes an MoE model from one)")


def _refuse_headless(root: Path, config: ModelConfig, infos: dict[str, TensorInfo]) -> None:
    """A transformers checkpoint of another class than ...ForCausalLM (the bare MixtralModel, a sequence
    classifier) has no language-modelling head: named by its architectures, not as "no known format"
    or "missing tensors: lm_head.weight"."""
    bare = "embed_tokens.weight" in infos  # MixtralModel.save_pretrained: no "model." prefix, no head
    if not bare and ("model.embed_tokens.weight" not in infos or config.tie_embeddings or "lm_head.weight" in infos):
        return
    arch = _hf_field(root, "architectures")
    if not bare and not (isinstance(arch, list) and arch and not any(str(a).endswith("ForCausalLM") for a in arch)):
        return  # a causal LM's file that lost its head: "missing tensors" says it
    raise CheckpointError(f"{root}: the weights have no language-modelling head (no lm_head.weight"
                          f"{'; names without the model. prefix' if bare else ''}): "
                          f"{f'config.json architectures {arch!r}' if arch else 'not a causal language model'}; "
                          "mixlab loads MixtralForCausalLM, MistralForCausalLM and LlamaForCausalLM checkpoints "
                          "(save that class's model)")


def plan(root: Path, config: ModelConfig) -> tuple[str, list[Rule], dict[str, TensorInfo]]:
    """Match the checkpoint at `root` against `config` without reading tensor data: the format,
    the key-map rules, and every tensor's location. CheckpointError names the first problem."""
    _refuse_quantised(root)
    infos = scan(root)
    _refuse_headless(root, config, infos)
    try:
        fmt = detect_format(set(infos))
    except ValueError as e:
        raise CheckpointError(f"{root}: {e}") from None
    # The layer count first: a config claiming far more layers than the files hold fails here,
    # before a rule table (or anything else) is built for it.
    held = {int(m.group(1)) for k in infos if (m := re.match(r"(?:model\.)?layers\.(\d+)\.", k))}
    if len(held) != config.n_layers:
        raise CheckpointError(f"{root}: the config has {config.n_layers} layers (num_hidden_layers / n_layers), "
                              f"the weights hold {len(held)}")
    _refuse_moe_mismatch(root, config, infos, fmt)
    table = rules(config, fmt)
    wanted = {name for r in table for name in r.theirs}
    missing = sorted(wanted - set(infos))
    if missing:
        raise CheckpointError(f"{root}: missing tensors for this config ({fmt} format): {_names(missing)}")
    # transformers may write lm_head for tied embeddings; rotary caches are derived, not weights.
    ignorable = {"lm_head.weight", "output.weight"} if config.tie_embeddings else set()
    unexpected = sorted(k for k in set(infos) - wanted - ignorable if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise CheckpointError(f"{root}: unexpected tensors for this config ({fmt} format): {_names(unexpected)} "
                              "(does the config match the weights?)")
    for r in table:
        for name, shape in zip(r.theirs, r.shapes, strict=True):
            info = infos[name]
            if info.shape != shape:
                raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                                      f"expected {list(shape)} for this config")
            if info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, "
                                      f"expected a floating-point dtype ({', '.join(FLOAT_DTYPES)})")
    return fmt, table, infos


def _stored_dtype(table: list[Rule], infos: dict[str, TensorInfo]) -> torch.dtype:
    """The dtype holding most of the checkpoint's bytes (one dtype for the whole model)."""
    nbytes: Counter[str] = Counter()
    for r in table:
        for name in r.theirs:
            nbytes[infos[name].dtype] += infos[name].nbytes
    return DTYPES[nbytes.most_common(1)[0][0]]


def load_state(
    path: str | Path,
    config: ModelConfig,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """The checkpoint at `path` as a state dict in mixlab's names, every tensor in `dtype` (default:
    the stored dtype holding most bytes) on `device`. All checks happen before any data is read."""
    root = Path(path)
    _, table, infos = plan(root, config)
    return _read_state(table, infos, dtype=dtype, device=device)[0]


def check_quant_args(quant: str | None, group: int | None, adapter: object) -> int:
    """The int4 group `load_model(quant=, group=, adapter=)` quantises with (32 unless given), after its
    refusals, one line each (`load_expert_parallel` takes the same arguments)."""
    if quant not in (None, *QUANTS):
        raise ValueError(f"quant={quant!r}: expected 'int8' or 'int4' (each matrix rounded as it is read) or None")
    if group is not None and quant != "int4":  # it would be ignored
        raise ValueError(f"group={group!r} sets int4's inputs per scale: pass quant='int4' with it"
                         + (" (int8 has one scale per row)" if quant == "int8" else ""))
    group = 32 if group is None else group
    if group not in INT4_GROUPS:
        raise ValueError(f"group={group!r}: int4's inputs per scale are one of {', '.join(map(str, INT4_GROUPS))}")
    if quant is not None and adapter is not None:
        raise ValueError("quant= does not combine with adapter=: the adapter is merged into float weights; load "
                         f"with adapter= and without quant, then prepare_for_inference(model, quant={quant!r})")
    return group


def _is_experts(r: Rule) -> bool:
    return ".ffn.experts." in r.ours


def _read_state(table: list[Rule], infos: dict[str, TensorInfo], *, dtype: torch.dtype | None,
                device: str | torch.device, experts: bool = True, quant: str | None = None,
                quantise: Collection[str] = (), group: int = 32) -> tuple[dict[str, torch.Tensor], Quantised]:
    """(the float weights, the quantised ones): each weight `quantise` names (`quant_names`) is
    quantised to `quant` (`quantize_weight`; int8's scales in the dtype loaded, the embeddings') as soon
    as it is read, so that only one weight's floats exist at a time; a tied head's from the embeddings."""
    want = dtype or _stored_dtype(table, infos)
    state: dict[str, torch.Tensor] = {}
    quantised: Quantised = {}
    with TensorReader(infos) as reader:
        for r in table:
            if not experts and _is_experts(r):
                continue
            t = torch.empty(r.shape, dtype=want, device=device)
            for name, view in zip(r.theirs, r.parts(t), strict=True):
                reader.read_into(name, view)  # in place when layout and dtype allow; else via one temporary
                if not all_finite(view):
                    warnings.warn(f"{infos[name].file}: tensor {name!r} holds NaN or Inf values; the model's "
                                  "outputs will be NaN", stacklevel=2)
            if quant is not None and r.ours in quantise:
                quantised[r.ours] = quantize_weight(t, quant, group=group, scale_dtype=want)
            else:
                state[r.ours] = t
            del t  # a quantised weight's floats go now, not once the next weight is allocated
        _refuse_untied_head(table, infos, state, reader)
    if quant is not None and "output.weight" in quantise and "output.weight" not in quantised:  # tied
        quantised["output.weight"] = quantize_weight(state["tok_embeddings.weight"], quant, group=group,
                                                     scale_dtype=want)  # the embeddings, quantised
    return state, quantised


def _refuse_untied_head(table: list[Rule], infos: dict[str, TensorInfo], state: dict[str, torch.Tensor],
                        reader: TensorReader) -> None:
    """tie_word_embeddings true, yet the files hold a head that differs from the embeddings: transformers
    4.x ties the two (the head is dropped), 5.x keeps them apart (the head is used), so no one choice
    matches both: refused by name. An equal copy (some exporters write one) loads as tied."""
    if "tok_embeddings.weight" not in state or any(r.ours == "output.weight" for r in table):
        return  # not tied (or the embeddings were not read)
    embed = state["tok_embeddings.weight"]
    for name in ("lm_head.weight", "output.weight"):
        if name in infos and infos[name].shape != tuple(embed.shape):  # no head of this model: a broken file
            raise CheckpointError(f"{infos[name].file}: config field 'tie_word_embeddings' is true, but tensor "
                                  f"{name!r} has shape {list(infos[name].shape)}, not the embeddings' "
                                  f"{list(embed.shape)}")
        if name in infos:
            head = torch.empty_like(embed)
            reader.read_into(name, head)
            if not torch.equal(head, embed):
                raise untied_head_error(infos[name].file, name)


def untied_head_error(file: Path, name: str) -> CheckpointError:
    """The refusal of a tied config over a head tensor `name` in `file` that differs from the embeddings
    (also `mixlab upcycle`'s)."""
    return CheckpointError(f"{file}: config field 'tie_word_embeddings' is true, but tensor {name!r} differs "
                           "from the embeddings (transformers 4.x would tie them, 5.x use it): set "
                           "'tie_word_embeddings' to false to use it, or delete it from the files to tie")


@contextmanager
def _skip_init() -> Iterator[None]:
    """Skip the layers' random init while building on the meta device: there is nothing to
    initialise, and torch's meta-device `normal_` imports torch._dynamo on first use (about 2 s and
    70 MB, more than the rest of loading a 0.8B model). transformers does the same
    (`modeling_utils.no_init_weights`)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda t, *a, **kw: t)
        with torch.device("meta"):
            yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def meta_model(config: ModelConfig) -> Transformer:
    """The model with every parameter on the meta device (shapes only, no memory, no init)."""
    with _skip_init():
        return Transformer(config)


def _assign(config: ModelConfig, state: dict[str, torch.Tensor], *, strict: bool = True,
            quantised: Quantised | None = None) -> Transformer:
    """The model holding the tensors of `state` (mixlab's names) themselves, not copies; the weights of
    `quantised` in quantised modules (`keep_quantised_modules`: `Int8Linear`, `Int4Experts`, ...)."""
    model = meta_model(config)
    if quantised:
        keep_quantised_modules(model, quantised)
    tied = config.tie_embeddings and "output.weight" not in (quantised or {})  # a quantised head is a copy
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    if not quantised:
        model.load_state_dict(state, assign=True, strict=strict)
    else:  # the quantised modules' buffers are set already: strict= asks that nothing else is left unset
        extra = model.load_state_dict(state, assign=True, strict=False).unexpected_keys
        unset = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if strict and (extra or unset):  # a bug, not a file problem: every tensor was planned
            raise RuntimeError(f"quantised load: unexpected {extra[:5]}, unset {unset[:5]}")
        model.requires_grad_(False)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    return model


def hub_hint(path: str | Path) -> str:
    """What to do with a Hugging Face repo id (`mistralai/Mixtral-8x7B-v0.1`) given where a local
    folder is read, for the "no such checkpoint folder" errors; '' for anything else."""
    if not re.fullmatch(r"[\w][\w.-]*/[\w][\w.-]*", str(path)) or Path(path).parent.exists():  # a local typo
        return ""
    return (f" (a Hugging Face repo id? mixlab reads local folders: `hf download {path} --local-dir DIR` "
            "downloads it)")


def _refuse_pickle_or_recover(root: Path) -> None:
    if suffix_of(root) in PICKLE_SUFFIXES and root.is_file():
        raise CheckpointError(_pickle_hint(root))
    if _sibling(root, "new").exists() or _sibling(root, "old").exists():
        try:
            recover(root)  # an interrupted save_model: finish it (see io.py)
        except OSError as e:
            raise CheckpointError(f"{root}: an interrupted save left {_sibling(root, 'new')} / "
                                  f"{_sibling(root, 'old')} and finishing it failed: {e}") from None
    if not root.exists():
        raise CheckpointError(f"{root}: no such checkpoint folder{hub_hint(root)}")
    if root.is_file():  # a GGUF file is recognised by its name (as the CLI and the tokenizer do)
        with open(root, "rb") as f:
            gguf = f.read(4) == b"GGUF"
        raise CheckpointError(f"{root}: a GGUF file whose name does not end in .gguf: rename it" if gguf else
                              f"{root}: a file, not a checkpoint folder: pass the folder holding it (with its "
                              "config.json or params.json), or a .gguf file")


def folder_config(root: Path, config: ModelConfig | None = None) -> ModelConfig:
    """`config`, else the model config of checkpoint folder `root` (config.json / params.json; a transformers
    folder's generation_config.json gives the ids that end generation, as in transformers), after `load_model`'s
    checks of the path (a pickle, an interrupted save, no folder)."""
    _refuse_pickle_or_recover(root)
    if config is not None:
        return config
    try:
        config = ModelConfig.from_dir(root)
        return with_generation_config(config, root) if (root / "config.json").is_file() else config
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def warn_other_base(root: Path, peft: Adapter) -> None:
    """An adapter merged over weights of the right shapes that are not its base's gives other logits
    silently: warned when its base_model_name_or_path is a local folder other than `root`. A hub name
    cannot be resolved here, so it is never warned about, and a name alone never refuses a merge. Every
    path that merges an adapter calls it once, before the long load (load_model; convert of a GGUF file and
    generate --ep, which load the weights themselves)."""
    base = peft.config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base or not Path(base).expanduser().is_dir():
        return
    if Path(base).expanduser().resolve() != root.expanduser().resolve():
        warnings.warn(f"{peft.root / 'adapter_config.json'}: the adapter was trained over {base} (its "
                      f"base_model_name_or_path), not {root}: merged over other weights it gives other logits; "
                      f"load it over {base} unless {root} holds the same weights (a conversion of it)", stacklevel=2)


def load_model(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    config: ModelConfig | None = None,
    max_memory: int | str | None = None,
    policy: str | None = None,
    prefetch: bool | None = None,
    adapter: str | Path | None = None,
    quant: str | None = None,
    group: int | None = None,
) -> Transformer:
    """Load a checkpoint folder (transformers or Mistral format) or a llama.cpp GGUF file
    (`checkpoint/gguf_read.py`: Q4_0 matrices stay int4) into a mixlab `Transformer`.

    `dtype`: convert every tensor at load (default: as stored). `config`: use this instead of the
    folder's config.json / params.json (not for GGUF, whose metadata is its config). The model is in
    eval mode.

    `max_memory` (bytes, or a size such as "4GB"): offload the experts (`checkpoint/offload.py`):
    they stay on disk and are read on demand into an expert cache of that many bytes (`policy`
    "lru" (default) or "lfu"; `prefetch` (default True): guess the next layer's experts and read them
    in the background; both are refused without `max_memory`). Everything else is loaded as usual.
    Inference only, CPU only; `prepare_for_inference(quant=)` then sets the cache's format (plain,
    int8 or int4).

    `adapter`: a PEFT LoRA adapter folder merged into the weights (`checkpoint/adapter.py`), so
    `prepare_for_inference(quant=)` quantises the merged weights.

    `quant="int8"` or `"int4"` (groups of `group` inputs: 32 (default), 64 or 128): each matrix the
    format covers (all but the embeddings and routers) is quantised as soon as it is read, so a whole
    model's floats never exist: peak memory is the quantised model plus one weight's floats (Mixtral
    8x7B in bf16: ~27 GB as int4, ~48 GB as int8, where loading floats first took 93 GB). The model
    equals `prepare_for_inference(load_model(path, dtype=dtype), quant=quant, group=group)` bit for
    bit before its native decoder is attached (int8's row scales in the embeddings' dtype), whatever
    the source (a GGUF file's K-quants are dequantised and rounded again, its Q4_0 matrices kept as
    stored, in groups of 32 only; int8 refuses a file holding them, as prepare_for_inference does);
    `prepare_for_inference(model, quant=quant)` then attaches it. With `max_memory` the expert cache
    holds experts in that format. Not with `adapter` (merged into float weights: load without quant,
    prepare after).
    """
    from mixlab.config import parse_bytes
    from mixlab.ops.offload import POLICIES

    if config is not None and not isinstance(config, ModelConfig):
        raise ValueError(f"config= takes a mixlab ModelConfig (e.g. ModelConfig.from_dir(path).replace(...)), "
                         f"not {type(config).__name__}")
    root = as_path(path, what="load_model's path")
    dev = parse_device(device)  # before any reading, for a GGUF file too
    if max_memory is None and (policy is not None or prefetch is not None):  # they would do nothing
        given = " and ".join(f"{k}={v!r}" for k, v in (("policy", policy), ("prefetch", prefetch)) if v is not None)
        raise ValueError(f"{given} without max_memory: the eviction policy and prefetching are for offloaded "
                         "experts; pass max_memory= too (e.g. max_memory='4GB')")
    policy = "lru" if policy is None else policy
    prefetch = True if prefetch is None else prefetch
    group = check_quant_args(quant, group, adapter)
    if quant == "int4" and dev.type == "cpu":  # inference preparation at load time: the native kernels round
        from mixlab.ops import registry  # int4 and dequantise K-quants (the same bytes, ~10x PyTorch's speed)

        registry.prepare_native()
    if max_memory is not None:
        max_memory = parse_bytes(max_memory, what="max_memory")
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; expected one of {', '.join(POLICIES)}")
        if not isinstance(prefetch, bool):
            raise ValueError(f"prefetch must be True or False, not {prefetch!r}")
        if adapter is not None:  # the experts stay on disk, where nothing can be merged into them
            raise ValueError("adapter= does not combine with max_memory (offloaded experts): merge the adapter "
                             "into a checkpoint first (load_model(path, adapter=DIR), then save_model)")
    peft = None if adapter is None else read_adapter(adapter)  # a wrong adapter is told before a long load
    if peft is not None:
        warn_other_base(root, peft)
    if suffix_of(root) == ".gguf" and not root.is_dir():
        from mixlab.checkpoint.gguf_read import load_gguf

        if config is not None:
            raise ValueError("config= does not apply to GGUF files: their metadata is the config")
        model = load_gguf(root, dtype=parse_dtype(dtype), device=dev, max_memory=max_memory, policy=policy,
                          prefetch=prefetch, quant=quant, group=group)
        return model if peft is None else merge_adapter(model, peft)
    config = folder_config(root, config)
    want = parse_dtype(dtype)
    offload = max_memory is not None
    if offload:
        from mixlab.checkpoint.offload import check_offloadable

        check_offloadable(config, root, dev)
    _, table, infos = plan(root, config)
    quantise = quant_names(meta_model(config), quant, group=group) if quant else set()  # int4's widths: checked now
    if dev.type == "cpu" and not offload:  # one that cannot fit: refused now, not killed minutes in
        refuse_if_short(str(root), config, dtype_name(want or _stored_dtype(table, infos)), quant)
    state, quantised = _read_state(table, infos, dtype=want, device=dev, experts=not offload, quant=quant,
                                   quantise=quantise, group=group)
    model = _assign(config, state, strict=not offload, quantised=quantised)
    if offload:
        from mixlab.checkpoint.offload import SafetensorsSource, offload_experts
        from mixlab.ops.offload import SlotFormat

        assert max_memory is not None
        layers: dict[str, Rule] = {r.ours: r for r in table if _is_experts(r)}
        tables = [(layers[f"layers.{i}.ffn.experts.w13"], layers[f"layers.{i}.ffn.experts.w2"])
                  for i in range(config.n_layers)]
        floats = want or _stored_dtype(table, infos)
        fmt = SlotFormat(quant or "plain", floats, group)  # the cache's, as prepare_for_inference(quant=) sets it
        offload_experts(model, SafetensorsSource(infos, tables, config), max_memory=max_memory, fmt=fmt,
                        policy=policy, prefetch=prefetch)
        model.requires_grad_(False)
        if quant == "int4":  # offloaded int4 products take exact activations (as prepare_for_inference sets them)
            model.int4_activations = "float32"
    return (model if peft is None else merge_adapter(model, peft)).eval()


_GGUF_HINT = "mixlab.checkpoint.gguf.write_gguf(model, 'x.gguf', quant='bf16') writes a GGUF file (`mixlab convert`)"


def refuse_adapters(model: torch.nn.Module, what: str) -> None:
    """ValueError if `model` holds LoRA adapters (`train.lora.apply_lora`): its weights are parametrised,
    so its state dict names no `...wqkv.weight` (saving it was a bare KeyError)."""
    adapter = next((name for name, _ in model.named_parameters() if name.endswith(("lora_A", "lora_B"))), None)
    # PEFT's get_peft_model puts its layers into the model itself (`...wqkv.base_layer.weight`,
    # `...wqkv.lora_A.default.weight`): saving it was a bare KeyError 'layers.0.attn.wqkv.weight'.
    peft = next((name for name, _ in model.named_parameters() if ".lora_A." in name or ".base_layer." in name), None)
    if peft is not None:
        raise ValueError(f"{what} a model holding PEFT LoRA layers ({peft}): merge them first "
                         "(peft_model.merge_and_unload() returns the mixlab Transformer); for an adapter that "
                         "--adapter loads, train with `mixlab sft --lora-rank` or on transformers' model")
    if adapter is not None:
        raise ValueError(f"{what} a model holding LoRA adapters ({adapter}): merge them first "
                         "(mixlab.train.lora.merge(model), or save_merged); save_peft writes the adapter alone")


def _plain(model: Transformer, fmt: str, *, what: str) -> Transformer:
    """The mixlab model behind `model` (a `torch.compile` wrapper's), checked to hold plain float
    weights that `fmt` can name."""
    # torch.compile(model) wraps it in an OptimizedModule (state dict names prefixed "_orig_mod."),
    # which was refused as "not OptimizedModule".
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, Transformer):
        peft = " (PEFT's wrapper: merge_and_unload() returns the mixlab Transformer)" if hasattr(
            model, "merge_and_unload") else ""
        raise ValueError(f"{what} a mixlab Transformer, not {type(model).__name__}{peft}")
    if fmt not in FORMATS:
        raise ValueError(f"cannot save format {fmt!r}; expected one of {', '.join(FORMATS)}"
                         + (f" ({_GGUF_HINT})" if fmt == "gguf" else ""))
    refuse_adapters(model, "cannot save (or name in a checkpoint format)")
    prepared = inference_format(model)
    if prepared == "offloaded":  # its experts are on disk, in the checkpoint it was loaded from
        raise ValueError("cannot save (or name in a checkpoint format) a model whose experts are offloaded "
                         "(load_model(..., max_memory=)): load it without max_memory, or copy its checkpoint")
    if prepared is not None:
        raise ValueError(f"cannot save (or name in a checkpoint format) a model with {prepared} inference weights "
                         "(prepared for inference, loaded with quant=, or from a Q4_0 GGUF): save it before "
                         "prepare_for_inference, load it again from its checkpoint without quant=, or convert a GGUF "
                         "with `mixlab convert` (dequantising)")
    return model


def to_state_dict(model: Transformer, *, fmt: str = "hf") -> dict[str, torch.Tensor]:
    """The model's weights under a checkpoint format's names and shapes, in memory: what
    `save_model(model, path, fmt=fmt)` writes. "hf-fused" is the state dict of transformers >= 5's
    `MixtralForCausalLM` (`hf.load_state_dict(to_state_dict(model, fmt="hf-fused"))`), "hf" that of
    transformers 4 (per-expert tensors), "mistral" mistral-inference's. Detached views of the model's
    tensors (q / k / v rows, each expert's w1 / w3 / w2), but for Mistral's wq / wk, copies in its
    rotary row order."""
    model = _plain(model, fmt, what="to_state_dict takes")
    state = model.state_dict()
    return {name: t for r in rules(model.config, fmt)
            for name, t in zip(r.theirs, r.split(state[r.ours].detach()), strict=True)}


def from_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig) -> Transformer:
    """A mixlab model from a state dict in a checkpoint format's names (found from the names, as
    `load_model` finds them): `to_state_dict`'s, or a transformers Mixtral's or Mistral's
    `state_dict()` (`config`: `ModelConfig.from_hf_dict(hf.config.to_dict())`), or in mixlab's own
    (`model.state_dict()`, whose tensors the model then holds themselves, as `load_state_dict(assign=True)`
    does; from other names they are copied). The tensors keep their dtype and device; a missing,
    unexpected or misshaped tensor is a CheckpointError naming it. In eval mode, as `load_model`'s."""
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a mixlab ModelConfig (a transformers model's: "
                         f"ModelConfig.from_hf_dict(hf.config.to_dict())), not {type(config).__name__}")
    for k, t in state.items():  # an integer tensor was torch's multi-line "can require gradients" error
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
            raise CheckpointError(f"state dict: {k!r} is {what}, expected a floating-point tensor")
    if any(k.endswith(".attn.wqkv.weight") for k in state):  # mixlab's own names
        try:
            return _assign(config, {k: t.detach() for k, t in state.items()}).eval()
        except RuntimeError as e:  # torch names the missing, unexpected and misshaped tensors
            raise CheckpointError(f"state dict does not match this config: {' '.join(str(e).split())}") from None
    try:
        table = rules(config, detect_format(set(state)))
    except ValueError as e:
        raise CheckpointError(f"state dict: {e}") from None
    names = {n for r in table for n in r.theirs}
    tied = {"lm_head.weight", "output.weight"} if config.tie_embeddings else set()  # the embeddings again
    missing, extra = sorted(names - set(state)), sorted(set(state) - names - tied)
    if missing or extra:
        raise CheckpointError(f"state dict does not match this config: missing {_names(missing) or 'none'}; "
                              f"unexpected {_names(extra) or 'none'}")
    ours = {}
    for r in table:
        try:
            ours[r.ours] = r.join([state[n].detach() for n in r.theirs])
        except RuntimeError as e:
            raise CheckpointError(f"state dict: {e} for this config") from None
    return _assign(config, ours).eval()


def save_model(
    model: Transformer,
    path: str | Path,
    *,
    fmt: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int | str | None = None,
    copy_files: list[Path] | None = None,
    extra_files: dict[str, str] | None = None,
    sources: list[str | Path] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    weights: Callable[[str], torch.Tensor] | None = None,
) -> None:
    """Save `model` as a checkpoint folder, atomically (a crash mid-save leaves any previous folder
    at `path` intact; see io.py).

    `fmt`: "hf" (the default: transformers, legacy per-expert names, which every transformers version reads),
    "hf-fused" (transformers >= 5 fused expert tensors) or "mistral" (params.json +
    consolidated.safetensors). `max_shard_bytes`: bytes per safetensors shard (or a size such as "2GB";
    a larger tensor gets a shard of its own; default 5 GiB, and one file for "mistral": mistral-inference's
    `Transformer.from_folder` reads `consolidated.safetensors` alone, never shards). `copy_files`: side
    files (tokenizer, ...) to copy in; `extra_files`: more files to write (name -> text). An existing
    folder at `path` is replaced only if mixlab wrote everything in it, or with `overwrite`; a `path`
    that is or contains one of `sources` is refused (OutputError, see mixlab.atomic). `progress`: a bar
    of the tensors written, where stderr is a terminal. A `torch.compile` wrapper saves the model it
    wraps. A GGUF file is `mixlab.checkpoint.gguf.write_gguf`'s.

    `weights`: each of the model's tensors by its mixlab name, asked for once each, in turn, as the
    shards fill (`model` then gives only the config and dtype: it may be on the meta device), so that
    a sharded model's export gathers each when it is written (`mixlab.parallel.checkpoint.export`).
    """
    path = as_path(path, what="save_model's path")
    if fmt is None:
        if suffix_of(path) == ".gguf":  # it wrote a transformers folder named x.gguf
            raise ValueError(f"{path}: save_model writes a checkpoint folder, not a GGUF file: "
                             f"{_GGUF_HINT}, or pass fmt='hf' for a folder of that name")
        fmt = "hf"
    model = _plain(model, fmt, what="save_model saves")
    config: ModelConfig = model.config
    want = parse_dtype(dtype)
    state = model.state_dict()
    table = rules(config, fmt)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for r in table:
            t = (state[r.ours] if weights is None else weights(r.ours)).detach()
            if want is not None and t.dtype != want:
                t = t.to(want)
            yield from zip(r.theirs, r.split(t), strict=True)

    stored = want or state["tok_embeddings.weight"].dtype
    if fmt in ("hf", "hf-fused"):
        cfg = config.to_hf_dict()
        cfg["dtype"] = cfg["torch_dtype"] = dtype_name(stored)
        extra = {"config.json": json.dumps(cfg, indent=2) + "\n"}
        gen = config.generation_eos_ids  # a loaded folder's generation_config.json, unless that file is copied in
        if gen is not None and not any(Path(f).name == "generation_config.json" for f in copy_files or ()):
            extra["generation_config.json"] = json.dumps(
                {"bos_token_id": config.bos_id, "eos_token_id": list(gen) if len(gen) > 1 else gen[0]}, indent=2) + "\n"
        single = "model.safetensors"
    else:
        extra = {"params.json": json.dumps(config.to_mistral_dict(), indent=2) + "\n"}
        single = "consolidated.safetensors"
    stream: Iterable[tuple[str, torch.Tensor]] = tensors()
    if progress:
        from tqdm import tqdm

        stream = tqdm(stream, total=sum(len(r.theirs) for r in table), desc=f"writing {path}", unit="tensor",
                      leave=False, disable=None)  # terminal only
    if max_shard_bytes is None:
        max_shard_bytes = 5 * 2**30 if fmt != "mistral" else 1 << 62
    write_sharded(stream, path, extra_files={**extra, **(extra_files or {})},
                  max_shard_bytes=max_shard_bytes, single_name=single, metadata={"mixlab_format": fmt},
                  copy_files=copy_files or [], sources=sources or [], overwrite=overwrite)


def side_files(root: str | Path) -> list[Path]:
    """The files of a checkpoint folder that are neither weights nor configs (tokenizer, README...)."""
    return sorted(f for f in Path(root).iterdir() if f.is_file() and not _is_weight_file(f.name))


def input_files(path: str | Path) -> dict[Path, str]:
    """The files a load of `path` reads beyond `path` itself, each with what it is (`inputs` of
    `atomic.check_destination`, so that a write never replaces one): the other parts of a split GGUF,
    and the targets of a folder's links (a hub snapshot's files link to ../../blobs, outside it)."""
    p = Path(path)
    if suffix_of(p) == ".gguf" and p.is_file():
        from mixlab.checkpoint.gguf_read import split_parts

        parts = split_parts(p)
        return {q: f"part {i} of {len(parts)} of the source {p} (a split GGUF)"
                for i, q in enumerate(parts, 1) if q != p}
    if not p.is_dir():
        return {}
    return {f: f"the target of {f}, a link in the source {p}" for f in sorted(p.rglob("*")) if f.is_symlink()}


@dataclass(frozen=True)
class Stored:
    """What a checkpoint folder holds, from its headers: format, file and tensor counts, bytes per dtype."""

    format: str
    files: int
    tensors: int
    bytes_by_dtype: dict[str, int]


def describe(path: str | Path) -> Stored:
    """What is stored in a checkpoint folder, from the headers only (no tensor data is read)."""
    root = Path(path)
    infos = scan(root)
    try:
        fmt = detect_format(set(infos))
    except ValueError as e:
        raise CheckpointError(f"{root}: {e}") from None
    by_dtype: Counter[str] = Counter()
    for i in infos.values():
        by_dtype[i.dtype] += i.nbytes
    return Stored(fmt, len({i.file for i in infos.values()}), len(infos), dict(by_dtype))
