"""SparseGPT against an independent dense OBS computation, and per-expert Hessians against a per-token loop."""
import logging

import pytest
import torch
import torch.nn.functional as F

from pruning.models import get_adapter
from pruning.calib.stream import calibrate_layer
from pruning.moe import Experts, Router
from pruning.weights.hessian import HESSIAN_MODES, expert_hessians
from pruning.weights.masks import select_mask
from pruning.weights.pattern import Pattern
from pruning.weights.sparsegpt import layer_sparsegpt
from pruning.weights.scores import score
from pruning.weights.sparsegpt import sparsegpt


def naive_obs(weight, hessian, pattern, blocksize, percdamp):
    """Column-by-column OBS with an explicit inverse of the remaining columns' Hessian at every step.

    No Cholesky factor and no lazy batching: every update reaches all later columns at once.
    """
    w, h = weight.double().clone(), hessian.double().clone()
    rows, cols = w.shape
    h = h + percdamp * torch.diag(h).mean() * torch.eye(cols, dtype=torch.float64)
    inv_tail = lambda j: torch.linalg.inv(h[j:, j:])  # noqa: E731  inverse Hessian of columns j..cols-1
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if not pattern.is_nm:
            sal = torch.stack([w[:, j] ** 2 / inv_tail(j)[0, 0] for j in range(i1, i2)], dim=1)
            k = int(pattern.sparsity * sal.numel())
            flat = torch.zeros(sal.numel(), dtype=torch.bool)
            flat[torch.sort(sal.flatten(), stable=True).indices[:k]] = True
            pruned[:, i1:i2] = flat.reshape(sal.shape)
        for j in range(i1, i2):
            if pattern.is_nm and (j - i1) % pattern.m == 0:
                group = range(j, j + pattern.m)
                sal = torch.stack([w[:, c] ** 2 / inv_tail(c)[0, 0] for c in group], dim=1)
                for r in range(rows):
                    for c in torch.sort(sal[r], stable=True).indices[: pattern.n]:
                        pruned[r, j + int(c)] = True
            hinv = inv_tail(j)
            q = torch.where(pruned[:, j], torch.zeros(rows, dtype=torch.float64), w[:, j])
            delta = (w[:, j] - q) / hinv[0, 0]
            w[:, j:] -= delta[:, None] * hinv[0][None, :]
            w[:, j] = q
    return w, ~pruned


def _correlated_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scale = torch.exp(torch.randn(d, generator=g))  # outlier-ish channels
    return (torch.randn(n, d, generator=g) @ mix) * scale


@pytest.mark.parametrize("pattern", ["0.5", "0.7", "2:4", "4:8"])
def test_sparsegpt_equals_dense_obs(pattern):
    pattern = Pattern.parse(pattern)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 48, generator=g)
    x = _correlated_inputs(200, 48)
    h = x.T @ x
    new, keep, info = sparsegpt(w, h, pattern, blocksize=16, percdamp=0.01, dtype=torch.float64)
    ref_w, ref_keep = naive_obs(w, h, pattern, blocksize=16, percdamp=0.01)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new.double(), ref_w, rtol=1e-6, atol=1e-6)  # new is float32 again
    assert (new[~keep] == 0).all() and info["dead_columns"] == 0
    if pattern.is_nm:
        pruned_per_group = (~keep).reshape(12, -1, pattern.m).sum(-1)
        assert (pruned_per_group == pattern.n).all()
    else:
        for i1 in range(0, 48, 16):  # exact count per block (the comparison group)
            assert int((~keep[:, i1 : i1 + 16]).sum()) == int(pattern.sparsity * 12 * 16)


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_sparsegpt_reconstructs_better_than_wanda(pattern):
    pattern = Pattern.parse(pattern)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g)
    x = _correlated_inputs(1024, 128, seed=3)
    new, keep, _ = sparsegpt(w, x.T @ x, pattern)
    wanda = w * select_mask(score("wanda", w, (x**2).sum(0)), pattern)
    err = lambda wh: torch.linalg.norm(x @ w.T - x @ wh.T).item()  # noqa: E731
    assert (new == 0).sum() >= (~keep).sum() and (new[~keep] == 0).all()
    assert (~keep).sum() == (wanda == 0).sum()  # same budget
    assert err(new) < err(wanda)


