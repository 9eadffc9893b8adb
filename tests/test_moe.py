"""The MoE primitives against the stock transformers Mixtral block and against a per-token loop written from
the block's formula: y = sum over the token's top-k experts of g_e * W_down,e (silu(W_gate,e x) * (W_up,e x))."""
import itertools

import pytest
import torch
from torch import nn

from pruning.models import get_adapter
from pruning.moe import Experts, Router, Routing, combine

from conftest import make_tiny_mixtral


def _layer(model, i=1):
    adapter = get_adapter(model.config)
    layer = adapter.decoder_layers(model)[i]
    ex = adapter.expert_weights(layer)
    return adapter, layer, Experts(ex.gate_up.detach(), ex.down.detach(), ex.act), adapter.router(layer).weight.detach()


def _naive_block(x, router, experts, top_k, dropped=()):
    """Token by token: softmax over the experts not dropped, top-k, renormalise, weighted sum of SwiGLU experts."""
    inter = experts.down.shape[-1]
    kept = [e for e in range(router.shape[0]) if e not in dropped]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t].double()
        p = torch.softmax(torch.stack([router[e].double() @ xt for e in kept]), dim=0)
        order = sorted(range(len(kept)), key=lambda j: -p[j].item())[:top_k]
        for j in order:
            e = kept[j]
            h = nn.functional.silu(experts.gate_up[e][:inter].double() @ xt) * (experts.gate_up[e][inter:].double() @ xt)
            out[t] += p[j] / sum(p[i] for i in order) * (experts.down[e].double() @ h)
    return out


def test_routing_equals_the_stock_router(tiny_mixtral):
    adapter, layer, _, router = _layer(tiny_mixtral)
    x = torch.randn(30, 32)
    routing = Router(router, adapter.rule()).route(x, chunk=7)  # chunking changes nothing
    with torch.no_grad():
        _, weights, index = layer.mlp.gate(x)
    assert torch.equal(routing.index, index)
    torch.testing.assert_close(routing.weights, weights)


def test_tokens_of_dense_and_counts_hand_example():
    r = Routing(torch.tensor([[2, 0], [1, 2], [0, 3], [2, 4]]), torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [1.0, 0.0]]))
    token, g = r.tokens_of(2)
    assert token.tolist() == [0, 1, 3] and g.tolist() == pytest.approx([0.6, 0.3, 1.0])
    assert r.tokens_of(3)[0].tolist() == [2] and r.tokens_of(4)[0].tolist() == [3]  # 4 = a sentinel slot
    assert r.counts(4).tolist() == [2, 1, 3, 1]  # the sentinel is left out
    dense = Routing(r.index[:3], r.weights[:3]).dense(4)
    assert dense.dtype == torch.float64
    torch.testing.assert_close(dense, torch.tensor([[0.4, 0, 0.6, 0], [0, 0.7, 0.3, 0], [0.9, 0, 0, 0.1]], dtype=torch.float64))


def test_block_output_equals_stock_block_and_per_token_loop(tiny_mixtral):
    adapter, layer, experts, router = _layer(tiny_mixtral)
    x = torch.randn(40, 32)
    routing = Router(router, adapter.rule()).route(x)
    with torch.no_grad():
        stock = layer.mlp(x[None])
        stock = (stock[0] if isinstance(stock, tuple) else stock)[0]
    got = experts.block_output(x, routing)
    torch.testing.assert_close(got, stock, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double(), _naive_block(x, router, experts, 2), rtol=1e-5, atol=1e-6)
    # the dense form (every expert's outputs, one weighted sum) is the same block
    torch.testing.assert_close(combine(experts.outputs(x.double()), routing.dense(4)), got.double(), rtol=1e-5, atol=1e-6)


def test_block_output_observer_sees_each_experts_routed_tokens(tiny_mixtral):
    adapter, _, experts, router = _layer(tiny_mixtral)
    x = torch.randn(25, 32)
    routing = Router(router, adapter.rule()).route(x)
    seen = {}
    experts.block_output(x, routing, lambda e, tok, xe, g, h: seen.__setitem__(e, (tok, xe, g, h)))
    inter = experts.down.shape[-1]
    for e in range(4):
        tok, xe, g, h = seen[e]
        want = [t for t in range(25) if e in routing.index[t].tolist()]
        assert tok.tolist() == want and torch.equal(xe, x[want])
        for j, t in enumerate(want):
            slot = routing.index[t].tolist().index(e)
            assert g[j] == routing.weights[t, slot]
            w = experts.gate_up[e]
            torch.testing.assert_close(h[j], nn.functional.silu(w[:inter] @ x[t]) * (w[inter:] @ x[t]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dropped", [(1,), (0, 3)])
def test_dropped_experts_are_removed_from_the_choice(dropped):
    model = make_tiny_mixtral(experts=5)
    adapter, _, experts, router = _layer(model, 0)
    x = torch.randn(20, 32, dtype=torch.float64)
    logits = nn.functional.linear(x, router.double())
    routing = Router(router.double(), adapter.rule()).route_logits(logits, dropped)
    assert not any(e in routing.index.tolist()[t] for t in range(20) for e in dropped)
    got = combine(experts.to(torch.float64).outputs(x), routing.dense(5))
    torch.testing.assert_close(got, _naive_block(x, router, experts, 2, dropped), rtol=1e-9, atol=1e-10)


def test_outputs_are_each_experts_unweighted_forward(tiny_mixtral):
    _, _, experts, _ = _layer(tiny_mixtral)
    x = torch.randn(6, 32)
    inter = experts.down.shape[-1]
    out = experts.outputs(x)
    for e, t in itertools.product(range(4), range(6)):
        w = experts.gate_up[e]
        want = experts.down[e] @ (nn.functional.silu(w[:inter] @ x[t]) * (w[inter:] @ x[t]))
        torch.testing.assert_close(out[e, t], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(experts.output(e, x[t : t + 1])[0], want, rtol=1e-5, atol=1e-6)


def test_float64_outputs_cast_one_expert_at_a_time(tiny_mixtral):
    """outputs / block_output(dtype=float64) on float32 experts equal the same computation on a float64 copy of
    the layer (the search and the block-error diagnostic hold one expert in float64, never the layer), and
    ``expert(e)`` is a view: no expert's weights are copied unless cast."""
    adapter, _, experts, wr = _layer(tiny_mixtral)
    router = Router(wr, adapter.rule())
    x = torch.randn(9, 32, dtype=torch.float64)
    wide = experts.to(torch.float64)
    assert torch.equal(experts.outputs(x), wide.outputs(x))
    routing = router.route(x.float())
    assert torch.equal(experts.block_output(x, routing, dtype=torch.float64), wide.block_output(x, routing))
    assert experts.expert(2).gate_up.data_ptr() == experts.gate_up[2].data_ptr()
    assert experts.expert(2, torch.float64).down.dtype == torch.float64
