"""Dynamic expert skipping (NAEE, arXiv 2402.14800), generalised from top-2 to top-k: for each token, the routed
experts whose combine weight is below beta_l times the token's largest one are dropped, and the remaining weights
are renormalised exactly as the family does (families that renormalise the top-k weights renormalise the kept
ones, then apply their scaling factor; the others keep their weights). With top-2 and a renormalising router this is NAEE's rule:
the second expert is dropped when w_2 < beta_l w_1, and the first gets weight 1.

A dropped expert is really not computed: its slot gets the sentinel index E (= number of experts), which the
experts implementations leave out (the adapter's ``prepare_skipping`` makes sure of it). beta_l is stored per MoE
layer in the checkpoint's ``config.betas = {"<layer>": beta}`` (NAEE's key), so a checkpoint keeps working as a
plain model of its family in stock transformers (betas are then ignored) and skips after

    import pruning.experts.skipping as skipping
    skipping.register()                                  # once per process
    model = AutoModelForCausalLM.from_pretrained(path)   # routers of every layer in config.betas now skip

on an already loaded model, ``enable_dynamic_skipping(model)``; the pipeline's evaluations use ``load_model``.
"""
from __future__ import annotations

import torch

from ..moe import TopK

BETAS_KEY = "betas"


def skip_experts(index: torch.Tensor, weights: torch.Tensor, beta: float, num_experts: int, rule: TopK):
    """Apply the skipping rule to top-k routing (index, weights: (T, k)), in any slot order.

    Returns (index, weights, dropped (T, k) bool): dropped slots get the sentinel ``num_experts`` and weight 0;
    the kept weights are renormalised (then scaled) if the family's ``rule`` renormalises, else left as they are.
    """
    drop = weights < beta * weights.amax(dim=-1, keepdim=True)
    kept = weights.masked_fill(drop, 0.0)
    if rule.renormalises:
        renormalised = kept / kept.sum(dim=-1, keepdim=True)
        if rule.scale != 1.0:
            renormalised = renormalised * rule.scale
        kept = torch.where(drop.any(dim=-1, keepdim=True), renormalised, weights)  # tokens with no drop: untouched
    return index.masked_fill(drop, num_experts), kept, drop


class _SkippingRouter:
    """Mixed in before a router class: its forward's routing goes through ``skip_experts``.

    Counts dropped slots on the device (no host sync per call) and routed tokens as a Python int."""

    skip_beta: float = 0.0
    skip_dropped = None
    skip_tokens: int = 0
    skip_order: tuple = ("logits", "weights", "index")
    skip_rule: TopK | None = None
    skip_num_experts: int = 0

    def forward(self, hidden_states):
        out = dict(zip(self.skip_order, super().forward(hidden_states)))
        out["index"], out["weights"], dropped = skip_experts(out["index"], out["weights"], self.skip_beta,
                                                             self.skip_num_experts, self.skip_rule)
        n = dropped.sum()
        self.skip_dropped = n if self.skip_dropped is None else self.skip_dropped + n
        self.skip_tokens += dropped.shape[0]
        return tuple(out[k] for k in self.skip_order)


_CLASSES: dict[type, type] = {}


def _skipping_class(cls: type) -> type:
    if issubclass(cls, _SkippingRouter):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Skipping{cls.__name__}", (_SkippingRouter, cls), {})
    return _CLASSES[cls]


def enable_dynamic_skipping(model, betas: dict | None = None) -> dict[int, float]:
    """Make every MoE layer named in ``betas`` (default: ``model.config.betas``) skip; returns {layer: beta}."""
    from ..models import get_adapter

    adapter = get_adapter(model.config)
    betas = getattr(model.config, BETAS_KEY, None) if betas is None else betas
    if not betas:
        raise ValueError("dynamic skipping: the model config has no 'betas' (run skip_calibrate first)")
    if adapter.top_k < 2:
        raise ValueError(f"dynamic skipping needs top_k >= 2; this model routes to top_k={adapter.top_k}")
    layers = adapter.decoder_layers(model)
    out = {}
    for key, beta in sorted(betas.items(), key=lambda kv: int(kv[0])):
        layer = layers[int(key)]
        router = adapter.router_module(layer)
        router.__class__ = _skipping_class(type(router))
        router.skip_order, router.skip_rule, router.skip_num_experts = adapter.router_outputs, adapter.rule(), adapter.num_experts
        adapter.prepare_skipping(layer)
        router.skip_beta = float(beta)
        router.skip_dropped, router.skip_tokens = None, 0
        out[int(key)] = float(beta)
    setattr(model.config, BETAS_KEY, {str(k): v for k, v in out.items()})
    return out


def skip_rates(model) -> dict[int, dict]:
    """Per skipping layer, since enabling: tokens seen, expert slots dropped, dropped slots per token, and the rate
    = dropped / (tokens x (top_k - 1)), the share of the droppable slots dropped (for top-2: the share of tokens
    whose second expert was skipped)."""
    from ..models import get_adapter

    adapter = get_adapter(model.config)
    out = {}
    for i in adapter.moe_layer_indices():
        router = adapter.router_module(adapter.decoder_layers(model)[i])
        if isinstance(router, _SkippingRouter) and router.skip_tokens:
            dropped, total = int(router.skip_dropped), router.skip_tokens
            out[i] = {"tokens": total, "skipped": dropped, "skipped_per_token": dropped / total,
                      "rate": dropped / (total * (adapter.top_k - 1)), "beta": router.skip_beta}
    return out


def beta_from_stats(stats: dict) -> float:
    """beta_l = median over calibration tokens of w_(2) / w_(1), the smaller over the larger top-2 weight, read
    from a layer's calibration statistics (``pruning.calib.stats.LayerStats``: quantiles of that ratio)."""
    levels = stats["router.ratio_levels"].tolist()
    if 0.5 not in levels:
        raise ValueError(f"calibration statistics hold ratio quantiles at {levels}, not the median")
    return float(stats["router.ratio_quantiles"][levels.index(0.5)])


def load_model(model_dir, dtype="float32", device="cpu", trust_remote_code: bool = False):
    """A saved model as the pipeline evaluates it: a checkpoint whose config holds ``betas`` skips."""
    from ..models.checkpoint import load_model as load

    model = load(model_dir, dtype, device, trust_remote_code)
    if getattr(model.config, BETAS_KEY, None):
        enable_dynamic_skipping(model)
    return model


def register() -> None:
    """Have ``AutoModelForCausalLM.from_pretrained`` build models of every supported family that skip when
    config.betas is set."""
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ..models import SUPPORTED_MODEL_TYPES

    def skipping_class(cls):
        class Skipping(cls):
            def __init__(self, config, *args, **kwargs):
                super().__init__(config, *args, **kwargs)
                if getattr(config, BETAS_KEY, None):
                    enable_dynamic_skipping(self)

        Skipping.__name__ = Skipping.__qualname__ = f"Skipping{cls.__name__}"
        return Skipping

    for model_type in SUPPORTED_MODEL_TYPES:
        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        AutoModelForCausalLM.register(CONFIG_MAPPING[model_type], skipping_class(cls), exist_ok=True)
