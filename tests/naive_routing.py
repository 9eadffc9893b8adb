"""Naive per-token MoE references, written from each family's published routing formula.

Independent of everything under ``pruning/``: tokens are handled one at a time, in float64, with plain
Python scalar arithmetic for the routing and float64 matrix-vector products for the experts. They are
slow on purpose and only meant for the tiny models of ``tests/families.py``.

Public API::

    naive_route(family, config, router_weight, router_bias, selection_bias, x, dropped=())
        -> list[dict[int, float]]            # per token: {expert index: combine weight}
    router_params(family, mlp) -> (router_weight, router_bias, selection_bias)   # from an MoE block module
    naive_route_module(family, config, mlp, x, dropped=()) -> list[dict[int, float]]
    naive_moe_block_output(family, config, mlp, x) -> torch.Tensor (T, H) float64

``router_weight`` (E, H); ``router_bias`` (E,) or None (a logit bias: gpt_oss ``router.bias``);
``selection_bias`` (E,) or None (a choice-only bias: deepseek_v3 / glm4_moe ``e_score_correction_bias``);
``x`` (T, H) the MoE block's input (after ``post_attention_layernorm``). Expert indices are always the
original ones, 0..E-1.

``dropped``: experts removed from routing as if their router rows (and bias entries) had been deleted:
softmax / top-k / renormalisation run over the remaining experts only, and a dropped expert is never
chosen whatever its selection bias. For group-limited routers the groups stay the original contiguous
blocks of E / n_group experts; a dropped expert is simply unavailable inside its group:

* deepseek_v2 ``group_limited_greedy``: group score = max softmax prob over the group's available experts;
  a group with none available is never kept.
* deepseek_v3 / glm4_moe: group score = sum of the two largest choice scores (sigmoid + selection bias)
  over the group's available experts. A group with fewer than two available experts scores -inf (the sum
  of a top-2 is undefined; this is what masking dropped choice scores to -inf before the module's
  ``topk(2).sum()`` gives) and is never kept.

Kept groups are the ``topk_group`` best among the keepable ones (fewer if fewer are keepable), and the
top-k is taken among the available experts of the kept groups; when fewer than k candidates remain, the
token gets fewer experts (the real module would pad with masked ones). Ties are broken towards the lower
index (torch.topk does not promise an order, but random weights make exact ties improbable).

Formulas and the 5.24 modeling files (``transformers/models/<family>/modeling_<family>.py``) they follow:

* mixtral (``MixtralTopKRouter.forward``): p = softmax(logits) over all experts; top-k of p; w = p / sum
  over the k.
* qwen2_moe / qwen3_moe / olmoe (``*TopKRouter.forward``): p = softmax(logits); top-k of p; renormalise
  over the k only if ``norm_topk_prob``.
* deepseek_v2 (``DeepseekV2TopkRouter.forward``): p = softmax(logits); ``greedy``: top-k of p;
  ``group_limited_greedy``: keep the ``topk_group`` groups with the largest max p, top-k among their
  experts; w = p * routed_scaling_factor; never renormalised (``norm_topk_prob`` is not read by the module).
* deepseek_v3 / glm4_moe (``DeepseekV3TopkRouter`` / ``Glm4MoeTopkRouter``): s = sigmoid(logits);
  c = s + e_score_correction_bias; group score = sum of the top-2 c in the group; keep ``topk_group``
  groups; top-k of c among their experts; w = s (the unbiased score); if ``norm_topk_prob``
  w /= (sum w + 1e-20); w *= routed_scaling_factor.
* gpt_oss (``GptOssTopKRouter.forward``): logits = W x + b; top-k of the logits; w = softmax over the k.

Block outputs (``naive_moe_block_output``), from the ``*Experts`` / ``*SparseMoeBlock`` / ``*MoE`` /
``GptOssMLP`` forwards:

* routed expert e (all but gpt_oss): gate, up = chunk(gate_up_proj[e] @ x, 2); h = silu(gate) * up;
  y = down_proj[e] @ h.
* gpt_oss expert e (``GptOssExperts._apply_gate``): gu = x @ gate_up_proj[e] + gate_up_proj_bias[e]
  ((H, 2I) transposed layout); gate = gu[0::2], up = gu[1::2] (interleaved); gate = min(gate, limit);
  up = clamp(up, -limit, limit); glu = gate * sigmoid(alpha * gate); y = ((up + 1) * glu) @ down_proj[e]
  + down_proj_bias[e].
* out = sum over chosen e of w_e * y_e, plus the shared expert(s): qwen2_moe adds
  sigmoid(shared_expert_gate . x) * shared_expert(x); deepseek_v2 / deepseek_v3 / glm4_moe add
  shared_experts(x) (one MLP of width moe_intermediate_size * n_shared_experts); shared MLP =
  down(silu(gate_proj x) * up_proj x).
"""
from __future__ import annotations

