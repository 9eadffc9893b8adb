"""The interface every model-family adapter implements over transformers-5 fused MoE blocks.

In transformers 5 each MoE block holds a router (``weight``: (E, H)) and an experts module with fused
3-D parameters ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I); the experts module is called as
``experts(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))`` and applies the combine weight
after down_proj. Adapters name where those pieces live and how routing turns logits into combine weights.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    pass


# on_expert(e, token_idx (n,), x (n, H), g (n,), h (n, I)) is called once per expert hit in a forward.
ExpertObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


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

    # -- routing semantics ---------------------------------------------------------------------
    def route(self, router_weight: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top_k_index (T, k), top_k_weights (T, k)): the combine weights the block multiplies onto outputs."""
        return self.route_logits(nn.functional.linear(x, router_weight))

    def route_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing from router logits (T, E). A logit of -inf removes that expert from the choice, exactly as
        deleting its router row does (expert pruning)."""
        raise NotImplementedError

    # -- expert pruning ----------------------------------------------------------------------------
    expert_count_keys: tuple[str, ...] = ()  # config keys holding the number of routed experts

    def drop_experts(self, layer: nn.Module, kept: list[int]) -> None:
        """Keep only experts ``kept`` (original indices, ascending) in one MoE layer: expert weights and
        router rows are index-selected in place and the modules' expert counts updated."""
        raise NotImplementedError

    # -- per-expert views (nn.Linear orientation: (out, in)) -------------------------------------
    @staticmethod
    def gate_up(experts: nn.Module, e: int) -> torch.Tensor:  # (2I, H): rows [0, I) gate, [I, 2I) up
        return experts.gate_up_proj[e]

    @staticmethod
    def down(experts: nn.Module, e: int) -> torch.Tensor:  # (H, I)
        return experts.down_proj[e]

    def intermediate(self, experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU intermediate act(x W_gate^T) * (x W_up^T), i.e. the input of down_proj: (n, I)."""
        gate, up = nn.functional.linear(x, self.gate_up(experts, e)).chunk(2, dim=-1)
        return experts.act_fn(gate) * up

    def expert_output(self, experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
        """Un-gated output of expert e: (n, H)."""
        return nn.functional.linear(self.intermediate(experts, e, x), self.down(experts, e))

    # -- observation ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def observe_experts(self, experts: nn.Module, on_call=None, on_expert: ExpertObserver | None = None):
        """Observe the experts module's real inputs during forwards.

        ``on_call(hidden_states, top_k_index, top_k_weights)`` sees each call's arguments exactly as the
        block passes them. With ``on_expert`` the forward runs a per-expert loop equal to the eager path
        that also hands every expert's routed tokens, combine weights and SwiGLU intermediate to the
        observer, so statistics of down_proj's input cost no second expert pass.
        """
        original = experts.forward

        def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            if on_call is not None:
                on_call(hidden_states, top_k_index, top_k_weights)
            if on_expert is None:
                return original(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
            return self._observed_forward(experts, hidden_states, top_k_index, top_k_weights, on_expert)

        experts.forward = forward
        try:
            yield
        finally:
            del experts.forward  # back to the class's forward

    def _observed_forward(self, experts, hidden_states, top_k_index, top_k_weights, on_expert):
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token_idx, slot = torch.where(top_k_index == e)  # token-major order
            if token_idx.numel() == 0:
                on_expert(e, token_idx, hidden_states[:0], top_k_weights[:0, 0], None)
                continue
            x = hidden_states[token_idx]
            g = top_k_weights[token_idx, slot]
            h = self.intermediate(experts, e, x)
            on_expert(e, token_idx, x, g, h)
            y = nn.functional.linear(h, self.down(experts, e)) * g[:, None].to(h.dtype)
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    # -- streaming layer-by-layer execution -------------------------------------------------------
    def layer_context(self, model, seqlen: int, device) -> dict:
        """Keyword arguments a decoder layer needs for a batch of ``seqlen``-long unpadded sequences."""
        raise NotImplementedError

    def embed(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- checkpoint keys, so per-layer jobs read only the tensors they need ------------------------
    def expert_weight_keys(self, layer: int) -> dict[str, list[str]]:
        """Checkpoint keys holding one layer's experts, for each on-disk layout."""
        raise NotImplementedError

    def router_weight_keys(self, layer: int) -> list[str]:
        """Candidate checkpoint keys of one layer's router weight (E, H), one per on-disk layout."""
        raise NotImplementedError

    def activation(self):
        """The experts' gate activation (config.hidden_act)."""
        from transformers.activations import ACT2FN

        return ACT2FN[self.config.hidden_act]
