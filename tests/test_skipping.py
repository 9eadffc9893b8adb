"""Dynamic skipping against a naive per-token reference on a real tiny Mixtral, the beta = 0 identity, the
saved-checkpoint path through ``register()``, and the expert-call counter."""
import json

import pytest
import torch
from torch import nn

from pruning.models import get_adapter
from pruning.experts.skipping import BETAS_KEY, beta_from_stats, enable_dynamic_skipping, register, skip_experts, skip_rates
from pruning.eval.usage import count_expert_calls
from pruning.moe import TopK

from conftest import make_tiny_mixtral


def _naive_skipping_block(block, beta):
    """Per token: full-softmax top-2; if w2 < beta * w1 only the first expert runs, with weight 1."""
    gate, ex = block.gate, block.experts
    inter = ex.down_proj.shape[-1]

    def expert(e, x):
        return ex.down_proj[e] @ (nn.functional.silu(ex.gate_up_proj[e][:inter] @ x) * (ex.gate_up_proj[e][inter:] @ x))

    def forward(hidden_states):
        b, s, h = hidden_states.shape
        flat = hidden_states.reshape(-1, h)
        out = torch.zeros_like(flat)
        for t in range(flat.shape[0]):
            probs = torch.softmax((gate.weight @ flat[t]).float(), dim=0)
            w, idx = torch.topk(probs, 2)
            if w[1] < beta * w[0]:
                out[t] = expert(idx[0].item(), flat[t])
            else:
                out[t] = (w[0] / w.sum()) * expert(idx[0].item(), flat[t]) + (w[1] / w.sum()) * expert(idx[1].item(), flat[t])
        return out.reshape(b, s, h)

    return forward


def test_skip_top2_hand_example():
    index = torch.tensor([[3, 1], [0, 2], [2, 0], [1, 3]])
    weights = torch.tensor([[0.8, 0.2], [0.55, 0.45], [0.3, 0.7], [0.5, 0.5]])
    idx, w, dropped = skip_experts(index, weights, 0.5, 4, TopK(2))
    assert dropped.any(-1).tolist() == [True, False, True, False]  # 0.2 < 0.4; 0.45 >= 0.275; 0.3 < 0.35; tie kept
    assert idx.tolist() == [[3, 4], [0, 2], [4, 0], [1, 3]]  # sentinel 4 = no expert
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0], [0.55, 0.45], [0.0, 1.0], [0.5, 0.5]]))


def test_skip_topk_hand_example_renormalising_or_not():
    """Top-4 weights of two tokens, beta 0.5: drop every weight below half the token's largest."""
    index = torch.tensor([[5, 1, 7, 2], [0, 3, 6, 4]])
    weights = torch.tensor([[0.4, 0.3, 0.15, 0.15], [0.2, 0.25, 0.3, 0.25]])
    idx, w, dropped = skip_experts(index, weights, 0.5, 8, TopK(4, normalize=True, scale=2.0))
    assert dropped.tolist() == [[False, False, True, True], [False, False, False, False]]
    assert idx.tolist() == [[5, 1, 8, 8], [0, 3, 6, 4]]
    # renormalised over the kept 0.4 + 0.3, then x 2 (routed_scaling_factor)
    torch.testing.assert_close(w, torch.tensor([[0.8 / 0.7, 0.6 / 0.7, 0, 0], [0.2, 0.25, 0.3, 0.25]]))  # no drop: as routed
    _, w, _ = skip_experts(index, weights, 0.5, 8, TopK(4, normalize=False))  # Qwen/OLMoE default: kept as is
    torch.testing.assert_close(w, torch.tensor([[0.4, 0.3, 0, 0], [0.2, 0.25, 0.3, 0.25]]))
    _, w, _ = skip_experts(index, weights, 0.5, 8, TopK(4, "topk_softmax"))  # gpt-oss: softmax over the kept
    torch.testing.assert_close(w, torch.tensor([[0.4 / 0.7, 0.3 / 0.7, 0, 0], [0.2, 0.25, 0.3, 0.25]]))


