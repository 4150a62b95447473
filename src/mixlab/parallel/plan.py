"""`mixlab plan`: per-device memory and communication of a training or inference layout, before
renting the devices.

Parameter counts come from the model built on the meta device (no memory), split into expert
weights (stacked `[E, ...]`, sharded by expert parallelism) and everything else ("dense": embedding,
attention, norms, router, output). The byte rules are those of this project's code paths:

training (`mixlab train`, AdamW):
    parameters  float32 master weights (autocast computes in bf16 with `--dtype bfloat16`)  4 B
    gradients   float32                                                                    4 B
    optimizer   AdamW exp_avg + exp_avg_sq, float32                                        8 B
    = 16 bytes per parameter, the mixed-precision Adam figure of ZeRO (arXiv 1910.02054 §3.1).
    The optimizer step adds nothing to them: fused AdamW updates each parameter (each FSDP shard)
    in place, its states made at the first step, and a checkpoint streams each tensor to its file
    (measured: benchmarks/fsdp_memory.py, BENCHMARKS.md; the step's peak is gradients + states).
    Expert weights are divided by the expert-parallel size `ep`; with `--fsdp` everything is further
    sharded over the data-parallel ranks (dense weights over all N devices, expert weights over the
    N / ep replicas of each expert shard), as torchtitan's FSDP + EP layout.
    Activations: the tensors one block saves for backward in this implementation (see
    `activation_elements_per_token`), for every block, or with activation checkpointing only each
    block's input plus one block recomputed; plus the float32 logits and their gradient.
    Transient weights: with FSDP, two blocks gathered unsharded (the current one and the prefetched
    next) and the root (embedding, final norm, output: FSDP2 keeps the root gathered from its
    forward to its backward), float32 under `--dtype float32`; under bf16 `apply_fsdp`'s mixed
    precision gathers the blocks' matrices in bf16 (their norm scales and router float32, as the
    root), so autograd keeps no bf16 copy of them, only autocast's of the output head. Without FSDP,
    under bf16 autocast, the bf16 copies of every weight that autograd keeps for backward.

inference (`mixlab generate`, `--ep N`): weights in `--dtype` (bf16 default) or `--quant` int8
    (one scale per output row, in `--dtype`) / int4 (groups of 32 weights with one 16-bit scale, 4.5 bits
    per weight, as llama.cpp's Q4_0); embedding and router stay in `--dtype`. Dense weights and the
    KV cache are replicated on every rank (each rank runs the same sequences; only the experts are
    split), expert weights are divided by `ep`.

fine-tuning (`mixlab sft` / `mixlab dpo`, `train/finetune.py`, data parallel over `devices`, each
    holding the whole model and its share of the batch; a DPO pair is two
    sequences of `batch`, its reference log-probs computed before training): without `lora_rank`,
    training's 16 bytes per parameter, and with `fsdp` and / or `ep` (`sft --fsdp`, `--ep E`, full
    fine-tuning only) training's rules: those 16 bytes / `devices` plus two blocks gathered
    unsharded, the experts' / `ep`, and the all-to-all; with `lora_rank`, as
    `train/lora.py` holds the model:
    frozen base  each targeted matrix in `lora_base_dtype` (int8: 1 B + a float32 scale per row;
                 int4: 0.5 B + a float16 scale per 32 inputs; the router's base stays float32 under
                 int4); every other weight (embedding, output, norms, what is not targeted) float32
    adapters     A [r, I] and B [X, r] per targeted matrix (stacked over E for the experts; wqkv one A),
                 float32, with their gradients and AdamW's two states: 16 bytes per factor element
    activations  as training's, plus the float32 logits and their gradient
    weights kept for backward, per layer (every layer; one with activation checkpointing, which
                 recomputes it): the experts' and router's merged W0 + s B A (float32, the
                 parametrisation's output) and, under bf16 autocast, the bf16 copy of every matrix
                 the block multiplies (and the output head's); in float32, attention's dequantised
                 base when it is not float32 (a float32 base is the held tensor itself)
    transient    the largest expert matrix twice more in float32: int8 / int4 dequantisation's two
                 float32 temporaries in the forward pass; in backward the merged weight's gradient
                 (from which B's and A's are computed) as the experts' gradients and their stack
                 (ops/moe.py `expert_segments` unbinds the stacked weight)

all-to-all bytes: with `ep > 1` each token's K routed copies travel to the rank owning the expert
and back (dispatch + combine); with uniform routing a fraction (ep - 1) / ep leaves the rank.
Training moves them 4 times per layer (forward dispatch/combine, their two gradients; 6 with
activation checkpointing, which repeats the forward), inference twice per layer.

Numbers are estimates of steady-state tensors, not of allocator fragmentation or framework
workspace (CUDA context, NCCL buffers: typically 1-3 GB per GPU); `headroom` is what is left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mixlab.config import ModelConfig
from mixlab.dtypes import DTYPES
from mixlab.model.memory import QUANT_BITS, ParamSplit, count_params, inference_weights, is_expert_param

if TYPE_CHECKING:
    from mixlab.train.lora import LoraConfig

GB = 1e9
INT4_GROUP = 32  # a LoRA run's int4 base: a float16 scale per 32 inputs
PLAN_DTYPES = ("float32", "bfloat16", "float16")


def activation_elements_per_token(config: ModelConfig) -> int:
    """Elements one block saves for backward per token in mixlab's training path (model/layers.py,
    ops/moe.py `_sorted_training`), assuming a fused attention kernel that keeps its output and
    log-sum-exp rather than the T x T probabilities:

        attention: norm input and output (2D), fused qkv output (q + 2kv), attention output (q)
        FFN norm: input and output (2D); router logits (E, float32 counted as 2 elements)
        MoE, per routed copy (K): dispatched row (D), w13 output (2F), silu(gate) and its product
        with up (2F), expert output (D)  -> K (2D + 4F)     [dense FFN: D + 4F once]
    """
    D, F_ = config.dim, config.ffn_dim
    attn = 2 * D + config.q_dim + 2 * config.kv_dim + config.q_dim
    ffn = 2 * D
    if config.moe is not None:
        ffn += 2 * config.moe.num_experts + config.moe.top_k * (2 * D + 4 * F_)
    else:
        ffn += D + 4 * F_
    return attn + ffn


@dataclass
class Plan:
    mode: str
    devices: int
    ep: int
    dp: int
    fsdp: bool
    seq: int
    batch: int  # global sequences per step (training) / in flight (inference)
    dtype: str
    quant: str | None
    activation_checkpointing: bool
    device_mem: int
    params: ParamSplit
    lora_rank: int = 0  # finetune: 0 = full fine-tuning
    lora_targets: tuple[str, ...] = ()
    lora_base_dtype: str | None = None
    memory: dict[str, float] = field(default_factory=dict)  # bytes per device
    comm: dict[str, float] = field(default_factory=dict)  # bytes sent per device per step
    notes: list[str] = field(default_factory=list)
    load_peak: float = 0.0  # inference: bytes held while the weights load, before the cache exists

    @property
    def total(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return max(self.total, self.load_peak) <= self.device_mem

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "devices": self.devices, "ep": self.ep, "dp": self.dp, "fsdp": self.fsdp,
                "seq": self.seq, "batch": self.batch, "dtype": self.dtype, "quant": self.quant,
                "activation_checkpointing": self.activation_checkpointing, "device_mem": self.device_mem,
                "lora_rank": self.lora_rank, "lora_targets": list(self.lora_targets),
                "lora_base_dtype": self.lora_base_dtype,
                "params": self.params.__dict__, "memory": self.memory, "total": self.total, "fits": self.fits,
                "comm": self.comm, "notes": self.notes, "load_peak": self.load_peak}

    def table(self) -> str:
        """A Markdown table of the per-device memory and communication."""
        p = self.params
        ac = ", activation checkpointing" if self.activation_checkpointing else ""
        if self.lora_rank:
            ac += f", LoRA rank {self.lora_rank} on {','.join(self.lora_targets)}, base {self.lora_base_dtype}"
        lines = [
            f"{self.mode}: {self.devices} device(s), ep={self.ep}, dp={self.dp}"
            f"{', fsdp' if self.fsdp else ''}, seq {self.seq}, batch {self.batch}, {self.dtype}"
            f"{', ' + self.quant if self.quant else ''}{ac}",
            f"parameters: {p.total:,} ({p.experts:,} in experts, {p.dense:,} dense)",
            "",
            "| per device | GB |",
            "|---|---:|",
        ]
        lines += [f"| {k} | {v / GB:,.2f} |" for k, v in self.memory.items()]
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"| **total** | **{self.total / GB:,.2f}** |")
        if self.load_peak > self.total:  # what loading holds for a moment, more than the run itself
            lines.append(f"| peak while loading | {self.load_peak / GB:,.2f} |")
        headroom = self.device_mem - max(self.total, self.load_peak)
        lines.append(f"| device memory ({verdict}; headroom {headroom / GB:,.2f}) | {self.device_mem / GB:,.2f} |")
        if self.comm:
            lines += ["", "| sent per device | MB |", "|---|---:|"]
            lines += [f"| {k} | {v / 1e6:,.1f} |" for k, v in self.comm.items()]
        lines += [f"\n{n}" for n in self.notes]
        return "\n".join(lines)


def plan(config: ModelConfig, *, mode: str, devices: int = 1, device_mem: int = int(80 * GB), ep: int = 1,
         fsdp: bool = False, seq: int = 4096, batch: int | None = None, dtype: str = "bfloat16",
         quant: str | None = None, activation_checkpointing: bool = False, lora_rank: int = 0,
         lora_targets: str | None = None, lora_base_dtype: str | None = None) -> Plan:
    """Per-device memory (bytes) and communication per step for `mode` 'train', 'finetune' or 'infer'
    (`lora_*`: finetune's LoRA, as `mixlab sft`'s flags; `lora_rank` 0 is full fine-tuning)."""
    if mode not in ("train", "finetune", "infer"):
        raise ValueError(f"--mode must be 'train', 'finetune' or 'infer', got {mode!r}")
    if devices < 1:
        raise ValueError(f"--devices must be >= 1, got {devices}")
    lora = _check_lora(config, mode, lora_rank, lora_targets, lora_base_dtype)
    if mode == "finetune":
        sharding = "--fsdp" if fsdp else f"--ep {ep}" if ep > 1 else None
        if sharding and lora is not None:
            raise ValueError(f"{sharding} with --lora-rank: mixlab sft / dpo shard full fine-tuning only (a LoRA "
                             f"run's trainable part is small: plan it without {sharding.split()[0]})")
        if dtype == "float16":
            raise ValueError("--dtype float16: fine-tuning autocasts to float32 or bfloat16 only")
    if ep < 1 or devices % ep:
        raise ValueError(f"--ep must divide --devices ({devices}), got {ep}")
    E = config.moe.num_experts if config.moe is not None else 0
    if ep > 1 and (E == 0 or E % ep):
        raise ValueError(f"--ep {ep} must divide the number of experts ({E or 'dense model: none'})")
    if dtype not in PLAN_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(PLAN_DTYPES)}, got {dtype!r}")
    if quant not in (None, *QUANT_BITS):
        raise ValueError(f"--quant must be one of none, {', '.join(QUANT_BITS)}, got {quant!r}")
    if mode != "infer" and quant:
        raise ValueError("--quant applies to --mode infer only")
    if mode == "infer" and (fsdp or activation_checkpointing):  # inference has no FSDP or backward pass
        raise ValueError("--fsdp applies to --mode train or finetune only" if fsdp else
                         "--activation-checkpointing applies to --mode train or finetune only")
    if seq < 1:
        raise ValueError(f"--seq must be >= 1, got {seq}")
    dp = devices // ep
    if batch is None:
        batch = devices if mode != "infer" else 1
    if batch < 1 or (mode != "infer" and batch % devices):
        raise ValueError(f"--batch must be a positive multiple of --devices ({devices}) for training, got {batch}")
    context_note = None
    if mode == "infer" and seq > config.max_seq_len:  # a sequence never holds more (generate refuses it)
        context_note = f"--seq {seq} is past the model's context: planned at its {config.max_seq_len} tokens"
        seq = config.max_seq_len
    elif seq > config.max_seq_len:  # planned as asked, but no run of it starts
        context_note = (f"--seq {seq} is past the model's context ({config.max_seq_len} tokens): mixlab "
                        f"{'train' if mode == 'train' else 'sft / dpo'} refuses such a seq_len")
    ps = count_params(config)
    pl = Plan(mode=mode, devices=devices, ep=ep, dp=dp, fsdp=fsdp, seq=seq, batch=batch, dtype=dtype, quant=quant,
              activation_checkpointing=activation_checkpointing, device_mem=device_mem, params=ps)
    if lora is not None:
        pl.lora_rank, pl.lora_targets, pl.lora_base_dtype = lora.rank, lora.targets, lora.base_dtype
    if context_note:
        pl.notes.append(context_note)
    D, L = config.dim, config.n_layers
    K = config.moe.top_k if config.moe is not None else 0
    act_b = DTYPES[dtype].itemsize
    if lora is not None:
        _lora_memory(pl, config, lora)
    elif mode in ("train", "finetune"):
        dense_local = ps.dense / (devices if fsdp else 1)
        expert_local = ps.experts / ep / (dp if fsdp else 1)
        local = dense_local + expert_local
        pl.memory["parameters (float32)"] = 4 * local
        pl.memory["gradients (float32)"] = 4 * local
        pl.memory["optimizer (AdamW, 2 x float32)"] = 8 * local
        tokens = batch // devices * seq  # per device per micro-batch
        _activations(pl, config, tokens)
        # FSDP's units (parallel/train.py `apply_fsdp`): under bf16 a block's matrices gather in bf16, its norm
        # scales and router (block_f32) and the root (embedding, final norm, output) in float32
        block_f32 = 2 * D + (E * D if E else 0) if dtype != "float32" else 0
        root = ps.dense - L * ps.block_dense
        if fsdp:
            unsharded = ps.block_dense + ps.block_experts / ep  # experts stay sharded by expert parallelism
            if dtype == "float32":
                pl.memory["FSDP gathered blocks (2, float32)"] = 2 * unsharded * 4
            else:
                pl.memory[f"FSDP gathered blocks (2, {dtype} matrices)"] = 2 * (
                    (unsharded - block_f32) * act_b + block_f32 * 4)
            pl.memory["FSDP gathered root (embedding, norm, output; float32)"] = root * 4
            if dtype != "float32":  # autocast's copy of the float32 output head, kept until its backward
                pl.memory["bf16 weight copies kept for backward"] = config.vocab_size * D * act_b
        elif dtype != "float32":
            pl.memory["bf16 weight copies kept for backward"] = local * act_b
        if ep > 1:
            per_layer = tokens * K * D * act_b * (ep - 1) / ep
            passes = 6 if activation_checkpointing else 4
            pl.comm["all-to-all (expert parallel), per step"] = passes * L * per_layer
        if fsdp and devices > 1:
            # the blocks all-gathered in forward and backward (in their unit's dtype), the root once (kept
            # gathered for its backward), reduce-scatter of float32 gradients
            frac_d, frac_e = (devices - 1) / devices, (dp - 1) / dp
            w_b = 4 if dtype == "float32" else act_b
            blocks = ((L * ps.block_dense - L * block_f32) * w_b + L * block_f32 * 4) * frac_d
            blocks += ps.experts / ep * frac_e * w_b
            pl.comm["FSDP all-gather (forward + backward), per step"] = 2 * blocks + root * 4 * frac_d
            pl.comm["FSDP reduce-scatter (gradients), per step"] = 4 * (ps.dense * frac_d + ps.experts / ep * frac_e)
        elif devices > 1:
            # ring all-reduce of float32 gradients: 2 (n-1)/n of the bytes each
            ar = ps.dense * 2 * (devices - 1) / devices
            if dp > 1:
                ar += ps.experts / ep * 2 * (dp - 1) / dp
            pl.comm["gradient all-reduce, per step"] = 4 * ar
        if not pl.fits and mode == "train":  # suggest only what this layout does not already use
            tries = [f for f, on in (("--fsdp", fsdp), ("--activation-checkpointing", activation_checkpointing))
                     if not on]
            pl.notes.append(f"does not fit: try {', '.join(tries + ['more --devices'])}, a smaller --seq/--batch, "
                            "or optimizer-state offload (not implemented here)")
    else:
        w_b = DTYPES[dtype].itemsize
        weights, floats = inference_weights(config, dtype, quant, ep=ep, params=ps)
        pl.memory[f"weights ({quant or dtype})"] = weights
        # Loading: --quant rounds each matrix as it is read (`load_model(quant=)`; under --ep each process its
        # share's, `load_expert_parallel(quant=)`), so a process holds the quantised weights and the largest
        # weight's floats (a layer's stacked w13, its share's under --ep); quantisation's float32 temporaries
        # are a few MB of rows (`ops.quant.QUANT_CHUNK`).
        if quant is not None:
            pl.load_peak = weights + floats
            pl.notes.append(f"loading holds the {quant} weights and one weight's {dtype} ({floats / GB:,.2f} GB: "
                            f"{'its share of ' if ep > 1 else ''}a layer's stacked w13), each matrix rounded as it "
                            "is read")
        pl.memory["KV cache (bfloat16)" if w_b == 2 else f"KV cache ({dtype})"] = \
            batch * seq * config.kv_cache_bytes_per_token(w_b)
        chunk = min(seq, 512)  # prefill runs in chunks (mixlab.generate)
        pl.memory["activations (prefill chunk) + logits"] = (
            batch * chunk * (activation_elements_per_token(config) * w_b) + batch * config.vocab_size * 4)
        if ep > 1:
            per_token = 2 * L * K * D * w_b * (ep - 1) / ep
            pl.comm["all-to-all per generated token (whole batch)"] = batch * per_token
            pl.comm["all-to-all for the prompt (whole batch)"] = batch * seq * per_token
    if mode == "finetune" and not pl.fits:
        tries = [f for f, on in (("--fsdp", fsdp or lora), ("--activation-checkpointing", activation_checkpointing),
                                 ("more --devices", not fsdp), ("--lora-rank" + (" (without --fsdp)" if fsdp else ""),
                                                                lora),
                                 ("--lora-base-dtype int4", lora and lora.base_dtype == "int4")) if not on]
        pl.notes.append(f"does not fit: try {', '.join(tries + ['a smaller --seq/--batch'])}")
    return pl


def _activations(pl: Plan, config: ModelConfig, tokens: int) -> None:
    """Training's and fine-tuning's activations (`tokens` per micro-batch) and float32 logits + gradient."""
    per_tok, L = activation_elements_per_token(config), config.n_layers
    kept = config.dim * L + per_tok if pl.activation_checkpointing else per_tok * L
    pl.memory["activations"] = tokens * kept * DTYPES[pl.dtype].itemsize
    pl.memory["logits + gradient (float32)"] = 2 * tokens * config.vocab_size * 4


def _check_lora(config: ModelConfig, mode: str, rank: int, targets: str | None,
                base_dtype: str | None) -> LoraConfig | None:
    """The LoraConfig `mixlab sft` would run (None: no LoRA), or ValueError naming the flag."""
    from mixlab.train.lora import LoraConfig, check_int4_targets

    if mode != "finetune" or not rank:
        given = next((f for f, v in (("--lora-rank", rank), ("--lora-targets", targets),
                                     ("--lora-base-dtype", base_dtype)) if v), None)
        if given and mode != "finetune":
            raise ValueError(f"{given} applies to --mode finetune only")
        if given:
            raise ValueError(f"{given} applies to LoRA, and --lora-rank is absent (full fine-tuning): give --lora-rank")
        return None
    try:
        lora = LoraConfig(rank=rank, targets=tuple(targets.split(",")) if targets else LoraConfig.targets,
                          base_dtype=base_dtype or "float32")
    except ValueError as e:  # "LoRA targets [...]: expected ...": name the flag
        flag = next(f for f in ("targets", "base dtype", "rank") if str(e).startswith(f"LoRA {f}"))
        raise ValueError(f"--lora-{flag.replace(' ', '-')}: {e}") from None
    if "router" in lora.targets and config.moe is None:
        raise ValueError("--lora-targets router: the model is dense (no router)")
    if lora.base_dtype == "int4":  # groups of 32 inputs: apply_lora's check
        check_int4_targets(config, lora)
    return lora


def _lora_matrices(config: ModelConfig, targets: tuple[str, ...]) -> list[tuple[str, int, int, int, bool]]:
    """One layer's targeted matrices as train/lora.py adapts them: (target, stacked E (1: a plain
    matrix), rows X, inputs I, adapted in weight space: MoE experts and router, whose merged
    W0 + s B A is a tensor of its own)."""
    D, F_, E = config.dim, config.ffn_dim, config.moe.num_experts if config.moe is not None else 0
    out = []
    if "attention" in targets:
        out += [("attention", 1, config.q_dim + 2 * config.kv_dim, D, False), ("attention", 1, D, config.q_dim, False)]
    if "experts" in targets:  # a dense model's FFN stands in for the experts (LoRALinear modules)
        out += [("experts", E or 1, 2 * F_, D, E > 0), ("experts", E or 1, D, F_, E > 0)]
    if "router" in targets:
        out.append(("router", 1, E, D, True))
    return out


def _lora_memory(pl: Plan, config: ModelConfig, lora: LoraConfig) -> None:
    """Fine-tuning memory with LoRA adapters (module docstring, "fine-tuning")."""
    L, r, base = config.n_layers, lora.rank, lora.base_dtype
    mats = _lora_matrices(config, lora.targets)
    held = targeted = factors = 0.0
    for target, E, X, In, _ in mats:
        n = E * X * In
        targeted += n
        factors += E * (r * In + X * r)
        b = "float32" if base == "int4" and target == "router" else base  # as quant="int4" inference keeps it
        if b == "int8":  # one float32 scale per row
            held += n + 4 * E * X
        elif b == "int4":  # 4 bits + a float16 scale per 32 inputs
            held += n / 2 + 2 * n / INT4_GROUP
        else:
            held += n * DTYPES[b].itemsize
    pl.memory[f"frozen base, targeted ({base})"] = L * held
    pl.memory["frozen weights, the rest (float32)"] = 4 * (pl.params.total - L * targeted)
    pl.memory["adapters (float32)"] = 4 * L * factors
    pl.memory["adapter gradients (float32)"] = 4 * L * factors
    pl.memory["optimizer (AdamW, 2 x float32)"] = 8 * L * factors
    _activations(pl, config, pl.batch // pl.devices * pl.seq)
    if pl.devices > 1:  # ring all-reduce of the float32 adapter gradients: 2 (n-1)/n of the bytes each
        pl.comm["gradient all-reduce (adapters), per step"] = 4 * L * factors * 2 * (pl.devices - 1) / pl.devices
    # what autograd keeps of the weights themselves, per layer (all of them, or the one recomputed)
    bf16 = pl.dtype == "bfloat16"
    space = sum(E * X * In for _, E, X, In, ws in mats if ws)
    linear = sum(E * X * In for _, E, X, In, ws in mats if not ws)
    per_layer = 4 * space + (4 * linear if base != "float32" and not bf16 else 0)  # float32 base: the held one
    if bf16:  # autocast's bf16 copy of every matrix the block multiplies (not the norms; the router is float32)
        E = config.moe.num_experts if config.moe is not None else 0
        per_layer += 2 * (pl.params.block_dense + pl.params.block_experts - 2 * config.dim - E * config.dim)
    head = 2 * config.vocab_size * config.dim if bf16 else 0  # the output head's, outside the blocks
    pl.memory["weights kept for backward"] = per_layer * (1 if pl.activation_checkpointing else L) + head
    # one matrix at a time, twice: dequantisation's temporaries (forward), the merged weight's gradient as
    # the experts' pieces and their stack (backward of `unbind`)
    largest = max((E * X * In for _, E, X, In, ws in mats if ws), default=0)
    pl.memory["transient: the largest expert matrix, twice in float32"] = 2 * 4 * largest


__all__ = ["GB", "Plan", "ParamSplit", "activation_elements_per_token", "count_params", "is_expert_param", "plan"]
