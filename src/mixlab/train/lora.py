"""LoRA (Hu et al. 2021, arXiv 2106.09685) on attention, every expert and optionally the router, on a
frozen base held in float32, bfloat16, int8 or int4 (QLoRA-style, Dettmers et al. 2023: the base is
only read, dequantised on the fly); merging; and export in PEFT's format with transformers' Mixtral names.

Shape legend: E experts, D width, F expert FFN width, X output rows, I input columns, r rank.

A target W (`[X, I]`) becomes W + (alpha / r) B A with A `[r, I]` (PEFT's Kaiming-uniform init) and
B `[X, r]` = 0, so a fresh adapter leaves the model's function unchanged.

* Attention: `wqkv` and `wo` become `LoRALinear` modules: y = x W^T + s B A dropout(x)^T. mixlab's
  fused `wqkv` shares one A across q, k and v; transformers' separate q_proj / k_proj / v_proj get
  that A each and their rows of B, which is the same function (PEFT can express it exactly).
* Experts: the stacked `w13` `[E, 2F, D]` and `w2` `[E, D, F]` get factors stacked over the expert
  dimension, A `[E, r, I]`, B `[E, X, r]`, applied in weight space through a parametrisation
  (W_e + s B_e A_e, one batched matmul for all experts), so the MoE still runs as one grouped
  computation on ordinary stacked weights (every `moe_ffn` implementation, training's sorted path
  included). Weight space means no dropout on expert inputs (`dropout` applies to attention and
  the router's input is never dropped either). w1 and w3 share A_e like q/k/v.
* Router (optional): `gate.weight` `[E, D]` gets A `[r, D]`, B `[E, r]`, also in weight space.

PEFT export (`save_peft`, `adapter_config.json` + `adapter_model.safetensors`), by the installed
transformers' Mixtral layout:
* transformers >= 5 (fused experts): q/k/v/o_proj as `target_modules`; the experts' `gate_up_proj`
  / `down_proj` and the router's bare `gate.weight` as PEFT `target_parameters` (its ParamWrapper
  holds per-expert factors, exactly ours: lora_A `[E*r, I]`, lora_B `[X, r*E]`).
* transformers < 5: `experts.N.w1/w2/w3` and `block_sparse_moe.gate` are nn.Linear modules.
PEFT allows no dropout on parameter targets, so the exported config says 0 there
(dropout does not change inference).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from mixlab.checkpoint import meta_model, save_model
from mixlab.checkpoint.adapter import peft_weights
from mixlab.checkpoint.io import write_sharded
from mixlab.config import ModelConfig
from mixlab.dtypes import parse_dtype
from mixlab.model import Transformer, check_model
from mixlab.model.moe import MoEBlock
from mixlab.model.transformer import Block
from mixlab.ops.quant import QK, dequantize, quantize_int4, quantize_int8

TARGETS = ("attention", "experts", "router")
BASE_DTYPES = ("float32", "bfloat16", "int8", "int4")


# PEFT's target_modules names (transformers' Mixtral and Mistral) and the mixlab target each lies in: a
# PEFT user's `--lora-targets q_proj,v_proj` is told which groups to name.
PEFT_MODULES = {**dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj"), "attention"),
                **dict.fromkeys(("w1", "w2", "w3", "gate_proj", "up_proj", "down_proj", "gate_up_proj"), "experts"),
                "gate": "router"}


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attention", "experts")  # also "attention,router", as FinetuneConfig's
    base_dtype: str = "float32"  # how the frozen base is held: float32, bfloat16, int8 or int4
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be a number in [0, 1), got {self.dropout!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"LoRA seed must be an integer, got {self.seed!r}")
        # A string was iterated as its letters ("LoRA targets ['a', 't', 't', ...]"); a list stays comparable.
        targets = (self.targets.split(",") if isinstance(self.targets, str) else self.targets
                   if isinstance(self.targets, list | tuple) else [self.targets])
        object.__setattr__(self, "targets", tuple(t.strip() if isinstance(t, str) else t for t in targets))
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            known = [f"{t} -> {PEFT_MODULES[t]}" for t in bad if t in PEFT_MODULES]  # PEFT's target_modules
            hint = (f" (PEFT's module names map onto these groups: {', '.join(known)}; a group adapts all of its "
                    "modules)") if known else ""
            raise ValueError(f"LoRA targets {list(self.targets)}: expected some of {', '.join(TARGETS)}{hint}")
        if self.dropout and "attention" not in self.targets:  # it was accepted and did nothing
            raise ValueError(f"LoRA dropout {self.dropout:g} applies to the attention adapters only (the experts' and "
                             "router's work in weight space, where PEFT allows no dropout either), and attention is "
                             f"not one of the targets ({', '.join(self.targets)}); leave out the dropout or add "
                             "attention to the targets")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"LoRA base dtype {self.base_dtype!r}: expected one of {', '.join(BASE_DTYPES)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class FrozenWeight(nn.Module):
    """A frozen weight held as float32, bfloat16, int8 with one float32 scale per row, or int4 with a
    float16 scale per group of 32 inputs (llama.cpp Q4_0's rounding, `ops.quant.quantize_int4`: what
    `prepare_for_inference(quant="int4")` holds, so an adapter trained over it is served over the
    same weights); buffers, so neither the optimizer nor the trainer's checkpoints see it."""

    q: torch.Tensor
    s: torch.Tensor
    w: torch.Tensor

    def __init__(self, w: torch.Tensor, dtype: str) -> None:
        super().__init__()
        self.dtype = dtype
        if dtype in ("int8", "int4"):
            q, s = quantize_int8(w) if dtype == "int8" else quantize_int4(w, group=QK)
            self.register_buffer("q", q)
            self.register_buffer("s", s)
        else:
            self.register_buffer("w", w.detach().to(parse_dtype(dtype)).clone())

    def get(self) -> torch.Tensor:
        """The weight in float32 (the adapter math and the model's float32 activations need it)."""
        return dequantize(self.q, self.s, torch.float32) if self.dtype in ("int8", "int4") else self.w.float()


