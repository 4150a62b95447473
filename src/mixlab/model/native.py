"""Decoding through the native kernels (`mixlab/ops/native/decode.c`): one C call per step.

`NativeDecoder(model)` describes the model to C once: raw pointers to its weights (no copies, except
float32 copies of the small norm and router vectors and of int8 row scales), the work buffers of a
step, and the shapes. A step is then one C call, `mx_decode_step`: every layer inside one OpenMP
parallel region, writing the next-token logits. Under `torch.compile` the call is an operator,
`torch.ops.mixlab.decode_step` (opaque to the compiler); eagerly `step` calls C directly (the
operator's dispatch costs more than the rest of a step's Python). It writes the token's keys and values
into the same `KVCache` PyTorch's path uses, so prefill (PyTorch, compute-bound) and decoding
(native, bandwidth-bound) share one cache, and a batch of several prompts still decodes through
PyTorch. `prepare_for_inference` attaches one as `model.native_decoder`; `generate.decode_step`
uses it when the registry (`mixlab.ops.registry.decode_impl`) chooses it and it `accepts` the cache.

The same decoder runs an engine step of several sequences at once (`run_batch`,
`torch.ops.mixlab.decode_batch` over the engine's slot pool, `mx_decode_batch`): a decoding token or
a prompt chunk per sequence, each weight read once for all the step's tokens. LoRA adapters served
over the model (the engine's `adapters=`) run inside that call: `lora_table` lays out their low-rank
updates once, and each row of a step names its adapter (`batch(lora=, adapter=)`).

Weights must be plain contiguous float32 or bf16 tensors, or int8 with per-row scales (what
`prepare_for_inference(model, quant="int8")` makes); oneDNN-packed weights are opaque to C. A decoder
owns one set of work buffers and binds one cache at a time, so its C call holds a lock: threads that
share a model decode one step at a time (a step already uses every core through OpenMP, so little
throughput is lost; a server batches requests in one engine thread instead). `step_experts` returns
each call's own experts, so concurrent callers never read another thread's.

Shape legend: D width, H query heads, G kv heads, Hd head dim, C cache slots, E experts, K experts
per token, F expert FFN width, V vocabulary, L layers.
"""

from __future__ import annotations

import ctypes
import re
import threading
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from mixlab.cache import KVCache
from mixlab.model.moe import MoEBlock
from mixlab.model.transformer import Block, Transformer
from mixlab.ops import native, registry
from mixlab.ops.linear import InferenceLinear
from mixlab.ops.native.ops import register_decoder
from mixlab.ops.quant import Int4Linear, Int8Linear
from mixlab.pages import HUGE, huge_empty, huge_pages


class LowRank(Protocol):
    """An adapter's update of one weight as `checkpoint.adapter.LowRank` holds it (the model sits below
    checkpoint and does not import it): rows x get y += (x @ A.T) @ B.T, float32."""

    @property
    def A(self) -> torch.Tensor: ...

    @property
    def B(self) -> torch.Tensor: ...


# the adapted weights `mx_batch.lora` holds (`adapter_factors`' names): layer, site (native.LORA_SITES)
_LORA_NAME = re.compile(r"layers\.(\d+)\.(?:attn\.(wqkv|wo)\.weight|ffn\.(gate)\.weight|ffn\.experts\.(w13|w2)"
                        r"|ffn\.(w13|w2)\.weight)")


@dataclass
class LoraTable:
    """LoRA adapters' updates as `mx_decode_batch` reads them (`NativeDecoder.lora_table`): `table`
    `mx_lora` [L, sites, E, J] over the factors' float32 tensors (A, and B transposed: kept in `keep`),
    `rank` the largest R."""

    table: ctypes.Array
    J: int
    rank: int
    keep: list[torch.Tensor]


