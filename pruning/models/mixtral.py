"""Mixtral (transformers 5.24): ``model.layers[i].mlp`` = MixtralSparseMoeBlock(gate: MixtralTopKRouter, experts).

Routing: softmax over all E logits in fp32, top-k, always renormalised over the k chosen experts. Every layer is
an MoE layer; no shared expert. The hub's checkpoints name the block ``block_sparse_moe`` with per-expert
w1 (gate), w3 (up), w2 (down).
"""
from __future__ import annotations

from .. import moe
from .adapter import MoEAdapter


class MixtralAdapter(MoEAdapter):
    family = "mixtral"
    expert_count_keys = ("num_local_experts",)
    hub_block_name = "block_sparse_moe"
    hub_expert_names = ("w1", "w3", "w2")

    def rule(self):
        return moe.TopK(self.top_k, "softmax", normalize=True)