def test_dead_columns_and_dampening_retry(caplog):
    w = torch.randn(4, 8)
    h = torch.eye(8)
    h[3, 3] = 0.0  # an input that never fires
    new, keep, info = sparsegpt(w, h, Pattern.parse(0.5), blocksize=8)
    assert info["dead_columns"] == 1 and (new[:, 3] == 0).all() and torch.isfinite(new).all()
    indefinite = torch.diag(torch.tensor([1.0, 1.0, -0.5, 1.0]))
    with caplog.at_level(logging.WARNING, logger="pruning.sparsegpt"):
        _, _, info = sparsegpt(torch.randn(2, 4), indefinite, Pattern.parse(0.5), blocksize=4)
    assert info["damp"] == pytest.approx(1.0)
    assert sum("Cholesky failed" in r.message for r in caplog.records) == 2


def _moe_inputs(model, adapter, layer_idx, tokens):
    hidden = model.model.embed_tokens(tokens)
    ctx = adapter.layer_context(model, tokens.shape[1], "cpu")
    for i in range(layer_idx):
        hidden = model.model.layers[i](hidden, **ctx[i])
    _, inputs, _ = calibrate_layer(adapter, model.model.layers[layer_idx], hidden, ctx[layer_idx], batch_size=2)
    return inputs


def _naive_hessians(model, layer_idx, inputs, mode):
    cfg = model.config
    E, k, I, H = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size, cfg.hidden_size
    mlp = model.model.layers[layer_idx].mlp
    wr, gu = mlp.gate.weight.double(), mlp.experts.gate_up_proj.double()
    h_in, h_mid = torch.zeros(E, H, H, dtype=torch.float64), torch.zeros(E, I, I, dtype=torch.float64)
    for x in inputs.double():
        p = torch.softmax(wr @ x, dim=0)
        chosen = sorted(range(E), key=lambda e: -p[e].item())[:k]
        for e in range(E):
            if mode != "all_tokens" and e not in chosen:
                continue
            g = p[e] / sum(p[c] for c in chosen) if mode == "gate_weighted" else 1.0
            h = F.silu(gu[e, :I] @ x) * (gu[e, I:] @ x)
            h_in[e] += g**2 * torch.outer(x, x)
            h_mid[e] += g**2 * torch.outer(h, h)
    return h_in, h_mid


def _layers_with_reference(model, adapter, mode, **route):
    """Per MoE layer 0 and 1 of the tiny model on 3 x 16 random tokens: (layer index, MoE inputs, routing, naive
    per-token Hessians of every expert)."""
    tokens = torch.randint(0, 64, (3, 16))
    for layer_idx in (0, 1):
        inputs = _moe_inputs(model, adapter, layer_idx, tokens)
        routing = Router(model.model.layers[layer_idx].mlp.gate.weight, adapter.rule()).route(inputs, **route)
        yield (layer_idx, inputs, routing, *_naive_hessians(model, layer_idx, inputs, mode))


@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_expert_hessians_equal_per_token_loop(tiny_mixtral, mode):
    model, adapter = tiny_mixtral, get_adapter(tiny_mixtral.config)
    with torch.no_grad():
        for layer_idx, inputs, routing, ref_in, ref_mid in _layers_with_reference(model, adapter, mode, chunk=7):
            for e in range(adapter.num_experts):
                h_in, h_mid, n = expert_hessians(
                    mode, inputs, routing, e, adapter.expert_weights(model.model.layers[layer_idx]), torch.float64, chunk=5
                )
                torch.testing.assert_close(h_in, ref_in[e], rtol=1e-5, atol=1e-6)  # g comes from the fp32 router
                torch.testing.assert_close(h_mid, ref_mid[e], rtol=1e-5, atol=1e-6)  # g comes from the fp32 router
                assert n == (inputs.shape[0] if mode == "all_tokens" else int((routing.index == e).sum()))


