"""Resumable training states of a distillation run: every ``checkpoint_every`` optimiser steps the student's
parameters, AdamW's moments, the step counter (which fixes the learning rate and the data position: the epoch
permutations are seeded), λ, the RNG and the loss history are written atomically (safetensors + JSON). A run
started again continues from the newest state with the same fingerprint (settings, data and input files).
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


def save_state(state_dir, step: int, student, opt, record: dict) -> Path:
    """Write ``state_dir/step_<step>`` atomically (a new name, then rename), then remove older states."""
    from ..atomic import atomic_dir, save_safetensors, write_json

    state_dir = Path(state_dir)
    target = state_dir / f"step_{step:08d}"
    params = _param_names(student)
    with atomic_dir(target) as d:
        meta = {"step": str(step), "fingerprint": record["fingerprint"]}
        save_safetensors(d / "model.safetensors", {n: p.detach() for n, p in params.items()}, meta)
        moments = {}
        for n, p in params.items():
            st = opt.state.get(p)
            if st:
                moments[f"{n}.exp_avg"] = st["exp_avg"]
                moments[f"{n}.exp_avg_sq"] = st["exp_avg_sq"]
                moments[f"{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
        moments["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            moments["rng.cuda"] = torch.cuda.get_rng_state()
        save_safetensors(d / "optimizer.safetensors", moments, meta)
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


@torch.no_grad()
def load_state(d: Path, student, opt) -> dict:
    from safetensors.torch import load_file

    params = _param_names(student)
    weights = load_file(str(d / "model.safetensors"))
    for n, p in params.items():
        p.copy_(weights[n])
    moments = load_file(str(d / "optimizer.safetensors"))
    for n, p in params.items():
        if f"{n}.exp_avg" in moments:
            opt.state[p] = {
                "step": moments[f"{n}.step"].reshape(()).clone(),
                "exp_avg": moments[f"{n}.exp_avg"].to(p.device),
                "exp_avg_sq": moments[f"{n}.exp_avg_sq"].to(p.device),
            }
    torch.set_rng_state(moments["rng.cpu"])
    if "rng.cuda" in moments and torch.cuda.is_available():
        torch.cuda.set_rng_state(moments["rng.cuda"])
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
