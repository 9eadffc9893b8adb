"""MoE primitives: routing, the tokens of each expert, one expert's forward, the block output.

Every consumer (calibration statistics, Hessians, the NAEE objective, the REAP/EAN/frequency scores, dynamic
skipping, expert usage, the block-error diagnostic, distillation) computes these through this module, never on
its own. What differs between model families comes from the family's adapter (``pruning.models``): it hands over
a layer's ``Router`` (weight, biases and the family's ``TopK`` rule) and its routed experts as an ``Experts``
value in the canonical layout below.

For a token x (H,), a layer with router weight R (E, H) and logit bias b computes

    logits = R x + b                               (E,)
    (idx, g) = rule(logits, selection bias)        top-k experts and their combine weights (``TopK``)
    y = sum_j g_j * f_{idx_j}(x)                   f_e(x) = W_down,e glu(W_gate,e x + b_gate,e, W_up,e x + b_up,e) + b_down,e

with glu(gate, up) = act(gate) * up (SwiGLU) unless the family has its own. Shared experts and dense layers are
outside this sum: they do not depend on the routing, so pruning routed experts leaves them as they are.

Removing experts from the choice (``Router.route(..., dropped)``) equals deleting their router rows and biases.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torch import nn


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


@dataclass(frozen=True)
class TopK:
    """A family's routing rule: how router logits (T, E) become each token's top-k experts and combine weights.

    ``scoring``: 'softmax' (over all experts, fp32), 'sigmoid' (per expert), or 'topk_softmax' (top-k on the
    logits, then softmax over the k). ``normalize`` renormalises the k weights to sum 1; ``scale`` multiplies
    them afterwards (routed_scaling_factor). A selection bias is added to the scores
    for choosing only; the weights are the unbiased scores. Group-limited routing splits the experts into
    ``n_group`` contiguous groups, scores each group (``group_score``: 'max' score, or 'top2_sum' of its two
    best choice scores), and chooses among the experts of the ``topk_group`` best groups.
    """

    top_k: int
    scoring: str = "softmax"
    normalize: bool = True
    scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"

    @property
    def renormalises(self) -> bool:
        """Whether the k weights are renormalised over the chosen experts (dynamic skipping keeps this)."""
        return self.normalize or self.scoring == "topk_softmax"

    def __call__(self, logits: torch.Tensor, selection_bias: torch.Tensor | None = None,
                 available: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(top_k_index (T, k), top_k_weights (T, k)). ``available`` (E,) bool: experts that may be chosen;
        the others are removed from routing exactly as deleting their router rows (and biases) does, provided
        every group keeps the same number of experts (and two or more under 'top2_sum')."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32, or fp64
        if available is not None:
            logits = logits.masked_fill(~available, float("-inf"))
        if self.scoring == "topk_softmax":
            top, index = torch.topk(logits, self.top_k, dim=-1)
            return index, torch.softmax(top, dim=-1) * self.scale if self.scale != 1.0 else torch.softmax(top, dim=-1)
        scores = torch.softmax(logits, dim=-1) if self.scoring == "softmax" else torch.sigmoid(logits)
        choice = scores if selection_bias is None else scores + selection_bias.to(scores.dtype)
        if available is not None:
            choice = choice.masked_fill(~available, float("-inf"))
        if self.n_group > 1:
            t, e = choice.shape
            groups = choice.view(t, self.n_group, e // self.n_group)
            if self.group_score == "max":
                group = groups.max(dim=-1).values
            else:
                group = groups.topk(2, dim=-1).values.sum(dim=-1)
            best = torch.topk(group, self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group, dtype=torch.bool).scatter_(1, best, True)
            choice = choice.masked_fill(~keep.repeat_interleave(e // self.n_group, dim=1), float("-inf"))
        index = torch.topk(choice, self.top_k, dim=-1).indices
        weights = scores.gather(1, index)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.scale != 1.0:
            weights = weights * self.scale
        return index, weights


@dataclass(frozen=True)
class Router:
    """One MoE layer's router: weight (E, H), optional logit bias (E,), optional selection-only bias (E,), and the
    family's rule. ``logits_dtype`` is the dtype the family computes logits in (None: the weight's)."""

    weight: torch.Tensor
    rule: TopK
    bias: torch.Tensor | None = None
    selection_bias: torch.Tensor | None = None
    logits_dtype: torch.dtype | None = None

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def to(self, dtype: torch.dtype | None = None, device=None) -> "Router":
        """Weight and logit bias to ``dtype``/``device``; the selection bias (fp32 in the families that have one)
        only moves. Logits are then computed in ``dtype``, or in the family's logits dtype if that is wider."""
        t = lambda v, d=dtype: None if v is None else v.to(device=device, dtype=d)  # noqa: E731
        logits_dtype = self.logits_dtype
        if logits_dtype is not None and dtype is not None:
            logits_dtype = torch.promote_types(logits_dtype, dtype)
        return Router(t(self.weight), self.rule, t(self.bias), t(self.selection_bias, None), logits_dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.logits_dtype or self.weight.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return nn.functional.linear(x.to(dtype), self.weight.to(dtype), bias)

    def route_logits(self, logits: torch.Tensor, dropped: Sequence[int] = ()) -> Routing:
        """Routing from logits (T, E); the experts in ``dropped`` are removed from the choice (as if deleted)."""
        available = None
        if len(dropped):
            available = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
            available[list(dropped)] = False
        return Routing(*self.rule(logits, self.selection_bias, available))

    def route(self, x: torch.Tensor, dropped: Sequence[int] = (), chunk: int = 8192) -> Routing:
        """Routing of MoE-block inputs x (T, H), ``chunk`` tokens at a time."""
        parts = [self.route_logits(self.logits(x[i : i + chunk]), dropped) for i in range(0, x.shape[0], chunk)]
        return Routing(torch.cat([p.index for p in parts]), torch.cat([p.weights for p in parts]))


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, act, bias: torch.Tensor | None = None, glu=None) -> torch.Tensor:
    """One expert's gated intermediate, the input of the down projection: (n, H) -> (n, I). ``gate_up`` (2I, H): rows
    [0, I) are the gate, [I, 2I) the up projection; act(gate) * up, or ``glu(gate, up)`` when given."""
    gate, up = nn.functional.linear(x, gate_up, bias).chunk(2, dim=-1)
    return glu(gate, up) if glu is not None else act(gate) * up


