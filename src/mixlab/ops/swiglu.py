"""SwiGLU, the feed-forward of Mistral and Mixtral (Shazeer 2020, arXiv 2002.05202), written once
for the PyTorch paths: the dense FFN, every expert implementation of `mixlab.ops.moe` and the
reference loop. The Triton and C kernels fuse it into their own matmuls.

Shape legend: N rows, F FFN width.
"""

import torch
import torch.nn.functional as F


def swiglu(h_N2F: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up on the output of the fused projection `w13` (columns [0, F) the gate w1,
    [F, 2F) the up projection w3): the input of the down projection w2."""
    gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
    return F.silu(gate_NF) * up_NF
