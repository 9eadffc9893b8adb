"""What pruning produced, measured: achieved sparsity of every expert matrix, and exact N:M checks."""
from __future__ import annotations

import torch


def _frac_zero(t: torch.Tensor) -> float:
    return (t == 0).sum().item() / t.numel()


@torch.no_grad()
def sparsity_report(adapter, model) -> dict:
    """Achieved sparsity per matrix (gate, up, down) of every expert, per layer and over all experts.

    Router, attention, norms and embeddings are not pruned; their sparsity is reported as a check. A rewritten
    checkpoint's is computed as it streams (``SparsityTally``, ``models.rewrite``), the same dict.
    """
    layers, zeros, total = {}, 0, 0
    for i in adapter.moe_layer_indices():
        layer = adapter.decoder_layers(model)[i]
        ex = adapter.expert_weights(layer)
        inter = ex.intermediate_size
        per_expert = []
        for e in range(ex.num_experts):
            gu, dn = ex.gate_up[e], ex.down[e]
            per_expert.append({"gate": _frac_zero(gu[:inter]), "up": _frac_zero(gu[inter:]), "down": _frac_zero(dn)})
        z = int((ex.gate_up == 0).sum() + (ex.down == 0).sum())
        n = ex.gate_up.numel() + ex.down.numel()
        zeros, total = zeros + z, total + n
        layers[str(i)] = {"experts": per_expert, "layer": z / n, "router": _frac_zero(adapter.router(layer).weight)}
    roles = adapter.parameter_roles(model)
    out = {"expert_sparsity": zeros / total, "layers": layers}
    shared = [p for n, p in model.named_parameters() if roles[n] == "shared"]
    if shared:  # shared experts (and their gate): dense unless params prune them
        out["shared_expert_sparsity"] = sum(int((p == 0).sum()) for p in shared) / sum(p.numel() for p in shared)
    other = [p for n, p in model.named_parameters() if roles[n] in ("router", "dense")]
    out["non_expert_sparsity"] = sum(int((p == 0).sum()) for p in other) / max(1, sum(p.numel() for p in other))
    return out


def count_zeros(t: torch.Tensor) -> int:
    """Zeros in a tensor (-0.0 included, as ``t == 0``), without a temporary the size of the tensor."""
    return t.numel() - int(torch.count_nonzero(t))


class SparsityTally:
    """``sparsity_report`` from zero counts handed over while a checkpoint streams past (``models.rewrite``),
    never the model: each routed expert's gate, up and down per MoE layer, each layer's router weight, and the
    other parameters by role ('shared': shared experts and their gate; 'router' and 'dense': the rest). Counts
    are integers, so the fractions equal the model-based report's exactly."""

    def __init__(self, adapter):
        self.num_experts = adapter.num_experts
        self.experts: dict[int, dict[tuple[int, str], list[int]]] = {i: {} for i in adapter.moe_layer_indices()}
        self.routers: dict[int, tuple[int, int]] = {}
        self.shared: list[int] | None = None  # [zeros, numel], None while no shared parameter was seen
        self.other = [0, 0]

    def expert(self, layer: int, expert: int, matrix: str, zeros: int, numel: int) -> None:
        c = self.experts[layer].setdefault((expert, matrix), [0, 0])
        c[0] += zeros
        c[1] += numel

    def router(self, layer: int, zeros: int, numel: int) -> None:
        self.routers[layer] = (zeros, numel)

    def parameter(self, role: str, zeros: int, numel: int) -> None:
        if role == "shared":
            self.shared = self.shared or [0, 0]
            self.shared[0] += zeros
            self.shared[1] += numel
        elif role in ("router", "dense"):
            self.other[0] += zeros
            self.other[1] += numel

    def report(self) -> dict:
        layers, zeros, total = {}, 0, 0
        for i, counts in self.experts.items():
            missing = [(e, m) for e in range(self.num_experts) for m in ("gate", "up", "down") if (e, m) not in counts]
            if missing or i not in self.routers:
                raise ValueError(f"layer {i}: no zero counts for {missing[:3] or 'the router'}")
            per_expert = [{m: counts[e, m][0] / counts[e, m][1] for m in ("gate", "up", "down")}
                          for e in range(self.num_experts)]
            z, n = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
            zeros, total = zeros + z, total + n
            rz, rn = self.routers[i]
            layers[str(i)] = {"experts": per_expert, "layer": z / n, "router": rz / rn}
        out = {"expert_sparsity": zeros / total, "layers": layers}
        if self.shared:
            out["shared_expert_sparsity"] = self.shared[0] / self.shared[1]
        out["non_expert_sparsity"] = self.other[0] / max(1, self.other[1])
        return out


def nm_zero_counts(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Zeros in every group of M consecutive input weights of every row: (..., rows, cols // M)."""
    rows, cols = weight.shape[-2:]
    return (weight.reshape(-1, rows, cols // m, m) == 0).sum(-1)


def check_nm(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> None:
    """Exact N:M: the mask prunes exactly N of every M, every pruned weight is 0, and every group holds exactly
    N zeros unless a kept weight is itself 0 (a dead input column zeroed by SparseGPT, or a zero in the base)."""
    rows, cols = mask.shape[-2:]
    pruned = (~mask).reshape(-1, rows, cols // m, m).sum(-1)
    if not bool((pruned == n).all()):
        raise AssertionError(f"mask does not prune exactly {n} of every {m}")
    if bool((weight[~mask] != 0).any()):
        raise AssertionError("a pruned weight is not zero")
    zeros = nm_zero_counts(weight, m)
    kept_zero = nm_zero_counts(torch.where(mask, weight, torch.ones_like(weight)), m)
    if not bool((zeros == n + kept_zero).all()):
        raise AssertionError(f"a group of {m} does not hold exactly {n} pruned zeros")


def check_layer_nm(adapter, layer, masks: dict[str, torch.Tensor], n: int, m: int) -> None:
    """``check_nm`` on both expert matrices of one layer (canonical layout: groups run along the inputs), and on
    the shared experts' when they were pruned."""
    for name, param in adapter.expert_params(layer).items():
        check_nm(adapter.canonical(name, param.detach()), masks[name], n, m)
    if "shared.gate_up" in masks:
        shared = adapter.shared_expert_weights(layer)
        check_nm(shared.gate_up.detach(), masks["shared.gate_up"], n, m)
        check_nm(shared.down.detach(), masks["shared.down"], n, m)
