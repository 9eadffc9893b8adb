"""The contract every model-family adapter implements: where a family keeps its MoE pieces and how it routes.

In transformers 5 each MoE block holds a router and an experts module with fused 3-D parameters; the experts
module is called as ``experts(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))`` and applies the
combine weight after down_proj. An adapter says which decoder layers are MoE layers, where the block's pieces
live, hands a layer's router to the MoE primitives as a ``moe.Router`` (weight, biases, the family's ``TopK``
rule) and its experts as ``moe.Experts`` in the canonical layout, converts between that layout and the
parameters' own, names the checkpoint keys per-layer jobs read, and removes experts. Nothing outside
``pruning.models`` names a family or a fused parameter.

The defaults below describe the common transformers-5 shape (``layer.mlp.gate`` / ``layer.mlp.experts`` with
``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I) and ``act_fn``); a family module overrides what differs.
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
    block_name = "mlp"          # the decoder layer's MoE block attribute
    router_name = "gate"        # the block's router attribute
    experts_name = "experts"    # the block's routed-experts attribute
    shared_name: str | None = None       # the block's shared expert(s), an MLP that sees every token
    shared_gate_name: str | None = None  # a Linear H -> 1 whose sigmoid scales the shared expert (Qwen2-MoE)
    expert_count_keys: tuple[str, ...] = ("num_experts",)  # config keys holding the routed expert count
    logits_dtype: torch.dtype | None = None  # the dtype the router computes logits in (None: its weight's)
    attn_implementation = "sdpa"             # the attention kernel the family's models load with
    hub_block_name = "mlp"                             # the block's name in the hub's per-expert checkpoints
    hub_expert_names = ("gate_proj", "up_proj", "down_proj")  # per-expert gate, up and down Linear names
    param_names = {"gate_up": "gate_up_proj", "down": "down_proj"}  # canonical matrix -> the experts' parameter

    def __init__(self, config):
        self.config = config

    # -- structure ---------------------------------------------------------------------------
    def decoder_layers(self, model) -> nn.ModuleList:
        return model.model.layers

    def moe_block(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.block_name)

    def router_module(self, layer: nn.Module) -> nn.Module:
        return getattr(self.moe_block(layer), self.router_name)

    def experts(self, layer: nn.Module) -> nn.Module:
        """The experts module (its forward is what observation wraps; its parameters what pruning writes)."""
        return getattr(self.moe_block(layer), self.experts_name)

    def _config(self, key, default=None):
        c = self.config
        return c.get(key, default) if isinstance(c, dict) else getattr(c, key, default)

    @property
    def num_experts(self) -> int:
        for key in self.expert_count_keys:
            if self._config(key) is not None:
                return int(self._config(key))
        raise UnsupportedModelError(f"config has none of {self.expert_count_keys}")

    @property
    def top_k(self) -> int:
        return int(self._config("num_experts_per_tok"))

    @property
    def num_layers(self) -> int:
        return int(self._config("num_hidden_layers"))

    def is_moe_layer(self, idx: int) -> bool:
        return True

    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    def problems(self) -> list[str]:
        """What in the config this project cannot handle, one line each (checked when the workflow loads)."""
        q = self._config("quantization_config")
        if q:
            method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", q)
            return [f"model.name_or_path: the checkpoint is quantised ({method}); pruning needs unquantised weights "
                    f"(save a dequantised bf16/fp32 copy first)"]
        return []

    # -- routing ---------------------------------------------------------------------------------
    def rule(self) -> moe.TopK:
        """The family's routing rule, from the config."""
        raise NotImplementedError

    def router(self, layer: nn.Module) -> moe.Router:
        """One MoE layer's router as ``moe.Router`` (views of its parameters)."""
        r = self.router_module(layer)
        return moe.Router(r.weight, self.rule(), getattr(r, "bias", None),
                          getattr(r, "e_score_correction_bias", None), self.logits_dtype)

    def groups(self) -> list[list[int]] | None:
        """The expert groups of a group-limited router, which expert pruning must keep equal; None if none."""
        rule = self.rule()
        if rule.n_group <= 1:
            return None
        e = self.num_experts
        return [list(range(g * e // rule.n_group, (g + 1) * e // rule.n_group)) for g in range(rule.n_group)]

    def check_keep(self, keep: int) -> str | None:
        """Why a layer cannot keep ``keep`` experts (None if it can)."""
        rule, e = self.rule(), self.num_experts
        if not rule.top_k <= keep < e:
            return f"experts kept per layer must be in [top_k, num_experts) = [{rule.top_k}, {e})"
        if rule.n_group > 1:
            per = keep // rule.n_group
            if keep % rule.n_group:
                return (f"the router is group-limited (n_group={rule.n_group}); keep must be a multiple of "
                        f"n_group so that every group keeps the same number of experts")
            if rule.group_score == "top2_sum" and per < 2:
                return f"the router scores each group by its top 2 experts; keep must be >= 2 x n_group = {2 * rule.n_group}"
            if per * rule.topk_group < rule.top_k:
                return (f"top_k={rule.top_k} experts must fit in topk_group={rule.topk_group} groups of "
                        f"keep / n_group = {per}; keep must be >= {-(-rule.top_k // rule.topk_group) * rule.n_group}")
        return None

    # -- experts in the canonical layout -----------------------------------------------------------
    def activation(self):
        """The experts' gate activation (config.hidden_act)."""
        from transformers.activations import ACT2FN

        return ACT2FN[self._config("hidden_act")]

    def experts_of(self, module: nn.Module) -> moe.Experts:
        """An experts module's weights as ``moe.Experts`` (views of its parameters, gradients flow)."""
        return moe.Experts(module.gate_up_proj, module.down_proj, module.act_fn)

    def expert_weights(self, layer: nn.Module) -> moe.Experts:
        return self.experts_of(self.experts(layer))

    def expert_params(self, layer: nn.Module) -> dict[str, nn.Parameter]:
        """The layer's expert weight parameters by the canonical matrix names mask and weight files use ('gate_up',
        'down'), in the parameters' own layout: what pruning writes and distillation trains."""
        experts = self.experts(layer)
        return {name: getattr(experts, param) for name, param in self.param_names.items()}

    def canonical(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """An expert tensor in its parameter's layout (``expert_params[name]``) in the canonical layout
        ('gate_up' (E, 2I, H), 'down' (E, H, I))."""
        return tensor

    def native(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A canonical-layout expert tensor (a mask, updated weights) in the parameter's own layout."""
        return tensor

    def paired_params(self, layer: nn.Module, tensors: dict[str, torch.Tensor], what: str = "mask"):
        """(name, parameter, tensor in the parameter's layout) for canonical per-layer tensors {'gate_up', 'down'}
        (a mask file's, updated weights), shapes checked against the model's."""
        for name, param in self.expert_params(layer).items():
            t = self.native(name, tensors[name])
            if t.shape != param.shape:
                raise ValueError(f"{what} {name} has shape {tuple(tensors[name].shape)}, the model's is "
                                 f"{tuple(self.canonical(name, param).shape)}")
            yield name, param, t

    # -- shared experts: an MLP every token goes through, pruned only on request ----------------------
    shared_param_names = ("gate_proj", "up_proj", "down_proj")  # the shared MLP's Linear layers

    @property
    def has_shared_experts(self) -> bool:
        return self.shared_name is not None

    def shared_experts(self, layer: nn.Module) -> nn.Module | None:
        """The block's shared expert MLP (None if the family has none)."""
        return getattr(self.moe_block(layer), self.shared_name) if self.shared_name else None

    def _shared(self, gate, up, down) -> moe.Experts:
        return moe.Experts(torch.cat([gate, up], 0)[None], down[None], self.activation())

    def shared_expert_weights(self, layer: nn.Module) -> moe.Experts:
        """The shared MLP as a one-expert ``moe.Experts`` (its gate and up stacked), views of its weights."""
        m = self.shared_experts(layer)
        return self._shared(*(getattr(m, n).weight for n in self.shared_param_names))

    def shared_combine(self, gate_weight: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """The weight the block applies to the shared expert's output on x (T, H): 1, or the sigmoid of its gate."""
        if gate_weight is None:
            return torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        return torch.sigmoid(nn.functional.linear(x, gate_weight.to(x.dtype)))[:, 0]

    def shared_gate_weight(self, layer: nn.Module) -> torch.Tensor | None:
        return getattr(self.moe_block(layer), self.shared_gate_name).weight if self.shared_gate_name else None

    def shared_paired_params(self, layer: nn.Module, tensors: dict[str, torch.Tensor], what: str = "mask"):
        """(parameter, tensor in its layout) for canonical one-expert tensors {'gate_up' (1, 2I, H), 'down'}."""
        m = self.shared_experts(layer)
        gate, up, down = (getattr(m, n).weight for n in self.shared_param_names)
        inter = gate.shape[0]
        parts = ((gate, tensors["gate_up"][0][:inter]), (up, tensors["gate_up"][0][inter:]), (down, tensors["down"][0]))
        for param, t in parts:
            if t.shape != param.shape:
                raise ValueError(f"{what}: shared expert tensor {tuple(t.shape)}, the model's is {tuple(param.shape)}")
            yield param, t

    def shared_weight_keys(self, layer: int) -> dict[str, str]:
        """Checkpoint keys of one layer's shared MLP ('gate', 'up', 'down') and its gate ('combine', if any)."""
        p = f"model.layers.{layer}.{self.block_name}"
        keys = dict(zip(("gate", "up", "down"), (f"{p}.{self.shared_name}.{n}.weight" for n in self.shared_param_names)))
        if self.shared_gate_name:
            keys["combine"] = f"{p}.{self.shared_gate_name}.weight"
        return keys

    def shared_from_tensors(self, tensors: dict[str, torch.Tensor], layer: int) -> tuple[moe.Experts, torch.Tensor | None]:
        keys = self.shared_weight_keys(layer)
        return self._shared(*(tensors[keys[k]] for k in ("gate", "up", "down"))), tensors.get(keys.get("combine"))

    # -- expert pruning ----------------------------------------------------------------------------
    @torch.no_grad()
    def drop_experts(self, layer: nn.Module, kept: list[int]) -> None:
        """Keep only experts ``kept`` (original indices, ascending) in one MoE layer: every per-expert parameter
        and buffer of the experts module and the router (weights, expert and router biases, selection bias) is
        index-selected in place, and the modules' expert counts updated."""
        n = self.num_experts
        for module in (self.experts(layer), self.router_module(layer)):
            idx = None
            for name, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if p.dim() == 0 or p.shape[0] != n:
                    continue
                idx = torch.tensor(kept, dtype=torch.long, device=p.device) if idx is None else idx
                data = p.data.index_select(0, idx).clone()
                if isinstance(p, nn.Parameter):
                    setattr(module, name, nn.Parameter(data, requires_grad=p.requires_grad))
                else:
                    module._buffers[name] = data
            if hasattr(module, "num_experts"):
                module.num_experts = len(kept)

    # -- observing the experts and skipping ----------------------------------------------------------
    router_outputs = ("logits", "weights", "index")  # what the router module's forward returns, in order

    def prepare_skipping(self, layer: nn.Module) -> None:
        """Make one layer's experts module accept the sentinel index E (a skipped slot computes nothing)."""
        # transformers' batched / grouped_mm forwards mask sentinel slots only under this flag; without it
        # grouped_mm leaves the sentinel rows uninitialised and 0 * NaN reaches the output
        self.experts(layer)._is_expert_parallel = True

    @contextlib.contextmanager
    def observe_experts(self, layer: nn.Module, on_call: Callable | None = None,
                        on_expert: moe.ExpertObserver | None = None):
        """Observe the real inputs of one decoder layer's experts module during forwards.

        ``on_call(hidden_states (T, H), routing)`` sees each call's arguments exactly as the block passes them.
        With ``on_expert`` the call runs the experts as ``moe.Experts.block_output``, the eager experts loop,
        handing every expert's routed tokens, combine weights and gated intermediate to the observer.
        """
        experts = self.experts(layer)
        previous = experts.__dict__.get("forward")  # an instance-level forward already installed, if any
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
            if previous is None:
                del experts.forward  # back to the class's forward
            else:
                experts.forward = previous

    # -- streaming layer-by-layer execution -------------------------------------------------------
    def embed(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        return model.get_input_embeddings()(input_ids)

    def head(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last decoder layer's output: the final norm, then the LM head."""
        return model.get_output_embeddings()(model.model.norm(hidden))

    @torch.no_grad()
    def layer_context(self, model, seqlen: int, device) -> list[dict]:
        """Keyword arguments each decoder layer gets for a batch of ``seqlen``-long unpadded sequences, one dict
        per layer: captured from the model's own forward (masks per attention type, rotary embeddings), with
        every decoder layer replaced by the identity for that one call."""
        layers = self.decoder_layers(model)
        captured: list[dict] = [None] * len(layers)

        def identity(i):
            def forward(hidden_states, *args, **kwargs):
                captured[i] = dict(kwargs)
                return hidden_states
            return forward

        for i, layer in enumerate(layers):
            layer.forward = identity(i)
        try:
            ids = torch.zeros(1, seqlen, dtype=torch.long, device=device)
            model.model(input_ids=ids, use_cache=False)
        finally:
            for layer in layers:
                del layer.forward
        for ctx in captured:
            for key in ("cache", "past_key_values", "use_cache", "cache_position"):
                ctx.pop(key, None)
        return captured

    # -- checkpoint keys, so per-layer jobs read only the tensors they need ------------------------
    def expert_weight_keys(self, layer: int) -> dict[str, list[str]]:
        """Checkpoint keys holding one layer's experts, for each on-disk layout ('fused', 'per_expert')."""
        p = f"model.layers.{layer}"
        fused = [f"{p}.{self.block_name}.{self.experts_name}.{n}" for n in self.param_names.values()]
        per_expert = [f"{p}.{self.hub_block_name}.experts.{e}.{w}.weight"
                      for e in range(self.num_experts) for w in self.hub_expert_names]
        return {"fused": fused, "per_expert": per_expert}

    def experts_from_tensors(self, tensors: dict[str, torch.Tensor], layer: int, layout: str) -> moe.Experts:
        """One layer's experts as ``moe.Experts`` (canonical layout) from its ``expert_weight_keys`` tensors."""
        keys = self.expert_weight_keys(layer)[layout]
        if layout == "fused":
            gate_up, down = (self.canonical(n, tensors[k]) for n, k in zip(self.param_names, keys))
        else:  # filled expert by expert, so a lazy mapping (``checkpoint.ShardReader``) holds one expert at a time
            gate_up = down = None
            for e, (g, u, d) in enumerate(keys[i : i + 3] for i in range(0, len(keys), 3)):
                tg, tu, td = tensors[g], tensors[u], tensors[d]
                if gate_up is None:
                    n = len(keys) // 3
                    gate_up = tg.new_empty(n, tg.shape[0] + tu.shape[0], tg.shape[1])
                    down = td.new_empty(n, *td.shape)
                gate_up[e, : tg.shape[0]], gate_up[e, tg.shape[0] :], down[e] = tg, tu, td
        return moe.Experts(gate_up, down, self.activation())

    def router_keys(self, layer: int) -> dict[str, list[str]]:
        """Candidate checkpoint keys of one layer's router tensors ('weight' required, 'bias', 'selection_bias'
        optional), one per on-disk layout."""
        names = {self.block_name, self.hub_block_name}
        base = [f"model.layers.{layer}.{b}.{self.router_name}" for b in sorted(names)]
        return {"weight": [f"{b}.weight" for b in base], "bias": [f"{b}.bias" for b in base],
                "selection_bias": [f"{b}.e_score_correction_bias" for b in base]}

    def router_from_tensors(self, tensors: dict[str, torch.Tensor]) -> moe.Router:
        """A router from the tensors found under ``router_keys`` ({'weight', optional 'bias', 'selection_bias'})."""
        return moe.Router(tensors["weight"], self.rule(), tensors.get("bias"), tensors.get("selection_bias"),
                          self.logits_dtype)

    def parameter_roles(self, model) -> dict[str, str]:
        """Each parameter's role by name: 'routed' (routed experts' weights and biases), 'router', 'shared'
        (shared experts and their gate) or 'dense' (everything else), for reports."""
        role: dict[int, str] = {}
        layers = self.decoder_layers(model)
        for i in self.moe_layer_indices():
            block = self.moe_block(layers[i])
            for name, r in ((self.experts_name, "routed"), (self.router_name, "router"),
                            (self.shared_name, "shared"), (self.shared_gate_name, "shared")):
                if name:
                    for p in getattr(block, name).parameters():
                        role[id(p)] = r
        return {n: role.get(id(p), "dense") for n, p in model.named_parameters()}

    # -- rewriting checkpoints tensor by tensor --------------------------------------------------------
    # ``pruning.models.rewrite`` streams a checkpoint's shards one tensor at a time; these say, per checkpoint
    # key, what it holds, so that masks, updated weights and expert removal reach the right slices.

    def checkpoint_layout(self, layer: int, keys) -> str | None:
        """The on-disk layout ('fused', 'per_expert') in which checkpoint ``keys`` hold one MoE layer's experts
        (None: in neither)."""
        for layout, wanted in self.expert_weight_keys(layer).items():
            if all(k in keys for k in wanted):
                return layout
        return None

    def weight_key_parts(self, layer: int, layout: str) -> dict:
        """Which part of which canonical per-layer tensor each checkpoint key of one MoE layer's prunable weights
        holds, as ``rewrite.Part(name, expert, half)``: the routed experts' ('gate_up' (E, 2I, H), 'down'
        (E, H, I)) in ``layout`` (a fused key holds every expert in its parameter's layout, ``native``; a
        per-expert key one expert's gate rows (half 0), up rows (half 1) or down matrix) and the shared MLP's
        ('shared.gate_up' (1, 2I, H), 'shared.down' (1, H, I)), whose keys are the same in both layouts."""
        from .rewrite import Part

        p = f"model.layers.{layer}"
        if layout == "fused":
            parts = {f"{p}.{self.block_name}.{self.experts_name}.{param}": Part(name, None, None)
                     for name, param in self.param_names.items()}
        elif layout == "per_expert":
            gate, up, down = self.hub_expert_names
            parts = {}
            for e in range(self.num_experts):
                q = f"{p}.{self.hub_block_name}.experts.{e}"
                parts.update({f"{q}.{gate}.weight": Part("gate_up", e, 0), f"{q}.{up}.weight": Part("gate_up", e, 1),
                              f"{q}.{down}.weight": Part("down", e, None)})
        else:
            raise ValueError(f"unknown checkpoint layout {layout!r}")
        if self.has_shared_experts:
            keys = self.shared_weight_keys(layer)
            parts.update({keys["gate"]: Part("shared.gate_up", 0, 0), keys["up"]: Part("shared.gate_up", 0, 1),
                          keys["down"]: Part("shared.down", 0, None)})
        return parts

    def part_tensor(self, part, tensor: torch.Tensor) -> torch.Tensor:
        """A checkpoint key's tensor cut from the full canonical tensor of its ``weight_key_parts`` part (a mask,
        updated weights): a fused key's is the whole tensor in the parameter's layout (``native``, which works
        expert by expert along dim 0, so a slice of experts gives those experts' slice), a per-expert key's
        one expert's rows."""
        if part.expert is None:
            return self.native(part.name, tensor)
        t = tensor[part.expert]
        if part.half is not None:
            rows = t.shape[0] // 2
            t = t[part.half * rows:(part.half + 1) * rows]
        return t

    def part_canonical(self, part, tensor: torch.Tensor) -> torch.Tensor:
        """A checkpoint key's tensor (``weight_key_parts``) in the canonical layout, (experts, rows, cols): a fused
        key's every expert (``canonical``), a per-expert key's one expert's rows as a one-expert tensor."""
        return self.canonical(part.name, tensor) if part.expert is None else tensor[None]

    def checkpoint_key_names(self, layer: int, layout: str) -> dict[str, str]:
        """The model's state-dict name of each checkpoint key of one MoE layer that is stored under another name:
        the per-expert layout's expert keys (the fused parameter they load into) and the router's keys under the
        hub's block name."""
        p = f"model.layers.{layer}"
        names = {}
        if layout == "per_expert":
            fused = {name: f"{p}.{self.block_name}.{self.experts_name}.{param}" for name, param in self.param_names.items()}
            names.update({key: fused[part.name] for key, part in self.weight_key_parts(layer, layout).items()
                          if part.name in fused})
        if self.hub_block_name != self.block_name:
            for keys in self.router_keys(layer).values():
                names.update({k: k.replace(f"{p}.{self.hub_block_name}.", f"{p}.{self.block_name}.", 1) for k in keys
                              if k.startswith(f"{p}.{self.hub_block_name}.")})
        return names

    def expert_removal_keys(self, layer: int, layout: str, keys, kept: list[int]) -> dict[str, tuple[str | None, bool]]:
        """How keeping only experts ``kept`` (original indices) changes one MoE layer's checkpoint ``keys`` (key ->
        shape): {key: (its new key, None if it goes; whether its first dim is index-selected)} for the keys that
        change. As ``drop_experts``: in the fused layout every tensor directly in the experts module or the
        router whose first dim is the expert count (weights, expert and router biases, selection bias) keeps
        the rows ``kept``; in the per-expert layout the removed experts' keys go and the kept ones are renumbered
        in ascending order (``experts.{old}`` -> ``experts.{new}``); the router's rows as in the fused layout."""
        import re

        n, p = self.num_experts, f"model.layers.{layer}"
        new_index = {old: new for new, old in enumerate(sorted(kept))}
        numbered = re.compile(rf"{re.escape(p)}\.{re.escape(self.hub_block_name)}\.experts\.(\d+)\.(.+)")
        modules = [f"{p}.{self.block_name}.{self.experts_name}."]
        modules += [f"{p}.{b}.{self.router_name}." for b in sorted({self.block_name, self.hub_block_name})]
        out = {}
        for key, shape in keys.items():
            m = numbered.fullmatch(key) if layout == "per_expert" else None
            if m:
                e = int(m[1])
                new = f"{p}.{self.hub_block_name}.experts.{new_index[e]}.{m[2]}" if e in new_index else None
                out[key] = (new, False)
            elif (len(shape) and shape[0] == n
                  and any(key.startswith(q) and "." not in key[len(q):] for q in modules)):
                out[key] = (key, True)
        return out
