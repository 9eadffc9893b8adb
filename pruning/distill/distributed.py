"""Distillation over W processes: data parallel with fully sharded parameters (PyTorch FSDP2, ``fully_shard``),
launched with torchrun, so a student and teacher larger than one device train on the devices a job claims.

``distill_distributed(world_size, devices, load_student, load_teacher, load_masks, data, cfg, ...)`` trains
in this process when W = 1 (``train.distill``, today's path and numerics). For W > 1 it pickles the same
arguments into a job file and runs

    python -P -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node W --max-restarts 0
        --no-python python -P -u -m pruning.distill.distributed JOB

(one command line) with this process's ``sys.path`` as PYTHONPATH, so the workers import the same code. The
models are sharded over a one-dimensional mesh of the W processes: ``fully_shard`` on each decoder layer, then on
the root (the student; the teacher's base model; the teacher's unused LM head on its own), each process's shards
on its device ``devices[local_rank]`` (``"cuda:k"``: backend nccl; ``"cpu"``: gloo). A ``CheckpointLoader``
(what the pipeline passes) is never loaded whole by a worker: the model is built on meta with only the
embeddings, final norm and head read (``ShardSource``), sharded, then each decoder layer is read from the
checkpoint's shards on its own and only this process's shard of each parameter kept (``fill_shards``); host
memory holds one layer at a time. Another loader (a picklable callable, ``loader(device) -> model``, as the tests
pass) is loaded whole on the CPU in every worker, then sharded. Device memory holds 1/W of both models and of
AdamW's moments, the layers being computed gathered (a student layer and its teacher layer at a time in the
forward), the student's root parameters (embeddings, head) gathered from forward to backward, and the
activations of this process's part of a micro-batch. The trained student is gathered parameter by parameter
and written by rank 0 one tensor at a time; the job then loads it once, whole, in host memory, to save it
(``save_pretrained``) and check its masks.

Same update as one process, up to float summation order:

- Each optimiser step uses the same global batch (``train.micro_batches``); every micro-batch is split into W
  near-equal contiguous parts, one per process (``batch_size >= W``). Process r's CE is weighted by its share
  of the micro-batch's samples (equal-length windows: the token mean over the whole micro-batch).
- L_expert of a micro-batch is a sum of per-expert means over the tokens the teacher routes to each expert in
  the *whole* micro-batch: the routed-token counts are all-reduced after the teacher's forward, and each
  process contributes its tokens' squared errors divided by the global count (``loss.layer_expert_part``).
- Gradients are summed over the processes (FSDP's gradient divide factor set to 1, sum reduction), so the
  summed per-process losses are the single-process loss.
- λ = L_CE / L_expert on the first micro-batch, both terms all-reduced first; the logged curve is the
  all-reduced losses, identical on every process.

The expert term needs the experts' weights, which FSDP gathers only during a layer's forward and backward.
It is therefore computed inside each student MoE layer's experts forward (the teacher's matching layer gathered
for that moment with ``unshard()``/``reshard()``) and joined to the experts' output by an autograd function that
feeds λ·∂/∂term into the backward when the backward reaches that layer, while FSDP holds the layer gathered
(the pattern of Megatron's auxiliary-loss scaler). Masks stay fixed on the local shards (``train.FixedMasks``).
Resumable states are written by rank 0 in the single-process format, each parameter and moment gathered in
turn as it is written (``state.write_state``), so a run resumes with any number of processes.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .loss import MoECapture, layer_expert_part
from .state import save_state
from .train import (KDConfig, _autocast, _begin_step, _checkpoint, _end_step, _finish, _schedule, _start, _steps,
                    distill, optimizer_step)

WORLD_SIZE_ENV = "PRUNING_DISTILL_WORLD_SIZE"  # processes on the CPU (no GPU claimed); tests use it
COLLECTIVE_TIMEOUT_S = 2 * 3600  # a collective waits this long (a state being written on rank 0) before failing


def world_size_for(devices) -> int:
    """Processes for a job's claimed devices: one per claimed GPU; on the CPU ``$PRUNING_DISTILL_WORLD_SIZE``
    (default 1)."""
    devices = list(devices) if isinstance(devices, (list, tuple)) else [devices]
    if all(str(d) == "cpu" for d in devices):
        return int(os.environ.get(WORLD_SIZE_ENV) or 1)
    return len(devices)


# -- launching ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointLoader:
    """A model in a checkpoint directory, picklable. Called: the whole model on a device (``load_model``);
    ``source()``: the meta skeleton that the torchrun workers fill with their shards alone (``fill_shards``)."""

    model_dir: str
    dtype: str = "float32"
    trust_remote_code: bool = False

    def __call__(self, device="cpu"):
        from ..models.checkpoint import load_model

        return load_model(self.model_dir, self.dtype, device, self.trust_remote_code)

    def source(self):
        from ..models.layer_source import ShardSource

        return ShardSource(self.model_dir, self.dtype, "cpu", self.trust_remote_code)


@torch.no_grad()
def fill_shards(source, device) -> None:
    """The decoder layers of a ``ShardSource`` skeleton, already ``fully_shard``-ed on meta, given this process's
    shards: each layer's tensors read from the checkpoint (one layer in host memory at a time), the layer
    allocated on ``device`` (``to_empty``; its real buffers, e.g. rotary frequencies, kept), and each
    parameter's local shard cut from the full tensor on the CPU (the block FSDP2's ``Shard(0)`` gives this rank),
    so only the shard reaches the device."""
    from torch.distributed.tensor import DTensor

    from .state import local_part

    for i, layer in enumerate(source.adapter.decoder_layers(source.model)):
        names = list(layer.state_dict(keep_vars=True))
        tensors = source.layer_tensors(i, names)
        real = [(m, n, b) for m in layer.modules() for n, b in m._buffers.items() if b is not None and not b.is_meta]
        layer.to_empty(device=device)
        for m, n, b in real:
            m._buffers[n] = b.to(device)
        state = layer.state_dict(keep_vars=True)
        for name in names:
            target, full = state[name], tensors.pop(name)
            if isinstance(target, DTensor):
                target.to_local().copy_(local_part(target, full))
            else:  # a persistent buffer (a router's selection bias): every process holds it whole
                target.copy_(full.to(target.dtype))
        del tensors


def _load_for_worker(loader):
    """(model, source or None) in a worker: a ``CheckpointLoader``'s skeleton (layers on meta), or the whole
    model from any other loader."""
    if isinstance(loader, CheckpointLoader):
        source = loader.source()
        return source.model, source
    return loader("cpu"), None


@dataclass
class _Job:
    """What every worker receives: the arguments of ``distill_distributed``, pickled."""

    load_student: Callable
    load_teacher: Callable
    load_masks: Callable
    data: torch.Tensor
    cfg: KDConfig
    devices: list[str]
    state_dir: str | None
    fingerprint: str
    result_dir: str
    progress: bool
    threads: int
    deterministic: bool
    deterministic_warn_only: bool


def distill_distributed(world_size: int, devices, load_student: Callable, load_teacher: Callable,
                        load_masks: Callable, data: torch.Tensor, cfg: KDConfig, *, state_dir=None,
                        fingerprint: str = "", progress: bool = True, log=None, scratch_dir=None):
    """Distil over ``world_size`` processes; returns ``(student, record)`` as ``train.distill`` leaves them.

    ``load_student(device)`` / ``load_teacher(device)`` return the models (fp32 student master weights), and
    ``load_masks()`` the masks (``train.distill``'s ``masks``); for W > 1 they, ``data`` and ``cfg`` are
    pickled for the workers, so they must be importable module-level callables (``functools.partial`` of
    one is fine). ``devices``: one per process (``"cuda:k"``), or ``"cpu"``/``["cpu"]`` for W CPU processes
    (gloo). W = 1 runs here on ``devices[0]`` and returns the student there; W > 1 returns it on the CPU,
    loaded with ``load_student("cpu")`` and given the trained weights. ``scratch_dir`` (default:
    ``state_dir/handover``, else a temporary directory) receives the job file and, from rank 0, the trained
    weights for the hand-over; it is emptied afterwards."""
    devices = [str(d) for d in devices] if isinstance(devices, (list, tuple)) else [str(devices)]
    if world_size < 1:
        raise ValueError(f"world_size {world_size} < 1")
    if world_size == 1:
        device = devices[0]
        from ..models import get_adapter

        student, teacher, masks = load_student(device), load_teacher(device), load_masks()
        record = distill(student, teacher, get_adapter(student.config), get_adapter(teacher.config), masks, data,
                         cfg, device=device, state_dir=state_dir, fingerprint=fingerprint, progress=progress, log=log)
        return student, record
    if devices == ["cpu"]:
        devices = ["cpu"] * world_size
    if len(devices) != world_size:
        raise ValueError(f"{world_size} processes need {world_size} devices, got {devices}")
    if any(d == "cpu" for d in devices) and any(d != "cpu" for d in devices):
        raise ValueError(f"devices mix the CPU and GPUs: {devices}")
    if cfg.batch_size < world_size:
        raise ValueError(f"batch_size {cfg.batch_size} < {world_size} processes: every process needs a part of "
                         f"each micro-batch")
    if scratch_dir is None and state_dir is not None:
        scratch_dir = Path(state_dir) / "handover"  # beside the states (not a step_* name), on their disk
    made = scratch_dir is not None and not Path(scratch_dir).exists()
    if made:
        Path(scratch_dir).mkdir(parents=True)
    work = Path(tempfile.mkdtemp(prefix="distill-", dir=scratch_dir))
    try:
        job = _Job(load_student, load_teacher, load_masks, data.cpu(), cfg, devices,
                   None if state_dir is None else str(state_dir), fingerprint, str(work / "result"), progress,
                   max(1, torch.get_num_threads() // world_size), torch.are_deterministic_algorithms_enabled(),
                   torch.is_deterministic_algorithms_warn_only_enabled())
        job_file = work / "job.pkl"
        job_file.write_bytes(pickle.dumps(job))
        # the workers import what this process imports (this package, the loaders' modules): exactly this
        # process's search path (-P: nothing prepended, not even the working directory)
        cmd = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc-per-node", str(world_size), "--max-restarts", "0", "--no-python",
               sys.executable, "-P", "-u", "-m", __name__, str(job_file)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p or os.getcwd() for p in sys.path))
        env["OMP_NUM_THREADS"] = str(job.threads)
        if log:
            log.info("distilling over %d processes (%s): %s", world_size, ", ".join(devices), " ".join(cmd))
        sys.stdout.flush()
        sys.stderr.flush()
        rc = subprocess.run(cmd, env=env).returncode  # the workers write to this process's stdout/stderr
        if rc != 0:
            raise RuntimeError(f"distillation over {world_size} processes failed (torchrun exit {rc}); the "
                               f"workers' output is above")
        record = json.loads((work / "result" / "record.json").read_text())
        student = load_student("cpu")
        _load_weights(student, work / "result" / "student.safetensors")
        return student, record
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):
                Path(scratch_dir).rmdir()  # made here, and empty


@torch.no_grad()
def _load_weights(model: nn.Module, path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for n, p in model.named_parameters():
            p.copy_(f.get_tensor(n))


def _worker(job_file: str) -> None:
    """One torchrun worker: join the process group, load and shard the models, train, hand the result over."""
    import logging

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ..models import get_adapter

    job: _Job = pickle.loads(Path(job_file).read_bytes())
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = job.devices[local]
    if device.startswith("cuda"):
        device = device if ":" in device else f"cuda:{local}"
        torch.cuda.set_device(torch.device(device))
        backend = "nccl"
    else:
        backend = "gloo"
    torch.set_num_threads(job.threads)
    torch.manual_seed(job.cfg.seed)
    if job.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=job.deterministic_warn_only)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [rank {rank}] %(message)s",
                        stream=sys.stderr)
    log = logging.getLogger("pruning")
    # rank 0 gathers and writes whole training states while the others wait: allow more than the default 10 min
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        mesh = init_device_mesh(device.split(":")[0], (world,))
        (student, s_src), (teacher, t_src) = _load_for_worker(job.load_student), _load_for_worker(job.load_teacher)
        masks = job.load_masks()

        def fill():
            for src in (s_src, t_src):
                if src is not None:
                    fill_shards(src, device)

        record = distill_sharded(student, teacher, get_adapter(student.config), get_adapter(teacher.config), masks,
                                 job.data, job.cfg, device=device, mesh=mesh, state_dir=job.state_dir,
                                 fingerprint=job.fingerprint, progress=job.progress and rank == 0,
                                 log=log if rank == 0 else None, after_sharding=fill)
        write_gathered(Path(job.result_dir), student, record, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def write_gathered(result_dir: Path, student, record: dict, world: int) -> None:
    """The trained student's full parameters, gathered one at a time (a collective: every process calls it) and
    written by rank 0 as they come (one full tensor in host memory), with the record."""
    import torch.distributed as dist

    from ..atomic import atomic_dir, write_json
    from ..safetensors_io import write_file

    params = {n: p.detach() for n, p in student.named_parameters()}
    meta = {"what": "distilled student", "world_size": str(world)}
    if dist.get_rank() != 0:
        write_file(None, params, write=False)
        return
    with atomic_dir(result_dir) as d:
        write_file(d / "student.safetensors", params, meta)
        write_json(d / "record.json", record)


# -- sharded training -------------------------------------------------------------------------------------


def shard_models(student, teacher, s_adapter, t_adapter, mesh) -> None:
    """``fully_shard`` every decoder layer, then the root: the student itself; the teacher's base model (the
    teacher runs only that) and, if untied, its LM head on its own (never run; sharded to free its memory)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for layer in s_adapter.decoder_layers(student):
        fully_shard(layer, mesh=mesh)
    fully_shard(student, mesh=mesh)
    for m in student.modules():
        if isinstance(m, FSDPModule):  # sum the processes' gradients: their losses add up to the global one
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    head, embed = teacher.get_output_embeddings(), teacher.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    for layer in t_adapter.decoder_layers(teacher):
        fully_shard(layer, mesh=mesh)
    fully_shard(teacher.base_model, mesh=mesh)
    if head is not None:
        if tied:
            head.weight = teacher.get_input_embeddings().weight  # the sharded parameter, not the old full one
        else:
            fully_shard(head, mesh=mesh)


