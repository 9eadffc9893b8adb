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
    why = adapter.check_keep(keep)
    if why:
        raise ValueError(f"cannot keep {keep} experts: {why}")
    original = adapter.num_experts
    layers = adapter.decoder_layers(model)
    for i in adapter.moe_layer_indices():
        ks = sorted(kept[i])
        if len(set(ks)) != keep or ks[0] < 0 or ks[-1] >= original:
            raise ValueError(f"layer {i}: kept experts {ks} are not {keep} distinct indices below {original}")
        groups = adapter.groups()
        if groups and len({sum(e in g for e in ks) for g in groups}) != 1:
            raise ValueError(f"layer {i}: kept experts {ks} do not keep the same number in every router group {groups}")
        adapter.drop_experts(layers[i], ks)
    for key in adapter.expert_count_keys:  # every count the family's config holds (aliases included)
        if getattr(model.config, key, None) is not None:
            setattr(model.config, key, keep)
    setattr(model.config, PRUNED_KEY, {
        "original_num_experts": original, "kept": {str(i): sorted(kept[i]) for i in sorted(kept)}, **(info or {})})


def original_index(config, layer: int, num_experts: int) -> list[int]:
    """Original expert index of each expert of a (possibly reduced) model's layer."""
    p = getattr(config, PRUNED_KEY, None) if not isinstance(config, dict) else config.get(PRUNED_KEY)
    return list(p["kept"][str(layer)]) if p else list(range(num_experts))


def expert_saving(adapter, model, removed_per_layer: dict[int, int]) -> tuple[int, int]:
    """(parameters, tensor bytes) an exact removal saves, counted on the unpruned model: per removed expert of a
    layer, its slice of every per-expert tensor of the experts module and the router (weights, expert and router
    biases; a selection-bias buffer counts in bytes only, it is not a parameter)."""
    layers, n = adapter.decoder_layers(model), adapter.num_experts
    params = nbytes = 0
    for i, removed in removed_per_layer.items():
        for module in (adapter.experts(layers[i]), adapter.router_module(layers[i])):
            tensors = [(p, True) for p in module.parameters(recurse=False)] + [(b, False) for b in module.buffers(recurse=False)]
            for t, is_param in tensors:
                if t.dim() and t.shape[0] == n:
                    params += removed * t[0].numel() if is_param else 0
                    nbytes += removed * t[0].numel() * t.element_size()
    return params, nbytes


def stored_bytes(model) -> int:
    """Bytes of the tensors ``save_pretrained`` writes: every parameter and persistent buffer, tied ones once."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
