"""Importance scores of expert weights; higher = keep. W is (out, in); column statistics are (in,).

  magnitude   |W_ij|
  wanda       |W_ij| * sqrt(sum_{t in R_e} x_tj^2)          routed tokens, unweighted
  moe_pruner  |W_ij| * sqrt(sum_{t in R_e} (g_t x_tj)^2)    g_t = the token's top-k combine weight for e
"""
from __future__ import annotations

import torch

METHODS = ("magnitude", "wanda", "moe_pruner")
_STAT = {"wanda": "sum_x2", "moe_pruner": "sum_gx2"}


def score(method: str, weight: torch.Tensor, col_sumsq: torch.Tensor | None = None) -> torch.Tensor:
    w = weight.float().abs()
    if method == "magnitude":
        return w
    if method in _STAT:
        return w * col_sumsq.float().sqrt()[None, :]
    raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")


def stat_key(method: str, matrix: str) -> str | None:
    """Key of the column statistic a method uses for ``matrix`` ('gate_up' or 'down')."""
    return f"{matrix}.{_STAT[method]}" if method in _STAT else None
