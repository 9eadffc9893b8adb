"""Expert removal, a real smaller model: remove dropped experts from the fused expert weights and the router, update the config.

The result is a standard checkpoint of the same family with fewer experts per layer (``from_pretrained`` loads
it with stock transformers). ``config.pruned_experts`` records the kept original indices per layer.
``reduce_experts`` works on a loaded model; ``reduce_checkpoint`` streams a checkpoint tensor by tensor into
the same result without loading it.
"""
from __future__ import annotations

import torch

PRUNED_KEY = "pruned_experts"


def check_kept(adapter, kept: dict[int, list[int]]) -> int:
    """The uniform number of experts ``kept`` keeps per MoE layer, or why it cannot (the config holds one expert
    count; a group-limited router needs the same number in every group)."""
    sizes = {len(v) for v in kept.values()}
    if len(sizes) != 1:
        raise ValueError(f"expert pruning must keep the same number of experts in every layer, got {sorted(sizes)}")
    keep = sizes.pop()
    why = adapter.check_keep(keep)
    if why:
        raise ValueError(f"cannot keep {keep} experts: {why}")
    original = adapter.num_experts
    for i in adapter.moe_layer_indices():
        ks = sorted(kept[i])
        if len(set(ks)) != keep or ks[0] < 0 or ks[-1] >= original:
            raise ValueError(f"layer {i}: kept experts {ks} are not {keep} distinct indices below {original}")
        groups = adapter.groups()
        if groups and len({sum(e in g for e in ks) for g in groups}) != 1:
            raise ValueError(f"layer {i}: kept experts {ks} do not keep the same number in every router group {groups}")
    return keep


def pruned_record(original: int, kept: dict[int, list[int]], info: dict | None = None) -> dict:
    """What ``config.pruned_experts`` records: the original count and the kept original indices per layer."""
    return {"original_num_experts": original, "kept": {str(i): sorted(kept[i]) for i in sorted(kept)}, **(info or {})}


@torch.no_grad()
def reduce_experts(adapter, model, kept: dict[int, list[int]], info: dict | None = None) -> None:
    """Keep ``kept[layer]`` (original expert indices) in every MoE layer, in place; the count must be uniform
    (the config holds one expert count)."""
    keep = check_kept(adapter, kept)
    original = adapter.num_experts
    layers = adapter.decoder_layers(model)
    for i in adapter.moe_layer_indices():
        adapter.drop_experts(layers[i], sorted(kept[i]))
    for key in adapter.expert_count_keys:  # every count the family's config holds (aliases included)
        if getattr(model.config, key, None) is not None:
            setattr(model.config, key, keep)
    setattr(model.config, PRUNED_KEY, pruned_record(original, kept, info))


def reduced_config(adapter, config: dict, kept: dict[int, list[int]], info: dict | None = None) -> dict:
    """A config.json (dict) with experts ``kept``: every expert count the family reads set to the kept number,
    and ``pruned_experts`` as ``reduce_experts`` records it."""
    keep = check_kept(adapter, kept)
    out = dict(config)
    for key in adapter.expert_count_keys:
        if out.get(key) is not None:
            out[key] = keep
    out[PRUNED_KEY] = pruned_record(adapter.num_experts, kept, info)
    return out


def checkpoint_expert_saving(checkpoint, table, kept: dict[int, list[int]]) -> tuple[int, int]:
    """(parameters, tensor bytes) removing the experts ``kept`` does not keep saves, counted on the base's
    headers (``models.rewrite.Checkpoint``): of every key the removal changes, the removed experts' rows of
    the index-selected ones and the whole of the dropped per-expert ones (a selection-bias buffer counts in
    bytes only, it is not a parameter)."""
    params = nbytes = 0
    for key, (new, rows) in checkpoint.removal(kept).items():
        info = checkpoint.tensors[key][1]
        if rows is not None:
            gone = info.numel - info.numel // info.shape[0] * len(rows)
        elif new is None:
            gone = info.numel
        else:
            continue  # renumbered
        params += gone if checkpoint.model_name(key) in table.roles else 0
        nbytes += gone * info.torch_dtype.itemsize
    return params, nbytes


def reduce_checkpoint(base_dir, out_dir, kept: dict[int, list[int]], info: dict | None = None, *,
                      trust_remote_code: bool = False, max_shard_size: int | None = None, finish=None) -> dict:
    """``reduce_experts`` on a checkpoint without loading it: the base streams tensor by tensor into ``out_dir``
    (``models.rewrite``), keeping its key layout and dtypes; the saving is checked exactly on the headers.

    Returns the counts before and after (parameters, tensor bytes of the indexed tensors), the saving the
    removed experts account for (``parameters_saved_expected``, ``tensor_bytes_saved_expected``), the expert
    counts and the stored element size of the experts' weights (``dtype_bytes``)."""
    from ..models.rewrite import DEFAULT_MAX_SHARD_SIZE, Checkpoint, checkpoint_sizes, model_table, rewrite_checkpoint

    base = Checkpoint(base_dir)
    adapter = base.adapter
    config = reduced_config(adapter, base.config, kept, info)
    table = model_table(base_dir, trust_remote_code)
    before = checkpoint_sizes(base_dir, table)
    expected, expected_bytes = checkpoint_expert_saving(base, table, kept)
    result = rewrite_checkpoint(base_dir, out_dir, kept=kept, config=config, finish=finish,
                                max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    after = checkpoint_sizes(out_dir, trust_remote_code=trust_remote_code)
    if after["tensor_bytes"] != result.tensor_bytes:
        raise AssertionError(f"the index holds {after['tensor_bytes']} tensor bytes, "
                             f"the rewrite wrote {result.tensor_bytes}")
    # the stored element size of the experts' weights: the first MoE layer's first routed key
    first = min((i, k) for k, (i, part) in base.parts.items() if part.name in adapter.param_names)[1]
    return {"num_experts_before": adapter.num_experts, "num_experts_after": check_kept(adapter, kept),
            "parameters_before": before["parameters"], "parameters_after": after["parameters"],
            "parameters_saved_expected": expected, "tensor_bytes_before": before["tensor_bytes"],
            "tensor_bytes_after": after["tensor_bytes"], "tensor_bytes_saved_expected": expected_bytes,
            "dtype_bytes": base.tensors[first][1].torch_dtype.itemsize}


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
