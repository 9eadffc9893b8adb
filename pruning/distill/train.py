"""Expert-wise knowledge distillation (MoE-Pruner §3.3): the pruned student learns from the unpruned teacher
with its masks held fixed.

    L = L_CE + λ · L_expert          (L_expert: ``pruning.distill.loss``)

L_CE is the student's next-token loss. λ is L_CE / L_expert on the first micro-batch unless fixed. All student
parameters train; after every optimiser step every pruned position is zero again (its gradient is masked too,
so AdamW's moments stay zero there). The run is resumable (``pruning.distill.state``) and a resumed run ends
with the same weights as an uninterrupted one (bitwise on CPU with deterministic algorithms). This is the
single-process loop; ``pruning.distill.distributed`` runs the same training data parallel over W processes with
the models sharded (FSDP2), equal to this one up to float summation order.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass

import torch

from ..weights.assemble import layer_params
from .loss import MoECapture, expert_loss
from .state import latest_state, load_state, save_state

EXPERT_INPUTS = ("teacher", "student")
EXPERT_TOKENS = ("teacher_routed", "all")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class KDConfig:
    epochs: int = 3
    lr: float = 2e-5
    warmup_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    lambda_: float | None = None  # None: L_CE / L_expert on the first micro-batch
    expert_inputs: str = "teacher"
    expert_tokens: str = "teacher_routed"
    checkpoint_every: int = 50
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    seed: int = 0

    @classmethod
    def from_params(cls, p: dict, seed: int) -> "KDConfig":
        keys = {f for f in cls.__dataclass_fields__ if f not in ("lambda_", "seed")}
        return cls(**{k: p[k] for k in keys if k in p}, lambda_=p.get("lambda"), seed=seed)

    def __post_init__(self):
        if self.expert_inputs not in EXPERT_INPUTS:
            raise ValueError(f"expert_inputs {self.expert_inputs!r}: allowed {', '.join(EXPERT_INPUTS)}")
        if self.expert_tokens not in EXPERT_TOKENS:
            raise ValueError(f"expert_tokens {self.expert_tokens!r}: allowed {', '.join(EXPERT_TOKENS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: allowed {', '.join(PRECISIONS)}")


# -- fixed masks ----------------------------------------------------------------------------------------


class FixedMasks:
    """The pruned positions of every expert matrix, kept at zero: gradients masked, weights re-zeroed.

    With sharded parameters (FSDP2 DTensors) each process keeps its shard of every mask and works on its local
    shards of the weights and gradients, which hold the same positions; ``violations`` then counts this
    process's shard only (``pruning.distill.distributed`` sums it over the processes)."""

    def __init__(self, adapter, model, masks: dict[int, dict[str, torch.Tensor]]):
        from .state import local_part

        self.pairs = []
        for layer, m in sorted(masks.items()):
            for p, mask in layer_params(adapter, adapter.decoder_layers(model)[layer], m, f"layer {layer} mask"):
                self.pairs.append((layer, p, local_part(p, mask.bool())))

    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        """A plain tensor, or a DTensor's local shard (the same storage: in-place ops write through)."""
        return t.to_local() if hasattr(t, "to_local") else t

    @torch.no_grad()
    def mask_grads(self) -> None:
        for _, p, m in self.pairs:
            if p.grad is not None:
                self._local(p.grad).mul_(m)

    @torch.no_grad()
    def apply(self) -> None:
        for _, p, m in self.pairs:
            self._local(p).mul_(m)

    @torch.no_grad()
    def violations(self) -> int:
        """Pruned positions that are not exactly zero."""
        return sum(int((self._local(p.detach())[~m] != 0).sum()) for _, p, m in self.pairs)


# -- schedule and data order ----------------------------------------------------------------------------


def cosine_lr(step: int, total: int, lr: float, warmup: int = 0) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_per_epoch(samples: int, cfg: KDConfig) -> int:
    return samples // (cfg.batch_size * cfg.grad_accum)


