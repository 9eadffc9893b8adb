"""gpt-oss (transformers 5.24): ``model.layers[i].mlp`` = GptOssMLP(router: TopKRouter with weight and bias,
experts: GptOssExperts); every layer is an MoE layer, no shared expert.

Routing: logits = W x + b, top-k on the logits, softmax over the k (no scaling).
Experts: transposed and interleaved layout, ``gate_up_proj`` (E, H, 2I) with the gate in the even and up in the
odd columns, ``down_proj`` (E, I, H), biases ``gate_up_proj_bias`` (E, 2I) and ``down_proj_bias`` (E, H), and a
clamped SwiGLU: gate <= limit, -limit <= up <= limit, h = (up + 1) * gate * sigmoid(alpha * gate).
The eager loop one-hot encodes the routing with E classes, so a skipped slot (index E) gets a loop that leaves it
out. Checkpoints on the hub are MXFP4-quantised (``*_blocks``/``*_scales``); per-layer jobs read the bf16 layout
(the fused names above), so an MXFP4 checkpoint must be dequantised first.
"""
from __future__ import annotations

import torch

from .. import moe
from .adapter import MoEAdapter


class ClampedSwiGLU:
    """gpt-oss's gating on canonical (gate, up) halves."""

    def __init__(self, alpha: float, limit: float):
        self.alpha, self.limit = alpha, limit

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """(..., 2I) interleaved gate/up -> (..., 2I) with the gate first."""
    return torch.cat([t[..., ::2], t[..., 1::2]], dim=-1)


def _interleave(t: torch.Tensor) -> torch.Tensor:
    """(..., 2I) gate first -> interleaved gate/up."""
    gate, up = t.chunk(2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


class GptOssAdapter(MoEAdapter):
    family = "gpt_oss"
    router_name = "router"
    attn_implementation = "eager"  # attention sinks: transformers 5.24 refuses sdpa for gpt-oss
    expert_count_keys = ("num_local_experts",)

    def rule(self):
        return moe.TopK(self.top_k, "topk_softmax", normalize=False)

    def activation(self):
        return None

    def glu(self):
        return ClampedSwiGLU(float(self._config("swiglu_alpha", 1.702)), float(self._config("swiglu_limit", 7.0)))

    def canonical(self, name, tensor):
        if name == "gate_up":  # (E, H, 2I) interleaved -> (E, 2I, H) gate first
            return _deinterleave(tensor).transpose(-1, -2).contiguous()
        return tensor.transpose(-1, -2).contiguous()  # down (E, I, H) -> (E, H, I)

    def native(self, name, tensor):
        if name == "gate_up":
            return _interleave(tensor.transpose(-1, -2)).contiguous()
        return tensor.transpose(-1, -2).contiguous()

    def _experts(self, gate_up, down, gate_up_bias, down_bias):
        return moe.Experts(self.canonical("gate_up", gate_up), self.canonical("down", down), None,
                           _deinterleave(gate_up_bias), down_bias, self.glu())

    def experts_of(self, module):
        return self._experts(module.gate_up_proj, module.down_proj, module.gate_up_proj_bias, module.down_proj_bias)

    def expert_weight_keys(self, layer):
        p = f"model.layers.{layer}.mlp.experts"
        return {"fused": [f"{p}.{n}" for n in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")]}

    def experts_from_tensors(self, tensors, layer, layout):
        return self._experts(*(tensors[k] for k in self.expert_weight_keys(layer)["fused"]))

    def prepare_skipping(self, layer):
        experts = self.experts(layer)

        def forward(hidden_states, router_indices, routing_weights):
            return self.experts_of(experts).block_output(hidden_states, moe.Routing(router_indices, routing_weights))

        experts.forward = forward  # the same sums as the eager loop, with skipped slots left out
