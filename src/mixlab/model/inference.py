"""Turn a trained model into a fast CPU inference model: oneDNN-packed weights, or int8 weight-only.

Both are one-way, in-place transformations for inference (no autograd; the model can no longer be
saved or trained), chosen by `prepare_for_inference(model, quant=...)`:

- `quant=None` (default): every matrix but the embedding and the router is packed once into oneDNN's
  blocked layout (`mixlab.ops.linear`), what inductor's weight freezing does, without compiling;
  the numbers are bit-identical to the unpacked model on the same kernels' arithmetic (bf16 or f32).
- `quant="int8"`: the same matrices become int8 with one scale per output row (`mixlab.ops.quant`):
  half the bytes of bf16 for memory-bound decoding.

The token embedding is left alone (a lookup reads one row per token) and so is the router (tiny,
and float32 so that routing decisions do not move).
"""

from __future__ import annotations

import torch
from torch import nn

from mixlab.model.moe import MoEBlock
from mixlab.model.transformer import Transformer
from mixlab.ops.linear import PackedLinear, can_pack, pack
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


def pack_model(model: Transformer) -> Transformer:
    """Pack every matrix except embedding and router for oneDNN, in place (experts: one per expert)."""
    if not can_pack(model.output.weight):
        return model.eval()
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, MoEBlock):
                for name in ("w13", "w2"):
                    stacked = getattr(block, name)
                    packed = [pack(stacked[e]) for e in range(stacked.shape[0])]
                    delattr(block, name)
                    setattr(block, name, packed)  # a plain list: moe_ffn indexes it like the stacked tensor
        _replace_linears(model, PackedLinear)
    return model.eval()


def prepare_for_inference(model: Transformer, *, quant: str | None = None) -> Transformer:
    """The fastest CPU inference form of `model`, in place: int8 (`quant="int8"`) or packed."""
    if quant is None:
        return pack_model(model)
    if quant == "int8":
        return quantize_model_int8(model)
    raise ValueError(f"unknown quantisation {quant!r}; expected None or 'int8'")
