"""The contract every model-family adapter implements: where a family keeps its MoE pieces and how it routes.

In transformers 5 each MoE block holds a router and an experts module with fused 3-D parameters; the experts
module is called as ``experts(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))`` and applies the
combine weight after down_proj. An adapter names where those pieces live (``decoder_layers``, ``router``,
``experts``), turns router logits into the routing (``route_logits``), and hands a layer's experts to the MoE
primitives (``pruning.moe``) in the canonical layout (``expert_weights``). Nothing outside ``pruning.models``
names a family.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from .. import moe


class UnsupportedModelError(ValueError):
    pass


class MoEAdapter:
    family: str = ""

    def __init__(self, config):
        self.config = config

    # -- structure ---------------------------------------------------------------------------
    def decoder_layers(self, model) -> nn.ModuleList:
        raise NotImplementedError

    def moe_block(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def router(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def experts(self, layer: nn.Module) -> nn.Module:
        """The experts module (its forward is what observation wraps; its parameters what pruning writes)."""
        raise NotImplementedError

    @property
    def num_experts(self) -> int:
        raise NotImplementedError

    @property
    def top_k(self) -> int:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def is_moe_layer(self, idx: int) -> bool:
        return True

    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    # -- routing and experts in the canonical layout ---------------------------------------------
    def route_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top_k_index (T, k), top_k_weights (T, k)) from router logits (T, E): the combine weights the block
        multiplies onto the expert outputs. A logit of -inf removes that expert from the choice, exactly as
        deleting its router row does (expert pruning)."""
        raise NotImplementedError

    def router_weight(self, layer: nn.Module) -> torch.Tensor:
        """The router's weight (E, H)."""
        return self.router(layer).weight

    def experts_of(self, module: nn.Module) -> moe.Experts:
        """An experts module's weights as ``moe.Experts`` (views of its parameters, gradients flow)."""
        raise NotImplementedError

    def expert_weights(self, layer: nn.Module) -> moe.Experts:
        return self.experts_of(self.experts(layer))

    def expert_params(self, layer: nn.Module) -> dict[str, nn.Parameter]:
        """The layer's expert parameters by the names mask and weight files use ('gate_up_proj' (E, 2I, H),
        'down_proj' (E, H, I)): what pruning writes and distillation trains."""
        raise NotImplementedError

    def activation(self):
        """The experts' gate activation (config.hidden_act), for weights read from the shards."""
        from transformers.activations import ACT2FN

        return ACT2FN[self.config.hidden_act]

    # -- expert pruning ----------------------------------------------------------------------------
    expert_count_keys: tuple[str, ...] = ()  # config keys holding the number of routed experts

    def drop_experts(self, layer: nn.Module, kept: list[int]) -> None:
        """Keep only experts ``kept`` (original indices, ascending) in one MoE layer: expert weights and
        router rows are index-selected in place and the modules' expert counts updated."""
        raise NotImplementedError

    # -- observation ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def observe_experts(self, layer: nn.Module, on_call: Callable | None = None,
                        on_expert: moe.ExpertObserver | None = None):
        """Observe the real inputs of one decoder layer's experts module during forwards.

        ``on_call(hidden_states (T, H), routing)`` sees each call's arguments exactly as the block passes them.
        With ``on_expert`` the call runs the experts as ``moe.Experts.block_output``, the eager experts loop,
        handing every expert's routed tokens, combine weights and SwiGLU intermediate to the observer.
        """
        experts = self.experts(layer)
        original = experts.forward

        def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            routing = moe.Routing(top_k_index, top_k_weights)
            if on_call is not None:
                on_call(hidden_states, routing)
            if on_expert is None:
                return original(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
            return self.experts_of(experts).block_output(hidden_states, routing, on_expert)

        experts.forward = forward
        try:
            yield
        finally:
            del experts.forward  # back to the class's forward

    # -- streaming layer-by-layer execution -------------------------------------------------------
    def layer_context(self, model, seqlen: int, device) -> dict:
        """Keyword arguments a decoder layer needs for a batch of ``seqlen``-long unpadded sequences."""
        raise NotImplementedError

    def embed(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- checkpoint keys, so per-layer jobs read only the tensors they need ------------------------
    def expert_weight_keys(self, layer: int) -> dict[str, list[str]]:
        """Checkpoint keys holding one layer's experts, for each on-disk layout ('fused', 'per_expert')."""
        raise NotImplementedError

    def stack_per_expert(self, tensors: dict, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's per-expert tensors (the 'per_expert' keys) -> fused (gate_up (E, 2I, H), down (E, H, I))."""
        raise NotImplementedError

    def router_weight_keys(self, layer: int) -> list[str]:
        """Candidate checkpoint keys of one layer's router weight (E, H), one per on-disk layout."""
        raise NotImplementedError