def _weight(lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, row scales or None) of an `nn.Linear`, `InferenceLinear`, `Int8Linear` or `Int4Linear`;
    ValueError for any other module: a LoRA adapter's `LoRALinear` (mixlab.train.lora) has a float
    `scale`, which was read as row scales (an AttributeError that `generate` raised mid-way)."""
    if not isinstance(lin, nn.Linear | InferenceLinear | Int8Linear | Int4Linear):
        raise ValueError(f"native decoding reads plain, int8 or int4 linear layers, not {type(lin).__name__}")
    w = lin.weight
    assert isinstance(w, torch.Tensor)
    return w.detach(), getattr(lin, "scale", None)


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """ValueError unless `t` has `shape` (int4 weights: packed, two per byte along the last dim)."""
    want = shape if t.dtype != torch.uint8 else (*shape[:-1], shape[-1] // 2)
    if tuple(t.shape) != want:
        raise ValueError(f"native decoding: {name} has shape {tuple(t.shape)}, the config says {want}")


# How int4 weights multiply activations: "int8" rounds each activation vector to int8 per block of 32
# inputs (llama.cpp's Q8_0) and uses integer dot products (AVX512-VNNI, or AVX512-BW's same sums), about
# 4x less work per weight, which is what lets a step run at the memory's speed (BENCHMARKS.md); "float32"
# multiplies the float32 activations exactly (the reference the tests compare the kernels against).
# A model's choice, `prepare_for_inference(int4_activations=...)` (the property `int4_activations`),
# which every path follows whatever the CPU or whether the kernels are loaded: the native steps and
# PyTorch's pass (`mixlab.ops.quant.rounds_activations`).
INT4_ACTIVATIONS = ("int8", "float32")
DEFAULT_INT4_ACTIVATIONS = "int8"
# The same choice for int8 weights (`int8_activations`; MX_I8_A8: llama.cpp's Q8_0 x Q8_0): "int8" is
# ~3x less work per weight than widening each to float32, which is what held int8 batch-1 decoding at
# ~60% of the memory's speed at Mixtral's widths, and costs no measurable bits per byte. Default
# "float32", the exact products int8 has always had, because "int8" is slower in the engine's steps of
# many sequences, where a bf16 model's int8 rows run as bf16 (docs/serving.md, "int8 weights").
INT8_ACTIVATIONS = INT4_ACTIVATIONS
DEFAULT_INT8_ACTIVATIONS = "float32"


def int4_activations(model: nn.Module) -> str:
    """The model's int4 activation mode (`INT4_ACTIVATIONS`; the default unless set)."""
    mode = getattr(model, "int4_activations", None) or DEFAULT_INT4_ACTIVATIONS
    if mode not in INT4_ACTIVATIONS:
        raise ValueError(f"int4_activations must be one of {INT4_ACTIVATIONS}, not {mode!r}")
    return str(mode)


def int8_activations(model: nn.Module) -> str:
    """The model's int8 activation mode (`INT8_ACTIVATIONS`; the default unless set)."""
    mode = getattr(model, "int8_activations", None) or DEFAULT_INT8_ACTIVATIONS
    if mode not in INT8_ACTIVATIONS:
        raise ValueError(f"int8_activations must be one of {INT8_ACTIVATIONS}, not {mode!r}")
    return str(mode)