class _JoinTerm(torch.autograd.Function):
    """Return ``out`` and, in the backward, send ``scale`` as the gradient of ``term``: the term joins the loss
    at the point of the graph where it was computed, inside its layer's backward."""

    @staticmethod
    def forward(ctx, out, term, holder):
        ctx.holder = holder
        ctx.term_dtype = term.dtype
        return out.clone()  # a new tensor: the block may modify it in place

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.holder.scale, dtype=ctx.term_dtype, device=grad.device), None


class ShardedExpertTerm:
    """L_expert under FSDP: each student MoE layer's part, computed inside its experts forward (the student's
    layer is gathered there; the teacher's matching layer is gathered for the moment), joined to the backward
    with weight ``scale`` (set before ``backward``). ``terms`` holds the detached per-layer parts."""

    def __init__(self, t_adapter, teacher, s_adapter, student, t_capture: MoECapture, cfg: KDConfig):
        from ..experts.removal import original_index

        self.t_adapter, self.teacher, self.s_adapter, self.student = t_adapter, teacher, s_adapter, student
        self.t_capture, self.cfg = t_capture, cfg
        self.layers = s_adapter.moe_layer_indices()
        self.original = {i: original_index(student.config, i, s_adapter.num_experts) for i in self.layers}
        self.scale = 0.0
        self.terms: list[torch.Tensor] = []

    def global_counts(self, device) -> list[list[int]]:
        """Tokens the teacher routed to each of its experts in each MoE layer, summed over the processes."""
        import torch.distributed as dist

        experts = torch.arange(self.t_adapter.num_experts, device=device)
        counts = torch.stack([(self.t_capture.routing[i].index.to(device).flatten()[:, None] == experts).sum(0)
                              for i in self.layers]).to(torch.int64)  # (not bincount: nondeterministic on CUDA)
        dist.all_reduce(counts)
        return counts.tolist()

    def _term(self, i, experts, x_student, counts, tokens_total):
        t_layer = self.t_adapter.decoder_layers(self.teacher)[i]
        x = self.t_capture.hidden[i] if self.cfg.expert_inputs == "teacher" else x_student
        t_layer.unshard()
        try:
            return layer_expert_part(self.t_adapter.expert_weights(t_layer), self.s_adapter.experts_of(experts),
                                     self.original[i], x, self.t_capture.routing[i], counts, tokens_total,
                                     self.cfg.expert_tokens)
        finally:
            t_layer.reshard()

    @contextlib.contextmanager
    def __call__(self, counts: list[list[int]], tokens_total: int, grad: bool):
        """Compute the parts during the student forwards inside; without ``grad`` only for the log."""
        self.terms = []
        wrapped = []
        s_layers = self.s_adapter.decoder_layers(self.student)
        for k, i in enumerate(self.layers):
            experts = self.s_adapter.experts(s_layers[i])
            previous, original = experts.__dict__.get("forward"), experts.forward

            def forward(hidden_states, *args, i=i, k=k, experts=experts, original=original, **kwargs):
                out = original(hidden_states, *args, **kwargs)
                with contextlib.nullcontext() if grad else torch.no_grad():
                    term = self._term(i, experts, hidden_states, counts[k], tokens_total)
                self.terms.append(term.detach())
                return _JoinTerm.apply(out, term, self) if term.requires_grad else out

            experts.forward = forward
            wrapped.append((experts, previous))
        try:
            yield self
        finally:
            for experts, previous in wrapped:
                if previous is None:
                    del experts.forward
                else:
                    experts.forward = previous


