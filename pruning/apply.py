"""Assemble a pruned checkpoint: zero the masked expert weights and report the achieved sparsity."""
from __future__ import annotations

import torch


def _expert_params(adapter, layer, tensors: dict[str, torch.Tensor], what: str):
    """(parameter, tensor on its device and dtype) for the layer's fused expert weights, shapes checked."""
    experts = adapter.experts(layer)
    for name in ("gate_up_proj", "down_proj"):
        param = getattr(experts, name)
        if tensors[name].shape != param.shape:
            raise ValueError(f"{what} {name} has shape {tuple(tensors[name].shape)}, the model has {tuple(param.shape)}")
        yield param, tensors[name].to(param.device, param.dtype)


@torch.no_grad()
def apply_layer_masks(adapter, layer, masks: dict[str, torch.Tensor]) -> None:
    for param, mask in _expert_params(adapter, layer, masks, "mask"):
        param.mul_(mask)


@torch.no_grad()
def set_layer_weights(adapter, layer, weights: dict[str, torch.Tensor]) -> None:
    """Replace one layer's expert weights with updated ones (methods that change surviving weights)."""
    for param, new in _expert_params(adapter, layer, weights, "weights"):
        param.copy_(new)


def _frac_zero(t: torch.Tensor) -> float:
    return (t == 0).sum().item() / t.numel()


@torch.no_grad()
def sparsity_report(adapter, model) -> dict:
    """Achieved sparsity per matrix (gate, up, down) of every expert, per layer and over all experts.

    Router, attention, norms and embeddings are not pruned; their sparsity is reported as a check.
    """
    layers, zeros, total = {}, 0, 0
    for i in adapter.moe_layer_indices():
        layer = adapter.decoder_layers(model)[i]
        experts = adapter.experts(layer)
        inter = experts.down_proj.shape[-1]
        per_expert = []
        for e in range(adapter.num_experts):
            gu, dn = adapter.gate_up(experts, e), adapter.down(experts, e)
            per_expert.append({"gate": _frac_zero(gu[:inter]), "up": _frac_zero(gu[inter:]), "down": _frac_zero(dn)})
        z = int((experts.gate_up_proj == 0).sum() + (experts.down_proj == 0).sum())
        n = experts.gate_up_proj.numel() + experts.down_proj.numel()
        zeros, total = zeros + z, total + n
        layers[str(i)] = {"experts": per_expert, "layer": z / n, "router": _frac_zero(adapter.router(layer).weight)}
    other = [p for n, p in model.named_parameters() if "experts" not in n]
    other_zero = sum(int((p == 0).sum()) for p in other) / max(1, sum(p.numel() for p in other))
    return {"expert_sparsity": zeros / total, "layers": layers, "non_expert_sparsity": other_zero}


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