def micro_batches(step: int, samples: int, cfg: KDConfig) -> tuple[int, list[torch.Tensor]]:
    """(epoch, sample indices of each micro-batch) of optimiser step ``step``: a seeded permutation per epoch,
    so the data position is a function of the step alone."""
    spe = steps_per_epoch(samples, cfg)
    epoch, within = divmod(step, spe)
    perm = torch.randperm(samples, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
    per_step = cfg.batch_size * cfg.grad_accum
    chunk = perm[within * per_step : (within + 1) * per_step]
    return epoch, list(chunk.split(cfg.batch_size))


# -- the parts of a training loop (also ``pruning.distill.distributed.distill_sharded``'s) -------------


def _autocast(device: str, precision: str):
    bf16 = precision == "bf16" or (precision == "auto" and str(device).startswith("cuda"))
    if bf16:
        return torch.autocast(device_type=str(device).split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _schedule(samples: int, cfg: KDConfig) -> tuple[int, int]:
    """(steps per epoch, total optimiser steps) of a run on ``samples`` windows; an error if they fill no step."""
    spe = steps_per_epoch(samples, cfg)
    if spe < 1:
        raise ValueError(f"{samples} samples do not fill one step of batch_size x grad_accum = "
                         f"{cfg.batch_size * cfg.grad_accum}")
    return spe, spe * cfg.epochs


def _start(student, s_adapter, masks: dict, cfg: KDConfig, spe: int, total: int, *, state_dir, fingerprint: str,
           log) -> tuple[FixedMasks, list, torch.optim.Optimizer, dict, int]:
    """``(fixed, params, opt, record, start)``: the masks applied to the student, its trainable parameters, their
    AdamW and the run record, new or resumed from the newest matching state in ``state_dir`` (then ``start`` is
    its step)."""
    fixed = FixedMasks(s_adapter, student, masks)
    fixed.apply()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    record = {"fingerprint": fingerprint, "lambda": cfg.lambda_, "lambda_source": "fixed" if cfg.lambda_ is not None else None,
              "history": [], "config": asdict(cfg), "total_steps": total, "steps_per_epoch": spe}
    start = 0
    resumed = latest_state(state_dir, fingerprint) if state_dir else None
    if resumed is not None:
        record = load_state(resumed, student, opt)
        start = record["step"]
        if log:
            log.info("resumed from %s (step %d of %d)", resumed, start, total)
    return fixed, params, opt, record, start


def _steps(start: int, total: int, progress: bool, desc: str):
    """The optimiser steps still to run, behind a progress bar with ``progress``."""
    bar = range(start, total)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, total=total, initial=start, desc=desc, unit="step", mininterval=2)
    return bar


def _begin_step(step: int, total: int, samples: int, cfg: KDConfig, opt) -> tuple[float, int, list[torch.Tensor]]:
    """Set the learning rate of step ``step`` and clear the gradients; returns (lr, epoch, micro-batches)."""
    lr = cosine_lr(step, total, cfg.lr, cfg.warmup_steps)
    for g in opt.param_groups:
        g["lr"] = lr
    epoch, batches = micro_batches(step, samples, cfg)
    opt.zero_grad(set_to_none=True)
    return lr, epoch, batches


def optimizer_step(fixed: FixedMasks, params: list, opt, cfg: KDConfig, norm=float) -> float | None:
    """Mask the gradients, clip them to ``cfg.max_grad_norm``, step, and zero the pruned positions again.
    Returns the gradient norm before clipping (None without clipping); ``norm`` turns ``clip_grad_norm_``'s
    result into a float (sharded: the norm over all processes)."""
    fixed.mask_grads()
    grad_norm = None
    if cfg.max_grad_norm:
        grad_norm = norm(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    opt.step()
    fixed.apply()
    return grad_norm


def history_row(step: int, epoch: int, lr: float, ce: float, expert: float, lam: float,
                grad_norm: float | None) -> dict:
    """The history row of optimiser step ``step`` (0-based; the row counts steps done)."""
    return {"step": step + 1, "epoch": epoch, "lr": lr, "ce_loss": ce, "expert_loss": expert,
            "weighted_expert_loss": lam * expert, "loss": ce + lam * expert, "grad_norm": grad_norm}


def _end_step(record: dict, bar, progress: bool, step: int, epoch: int, lr: float, ce: float, expert: float,
              grad_norm: float | None) -> None:
    """Append step ``step``'s row to the record's history and show its losses on the progress bar."""
    record["history"].append(history_row(step, epoch, lr, ce, expert, record["lambda"], grad_norm))
    if progress:
        bar.set_postfix(ce=f"{ce:.3f}", expert=f"{expert:.3g}", lam=f"{record['lambda']:.3g}")


def _checkpoint(done: int, total: int, cfg: KDConfig, state_dir, save, on_checkpoint) -> None:
    """After every ``cfg.checkpoint_every`` steps but the last (with a ``state_dir``): ``save(done)`` writes the
    state, then ``on_checkpoint(done)``."""
    if state_dir and (done % cfg.checkpoint_every == 0) and done < total:
        save(done)
        if on_checkpoint:
            on_checkpoint(done)


def _finish(record: dict, violations: int, t0: float, start: int) -> dict:
    """The record of a finished run; an error if pruned positions (``violations``) are not zero."""
    if violations:
        raise AssertionError(f"{violations} pruned positions are not zero after distillation")
    record["seconds_this_run"] = time.time() - t0
    record["resumed_from_step"] = start
    return record


# -- training ------------------------------------------------------------------------------------------


def distill(student, teacher, s_adapter, t_adapter, masks: dict, data: torch.Tensor, cfg: KDConfig, *,
            device="cpu", state_dir=None, fingerprint: str = "", progress: bool = True, log=None,
            on_checkpoint=None) -> dict:
    """Train ``student`` in place on ``data`` (n, seqlen) token windows; returns the run record (λ, history).

    ``masks[layer]`` = {"gate_up", "down"} bool keep-masks of the student's expert weights. With
    ``state_dir`` the run writes resumable states there and starts from the newest matching one.
    ``on_checkpoint(step)`` is called after each state is written (tests use it to stop a run)."""
    n = data.shape[0]
    spe, total = _schedule(n, cfg)
    teacher.eval().requires_grad_(False)
    student.train()
    fixed, params, opt, record, start = _start(student, s_adapter, masks, cfg, spe, total, state_dir=state_dir,
                                               fingerprint=fingerprint, log=log)
    t_cap, s_cap = MoECapture(t_adapter, teacher), MoECapture(s_adapter, student)
    bar = _steps(start, total, progress, "distill")
    t0 = time.time()
    for step in bar:
        lr, epoch, batches = _begin_step(step, total, n, cfg, opt)
        ce_sum = exp_sum = 0.0
        for idx in batches:
            ids = data[idx].to(device)
            with _autocast(device, cfg.precision):
                with torch.no_grad(), t_cap():
                    teacher.base_model(input_ids=ids)
                with s_cap():
                    ce = student(input_ids=ids, labels=ids).loss
                # with λ fixed at 0 (the CE-only control) the term is only logged: no graph, no backward through it
                with torch.no_grad() if record["lambda"] == 0 else contextlib.nullcontext():
                    l_exp, _ = expert_loss(t_adapter, teacher, s_adapter, student, t_cap, s_cap,
                                           cfg.expert_inputs, cfg.expert_tokens)
            if record["lambda"] is None:  # λ = L_CE / L_expert at the first step: both terms start equal
                e = l_exp.item()
                record["lambda"], record["lambda_source"] = (ce.item() / e if e > 0 else 0.0), "initial L_CE / L_expert"
            loss = (ce + record["lambda"] * l_exp) / len(batches)
            loss.backward()
            ce_sum += ce.item() / len(batches)
            exp_sum += l_exp.item() / len(batches)
        grad_norm = optimizer_step(fixed, params, opt, cfg)
        _end_step(record, bar, progress, step, epoch, lr, ce_sum, exp_sum, grad_norm)
        _checkpoint(step + 1, total, cfg, state_dir, lambda done: save_state(state_dir, done, student, opt, record),
                    on_checkpoint)
    student.eval()
    return _finish(record, fixed.violations(), t0, start)
