"""The expert term of expert-wise distillation (MoE-Pruner §3.3):

    L_expert = Σ_layers Σ_experts MSE(teacher expert output, student expert output)

each expert's MSE a mean over its tokens and the hidden dimension, on un-gated expert outputs. Which tokens
(``teacher_routed``: those the teacher routes to that expert; ``all``) and which inputs (``teacher``: both
experts run on the teacher's hidden states of that layer; ``student``: on the student's) are settings
(``pruning.distill.train.KDConfig``). Student expert ``j`` is matched to the teacher expert with its original
index (``config.pruned_experts``), so expert-pruned students work.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..experts.removal import original_index
from ..moe import Experts, Routing


class MoECapture:
    """What each MoE layer's experts module receives in one forward: hidden states (T, H) and the routing, as
    the block passes them (gradients kept)."""

    def __init__(self, adapter, model):
        self.adapter, self.model = adapter, model
        self.hidden: dict[int, torch.Tensor] = {}
        self.routing: dict[int, Routing] = {}

    @contextlib.contextmanager
    def __call__(self):
        self.hidden.clear()
        self.routing.clear()
        stack = contextlib.ExitStack()
        for i in self.adapter.moe_layer_indices():
            def on_call(h, routing, i=i):
                self.hidden[i], self.routing[i] = h, routing

            stack.enter_context(self.adapter.observe_experts(self.adapter.decoder_layers(self.model)[i], on_call=on_call))
        with stack:
            yield self


def layer_expert_mse(teacher: Experts, student: Experts, original: list[int], x_teacher, routing_teacher: Routing,
                     x_student=None, inputs: str = "teacher", tokens: str = "teacher_routed"):
    """Σ over the student's experts of MSE(teacher expert output, student expert output) in one layer.

    ``original[j]`` is the teacher index of student expert j. ``x_*`` are the layer's MoE-block inputs (T, H),
    ``routing_teacher`` the teacher's routing of them. Experts that receive no token contribute nothing."""
    x = x_teacher if inputs == "teacher" else x_student
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32 or better, also under bf16 autocast
    total = x.new_zeros((), dtype=acc)
    for j, o in enumerate(original):
        if tokens == "teacher_routed":
            rows, _ = routing_teacher.tokens_of(o)
            if rows.numel() == 0:
                continue
            xe = x[rows]
        else:
            xe = x
        with torch.no_grad():  # each side in its own weights' dtype (e.g. a bf16 teacher, an fp32 student)
            target = teacher.output(o, xe.detach().to(teacher.gate_up.dtype))
        out = student.output(j, xe.to(student.gate_up.dtype))
        total = total + nn.functional.mse_loss(out.to(acc), target.to(acc))
    return total


def layer_expert_part(teacher: Experts, student: Experts, original: list[int], x, routing_teacher: Routing,
                      counts: list[int], tokens_total: int, tokens: str = "teacher_routed"):
    """One process's part of ``layer_expert_mse`` when a micro-batch is split over processes (data parallel).

    ``x`` (T_local, H) are this process's inputs of both experts (teacher's or student's hidden states),
    ``routing_teacher`` the teacher's routing of them. Each expert's squared error is summed over the local
    tokens and divided by the expert's token count in the *whole* micro-batch (``counts[o]``: tokens the teacher
    routes to its expert o on all processes; ``tokens_total``: all tokens, for ``tokens="all"``) times H, so the
    parts of all processes sum to the single-process term (up to float summation order)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    total = x.new_zeros((), dtype=acc)
    for j, o in enumerate(original):
        if tokens == "teacher_routed":
            n = counts[o]
            rows, _ = routing_teacher.tokens_of(o)
            if n == 0 or rows.numel() == 0:
                continue
            xe = x[rows]
        else:
            n, xe = tokens_total, x
        with torch.no_grad():
            target = teacher.output(o, xe.detach().to(teacher.gate_up.dtype))
        out = student.output(j, xe.to(student.gate_up.dtype))
        total = total + nn.functional.mse_loss(out.to(acc), target.to(acc), reduction="sum") / (n * out.shape[-1])
    return total


def expert_loss(t_adapter, teacher, s_adapter, student, t_capture: MoECapture, s_capture: MoECapture,
                inputs="teacher", tokens="teacher_routed") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """L_expert summed over layers, and the per-layer terms (tensors: no host sync on the training path), from
    one captured teacher and student forward."""
    t_layers, s_layers = t_adapter.decoder_layers(teacher), s_adapter.decoder_layers(student)
    per_layer = []
    for i in s_adapter.moe_layer_indices():
        orig = original_index(student.config, i, s_adapter.num_experts)
        per_layer.append(layer_expert_mse(t_adapter.expert_weights(t_layers[i]), s_adapter.expert_weights(s_layers[i]),
                                          orig, t_capture.hidden[i], t_capture.routing[i], s_capture.hidden.get(i),
                                          inputs, tokens))
    return torch.stack(per_layer).sum(), per_layer