import math

import torch

SOFTMAX_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
SIGMOID_FAMILIES = ("deepseek_v3", "glm4_moe")


def _f64_rows(t: torch.Tensor | None) -> list | None:
    return None if t is None else t.detach().to("cpu", torch.float64).tolist()


def _topk(scores: dict[int, float], k: int) -> list[int]:
    """The k keys with the largest scores (ties: lower index first)."""
    return sorted(scores, key=lambda e: (-scores[e], e))[:k]


def _softmax(logits: dict[int, float]) -> dict[int, float]:
    m = max(logits.values())
    ex = {e: math.exp(v - m) for e, v in logits.items()}
    z = sum(ex.values())
    return {e: v / z for e, v in ex.items()}


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def _groups(num_experts: int, n_group: int) -> list[list[int]]:
    """The original contiguous groups of E / n_group experts."""
    size = num_experts // n_group
    return [list(range(g * size, (g + 1) * size)) for g in range(n_group)]


def _keep_groups(group_scores: list[float], topk_group: int) -> list[int]:
    keepable = {g: s for g, s in enumerate(group_scores) if s != -math.inf}
    return _topk(keepable, topk_group)


def num_experts_of(family: str, config) -> int:
    """E from the family's own config key (the aliases differ per family in 5.24)."""
    if family in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        return config.n_routed_experts
    if family in ("mixtral", "gpt_oss"):
        return config.num_local_experts
    return config.num_experts  # qwen2_moe, qwen3_moe (alias of num_local_experts there), olmoe


def _route_one(family: str, config, logits: dict[int, float], sel_bias: list | None) -> dict[int, float]:
    """One token: available experts' logits {e: logit} -> {e: combine weight}."""
    k = config.num_experts_per_tok
    if family == "gpt_oss":
        top = _topk(logits, k)
        return _softmax({e: logits[e] for e in top})

    if family in SOFTMAX_FAMILIES:
        p = _softmax(logits)
        top = _topk(p, k)
        renorm = family == "mixtral" or bool(config.norm_topk_prob)
        z = sum(p[e] for e in top) if renorm else 1.0
        return {e: p[e] / z for e in top}

    if family == "deepseek_v2":
        p = _softmax(logits)
        if config.topk_method == "greedy":
            cand = p
        elif config.topk_method == "group_limited_greedy":
            groups = _groups(num_experts_of(family, config), config.n_group)
            gscore = [max((p[e] for e in g if e in p), default=-math.inf) for g in groups]
            kept = _keep_groups(gscore, config.topk_group)
            cand = {e: p[e] for g in kept for e in groups[g] if e in p}
        else:
            raise ValueError(f"deepseek_v2 topk_method {config.topk_method!r} is not implemented by the module")
        top = _topk(cand, k)
        return {e: p[e] * config.routed_scaling_factor for e in top}

    if family in SIGMOID_FAMILIES:
        s = {e: _sigmoid(v) for e, v in logits.items()}
        c = {e: s[e] + (sel_bias[e] if sel_bias is not None else 0.0) for e in s}
        groups = _groups(num_experts_of(family, config), config.n_group)
        gscore = []
        for g in groups:
            avail = sorted((c[e] for e in g if e in c), reverse=True)
            gscore.append(avail[0] + avail[1] if len(avail) >= 2 else -math.inf)
        kept = _keep_groups(gscore, config.topk_group)
        top = _topk({e: c[e] for g in kept for e in groups[g] if e in c}, k)
        w = {e: s[e] for e in top}
        if config.norm_topk_prob:
            z = sum(w.values()) + 1e-20
            w = {e: v / z for e, v in w.items()}
        return {e: v * config.routed_scaling_factor for e, v in w.items()}

    raise ValueError(f"unknown family {family!r}")


