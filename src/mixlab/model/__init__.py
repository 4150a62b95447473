"""The model: layers, the MoE block and the transformer."""

from mixlab.model.moe import Experts, ExpertsBase, MoEBlock, Router, Routing, route
from mixlab.model.transformer import ModelOutput, Transformer, check_model

__all__ = ["Experts", "ExpertsBase", "ModelOutput", "MoEBlock", "Router", "Routing", "Transformer", "check_model",
           "route"]
