"""Turn a trained model into a fast CPU inference model, in place and one way (no autograd; the model
can no longer be trained, and `save_model` refuses it): `prepare_for_inference(model, quant=, packed=)`.
Each weight format is a module type (`mixlab.model.formats`); `inference_format` reads them back.

- default: batch-1 decoding runs through the native kernels (`mixlab.ops.native`, attached as
  `model.native_decoder`; `generate.decode_step` uses it), which stream each weight once at close
  to the memory bandwidth. They need the weights plain (row-major), so prefill and batched decoding
  run PyTorch's GEMMs on plain weights. If the kernels cannot be built (no C compiler,
  `MIXLAB_NATIVE=0`), the weights are packed instead (next point); so are those of a model the
  kernels do not take (float16 weights, more than 256 experts, a head dim above 1024, an expert
  capacity), with a warning that says why.
- `packed=True`: the matrices are packed once into oneDNN's blocked layout (what inductor's weight
  freezing does): faster prefill and batched decoding than plain weights, but batch-1
  decoding through PyTorch's kernels (BENCHMARKS.md, "Inference speed"; the two layouts cannot
  coexist without doubling the memory).
- `quant="int8"`: the matrices become int8 with one scale per output row (`mixlab.ops.quant`):
  half the bytes of bf16 for memory-bound decoding (native kernels when available).
- `quant="int4"`: packed 4-bit weights with a float16 scale per group of `group` inputs (32, 64 or
  128; llama.cpp's Q4_0 arithmetic at 32): a quarter of bf16's bytes plus the scales.
- offloaded experts (`load_model(..., max_memory=)`): the expert cache takes the format (`quant`)
  and the linears are converted as above; no native whole-model decoder (the experts are not
  resident), the registry's per-layer kernels run on the cache's slots. Their int4 products take
  exact float32 activations: a resident model gives the same tokens with `int4_activations="float32"`.

The token embedding is left alone (a lookup reads one row per token) and so is the router (tiny,
and float32 so that routing decisions do not move).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from mixlab.model import native
from mixlab.model.formats import EXPERT_FORMATS, Int4Experts, Int8Experts, OffloadedExperts, PackedExperts, expert_cache
from mixlab.model.moe import Experts, ExpertsBase, MoEBlock
from mixlab.model.transformer import Transformer, check_model
from mixlab.ops import registry
from mixlab.ops.linear import InferenceLinear, can_pack
from mixlab.ops.offload import ExpertCache, SlotFormat
from mixlab.ops.quant import INT4_GROUPS, Int4Linear, Int8Linear, quantize_int4, quantize_int8

QUANTS = ("int8", "int4")


def _replace_linears(model: Transformer, make: type[nn.Module], **kw: object) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, make(child, **kw))


def _plain_experts(block: MoEBlock) -> Experts:
    if type(block.experts) is not Experts:
        raise ValueError(f"the model is already prepared for inference ({EXPERT_FORMATS.get(type(block.experts))} "
                         "experts); prepare a plain model")
    return block.experts


def inference_format(model: nn.Module) -> str | None:
    """What `prepare_for_inference` made of `model` ("int8", "packed", "plain inference"; "offloaded"
    for offloaded experts), or None
    for a plain trainable model: read from the modules' types."""
    kinds = set()
    for m in model.modules():
        if isinstance(m, ExpertsBase) and type(m) is not Experts:
            kinds.add(EXPERT_FORMATS.get(type(m), type(m).__name__))
        elif isinstance(m, Int8Linear):
            kinds.add("int8")
        elif isinstance(m, Int4Linear):
            kinds.add("int4")
        elif isinstance(m, InferenceLinear):
            kinds.add("packed" if m.packed else "plain inference")
    for kind in ("offloaded", "int4", "int8", "packed", "plain inference"):
        if kind in kinds:
            return kind
    return None


def quant_of(model: nn.Module, asked: str) -> str:
    """The quantisation `model`'s matrices run in, as a report or a server states it: int8 / int4 as
    loaded or prepared (a GGUF file's Q4_0 matrices are int4 without --quant), else `asked` (the
    flag's value: "none", or an offloaded model's cache format)."""
    kind = inference_format(model)
    return kind if kind in ("int8", "int4") else asked


