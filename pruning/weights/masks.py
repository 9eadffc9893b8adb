"""Mask selection (shared by every method that ranks weights) and the bit-packed mask file format.

Convention: a mask is a bool tensor shaped like the weight (out, in); ``True`` = keep, ``False`` = pruned.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from .pattern import Pattern


def _stable_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k lowest scores along the last dim; ties go to the lower index (stable sort)."""
    return torch.sort(scores, dim=-1, stable=True).indices[..., :k]


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-output-row comparison: every row of ``scores`` (out, in) loses exactly floor(s * in) weights."""
    rows, cols = scores.shape
    k = int(sparsity * cols)
    mask = torch.ones(rows, cols, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, _stable_lowest(scores.float().cpu(), k), False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In each row, every group of M consecutive input columns loses its N lowest-score weights."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"input dimension {cols} is not a multiple of M={m}")
    groups = scores.float().cpu().reshape(rows, cols // m, m)
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, _stable_lowest(groups, n), False)
    return mask.reshape(rows, cols)


def select_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return unstructured_mask(scores, pattern.sparsity)


# ---------------------------------------------------------------------------------------------
# Bit packing: 8 mask entries per byte (little bit order), the shape kept in the file metadata.


def pack(mask: torch.Tensor) -> torch.Tensor:
    bits = np.packbits(mask.cpu().numpy().astype(bool).ravel(), bitorder="little")
    return torch.from_numpy(bits)


def unpack(packed: torch.Tensor, shape) -> torch.Tensor:
    numel = int(np.prod(shape))
    bits = np.unpackbits(packed.cpu().numpy(), count=numel, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))


def mask_metadata(method: str, pattern: Pattern, propagation: str, layer: int, source, info: dict) -> dict:
    """What a mask file records: method, pattern, propagation, layer, the sha256 of the calibration file it
    was computed from (``source``), and the method's own ``info`` (fallback experts, ...)."""
    from ..atomic import sha256_file

    return {
        "method": method,
        "sparsity": pattern.target,
        "pattern": pattern.kind,
        "propagation": propagation,
        "layer": layer,
        "stats_sha256": sha256_file(source),
        **info,
    }


def kept_fraction(masks: dict[str, torch.Tensor]) -> float:
    return sum(int(v.sum()) for v in masks.values()) / sum(v.numel() for v in masks.values())


def save_masks(path, masks: dict[str, torch.Tensor], metadata: dict) -> None:
    """One safetensors file of packed masks; ``shapes`` and the caller's metadata go in the header."""
    from ..atomic import save_safetensors

    shapes = {k: list(v.shape) for k, v in masks.items()}
    save_safetensors(path, {k: pack(v) for k, v in masks.items()}, {**metadata, "shapes": shapes})


def load_masks(path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        shapes = json.loads(meta["shapes"])
        masks = {k: unpack(f.get_tensor(k), shapes[k]) for k in f.keys()}
    return masks, meta


def load_layer_masks(paths) -> dict[int, dict[str, torch.Tensor]]:
    """The pipeline's per-layer mask files -> {layer: {"gate_up", "down"} (and the shared experts' "shared.*")}."""
    out = {}
    for path in paths:
        masks, meta = load_masks(path)
        out[int(meta["layer"])] = masks
    return out
