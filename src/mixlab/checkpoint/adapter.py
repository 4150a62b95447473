"""Merge a PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`, as PEFT's
`save_pretrained`, TRL and mixlab's own `save_peft` write it) into a loaded model's weights.

Shape legend: E experts, X output rows, I input columns, r rank.

Each adapted weight W (transformers' name) becomes W + s B A, computed in float32 and cast back to
the model's dtype, with s = alpha / r (alpha / sqrt(r) with `use_rslora`; r and alpha per module from
`rank_pattern` / `alpha_pattern`, matched as PEFT matches them). PEFT's tensor names are the base
model's module names: `base_model.model.{module}.lora_A.weight`. The weight they adapt is found in
`peft_weights`, keymaps.py's transformers tables ("hf": `block_sparse_moe.experts.N.w1`,
`block_sparse_moe.gate`, Mistral's `mlp.gate_proj`; "hf-fused", transformers >= 5:
`mlp.experts.gate_up_proj` / `down_proj` and `mlp.gate.weight` as PEFT `target_parameters`), whose
views of mixlab's fused tensors take the update, so q/k/v rows land in `wqkv` and w1/w3 in `w13`
exactly as a checkpoint is loaded. The same table names what `train.lora.peft_tensors` exports, so
an adapter mixlab writes is one it reads.
A parameter target (PEFT's ParamWrapper on a 3-D `[E, X, I]` weight) holds lora_A `[E*r, I]`
expert-major and lora_B `[X, r*E]` expert-minor (peft/tuners/lora/layer.py, "o r e, e r i -> e o i");
two such targets on one module are nested (`experts.base_layer.lora_A`), told apart by their shapes.

Everything is checked before any weight changes: an unknown tensor, a shape or rank that does not
fit, a feature not supported here (DoRA, `modules_to_save`, trained biases, `lora_bias`,
`layer_replication`, embedding or lm_head targets) is a CheckpointError naming the file, the tensor
and what was expected. `fan_in_fan_out` does not apply: every target is an nn.Linear or a parameter,
for which PEFT turns it off itself.

`adapter_factors` keeps the update apart from the weights instead (serving several adapters over one
base, the engine's `adapters=`): per adapted mixlab weight, factors A and B with W x + B (A x) = the
merged weight's W' x, after the same checks.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixlab.checkpoint.io import (
    FLOAT_DTYPES,
    PICKLE_SUFFIXES,
    CheckpointError,
    TensorInfo,
    TensorReader,
    _pickle_hint,
    all_finite,
    read_header,
)
from mixlab.checkpoint.keymaps import Rule, rules
from mixlab.config import ModelConfig, as_path, suffix_of
from mixlab.model import Transformer
from mixlab.model.inference import inference_format

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
_UNSUPPORTED_TARGETS = ("embed_tokens", "lm_head")
# PEFT initialisations that subtract their first B0 A0 from the base weights (peft/tuners/lora/layer.py:
# pissa_init, olora_init, corda_init, loftq_init), and LoRA variants whose update is not W + s B A
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
_VARIANTS = {"alora_invocation_tokens": "activated LoRA (aLoRA) adapts only the tokens after its invocation tokens",
             "arrow_config": "Arrow routes each token to its own choice of LoRA adapters",
             "use_bdlora": "block-diagonal LoRA factors", "kasa_config": "KaSA's singular-value update",
             "use_qalora": "QA-LoRA adapts group-pooled inputs"}


@dataclass(frozen=True)
class PeftWeight:
    """A transformers weight a LoRA adapter can adapt: part `part` of keymaps.py's `rule`. `param`: PEFT
    adapts it as a `target_parameters` entry (transformers >= 5's experts and router are bare
    parameters, not nn.Linear modules), else as its module's weight (`target_modules`)."""

    rule: Rule
    part: int
    param: bool


