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

from dataclasses import replace

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


def _intermediates(experts: Experts, x: torch.Tensor) -> torch.Tensor:
    """Every expert's gated intermediate on its own rows: x (G, n, H) -> (G, n, I), one batched product."""
    gate_up = torch.bmm(x, experts.gate_up.transpose(1, 2))
    if experts.gate_up_bias is not None:
        gate_up = gate_up + experts.gate_up_bias[:, None, :]
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.glu(gate, up) if experts.glu is not None else experts.act(gate) * up


def layer_hessians(
    mode: str, inputs: torch.Tensor, routing: Routing, experts: Experts, dtype=torch.float32, chunk: int = 8192,
    start: int = 0, stop: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``expert_hessians`` of experts [start, stop) at once, with batched products over the experts instead of one
    expert at a time: (H of the gate_up inputs (G, H, H), H of the down inputs (G, I, I), tokens per expert).

    routed / gate_weighted: each expert's tokens (ascending, as ``Routing.tokens_of``) are laid out in a zero-padded
    (G, rows, H) block, ``chunk // G`` positions per expert at a time; a weight per row (g, or 1; 0 on the padding)
    scales the inputs and the intermediates, so the padding adds nothing and the products are one ``bmm`` for the
    intermediates and one ``baddbmm`` per Hessian. all_tokens: every expert sees every token, so the gate_up Hessian
    is computed once and shared (an expanded view, no copies). Only the G experts' weights are cast to ``dtype``.
    """
    if mode not in HESSIAN_MODES:
        raise ValueError(f"unknown Hessian token mode {mode!r}; allowed: {', '.join(HESSIAN_MODES)}")
    stop = experts.num_experts if stop is None else stop
    g_n = stop - start
    part = lambda t: None if t is None else t[start:stop]  # noqa: E731  (views: only these experts are cast)
    w = replace(experts, gate_up=part(experts.gate_up), down=part(experts.down), gate_up_bias=part(experts.gate_up_bias),
                down_bias=part(experts.down_bias)).to(dtype)
    hidden, inter, dev = w.gate_up.shape[-1], w.intermediate_size, inputs.device
    h_mid = torch.zeros(g_n, inter, inter, dtype=dtype, device=dev)
    rows = max(1, chunk // g_n)
    if mode == "all_tokens":
        h_in = torch.zeros(hidden, hidden, dtype=dtype, device=dev)
        for i in range(0, inputs.shape[0], rows):
            x = inputs[i : i + rows].to(dtype)
            h_in.addmm_(x.T, x)
            mid = _intermediates(w, x.expand(g_n, *x.shape))
            h_mid.baddbmm_(mid.transpose(1, 2), mid)
        return h_in.expand(g_n, hidden, hidden), h_mid, [inputs.shape[0]] * g_n
    k = routing.index.shape[1]
    flat = routing.index.reshape(-1)
    slot = torch.nonzero((flat >= start) & (flat < stop)).squeeze(1)  # token-major
    expert = flat[slot] - start
    order = torch.sort(expert, stable=True).indices  # by expert, then by token: each expert's tokens ascending
    slot, expert = slot[order], expert[order]
    token = torch.div(slot, k, rounding_mode="floor")
    weight = routing.weights.reshape(-1)[slot].to(dtype) if mode == "gate_weighted" else None
    counts = torch.bincount(expert, minlength=g_n)
    pos = torch.arange(slot.numel(), device=slot.device) - (torch.cumsum(counts, 0) - counts)[expert]
    h_in = torch.zeros(g_n, hidden, hidden, dtype=dtype, device=dev)
    nmax = int(counts.max()) if slot.numel() else 0
    for p in range(0, nmax, rows):
        sel = torch.nonzero((pos >= p) & (pos < p + rows)).squeeze(1)
        e, r = expert[sel], pos[sel] - p
        n = min(rows, nmax - p)
        x = torch.zeros(g_n, n, hidden, dtype=dtype, device=dev)
        x[e, r] = inputs[token[sel]].to(dtype)
        scale = torch.zeros(g_n, n, 1, dtype=dtype, device=dev)
        scale[e, r, 0] = 1 if weight is None else weight[sel]
        mid = _intermediates(w, x) * scale  # the padding's intermediates (biases, clamped GLUs) are not 0: zeroed
        if weight is not None:
            x = x * scale
        h_in.baddbmm_(x.transpose(1, 2), x)
        h_mid.baddbmm_(mid.transpose(1, 2), mid)
    return h_in, h_mid, counts.tolist()
