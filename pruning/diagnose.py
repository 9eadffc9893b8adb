"""What the per-layer methods optimise, measured directly: the MoE block's output error on calibration tokens.

With the router unchanged, pruning expert weights changes the block output y(x) = sum_{e in TopK(x)} g_e(x) E_e(x)
only through the experts. The relative error ||Y - Y'||_F / ||Y||_F over a layer's cached MoE-block inputs is
the quantity MoE-Pruner (diagonally) and router-weighted SparseGPT (fully) minimise.
"""
from __future__ import annotations

import torch

from .hessian import Routing, swiglu


@torch.no_grad()
def moe_block_output(gate_up: torch.Tensor, down: torch.Tensor, act, inputs: torch.Tensor, routing: Routing) -> torch.Tensor:
    """y (T, H) of the experts for routed inputs (T, H), in float64."""
    x = inputs.double()
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        token, g = routing.tokens_of(e)
        if token.numel():
            y = torch.nn.functional.linear(swiglu(x[token], gate_up[e].double(), act), down[e].double())
            out.index_add_(0, token, y * g.double()[:, None])
    return out


@torch.no_grad()
def relative_block_error(dense: tuple, pruned: tuple, act, inputs: torch.Tensor, routing: Routing) -> float:
    """||Y_dense - Y_pruned||_F / ||Y_dense||_F with ``dense``/``pruned`` = (gate_up, down)."""
    y = moe_block_output(*dense, act, inputs, routing)
    y_p = moe_block_output(*pruned, act, inputs, routing)
    return float(torch.linalg.norm(y - y_p) / torch.linalg.norm(y))


def channel_outlier_ratio(sum_x2: torch.Tensor) -> float:
    """Largest over median input-channel norm, sqrt(sum over experts and routed tokens of x_j^2): (E, H) -> scalar.

    Near 1: no outlier features, so activation-aware scores (Wanda, MoE-Pruner) rank weights almost like magnitude.
    """
    norms = sum_x2.double().sum(0).sqrt()
    return float(norms.max() / norms.median())
