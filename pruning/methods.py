"""Every method the pipeline knows, by the name params.yaml uses, with the label tables and plots show.

This is the one registry: the params schema's enums must list exactly these names (a test checks it), and
``pruning.variant`` labels every model from it. Adding a method is one entry here plus its algorithm.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightMethod:
    """Pruning of expert weights. A score method keeps the weights with the highest |W_ij| * sqrt(S_j) for a
    column statistic S of its calibration pass (``statistic``; None = magnitude alone); a SparseGPT method
    prunes by OBS on a per-expert Hessian summed over the tokens of its ``hessian`` mode and updates the
    surviving weights."""

    name: str
    label: str
    statistic: str | None = None  # 'sum_x2' | 'sum_gx2' (pruning.calib.stats); score methods only
    hessian: str | None = None    # 'routed' | 'all_tokens' | 'gate_weighted' (pruning.weights.hessian)

    @property
    def updates_weights(self) -> bool:
        """True when the surviving weights change (the mask jobs also write updated weights)."""
        return self.hessian is not None


WEIGHT_METHODS = {m.name: m for m in (
    WeightMethod("magnitude", "Magnitude"),
    WeightMethod("wanda", "Wanda", statistic="sum_x2"),
    WeightMethod("moe_pruner", "MoE-Pruner", statistic="sum_gx2"),
    WeightMethod("sparsegpt", "SparseGPT", hessian="routed"),
    WeightMethod("sparsegpt_all_tokens", "SparseGPT (all tokens)", hessian="all_tokens"),
    WeightMethod("sparsegpt_gate_weighted", "router-weighted SparseGPT", hessian="gate_weighted"),
)}
SCORE_METHODS = tuple(n for n, m in WEIGHT_METHODS.items() if not m.updates_weights)
SPARSEGPT_METHODS = tuple(n for n, m in WEIGHT_METHODS.items() if m.updates_weights)


@dataclass(frozen=True)
class ExpertMethod:
    """Pruning of whole experts: ``search`` minimises the block reconstruction loss over dropped sets (NAEE),
    ``score`` keeps the experts with the highest routed-token score, ``random`` a seeded subset."""

    name: str
    label: str
    kind: str  # 'search' | 'score' | 'random'


EXPERT_METHODS = {m.name: m for m in (
    ExpertMethod("naee", "NAEE (layerwise)", "search"),
    ExpertMethod("naee_progressive", "NAEE (progressive)", "search"),
    ExpertMethod("frequency", "frequency", "score"),
    ExpertMethod("reap", "REAP", "score"),
    ExpertMethod("ean", "EAN", "score"),
    ExpertMethod("random", "random", "random"),
)}

# Fine-tuning of a weight-pruned model from the unpruned one (pruning.distill): the expert-wise distillation of
# MoE-Pruner, and its control with the next-token loss only.
TUNES = {"kd": "expert-wise KD", "ce": "CE-only control"}
