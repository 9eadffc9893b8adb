"""Calibration statistics and MoE-Pruner/Wanda scores against a naive per-token loop on a real tiny Mixtral."""
import pytest
import torch
import torch.nn.functional as F

from pruning.models import get_adapter
from pruning.calib.stream import calibrate_layer, stream
from pruning.models.layer_source import ResidentSource
from pruning.moe import Experts, Router
from pruning.weights.pattern import Pattern
from pruning.weights.prune import layer_masks
from pruning.weights.scores import score


def _layer_inputs(model, tokens, layer_idx):
    """Hidden states entering decoder layer ``layer_idx`` and the MoE-block inputs, via stock hooks."""
    seen = {}
    layer = model.model.layers[layer_idx]
    h1 = layer.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("hidden", a[0] if a else kw["hidden_states"]), with_kwargs=True)
    h2 = layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.__setitem__("moe_in", out))
    with torch.no_grad():
        model(input_ids=tokens)
    h1.remove(), h2.remove()
    return seen["hidden"], seen["moe_in"].reshape(-1, model.config.hidden_size)


def _naive_stats(model, layer_idx, moe_in):
    """Per-token loop: route each token by hand and accumulate what each expert sees."""
    cfg = model.config
    E, k, I = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size
    mlp = model.model.layers[layer_idx].mlp
    Wr, GU = mlp.gate.weight.double(), mlp.experts.gate_up_proj.double()
    acc = {n: torch.zeros(E, d, dtype=torch.float64) for n, d in
           [("gu_x2", cfg.hidden_size), ("gu_gx2", cfg.hidden_size), ("dn_x2", I), ("dn_gx2", I)]}
    count = torch.zeros(E, dtype=torch.long)
    gsum = torch.zeros(E, dtype=torch.float64)
    ratios = []
    for x in moe_in.double():
        p = torch.softmax(Wr @ x, dim=0)
        order = sorted(range(E), key=lambda e: -p[e].item())[:k]
        denom = sum(p[e] for e in order)
        ratios.append((p[order[1]] / p[order[0]]).item())
        for e in order:
            g = p[e] / denom
            w1, w3 = GU[e, :I], GU[e, I:]
            h = F.silu(w1 @ x) * (w3 @ x)
            count[e] += 1
            gsum[e] += g
            acc["gu_x2"][e] += x**2
            acc["gu_gx2"][e] += (g * x) ** 2
            acc["dn_x2"][e] += h**2
            acc["dn_gx2"][e] += (g * h) ** 2
    return acc, count, gsum, torch.tensor(ratios, dtype=torch.float64)


