"""Mask selection (shared by every method that ranks weights) and the bit-packed mask file format.

Convention: a mask is a bool tensor shaped like the weight (out, in); ``True`` = keep, ``False`` = pruned.
"""
from __future__ import annotations

import json
from pathlib import Path

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


def full_masks(experts) -> dict[str, torch.Tensor]:
    """All-True masks of a layer's experts (``pruning.moe.Experts``): {'gate_up': (E, 2I, H), 'down': (E, H, I)}."""
    return {"gate_up": torch.ones_like(experts.gate_up, dtype=torch.bool),
            "down": torch.ones_like(experts.down, dtype=torch.bool)}


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


class MaskFileError(ValueError):
    """A mask file that does not fit where it is used: one line naming the file."""


def check_mask_file(path) -> dict[str, str]:
    """A mask file's header, no tensor read: intact safetensors, ``shapes`` and ``layer`` metadata, and for each
    shape one packed tensor of exactly the bytes it needs. Returns the metadata."""
    from ..safetensors_io import check_file

    try:
        meta, tensors = check_file(path)
    except (OSError, ValueError) as exc:
        raise MaskFileError(f"not a mask file: {exc}") from None
    try:
        shapes = json.loads(meta["shapes"])
        int(meta["layer"])
        assert isinstance(shapes, dict) and all(isinstance(v, list) for v in shapes.values())
    except (KeyError, ValueError, TypeError, AssertionError):
        raise MaskFileError(f"{path}: not a mask file (no valid 'shapes' and 'layer' metadata)") from None
    if set(shapes) != set(tensors):
        raise MaskFileError(f"{path}: holds masks {sorted(tensors)}, its metadata gives shapes of {sorted(shapes)}")
    for k, shape in shapes.items():
        need = -(-int(np.prod(shape)) // 8)
        if tensors[k].dtype != "U8" or tensors[k].shape != (need,):
            raise MaskFileError(f"{path}: mask {k!r} holds {tensors[k].nbytes} packed bytes, its shape {shape} needs {need}")
    return meta


def check_mask_shapes(path, masks: dict[str, torch.Tensor], experts) -> None:
    """A layer's routed masks have its experts' shapes (``pruning.moe.Experts``): 'gate_up' (E, 2I, H), 'down' (E, H, I)."""
    for k, w in (("gate_up", experts.gate_up), ("down", experts.down)):
        got = tuple(masks[k].shape) if k in masks else None
        if got != tuple(w.shape):
            raise MaskFileError(f"{path}: mask {k!r} has shape {got}, the model's layer has {tuple(w.shape)} "
                                f"(a mask of another model or layer)")


def mask_source(meta: dict, inputs_path) -> Path:
    """The calibration file a mask was computed from (whose sha256 its ``stats_sha256`` records), given the layer's
    cached MoE-block inputs ``layer_<i>.inputs.safetensors`` of the same pass: those inputs for a SparseGPT method,
    the statistics beside them (``layer_<i>.stats.safetensors``) for a score method."""
    from ..methods import WEIGHT_METHODS

    inputs_path = Path(inputs_path)
    if WEIGHT_METHODS[meta["method"]].updates_weights:
        return inputs_path
    return inputs_path.with_name(inputs_path.name.replace(".inputs.", ".stats."))


def check_mask_source(path, meta: dict, source) -> None:
    """The calibration file ``source`` is still the one the mask was computed from (its sha256 is the mask's
    ``stats_sha256``): statistics recomputed or replaced after the mask was made fail with one line."""
    from ..atomic import sha256_file

    recorded = meta.get("stats_sha256")
    if recorded is None:
        raise MaskFileError(f"{path}: not a mask file of this pipeline (no 'stats_sha256' metadata)")
    digest = sha256_file(source)
    if digest != recorded:
        raise MaskFileError(f"{path}: computed from calibration data with sha256 {recorded[:12]}..., but {source} now has "
                            f"{digest[:12]}... (changed after the mask was made); rerun the mask job")


def check_layer_masks(path, masks: dict[str, torch.Tensor], meta: dict, experts, inputs_path) -> None:
    """What a job using a layer's masks with its experts and cached inputs checks: the masks' shapes are the
    experts', and the calibration data they were computed from is unchanged (``check_mask_source``)."""
    check_mask_shapes(path, masks, experts)
    check_mask_source(path, meta, mask_source(meta, inputs_path))


def load_masks(path) -> tuple[dict[str, torch.Tensor], dict]:
    """A mask file's masks (unpacked) and metadata; a file that is no intact mask file fails with one line naming it
    (``check_mask_file``)."""
    from safetensors import safe_open

    check_mask_file(path)
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