def test_layer_sparsegpt_prunes_separate_matrices_and_falls_back(tiny_mixtral):
    model, adapter = tiny_mixtral, get_adapter(tiny_mixtral.config)
    mlp = model.model.layers[0].mlp
    inputs = _moe_inputs(model, adapter, 0, torch.randint(0, 64, (2, 16)))
    routing = Router(mlp.gate.weight, adapter.rule()).route(inputs)
    routing.index[routing.index == 3] = 2  # expert 3 now receives no token
    gu, dn = mlp.experts.gate_up_proj.detach(), mlp.experts.down_proj.detach()
    pattern = Pattern.parse("2:4")
    masks, new, info = layer_sparsegpt("sparsegpt_gate_weighted", pattern, Experts(gu, dn, adapter.activation()), inputs, routing)
    assert info["fallback_experts"] == [3] and info["tokens_per_expert"][3] == 0
    assert torch.equal(masks["gate_up"][3], select_mask(gu[3].abs(), pattern))
    assert torch.equal(new["down"][3], dn[3] * masks["down"][3])
    for key in ("gate_up", "down"):
        assert (new[key][~masks[key]] == 0).all()
        assert ((~masks[key]).reshape(-1, pattern.m).sum(-1) == pattern.n).all()
    # gate and up are separate matrices: pruning the fused (2I, H) matrix would give another result
    I = dn.shape[-1]
    gate_only, keep, _ = sparsegpt(gu[0, :I], expert_hessians("gate_weighted", inputs, routing, 0, Experts(gu, dn, adapter.activation()))[0], pattern)
    torch.testing.assert_close(new["gate_up"][0, :I], gate_only)
    assert not torch.equal(new["gate_up"][0], gu[0])


@pytest.mark.parametrize("method", ["sparsegpt", "sparsegpt_gate_weighted"])
def test_layer_sparsegpt_in_place_equals_the_copy(tiny_mixtral, method):
    """The mask job updates the weights it read in place (no second copy of the layer): each expert's Hessians
    come from its weights before they change, so masks and weights equal the copying path's."""
    model, adapter = tiny_mixtral, get_adapter(tiny_mixtral.config)
    mlp = model.model.layers[1].mlp
    inputs = _moe_inputs(model, adapter, 1, torch.randint(0, 64, (2, 16)))
    routing = Router(mlp.gate.weight, adapter.rule()).route(inputs)
    gu, dn = mlp.experts.gate_up_proj.detach(), mlp.experts.down_proj.detach()
    pattern = Pattern.parse("0.6")
    masks, new, _ = layer_sparsegpt(method, pattern, Experts(gu, dn, adapter.activation()), inputs, routing)
    own = Experts(gu.clone(), dn.clone(), adapter.activation())
    masks_ip, new_ip, _ = layer_sparsegpt(method, pattern, own, inputs, routing, inplace=True)
    for key in ("gate_up", "down"):
        assert torch.equal(masks_ip[key], masks[key]) and torch.equal(new_ip[key], new[key])
    assert new_ip["gate_up"].data_ptr() == own.gate_up.data_ptr() and not torch.equal(new["gate_up"], gu)


@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_batched_layer_hessians_equal_per_token_loop(tiny_mixtral, mode):
    """The batched Hessians (all experts, or a group of them, at once; zero-padded per-expert token blocks) against
    the naive per-token loop, for several chunk sizes (padding in every chunk, one position per chunk)."""
    from pruning.weights.hessian import layer_hessians

    model, adapter = tiny_mixtral, get_adapter(tiny_mixtral.config)
    with torch.no_grad():
        for layer_idx, inputs, routing, ref_in, ref_mid in _layers_with_reference(model, adapter, mode):
            experts = adapter.expert_weights(model.model.layers[layer_idx])
            for chunk, start, stop in [(8192, 0, 4), (9, 0, 4), (1, 1, 3), (5, 3, 4)]:
                h_in, h_mid, n = layer_hessians(mode, inputs, routing, experts, torch.float64, chunk, start, stop)
                assert h_in.shape[0] == h_mid.shape[0] == len(n) == stop - start
                for j, e in enumerate(range(start, stop)):
                    torch.testing.assert_close(h_in[j], ref_in[e], rtol=1e-5, atol=1e-6)
                    torch.testing.assert_close(h_mid[j], ref_mid[e], rtol=1e-5, atol=1e-6)
                    assert n[j] == (inputs.shape[0] if mode == "all_tokens" else int((routing.index == e).sum()))