def peft_weights(config: ModelConfig, fmt: str) -> dict[str, PeftWeight]:
    """Every weight a PEFT LoRA adapter may adapt in transformers' Mixtral / Mistral layout `fmt` ("hf":
    transformers < 5, per-expert nn.Linear modules; "hf-fused": >= 5), by transformers name
    (`model.layers.0.self_attn.q_proj.weight`, `model.layers.0.mlp.experts.gate_up_proj`): the matrices
    of keymaps.py's table but the embedding and lm_head. Import and export read PEFT's names here."""
    return {name: PeftWeight(r, k, fmt == "hf-fused" and config.moe is not None and ".ffn." in r.ours)
            for r in rules(config, fmt) for k, name in enumerate(r.theirs)
            if len(r.shapes[k]) > 1 and not any(t in name for t in _UNSUPPORTED_TARGETS)}


@dataclass(frozen=True)
class Adapter:
    """A PEFT adapter folder as `read_adapter` read and checked it (no tensor data read)."""

    root: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]  # adapter_model.safetensors' header


@dataclass(frozen=True)
class _Target:
    """One LoRA pair: tensors `a` / `b` adapting part `part` of `rule` (a transformers weight `name`)."""

    a: str
    b: str
    rule: Rule
    part: int
    name: str
    experts: int  # E of a parameter target's [E, X, I] weight; 0 for a 2-D weight
    rank: int
    scale: float


def _pattern_key(patterns: dict[str, Any], key: str) -> str | None:
    # PEFT's get_pattern_key (peft/utils/other.py): the first pattern that matches the name's end.
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", key)), None)


def _read_config(root: Path) -> dict[str, Any]:
    path = root / CONFIG
    if not root.is_dir():
        if root.is_file():
            raise CheckpointError(f"{root}: a file, not an adapter folder: pass the folder holding {CONFIG} and "
                                  f"{WEIGHTS}")
        from mixlab.checkpoint import hub_hint  # not at the top: checkpoint/__init__.py imports this module

        raise CheckpointError(f"{root}: no such adapter folder{hub_hint(root)}")
    if not path.is_file():
        hint = (f"; a mixlab fine-tuning run keeps its adapter in {root / 'adapter'}"
                if (root / "adapter" / CONFIG).is_file() else "")
        raise CheckpointError(f"{root}: not a PEFT adapter folder (no {CONFIG}){hint}")
    try:
        conf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:  # json's own error for '[[[[...'
        raise CheckpointError(f"{path}: JSON nested too deeply") from None
    if not isinstance(conf, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(conf).__name__}")
    return conf


def _check_config(path: Path, conf: dict[str, Any]) -> None:
    """Refuse, naming the field, what the merge would get wrong."""
    if conf.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {conf.get('peft_type')!r}; mixlab merges LoRA adapters "
                              "(peft_type 'LORA') only")
    def positive(v: Any) -> bool:  # an infinite alpha (JSON's Infinity) merged into weights of inf and NaN
        return not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) and v > 0

    for field in ("r", "lora_alpha"):
        v = conf.get(field)
        if not positive(v):
            raise CheckpointError(f"{path}: field {field!r} is {v!r}; expected a finite positive number")
    for field, what in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):
        pat = conf.get(field) or {}
        bad = {k: v for k, v in pat.items() if not positive(v)} if isinstance(pat, dict) else pat
        if bad:
            raise CheckpointError(f"{path}: field {field!r} is {pat!r}; expected a mapping of module name "
                                  f"patterns to a finite positive {what}")
        for key in pat:  # a pattern is a regular expression (PEFT's re.match): a bad one raised re.error deep down
            try:
                re.compile(key)
            except re.error as e:
                raise CheckpointError(f"{path}: field {field!r}: key {key!r} is not a valid regular expression "
                                      f"({e})") from None
    init = conf.get("init_lora_weights", True)
    if isinstance(init, str) and init.split("_niter_")[0] in _BASE_CHANGING_INITS:
        raise CheckpointError(f"{path}: init_lora_weights is {init!r}: that initialisation changes the base weights "
                              "the adapter is trained over (W - s B0 A0, which PEFT recomputes when it loads it), so "
                              "it does not apply to the checkpoint's own weights; save it converted to plain LoRA "
                              "(PEFT's save_pretrained(dir, path_initial_model_for_weight_conversion=...)), or merge "
                              "it with PEFT (merge_and_unload, then save_pretrained) and load the merged checkpoint")
    for field, what in _VARIANTS.items():
        if conf.get(field):
            raise CheckpointError(f"{path}: {field} is {conf[field]!r}: {what}, not the plain update W + s B A that "
                                  "mixlab merges; not supported")
    if conf.get("use_dora"):
        raise CheckpointError(f"{path}: use_dora is true: DoRA adapters (a magnitude per output row) are not "
                              "supported; merge it with PEFT (merge_and_unload, then save_pretrained) and load "
                              "the merged checkpoint")
    if conf.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: bias is {conf['bias']!r}: adapters that train biases are not supported "
                              "(mixlab's models have no biases); expected 'none'")
    if conf.get("lora_bias"):
        raise CheckpointError(f"{path}: lora_bias is true: a bias on lora_B is not supported (mixlab's models have "
                              "no biases); expected false")
    if conf.get("layer_replication"):
        raise CheckpointError(f"{path}: layer_replication is {conf['layer_replication']!r}: adapters over "
                              "duplicated layers are not supported; merge it with PEFT (merge_and_unload, then "
                              "save_pretrained) and load the merged checkpoint")
    if conf.get("modules_to_save"):
        raise CheckpointError(f"{path}: modules_to_save is {conf['modules_to_save']!r}: adapters holding whole "
                              "trained modules are not supported; merge it with PEFT (merge_and_unload, then "
                              "save_pretrained) and load the merged checkpoint")
    targets = conf.get("target_modules") or []
    names = [targets] if isinstance(targets, str) else targets
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):  # 5: a TypeError traceback
        raise CheckpointError(f"{path}: target_modules is {targets!r}; expected a module name or a list of them")
    for t in _UNSUPPORTED_TARGETS:
        if any(t in n for n in names):
            raise CheckpointError(f"{path}: target_modules {targets!r} adapts {t}: LoRA on the embedding or "
                                  "lm_head is not supported; expected attention, MLP / expert and router targets")


