"""What the per-layer methods optimise, measured directly: the MoE block's output error on calibration tokens.

With the router unchanged, pruning expert weights changes the block output y(x) = sum_{e in TopK(x)} g_e(x) E_e(x)
only through the experts. The relative error ||Y - Y'||_F / ||Y||_F over a layer's cached MoE-block inputs is
the quantity MoE-Pruner (diagonally) and router-weighted SparseGPT (fully) minimise.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..moe import Experts, Routing


@torch.no_grad()
def relative_block_error(dense: Experts, pruned: Experts | Callable[[int], Experts], inputs: torch.Tensor,
                         routing: Routing) -> float:
    """||Y_dense - Y_pruned||_F / ||Y_dense||_F of the block on its inputs (T, H) and routing, in float64, where
    Y = sum over each token's routed experts of g * f_e(x). ``pruned``: the pruned experts, or a function giving
    pruned expert e alone (a one-expert ``Experts``) when its turn comes, so that only one pruned expert exists
    at a time; each expert is cast to float64 on its own."""
    x = inputs.double()
    one = pruned if callable(pruned) else pruned.expert
    y, y_p = torch.zeros_like(x), torch.zeros_like(x)
    for e in range(dense.num_experts):
        token, g = routing.tokens_of(e)
        if token.numel() == 0:
            continue
        xe, g = x[token], g[:, None].double()
        y.index_add_(0, token, dense.expert(e, torch.float64).output(0, xe) * g)
        y_p.index_add_(0, token, one(e).to(torch.float64).output(0, xe) * g)
    return float(torch.linalg.norm(y - y_p) / torch.linalg.norm(y))
