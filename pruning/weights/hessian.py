"""Per-expert Hessians (input second moments) of the expert matrices, from cached MoE-block inputs.

For expert e, with R_e the calibration tokens routed to e and g_t the combine weight the block applies to
e's output for token t, the Hessian of a matrix with inputs x_t is, by token mode:

  routed         H = sum_{t in R_e} x_t x_t^T           what a hook on the expert sees (the papers' baseline)
  all_tokens     H = sum_t x_t x_t^T                    every token through every expert (llm-compressor)
  gate_weighted  H = sum_{t in R_e} g_t^2 x_t x_t^T     the MoE-block output objective; diag(H) is MoE-Pruner's
                                                        statistic, so SparseGPT on it is router-weighted SparseGPT

x_t is the MoE-block input for gate_proj/up_proj, and the SwiGLU intermediate of the unpruned expert for
the down projection (every matrix of a layer is pruned from the same dense forward, as the SparseGPT reference does
without --true-sequential). Accumulated in float32 (float64 on request); the overall scale does not matter
because SparseGPT's dampening is relative to the mean diagonal.
"""
from __future__ import annotations

import torch

from ..moe import Experts, Routing

HESSIAN_MODES = ("routed", "all_tokens", "gate_weighted")


def expert_hessians(
    mode: str, inputs: torch.Tensor, routing: Routing, e: int, experts: Experts,
    dtype=torch.float32, chunk: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(H of the gate_up input (H, H), H of the down input (I, I), number of tokens used) for expert e of
    ``experts``; ``inputs`` (T, H) are the layer's MoE-block inputs."""
    if mode not in HESSIAN_MODES:
        raise ValueError(f"unknown Hessian token mode {mode!r}; allowed: {', '.join(HESSIAN_MODES)}")
    if mode == "all_tokens":
        token = torch.arange(inputs.shape[0], device=inputs.device)
        scale = None
    else:
        token, g = routing.tokens_of(e)
        scale = g if mode == "gate_weighted" else None
    w = experts.expert(e, dtype)  # this expert alone in the Hessian's dtype, never the layer
    hidden, inter = w.gate_up.shape[-1], w.intermediate_size
    h_in = torch.zeros(hidden, hidden, dtype=dtype, device=inputs.device)
    h_mid = torch.zeros(inter, inter, dtype=dtype, device=inputs.device)
    for i in range(0, token.numel(), chunk):
        x = inputs[token[i : i + chunk]].to(dtype)
        mid = w.intermediate(0, x)
        if scale is not None:
            s = scale[i : i + chunk].to(dtype)[:, None]
            x, mid = x * s, mid * s
        h_in += x.T @ x
        h_mid += mid.T @ mid
    return h_in, h_mid, int(token.numel())
