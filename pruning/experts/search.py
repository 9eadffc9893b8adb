"""NAEE expert pruning (arXiv 2402.14800): which r of the E routed experts of a layer to keep.

The search looks for the dropped set D that minimises the MoE-block reconstruction loss

    L(D) = sum over calibration batches b of || Z_b - F_D(X_b) ||_F      (Frobenius norm, not squared)

where X_b are the MoE-block inputs, Z_b the original block outputs and F_D the block with the dropped experts
removed from routing (``moe.Router.route_logits``: the family's rule chooses among the remaining experts, exactly
as the block with those router rows and biases deleted). A group-limited router keeps the same
number of experts in every group, so the candidates are the sets that drop equally from each group. Everything
is float64. Each expert's un-gated output on every token
is computed once per batch, so evaluating a subset costs one routing and one weighted sum.

The baselines that score experts instead are in ``baselines``.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import torch

from ..moe import Experts, Router, combine


def _block(router: Router, logits, outputs, dropped: Sequence[int] = ()) -> torch.Tensor:
    """F_D(X) (T, H) from the router logits (T, E) and every expert's outputs (E, T, H) on the same tokens."""
    return combine(outputs, router.route_logits(logits, dropped).dense(outputs.shape[0]))


class BlockLoss:
    """L(D) for many dropped sets D on fixed calibration batches, in float64.

    ``targets`` (one (T_b, H) tensor per batch) defaults to the block's own output with nothing dropped
    (layerwise mode); progressive mode passes the unpruned model's outputs while ``batches`` are the inputs
    that went through the already-pruned earlier layers. Calling it with a list of dropped sets makes one
    pass over the batches (each batch's expert outputs computed once, then every set combined from them),
    so memory stays at one batch's (E, T_b, H) outputs whatever the calibration size. ``target_norm`` is
    sum_b ||Z_b||_F, set by the first call (the scale that makes a loss relative).
    """

    def __init__(self, batches, router: Router, experts: Experts, targets=None):
        self.batches, self.targets = list(batches), targets
        self.router = router.to(torch.float64)
        self.experts = experts  # cast one expert at a time (Experts.outputs): never a float64 copy of the layer
        self.evaluated = 0
        self.target_norm = None

    def __call__(self, dropped_sets: Sequence[Sequence[int]]) -> list[float]:
        totals, norm = [0.0] * len(dropped_sets), 0.0
        for b, x in enumerate(self.batches):
            x = x.to(device=self.router.weight.device, dtype=torch.float64)
            logits, outputs = self.router.logits(x), self.experts.outputs(x)
            if self.targets is None:
                z = _block(self.router, logits, outputs)
            else:
                z = self.targets[b].to(device=x.device, dtype=torch.float64)
            norm += torch.linalg.matrix_norm(z, ord="fro").item()
            for i, d in enumerate(dropped_sets):
                y = _block(self.router, logits, outputs, d)
                totals[i] += torch.linalg.matrix_norm(z - y, ord="fro").item()
        self.evaluated += len(dropped_sets)
        self.target_norm = norm
        return totals


def block_targets(batches, router: Router, experts: Experts) -> list[torch.Tensor]:
    """The unpruned block's outputs (float64) on each batch: progressive mode's fixed targets."""
    r, out = router.to(torch.float64), []
    for x in batches:
        x = x.to(device=r.weight.device, dtype=torch.float64)
        out.append(_block(r, r.logits(x), experts.outputs(x)))
    return out


def _groups(num_experts: int, groups) -> list[list[int]]:
    return [list(g) for g in groups] if groups else [list(range(num_experts))]


def enumerate_dropped(num_experts: int, keep: int, groups=None) -> list[tuple[int, ...]]:
    """Every dropped set of size E - keep, in lexicographic order; with ``groups``, only the sets that keep the
    same number of experts in every group."""
    gs = _groups(num_experts, groups)
    n_drop = (num_experts - keep) // len(gs)
    per_group = [itertools.combinations(g, n_drop) for g in gs]
    return sorted(tuple(sorted(itertools.chain(*c))) for c in itertools.product(*per_group))


def count_dropped(num_experts: int, keep: int, groups=None) -> int:
    gs = _groups(num_experts, groups)
    return math.prod(math.comb(len(g), (num_experts - keep) // len(gs)) for g in gs)


def search(loss: Callable[[list[tuple[int, ...]]], list[float]], num_experts: int, keep: int,
           max_subsets: int = 20000, beam_width: int = 8, groups=None) -> dict:
    """Dropped set minimising ``loss``: exhaustive when the number of dropped sets <= max_subsets, else beam search.

    Beam search drops one expert at a time and keeps the ``beam_width`` best partial sets (width 1 is greedy).
    ``groups`` (a group-limited router's expert groups): every group keeps the same number of experts.
    Returns {"search", "dropped", "kept", "loss", "candidates": [[dropped, loss], ...] every set evaluated}.
    """
    n_drop = num_experts - keep
    gs = _groups(num_experts, groups)
    if keep % len(gs):
        raise ValueError(f"keep={keep} is not a multiple of the {len(gs)} expert groups")
    quota = n_drop // len(gs)
    group_of = {e: g for g, members in enumerate(gs) for e in members}
    total = count_dropped(num_experts, keep, groups)
    seen: dict[tuple[int, ...], float] = {}

    def evaluate(sets):
        todo = [d for d in sets if d not in seen]
        seen.update(zip(todo, loss(todo)) if todo else ())

    if total <= max_subsets:
        evaluate(enumerate_dropped(num_experts, keep, groups))
        method = f"exhaustive over all C({num_experts},{n_drop}) = {total} dropped sets"
        if len(gs) > 1:
            method = f"exhaustive over all {total} dropped sets that drop {quota} of each of {len(gs)} groups"
    else:
        beam: list[tuple[int, ...]] = [()]
        for _ in range(n_drop):
            cands = sorted({tuple(sorted(d + (e,))) for d in beam for e in range(num_experts)
                            if e not in d and sum(group_of[x] == group_of[e] for x in d) < quota})
            evaluate(cands)
            beam = sorted(cands, key=lambda d: (seen[d], d))[:beam_width]
        over = f"C({num_experts},{n_drop}) = {total}" if len(gs) == 1 else f"{total}"
        method = (f"beam search (width {beam_width}) over {over} dropped sets, "
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
