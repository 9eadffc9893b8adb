"""Dynamic expert skipping (NAEE, arXiv 2402.14800): for a top-2 router, a token whose second combine weight
is below beta_l times its first uses only its first expert, with weight 1.

The second expert is really not computed: its slot gets the sentinel index E (= number of experts), which
transformers 5's experts implementations leave out (the eager loop skips it, grouped_mm drops its rows).
beta_l is stored per MoE layer in the checkpoint's ``config.betas = {"<layer>": beta}`` (NAEE's key), so a
checkpoint keeps working as a plain Mixtral in stock transformers (betas are then ignored) and skips after

    import pruning.experts.skipping as skipping
    skipping.register()                                  # once per process
    model = AutoModelForCausalLM.from_pretrained(path)   # routers of every layer in config.betas now skip

on an already loaded model, ``enable_dynamic_skipping(model)``; the pipeline's evaluations use ``load_model``.
"""
from __future__ import annotations

import torch

BETAS_KEY = "betas"


def skip_second(index: torch.Tensor, weights: torch.Tensor, beta: float, num_experts: int):
    """Apply the skipping rule to top-2 routing (index, weights: (T, 2)), in either slot order.

    Returns (index, weights, skipped (T,) bool): skipped tokens keep their larger-weight expert with weight 1
    and get the sentinel ``num_experts`` with weight 0 in the other slot.
    """
    second = weights.argmin(dim=-1, keepdim=True)  # slot of the smaller weight
    skipped = weights.gather(1, second) < beta * weights.amax(dim=-1, keepdim=True)
    drop = skipped & (torch.arange(2, device=index.device) == second)
    weights = torch.where(skipped, (~drop).to(weights.dtype), weights)
    return index.masked_fill(drop, num_experts), weights, skipped[:, 0]


class _SkippingRouter:
    """Mixed in before a router class whose forward returns (logits, top_k_weights, top_k_index).

    Counts skipped tokens on the device (no host sync per call) and routed tokens as a Python int."""

    skip_beta: float = 0.0
    skip_skipped = None
    skip_tokens: int = 0

    def forward(self, hidden_states):
        logits, weights, index = super().forward(hidden_states)
        index, weights, skipped = skip_second(index, weights, self.skip_beta, self.num_experts)
        n = skipped.sum()
        self.skip_skipped = n if self.skip_skipped is None else self.skip_skipped + n
        self.skip_tokens += skipped.numel()
        return logits, weights, index


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
    if adapter.top_k != 2:
        raise ValueError(f"dynamic skipping needs a top-2 router; this model routes to top_k={adapter.top_k}")
    layers = adapter.decoder_layers(model)
    out = {}
    for key, beta in sorted(betas.items(), key=lambda kv: int(kv[0])):
        router = adapter.router(layers[int(key)])
        router.__class__ = _skipping_class(type(router))
        # transformers' experts forwards (batched, grouped_mm, fp8) mask sentinel slots only under this flag;
        # without it grouped_mm leaves the sentinel rows uninitialised and 0 * NaN reaches the output
        adapter.experts(layers[int(key)])._is_expert_parallel = True
        router.skip_beta = float(beta)
        router.skip_skipped, router.skip_tokens = None, 0
        out[int(key)] = float(beta)
    setattr(model.config, BETAS_KEY, {str(k): v for k, v in out.items()})
    return out


def skip_rates(model) -> dict[int, dict]:
    """Per skipping layer: tokens seen, tokens whose second expert was skipped, and the rate, since enabling."""
    from ..models import get_adapter

    adapter = get_adapter(model.config)
    out = {}
    for i in adapter.moe_layer_indices():
        router = adapter.router(adapter.decoder_layers(model)[i])
        if isinstance(router, _SkippingRouter) and router.skip_tokens:
            skipped, total = int(router.skip_skipped), router.skip_tokens
            out[i] = {"tokens": total, "skipped": skipped, "rate": skipped / total, "beta": router.skip_beta}
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
    """Have ``AutoModelForCausalLM.from_pretrained`` build Mixtral models that skip when config.betas is set."""
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    class SkippingMixtralForCausalLM(MixtralForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            if getattr(config, BETAS_KEY, None):
                enable_dynamic_skipping(self)

    AutoModelForCausalLM.register(MixtralConfig, SkippingMixtralForCausalLM, exist_ok=True)
