"""Expert pruning against independent computations on a real tiny Mixtral: the NAEE objective against a per-token
loop, the chosen set against a brute force over the stock MoE block, the baselines' scores against a per-token
loop, and the reduced checkpoint against the full model with -inf router logits for the dropped experts."""
import copy
import itertools
import json
import math

import pytest
import torch
from torch import nn

from pruning.experts.baselines import add_scores, method_scores, random_experts, routed_scores, top_experts
from pruning.experts.removal import expert_saving, reduce_experts
from pruning.experts.search import BlockLoss, block_targets, search
from pruning.models import get_adapter
from pruning.models.checkpoint import file_bytes, parameter_count, tensor_bytes
from pruning.moe import Experts, Router, Routing

from conftest import make_tiny_mixtral


def _moe_inputs(model, n_seq=4, seqlen=12, seed=1):
    """The MoE-block inputs of every layer (flattened tokens) from a real forward."""
    adapter = get_adapter(model.config)
    captured = {}

    def hook(i):
        def fn(module, args):
            captured[i] = args[0].reshape(-1, args[0].shape[-1]).detach().clone()

        return fn

    hooks = [adapter.moe_block(layer).register_forward_pre_hook(hook(i)) for i, layer in enumerate(adapter.decoder_layers(model))]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (n_seq, seqlen), generator=g))
    for h in hooks:
        h.remove()
    return captured


def _naive_output(x, router, gate_up, down, dropped, top_k):
    """Per-token MoE output with ``dropped`` experts removed: softmax over the remaining experts, top-k, renormalise."""
    E, inter = router.shape[0], down.shape[-1]
    kept = [e for e in range(E) if e not in dropped]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(torch.stack([router[e] @ x[t] for e in kept]), dim=0)
        order = sorted(range(len(kept)), key=lambda j: -probs[j].item())[:top_k]
        total = sum(probs[j] for j in order)
        for j in order:
            e = kept[j]
            h = nn.functional.silu(gate_up[e][:inter] @ x[t]) * (gate_up[e][inter:] @ x[t])
            out[t] += probs[j] / total * (down[e] @ h)
    return out


def _layer_tensors(model, i):
    a = get_adapter(model.config)
    layer = a.decoder_layers(model)[i]
    ex = a.expert_weights(layer)
    return a, a.router(layer).weight.detach(), Experts(ex.gate_up.detach(), ex.down.detach(), ex.act)


def test_objective_equals_per_token_frobenius_sum():
    model = make_tiny_mixtral(experts=5)
    x = _moe_inputs(model)[1].double()
    a, router, ex = _layer_tensors(model, 1)
    batches = [x[:20], x[20:]]
    loss = BlockLoss(batches, Router(router, a.rule()), ex)
    sets = [(0,), (2, 4), (1, 3)]
    got = loss(sets)
    r, g, d = router.double(), ex.gate_up.double(), ex.down.double()
    for dropped, value in zip(sets, got):
        naive = 0.0
        for b in batches:
            z = _naive_output(b, r, g, d, (), 2)
            y = _naive_output(b, r, g, d, dropped, 2)
            naive += math.sqrt(((z - y) ** 2).sum().item())  # Frobenius norm per batch, not squared
        assert value == pytest.approx(naive, rel=1e-9)
    assert loss([()])[0] == pytest.approx(0.0, abs=1e-12)


def test_search_picks_brute_force_argmin_of_the_stock_block():
    model = make_tiny_mixtral(experts=6).double()
    a = get_adapter(model.config)
    x = _moe_inputs(model)[0]
    batches = [x[:24], x[24:]]
    block = a.moe_block(a.decoder_layers(model)[0])
    with torch.no_grad():
        targets = [block(b[None])[0] for b in batches]

    def brute(dropped):  # the stock MixtralSparseMoeBlock with the dropped experts' rows sliced out
        kept = [e for e in range(6) if e not in dropped]
        b2 = copy.deepcopy(block)
        b2.gate.weight = nn.Parameter(block.gate.weight[kept].clone())
        b2.gate.num_experts = b2.experts.num_experts = len(kept)
        b2.experts.gate_up_proj = nn.Parameter(block.experts.gate_up_proj[kept].clone())
        b2.experts.down_proj = nn.Parameter(block.experts.down_proj[kept].clone())
        with torch.no_grad():
            return sum(torch.linalg.matrix_norm(z - b2(b[None])[0]).item() for z, b in zip(targets, batches))

    for keep in (4, 3):
        all_sets = list(itertools.combinations(range(6), 6 - keep))
        brute_losses = {d: brute(d) for d in all_sets}
        _, router, ex = _layer_tensors(model, 0)
        res = search(BlockLoss(batches, Router(router, a.rule()), ex), 6, keep)
        assert tuple(res["dropped"]) == min(brute_losses, key=brute_losses.get)
        assert len(res["candidates"]) == math.comb(6, 6 - keep) and res["exhaustive"]
        for d, v in res["candidates"]:
            assert v == pytest.approx(brute_losses[tuple(d)], rel=1e-7, abs=1e-9)


