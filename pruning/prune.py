"""Per-layer mask computation for the expert matrices of one MoE layer.

Experts that no calibration token reaches have all-zero activation statistics, so every
activation-aware score would be 0 and the stable sort would prune the first columns of every row - an
arbitrary mask. Fallback (documented, recorded in the mask metadata): such experts are pruned by
weight magnitude at the same pattern.
"""
from __future__ import annotations

import torch

from .masks import Pattern, select_mask
from .scores import score, stat_key


def layer_masks(method: str, pattern: Pattern, gate_up: torch.Tensor, down: torch.Tensor, stats: dict | None):
    """gate_up (E, 2I, H), down (E, H, I) -> ({'gate_up_proj': mask, 'down_proj': mask}, info)."""
    num_experts = gate_up.shape[0]
    masks = {"gate_up_proj": torch.ones_like(gate_up, dtype=torch.bool), "down_proj": torch.ones_like(down, dtype=torch.bool)}
    fallback = []
    for e in range(num_experts):
        m = method
        if stat_key(method, "gate_up") is not None and int(stats["count"][e]) == 0:
            m = "magnitude"
            fallback.append(e)
        for key, weights, matrix in (("gate_up_proj", gate_up, "gate_up"), ("down_proj", down, "down")):
            sk = stat_key(m, matrix)
            s = score(m, weights[e], stats[sk][e] if sk else None)
            masks[key][e] = select_mask(s, pattern)
    return masks, {"fallback_experts": fallback, "fallback_method": "magnitude"}
