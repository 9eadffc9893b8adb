"""Expert-pruning baselines: score each expert from its routed tokens in the unpruned model, keep the r best.

  frequency  number of tokens that select the expert (top-k selection count)
  reap       mean over routed tokens of g * ||f(x)||   (g = the model's own combine weight; REAP)
  ean        sum over routed tokens of ||f(x)||          (expert activation norm; EAN)
  random     a seeded random subset

Ties are broken towards the lower expert index, so results never depend on sort stability.
"""
from __future__ import annotations

import random as _random
from typing import Sequence

import torch

from ..moe import Experts, Routing


def routed_scores(x: torch.Tensor, routing: Routing, experts: Experts) -> dict:
    """Per-expert sums over the routed tokens of MoE-block inputs x (T, H), float64: count, sum g, sum ||f||,
    sum g*||f||."""
    x = x.to(torch.float64)
    E = experts.num_experts
    out = {k: torch.zeros(E, dtype=torch.float64) for k in ("count", "sum_g", "sum_norm", "sum_g_norm")}
    for e in range(E):
        token, g = routing.tokens_of(e)
        if token.numel() == 0:
            continue
        norm = torch.linalg.vector_norm(experts.expert(e, torch.float64).output(0, x[token]), dim=-1)
        g = g.to(torch.float64)
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


def top_experts(scores: Sequence[float], keep: int, groups=None) -> list[int]:
    """The ``keep`` highest-scoring experts (ties: lower index first), ascending; with ``groups`` (a
    group-limited router's), the keep / len(groups) best of every group."""
    if groups:
        per = keep // len(groups)
        return sorted(g[i] for g in groups for i in top_experts([scores[x] for x in g], per))
    order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
    return sorted(order[:keep])


def random_experts(num_experts: int, keep: int, seed: int, layer: int, groups=None) -> list[int]:
    """A seeded random subset, independent per layer; with ``groups``, keep / len(groups) of every group."""
    rng = _random.Random(f"{seed}:{layer}")
    if groups:
        return sorted(e for g in groups for e in rng.sample(list(g), keep // len(groups)))
    return sorted(rng.sample(range(num_experts), keep))
