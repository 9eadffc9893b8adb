"""Layer-by-layer streaming calibration: run decoder layers over the calibration tokens, observing the experts.

Only one decoder layer's activations (hidden states of all calibration samples entering that layer)
are held at a time. Layers come from a ``LayerSource``; ``ResidentSource`` wraps a loaded model. A source
that materialises each decoder layer from the checkpoint shards on demand implements the same three
methods, and nothing here assumes the whole model is resident.
"""
from __future__ import annotations

import contextlib

import torch

from .stats import LayerStats


class ResidentSource:
    """A ``LayerSource`` over a model loaded whole (``pruning.models.checkpoint.load_model``)."""

    def __init__(self, model, adapter, device="cpu"):
        self.model, self.adapter, self.device = model, adapter, device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.adapter.embed(self.model, input_ids.to(self.device))

    def context(self, seqlen: int) -> dict:
        return self.adapter.layer_context(self.model, seqlen, self.device)

    @contextlib.contextmanager
    def layer(self, i: int):
        yield self.adapter.decoder_layers(self.model)[i]


@torch.no_grad()
def embed(source, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Hidden states entering the first decoder layer for token windows (N, L): (N, L, H)."""
    return torch.cat([source.embed(tokens[i : i + batch_size]) for i in range(0, tokens.shape[0], batch_size)])


@torch.no_grad()
def run_layer(layer, hidden: torch.Tensor, ctx: dict, batch_size: int) -> torch.Tensor:
    """Plain forward of one decoder layer over all samples, ``batch_size`` samples at a time."""
    return torch.cat([layer(hidden[i : i + batch_size], **ctx) for i in range(0, hidden.shape[0], batch_size)])


@torch.no_grad()
def calibrate_layer(adapter, layer, hidden: torch.Tensor, ctx: dict, batch_size: int):
    """Forward one decoder layer while observing its experts.

    Returns (layer output (N, L, H), MoE-block inputs (N*L, H), statistics dict).
    """
    experts = adapter.expert_weights(layer)
    stats = LayerStats(adapter.num_experts, adapter.config.hidden_size, experts.intermediate_size, hidden.device)
    inputs: list[torch.Tensor] = []

    def on_call(h, routing):
        inputs.append(h.detach().cpu())
        stats.add_routing(routing)

    with adapter.observe_experts(layer, on_call=on_call, on_expert=lambda e, tok, x, g, h: stats.add_expert(e, x, g, h)):
        out = run_layer(layer, hidden, ctx, batch_size)
    return out, torch.cat(inputs), stats.finalize()


@torch.no_grad()
def stream(source, adapter, tokens: torch.Tensor, batch_size: int, layers=None, progress=True):
    """Dense propagation: yield (layer index, MoE inputs, stats) for each MoE layer, in one pass."""
    layers = adapter.moe_layer_indices() if layers is None else layers
    hidden = embed(source, tokens, batch_size)
    ctx = source.context(tokens.shape[1])
    it = range(max(layers) + 1)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="calibrate", unit="layer")
    for i in it:
        with source.layer(i) as layer:
            if i in layers:
                hidden, moe_inputs, st = calibrate_layer(adapter, layer, hidden, ctx, batch_size)
                yield i, moe_inputs, st
            else:
                hidden = run_layer(layer, hidden, ctx, batch_size)