def naive_route(family: str, config, router_weight, router_bias, selection_bias, x, dropped=()) -> list[dict]:
    """Per token of ``x`` (T, H): {expert: combine weight} of the experts the family's block uses.

    float64 throughout; logits_e = sum_h W[e, h] x[h] (+ b[e]) computed only for available experts (the
    rows of ``dropped`` are treated as deleted). See the module docstring for each family's formula.
    """
    W, b, sb = _f64_rows(router_weight), _f64_rows(router_bias), _f64_rows(selection_bias)
    dropped = {int(e) for e in dropped}
    avail = [e for e in range(len(W)) if e not in dropped]
    out = []
    for row in _f64_rows(x.reshape(-1, x.shape[-1])):
        logits = {e: math.fsum(w * v for w, v in zip(W[e], row)) + (b[e] if b is not None else 0.0) for e in avail}
        out.append(_route_one(family, config, logits, sb) if logits else {})
    return out


def router_params(family: str, mlp):
    """(router_weight, router_bias, selection_bias) of an MoE block module, as found in 5.24:
    ``mlp.gate.weight`` (gpt_oss: ``mlp.router.weight`` and ``mlp.router.bias``), and
    ``mlp.gate.e_score_correction_bias`` (a persistent fp32 buffer) for deepseek_v3 / glm4_moe."""
    if family == "gpt_oss":
        return mlp.router.weight, mlp.router.bias, None
    return mlp.gate.weight, None, getattr(mlp.gate, "e_score_correction_bias", None)


def naive_route_module(family: str, config, mlp, x, dropped=()) -> list[dict]:
    """:func:`naive_route` with the router parameters read from the block module ``mlp``."""
    return naive_route(family, config, *router_params(family, mlp), x, dropped)


def _silu(v: torch.Tensor) -> torch.Tensor:
    return v / (1.0 + torch.exp(-v))


def _mlp(m, x: torch.Tensor) -> torch.Tensor:
    """A gated MLP module with gate_proj / up_proj / down_proj Linear layers (no biases in these families)."""
    f = lambda lin: lin.weight.detach().double()  # noqa: E731
    return f(m.down_proj) @ (_silu(f(m.gate_proj) @ x) * (f(m.up_proj) @ x))


@torch.no_grad()
def naive_moe_block_output(family: str, config, mlp, x: torch.Tensor) -> torch.Tensor:
    """The MoE block's output for ``x`` (T, H), token by token in float64, from the raw parameters of ``mlp``
    (routed experts in the fused in-memory layout, plus shared experts). See the module docstring."""
    routes = naive_route_module(family, config, mlp, x)
    ex = mlp.experts
    gu, down = ex.gate_up_proj.detach().double(), ex.down_proj.detach().double()
    rows = []
    for t, xt in enumerate(x.detach().reshape(-1, x.shape[-1]).double()):
        y = torch.zeros_like(xt)
        for e, w in routes[t].items():
            if family == "gpt_oss":
                h = xt @ gu[e] + ex.gate_up_proj_bias[e].detach().double()
                gate, up = h[0::2], h[1::2]
                limit, alpha = config.swiglu_limit, config.swiglu_alpha
                gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
                glu = gate * torch.sigmoid(alpha * gate)
                ye = ((up + 1) * glu) @ down[e] + ex.down_proj_bias[e].detach().double()
            else:
                h = gu[e] @ xt
                inter = h.shape[0] // 2
                ye = down[e] @ (_silu(h[:inter]) * h[inter:])
            y = y + w * ye
        if family == "qwen2_moe":
            gate = torch.sigmoid(mlp.shared_expert_gate.weight.detach().double() @ xt)
            y = y + gate * _mlp(mlp.shared_expert, xt)
        elif family in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
            y = y + _mlp(mlp.shared_experts, xt)
        rows.append(y)
    return torch.stack(rows)
