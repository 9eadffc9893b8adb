"""Expert removal, a real smaller model: remove dropped experts from the fused expert weights and the router, update the config.

The result is a standard checkpoint of the same family with fewer experts per layer (``from_pretrained`` loads
it with stock transformers). ``config.pruned_experts`` records the kept original indices per layer.
"""
from __future__ import annotations

import torch

PRUNED_KEY = "pruned_experts"


@torch.no_grad()
def reduce_experts(adapter, model, kept: dict[int, list[int]], info: dict | None = None) -> None:
    """Keep ``kept[layer]`` (original expert indices) in every MoE layer, in place; the count must be uniform
    (the config holds one expert count)."""
    sizes = {len(v) for v in kept.values()}
    if len(sizes) != 1:
        raise ValueError(f"expert pruning must keep the same number of experts in every layer, got {sorted(sizes)}")
    keep = sizes.pop()
    if keep < adapter.top_k:
        raise ValueError(f"cannot keep {keep} experts with top_k={adapter.top_k}")
    original = adapter.num_experts
    layers = adapter.decoder_layers(model)
    for i in adapter.moe_layer_indices():
        ks = sorted(kept[i])
        if len(set(ks)) != keep or ks[0] < 0 or ks[-1] >= original:
            raise ValueError(f"layer {i}: kept experts {ks} are not {keep} distinct indices below {original}")
        adapter.drop_experts(layers[i], ks)
    for key in adapter.expert_count_keys:
        setattr(model.config, key, keep)
    setattr(model.config, PRUNED_KEY, {
        "original_num_experts": original, "kept": {str(i): sorted(kept[i]) for i in sorted(kept)}, **(info or {})})


def original_index(config, layer: int, num_experts: int) -> list[int]:
    """Original expert index of each expert of a (possibly reduced) model's layer."""
    p = getattr(config, PRUNED_KEY, None) if not isinstance(config, dict) else config.get(PRUNED_KEY)
    return list(p["kept"][str(layer)]) if p else list(range(num_experts))


def expert_parameter_saving(gate_up_shape, down_shape, hidden: int, removed_per_layer: list[int]) -> int:
    """Parameters an exact removal saves: per removed expert its gate_up (2I x H) and down (H x I) slices
    and its router row (H)."""
    per_expert = gate_up_shape[-2] * gate_up_shape[-1] + down_shape[-2] * down_shape[-1] + hidden
    return per_expert * sum(removed_per_layer)
