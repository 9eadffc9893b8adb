"""Mixtral (transformers 5): ``model.layers[i].mlp`` = MixtralSparseMoeBlock(gate: TopKRouter, experts).

Routing: softmax over all E logits in fp32, top-k, always renormalised over the k chosen experts.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import moe
from .adapter import MoEAdapter


class MixtralAdapter(MoEAdapter):
    family = "mixtral"

    def decoder_layers(self, model) -> nn.ModuleList:
        return model.model.layers

    def moe_block(self, layer):
        return layer.mlp

    def router(self, layer):
        return layer.mlp.gate

    def experts(self, layer):
        return layer.mlp.experts

    @property
    def num_experts(self) -> int:
        return self.config.num_local_experts

    @property
    def top_k(self) -> int:
        return self.config.num_experts_per_tok

    expert_count_keys = ("num_local_experts",)

    def experts_of(self, module):
        return moe.Experts(module.gate_up_proj, module.down_proj, module.act_fn)

    def expert_params(self, layer):
        experts = self.experts(layer)
        return {"gate_up_proj": experts.gate_up_proj, "down_proj": experts.down_proj}

    def route_logits(self, logits):
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # fp32, or fp64
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return index, weights

    def drop_experts(self, layer, kept):
        idx = torch.tensor(kept, dtype=torch.long, device=layer.mlp.gate.weight.device)
        gate, experts = layer.mlp.gate, layer.mlp.experts
        gate.weight = nn.Parameter(gate.weight.data.index_select(0, idx).clone(), requires_grad=gate.weight.requires_grad)
        for name in ("gate_up_proj", "down_proj"):
            p = getattr(experts, name)
            setattr(experts, name, nn.Parameter(p.data.index_select(0, idx).clone(), requires_grad=p.requires_grad))
        gate.num_experts = experts.num_experts = len(kept)

    def embed(self, model, input_ids):
        return model.model.embed_tokens(input_ids)

    def layer_context(self, model, seqlen, device):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        inner = model.model
        dummy = torch.zeros(1, seqlen, self.config.hidden_size, device=device, dtype=inner.embed_tokens.weight.dtype)
        position_ids = torch.arange(seqlen, device=device)[None]
        make_mask = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        mask = make_mask(
            config=self.config, inputs_embeds=dummy, attention_mask=None, past_key_values=None, position_ids=position_ids
        )
        return {
            "attention_mask": mask,
            "position_ids": position_ids,
            "position_embeddings": inner.rotary_emb(dummy, position_ids=position_ids),
        }

    def expert_weight_keys(self, layer):
        p = f"model.layers.{layer}"
        fused = [f"{p}.mlp.experts.gate_up_proj", f"{p}.mlp.experts.down_proj"]
        per_expert = [
            f"{p}.block_sparse_moe.experts.{e}.{w}.weight" for e in range(self.num_experts) for w in ("w1", "w3", "w2")
        ]
        return {"fused": fused, "per_expert": per_expert}

    def router_weight_keys(self, layer):
        return [f"model.layers.{layer}.mlp.gate.weight", f"model.layers.{layer}.block_sparse_moe.gate.weight"]

    def stack_per_expert(self, tensors, layer):
        """The hub's Mixtral layout (per-expert w1 = gate, w3 = up, w2 = down) -> fused."""
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        gate_up = torch.stack(
            [torch.cat([tensors[f"{p}.{e}.w1.weight"], tensors[f"{p}.{e}.w3.weight"]], 0) for e in range(self.num_experts)]
        )
        down = torch.stack([tensors[f"{p}.{e}.w2.weight"] for e in range(self.num_experts)])
        return gate_up, down
