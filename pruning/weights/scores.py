"""Importance scores of expert weights; higher = keep. W is (out, in); column statistics are (in,).

  magnitude   |W_ij|
  wanda       |W_ij| * sqrt(sum_{t in R_e} x_tj^2)          routed tokens, unweighted
  moe_pruner  |W_ij| * sqrt(sum_{t in R_e} (g_t x_tj)^2)    g_t = the token's top-k combine weight for e

Which statistic a method uses is its ``statistic`` in ``pruning.methods.WEIGHT_METHODS``.
"""
from __future__ import annotations

import torch

from ..methods import SCORE_METHODS, WEIGHT_METHODS


def score(method: str, weight: torch.Tensor, col_sumsq: torch.Tensor | None = None) -> torch.Tensor:
    if method not in SCORE_METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(SCORE_METHODS)}")
    w = weight.float().abs()
    if WEIGHT_METHODS[method].statistic is None:
        return w
    return w * col_sumsq.float().sqrt()[None, :]


def stat_key(method: str, matrix: str) -> str | None:
    """Key of the column statistic a method uses for ``matrix`` ('gate_up' or 'down'), in ``LayerStats``."""
    stat = WEIGHT_METHODS[method].statistic
    return f"{matrix}.{stat}" if stat else None
