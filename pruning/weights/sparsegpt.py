"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning of one matrix with OBS weight updates.

Given W (out, in) and the Hessian H (in, in) of its inputs, columns are eliminated left to right. With U the
upper Cholesky factor of H^-1, row i of U is the inverse Hessian of the columns not yet eliminated (i..in-1),
scaled by 1/sqrt of its diagonal, so for column i the OBS step is

    err = (w_i - q_i) / U_ii        W[:, i:] -= err (x) U[i, i:]

where q_i is column i with its pruned entries zeroed: pruned weights become exactly 0 and the surviving
weights of later columns absorb the error. Columns go in blocks of ``blocksize``; updates inside a block are
applied at once per column, and the block's accumulated errors reach the later columns in one matrix product
(lazy batch update).

Mask selection is adaptive, from the current (already updated) weights, with saliency w^2 / U_jj^2:
  unstructured  per block of columns, the floor(s * rows * block) lowest saliencies of the whole block
                (comparison group = all rows x the block, so rows end with different sparsities);
                ties go to the lower flat index (stable sort), so the count is exact.
  N:M           at the first column of every group of M, the N lowest saliencies of each row's group.

Details that follow the reference implementation: the Hessian is float32 (float64 on request); an input
column that never fires (H_jj = 0) gets H_jj = 1 and its weights are zeroed; dampening adds
``percdamp * mean(diag H)`` to the diagonal. If the Cholesky factorisation still fails, the dampening is
raised tenfold (with a logged warning) until it succeeds.

