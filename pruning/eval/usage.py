"""Expert usage during a forward: how many expert calls each layer makes per token.

Counts the (token, expert) pairs the experts module receives, leaving out sentinel slots (index >= number
of experts, e.g. skipped second experts), so the count is the expert computations actually run.
"""
from __future__ import annotations

import contextlib

import torch


class ExpertUsage:
    def __init__(self):
        self.counts: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, int] = {}

    def summary(self, original_index=None) -> dict:
        """Per layer: tokens, expert calls, calls per token, and selections per original expert index."""
        layers = {}
        for i in sorted(self.counts):
            c = self.counts[i].tolist()
            orig = original_index(i, len(c)) if original_index else list(range(len(c)))
            layers[str(i)] = {
                "tokens": self.tokens[i], "calls": int(sum(c)), "calls_per_token": sum(c) / max(self.tokens[i], 1),
                "selections": {str(o): int(n) for o, n in zip(orig, c)},
            }
        mean = sum(v["calls_per_token"] for v in layers.values()) / max(len(layers), 1)
        return {"calls_per_token": mean, "layers": layers}


@contextlib.contextmanager
def count_expert_calls(adapter, model):
    usage = ExpertUsage()
    stack = contextlib.ExitStack()
    for i in adapter.moe_layer_indices():
        n = adapter.num_experts

        def on_call(h, routing, i=i, n=n):
            usage.counts[i] = usage.counts.get(i, torch.zeros(n, dtype=torch.long)) + routing.counts(n)
            usage.tokens[i] = usage.tokens.get(i, 0) + h.shape[0]

        stack.enter_context(adapter.observe_experts(adapter.decoder_layers(model)[i], on_call=on_call))
    with stack:
        yield usage
