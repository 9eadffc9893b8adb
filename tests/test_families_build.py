"""Self-check of tests/families.py and tests/naive_routing.py against transformers' own modules."""
import copy
import json

import pytest
import torch
from safetensors import safe_open

from families import FAMILIES, LAYOUTS, VOCAB, make_model, moe_layers, router_of, save_checkpoint, tiny_tokenizer
from naive_routing import naive_moe_block_output, naive_route, naive_route_module, router_params

CASES = [(f, layout) for f in FAMILIES for layout in LAYOUTS[f]]


def _ids(seed=1):
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(seed))


def _x(n=96, h=32, seed=2, scale=1.0):
    return torch.randn(n, h, generator=torch.Generator().manual_seed(seed)) * scale


def _real_routes(router, x, keep=None, drop_zero=False):
    """The router module's (logits, weights, indices) as per-token {expert: weight}, indices mapped by ``keep``.
    ``drop_zero``: leave out exact-zero weights, the pads DeepseekV2TopkRouter takes from masked groups when the
    kept groups hold fewer than k experts (naive_route gives such a token fewer experts instead)."""
    _, w, idx = router(x)
    keep = keep if keep is not None else list(range(router.weight.shape[0]))
    return [{keep[int(i)]: float(v) for i, v in zip(ri, rw) if not (drop_zero and v == 0)} for ri, rw in zip(idx, w)]


def _assert_routes(naive, real, atol=1e-5):
    assert len(naive) == len(real)
    for t, (a, b) in enumerate(zip(naive, real)):
        assert set(a) == set(b), f"token {t}: naive chose {sorted(a)}, module chose {sorted(b)}"
        for e in a:
            assert abs(a[e] - b[e]) <= atol, f"token {t} expert {e}: naive {a[e]} module {b[e]}"


def _bias_keys(family, layer):
    p = f"model.layers.{layer}.mlp."
    return {"deepseek_v3": [p + "gate.e_score_correction_bias"], "glm4_moe": [p + "gate.e_score_correction_bias"],
            "gpt_oss": [p + "router.bias", p + "experts.gate_up_proj_bias", p + "experts.down_proj_bias"]}.get(family, [])


@pytest.mark.parametrize("family,layout", CASES)
def test_save_reload_same_logits(family, layout, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = make_model(family)
    d = save_checkpoint(family, tmp_path / layout, layout=layout, tokenizer=tiny_tokenizer())
    layer = moe_layers(model)[0]
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for k in _bias_keys(family, layer):  # the random biases are persisted (incl. the buffer)
            assert k in keys and f.get_tensor(k).abs().min() > 0, k
    fused = any(k.endswith(f"layers.{layer}.mlp.experts.gate_up_proj") for k in keys)
    per_expert = any(f"layers.{layer}." in k and ".experts.0." in k for k in keys)
    assert (fused, per_expert) == (layout == "fused", layout == "per_expert")

    from transformers import AutoConfig

    skip = {"_name_or_path", "architectures"}
    saved = {k: v for k, v in AutoConfig.from_pretrained(d).to_dict().items() if k not in skip}
    assert saved == {k: v for k, v in model.config.to_dict().items() if k not in skip}  # config.json round-trips
    cfg = json.loads((d / "config.json").read_text())
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert 0 <= cfg[k] < cfg["vocab_size"] == VOCAB
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) <= cfg["vocab_size"] and tok.eos_token_id == cfg["eos_token_id"]

    back = AutoModelForCausalLM.from_pretrained(d, experts_implementation="eager").eval()
    assert back.dtype == torch.float32
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, back(_ids()).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic(family):
    a, b, c = make_model(family, seed=0), make_model(family, seed=0), make_model(family, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("family", FAMILIES)
def test_naive_route_matches_router(family):
    model = make_model(family)
    x = _x()
    for i in moe_layers(model):
        mlp = model.model.layers[i].mlp
        with torch.no_grad():
            real = _real_routes(router_of(mlp), x)
        _assert_routes(naive_route_module(family, model.config, mlp, x), real)


# experts to drop, and the module's n_group once their rows are deleted (contiguous groups must survive)
DROPS = {
    "mixtral": [([1], None)], "qwen2_moe": [([2, 5], None)], "qwen3_moe": [([2, 5], None)],
    "olmoe": [([0, 7], None)], "gpt_oss": [([3, 7], None)],
    "deepseek_v2": [([0, 3, 5, 6], 4), ([2, 3], 3)],  # one per group (2 candidates < k=3) / a whole group
    "deepseek_v3": [([2, 3], 3), ([0, 1, 6, 7], 2)],
    "glm4_moe": [([1, 6], 2), ([0, 1, 2, 3], 1)],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_naive_route_dropped_equals_deleted_rows(family):
    """Dropping experts in naive_route == the real router with those rows (and bias entries) deleted."""
    model = make_model(family)
    mlp = model.model.layers[moe_layers(model)[-1]].mlp
    x = _x(seed=3)
    E = router_params(family, mlp)[0].shape[0]
    for dropped, n_group in DROPS[family]:
        keep = [e for e in range(E) if e not in dropped]
        router = copy.deepcopy(router_of(mlp))
        with torch.no_grad():
            router.weight = torch.nn.Parameter(router.weight[keep])
            if family == "gpt_oss":
                router.bias = torch.nn.Parameter(router.bias[keep])
            if hasattr(router, "e_score_correction_bias"):
                router.e_score_correction_bias = router.e_score_correction_bias[keep]
            router.num_experts = len(keep)
            if n_group is not None:
                router.num_group = n_group
            real = _real_routes(router, x, keep, drop_zero=family == "deepseek_v2")
        w, b, sb = router_params(family, mlp)
        if sb is not None:  # a dropped expert stays unselectable whatever its selection bias
            sb = sb.clone()
            sb[dropped] = 10.0
        naive = naive_route(family, model.config, w, b, sb, x, dropped)
        _assert_routes(naive, real)
        assert all(not set(r) & set(dropped) for r in naive)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "gpt_oss"])