# on_expert(e, token (n,), x (n, H), g (n,), h (n, I) or None when n == 0): sees each expert's routed tokens
ExpertObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class Experts:
    """One MoE layer's routed experts in the canonical layout (nn.Linear orientation, (out, in)):
    ``gate_up`` (E, 2I, H) with the gate in rows [0, I) and up in [I, 2I), ``down`` (E, H, I), ``act`` the gate
    activation, optional biases ``gate_up_bias`` (E, 2I) and ``down_bias`` (E, H), and ``glu(gate, up)`` for a
    family whose gating is not act(gate) * up. The tensors may be a model's own parameters (gradients flow
    through every method) or copies read from the checkpoint shards."""

    gate_up: torch.Tensor
    down: torch.Tensor
    act: Callable | None
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    glu: Callable | None = None

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.down.shape[-1]

    def to(self, *args, **kwargs) -> "Experts":
        """Weights and biases through ``Tensor.to`` (a dtype, a device)."""
        t = lambda v: None if v is None else v.to(*args, **kwargs)  # noqa: E731
        return replace(self, gate_up=t(self.gate_up), down=t(self.down), gate_up_bias=t(self.gate_up_bias),
                       down_bias=t(self.down_bias))

    def expert(self, e: int, dtype: torch.dtype | None = None) -> "Experts":
        """Expert e alone (a one-expert Experts of views), its weights cast to ``dtype`` if given: a float64
        computation then holds one expert in float64 at a time, never the layer."""
        s = slice(e, e + 1)
        one = replace(self, gate_up=self.gate_up[s], down=self.down[s],
                      gate_up_bias=None if self.gate_up_bias is None else self.gate_up_bias[s],
                      down_bias=None if self.down_bias is None else self.down_bias[s])
        return one if dtype is None else one.to(dtype)

    def with_weights(self, gate_up: torch.Tensor, down: torch.Tensor) -> "Experts":
        """The same experts (activation, biases) with other weights, e.g. pruned ones."""
        return replace(self, gate_up=gate_up, down=down)

    def intermediate(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU intermediate on x (n, H): (n, I)."""
        bias = None if self.gate_up_bias is None else self.gate_up_bias[e]
        return swiglu(x, self.gate_up[e], self.act, bias, self.glu)

    def output(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's un-gated output f_e(x) on x (n, H): (n, H)."""
        return self.project(e, self.intermediate(e, x))

    def project(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """Expert e's down projection of its intermediate h (n, I): (n, H)."""
        return nn.functional.linear(h, self.down[e], None if self.down_bias is None else self.down_bias[e])

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's un-gated output on every token: (E, T, H), in x's dtype (each expert's weights cast
        on their own, so a float64 x never needs a float64 copy of the layer)."""
        out = x.new_empty((self.num_experts, *x.shape))
        for e in range(self.num_experts):
            out[e] = self.expert(e, x.dtype).output(0, x)
        return out

    def block_output(self, x: torch.Tensor, routing: Routing, on_expert: ExpertObserver | None = None,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
        """The MoE block's output on x (T, H): sum over each token's routed experts of g * f_e(x), as the eager
        experts loop computes it (per expert, added in token order). ``on_expert`` sees every expert's tokens,
        combine weights and intermediate, so statistics of the down projection's input cost no second pass.
        ``dtype`` casts one expert's weights at a time (float64 references hold one expert in float64)."""
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, g = routing.tokens_of(e)
            if token.numel() == 0:
                if on_expert is not None:
                    on_expert(e, token, x[:0], g, None)
                continue
            xe = x[token]
            w, k = (self, e) if dtype is None else (self.expert(e, dtype), 0)
            h = w.intermediate(k, xe)
            if on_expert is not None:
                on_expert(e, token, xe, g, h)
            y = w.project(k, h) * g[:, None].to(h.dtype)
            out.index_add_(0, token, y.to(out.dtype))
        return out


def combine(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The block output (T, H) from every expert's outputs (E, T, H) and a dense combine matrix (T, E): the form
    that evaluates many routings of the same tokens at the cost of one weighted sum each (NAEE's search)."""
    return torch.einsum("te,eth->th", weights.to(outputs.dtype), outputs)
