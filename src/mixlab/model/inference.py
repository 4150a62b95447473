"""Turn a trained model into a fast CPU inference model, in place and one way (no autograd; the model
can no longer be trained or saved): `prepare_for_inference(model, quant=None, packed=None)`.

- default: batch-1 decoding runs through the native kernels (`mixlab.ops.native`, attached as
  `model.native_decoder`; `generate.decode_step` uses it), which stream each weight once at close
  to the memory bandwidth. They need the weights plain (row-major), so prefill and batched decoding
  run PyTorch's GEMMs on plain weights. If the kernels cannot be built (no C compiler,
  `MIXLAB_NATIVE=0`), the weights are packed instead (next point).
- `packed=True`: the matrices are packed once into oneDNN's blocked layout (what inductor's weight
  freezing does): 8-18% faster prefill and faster batched decoding than plain weights, but batch-1
  decoding through PyTorch's kernels (BENCHMARKS.md, "Inference speed"; the two layouts cannot
  coexist without doubling the memory).
- `quant="int8"`: the matrices become int8 with one scale per output row (`mixlab.ops.quant`):
  half the bytes of bf16 for memory-bound decoding (native kernels when available).

The token embedding is left alone (a lookup reads one row per token) and so is the router (tiny,
and float32 so that routing decisions do not move).
"""

from __future__ import annotations

import torch
from torch import nn

from mixlab.model import native
from mixlab.model.moe import MoEBlock
from mixlab.model.transformer import Transformer
from mixlab.ops.linear import InferenceLinear, can_pack, pack
from mixlab.ops.quant import Int8Linear, quantize_int8


def _replace_linears(model: Transformer, make: type[nn.Module], **kw: object) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and not (isinstance(module, MoEBlock) and name == "gate"):
                setattr(module, name, make(child, **kw))


def quantize_model_int8(model: Transformer) -> Transformer:
    """Int8 weight-only quantisation of every matrix except embedding and router, in place."""
    act_dtype = model.tok_embeddings.weight.dtype
    for block in model.modules():
        if isinstance(block, MoEBlock):
            for name in ("w13", "w2"):
                q, s = quantize_int8(getattr(block, name))
                delattr(block, name)
                block.register_buffer(name, q)
                block.register_buffer(name + "_scale", s.to(act_dtype))
    _replace_linears(model, Int8Linear, scale_dtype=act_dtype)
    return model.eval()


def pack_model(model: Transformer, *, packed: bool = True) -> Transformer:
    """Route every matrix except embedding and router through `ops.linear.linear`, in place;
    `packed`: in oneDNN's layout (experts: one packed matrix per expert)."""
    packed = packed and can_pack(model.output.weight)
    with torch.no_grad():
        if packed:
            for block in model.modules():
                if isinstance(block, MoEBlock):
                    for name in ("w13", "w2"):
                        stacked = getattr(block, name)
                        per_expert = [pack(stacked[e]) for e in range(stacked.shape[0])]
                        delattr(block, name)
                        setattr(block, name, per_expert)  # a plain list: moe_ffn indexes it like the stack
        _replace_linears(model, InferenceLinear, packed=packed)
    return model.eval().requires_grad_(False)


def prepare_for_inference(model: Transformer, *, quant: str | None = None, packed: bool | None = None) -> Transformer:
    """The fast CPU inference form of `model`, in place: native batch-1 decoding on plain (or int8,
    `quant="int8"`) weights when the native kernels are available, else (or with `packed=True`)
    oneDNN-packed weights."""
    if quant not in (None, "int8"):
        raise ValueError(f"unknown quantisation {quant!r}; expected None or 'int8'")
    if quant == "int8":
        if packed:
            raise ValueError("packed=True applies to float weights; int8 weights are not packed")
        quantize_model_int8(model).requires_grad_(False)
        native.attach(model)
        return model
    if packed is None:
        packed = not native.attach(model)
    elif not packed:
        native.attach(model)
    return pack_model(model, packed=packed)