def test_random_biases_change_routing(family):
    """The seeded biases are large enough to change some top-k choices (so bias bugs cannot hide)."""
    model = make_model(family)
    mlp = model.model.layers[moe_layers(model)[-1]].mlp
    x = _x(seed=4)
    w, b, sb = router_params(family, mlp)
    with_bias = naive_route(family, model.config, w, b, sb, x)
    without = naive_route(family, model.config, w, None, None, x)
    changed = sum(set(a) != set(c) for a, c in zip(with_bias, without))
    assert changed >= len(x) // 10, changed


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3", "glm4_moe"])
def test_group_limit_binds(family):
    """The tiny group-limited configs route differently from plain top-k on many tokens."""
    model = make_model(family)
    mlp = model.model.layers[moe_layers(model)[-1]].mlp
    flat = copy.deepcopy(model.config)
    flat.n_group, flat.topk_group = 1, 1
    x = _x(seed=6)
    grouped, plain = naive_route_module(family, model.config, mlp, x), naive_route_module(family, flat, mlp, x)
    assert sum(set(a) != set(b) for a, b in zip(grouped, plain)) >= len(x) // 10


@pytest.mark.parametrize("family", FAMILIES)
def test_naive_block_output(family):
    model = make_model(family)
    for i in moe_layers(model):
        mlp = model.model.layers[i].mlp
        # gpt_oss: also at a scale where the SwiGLU clamps (|gate/up| > swiglu_limit) are active
        for scale in (1.0, 8.0) if family == "gpt_oss" else (1.0,):
            x = _x(n=48, seed=5 + i, scale=scale)
            with torch.no_grad():
                real = mlp(x[None])
            real = (real[0] if isinstance(real, tuple) else real)[0].double()  # GptOssMLP returns (out, scores)
            ref = naive_moe_block_output(family, model.config, mlp, x)
            torch.testing.assert_close(real, ref, atol=2e-5 * scale, rtol=1e-4)
    if family == "gpt_oss":  # the clamp was actually exercised at scale 8
        ex = mlp.experts
        gu = torch.einsum("th,ehk->etk", _x(n=48, seed=5 + i, scale=8.0), ex.gate_up_proj.detach())
        assert (gu.abs() > model.config.swiglu_limit).any()