@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_batched_layer_hessians_with_biases_glu_and_an_idle_expert(mode):
    """Biases and a clamped GLU make the padding rows' intermediates non-zero (they must not count), an expert
    without tokens gets zero Hessians: against a per-token loop over each token's routed slots."""
    from pruning.models.gpt_oss import ClampedSwiGLU
    from pruning.moe import TopK
    from pruning.weights.hessian import layer_hessians

    g = torch.Generator().manual_seed(4)
    E, H, I, T = 5, 12, 20, 90
    experts = Experts(torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g), None,
                      torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g), ClampedSwiGLU(1.702, 7.0))
    x = torch.randn(T, H, generator=g)
    routing = Router(torch.randn(E, H, generator=g), TopK(2)).route(x, dropped=[2])  # expert 2 gets no token
    ref_in, ref_mid = torch.zeros(E, H, H, dtype=torch.float64), torch.zeros(E, I, I, dtype=torch.float64)
    ex64 = experts.to(torch.float64)
    for t in range(T):
        xt = x[t].double()
        chosen = {int(e): float(w) for e, w in zip(routing.index[t], routing.weights[t])}
        for e in range(E):
            if mode != "all_tokens" and e not in chosen:
                continue
            s = chosen[e] if mode == "gate_weighted" else 1.0
            h = ex64.intermediate(e, xt[None])[0]
            ref_in[e] += s**2 * torch.outer(xt, xt)
            ref_mid[e] += s**2 * torch.outer(h, h)
    for chunk in (8192, 7):
        h_in, h_mid, n = layer_hessians(mode, x, routing, experts, torch.float64, chunk)
        torch.testing.assert_close(h_in, ref_in, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(h_mid, ref_mid, rtol=1e-10, atol=1e-9)
        if mode != "all_tokens":
            assert n[2] == 0 and not h_mid[2].any()


@pytest.mark.parametrize("method", ["sparsegpt", "sparsegpt_all_tokens", "sparsegpt_gate_weighted"])
def test_layer_sparsegpt_batched_hessians_equal_per_expert(tiny_mixtral, method, monkeypatch):
    """The batched Hessians give the masks and weights of the per-expert path (float64: no near-tie flips),
    whether all experts fit one group or the memory budget splits them; so does the pipeline's 'auto' choice."""
    import pruning.weights.sparsegpt as sg

    model, adapter = tiny_mixtral, get_adapter(tiny_mixtral.config)
    mlp = model.model.layers[0].mlp
    inputs = _moe_inputs(model, adapter, 0, torch.randint(0, 64, (2, 16)))
    routing = Router(mlp.gate.weight, adapter.rule()).route(inputs)
    experts = Experts(mlp.experts.gate_up_proj.detach(), mlp.experts.down_proj.detach(), adapter.activation())
    pattern = Pattern.parse("0.5")
    ref_m, ref_w, ref_i = layer_sparsegpt(method, pattern, experts, inputs, routing, dtype=torch.float64, hessians="per_expert")
    for budget in (sg.HESSIAN_GROUP_BYTES, 3 * (32**2 + 48**2) * 8):  # all 4 experts at once; groups of 3 and 1
        monkeypatch.setattr(sg, "HESSIAN_GROUP_BYTES", budget)
        m, w, i = layer_sparsegpt(method, pattern, experts, inputs, routing, dtype=torch.float64, hessians="batched")
        assert i["tokens_per_expert"] == ref_i["tokens_per_expert"]
        for key in ("gate_up", "down"):
            assert torch.equal(m[key], ref_m[key])
            torch.testing.assert_close(w[key], ref_w[key], rtol=1e-5, atol=1e-6)
    m, w, _ = layer_sparsegpt(method, pattern, experts, inputs, routing, dtype=torch.float64)  # the pipeline's 'auto'
    assert all(torch.equal(m[k], ref_m[k]) for k in m)
    with pytest.raises(ValueError, match="Hessian path"):
        layer_sparsegpt(method, pattern, experts, inputs, routing, hessians="loop")
