"""Qwen2-MoE, Qwen3-MoE and OLMoE (transformers 5.24): ``model.layers[i].mlp`` = *SparseMoeBlock(gate: TopKRouter,
experts); Qwen2-MoE adds ``shared_expert`` (an MLP) scaled by sigmoid(``shared_expert_gate``(x)).

Routing: softmax over all E logits in fp32, top-k, renormalised only if ``norm_topk_prob`` (default False).
Qwen2/3-MoE layer i is an MoE layer unless i is in ``mlp_only_layers`` or (i + 1) % ``decoder_sparse_step`` != 0;
OLMoE's layers are all MoE layers. The hub's checkpoints hold per-expert gate_proj / up_proj / down_proj.
"""
from __future__ import annotations

from .. import moe
from .adapter import MoEAdapter


class SoftmaxTopKAdapter(MoEAdapter):
    """Softmax, top-k, optional renormalisation; every layer MoE (OLMoE)."""

    family = "olmoe"
    expert_count_keys = ("num_experts", "num_local_experts")

    def rule(self):
        return moe.TopK(self.top_k, "softmax", normalize=bool(self._config("norm_topk_prob", False)))


class Qwen3MoeAdapter(SoftmaxTopKAdapter):
    family = "qwen3_moe"
    expert_count_keys = ("num_local_experts", "num_experts")

    def is_moe_layer(self, idx):
        step = int(self._config("decoder_sparse_step", 1) or 1)
        return idx not in (self._config("mlp_only_layers") or []) and self.num_experts > 0 and (idx + 1) % step == 0


class Qwen2MoeAdapter(Qwen3MoeAdapter):
    family = "qwen2_moe"
    expert_count_keys = ("num_experts",)
    shared_name = "shared_expert"
    shared_gate_name = "shared_expert_gate"