def test_stats_equal_per_token_loop(tiny_mixtral):
    model, adapter = tiny_mixtral, get_adapter(tiny_mixtral.config)
    tokens = torch.randint(0, 64, (3, 16))
    for layer_idx in (0, 1):
        hidden, moe_in = _layer_inputs(model, tokens, layer_idx)
        ctx = adapter.layer_context(model, 16, "cpu")[layer_idx]
        out, inputs, st = calibrate_layer(adapter, model.model.layers[layer_idx], hidden, ctx, batch_size=2)
        acc, count, gsum, ratios = _naive_stats(model, layer_idx, moe_in)
        assert torch.allclose(inputs, moe_in, atol=1e-6)  # the cached MoE-block inputs are the real ones
        assert torch.equal(st["count"], count) and torch.equal(st["router.selection_count"], count)
        for ours, naive in [("gate_up.sum_x2", "gu_x2"), ("gate_up.sum_gx2", "gu_gx2"), ("down.sum_x2", "dn_x2"), ("down.sum_gx2", "dn_gx2")]:
            torch.testing.assert_close(st[ours].double(), acc[naive], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st["router.mean_weight"].double(), gsum / count.clamp(min=1), rtol=1e-5, atol=1e-6)
        q = torch.quantile(ratios, st["router.ratio_levels"].double())
        torch.testing.assert_close(st["router.ratio_quantiles"].double(), q, rtol=1e-5, atol=1e-6)
        # the observed forward is the layer's real forward
        with torch.no_grad():
            ref = model.model.layers[layer_idx](hidden, **ctx)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_moe_pruner_and_wanda_scores_match_naive(tiny_mixtral):
    model, adapter = tiny_mixtral, get_adapter(tiny_mixtral.config)
    tokens = torch.randint(0, 64, (2, 16))
    hidden, moe_in = _layer_inputs(model, tokens, 1)
    _, _, st = calibrate_layer(adapter, model.model.layers[1], hidden, adapter.layer_context(model, 16, "cpu")[1], 2)
    acc, count, _, _ = _naive_stats(model, 1, moe_in)
    ex = model.model.layers[1].mlp.experts
    experts = adapter.expert_weights(model.model.layers[1])
    for e in range(4):
        W = ex.gate_up_proj[e].detach()
        naive_mp = W.abs().double() * acc["gu_gx2"][e].sqrt()[None, :]  # |W| * sqrt(sum (g x)^2)
        naive_wanda = W.abs().double() * acc["gu_x2"][e].sqrt()[None, :]
        torch.testing.assert_close(score("moe_pruner", W, st["gate_up.sum_gx2"][e]).double(), naive_mp, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(score("wanda", W, st["gate_up.sum_x2"][e]).double(), naive_wanda, rtol=1e-5, atol=1e-7)
        Wd = ex.down_proj[e].detach()
        torch.testing.assert_close(
            score("moe_pruner", Wd, st["down.sum_gx2"][e]).double(),
            Wd.abs().double() * acc["dn_gx2"][e].sqrt()[None, :], rtol=1e-5, atol=1e-7)
    # MoE-Pruner differs from Wanda (g is not constant), so the masks differ somewhere
    mp, _ = layer_masks("moe_pruner", Pattern.parse(0.5), experts, st)
    wa, _ = layer_masks("wanda", Pattern.parse(0.5), experts, st)
    assert not torch.equal(mp["down"], wa["down"])


def test_zero_token_expert_falls_back_to_magnitude():
    gu, dn = torch.randn(3, 8, 4), torch.randn(3, 4, 4)
    st = {"count": torch.tensor([5, 0, 2]), "gate_up.sum_x2": torch.rand(3, 4), "down.sum_x2": torch.rand(3, 4),
          "gate_up.sum_gx2": torch.rand(3, 4), "down.sum_gx2": torch.rand(3, 4)}
    st["gate_up.sum_gx2"][1] = 0
    st["down.sum_gx2"][1] = 0
    experts = Experts(gu, dn, torch.nn.functional.silu)
    masks, info = layer_masks("moe_pruner", Pattern.parse(0.5), experts, st)
    mag, _ = layer_masks("magnitude", Pattern.parse(0.5), experts, None)
    assert info["fallback_experts"] == [1]
    assert torch.equal(masks["gate_up"][1], mag["gate_up"][1])
    assert torch.equal(masks["down"][1], mag["down"][1])
    # an all-zero score would have pruned the first columns of every row instead
    assert not (~masks["gate_up"][1][:, :2]).all()


def test_stream_is_one_pass_equal_to_model_forward(tiny_mixtral):
    """Dense streaming yields the same MoE-block inputs as hooks on a whole-model forward."""
    model, adapter = tiny_mixtral, get_adapter(tiny_mixtral.config)
    tokens = torch.randint(0, 64, (4, 12))
    got = {i: inp for i, inp, _ in stream(ResidentSource(model, adapter), adapter, tokens, batch_size=3, progress=False)}
    for i in (0, 1):
        _, moe_in = _layer_inputs(model, tokens, i)
        torch.testing.assert_close(got[i], moe_in, rtol=1e-5, atol=1e-6)


def test_router_semantics_renormalised_topk(tiny_mixtral):
    adapter = get_adapter(tiny_mixtral.config)
    gate = tiny_mixtral.model.layers[0].mlp.gate
    x = torch.randn(10, 32)
    routing = Router(gate.weight, adapter.rule()).route(x)
    idx, w = routing.index, routing.weights
    _, ref_w, ref_idx = gate(x)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(w.sum(-1), torch.ones(10))


def test_channel_outlier_ratio_hand_example():
    from pruning.calib.stats import channel_outlier_ratio

    sum_x2 = torch.tensor([[1.0, 4.0, 100.0], [0.0, 0.0, 0.0]])  # norms 1, 2, 10 -> max 10 / median 2
    assert channel_outlier_ratio(sum_x2) == 5.0


@pytest.mark.parametrize("H, I", [(64, 96), (40, 72)])  # one column sum per call; widths off the vector width
def test_layer_stats_bitwise_equal_to_the_per_statistic_form(H, I):
    """LayerStats fills its four column statistics through one scratch buffer and one column sum per expert call:
    every value must be bitwise what the per-statistic form computes (a temporary and a reduction per statistic),
    over calls of many sizes (a fresh buffer, a reused one, a grown one), an empty call, and bfloat16 inputs."""
    from pruning.calib.stats import LayerStats

    g = torch.Generator().manual_seed(5)
    E = 3
    st = LayerStats(E, H, I)
    ref = {k: torch.zeros(E, d) for k, d in (("gate_up.sum_x2", H), ("gate_up.sum_gx2", H), ("down.sum_x2", I),
                                             ("down.sum_gx2", I))}
    ref_w, ref_n = torch.zeros(E), [0] * E
    for e, n, dtype in [(0, 700, torch.float32), (1, 5, torch.float32), (2, 0, torch.float32), (0, 3000, torch.float32),
                        (2, 33, torch.bfloat16), (1, 1, torch.float32), (1, 129, torch.float32)]:
        x = (torch.randn(n, H, generator=g) * 3).to(dtype)
        h = torch.randn(n, I, generator=g).to(dtype)
        w = torch.rand(n, generator=g).to(dtype)
        st.add_expert(e, x, w, h if n else None)
        ref_n[e] += n
        if n:
            xf, hf, wf = x.float(), h.float(), w.float()[:, None]
            ref["gate_up.sum_x2"][e] += (xf * xf).sum(0)
            ref["gate_up.sum_gx2"][e] += ((wf * xf) ** 2).sum(0)
            ref["down.sum_x2"][e] += (hf * hf).sum(0)
            ref["down.sum_gx2"][e] += ((wf * hf) ** 2).sum(0)
            ref_w[e] += wf.sum()
    out = st.finalize()
    for k, v in ref.items():
        assert torch.equal(out[k], v), k
        assert out[k].is_contiguous()
    assert out["count"].tolist() == ref_n and out["count"].dtype == torch.int64
    assert torch.equal(out["router.mean_weight"], ref_w / torch.tensor(ref_n).clamp(min=1).float())