``layer_sparsegpt`` runs it on one MoE layer's experts, one variant per Hessian token mode (``hessian``):
  sparsegpt                 routed tokens, unweighted (the papers' baseline)
  sparsegpt_all_tokens      every token through every expert (llm-compressor's default)
  sparsegpt_gate_weighted   routed tokens weighted by g^2: router-weighted SparseGPT
The gate, up and down projections of every expert are pruned as separate matrices (as separate nn.Linear
modules would be), from the same dense forward. An expert that no calibration token reaches has an all-zero
Hessian, and SparseGPT would zero it whole: it is pruned by weight magnitude at the same pattern instead
(recorded in the mask metadata), its surviving weights unchanged.
"""
from __future__ import annotations

import logging

import torch

from ..methods import SPARSEGPT_METHODS, WEIGHT_METHODS
from ..moe import Experts, Routing
from .hessian import expert_hessians, layer_hessians
from .masks import full_masks, select_mask
from .pattern import Pattern

log = logging.getLogger(__name__)

HESSIAN_PATHS = ("auto", "batched", "per_expert")
# the batched Hessians of a group of experts are held at once: at most this many bytes of them (at least one expert)
HESSIAN_GROUP_BYTES = 1 << 30


def _inverse_cholesky_upper(h: torch.Tensor, percdamp: float, max_tries: int = 8):
    """Upper Cholesky factor of (H + damp I)^-1, raising damp tenfold on failure. Returns (U, damp fraction)."""
    mean_diag = torch.diag(h).mean()
    frac = percdamp
    for attempt in range(max_tries):
        damped = h.clone()  # (no identity matrix: a few (n, n) temporaries fewer on a large expert)
        damped.diagonal().add_(frac * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info == 0 and torch.isfinite(upper).all():
                return upper, frac
        log.warning("SparseGPT: Cholesky failed at dampening %.3g of the mean diagonal; retrying at %.3g", frac, frac * 10)
        frac *= 10
    raise RuntimeError(f"SparseGPT: Cholesky failed even at dampening {frac / 10:.3g} of the mean diagonal")


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, blocksize: int = 128, percdamp: float = 0.01,
    dtype=torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prune ``weight`` (out, in). Returns (updated weight in the input dtype, keep mask (bool), info)."""
    rows, cols = weight.shape
    if pattern.is_nm and (cols % pattern.m or blocksize % pattern.m):
        raise ValueError(f"N:M needs M={pattern.m} to divide the input dimension {cols} and the block size {blocksize}")
    w = weight.to(dtype).clone()
    h = hessian.to(dtype=dtype, device=w.device).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    u, damp = _inverse_cholesky_upper(h, percdamp)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    loss = torch.zeros((), dtype=dtype, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        wb, ub = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        diag2 = torch.diag(ub) ** 2
        errs = torch.zeros_like(wb)
        pruned = torch.zeros_like(wb, dtype=torch.bool)
        if not pattern.is_nm:
            k = int(pattern.sparsity * wb.numel())
            if k:
                order = torch.sort((wb**2 / diag2).flatten(), stable=True).indices[:k]
                pruned.view(-1)[order] = True
        for j in range(i2 - i1):
            if pattern.is_nm and j % pattern.m == 0:
                sal = wb[:, j : j + pattern.m] ** 2 / diag2[j : j + pattern.m]
                low = torch.sort(sal, dim=1, stable=True).indices[:, : pattern.n]
                pruned[:, j : j + pattern.m].scatter_(1, low, True)
            col = wb[:, j]
            q = torch.where(pruned[:, j], torch.zeros_like(col), col)
            err = (col - q) / ub[j, j]
            loss += ((col - q) ** 2).sum() / diag2[j] / 2
            wb[:, j:] -= err[:, None] * ub[j, j:][None, :]
            wb[:, j] = q
            errs[:, j] = err
        w[:, i1:i2] = wb
        w[:, i2:] -= errs @ u[i1:i2, i2:]
        keep[:, i1:i2] = ~pruned
    info = {"damp": damp, "dead_columns": int(dead.sum()), "obs_loss": float(loss)}
    return w.to(weight.dtype), keep, info


@torch.no_grad()
def layer_sparsegpt(
    method: str, pattern: Pattern, experts: Experts, inputs: torch.Tensor, routing: Routing,
    blocksize: int = 128, percdamp: float = 0.01, dtype=torch.float32, inplace: bool = False,
    hessians: str = "auto",
):
    """SparseGPT methods on one layer's experts from its cached MoE-block inputs (T, H) and their routing.

    Returns (masks, updated weights {'gate_up', 'down'} in the input dtype, info). With ``inplace`` the updated
    weights are ``experts``' own tensors, overwritten (a caller that read them for this alone saves a copy of the
    layer); each expert's Hessians are built before its weights change, so the result is the same.
    ``hessians``: 'batched' builds the Hessians of as many experts at once as fit ``HESSIAN_GROUP_BYTES``
    (``hessian.layer_hessians``: batched products over the experts), 'per_expert' one expert at a time
    (``hessian.expert_hessians``); the two differ by float rounding only. 'auto' (the pipeline's) is whichever
    bench/bench_methods.py measured faster: batched for all_tokens (the gate_up Hessian is then the same for every
    expert and computed once), per-expert for routed and gate_weighted (their zero-padded per-expert blocks cost
    more than the loop saves: 2.3x the per-expert Hessian time on the tiny model, 8 experts, CPU).
    """
    if method not in SPARSEGPT_METHODS:
        raise ValueError(f"unknown SparseGPT method {method!r}; allowed: {', '.join(SPARSEGPT_METHODS)}")
    if hessians not in HESSIAN_PATHS:
        raise ValueError(f"unknown Hessian path {hessians!r}; allowed: {', '.join(HESSIAN_PATHS)}")
    mode = WEIGHT_METHODS[method].hessian
    if hessians == "auto":
        hessians = "batched" if mode == "all_tokens" else "per_expert"
    inter, hidden, num = experts.intermediate_size, experts.gate_up.shape[-1], experts.num_experts
    masks = full_masks(experts)
    new = {k: w if inplace else w.clone(memory_format=torch.contiguous_format)
           for k, w in (("gate_up", experts.gate_up), ("down", experts.down))}
    group = 1
    if hessians == "batched":
        group = max(1, min(num, HESSIAN_GROUP_BYTES // ((hidden**2 + inter**2) * torch.finfo(dtype).bits // 8)))
    fallback, tokens, damp, dead, loss = [], [], 0.0, 0, 0.0
    for start in range(0, num, group):
        stop = min(start + group, num)
        if hessians == "batched":
            h_ins, h_mids, counts = layer_hessians(mode, inputs, routing, experts, dtype, start=start, stop=stop)
        else:
            h_ins, h_mids, counts = zip(*(expert_hessians(mode, inputs, routing, e, experts, dtype=dtype)
                                          for e in range(start, stop)))
        for e, h_in, h_mid, n in zip(range(start, stop), h_ins, h_mids, counts):
            tokens.append(n)
            if n == 0:
                fallback.append(e)
                for key in ("gate_up", "down"):
                    masks[key][e] = select_mask(new[key][e].abs(), pattern)
                    new[key][e] *= masks[key][e]
                continue
            parts = (("gate_up", slice(0, inter), h_in), ("gate_up", slice(inter, 2 * inter), h_in),
                     ("down", slice(None), h_mid))
            for key, rows, hess in parts:
                w, keep, info = sparsegpt(new[key][e][rows], hess, pattern, blocksize, percdamp, dtype)
                new[key][e][rows], masks[key][e][rows] = w, keep
                damp, dead, loss = max(damp, info["damp"]), dead + info["dead_columns"], loss + info["obs_loss"]
        del h_ins, h_mids
    info = {
        "fallback_experts": fallback, "fallback_method": "magnitude", "hessian": mode, "tokens_per_expert": tokens,
        "max_damp": damp, "dead_columns": dead, "obs_loss": loss, "blocksize": blocksize, "percdamp": percdamp,
    }
    return masks, new, info