def test_beam_search_when_enumeration_is_too_large():
    costs = [5.0, 1.0, 3.0, 0.5, 4.0, 2.0, 6.0, 0.1]
    calls = []

    def additive(sets):
        calls.append(len(sets))
        return [sum(costs[e] for e in d) for d in sets]

    res = search(additive, 8, 4, max_subsets=10, beam_width=2)
    assert res["dropped"] == [1, 3, 5, 7] and res["kept"] == [0, 2, 4, 6]
    assert not res["exhaustive"] and "beam search (width 2)" in res["search"]
    assert len(res["candidates"]) < math.comb(8, 4)
    greedy = search(additive, 8, 4, max_subsets=10, beam_width=1)
    assert greedy["dropped"] == [1, 3, 5, 7]
    exhaustive = search(additive, 8, 4)
    assert exhaustive["dropped"] == res["dropped"] and len(exhaustive["candidates"]) == 70


def test_baseline_scores_equal_a_per_token_loop():
    model = make_tiny_mixtral(experts=4)
    a, router, ex = _layer_tensors(model, 1)
    gu, dn = ex.gate_up, ex.down
    x = _moe_inputs(model)[1]
    gate = a.router_module(a.decoder_layers(model)[1])
    with torch.no_grad():
        _, weights, index = gate(x)  # the model's own routing and combine weights
        sums = add_scores(routed_scores(x[:30], Routing(index[:30], weights[:30]), ex),
                          routed_scores(x[30:], Routing(index[30:], weights[30:]), ex))
    scores = method_scores(sums)
    count, gnorm, norm = [0] * 4, [0.0] * 4, [0.0] * 4
    inter = dn.shape[-1]
    for t in range(x.shape[0]):
        for slot in range(2):
            e = index[t, slot].item()
            xt = x[t].double()
            f = dn[e].double() @ (nn.functional.silu(gu[e][:inter].double() @ xt) * (gu[e][inter:].double() @ xt))
            count[e] += 1
            norm[e] += f.norm().item()
            gnorm[e] += weights[t, slot].item() * f.norm().item()
    assert scores["frequency"] == count
    assert scores["ean"] == pytest.approx(norm, rel=1e-6)
    assert scores["reap"] == pytest.approx([g / c for g, c in zip(gnorm, count)], rel=1e-6)
    assert top_experts([3.0, 1.0, 3.0, 2.0], 2) == [0, 2]  # tie broken towards the lower index
    assert random_experts(8, 4, 0, 1) == random_experts(8, 4, 0, 1) != random_experts(8, 4, 0, 2)


def _masked_router_forward(gate, dropped):
    """Mixtral routing with the dropped experts' logits at -inf (the full model, nothing removed)."""

    def forward(hidden_states):
        h = hidden_states.reshape(-1, gate.weight.shape[1])
        logits = nn.functional.linear(h, gate.weight)
        logits[:, dropped] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, gate.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), idx

    return forward


def test_reduced_checkpoint_equals_minus_inf_router_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_mixtral(experts=6, layers=2)
    a = get_adapter(model.config)
    kept = {0: [0, 2, 3, 5], 1: [1, 2, 4, 5]}
    ids = torch.randint(0, 64, (3, 16))
    reduced = copy.deepcopy(model)
    before = parameter_count(model)
    saved, saved_bytes = expert_saving(a, model, {0: 2, 1: 2})
    reduce_experts(get_adapter(reduced.config), reduced, kept, {"method": "test"})
    reduced.save_pretrained(tmp_path / "reduced")
    model.save_pretrained(tmp_path / "full")
    for i, ks in kept.items():
        gate = a.router_module(a.decoder_layers(model)[i])
        gate.forward = _masked_router_forward(gate, [e for e in range(6) if e not in ks])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "reduced", experts_implementation="eager").eval()
    assert loaded.config.num_local_experts == 4 and loaded.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
    assert json.loads((tmp_path / "reduced/config.json").read_text())["pruned_experts"]["kept"] == {"0": kept[0], "1": kept[1]}
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert before - parameter_count(loaded) == saved == 2 * 2 * (96 * 32 + 32 * 48 + 32)  # gate_up, down, router row
    assert tensor_bytes(tmp_path / "full") - tensor_bytes(tmp_path / "reduced") == saved_bytes == saved * 4
    assert file_bytes(tmp_path / "reduced") < file_bytes(tmp_path / "full")


def test_reduce_rejects_bad_kept_sets():
    model = make_tiny_mixtral(experts=4)
    a = get_adapter(model.config)
    with pytest.raises(ValueError, match="same number"):
        reduce_experts(a, copy.deepcopy(model), {0: [0, 1], 1: [0, 1, 2]})
    with pytest.raises(ValueError, match="top_k, num_experts"):
        reduce_experts(a, copy.deepcopy(model), {0: [0], 1: [1]})


def test_progressive_targets_are_the_unpruned_outputs():
    model = make_tiny_mixtral(experts=4).double()
    a, router, ex = _layer_tensors(model, 0)
    x = _moe_inputs(model)[0]
    block = a.moe_block(a.decoder_layers(model)[0])
    with torch.no_grad():
        expected = block(x[None])[0]
    (z,) = block_targets([x], Router(router, a.rule()), ex)
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-6)  # the stock router's softmax is fp32, ours fp64
    shifted = x + 0.1 * torch.randn_like(x)  # progressive: other inputs, same targets
    loss = BlockLoss([shifted], Router(router, a.rule()), ex, targets=[z])
    with torch.no_grad():
        stock = torch.linalg.matrix_norm(z - block(shifted[None])[0]).item()
    assert loss([()])[0] == pytest.approx(stock, rel=1e-5)