def _init_A(shape: tuple[int, ...], fan_in: int, g: torch.Generator) -> torch.Tensor:
    # PEFT: nn.init.kaiming_uniform_(lora_A, a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    # Drawn on the CPU (`g`), then moved to the weight's device: the same factors on every device.
    bound = 1 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a low-rank update: y = x W^T + s B A dropout(x)^T."""

    def __init__(self, base: nn.Linear, cfg: LoraConfig, g: torch.Generator) -> None:
        super().__init__()
        X, In = base.weight.shape
        self.base = FrozenWeight(base.weight, cfg.base_dtype)
        self.lora_A = nn.Parameter(_init_A((cfg.rank, In), In, g).to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(X, cfg.rank, device=base.weight.device))
        self.scale = cfg.scale
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:  # the merged weight (W + s B A)
        return self.base.get() + self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.base.get().to(x.dtype) if not torch.is_autocast_enabled(x.device.type)
                     else self.base.get())
        return y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)


class WeightLoRA(nn.Module):
    """Parametrisation W -> W0 + s B A for a weight `[X, I]` or stacked weights `[E, X, I]` (factors
    stacked over E: one batched matmul). W0 is the frozen base kept here (float32/bf16/int8/int4)."""

    def __init__(self, w: torch.Tensor, cfg: LoraConfig, g: torch.Generator) -> None:
        super().__init__()
        *lead, X, In = w.shape
        self.base = FrozenWeight(w, cfg.base_dtype)
        self.lora_A = nn.Parameter(_init_A((*lead, cfg.rank, In), In, g).to(w.device))
        self.lora_B = nn.Parameter(torch.zeros(*lead, X, cfg.rank, device=w.device))
        self.scale = cfg.scale

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        # one op: the merged weight is the only full-size tensor made beside the dequantised base (the
        # update s B A and its scaled copy were two more: a layer of Mixtral's experts is 5.6 GB in float32)
        w0 = self.base.get()
        if w0.dim() == 3:
            return torch.baddbmm(w0, self.lora_B, self.lora_A, alpha=self.scale)
        return torch.addmm(w0, self.lora_B, self.lora_A, alpha=self.scale)


def _parametrize(module: nn.Module, name: str, cfg: LoraConfig, g: torch.Generator) -> None:
    w = getattr(module, name)
    p = WeightLoRA(w.detach().float(), cfg, g)
    # The original becomes an empty placeholder: the base lives (possibly as int8/int4) in the parametrisation.
    setattr(module, name, nn.Parameter(torch.empty(0, device=w.device), requires_grad=False))
    parametrize.register_parametrization(module, name, p, unsafe=True)


def apply_lora(model: Transformer, cfg: LoraConfig, *,
               load_block: Callable[[int, nn.Module], None] | None = None) -> Transformer:
    """Freeze `model` and add adapters per `cfg`, in place; returns it. Only the adapter factors
    (`*.lora_A`, `*.lora_B`) require gradients afterwards. `load_block(i, block)`, called before
    block i is adapted, may give a model whose blocks are still on the meta device their weights (a
    block at a time: the held base then never sits beside the whole model in float32)."""
    check_model(model)
    if not isinstance(cfg, LoraConfig):
        raise ValueError(f"apply_lora takes a LoraConfig (e.g. LoraConfig(rank=8)), not {type(cfg).__name__}")
    held = next((name for name, _ in model.named_parameters() if name.endswith(("lora_A", "lora_B"))), None)
    if held is not None:  # torch's KeyError "attribute 'w13' already exists", or adapters over adapters
        raise ValueError(f"the model already holds LoRA adapters ({held}): apply_lora once per model "
                         "(merge(model) gives a plain model to adapt again)")
    if "router" in cfg.targets and not any(isinstance(b.ffn, MoEBlock) for b in _blocks(model)):
        # it added no adapter: a run of targets=("router",) then failed in backward ("does not require grad")
        raise ValueError("LoRA target 'router': the model is dense (no MoE layer, so no router); its targets are "
                         "attention and experts (its FFN)")
    if cfg.base_dtype == "int4":
        check_int4_targets(model.config, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for i, block in enumerate(_blocks(model)):
        if load_block is not None:
            load_block(i, block)
        if "attention" in cfg.targets:
            setattr(block.attn, "wqkv", LoRALinear(block.attn.wqkv, cfg, g))  # noqa: B010 (an nn.Linear slot)
            setattr(block.attn, "wo", LoRALinear(block.attn.wo, cfg, g))  # noqa: B010
        ffn = block.ffn
        if isinstance(ffn, MoEBlock):
            if "experts" in cfg.targets:
                _parametrize(experts_owner(ffn), "w13", cfg, g)
                _parametrize(experts_owner(ffn), "w2", cfg, g)
            if "router" in cfg.targets:
                # under int4 the router's base stays float32, as `quant="int4"` inference keeps routers
                _parametrize(ffn.gate, "weight", replace(cfg, base_dtype="float32") if cfg.base_dtype == "int4"
                             else cfg, g)
        elif "experts" in cfg.targets:  # a dense model: its FFN stands in for "the experts"
            setattr(ffn, "w13", LoRALinear(ffn.w13, cfg, g))  # noqa: B010 (an nn.Linear slot)
            setattr(ffn, "w2", LoRALinear(ffn.w2, cfg, g))  # noqa: B010
    # Embeddings, norms and the output head stay float32 (frozen): small next to the experts.
    model._lora = cfg  # type: ignore[assignment]
    return model


def check_int4_targets(c: ModelConfig, cfg: LoraConfig) -> None:
    """ValueError unless every weight the adapters of `cfg` target in a model of config `c` has a
    multiple of 32 inputs per row (int4's groups; the router's base is not int4)."""
    widths = {"attention": (("attention.wqkv", c.dim), ("attention.wo", c.n_heads * c.head_dim)),
              "experts": (("experts.w13", c.dim), ("experts.w2", c.ffn_dim)), "router": ()}
    for target in cfg.targets:
        for name, width in widths[target]:
            if width % QK:
                raise ValueError(f"LoRA base dtype 'int4' holds weights in groups of {QK} inputs; {name} has {width} "
                                 f"inputs per row (target {target!r}): use int8, or another target; the model is "
                                 "unchanged")


def _blocks(model: Transformer) -> list[Block]:
    return [cast(Block, b) for b in model.layers]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter factors by mixlab name (`layers.0.attn.wqkv.lora_A`, `layers.0.ffn.w13.lora_A`)."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            out[name.replace("parametrizations.", "").replace(".0.lora_", ".lora_")] = p.detach()
    return out


def merged_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The plain model's state dict (mixlab names, float32) with every adapter folded in."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for mname, mod in model.named_modules():
            if "parametrizations" in mname.split("."):  # inside a parametrisation: read through its owner
                continue
            prefix = f"{mname}." if mname else ""
            if isinstance(mod, LoRALinear):
                out[prefix + "weight"] = mod.weight.detach().clone()
            elif parametrize.is_parametrized(mod):
                for pname in mod.parametrizations:
                    out[prefix + pname] = getattr(mod, pname).detach().clone()
            for pname, p in mod.named_parameters(recurse=False):
                if not parametrize.is_parametrized(mod, pname) and not pname.startswith("lora_"):
                    out[prefix + pname] = p.detach().float().clone()
    return out


def merge(model: Transformer) -> Transformer:
    """A plain `Transformer` (float32) equal to the adapter model."""
    plain = meta_model(model.config)
    state = merged_state(model)
    if model.config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    plain.load_state_dict(state, assign=True, strict=True)
    return plain.eval()


def save_merged(model: Transformer, path: str | Path, **kw: Any) -> None:
    """The merged model as a plain checkpoint folder (transformers format by default)."""
    save_model(merge(model), path, **kw)


# -- PEFT export ---------------------------------------------------------------------------------


def hf_expert_layout() -> str:
    """How the installed transformers holds Mixtral's experts: "modules" (experts.N.w1/w2/w3
    nn.Linear, transformers < 5) or "fused" (experts.gate_up_proj / down_proj parameters)."""
    try:
        from transformers.models.mixtral import modeling_mixtral as mm
    except ImportError as e:  # a guess would give an adapter PEFT loads wrongly or not at all
        raise ImportError(f"PEFT's adapter layout follows the installed transformers' Mixtral, and transformers "
                          f"is not installed (pip install transformers; {e})") from e

    return "fused" if hasattr(mm, "MixtralExperts") and not hasattr(mm, "MixtralBlockSparseTop2MLP") else "modules"


@dataclass
class PeftExport:
    path: Path
    target_modules: list[str]
    not_expressible: list[str] = field(default_factory=list)  # targets PEFT cannot hold (merge instead)


def peft_tensors(model: Transformer, *, expert_layout: str = "modules") -> tuple[dict[str, torch.Tensor],
                                                                                     set[str], list[str]]:
    """(PEFT state dict with transformers' Mixtral names, target module short names (`param:NAME` for
    PEFT `target_parameters`), adapted weights that cannot be expressed in this layout).

    The names are those `checkpoint.adapter.peft_weights` gives the importer: each adapted mixlab
    weight's keymaps.py rule splits B like the weight (q/k/v rows of `wqkv`, w1/w3 rows and experts of
    `w13`), and A, which every row of the weight shares, likewise."""
    fmt = "hf" if expert_layout == "modules" else "hf-fused"
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # mixlab weight -> (A, B)
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            factors[f"{name}.weight"] = (m.lora_A, m.lora_B)
        elif parametrize.is_parametrized(m):
            for pname in m.parametrizations:
                lora = _lora_of(m, pname)
                factors[f"{name}.{pname}"] = (lora.lora_A, lora.lora_B)
    out: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    done: set[str] = set()
    table = peft_weights(model.config, fmt)
    nested = Counter(name.rpartition(".")[0] for name, w in table.items()  # adapted parameters per module
                     if w.param and w.rule.ours in factors)
    for name, w in table.items():
        if w.rule.ours not in factors:
            continue
        done.add(w.rule.ours)
        A, B = (t.detach().float() for t in factors[w.rule.ours])  # A [(E,) r, I], B [(E,) X, r]
        B_k = w.rule.parts(B)[w.part]  # B's rows are W's: split as W is
        # A is the same for every row of W: broadcast over the rows, split as W is, one row's A taken
        A_k = w.rule.parts(A.unsqueeze(-3).expand(*B.shape[:-1], *A.shape[-2:]))[w.part].select(-3, 0)
        if w.param:  # PEFT's ParamWrapper: a module's first parameters are nested deepest (base_layer)
            owner = name.rpartition(".")[0]
            nested[owner] -= 1
            module = owner + ".base_layer" * nested[owner]
            targets.add("param:" + name.split(".", 3)[-1])  # mlp.experts.gate_up_proj: PEFT matches the end
        else:
            module = name.removesuffix(".weight")
            targets.add(module.rpartition(".")[2])
        if B_k.dim() == 3:  # [E, X, I] weight: lora_A [E*r, I] expert-major, lora_B [X, r*E] expert-minor
            E, r, In = A_k.shape  # (peft/tuners/lora/layer.py, get_delta_weight: "o r e, e r i -> e o i")
            A_k, B_k = A_k.reshape(E * r, In), B_k.permute(1, 2, 0).reshape(B_k.shape[1], r * E)
        out[f"base_model.model.{module}.lora_A.weight"] = A_k.contiguous()
        out[f"base_model.model.{module}.lora_B.weight"] = B_k.contiguous()
    return out, targets, sorted(set(factors) - done)


def _lora_of(module: nn.Module, name: str) -> WeightLoRA:
    return cast(WeightLoRA, module.parametrizations[name][0])  # type: ignore[index]


def experts_owner(ffn: nn.Module) -> nn.Module:
    """The module holding the stacked expert weights `w13` / `w2`: the MoE block's `experts`
    submodule where there is one, else the block itself."""
    sub = getattr(ffn, "experts", None)
    return sub if isinstance(sub, nn.Module) and hasattr(sub, "w13") else ffn


def expert_lora(ffn: nn.Module, name: str) -> WeightLoRA:
    """The adapter (factors and frozen base) on expert weight `name` ("w13" or "w2") of an MoE block."""
    return _lora_of(experts_owner(ffn), name)


def save_peft(model: Transformer, path: str | Path, *, expert_layout: str | None = None,
              extra_files: dict[str, str] | None = None, base_model: str | None = None) -> PeftExport:
    """Write `adapter_config.json` + `adapter_model.safetensors` (+ `extra_files`, name -> text) for
    `peft.PeftModel.from_pretrained(MixtralForCausalLM..., path)`, as one atomic folder; `base_model`
    (its `base_model_name_or_path`: a transformers checkpoint folder or hub name) lets
    `peft.AutoPeftModelForCausalLM.from_pretrained(path)` find the base itself. Raises
    ValueError naming the targets PEFT cannot express in the installed transformers' layout (use
    `save_merged`)."""
    cfg: LoraConfig | None = getattr(model, "_lora", None)
    if cfg is None:
        raise ValueError("the model has no LoRA adapters (apply_lora first)")
    # Only the MoE layers' names depend on the transformers version: a dense model's adapters, or attention
    # alone, need no transformers installed (without it, a fine-tuning run exported no adapter).
    moe = any(isinstance(b.ffn, MoEBlock) and (parametrize.is_parametrized(experts_owner(b.ffn))
                                               or parametrize.is_parametrized(b.ffn.gate)) for b in _blocks(model))
    layout = expert_layout or (hf_expert_layout() if moe else "modules")
    tensors, targets, missing = peft_tensors(model, expert_layout=layout)
    if missing:
        raise ValueError("PEFT cannot express these adapters with the installed transformers' Mixtral: "
                         f"{'; '.join(missing)}; export merged weights instead (--merge)")
    modules = sorted(t for t in targets if not t.startswith("param:"))
    params = sorted(t.removeprefix("param:") for t in targets if t.startswith("param:"))
    conf = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
        # PEFT refuses dropout on parameter targets; dropout only matters in training anyway.
        "lora_dropout": 0.0 if params else cfg.dropout, "target_modules": modules or None,
        "target_parameters": params or None, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "base_model_name_or_path": base_model, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "revision": None,
    }
    p = Path(path)
    write_sharded(iter(sorted(tensors.items())), p, single_name="adapter_model.safetensors",
                  extra_files={"adapter_config.json": json.dumps(conf, indent=2) + "\n",
                               "mixlab_lora.json": json.dumps(asdict(cfg), indent=2) + "\n", **(extra_files or {})},
                  metadata={"format": "pt"}, max_shard_bytes=1 << 62, copy_files=[])
    return PeftExport(p, modules + params)
