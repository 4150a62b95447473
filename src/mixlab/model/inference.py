"""Turn a trained model into a fast CPU inference model, in place and one way (no autograd; the model
can no longer be trained or saved): `prepare_for_inference(model, quant=None, packed=True)`.

- default (`packed=True`): the matrices are packed once into oneDNN's blocked layout (what
  inductor's weight freezing does): the fastest form measured end to end, for prefill, batched and
  batch-1 decoding (BENCHMARKS.md).
- `packed=False`: plain weights through `mixlab.ops.linear.linear`: the compiled GEMV of
  ops/gemv.py for one row, eager GEMM otherwise (faster than packed in isolated GEMV
  micro-benchmarks, ~6% slower for batch-1 decoding in the full model).
- `quant="int8"`: the matrices become int8 with one scale per output row (`mixlab.ops.quant`):
  half the bytes of bf16 for memory-bound decoding.

The token embedding is left alone (a lookup reads one row per token) and so is the router (tiny,
and float32 so that routing decisions do not move).
"""

from __future__ import annotations

import torch
from torch import nn

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


def prepare_for_inference(model: Transformer, *, quant: str | None = None, packed: bool = True) -> Transformer:
    """The fast CPU inference form of `model`, in place: int8 (`quant="int8"`), oneDNN-packed
    (default), or plain weights with compiled single-row kernels (`packed=False`)."""
    if quant is None:
        return pack_model(model, packed=packed)
    if quant == "int8":
        return quantize_model_int8(model).requires_grad_(False)
    raise ValueError(f"unknown quantisation {quant!r}; expected None or 'int8'")