def quantize_model_int8(model: Transformer) -> Transformer:
    """Int8 weight-only quantisation of every matrix except embedding and router, in place, the row
    scales in the embeddings' dtype. Matrices already int8 (`load_model(quant="int8")`) are left as they are."""
    act_dtype = model.tok_embeddings.weight.dtype
    for block in model.modules():
        if isinstance(block, MoEBlock) and not isinstance(block.experts, Int8Experts):
            block.experts = Int8Experts.quantize(_plain_experts(block), scale_dtype=act_dtype)
    _replace_linears(model, Int8Linear, scale_dtype=act_dtype)
    model.int8_activations = model.int8_activations  # the new int8 modules take the model's mode
    return model.eval()


def _check_int4_widths(model: Transformer, group: int) -> None:
    """ValueError, naming the first module, unless every float matrix int4 would convert has a
    multiple of `group` inputs per row (checked before anything is converted)."""
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group size must be one of {INT4_GROUPS}, not {group}")
    for name, m in model.named_modules():
        widths = [m.in_features] if isinstance(m, nn.Linear) else []
        if isinstance(m, MoEBlock) and not isinstance(m.experts, Int4Experts):
            widths = [model.config.dim, model.config.ffn_dim]
        bad = [w for w in widths if w % group]
        if bad:
            raise ValueError(f"int4 with groups of {group} needs a multiple of {group} inputs per row; {name} has "
                             f"{bad[0]} (the groups: {', '.join(map(str, INT4_GROUPS))}); the model is unchanged")


def quant_names(model: Transformer, quant: str, *, group: int = 32) -> set[str]:
    """The weights `prepare_for_inference(model, quant=quant, group=group)` quantises, by name: each
    float linear's `...weight`, each float experts' `...experts.w13` / `.w2` (not the embeddings nor the
    routers); int4's after its width checks (a ValueError naming the first module). `model` may be on
    the meta device: what `load_model(quant=)` quantises as it reads each weight (`quantize_weight`)."""
    if quant not in QUANTS:
        raise ValueError(f"unknown quantisation {quant!r}; expected 'int8' or 'int4'")
    if quant == "int4":
        _check_int4_widths(model, group)
    names = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return names | {f"{name}.experts.{w}" for name, m in model.named_modules()
                    if isinstance(m, MoEBlock) and type(m.experts) is Experts for w in ("w13", "w2")}


Quantised = dict[str, tuple[torch.Tensor, torch.Tensor]]  # weight name -> (codes, scales)


