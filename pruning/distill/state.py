"""Resumable training states of a distillation run: every ``checkpoint_every`` optimiser steps the student's
parameters, AdamW's moments, the step counter (which fixes the learning rate and the data position: the epoch
permutations are seeded), λ, the RNG and the loss history are written atomically (safetensors + JSON). A run
started again continues from the newest state with the same fingerprint (settings, data and input files).
States hold full (gathered) tensors, so a run sharded over W processes (``pruning.distill.distributed``) writes
the same files as a single process and resumes with any number of processes.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn


def _param_names(model) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())  # tied parameters appear once


def save_state(state_dir, step: int, student, opt, record: dict, *, write: bool = True) -> Path:
    """Write ``state_dir/step_<step>`` atomically (a new name, then rename), then remove older states. A sharded
    student's parameters and moments are gathered one tensor at a time as they are written: every process calls
    it, one with ``write`` (``write_state``)."""
    params = _param_names(student)
    return write_state(state_dir, step, {n: p.detach() for n, p in params.items()},
                       {n: opt.state.get(p) for n, p in params.items()}, record, write=write)


def write_state(state_dir, step: int, weights: dict[str, torch.Tensor], moments: dict[str, dict | None],
                record: dict, *, write: bool = True) -> Path:
    """``save_state`` from ``weights[name]`` each parameter and ``moments[name]`` its AdamW state (``exp_avg``,
    ``exp_avg_sq``, ``step``; empty or None before the first step). Sharded tensors (DTensors) are gathered
    one at a time as they are written, so the files are the same for every number of processes and no process
    holds more than one full tensor; with ``write`` False (every process of a sharded run but one) nothing is
    written, but the gathers are taken part in, in the same order."""
    from ..atomic import atomic_dir, save_safetensors, write_json
    from ..safetensors_io import write_file

    state_dir = Path(state_dir)
    target = state_dir / f"step_{step:08d}"
    flat = {}
    for n in weights:
        st = moments.get(n)
        if st:
            flat[f"{n}.exp_avg"] = st["exp_avg"]
            flat[f"{n}.exp_avg_sq"] = st["exp_avg_sq"]
            flat[f"{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    flat["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        flat["rng.cuda"] = torch.cuda.get_rng_state()
    if not write:
        write_file(None, weights, write=False)
        write_file(None, flat, write=False)
        return target
    with atomic_dir(target) as d:
        meta = {"step": str(step), "fingerprint": record["fingerprint"]}
        save_safetensors(d / "model.safetensors", weights, meta)
        save_safetensors(d / "optimizer.safetensors", flat, meta)
        write_json(d / "state.json", {**record, "step": step})
    for old in sorted(state_dir.glob("step_*")):
        if old != target and not old.name.endswith(".tmp"):
            shutil.rmtree(old, ignore_errors=True)
    return target


def latest_state(state_dir, fingerprint: str) -> Path | None:
    """The newest complete state written for the same inputs and settings, or None."""
    for d in sorted(Path(state_dir).glob("step_*"), reverse=True):
        f = d / "state.json"
        if d.is_dir() and f.is_file() and json.loads(f.read_text()).get("fingerprint") == fingerprint:
            return d
    return None


def _shard_of(p, full: torch.Tensor) -> torch.Tensor:
    """This process's block of ``full`` (laid out like the DTensor ``p``), cut on ``full``'s device and copied to
    ``p``'s: a new tensor, so neither the full tensor nor a copy of it on the device stays referenced."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    part = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
    return part.to(p.device) if part.device != p.device else part.clone()


def local_part(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This process's part of ``full`` laid out like ``p``: its shard when ``p`` is a sharded DTensor (FSDP2;
    every process holds ``full`` and cuts its own shard, no communication), else ``full`` on ``p``'s device."""
    from torch.distributed.tensor import DTensor

    return _shard_of(p, full) if isinstance(p, DTensor) else full.to(p.device)


def _like(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` as a tensor of ``p``'s kind (an optimiser moment of ``p``): a DTensor sharded like ``p``, or plain."""
    from torch.distributed.tensor import DTensor

    if isinstance(p, DTensor):
        return DTensor.from_local(_shard_of(p, full), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return full.to(p.device)


@torch.no_grad()
def load_state(d: Path, student, opt) -> dict:
    """Restore a state written by ``save_state`` or ``write_state`` into ``student`` and ``opt``, whether their
    parameters are plain or sharded (FSDP2 DTensors), so a run resumes with any number of processes. Tensors
    are read one at a time."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    params = _param_names(student)
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        for n, p in params.items():
            if isinstance(p, DTensor):
                p.to_local().copy_(local_part(p, f.get_tensor(n)))
            else:
                p.copy_(f.get_tensor(n))
    with safe_open(str(d / "optimizer.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for n, p in params.items():
            if f"{n}.exp_avg" in keys:
                opt.state[p] = {
                    "step": f.get_tensor(f"{n}.step").reshape(()).clone(),
                    "exp_avg": _like(p, f.get_tensor(f"{n}.exp_avg")),
                    "exp_avg_sq": _like(p, f.get_tensor(f"{n}.exp_avg_sq")),
                }
        torch.set_rng_state(f.get_tensor("rng.cpu"))
        if "rng.cuda" in keys and torch.cuda.is_available():
            torch.cuda.set_rng_state(f.get_tensor("rng.cuda"))
    return json.loads((d / "state.json").read_text())


def fingerprint(cfg, data: torch.Tensor, files) -> str:
    """What a resumable state belongs to: the settings, the training tokens and the inputs' bytes (mask and
    weight files, configs: small files; the pruned checkpoint is base model x masks)."""
    import hashlib

    from ..atomic import sha256_file

    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode())
    h.update(data.numpy().tobytes())
    for f in files:
        h.update(sha256_file(f).encode())
    return h.hexdigest()
