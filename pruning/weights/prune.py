"""Per-layer pruning of the expert matrices of one MoE layer (``pruning.moe.Experts``) by the score methods
(``pruning.methods.WEIGHT_METHODS``): magnitude, wanda, moe_pruner, a mask from importance scores and
calibration statistics; surviving weights are unchanged. The SparseGPT methods' layer function is
``pruning.weights.sparsegpt.layer_sparsegpt`` (a module of its own, so that its jobs alone depend on it).

Experts that no calibration token reaches have all-zero statistics and Hessians, so an activation-aware method
would produce an arbitrary mask (every score 0). Fallback
(documented, recorded in the mask metadata): such experts are pruned by weight magnitude at the same
pattern, and their surviving weights are left unchanged.
"""
from __future__ import annotations

from ..moe import Experts
from .masks import full_masks, select_mask
from .pattern import Pattern
from .scores import score, stat_key


def layer_masks(method: str, pattern: Pattern, experts: Experts, stats: dict | None):
    """Score methods: ({'gate_up': mask (E, 2I, H), 'down': mask (E, H, I)}, info)."""
    masks = full_masks(experts)
    fallback = []
    for e in range(experts.num_experts):
        m = method
        if stat_key(method, "gate_up") is not None and int(stats["count"][e]) == 0:
            m = "magnitude"
            fallback.append(e)
        for key, weights, matrix in (("gate_up", experts.gate_up, "gate_up"), ("down", experts.down, "down")):
            sk = stat_key(m, matrix)
            s = score(m, weights[e], stats[sk][e] if sk else None)
            masks[key][e] = select_mask(s, pattern)
    return masks, {"fallback_experts": fallback, "fallback_method": "magnitude"}
