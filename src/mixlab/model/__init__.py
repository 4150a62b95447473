"""The model: layers, the MoE block and the transformer."""

from mixlab.model.moe import MoEBlock, Routing, route
from mixlab.model.transformer import Transformer

__all__ = ["MoEBlock", "Routing", "Transformer", "route"]