def quantize_weight(w: torch.Tensor, quant: str, *, group: int = 32,
                    scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of one weight (a linear's `[X, D]` or stacked experts' `[E, X, D]`) as
    `prepare_for_inference(quant=)` stores it: int8 with row scales in `scale_dtype` (the embeddings'
    dtype, `quantize_model_int8`'s), or packed int4 with float16 scales per `group` inputs."""
    if quant == "int8":
        q, s = quantize_int8(w)
        return q, s.to(scale_dtype)
    return quantize_int4(w, group)


def keep_quantised_modules(model: Transformer, weights: Quantised) -> None:
    """Swap the float modules of `model` holding the weights `weights` names for quantised ones
    holding `weights[name]` = (codes, scales), int8 or packed int4 by the codes' dtype (`quantize_weight`,
    a GGUF file's Q4_0): `Int8Linear` / `Int4Linear`, `Int8Experts` / `Int4Experts` (both of a layer's
    expert weights at once)."""
    for name, (q, s) in weights.items():
        owner_name, attr = name.rsplit(".", 1)
        int8 = q.dtype == torch.int8
        if attr == "weight":  # a linear
            parent_name, child = owner_name.rsplit(".", 1) if "." in owner_name else ("", owner_name)
            linear = Int8Linear.from_quantised(q, s) if int8 else Int4Linear.from_packed(q, s)
            setattr(model.get_submodule(parent_name), child, linear)
        elif attr == "w13":  # stacked experts: w13 and w2 together
            block = model.get_submodule(owner_name.removesuffix(".experts"))
            assert isinstance(block, MoEBlock)
            block.experts = (Int8Experts if int8 else Int4Experts)(q, s, *weights[owner_name + ".w2"])
    model.int4_activations = model.int4_activations  # the new int4 modules take the model's mode
    model.int8_activations = model.int8_activations  # and the int8 ones


def quantised_buffers(model: Transformer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes and scales of weight `name` of `model`, kept quantised (`keep_quantised_modules`)."""
    owner_name, attr = name.rsplit(".", 1)
    owner = model.get_submodule(owner_name)
    return getattr(owner, attr), getattr(owner, "scale" if attr == "weight" else f"{attr}_scale")


def quantize_model_int4(model: Transformer, *, group: int = 32) -> Transformer:
    """Int4 weight-only quantisation (groups of `group` inputs) of every matrix except embedding and
    router, in place. Matrices already int4 (loaded from a GGUF Q4_0 file) are left as they are.
    Every matrix's input width is checked first: a refusal leaves the model unconverted."""
    _check_int4_widths(model, group)
    for block in model.modules():
        if isinstance(block, MoEBlock) and not isinstance(block.experts, Int4Experts):
            block.experts = Int4Experts.quantize(_plain_experts(block), group=group)
    _replace_linears(model, Int4Linear, group=group)
    model.int4_activations = model.int4_activations  # the new int4 modules take the model's mode
    return model.eval()


def pack_model(model: Transformer, *, packed: bool = True) -> Transformer:
    """Route every matrix except embedding and router through `ops.linear.linear`, in place;
    `packed`: in oneDNN's layout (experts: `PackedExperts`, one packed matrix per expert)."""
    packed = packed and can_pack(model.output.weight)
    with torch.no_grad():
        if packed:
            for block in model.modules():
                if isinstance(block, MoEBlock):
                    block.experts = PackedExperts(_plain_experts(block))
        _replace_linears(model, InferenceLinear, packed=packed)
    return model.eval().requires_grad_(False)


def is_quantised(model: Transformer) -> bool:
    """Whether some matrix of `model` already holds int4 weights (e.g. loaded from a GGUF Q4_0 file)."""
    return any(isinstance(m, Int4Experts | Int4Linear) for m in model.modules())


def int4_groups(model: Transformer) -> set[int]:
    """The group sizes of the int4 weights `model` already holds (a GGUF Q4_0 file: {32})."""
    groups = {m.group for m in model.modules() if isinstance(m, Int4Linear)}
    groups |= {2 * m.w13.shape[-1] // m.w13_scale.shape[-1] for m in model.modules() if isinstance(m, Int4Experts)}
    cache = expert_cache(model)
    if cache is not None and cache.fmt.kind == "int4":
        groups.add(cache.fmt.group)
    return groups


def prepare_for_inference(model: Transformer, *, quant: str | None = None, packed: bool | None = None,
                          group: int = 32, int4_activations: str | None = None, int8_activations: str | None = None,
                          decoder: bool = True) -> Transformer:
    """The fast CPU inference form of `model`, in place: native batch-1 decoding on plain (or int8 /
    int4, `quant=`) weights when the native kernels are available, else (or with `packed=True`)
    oneDNN-packed weights. `group`: inputs per int4 scale (32, 64 or 128). A model that already holds
    int4 weights (a GGUF Q4_0 file) keeps them; with `quant="int4"` its float matrices become int4
    too, in the same groups (another `group` is refused), else they stay as they are. A model
    holding int8 weights (`load_model(quant="int8")`, or prepared with `quant="int8"` before) keeps
    them, with `quant=None` or `"int8"`. Any other prepared model is refused. `int4_activations`: how
    int4 weights multiply activations in every path (native decoding and PyTorch's pass), "int8"
    (rounded to int8 per block of 32, as llama.cpp does; the default, fast) or "float32" (exact; what
    offloaded experts always do, so "int8" is refused for them); see `mixlab.model.native`.
    `int8_activations`: the same for int8 weights, "float32" (exact; the default) or "int8" (as
    llama.cpp's Q8_0 x Q8_0: faster where int8 is compute-bound, e.g. at Mixtral's widths).
    `decoder=False`: no native whole-model decoder is attached (expert parallelism: each process holds a
    share of the experts and its MoE layers exchange rows by all-to-all in PyTorch's forward, which the
    decoder would bypass); without one, float weights are packed."""
    check_model(model)
    if quant not in (None, *QUANTS):
        raise ValueError(f"unknown quantisation {quant!r}; expected None, 'int8' or 'int4'")
    if packed is not None and not isinstance(packed, bool):  # "no" is truthy: it packed the weights
        raise ValueError(f"packed must be True, False or None, not {packed!r}")
    if group != 32 and quant != "int4":  # it would be ignored
        raise ValueError(f"group={group!r} sets int4's inputs per scale: pass quant='int4' with it")
    if int4_activations is not None:
        if int4_activations not in native.INT4_ACTIVATIONS:
            raise ValueError(f"int4_activations must be one of {', '.join(native.INT4_ACTIVATIONS)}, "
                             f"not {int4_activations!r}")
    if int8_activations is not None and int8_activations not in native.INT8_ACTIVATIONS:
        raise ValueError(f"int8_activations must be one of {', '.join(native.INT8_ACTIVATIONS)}, "
                         f"not {int8_activations!r}")
    # An adapter model's linears are not `nn.Linear`s and its experts are parametrised: no format
    # would convert them (int8 said "already prepared", the default failed inside the native decoder).
    adapter = next((name for name, _ in model.named_parameters() if name.endswith(("lora_A", "lora_B"))), None)
    if adapter is not None:
        raise ValueError(f"the model holds LoRA adapters ({adapter}): merge them into a plain model first "
                         "(model = mixlab.train.lora.merge(model)), then prepare that")
    cache = expert_cache(model)
    prepared = inference_format(model)
    if quant is None and (cache.fmt.kind if cache is not None else prepared) == "int8":  # held int8 weights
        quant = "int8"  # stay, as held int4 ones do
    held_int8 = prepared == "int8" and quant == "int8"  # loaded int8 (`load_model(quant="int8")`): attached now
    if cache is None and prepared is not None and not (prepared == "int4" and is_quantised(model)) and not held_int8:
        raise ValueError(f"the model is already prepared for inference ({prepared} weights); prepare a plain model")
    if quant == "int4" and (held := int4_groups(model)) and held != {group}:  # one group for the native step
        raise ValueError(f"this model already holds int4 weights in groups of {', '.join(map(str, sorted(held)))} "
                         f"(GGUF Q4_0: 32); quant='int4' converts its float matrices in the same groups, not "
                         f"{group}: pass group={min(held)}")
    if int4_activations is not None and quant != "int4" and not is_quantised(model):  # it would do nothing
        raise ValueError(f"int4_activations={int4_activations!r} applies to int4 weights: pass quant='int4' "
                         "(--quant int4), or a model holding them (a GGUF Q4_0 file)")
    if cache is not None and int4_activations == "int8":  # it would be ignored: no native whole-model step
        raise ValueError("int4_activations='int8' applies to resident models: offloaded experts run per-layer "
                         "kernels that multiply exact float32 activations (what 'float32' gives a resident model)")
    if int8_activations is not None and quant != "int8":  # it would do nothing
        raise ValueError(f"int8_activations={int8_activations!r} applies to int8 weights: pass quant='int8' "
                         "(--quant int8), or a model holding them (load_model(quant='int8'))")
    if cache is not None and int8_activations == "int8":  # as int4's: no native whole-model step
        raise ValueError("int8_activations='int8' applies to resident models: offloaded experts run per-layer "
                         "kernels that multiply exact float32 activations (what 'float32' gives a resident model)")
    if int8_activations == "int8":  # rounded per block of 32: every product's input width
        cfg = model.config
        widths = {"dim": cfg.dim, "n_heads * head_dim": cfg.n_heads * cfg.head_dim, "ffn_dim": cfg.ffn_dim}
        if bad := [f"{k} {v}" for k, v in widths.items() if v % 32]:
            raise ValueError(f"int8_activations='int8' rounds activations per block of 32 inputs: needs widths "
                             f"that are multiples of 32, not {', '.join(bad)}")
    if int4_activations is not None:  # set once the model is known to be preparable
        model.int4_activations = int4_activations
    if int8_activations is not None:
        model.int8_activations = int8_activations
    # The engine's decoder over the unprepared weights (an earlier `generate`) would keep them alive
    # once they are converted: the prepared model gets its own.
    native.forget_shared(model)
    if cache is not None:
        return _prepare_offloaded(model, cache, quant=quant, packed=packed, group=group)
    if is_quantised(model):
        if quant == "int8":
            raise ValueError("this model already holds int4 weights; int8 applies to float models")
        if packed:
            raise ValueError("packed=True applies to float weights; this model holds int4 weights")
        if quant is None:
            model.eval().requires_grad_(False)
            floats = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
            # the native step takes one weight format (without the kernels at all, there is nothing to say)
            if decoder and not native.attach(model, warn=not floats) and floats and registry.prepare_native():
                warnings.warn(f"no native decoding: this model mixes int4 and float matrices ({floats[0]} is float: "
                              "llama.cpp's quantiser keeps output.weight at Q6_K / Q8_0, read dequantised), so it "
                              "decodes with PyTorch's kernels, several times slower; quant='int4' (--quant int4) "
                              "makes those int4 too", stacklevel=2)
            return model
    if quant is not None:
        if packed:
            raise ValueError(f"packed=True applies to float weights; {quant} weights are not packed")
        if quant == "int8":
            quantize_model_int8(model)
        else:
            quantize_model_int4(model, group=group)
        model.requires_grad_(False)
        if decoder:
            native.attach(model)
        return model
    if packed is None:
        packed = not (decoder and native.attach(model))
    elif not packed and decoder:
        native.attach(model)
    return pack_model(model, packed=packed)


def _prepare_offloaded(model: Transformer, cache: ExpertCache, *, quant: str | None, packed: bool | None,
                       group: int) -> Transformer:
    """`prepare_for_inference` for a model whose experts are offloaded: the cache's slots take the
    format, the linears are converted as for a resident model."""
    held_int8 = quant == "int8" and cache.fmt.kind == "int8"  # loaded int8 (`load_model(quant="int8")`)
    if any(isinstance(m, InferenceLinear) or (isinstance(m, Int8Linear) and not held_int8) for m in model.modules()):
        raise ValueError("the model is already prepared for inference; prepare a freshly loaded model")
    if quant == "int8" and is_quantised(model):
        raise ValueError("this model already holds int4 weights; int8 applies to float models")
    if packed:
        raise ValueError("packed=True packs resident experts; this model's experts are offloaded")
    act_dtype = model.tok_embeddings.weight.dtype
    if quant == "int4":  # every width first: a refusal leaves the cache's format and the linears as they were
        _check_int4_widths(model, group)
    if cache.fmt.kind == "int4":  # a GGUF Q4_0 file: its experts stay int4, as resident ones would
        if quant == "int8":
            raise ValueError("this model already holds int4 weights; int8 applies to float models")
        if quant == "int4":
            _replace_linears(model, Int4Linear, group=group)
    elif quant == "int8":
        if not held_int8:
            cache.set_format(SlotFormat("int8", act_dtype))
        _replace_linears(model, Int8Linear, scale_dtype=act_dtype)
    elif quant == "int4":
        cache.set_format(SlotFormat("int4", act_dtype, group))
        _replace_linears(model, Int4Linear, group=group)
    else:
        native_ok = registry.prepare_native()
        with torch.no_grad():
            _replace_linears(model, InferenceLinear, packed=not native_ok and can_pack(model.output.weight))
    if is_quantised(model):  # no native step rounds activations: exact ones, as the offloaded experts take
        model.int4_activations = "float32"
    model.int8_activations = "float32"  # the same for int8 (its default)
    cache.check()
    registry.prepare_native()  # the per-layer kernels on the cache's slots
    return model.eval().requires_grad_(False)


def is_offloaded(model: nn.Module) -> bool:
    """Whether `model`'s experts are offloaded (`load_model(..., max_memory=)`)."""
    return any(isinstance(m, OffloadedExperts) for m in model.modules())
