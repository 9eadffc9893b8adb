"""Layer-by-layer streaming calibration: run decoder layers over the calibration tokens, observing the experts.

Only one decoder layer's activations (hidden states of all calibration samples entering that layer)
are held at a time. Layers come from a layer source (``pruning.models.layer_source``): a model loaded whole,
or one decoder layer at a time built from the checkpoint's shards; nothing here assumes the whole model is
resident.
"""
from __future__ import annotations

import torch

from .stats import LayerStats


@torch.no_grad()
def embed(source, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Hidden states entering the first decoder layer for token windows (N, L): (N, L, H)."""
    return torch.cat([source.embed(tokens[i : i + batch_size]) for i in range(0, tokens.shape[0], batch_size)])


@torch.no_grad()
def run_layer(layer, hidden: torch.Tensor, ctx: dict, batch_size: int) -> torch.Tensor:
    """Plain forward of one decoder layer over all samples, ``batch_size`` samples at a time."""
    return torch.cat([layer(hidden[i : i + batch_size], **ctx) for i in range(0, hidden.shape[0], batch_size)])


@torch.no_grad()
def run_layers(source, hidden: torch.Tensor, start: int, stop: int, batch_size: int) -> torch.Tensor:
    """Plain forward of decoder layers [start, stop) (e.g. the dense layers between two MoE layers)."""
    for k in range(start, stop):
        with source.layer(k) as layer:
            hidden = run_layer(layer, hidden, source.context(hidden.shape[1], k), batch_size)
    return hidden


@torch.no_grad()
def calibrate_layer(adapter, layer, hidden: torch.Tensor, ctx: dict, batch_size: int):
    """Forward one decoder layer while observing its experts.

    Returns (layer output (N, L, H), MoE-block inputs (N*L, H), statistics dict).
    """
    experts = adapter.expert_weights(layer)
    stats = LayerStats(adapter.num_experts, adapter.config.hidden_size, experts.intermediate_size, hidden.device)
    inputs: list[torch.Tensor] = []
    shared = shared_stats = None
    if adapter.has_shared_experts:  # an always-routed expert, with combine weight 1 or its sigmoid gate
        shared, shared_gate = adapter.shared_expert_weights(layer), adapter.shared_gate_weight(layer)
        shared_stats = LayerStats(1, adapter.config.hidden_size, shared.intermediate_size, hidden.device)

    def on_call(h, routing):
        inputs.append(h.detach().cpu())
        stats.add_routing(routing)
        if shared is not None:
            shared_stats.add_expert(0, h, adapter.shared_combine(shared_gate, h), shared.intermediate(0, h))

    with adapter.observe_experts(layer, on_call=on_call, on_expert=lambda e, tok, x, g, h: stats.add_expert(e, x, g, h)):
        out = run_layer(layer, hidden, ctx, batch_size)
    st = stats.finalize()
    if shared_stats is not None:
        st.update({f"shared.{k}": v for k, v in shared_stats.finalize().items() if not k.startswith("router.")})
    return out, torch.cat(inputs), st


@torch.no_grad()
def stream(source, adapter, tokens: torch.Tensor, batch_size: int, layers=None, progress=True):
    """Dense propagation: yield (layer index, MoE inputs, stats) for each MoE layer, in one pass."""
    layers = adapter.moe_layer_indices() if layers is None else layers
    hidden = embed(source, tokens, batch_size)
    it = range(max(layers) + 1)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="calibrate", unit="layer")
    for i in it:
        with source.layer(i) as layer:
            if i in layers:
                hidden, moe_inputs, st = calibrate_layer(adapter, layer, hidden, source.context(tokens.shape[1], i),
                                                         batch_size)
                yield i, moe_inputs, st
            else:
                hidden = run_layer(layer, hidden, source.context(tokens.shape[1], i), batch_size)
