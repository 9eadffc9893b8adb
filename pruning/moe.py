"""MoE primitives: routing, the tokens of each expert, one expert's forward, the block output.

Every consumer (calibration statistics, Hessians, the NAEE objective, the REAP/EAN/frequency scores, dynamic
skipping's usage counts, the block-error diagnostic, distillation) computes these through this module, never on
its own. What differs between model families (how logits become combine weights, where the weights live) comes
from the family's adapter (``pruning.models``): the adapter hands over its router's ``route_logits`` and its
experts as an ``Experts`` value in the canonical layout below.

For a token x (H,), with R the router weight (E, H), the block computes

    logits = R x                                   (E,)
    (idx, g) = route_logits(logits)                top-k experts and their combine weights (family-specific)
    y = sum_j g_j * f_{idx_j}(x)                   f_e(x) = W_down,e (act(W_gate,e x) * (W_up,e x))   (SwiGLU)

Removing expert e from the choice is its logit set to -inf (``route(..., dropped=[e])``), which for a plain
softmax/top-k router equals deleting its router row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

# route_logits(logits (T, E)) -> (top_k_index (T, k), top_k_weights (T, k)): a family's routing rule.
RouteLogits = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Routing:
    """The top-k routing of T tokens: ``index`` (T, k) the chosen experts, ``weights`` (T, k) their combine
    weights. An index >= the number of experts is a sentinel: that slot computes nothing (a skipped expert)."""

    index: torch.Tensor
    weights: torch.Tensor

    def tokens_of(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices routed to expert ``e`` (ascending) and their combine weights: (n,), (n,)."""
        token, slot = torch.where(self.index == e)  # token-major: each token holds e at most once
        return token, self.weights[token, slot]

    def dense(self, num_experts: int) -> torch.Tensor:
        """The (T, E) float64 combine-weight matrix: g where a token chose the expert, 0 elsewhere."""
        out = torch.zeros(self.index.shape[0], num_experts, dtype=torch.float64, device=self.index.device)
        return out.scatter_add_(1, self.index, self.weights.to(torch.float64))

    def counts(self, num_experts: int) -> torch.Tensor:
        """Selections per expert (E,), int64 on the CPU; sentinel slots are left out."""
        chosen = self.index[self.index < num_experts]
        return torch.bincount(chosen.flatten().cpu(), minlength=num_experts)[:num_experts]


def route(route_logits: RouteLogits, logits: torch.Tensor, dropped: Sequence[int] = ()) -> Routing:
    """Routing from router logits (T, E); the experts in ``dropped`` are removed from the choice (logit -inf)."""
    if dropped:
        logits = logits.clone()
        logits[:, list(dropped)] = float("-inf")
    index, weights = route_logits(logits)
    return Routing(index, weights)


def route_tokens(route_logits: RouteLogits, router_weight: torch.Tensor, x: torch.Tensor, chunk: int = 8192) -> Routing:
    """Routing of MoE-block inputs x (T, H) through a router weight (E, H), ``chunk`` tokens at a time."""
    parts = [route(route_logits, nn.functional.linear(x[i : i + chunk], router_weight)) for i in range(0, x.shape[0], chunk)]
    return Routing(torch.cat([p.index for p in parts]), torch.cat([p.weights for p in parts]))


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, act) -> torch.Tensor:
    """One expert's SwiGLU intermediate act(x W_gate^T) * (x W_up^T), the input of down_proj: (n, H) -> (n, I).

    ``gate_up`` (2I, H): rows [0, I) are the gate, [I, 2I) the up projection."""
    gate, up = nn.functional.linear(x, gate_up).chunk(2, dim=-1)
    return act(gate) * up


# on_expert(e, token (n,), x (n, H), g (n,), h (n, I) or None when n == 0): sees each expert's routed tokens
ExpertObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class Experts:
    """One MoE layer's routed experts in the canonical layout (nn.Linear orientation, (out, in)):
    ``gate_up`` (E, 2I, H), ``down`` (E, H, I), ``act`` the gate activation. The tensors may be a model's own
    parameters (gradients flow through every method) or copies read from the checkpoint shards."""

    gate_up: torch.Tensor
    down: torch.Tensor
    act: Callable

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.down.shape[-1]

    def to(self, *args, **kwargs) -> "Experts":
        """Both weights through ``Tensor.to`` (a dtype, a device)."""
        return Experts(self.gate_up.to(*args, **kwargs), self.down.to(*args, **kwargs), self.act)

    def intermediate(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU intermediate on x (n, H): (n, I)."""
        return swiglu(x, self.gate_up[e], self.act)

    def output(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's un-gated output f_e(x) on x (n, H): (n, H)."""
        return nn.functional.linear(self.intermediate(e, x), self.down[e])

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's un-gated output on every token: (E, T, H), in x's dtype."""
        w = self.to(x.dtype)
        return torch.stack([w.output(e, x) for e in range(self.num_experts)])

    def block_output(self, x: torch.Tensor, routing: Routing, on_expert: ExpertObserver | None = None) -> torch.Tensor:
        """The MoE block's output on x (T, H): sum over each token's routed experts of g * f_e(x), as the eager
        experts loop computes it (per expert, added in token order). ``on_expert`` sees every expert's tokens,
        combine weights and intermediate, so statistics of down_proj's input cost no second pass."""
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, g = routing.tokens_of(e)
            if token.numel() == 0:
                if on_expert is not None:
                    on_expert(e, token, x[:0], g, None)
                continue
            xe = x[token]
            h = self.intermediate(e, xe)
            if on_expert is not None:
                on_expert(e, token, xe, g, h)
            y = nn.functional.linear(h, self.down[e]) * g[:, None].to(h.dtype)
            out.index_add_(0, token, y.to(out.dtype))
        return out


def combine(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The block output (T, H) from every expert's outputs (E, T, H) and a dense combine matrix (T, E): the form
    that evaluates many routings of the same tokens at the cost of one weighted sum each (NAEE's search)."""
    return torch.einsum("te,eth->th", weights.to(outputs.dtype), outputs)
