"""Assemble a pruned model: write one layer's masks, and a SparseGPT method's updated weights, into the model."""
from __future__ import annotations

import torch


def _expert_params(adapter, layer, tensors: dict[str, torch.Tensor], what: str):
    """(parameter, tensor on its device and dtype) for the layer's fused expert weights, shapes checked."""
    for name, param in adapter.expert_params(layer).items():
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


def prune_layer(adapter, layer, masks: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None = None) -> None:
    """A layer as its mask job left it: the updated weights (if the method has them), then the masks."""
    if weights is not None:
        set_layer_weights(adapter, layer, weights)
    apply_layer_masks(adapter, layer, masks)
