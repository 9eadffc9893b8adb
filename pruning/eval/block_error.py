"""What the per-layer methods optimise, measured directly: the MoE block's output error on calibration tokens.

With the router unchanged, pruning expert weights changes the block output y(x) = sum_{e in TopK(x)} g_e(x) E_e(x)
only through the experts. The relative error ||Y - Y'||_F / ||Y||_F over a layer's cached MoE-block inputs is
the quantity MoE-Pruner (diagonally) and router-weighted SparseGPT (fully) minimise.
"""
from __future__ import annotations

import torch

from ..moe import Experts, Routing


@torch.no_grad()
def relative_block_error(dense: Experts, pruned: Experts, inputs: torch.Tensor, routing: Routing) -> float:
    """||Y_dense - Y_pruned||_F / ||Y_dense||_F of the block on its inputs (T, H) and routing, in float64."""
    x = inputs.double()
    y = dense.block_output(x, routing, dtype=torch.float64)  # one expert in float64 at a time
    y_p = pruned.block_output(x, routing, dtype=torch.float64)
    return float(torch.linalg.norm(y - y_p) / torch.linalg.norm(y))