def _pairs(file: Path, keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """PEFT module name -> {"A": tensor name, "B": tensor name}; CheckpointError for any other tensor."""
    pairs: dict[str, dict[str, str]] = {}
    for key in keys:
        m = _KEY.fullmatch(key)
        if m is None:
            merge = "; merge it with PEFT (merge_and_unload, then save_pretrained) and load the merged checkpoint"
            what = ("an embedding adapter: not supported" if "lora_embedding" in key else
                    "a DoRA magnitude: not supported" if "lora_magnitude" in key else
                    f"trainable token embeddings (PEFT's trainable_token_indices): not supported{merge}"
                    if "trainable_tokens" in key else
                    "a whole embedding or lm_head matrix (PEFT's save_embedding_layers, for a resized vocabulary): "
                    f"not supported{merge}" if key.endswith(("embed_tokens.weight", "lm_head.weight")) else
                    "expected only base_model.model.<module>.lora_A.weight / lora_B.weight")
            raise CheckpointError(f"{file}: unexpected tensor {key!r}: {what}")
        pairs.setdefault(m["module"], {})[m["ab"]] = key
    if not pairs:
        raise CheckpointError(f"{file}: holds no LoRA tensors")
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            have, miss = ("lora_A", "lora_B") if "A" in ab else ("lora_B", "lora_A")
            raise CheckpointError(f"{file}: {next(iter(ab.values()))!r} has no {miss} partner "
                                  f"(base_model.model.{module}.{miss}.weight); a {have} alone is no adapter")
    return pairs


def _targets(model: Transformer, root: Path, conf: dict[str, Any],
             shapes: dict[str, tuple[int, ...]]) -> list[_Target]:
    """Every LoRA pair of the adapter, matched to a weight of `model` and checked (shapes, rank)."""
    file = root / WEIGHTS
    made_for = conf.get("base_model_name_or_path")
    made = f" (the adapter was made for {made_for})" if made_for else ""
    cfg = model.config
    kind = (f"{'a Mixtral' if cfg.moe else 'a dense Mistral'} model of {cfg.n_layers} layers, dim {cfg.dim}"
            + (f", {cfg.moe.num_experts} experts" if cfg.moe else ""))
    # both layouts, as PEFT names modules after the installed transformers
    table = {name: (w.rule, w.part) for fmt in ("hf", "hf-fused") for name, w in peft_weights(cfg, fmt).items()}
    rank_pat, alpha_pat = conf.get("rank_pattern") or {}, conf.get("alpha_pattern") or {}
    params = conf.get("target_parameters") or []
    out: list[_Target] = []
    for module, ab in sorted(_pairs(file, shapes).items()):
        a, b = shapes[ab["A"]], shapes[ab["B"]]
        plain = module.replace(".base_layer", "")  # PEFT nests a module's several parameter targets
        # the module's own weight, or (parameter targets) the parameters held right on it
        candidates = [n for n in table if n.rpartition(".")[0] == plain]
        if not candidates:
            if any(n.rpartition(".")[0] == plain for r in rules(cfg, "hf") for n in r.theirs):  # a norm's weight
                raise CheckpointError(f"{file}: tensor {ab['A']!r} adapts {plain!r}, which LoRA cannot adapt here: "
                                      "expected attention, MLP / expert and router matrices")
            raise CheckpointError(f"{file}: tensor {ab['A']!r} adapts {plain!r}, which is not a weight of this "
                                  f"model ({kind}){made}")
        fits = []
        for name in candidates:
            rule, part = table[name]
            shape = rule.shapes[part]
            E = shape[0] if len(shape) == 3 else 0
            X, In = shape[-2:]
            if len(a) == 2 and len(b) == 2 and a[1] == In and b[0] == X and a[0] == b[1] and a[0] % max(E, 1) == 0:
                fits.append((name, rule, part, E, a[0] // max(E, 1)))
        if len(fits) != 1:
            want = "; ".join(f"{n} {list(s)}: lora_A [{'E r' if len(s) == 3 else 'r'}, {s[-1]}], lora_B [{s[-2]}, "
                             f"{'r E' if len(s) == 3 else 'r'}]"
                             for n in candidates for s in [table[n][0].shapes[table[n][1]]])
            raise CheckpointError(f"{file}: {ab['A']!r} {list(a)} and {ab['B']!r} {list(b)} do not fit {want}"
                                  f"{made}")
        name, rule, part, E, r = fits[0]
        # PEFT's name for rank_pattern / alpha_pattern: module.parameter for a parameter target, else the module
        key = name if any(name == t or name.endswith("." + t) for t in params) else name.removesuffix(".weight")
        want_r = rank_pat[p] if (p := _pattern_key(rank_pat, key)) is not None else conf["r"]
        if r != want_r:
            raise CheckpointError(f"{file}: {ab['A']!r} has rank {r}, but {CONFIG} gives {key} r={want_r} "
                                  f"({'rank_pattern' if p is not None else 'r'})")
        alpha = alpha_pat[p] if (p := _pattern_key(alpha_pat, key)) is not None else conf["lora_alpha"]
        scale = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
        out.append(_Target(ab["A"], ab["B"], rule, part, name, E, r, scale))
    return out


def read_adapter(path: str | Path) -> Adapter:
    """The PEFT adapter folder `path` (adapter_config.json checked, adapter_model.safetensors' header
    and names checked), or CheckpointError; reads no tensor data, needs no model."""
    root = as_path(path, what="the adapter path").expanduser()
    if root.is_file() and suffix_of(root) in PICKLE_SUFFIXES:
        raise CheckpointError(_pickle_hint(root))
    conf = _read_config(root)
    _check_config(root / CONFIG, conf)
    file = root / WEIGHTS
    if not file.is_file():
        pickled = next((root / n for n in ("adapter_model.bin", "adapter_model.pt") if (root / n).is_file()), None)
        if pickled is not None:
            raise CheckpointError(f"{_pickle_hint(pickled)} For an adapter: load it with peft "
                                  "(PeftModel.from_pretrained) and save_pretrained(dir), which writes "
                                  f"{WEIGHTS}.")
        raise CheckpointError(f"{root}: {CONFIG} without {WEIGHTS}")
    infos = read_header(file)
    _pairs(file, infos)
    for name, info in infos.items():  # an integer or bool factor was merged as if it were float
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {info.dtype}, expected a floating-point dtype "
                                  f"({', '.join(FLOAT_DTYPES)})")
    return Adapter(root, conf, infos)


def _local_part(w: torch.Tensor, t: _Target, experts: range) -> torch.Tensor | None:
    """The part of stacked expert weight `t.rule.ours` that `t` adapts, as a view of `w`, which holds
    experts `experts` of it only (expert parallelism's share): a parameter target's [E, X, I] narrowed
    to them; a module target's one expert's matrix, or None for another process's expert."""
    v = t.rule.parts(torch.empty(t.rule.shape, device="meta"))[t.part]  # where the part lies in the whole
    per = math.prod(t.rule.shape[1:])  # elements per expert
    if t.experts:
        v = v[experts.start:experts.stop]
    elif v.storage_offset() // per not in experts:
        return None
    return w.as_strided(v.shape, v.stride(), w.storage_offset() + v.storage_offset() - experts.start * per)


@dataclass(frozen=True)
class LowRank:
    """An adapter's update to one weight of the model, held apart from it: rows x that the weight
    multiplies get y += (x @ A.T) @ B.T, the scale s folded into B (float32). A matrix [X, I]: A [R, I],
    B [X, R]; stacked experts [E, X, I]: A [E, R, I], B [E, X, R], expert e's pair at index e (zeros for
    experts the adapter leaves alone). R sums the ranks of the weight's adapted parts (q, k, v of
    `wqkv`; w1, w3 of an expert's `w13`), each part's B non-zero on its own rows only."""

    A: torch.Tensor
    B: torch.Tensor


@torch.no_grad()
def adapter_factors(model: Transformer, path: str | Path | Adapter) -> dict[str, LowRank]:
    """The PEFT LoRA adapter in folder `path` (or as `read_adapter` read it) as low-rank updates of
    `model`'s weights, by mixlab name (`layers.0.attn.wqkv.weight`, `layers.0.ffn.experts.w13`): what
    `merge_adapter` adds to them, kept apart. The same checks (a CheckpointError naming the file, tensor
    or field of anything that does not fit the model); the weights themselves are not read, so they
    may be in any format (int8, int4, prepared)."""
    adapter = path if isinstance(path, Adapter) else read_adapter(path)
    file = adapter.root / WEIGHTS
    if hasattr(model, "_lora"):
        raise CheckpointError(f"{adapter.root}: the model is a LoRA model (train.lora.apply_lora): merge its own "
                              "adapters first (train.lora.merge)")
    targets = _targets(model, adapter.root, adapter.config, {k: v.shape for k, v in adapter.tensors.items()})
    device = model.tok_embeddings.weight.device
    # (mixlab weight, expert or None) -> its adapted parts: (first output row, A [r, I], s B [X, r])
    parts: dict[tuple[str, int | None], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    with TensorReader(adapter.tensors) as reader:
        for t in targets:
            A = reader.get(t.a).to(device, torch.float32)
            B = reader.get(t.b).to(device, torch.float32) * t.scale
            if not (all_finite(A) and all_finite(B)):  # as merge_adapter warns
                warnings.warn(f"{file}: tensor {t.a!r} or {t.b!r} holds NaN or Inf values (or their product "
                              "overflows); the model's outputs will be NaN", stacklevel=2)
            shape = shapes[t.rule.ours] = t.rule.shape
            # where the part lies in the whole: its first element, and the elements of a row and of an expert
            at = int(t.rule.parts(torch.empty(shape, device="meta"))[t.part].storage_offset())
            cols, per = shape[-1], math.prod(shape[1:])
            if len(shape) == 2:
                parts.setdefault((t.rule.ours, None), []).append((at // cols, A, B))
            elif t.experts:  # a parameter target: every expert's factors in one pair (see the module docstring)
                E, r = t.experts, t.rank
                A_ErI, B_XrE = A.view(E, r, cols), B.view(B.shape[0], r, E)
                for e in range(E):
                    parts.setdefault((t.rule.ours, e), []).append((at % per // cols, A_ErI[e], B_XrE[:, :, e]))
            else:  # one expert's module
                parts.setdefault((t.rule.ours, at // per), []).append((at % per // cols, A, B))
    out: dict[str, LowRank] = {}
    for name, shape in shapes.items():
        mine = {e: ps for (n, e), ps in parts.items() if n == name}
        R = max(sum(a.shape[0] for _, a, _ in ps) for ps in mine.values())
        A = torch.zeros(*shape[:-2], R, shape[-1], device=device)
        B = torch.zeros(*shape[:-1], R, device=device)
        for expert, ps in mine.items():
            a_RI, b_XR = (A, B) if expert is None else (A[expert], B[expert])
            c = 0
            for row, a, b in ps:
                a_RI[c : c + len(a)] = a
                b_XR[row : row + len(b), c : c + len(a)] = b
                c += len(a)
        out[name] = LowRank(A, B)
    return out


@torch.no_grad()
def merge_adapter(model: Transformer, path: str | Path | Adapter, *, experts: range | None = None) -> Transformer:
    """Merge the PEFT LoRA adapter in folder `path` (or as `read_adapter` read it) into `model`'s weights
    (in place; returns it). Raises CheckpointError naming the file, tensor or field of anything that does
    not fit the model; then no weight has changed. `experts`: the model holds only these experts of
    each MoE layer (expert parallelism's share, `parallel.expert.local_experts`): the adapter's expert
    factors are narrowed to them, and another process's experts' factors are not read."""
    adapter = path if isinstance(path, Adapter) else read_adapter(path)
    root, conf, infos = adapter.root, adapter.config, adapter.tensors
    file = root / WEIGHTS
    fmt = inference_format(model)
    if fmt is not None or hasattr(model, "_lora"):
        if fmt == "int4":  # a GGUF file's Q4_0 matrices load as int4
            raise CheckpointError(f"{root}: the model's weights are int4 (a Q4_0 GGUF file's, or quantised): an "
                                  "adapter merges into float weights; load a float checkpoint (or an f32 / f16 / "
                                  "bf16 GGUF file) with the adapter, then quantise (--quant int4)")
        what = f"prepared for inference ({fmt})" if fmt else "a LoRA model"
        raise CheckpointError(f"{root}: the model is {what}; merge an adapter into the weights as loaded "
                              "(load_model(..., adapter=DIR) merges before any quantisation)")
    targets = _targets(model, root, conf, {k: v.shape for k, v in infos.items()})
    params = dict(model.named_parameters())
    for t in targets:
        p = params.get(t.rule.ours)
        if p is None or not p.dtype.is_floating_point:
            raise CheckpointError(f"{file}: {t.a!r} adapts {t.name}, which this model holds "
                                  f"{'quantised' if p is None else 'as ' + str(p.dtype)}; load float weights to "
                                  "merge an adapter")
        if experts is not None and ".ffn.experts." in t.rule.ours and (p.shape[0] != len(experts)
                                                                       or not p.is_contiguous()):
            raise ValueError(f"experts={experts}: the model's {t.rule.ours} holds {p.shape[0]} experts; expected "
                             f"{len(experts)} (a contiguous tensor)")
    with TensorReader(infos) as reader:
        for t in targets:
            w = params[t.rule.ours].data
            mine = experts if ".ffn.experts." in t.rule.ours else None  # a share of the experts, or all
            view = t.rule.parts(w)[t.part] if mine is None else _local_part(w, t, mine)
            if view is None:
                continue
            A, B = reader.get(t.a).to(w.device, torch.float32), reader.get(t.b).to(w.device, torch.float32)
            updates: Iterable[tuple[torch.Tensor, torch.Tensor]]
            if t.experts:  # one expert at a time: float32 temporaries of one expert's matrix, not of all E
                E, r = t.experts, t.rank
                B_XrE, A_ErI = B.view(B.shape[0], r, E), A.view(E, r, A.shape[1])
                ids = range(E) if mine is None else mine  # the experts `view` holds
                updates = ((view[i], B_XrE[:, :, e] @ A_ErI[e]) for i, e in enumerate(ids))
            else:
                updates = [(view, (B @ A).view(view.shape))]
            finite = True
            for v, delta in updates:
                finite = finite and all_finite(delta)
                v.copy_(v.float() + t.scale * delta)
            if not finite:  # as a checkpoint's own NaN weights are told
                warnings.warn(f"{file}: tensor {t.a!r} or {t.b!r} holds NaN or Inf values (or their product "
                              "overflows); the model's outputs will be NaN", stacklevel=3)
    return model
