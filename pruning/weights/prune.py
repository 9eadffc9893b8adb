"""Per-layer pruning of the expert matrices of one MoE layer (``pruning.moe.Experts``).

Two kinds of methods (``pruning.methods.WEIGHT_METHODS``):
  score methods      magnitude, wanda, moe_pruner: a mask from importance scores and calibration statistics;
                     surviving weights are unchanged.
  SparseGPT methods  OBS pruning with weight updates, one per Hessian token mode (see ``hessian``):
                       sparsegpt                 routed tokens, unweighted (the papers' baseline)
                       sparsegpt_all_tokens      every token through every expert (llm-compressor's default)
                       sparsegpt_gate_weighted   routed tokens weighted by g^2: router-weighted SparseGPT
                     the gate, up and down projections of every expert are pruned as separate matrices (as
                     separate nn.Linear modules would be), from the same dense forward.

Experts that no calibration token reaches have all-zero statistics and Hessians, so an activation-aware method
would produce an arbitrary mask (every score 0) or, for SparseGPT, zero the whole expert. Fallback
(documented, recorded in the mask metadata): such experts are pruned by weight magnitude at the same
pattern, and their surviving weights are left unchanged.
"""
from __future__ import annotations

import torch

from ..methods import SPARSEGPT_METHODS, WEIGHT_METHODS
from ..moe import Experts, Routing
from .hessian import expert_hessians
from .masks import select_mask
from .pattern import Pattern
from .scores import score, stat_key
from .sparsegpt import sparsegpt


def _full_masks(experts: Experts) -> dict[str, torch.Tensor]:
    return {"gate_up": torch.ones_like(experts.gate_up, dtype=torch.bool),
            "down": torch.ones_like(experts.down, dtype=torch.bool)}


def layer_masks(method: str, pattern: Pattern, experts: Experts, stats: dict | None):
    """Score methods: ({'gate_up': mask (E, 2I, H), 'down': mask (E, H, I)}, info)."""
    masks = _full_masks(experts)
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


@torch.no_grad()
def layer_sparsegpt(
    method: str, pattern: Pattern, experts: Experts, inputs: torch.Tensor, routing: Routing,
    blocksize: int = 128, percdamp: float = 0.01, dtype=torch.float32, inplace: bool = False,
):
    """SparseGPT methods on one layer's experts from its cached MoE-block inputs (T, H) and their routing.

    Returns (masks, updated weights {'gate_up', 'down'} in the input dtype, info). With ``inplace`` the updated
    weights are ``experts``' own tensors, overwritten (a caller that read them for this alone saves a copy of the
    layer); each expert's Hessians are built before its weights change, so the result is the same.
    """
    if method not in SPARSEGPT_METHODS:
        raise ValueError(f"unknown SparseGPT method {method!r}; allowed: {', '.join(SPARSEGPT_METHODS)}")
    mode = WEIGHT_METHODS[method].hessian
    inter = experts.intermediate_size
    masks = _full_masks(experts)
    new = {k: w if inplace else w.clone(memory_format=torch.contiguous_format)
           for k, w in (("gate_up", experts.gate_up), ("down", experts.down))}
    fallback, tokens, damp, dead, loss = [], [], 0.0, 0, 0.0
    for e in range(experts.num_experts):
        h_in, h_mid, n = expert_hessians(mode, inputs, routing, e, experts, dtype=dtype)
        tokens.append(n)
        if n == 0:
            fallback.append(e)
            for key in ("gate_up", "down"):
                masks[key][e] = select_mask(new[key][e].abs(), pattern)
                new[key][e] *= masks[key][e]
            continue
        parts = (("gate_up", slice(0, inter), h_in), ("gate_up", slice(inter, 2 * inter), h_in),
                 ("down", slice(None), h_mid))
        for key, rows, hess in parts:
            w, keep, info = sparsegpt(new[key][e][rows], hess, pattern, blocksize, percdamp, dtype)
            new[key][e][rows], masks[key][e][rows] = w, keep
            damp, dead, loss = max(damp, info["damp"]), dead + info["dead_columns"], loss + info["obs_loss"]
    info = {
        "fallback_experts": fallback, "fallback_method": "magnitude", "hessian": mode, "tokens_per_expert": tokens,
        "max_damp": damp, "dead_columns": dead, "obs_loss": loss, "blocksize": blocksize, "percdamp": percdamp,
    }
    return masks, new, info