def test_skipping_model_equals_per_token_reference():
    model = make_tiny_mixtral(experts=4, layers=2)
    ref = make_tiny_mixtral(experts=4, layers=2)
    ids = torch.randint(0, 64, (3, 20))
    a = get_adapter(model.config)
    betas = {"0": 0.6, "1": 0.8}
    for i, layer in enumerate(a.decoder_layers(ref)):
        layer.mlp.forward = _naive_skipping_block(layer.mlp, betas[str(i)])
    enable_dynamic_skipping(model, betas)
    with torch.no_grad(), count_expert_calls(a, model) as usage:
        got = model(ids).logits
    with torch.no_grad():
        want = ref(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    rates = skip_rates(model)
    assert set(rates) == {0, 1} and all(0 < r["rate"] < 1 and r["tokens"] == 60 for r in rates.values())
    summary = usage.summary()
    for i in (0, 1):  # the skipped second experts are really not called
        assert summary["layers"][str(i)]["calls"] == 2 * 60 - rates[i]["skipped"]


def test_beta_zero_never_skips_and_changes_nothing():
    model = make_tiny_mixtral(experts=4, layers=2)
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        dense = model(ids).logits
    enable_dynamic_skipping(model, {"0": 0.0, "1": 0.0})
    with torch.no_grad():
        out = model(ids).logits
    assert all(r["skipped"] == 0 for r in skip_rates(model).values())
    torch.testing.assert_close(out, dense, rtol=0, atol=0)


def test_beta_is_the_median_ratio_of_the_calibration_tokens():
    from pruning.calib.stats import LayerStats
    from pruning.moe import Routing

    g = torch.Generator().manual_seed(3)
    st = LayerStats(4, 8, 8)
    ratios = []
    for n in (7, 10):  # two experts-module calls, 17 tokens, weights in either slot order
        w = torch.rand(n, 2, generator=g)
        w = w / w.sum(-1, keepdim=True)
        st.add_routing(Routing(torch.randint(0, 4, (n, 2), generator=g), w))
        ratios += [min(a, b) / max(a, b) for a, b in w.tolist()]
    ratios.sort()
    assert beta_from_stats(st.finalize()) == pytest.approx(ratios[8], rel=1e-6)  # the middle of 17 values


def test_saved_checkpoint_skips_after_register(tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers import MixtralConfig

    model = make_tiny_mixtral(experts=4, layers=2)
    setattr(model.config, BETAS_KEY, {"0": 0.7, "1": 0.7})
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[BETAS_KEY] == {"0": 0.7, "1": 0.7}
    ids = torch.randint(0, 64, (2, 16))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers ignores the betas
    register()
    try:
        skipping = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    finally:
        MODEL_FOR_CAUSAL_LM_MAPPING._extra_content.pop(MixtralConfig, None)
    reference = make_tiny_mixtral(experts=4, layers=2)
    enable_dynamic_skipping(reference, {"0": 0.7, "1": 0.7})
    # from_pretrained uses transformers' default experts kernel (grouped_mm), which leaves the skipped (sentinel)
    # rows uninitialised unless told to mask them; deterministic mode fills uninitialised memory with NaN
    assert skipping.config._experts_implementation != "eager"
    torch.use_deterministic_algorithms(True)
    try:
        with torch.no_grad():
            torch.testing.assert_close(skipping(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(stock(ids).logits, skipping(ids).logits)
    finally:
        torch.use_deterministic_algorithms(False)
    assert skip_rates(skipping)[0]["skipped"] > 0 and skip_rates(stock) == {}


def test_skipping_needs_top2():
    model = make_tiny_mixtral(experts=4, top_k=1)
    with pytest.raises(ValueError, match="top_k >= 2"):
        enable_dynamic_skipping(model, {"0": 0.5})
