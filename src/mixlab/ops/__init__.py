"""Hot kernels behind one seam each; `reference` implementations are the oracles."""

from mixlab.ops.moe import IMPLS, moe_ffn

__all__ = ["IMPLS", "moe_ffn"]