def _gathered_norm(norm) -> float:
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def save_state_sharded(state_dir, step: int, student, opt, record: dict) -> None:
    """``state.save_state`` of a sharded student: each parameter and moment gathered in turn and written by
    rank 0 as it comes, in the single-process format (one full tensor in host memory at a time). A collective:
    every process calls it."""
    import torch.distributed as dist

    save_state(state_dir, step, student, opt, record, write=dist.get_rank() == 0)
    dist.barrier()


def distill_sharded(student, teacher, s_adapter, t_adapter, masks: dict, data: torch.Tensor, cfg: KDConfig, *,
                    device="cpu", mesh=None, state_dir=None, fingerprint: str = "", progress: bool = True, log=None,
                    on_checkpoint=None, after_sharding=None) -> dict:
    """``train.distill`` on this process's part of the data, the models sharded over the process group (every
    process calls it with the same arguments). The models are sharded in place (``shard_models``), then
    ``after_sharding()`` runs (``fill_shards`` of models built on meta); the record is the same on every
    process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    n, seqlen = data.shape
    spe, total = _schedule(n, cfg)
    if cfg.batch_size < world:
        raise ValueError(f"batch_size {cfg.batch_size} < {world} processes")
    if mesh is None:
        mesh = init_device_mesh(str(device).split(":")[0], (world,))
    teacher.eval().requires_grad_(False)
    student.train()
    shard_models(student, teacher, s_adapter, t_adapter, mesh)
    if after_sharding is not None:
        after_sharding()
    # each process: its shards of the masks and of AdamW's moments
    fixed, params, opt, record, start = _start(student, s_adapter, masks, cfg, spe, total, state_dir=state_dir,
                                               fingerprint=fingerprint, log=log)
    t_cap = MoECapture(t_adapter, teacher)
    term = ShardedExpertTerm(t_adapter, teacher, s_adapter, student, t_cap, cfg)
    bar = _steps(start, total, progress, f"distill x{world}")
    t0 = time.time()
    for step in bar:
        lr, epoch, batches = _begin_step(step, total, n, cfg, opt)
        ce_sum = exp_sum = 0.0
        for idx in batches:
            mine = idx.tensor_split(world)[rank]
            share = mine.numel() / idx.numel()  # equal-length windows: this process's part of the token mean
            ids = data[mine].to(device)
            with _autocast(device, cfg.precision):
                with torch.no_grad(), t_cap():
                    teacher.base_model(input_ids=ids)
                counts = term.global_counts(device)
                # with λ fixed at 0 (the CE-only control) the term is only logged: no graph, no backward through it
                with term(counts, idx.numel() * seqlen, grad=record["lambda"] != 0):
                    ce = student(input_ids=ids, labels=ids).loss
            local = torch.stack([ce.detach().double() * share, torch.stack(term.terms).sum().double()])
            dist.all_reduce(local)
            ce_g, exp_g = local.tolist()
            if record["lambda"] is None:  # λ = L_CE / L_expert at the first step, on the whole micro-batch
                record["lambda"], record["lambda_source"] = (ce_g / exp_g if exp_g > 0 else 0.0), "initial L_CE / L_expert"
            term.scale = record["lambda"] / len(batches)
            (ce * (share / len(batches))).backward()  # + scale x this process's expert parts, layer by layer
            ce_sum += ce_g / len(batches)
            exp_sum += exp_g / len(batches)
        grad_norm = optimizer_step(fixed, params, opt, cfg, norm=_gathered_norm)
        _end_step(record, bar, progress, step, epoch, lr, ce_sum, exp_sum, grad_norm)
        _checkpoint(step + 1, total, cfg, state_dir,
                    lambda done: save_state_sharded(state_dir, done, student, opt, record), on_checkpoint)
    student.eval()
    violations = torch.tensor(fixed.violations(), dtype=torch.int64, device=device)
    dist.all_reduce(violations)
    return _finish(record, int(violations), t0, start)


if __name__ == "__main__":
    from pruning.distill.distributed import _worker as _run_worker  # the package's module, not this __main__ copy

    _run_worker(sys.argv[1])