class NativeDecoder:
    def __init__(self, model: Transformer, lib: ctypes.CDLL) -> None:
        cfg = model.config
        self.lib = lib  # also binds `_c_step` (the batch-1 step's C function)
        self._keep: list[object] = []  # everything whose address C holds

        def ptr(t: torch.Tensor | None) -> int | None:
            if t is None:
                return None
            if t.device.type != "cpu" or t.is_mkldnn or not t.is_contiguous():
                raise ValueError("native decoding needs plain contiguous CPU tensors (not oneDNN-packed)")
            self._keep.append(t)
            return t.data_ptr()

        def f32(t: torch.Tensor | None) -> int | None:
            return None if t is None else ptr(t.detach().float().contiguous())

        def buf(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            t = torch.zeros(n, dtype=dtype)
            self._keep.append(t)
            return t

        D, H, G, Hd, F_ = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
        E, K = (cfg.moe.num_experts, cfg.moe.top_k) if cfg.moe is not None else (1, 1)
        if cfg.moe is not None and cfg.moe.capacity_factor is not None:  # PyTorch's pass drops them
            raise ValueError(f"native decoding runs every chosen expert; this model drops tokens over an expert "
                             f"capacity (moe.capacity_factor={cfg.moe.capacity_factor})")
        if E > native.MAX_EXPERTS or Hd > 1024:  # the sizes of decode.c's stack arrays
            raise ValueError(f"native decoding supports up to {native.MAX_EXPERTS} experts and head dim 1024, not "
                             f"{E} and {Hd}")
        w_out, s_out = _weight(model.output)
        if w_out.dtype not in native.TYPE_CODES and w_out.dtype != torch.uint8:
            raise ValueError(f"native decoding supports float32, bf16, int8 and int4 weights, not {w_out.dtype}")
        self.act8 = ((w_out.dtype == torch.uint8 and int4_activations(model) == "int8")
                     or (w_out.dtype == torch.int8 and int8_activations(model) == "int8"))
        wt = native.type_code(w_out, s_out, act8=self.act8)
        if wt == native.I8_A8 and (D % 32 or (H * Hd) % 32 or F_ % 32):  # rounded per block of 32
            raise ValueError(f"int8_activations='int8' needs widths that are multiples of 32 (dim {D}, heads x "
                             f"head_dim {H * Hd}, ffn_dim {F_})")

        def scales(w: torch.Tensor, s: torch.Tensor | None) -> int | None:
            """int8 row scales as float32 copies; int4 float16 group scales as they are (same group)."""
            if w.dtype != torch.uint8:
                return f32(s)
            assert s is not None
            if native.type_code(w, s, act8=self.act8) != wt:
                raise ValueError("native decoding needs one int4 group size for every matrix")
            return ptr(s)
        if not native.fast(w_out.dtype):
            raise ValueError(f"the native {w_out.dtype} kernels are not vectorised on this CPU (no AVX-512)")
        emb = model.tok_embeddings.weight.detach()
        if emb.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"native decoding needs a float32 or bf16 embedding, not {emb.dtype}")
        _check_shape("tok_embeddings", emb, (cfg.vocab_size, D))
        _check_shape("output", w_out, (cfg.vocab_size, D))

        self.layers = (native.Layer * cfg.n_layers)()
        # bf16 matrices `pack` may keep in panels: (layer, name) -> weight; (-1, "out"): the output
        self._packable: dict[tuple[int, str], torch.Tensor] = {(-1, "out"): w_out.detach()}
        self._packed: dict[tuple[int, str], torch.Tensor] | None = None
        self._reading = False  # whether the steps read the panels (`pack(on)`)
        for i, block in enumerate(model.layers):
            assert isinstance(block, Block)
            ffn = block.ffn
            if isinstance(ffn, MoEBlock):
                router = f32(ffn.gate.weight)
                ew = ffn.experts.weights()
                w13, w2, s13, s2 = ew.w13, ew.w2, ew.w13_scale, ew.w2_scale
            else:
                router = None
                w13, s13 = _weight(ffn.w13)
                w2, s2 = _weight(ffn.w2)
            if not isinstance(w13, torch.Tensor) or not isinstance(w2, torch.Tensor):
                raise ValueError("native decoding needs stacked expert tensors (not per-expert packed lists)")
            w13, w2 = w13.detach(), w2.detach()
            (wqkv, s_qkv), (wo, s_o) = _weight(block.attn.wqkv), _weight(block.attn.wo)
            lead = (E,) if isinstance(ffn, MoEBlock) else ()
            # C trusts these shapes: a model changed from outside (expert parallelism keeps E / ep
            # experts per process) must not be read past its tensors' ends.
            for name, t, shape in (("wqkv", wqkv, ((H + 2 * G) * Hd, D)), ("wo", wo, (D, H * Hd)),
                                   ("w13", w13, (*lead, 2 * F_, D)), ("w2", w2, (*lead, D, F_))):
                _check_shape(f"layer {i} {name}", t, shape)
            if {t.dtype for t in (wqkv, wo, w13, w2)} != {w_out.dtype}:
                raise ValueError("native decoding needs one weight dtype for every matrix")
            for name, t in (("wqkv", wqkv), ("wo", wo), ("w13", w13), ("w2", w2)):
                self._packable[(i, name)] = t
            self.layers[i] = native.Layer(
                f32(block.attn_norm.weight), ptr(wqkv), scales(wqkv, s_qkv), ptr(wo), scales(wo, s_o),
                f32(block.ffn_norm.weight), router, ptr(w13), scales(w13, s13), ptr(w2), scales(w2, s2),
                None, None,  # the cache: set per step
            )
        # A window as long as the context hides nothing: 0 (none) for C, whose chunk attention
        # compares positions in 32 bits (a window of 2**32 + 3 would read as 3).
        window = cfg.sliding_window if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_seq_len else 0
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, Hd, 2, dtype=torch.float32) / Hd))  # as rope_cos_sin
        self.c_model = native.Model(
            D, H, G, Hd, E, K, F_, cfg.vocab_size, cfg.n_layers, window,
            cfg.norm_eps, wt, native.F32, native.TYPE_CODES[emb.dtype],
            ptr(inv_freq), ptr(emb), f32(model.norm.weight), ptr(w_out), scales(w_out, s_out),
            ctypes.addressof(self.layers),
        )
        self._top = ctypes.c_int64(-1)  # the step's argmax, written by C (`step_top`)
        self._scores = buf(0)
        self.bufs = native.Buffers(
            *(buf(n).data_ptr() for n in (D, D, (H + 2 * G) * Hd, H * Hd)),
            0,  # scores: sized by the cache, set per step
            *(buf(n).data_ptr() for n in (D, max(K * 2 * F_, D), K * F_, K * D, cfg.n_layers * K)),
            *(buf(n, torch.int16).data_ptr() for n in (max(D, H * Hd), H * Hd, K * F_)),
            None,  # chosen: each step's own tensor, set per step (`_run`)
            ctypes.addressof(self._top),
        )
        self.V, self.n_heads = cfg.vocab_size, H
        self._dims = (D, H, G, Hd, F_, K, cfg.n_layers)
        self.c_batch = native.Batch()
        self._batch_room = (0, 0, 0)  # (B, threads, C) the batched work buffers have room for
        self._batch_keep: list[torch.Tensor] = []
        self._caches = (ctypes.c_void_p * (2 * cfg.n_layers))()
        self.vocab_size, self.n_layers, self.top_k = cfg.vocab_size, cfg.n_layers, K
        self._moe = cfg.moe is not None
        self.weight = w_out  # the output matrix: what the registry reads the format and dtype off
        self._bound: tuple[int, ...] = ()  # the data pointers of the bound cache's buffers
        self.last_chosen = torch.zeros(cfg.n_layers, K, dtype=torch.int32)  # the experts of the last `step`
        self._lock = threading.Lock()  # the work buffers and the bound cache are shared: one C call at a time
        self._choice: tuple[tuple[object, ...], bool] = ((), False)  # `chooses`: (step kind, native?)
        self._c_model_ref, self._c_bufs_ref = ctypes.byref(self.c_model), ctypes.byref(self.bufs)
        self.handle = register_decoder(self)
        # 2 MiB pages for the weights, collapsed in the background: ~3 s per GB of weights, which
        # would otherwise hold up a first `generate` (explicit preparation, `attach`, waits for it).
        big = [t for t in self._keep if isinstance(t, torch.Tensor) and t.numel() * t.element_size() >= 2 * HUGE]
        self.huge_pages = 0  # ranges collapsed (set when the thread ends)
        self._collapsing = threading.Thread(target=self._collapse, args=(big,), name="mixlab-huge-pages", daemon=True)
        self._collapsing.start()

    def packable_bytes(self) -> int:
        """The memory `pack` adds: every bf16 weight matrix kept a second time, in panels (0 when the
        weights are not bf16, or their shapes or this CPU do not allow panels)."""
        return sum(t.numel() * t.element_size() for t in self._packable.values() if native.packable(t))

    def pack(self, on: bool = True) -> int:
        """Keep every bf16 weight matrix a second time in 32-row panels (`native.pack_bf16`) and let
        the engine step (`batch`) read those: at a few tokens per expert, a panel streams as one
        sequential read that serves every token, where a row is read once per token group (measured
        in BENCHMARKS.md, "Serving"). The batch-1 step (`step`) keeps reading the rows. Costs
        `packable_bytes` of memory, made once (the first call; ~0.1 s per GB) and kept with the
        decoder; `pack(False)` stops reading them (A/B benchmarks) without freeing them. Returns
        the bytes kept in panels. The panels are copies: a decoder over weights changed later is
        rebuilt (`shared_decoder`), with no panels until packed again."""
        with self._lock:
            if on and self._packed is None:
                packed = {}
                try:
                    for key, t in self._packable.items():
                        if native.packable(t):
                            P = huge_empty(t.shape, t.dtype)
                            native.pack_into(t, P)
                            packed[key] = P
                except (RuntimeError, MemoryError) as e:  # torch's allocator: RuntimeError
                    packed.clear()
                    raise MemoryError(f"no memory for the weights' panels ({self.packable_bytes()} bytes): {e}") from e
                self._packed = packed
            packed = self._packed or {}
            self._reading = on
            for (i, name), P in packed.items():
                at = P.data_ptr() if on else None
                if i < 0:
                    self.c_model.out_p = at
                else:
                    setattr(self.layers[i], f"{name}_p", at)
            return sum(P.numel() * P.element_size() for P in packed.values()) if on else 0

    def panels(self) -> dict[tuple[int, str], torch.Tensor]:
        """The panels the engine step reads (`pack`), by (layer, "wqkv" / "wo" / "w13" / "w2"; the
        experts' stacked as they are) and (-1, "out"): none before `pack` or after `pack(False)`.
        The engine's LoRA steps read them too (`engine.runner`)."""
        return (self._packed or {}) if self._reading else {}

    def _collapse(self, tensors: list[torch.Tensor]) -> None:
        self.huge_pages = huge_pages(tensors)

    @property
    def lib(self) -> ctypes.CDLL:
        """The kernels' library. Assigning another one (an in-process A/B of `decode.c` variants:
        benchmarks/kernels_ab.py) rebinds the batch-1 step's C function too, which `run` keeps bound
        rather than looking it up per token."""
        return self._lib

    @lib.setter
    def lib(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._c_step = lib.mx_decode_step

    def wait_huge_pages(self) -> int:
        """Wait until the weights' pages are collapsed (`huge_pages`); how many ranges were."""
        self._collapsing.join()
        return self.huge_pages

    def __deepcopy__(self, memo: dict) -> NativeDecoder:
        # The structures hold raw pointers into the original model's tensors.
        raise TypeError("a NativeDecoder cannot be copied: copy the model before prepare_for_inference")

    def __reduce_ex__(self, protocol: object) -> tuple:
        # pickle.dumps / torch.save of a prepared model failed on "Can't pickle local object
        # 'CDLL.__init__.<locals>._FuncPtr'", naming neither the model nor what to do.
        raise TypeError("a model prepared for inference cannot be pickled (its native decoder holds raw pointers "
                        "into its tensors): pickle or save it (mixlab.save_model) before prepare_for_inference, "
                        "and prepare it again after loading")

    def accepts(self, tokens_B1: torch.Tensor, cache: KVCache) -> bool:
        """Whether this cache can take a native step: one sequence, a CPU cache of float32 or bf16.
        (Whether a native step runs at all is the registry's choice: `generate.decode_step`.)"""
        return tokens_B1.shape == (1, 1) and self.accepts_cache(cache)

    def accepts_cache(self, cache: KVCache) -> bool:
        """`accepts` for the cache alone."""
        return (
            cache.batch_size == 1
            and cache.k[0].device.type == "cpu"
            and cache.k[0].dtype in (torch.float32, torch.bfloat16)
            and all(map(torch.Tensor.is_contiguous, cache.k))
            and all(map(torch.Tensor.is_contiguous, cache.v))
        )

    def chooses(self, tokens: int, device: str = "cpu") -> bool:
        """The registry's choice of this decoder (`registry.choose("decode_step", ...)`) for a step of
        `tokens` tokens on `device`, asked once per kind of step: between two native steps the
        weights have streamed through the caches, so each Python call runs cold (~30 us for the
        registry's answer, per token)."""
        training = torch.is_grad_enabled() and self.weight.requires_grad
        key = (tokens, device, training)
        if key != self._choice[0]:
            native_ok = registry.choose("decode_step", device=device, fmt=registry.weight_format(self.weight),
                                        dtype=self.weight.dtype, tokens=tokens, training=training) == "native"
            self._choice = (key, native_ok)
        return self._choice[1]

    def _bind(self, pos_BC: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Point the layers at the cache buffers (again when they grew or changed) and size the
        attention-score buffer."""
        key = (pos_BC.data_ptr(), *map(torch.Tensor.data_ptr, k), *map(torch.Tensor.data_ptr, v))
        if key == self._bound:
            return
        _, _, G, Hd, _, _, L = self._dims
        want = (1, G, pos_BC.shape[1], Hd)  # C writes and reads these: another model's cache would overflow
        if len(k) != L or len(v) != L or any(tuple(t.shape) != want for t in (*k, *v)):
            got = f"{len(k)} of {tuple(k[0].shape)}" if k else "none"
            raise ValueError(f"a native step needs this model's cache: {L} layers of keys and values {want}, not "
                             f"{got} (a cache made for another model?)")
        for i, layer in enumerate(self.layers):
            layer.k_cache, layer.v_cache = k[i].data_ptr(), v[i].data_ptr()
        self.c_model.ct = native.TYPE_CODES[k[0].dtype]
        self._scores = torch.empty(self.n_heads * pos_BC.shape[1], dtype=torch.float32)
        self.bufs.scores = self._scores.data_ptr()
        self._bound = key

    def run(self, token: int, position: int, pos_BC: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor],
            slot: int, n: int, logits_1V: torch.Tensor) -> torch.Tensor:
        """The C call of `torch.ops.mixlab.decode_step`: writes `logits_1V`; returns the experts each
        layer chose `[L, K]` (a tensor of this call's own). Thread-safe."""
        return self._run(token, position, pos_BC, k, v, slot, n, logits_1V)[0]

    def _run(self, token: int, position: int, pos_BC: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor],
             slot: int, n: int, logits_1V: torch.Tensor) -> tuple[torch.Tensor, int]:
        """`run`, also returning the logits' argmax from C (-1 when one is NaN). The experts are
        written straight into a new tensor (a clone of a shared buffer costs more, cold)."""
        chosen = torch.empty(self.n_layers, self.top_k, dtype=torch.int32)
        with self._lock:
            self._bind(pos_BC, k, v)
            self.bufs.chosen = chosen.data_ptr()
            self._c_step(self._c_model_ref, self._c_bufs_ref, token, position, pos_BC.data_ptr(), pos_BC.shape[1],
                         slot, n, logits_1V.data_ptr(), torch.get_num_threads())
            return chosen, self._top.value

    def lora_table(self, factors: Sequence[Mapping[str, LowRank]]) -> LoraTable | None:
        """The adapters `factors` (each one's `adapter_factors`; adapter j of a step's rows is
        `factors[j]`) as `batch(lora=)` reads them, or None when one updates a weight the native step
        cannot update. An expert whose factors are zero (the adapter leaves it alone) gets no update."""
        D, H, G, Hd, F_, _, L = self._dims
        E, J = int(self.c_model.E), len(factors)
        sites = native.LORA_SITES
        # each site's (input, output) widths
        io = {"wqkv": (D, (H + 2 * G) * Hd), "wo": (H * Hd, D), "router": (D, E), "w13": (D, 2 * F_), "w2": (F_, D)}
        table = (native.Lora * (L * len(sites) * E * J))()
        rank, keep = 1, []
        for j, f in enumerate(factors):
            for name, lr in f.items():
                m = _LORA_NAME.fullmatch(name)
                if m is None or int(m[1]) >= L:
                    return None
                site = next(g for g in m.groups()[1:] if g is not None)
                site = "router" if site == "gate" else site
                stacked = m[4] is not None
                if site not in ("wqkv", "wo") and (stacked or site == "router") != self._moe:
                    return None  # an expert's factors over a dense FFN, or the reverse
                A, B = lr.A, lr.B
                n_in, n_out = io[site]
                lead = (E,) if stacked else ()
                R = A.shape[-2] if A.dim() >= 2 else 0
                if (A.shape != (*lead, R, n_in) or B.shape != (*lead, n_out, R) or R < 1
                        or any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()
                               for t in (A, B))):
                    return None
                rank = max(rank, R)
                B = B.transpose(-1, -2).contiguous()  # [.., R, X]: C sums 16 outputs in one vector
                keep += [A, B]
                for e in range(E if stacked else 1):
                    a, b = (A[e], B[e]) if stacked else (A, B)
                    if stacked and not b.any():
                        continue
                    table[((int(m[1]) * len(sites) + sites.index(site)) * E + e) * J + j] = native.Lora(
                        a.data_ptr(), b.data_ptr(), R)
        return LoraTable(table, J, rank, keep)

    def _batch_buffers(self, T: int, nt: int, C: int) -> None:
        """(Re)allocate the work buffers of `mx_decode_batch` for at least T tokens, nt threads and
        C positions per slot."""
        if all(a >= b for a, b in zip(self._batch_room, (T, nt, C), strict=True)):
            return
        T, nt, C = (max(a, b) for a, b in zip(self._batch_room, (T, nt, C), strict=True))
        D, H, G, Hd, F_, K, _ = self._dims
        N = T * K
        f32 = {"x": T * D, "h": T * D, "o": T * D, "qkv": T * (H + 2 * G) * Hd, "att": T * H * Hd,
               "rope": T * Hd, "scores": nt * (2 * Hd + 6) * ((C + 15) // 16 * 16),  # decode.c chunk_scratch
               "mix": T * K, "xs": N * D, "g": N * 2 * F_, "a": N * F_, "ys": N * D}
        bf = {"hb": T * D, "attb": T * H * Hd, "xsb": N * D, "ab": N * F_}
        keep = []
        for name, n in [*f32.items(), *bf.items()]:
            t = torch.empty(n, dtype=torch.float32 if name in f32 else torch.int16)
            keep.append(t)
            setattr(self.c_batch, name, t.data_ptr())
        for name, n, dtype in (("idx", N, torch.int64), ("order", N, torch.int32), ("inverse", N, torch.int32)):
            t = torch.empty(n, dtype=dtype)
            keep.append(t)
            setattr(self.c_batch, name, t.data_ptr())
        self._batch_keep = keep
        self.c_batch.nt = nt
        self._batch_room = (T, nt, C)

    def run_batch(self, tokens_T: torch.Tensor, positions_T: torch.Tensor, seqs_T: torch.Tensor,
                  rows_R: torch.Tensor, pos_SC: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor],
                  logits_RV: torch.Tensor, chosen_LTK: torch.Tensor) -> None:
        """The C call of `torch.ops.mixlab.decode_batch`: an engine step of T tokens, each sequence's
        tokens consecutive rows at consecutive positions (one decoding token or a prompt chunk of at
        most C), each sequence in its own slot of the pool `k`/`v` (`[S, G, C, Hd]` per layer,
        contiguous, float32 or bf16). Writes the logits of rows `rows_R` into `logits_RV` and every
        token's experts into `chosen_LTK`. Thread-safe."""
        tok, pos, seq, rows = (t.to(torch.int64).reshape(-1).tolist() for t in (tokens_T, positions_T, seqs_T, rows_R))
        if not (tokens_T.shape == positions_T.shape == seqs_T.shape == (len(tok),)):
            raise ValueError(f"decode_batch needs T >= 1 tokens, positions and slots of shape [T], not "
                             f"{tuple(tokens_T.shape)}, {tuple(positions_T.shape)}, {tuple(seqs_T.shape)}")
        self.batch(tok, pos, seq, rows, pos_SC, k, v, logits_RV, chosen_LTK)

    def batch(self, tokens: list[int], positions: list[int], seqs: list[int], rows: list[int], pos_SC: torch.Tensor,
              k: list[torch.Tensor], v: list[torch.Tensor], logits_RV: torch.Tensor,
              chosen_LTK: torch.Tensor, *, invariant: bool = False, lora: LoraTable | None = None,
              adapter: list[int] | None = None) -> list[int | None]:
        """`run_batch` from Python lists (what the engine calls eagerly: checking a step's few
        hundred integers in Python costs less than the tensor operations that would check them).
        Returns each logit row's argmax, computed in C as the rows were written (the first index on
        ties; None for a row holding NaN). `invariant`: batch-invariant arithmetic (`mx_batch`'s
        `invariant`: a row's numbers whatever else the step holds; slower). `lora` (`lora_table`)
        and `adapter`: each row's adapter in it, or -1 (the base)."""
        T, R, (S, C) = len(tokens), len(rows), pos_SC.shape
        L = self.n_layers
        if T < 1 or len(positions) != T or len(seqs) != T:
            raise ValueError(f"decode_batch needs T >= 1 tokens, positions and slots, not {T}, {len(positions)}, "
                             f"{len(seqs)}")
        _, _, G, Hd, _, _, _ = self._dims
        if len(k) != L or len(v) != L or any(t.shape != (S, G, C, Hd) or not t.is_contiguous() for t in (*k, *v)):
            raise ValueError(f"decode_batch needs {L} contiguous cache buffers per side of shape [S={S}, G={G}, C={C}, "
                             f"Hd={Hd}]")
        if pos_SC.dtype != torch.int64 or not pos_SC.is_contiguous():
            raise ValueError("decode_batch needs a contiguous int64 position table pos_SC")
        if min(seqs) < 0 or max(seqs) >= S:
            raise ValueError(f"decode_batch needs slots in [0, {S}), not {seqs}")
        seen: set[int] = set()
        run = 0
        for t in range(T):  # each slot's tokens: one run of consecutive positions, at most C long
            if t and seqs[t] == seqs[t - 1]:
                run += 1
                ok = positions[t] == positions[t - 1] + 1 and run <= C
            else:
                run = 1
                ok = seqs[t] not in seen
                seen.add(seqs[t])
            if not ok:
                raise ValueError(f"decode_batch needs each slot's tokens in one run of consecutive positions of at "
                                 f"most C={C} (distinct slots), not slots {seqs} at {positions}")
        if k[0].dtype not in (torch.float32, torch.bfloat16) or any(t.dtype != k[0].dtype for t in (*k, *v)):
            raise ValueError(f"decode_batch needs float32 or bf16 cache buffers of one dtype, not {k[0].dtype}")
        if min(tokens) < 0 or max(tokens) >= self.V or min(positions) < 0:
            raise ValueError(f"decode_batch needs tokens in [0, {self.V}) and positions >= 0")
        if R > T or (R and (min(rows) < 0 or max(rows) >= T)):
            raise ValueError(f"decode_batch needs at most T={T} logit rows in [0, {T}), not {rows}")
        if (logits_RV.shape != (R, self.V) or logits_RV.dtype != torch.float32 or not logits_RV.is_contiguous()
                or chosen_LTK.shape != (L, T, self.top_k) or chosen_LTK.dtype != torch.int32
                or not chosen_LTK.is_contiguous()):
            raise ValueError(f"decode_batch writes float32 logits [{R}, {self.V}] and int32 experts "
                             f"[{L}, {T}, {self.top_k}] (contiguous)")
        if (lora is None) != (adapter is None) or (adapter is not None and lora is not None and (
                len(adapter) != T or min(adapter) < -1 or max(adapter) >= lora.J)):
            raise ValueError(f"decode_batch needs a LoRA table with each of the T={T} rows' adapter in [-1, J), "
                             f"not {adapter}")
        tok, pos, seq, rws = (torch.tensor(x, dtype=torch.int64) for x in (tokens, positions, seqs, rows))
        top = torch.empty(R, dtype=torch.int64)
        nt = torch.get_num_threads()
        if lora is not None and adapter is not None:  # C moves the rows' adapters: a tensor of this call's own
            ad = torch.tensor(adapter, dtype=torch.int32)
            u = torch.empty((1 + nt) * T * self.top_k * lora.rank, dtype=torch.float32)  # mx_batch.lora_u
        with self._lock:
            self._batch_buffers(T, nt, C)
            for i in range(L):
                self._caches[i], self._caches[L + i] = k[i].data_ptr(), v[i].data_ptr()
            cb = self.c_batch
            cb.T, cb.C, cb.R = T, C, R
            cb.invariant = int(invariant)
            if lora is not None:
                cb.J, cb.lora, cb.adapter, cb.lora_u, cb.lora_ld = (
                    lora.J, ctypes.addressof(lora.table), ad.data_ptr(), u.data_ptr(), lora.rank)
            else:
                cb.J, cb.lora, cb.adapter, cb.lora_u, cb.lora_ld = 0, None, None, None, 0
            cb.token, cb.pos, cb.seq, cb.rows = tok.data_ptr(), pos.data_ptr(), seq.data_ptr(), rws.data_ptr()
            cb.cache_pos = pos_SC.data_ptr()
            cb.k_cache = ctypes.addressof(self._caches)
            cb.v_cache = ctypes.addressof(self._caches) + L * ctypes.sizeof(ctypes.c_void_p)
            cb.logits, cb.chosen, cb.top = logits_RV.data_ptr(), chosen_LTK.data_ptr(), top.data_ptr()
            self.c_model.ct = native.TYPE_CODES[k[0].dtype]
            self.lib.mx_decode_batch(ctypes.byref(self.c_model), ctypes.byref(cb), nt)
        return [i if i >= 0 else None for i in top.tolist()]

    def step(self, token: torch.Tensor | int, position: torch.Tensor | int, cache: KVCache) -> torch.Tensor:
        """Feed one token at `position`; return the next-token logits `[1, V]` (float32). The experts
        each layer chose are in `self.last_chosen` `[L, K]` afterwards (from several threads, use
        `step_experts`). Traceable by torch.compile."""
        return self.step_experts(token, position, cache)[0]

    def step_experts(self, token: torch.Tensor | int, position: torch.Tensor | int,
                     cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """`step`, returning (logits `[1, V]`, this step's experts `[L, K]` int32)."""
        return self.step_top(token, position, cache)[:2]

    def step_top(self, token: torch.Tensor | int, position: torch.Tensor | int,
                 cache: KVCache) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """`step_experts`, also returning the greedy token: the logits' argmax (the first index on
        ties, as NumPy's and PyTorch's), found by each thread over the logits it has just written
        (None when one of them is NaN). Reading 32k logits again in Python, once the step has
        streamed the weights through the CPU caches, costs ~45 us per token: ~2% of an int4 step."""
        if not torch.compiler.is_compiling():
            # Eager: call C directly. The operator's dispatch (`torch.library.custom_op` with mutated
            # arguments) costs more per call than everything else a step does in Python, ~0.3-0.7 ms
            # against a ~4-5 ms int4 step (BENCHMARKS.md, issue 16); the operator stays for torch.compile.
            token, position, t = int(token), int(position), cache.t
            if not (0 <= token < self.V and position >= 0):  # C would read past the embedding
                raise ValueError(f"a native step needs a token in [0, {self.V}) and a position >= 0, "
                                 f"not {token} at {position}")
            if t + 1 > cache.capacity:
                cache.slots(1)  # checks that the cache has room (and grows one made with `reserve`)
            logits_1V = torch.empty(1, self.V, dtype=torch.float32)
            chosen_LK, top = self._run(token, position, cache.pos_BC, cache.k, cache.v, t % cache.capacity,
                                       min(t + 1, cache.capacity), logits_1V)
            cache.t = t + 1
            self.last_chosen = chosen_LK
            return logits_1V, chosen_LK, top if top >= 0 else None
        cache.slots(1)  # checks that the cache has room (and grows one made with `reserve`)
        slot, n = cache.t % cache.capacity, cache.n_filled(1)
        logits_1V, chosen_LK = torch.ops.mixlab.decode_step(
            self.handle, torch.as_tensor(token).reshape(()), torch.as_tensor(position).reshape(()), cache.pos_BC,
            cache.k, cache.v, slot, n)
        cache.t += 1
        self.last_chosen = chosen_LK
        return logits_1V, chosen_LK, None


def attach(model: Transformer, *, warn: bool = True) -> bool:
    """Attach a `NativeDecoder` as `model.native_decoder` when the kernels and weights allow it
    (building the kernels unless cached: inference preparation asks for them). `warn`: when the
    kernels run here (AVX-512) but this model's shapes or weights keep them out, say why."""
    if not registry.prepare_native():
        return False
    lib = native.library()
    assert lib is not None
    try:
        model.native_decoder = NativeDecoder(model, lib)
    except ValueError as e:
        if warn and native.fast(torch.float32):
            warnings.warn(f"no native decoding ({e}): this model decodes with PyTorch's kernels", stacklevel=3)
        return False
    model.native_decoder.wait_huge_pages()  # preparation does the work now, not during the first steps
    return True


# Decoders over models that were not prepared (`shared_decoder`), one per model, dropped with it.
_SHARED: weakref.WeakKeyDictionary[Transformer, tuple[list[tuple[int, int]], NativeDecoder | None]] = (
    weakref.WeakKeyDictionary())
_SHARED_LOCK = threading.Lock()


def shared_decoder(model: Transformer) -> NativeDecoder | None:
    """A `NativeDecoder` over an unprepared model's own weights, kept for the model's lifetime (so
    repeated `generate` calls build it and collapse its pages once), or None when the kernels or
    the weights don't allow one. Rebuilt when a parameter was replaced or changed in place (the
    model can still be trained: the decoder reads its tensors, but holds float32 copies of the
    small bf16 norm and router vectors). Checking costs ~0.1 ms (every parameter's address and
    version): callers check when a batch starts, not every step. A model made under
    `torch.inference_mode()` holds inference tensors, which keep no version: only their
    replacement is seen."""
    lib = native.library() if model.tok_embeddings.weight.device.type == "cpu" else None
    if lib is None:
        return None
    key = [(p.data_ptr(), -1 if p.is_inference() else p._version) for p in model.parameters()]
    with _SHARED_LOCK:
        held = _SHARED.get(model)
        if held is not None and held[0] == key:
            return held[1]
        try:
            dec: NativeDecoder | None = NativeDecoder(model, lib)
        except ValueError:
            dec = None
        _SHARED[model] = (key, dec)
        return dec


def forget_shared(model: Transformer) -> None:
    """Drop the model's `shared_decoder` (and the references it holds to the model's tensors)."""
    with _SHARED_LOCK:
        _SHARED.pop(model, None)
