"""NAEE expert pruning (arXiv 2402.14800): which r of the E routed experts of a layer to keep.

The search looks for the dropped set D that minimises the MoE-block reconstruction loss

    L(D) = sum over calibration batches b of || Z_b - F_D(X_b) ||_F      (Frobenius norm, not squared)

where X_b are the MoE-block inputs, Z_b the original block outputs and F_D the block whose dropped experts
get router logit -inf (top-k is then taken, and renormalised, among the remaining experts: exactly the
block with those router rows deleted). Everything is float64. Each expert's un-gated output on every token
is computed once per batch, so evaluating a subset costs one routing and one weighted sum.

The baselines that score experts instead are in ``baselines``.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import torch

from ..moe import Experts, RouteLogits, combine, route


def _block(route_logits: RouteLogits, logits, outputs, dropped: Sequence[int] = ()) -> torch.Tensor:
    """F_D(X) (T, H) from the router logits (T, E) and every expert's outputs (E, T, H) on the same tokens."""
    return combine(outputs, route(route_logits, logits, dropped).dense(outputs.shape[0]))


class BlockLoss:
    """L(D) for many dropped sets D on fixed calibration batches, in float64.

    ``targets`` (one (T_b, H) tensor per batch) defaults to the block's own output with nothing dropped
    (layerwise mode); progressive mode passes the unpruned model's outputs while ``batches`` are the inputs
    that went through the already-pruned earlier layers. Calling it with a list of dropped sets makes one
    pass over the batches (each batch's expert outputs computed once, then every set combined from them),
    so memory stays at one batch's (E, T_b, H) outputs whatever the calibration size. ``target_norm`` is
    sum_b ||Z_b||_F, set by the first call (the scale that makes a loss relative).
    """

    def __init__(self, batches, router_weight, experts: Experts, route_logits: RouteLogits, targets=None):
        self.batches, self.targets, self.route_logits = list(batches), targets, route_logits
        self.router = router_weight.to(torch.float64)
        self.experts = experts.to(torch.float64)
        self.evaluated = 0
        self.target_norm = None

    def __call__(self, dropped_sets: Sequence[Sequence[int]]) -> list[float]:
        totals, norm = [0.0] * len(dropped_sets), 0.0
        for b, x in enumerate(self.batches):
            x = x.to(device=self.router.device, dtype=torch.float64)
            logits, outputs = torch.nn.functional.linear(x, self.router), self.experts.outputs(x)
            if self.targets is None:
                z = _block(self.route_logits, logits, outputs)
            else:
                z = self.targets[b].to(device=x.device, dtype=torch.float64)
            norm += torch.linalg.matrix_norm(z, ord="fro").item()
            for i, d in enumerate(dropped_sets):
                y = _block(self.route_logits, logits, outputs, d)
                totals[i] += torch.linalg.matrix_norm(z - y, ord="fro").item()
        self.evaluated += len(dropped_sets)
        self.target_norm = norm
        return totals


def block_targets(batches, router_weight, experts: Experts, route_logits: RouteLogits) -> list[torch.Tensor]:
    """The unpruned block's outputs (float64) on each batch: progressive mode's fixed targets."""
    r, ex = router_weight.to(torch.float64), experts.to(torch.float64)
    out = []
    for x in batches:
        x = x.to(device=r.device, dtype=torch.float64)
        out.append(_block(route_logits, torch.nn.functional.linear(x, r), ex.outputs(x)))
    return out


def enumerate_dropped(num_experts: int, keep: int) -> list[tuple[int, ...]]:
    """Every dropped set of size E - keep, in lexicographic order."""
    return list(itertools.combinations(range(num_experts), num_experts - keep))


def search(loss: Callable[[list[tuple[int, ...]]], list[float]], num_experts: int, keep: int,
           max_subsets: int = 20000, beam_width: int = 8) -> dict:
    """Dropped set minimising ``loss``: exhaustive when C(E, E-keep) <= max_subsets, else beam search.

    Beam search drops one expert at a time and keeps the ``beam_width`` best partial sets (width 1 is greedy).
    Returns {"search", "dropped", "kept", "loss", "candidates": [[dropped, loss], ...] every set evaluated}.
    """
    n_drop = num_experts - keep
    total = math.comb(num_experts, n_drop)
    seen: dict[tuple[int, ...], float] = {}

    def evaluate(sets):
        todo = [d for d in sets if d not in seen]
        seen.update(zip(todo, loss(todo)) if todo else ())

    if total <= max_subsets:
        evaluate(enumerate_dropped(num_experts, keep))
        method = f"exhaustive over all C({num_experts},{n_drop}) = {total} dropped sets"
    else:
        beam: list[tuple[int, ...]] = [()]
        for _ in range(n_drop):
            cands = sorted({tuple(sorted(d + (e,))) for d in beam for e in range(num_experts) if e not in d})
            evaluate(cands)
            beam = sorted(cands, key=lambda d: (seen[d], d))[:beam_width]
        method = (f"beam search (width {beam_width}) over C({num_experts},{n_drop}) = {total} dropped sets, "
                  f"{len(seen)} sets evaluated (exhaustive limit {max_subsets})")
    final = [d for d in seen if len(d) == n_drop]
    best = min(final, key=lambda d: (seen[d], d))
    return {
        "search": method,
        "exhaustive": total <= max_subsets,
        "dropped": list(best),
        "kept": [e for e in range(num_experts) if e not in best],
        "loss": seen[best],
        "candidates": [[list(d), v] for d, v in seen.items()],
    }
