"""Assemble a pruned model: write one layer's masks, and a SparseGPT method's updated weights, into the model."""
from __future__ import annotations

import torch

SHARED = "shared."  # the prefix of the shared experts' masks and weights in a layer's files


def layer_params(adapter, layer, tensors: dict[str, torch.Tensor], what: str):
    """(parameter, tensor in its layout, device and dtype) for the layer's expert weights (and the shared experts'
    where ``tensors`` hold them), shapes checked."""
    for _, param, t in adapter.paired_params(layer, tensors, what):
        yield param, t.to(param.device, param.dtype)
    shared = {k[len(SHARED):]: v for k, v in tensors.items() if k.startswith(SHARED)}
    if shared:  # the shared experts, when params prune them
        for param, t in adapter.shared_paired_params(layer, shared, what):
            yield param, t.to(param.device, param.dtype)


@torch.no_grad()
def apply_layer_masks(adapter, layer, masks: dict[str, torch.Tensor]) -> None:
    for param, mask in layer_params(adapter, layer, masks, "mask"):
        param.mul_(mask)


@torch.no_grad()
def set_layer_weights(adapter, layer, weights: dict[str, torch.Tensor]) -> None:
    """Replace one layer's expert weights with updated ones (methods that change surviving weights)."""
    for param, new in layer_params(adapter, layer, weights, "weights"):
        param.copy_(new)


def prune_layer(adapter, layer, masks: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None = None) -> None:
    """A layer as its mask job left it: the updated weights (if the method has them), then the masks."""
    if weights is not None:
        set_layer_weights(adapter, layer, weights)
    apply_layer_masks(adapter, layer, masks)
