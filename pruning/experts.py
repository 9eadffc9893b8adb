"""Expert pruning: which r of the E routed experts of a layer to keep.

NAEE (arXiv 2402.14800) searches the dropped set D that minimises the MoE-block reconstruction loss

    L(D) = sum over calibration batches b of || Z_b - F_D(X_b) ||_F      (Frobenius norm, not squared)

where X_b are the MoE-block inputs, Z_b the original block outputs and F_D the block whose dropped experts
get router logit -inf (top-k is then taken, and renormalised, among the remaining experts: exactly the
block with those router rows deleted). Everything is float64. Each expert's un-gated output on every token
is computed once per batch, so evaluating a subset costs one routing and one weighted sum.

Baselines score each expert from its routed tokens in the unpruned model and keep the r best:
  frequency  number of tokens that select the expert (top-k selection count)
  reap       mean over routed tokens of g * ||f(x)||   (g = the model's own combine weight; REAP)
  ean        sum over routed tokens of ||f(x)||          (expert activation norm; EAN)
  random     a seeded random subset

Ties are broken towards the lower expert index, so results never depend on sort stability.
"""
from __future__ import annotations

import itertools
import math
import random as _random
from typing import Callable, Sequence

import torch

SEARCH_METHODS = ("naee", "naee_progressive")
SCORE_METHODS = ("frequency", "reap", "ean")
EXPERT_METHODS = SEARCH_METHODS + SCORE_METHODS + ("random",)

RouteLogits = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def expert_outputs(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act) -> torch.Tensor:
    """Un-gated output of every expert on every token: (E, T, H), in x's dtype."""
    w_gu, w_d = gate_up.to(x.dtype), down.to(x.dtype)
    out = []
    for e in range(w_gu.shape[0]):
        gate, up = torch.nn.functional.linear(x, w_gu[e]).chunk(2, dim=-1)
        out.append(torch.nn.functional.linear(act(gate) * up, w_d[e]))
    return torch.stack(out)


def combine_weights(route_logits: RouteLogits, logits: torch.Tensor, dropped: Sequence[int] = ()) -> torch.Tensor:
    """Dense (T, E) combine-weight matrix of the routing with experts ``dropped`` removed (logit -inf)."""
    if dropped:
        logits = logits.clone()
        logits[:, list(dropped)] = float("-inf")
    index, weights = route_logits(logits)
    dense = torch.zeros(logits.shape, dtype=torch.float64, device=logits.device)
    return dense.scatter_add_(1, index, weights.to(torch.float64))


def block_output(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """MoE-block output (T, H) from every expert's outputs (E, T, H) and dense combine weights (T, E)."""
    return torch.einsum("te,eth->th", weights.to(outputs.dtype), outputs)


class BlockLoss:
    """L(D) for many dropped sets D on fixed calibration batches, in float64.

    ``targets`` (one (T_b, H) tensor per batch) defaults to the block's own output with nothing dropped
    (layerwise mode); progressive mode passes the unpruned model's outputs while ``batches`` are the inputs
    that went through the already-pruned earlier layers. Calling it with a list of dropped sets makes one
    pass over the batches (each batch's expert outputs computed once, then every set combined from them),
    so memory stays at one batch's (E, T_b, H) outputs whatever the calibration size. ``target_norm`` is
    sum_b ||Z_b||_F, set by the first call (the scale that makes a loss relative).
    """

    def __init__(self, batches, router_weight, gate_up, down, act, route_logits: RouteLogits, targets=None):
        self.batches, self.targets, self.route_logits, self.act = list(batches), targets, route_logits, act
        self.router = router_weight.to(torch.float64)
        self.gate_up, self.down = gate_up.to(torch.float64), down.to(torch.float64)
        self.evaluated = 0
        self.target_norm = None

    def __call__(self, dropped_sets: Sequence[Sequence[int]]) -> list[float]:
        totals, norm = [0.0] * len(dropped_sets), 0.0
        for b, x in enumerate(self.batches):
            x = x.to(device=self.router.device, dtype=torch.float64)
            logits = torch.nn.functional.linear(x, self.router)
            outputs = expert_outputs(x, self.gate_up, self.down, self.act)
            if self.targets is None:
                z = block_output(outputs, combine_weights(self.route_logits, logits))
            else:
                z = self.targets[b].to(device=x.device, dtype=torch.float64)
            norm += torch.linalg.matrix_norm(z, ord="fro").item()
            for i, d in enumerate(dropped_sets):
                y = block_output(outputs, combine_weights(self.route_logits, logits, d))
                totals[i] += torch.linalg.matrix_norm(z - y, ord="fro").item()
        self.evaluated += len(dropped_sets)
        self.target_norm = norm
        return totals


def block_targets(batches, router_weight, gate_up, down, act, route_logits: RouteLogits) -> list[torch.Tensor]:
    """The unpruned block's outputs (float64) on each batch: progressive mode's fixed targets."""
    r, gu, d = router_weight.to(torch.float64), gate_up.to(torch.float64), down.to(torch.float64)
    out = []
    for x in batches:
        x = x.to(device=r.device, dtype=torch.float64)
        out.append(block_output(expert_outputs(x, gu, d, act), combine_weights(route_logits, torch.nn.functional.linear(x, r))))
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


def routed_scores(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, gate_up, down, act) -> dict:
    """Per-expert baseline statistics over routed tokens (float64): count, sum g, sum ||f||, sum g*||f||."""
    num_experts = gate_up.shape[0]
    x = x.to(torch.float64)
    out = {k: torch.zeros(num_experts, dtype=torch.float64) for k in ("count", "sum_g", "sum_norm", "sum_g_norm")}
    for e in range(num_experts):
        token, slot = torch.where(index == e)
        if token.numel() == 0:
            continue
        f = expert_outputs(x[token], gate_up[e : e + 1].to(torch.float64), down[e : e + 1].to(torch.float64), act)[0]
        norm = torch.linalg.vector_norm(f, dim=-1)
        g = weights[token, slot].to(torch.float64)
        out["count"][e] += token.numel()
        out["sum_g"][e] += g.sum()
        out["sum_norm"][e] += norm.sum()
        out["sum_g_norm"][e] += (g * norm).sum()
    return out


def add_scores(acc: dict | None, new: dict) -> dict:
    return new if acc is None else {k: acc[k] + new[k] for k in acc}


def method_scores(sums: dict) -> dict[str, list[float]]:
    """Scores of the score baselines from accumulated sums (higher = more important)."""
    count = sums["count"]
    return {
        "frequency": count.tolist(),
        "reap": torch.where(count > 0, sums["sum_g_norm"] / count.clamp(min=1), torch.zeros_like(count)).tolist(),
        "ean": sums["sum_norm"].tolist(),
    }


def top_experts(scores: Sequence[float], keep: int) -> list[int]:
    """The ``keep`` highest-scoring experts (ties: lower index first), ascending."""
    order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
    return sorted(order[:keep])


def random_experts(num_experts: int, keep: int, seed: int, layer: int) -> list[int]:
    """A seeded random subset, independent per layer."""
    return sorted(_random.Random(f"{seed}:{layer}").sample(range(num_experts), keep))
