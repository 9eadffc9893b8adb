"""Every MoE family through the adapters, against naive per-token references written from the family's formula
(``naive_routing``: routing, block outputs; the loops below: statistics, skipping), on tiny random models built
from transformers' own config classes with non-zero router and selection biases (``families``).

Also: nothing outside ``pruning/models`` names a family or a family's parameter.
"""
import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from families import FAMILIES, LAYOUTS, make_model, save_checkpoint
from naive_routing import naive_moe_block_output, naive_route_module, router_params
from pruning.calib.stream import calibrate_layer, embed
from pruning.models.layer_source import ResidentSource
from pruning.experts.baselines import random_experts, top_experts
from pruning.experts.removal import reduce_experts
from pruning.experts.search import BlockLoss, search
from pruning.experts.skipping import enable_dynamic_skipping, skip_rates
from pruning.methods import SPARSEGPT_METHODS, WEIGHT_METHODS
from pruning.models import get_adapter
from pruning.models.checkpoint import load_config, read_experts, read_router
from pruning.weights.assemble import prune_layer
from pruning.weights.pattern import Pattern
from pruning.weights.prune import layer_masks
from pruning.weights.sparsegpt import layer_sparsegpt
from pruning.weights.sparsity import check_layer_nm, sparsity_report

ROOT = Path(__file__).resolve().parents[1]


def _setup(family, **overrides):
    model = make_model(family, **overrides).double()
    adapter = get_adapter(model.config)
    return model, adapter


def _moe_inputs(model, adapter, layer_idx, n=6, seqlen=16, seed=0):
    """The real inputs of one MoE layer's experts module for random token windows: (T, H)."""
    ids = torch.randint(0, 300, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    seen = []
    with torch.no_grad(), adapter.observe_experts(adapter.decoder_layers(model)[layer_idx], on_call=lambda h, r: seen.append(h)):
        model(ids)
    return torch.cat(seen)


def _mlp(adapter, model, i):
    return adapter.moe_block(adapter.decoder_layers(model)[i])


def _routing_dicts(routing, num_experts):
    return [{int(e): float(w) for e, w in zip(ix, ws) if e < num_experts}
            for ix, ws in zip(routing.index.tolist(), routing.weights.tolist())]


def _assert_same_routing(got: list[dict], want: list[dict], tol=1e-6):  # fp32 routers (DeepSeek, GLM)
    assert len(got) == len(want)
    for t, (g, w) in enumerate(zip(got, want)):
        assert set(g) == set(w), (t, g, w)
        for e in g:
            assert abs(g[e] - w[e]) < tol, (t, e, g[e], w[e])


def _drop_set(adapter):
    """Experts to drop that leave a valid router: a whole group of a group-limited router, else two experts."""
    groups = adapter.groups()
    return groups[-1] if groups else [0, adapter.num_experts - 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_equals_the_naive_formula(family):
    """Combine weights (and chosen experts) of every MoE layer, also with experts removed from routing."""
    model, adapter = _setup(family)
    for i in adapter.moe_layer_indices():
        x = _moe_inputs(model, adapter, i)
        router, mlp = adapter.router(adapter.decoder_layers(model)[i]), _mlp(adapter, model, i)
        _assert_same_routing(_routing_dicts(router.route(x), adapter.num_experts), naive_route_module(family, model.config, mlp, x))
        dropped = _drop_set(adapter)
        got = router.route(x, dropped)
        assert not any(e in dropped for e in got.index.flatten().tolist())
        _assert_same_routing(_routing_dicts(got, adapter.num_experts), naive_route_module(family, model.config, mlp, x, dropped))


def _naive_intermediate(family, mlp, e, x):
    """Expert e's gated intermediate (input of its down projection) on one token, from the raw parameters."""
    ex = mlp.experts
    if family == "gpt_oss":
        gu = x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
        gate, up = gu[0::2].clamp(max=ex.limit), gu[1::2].clamp(-ex.limit, ex.limit)
        return (up + 1) * (gate * torch.sigmoid(ex.alpha * gate))
    inter = ex.down_proj.shape[-1]
    return nn.functional.silu(ex.gate_up_proj[e][:inter] @ x) * (ex.gate_up_proj[e][inter:] @ x)


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_statistics_and_block_equal_per_token_loops(family):
    """calibrate_layer's statistics (counts, combine weights, Wanda / MoE-Pruner input norms of gate_up and
    down) and the experts' block output, against loops over tokens and their naive routing."""
    model, adapter = _setup(family)
    i = adapter.moe_layer_indices()[-1]
    x = _moe_inputs(model, adapter, i)
    mlp = _mlp(adapter, model, i)
    route = naive_route_module(family, model.config, mlp, x)
    E, H = adapter.num_experts, x.shape[1]
    I = adapter.expert_weights(adapter.decoder_layers(model)[i]).intermediate_size
    want = {"count": torch.zeros(E, dtype=torch.float64), "gate_up.sum_x2": torch.zeros(E, H, dtype=torch.float64),
            "gate_up.sum_gx2": torch.zeros(E, H, dtype=torch.float64), "down.sum_x2": torch.zeros(E, I, dtype=torch.float64),
            "down.sum_gx2": torch.zeros(E, I, dtype=torch.float64)}
    routed = torch.zeros_like(x)
    with torch.no_grad():
        for t, chosen in enumerate(route):
            for e, g in chosen.items():
                h = _naive_intermediate(family, mlp, e, x[t])
                want["count"][e] += 1
                want["gate_up.sum_x2"][e] += x[t] ** 2
                want["gate_up.sum_gx2"][e] += (g * x[t]) ** 2
                want["down.sum_x2"][e] += h ** 2
                want["down.sum_gx2"][e] += (g * h) ** 2
                y = (mlp.experts.down_proj[e].T @ h + mlp.experts.down_proj_bias[e]) if family == "gpt_oss" else mlp.experts.down_proj[e] @ h
                routed[t] += g * y
        # the block the model runs = the routed experts + whatever the family adds (shared experts)
        got_routed = adapter.expert_weights(adapter.decoder_layers(model)[i]).block_output(x, adapter.router(adapter.decoder_layers(model)[i]).route(x))
        torch.testing.assert_close(got_routed, routed, rtol=1e-5, atol=1e-6)  # routers compute in fp32
        full = naive_moe_block_output(family, model.config, mlp, x)
        out = mlp(x[None])
        out = (out[0] if isinstance(out, tuple) else out)[0]
        torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-6)  # routers compute in fp32
    # statistics from the real decoder layer (fp32 accumulation), inputs captured as the block passes them
    source = ResidentSource(model, adapter)
    ids = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(0))
    hidden = embed(source, ids, 3)
    for k in range(i):
        hidden = torch.cat([adapter.decoder_layers(model)[k](hidden[j:j + 3], **source.context(16, k)) for j in range(0, 6, 3)])
    _, inputs, st = calibrate_layer(adapter, adapter.decoder_layers(model)[i], hidden, source.context(16, i), 3)
    torch.testing.assert_close(inputs, x)
    for key, value in want.items():
        torch.testing.assert_close(st[key].double(), value, rtol=1e-5, atol=1e-6, msg=key)


def _naive_skipping(family, config, mlp, x, beta, renormalises):
    """Per token: drop the experts whose weight is below beta x the largest; the family's renormalisation (the
    kept weights rescaled to the sum the family's weights have) or none; plus the shared experts."""
    route = naive_route_module(family, config, mlp, x)
    full = naive_moe_block_output(family, config, mlp, x)
    out = torch.zeros_like(x)
    dropped = 0
    for t, chosen in enumerate(route):
        top = max(chosen.values())
        kept = {e: g for e, g in chosen.items() if g >= beta * top}
        dropped += len(chosen) - len(kept)
        if renormalises:
            total, kept_total = sum(chosen.values()), sum(kept.values())
            kept = {e: g * total / kept_total for e, g in kept.items()}
        for e, g in chosen.items():  # remove the block's own routed sum, add the skipping one
            out[t] -= g * _naive_expert(family, mlp, e, x[t])
        for e, g in kept.items():
            out[t] += g * _naive_expert(family, mlp, e, x[t])
    return full + out, dropped


def _naive_expert(family, mlp, e, x):
    h = _naive_intermediate(family, mlp, e, x)
    ex = mlp.experts
    return (ex.down_proj[e].T @ h + ex.down_proj_bias[e]) if family == "gpt_oss" else ex.down_proj[e] @ h


# which families renormalise their top-k weights, from each family's formula (not from the adapter)
RENORMALISES = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True, "olmoe": False, "deepseek_v2": False,
                "deepseek_v3": True, "glm4_moe": True, "gpt_oss": True}


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamic_skipping_equals_per_token_rule(family):
    model, adapter = _setup(family)
    if family != "gpt_oss":
        assert bool(getattr(model.config, "norm_topk_prob", True)) == RENORMALISES[family] or family == "deepseek_v2"
    layers = adapter.moe_layer_indices()
    xs = {i: _moe_inputs(model, adapter, i) for i in layers}
    beta = 0.6
    enable_dynamic_skipping(model, {str(i): beta for i in layers})
    total_dropped = 0
    with torch.no_grad():
        for i in layers:
            mlp = _mlp(adapter, model, i)
            want, dropped = _naive_skipping(family, model.config, mlp, xs[i], beta, RENORMALISES[family])
            out = mlp(xs[i][None])
            out = (out[0] if isinstance(out, tuple) else out)[0]
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)  # routers compute in fp32
            total_dropped += dropped
    rates = skip_rates(model)
    assert sum(r["skipped"] for r in rates.values()) == total_dropped > 0
    assert all(0 < r["rate"] < 1 for r in rates.values())


# the tiny DeepSeek routers (8 experts in 4 groups) have no valid keep below 8; 16 experts in 4 groups have keep=8
EXPERT_PRUNING = {"deepseek_v2": {"n_routed_experts": 16}, "deepseek_v3": {"n_routed_experts": 16}}


def _valid_keep(adapter):
    return next(k for k in range(adapter.top_k, adapter.num_experts) if adapter.check_keep(k) is None)


@pytest.mark.parametrize("family,layout", [(f, lay) for f in FAMILIES for lay in LAYOUTS[f]])
def test_reduced_checkpoint_loads_stock_and_equals_masked_full_model(family, layout, tmp_path):
    """Expert removal gives a standard checkpoint of the family (stock from_pretrained, config counts updated)
    whose logits equal the full model's with those experts removed from routing by the naive formula."""
    full = make_model(family, **EXPERT_PRUNING.get(family, {})).double()
    adapter = get_adapter(full.config)
    keep, groups = _valid_keep(adapter), adapter.groups()
    kept = {i: random_experts(adapter.num_experts, keep, 0, i, groups) for i in adapter.moe_layer_indices()}
    reduced = copy.deepcopy(full)
    reduce_experts(get_adapter(reduced.config), reduced, kept, {"method": "test"})
    reduced.save_pretrained(tmp_path / "reduced", save_original_format=layout == "per_expert")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "reduced", experts_implementation="eager").double().eval()
    cfg = json.loads((tmp_path / "reduced/config.json").read_text())
    la = get_adapter(loaded.config)
    assert la.num_experts == keep and get_adapter(cfg).num_experts == keep
    for key in adapter.expert_count_keys:  # every count the family reads agrees
        if getattr(loaded.config, key, None) is not None:
            assert getattr(loaded.config, key) == keep, key
    for i in la.moe_layer_indices():
        layer = la.decoder_layers(loaded)[i]
        assert la.expert_weights(layer).num_experts == keep and la.router(layer).num_experts == keep
    # the full model with the dropped experts removed from routing by the naive formula
    for i, ks in kept.items():
        mlp = _mlp(adapter, full, i)
        router_module = adapter.router_module(adapter.decoder_layers(full)[i])
        dropped = [e for e in range(adapter.num_experts) if e not in ks]

        def forward(hidden, mlp=mlp, dropped=dropped):
            x = hidden.reshape(-1, hidden.shape[-1])
            route = naive_route_module(family, full.config, mlp, x, dropped)
            index = torch.tensor([sorted(r) for r in route])
            weights = torch.tensor([[r[e] for e in sorted(r)] for r in route], dtype=x.dtype)
            out = {"logits": None, "weights": weights, "index": index}
            return tuple(out[k] for k in adapter.router_outputs)

        router_module.forward = forward
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, full(ids).logits, rtol=1e-5, atol=1e-5)  # fp32 routers


@pytest.mark.parametrize("family", FAMILIES)
def test_every_weight_method_and_pattern_on_every_family(family):
    """The six weight methods x unstructured / 2:4 on every MoE layer: exact sparsity of the routed experts
    after assembly (in the parameters' own layout), N:M exact, shared experts and dense layers untouched."""
    model, adapter = make_model(family), None
    adapter = get_adapter(model.config)
    layers = adapter.moe_layer_indices()
    source = ResidentSource(model, adapter)
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    inputs, stats = {}, {}
    hidden = embed(source, ids, 2)
    for k in range(max(layers) + 1):
        layer = adapter.decoder_layers(model)[k]
        if k in layers:
            hidden, inputs[k], stats[k] = calibrate_layer(adapter, layer, hidden, source.context(16, k), 2)
        else:
            hidden = torch.cat([layer(hidden[j:j + 2], **source.context(16, k)) for j in range(0, 4, 2)])
    dense_rep = sparsity_report(adapter, model)  # (the embedding's padding row is zero)
    for method in WEIGHT_METHODS:
        for sp in (0.5, "2:4"):
            pattern = Pattern.parse(sp)
            pruned = copy.deepcopy(model)
            for k in layers:
                experts = adapter.expert_weights(adapter.decoder_layers(model)[k])
                experts = experts.to(torch.float32).with_weights(experts.gate_up.detach(), experts.down.detach())
                if method in SPARSEGPT_METHODS:
                    routing = adapter.router(adapter.decoder_layers(model)[k]).route(inputs[k])
                    masks, new, _ = layer_sparsegpt(method, pattern, experts, inputs[k], routing, blocksize=8)
                else:
                    masks, new = layer_masks(method, pattern, experts, stats[k])[0], None
                layer = adapter.decoder_layers(pruned)[k]
                prune_layer(adapter, layer, masks, new)
                if pattern.is_nm:
                    check_layer_nm(adapter, layer, masks, 2, 4)
            rep = sparsity_report(adapter, pruned)
            assert rep["expert_sparsity"] == pytest.approx(0.5, abs=1e-3), (method, sp)
            assert rep["non_expert_sparsity"] == dense_rep["non_expert_sparsity"]  # router, shared experts, attention, dense
            roles = adapter.parameter_roles(pruned)
            before = dict(model.named_parameters())
            for name, p in pruned.named_parameters():
                if roles[name] != "routed" or name.endswith("_bias"):
                    assert torch.equal(p, before[name]), (method, sp, name)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "deepseek_v2"])
def test_group_limited_search_keeps_groups_equal(family):
    model, adapter = _setup(family, **EXPERT_PRUNING.get(family, {}))
    i = adapter.moe_layer_indices()[0]
    layer = adapter.decoder_layers(model)[i]
    x = _moe_inputs(model, adapter, i)
    groups = adapter.groups()
    keep = _valid_keep(adapter)
    loss = BlockLoss([x[:48], x[48:]], adapter.router(layer), adapter.expert_weights(layer))
    res = search(loss, adapter.num_experts, keep, groups=groups)
    assert res["exhaustive"]
    per = keep // len(groups)
    sets = [set(d) for d, _ in res["candidates"]]
    assert all(len(set(g) - d) == per for d in sets for g in groups)  # every candidate keeps `per` of each group
    assert len(sets) == math.comb(len(groups[0]), len(groups[0]) - per) ** len(groups)
    beam = search(loss, adapter.num_experts, keep, max_subsets=1, beam_width=2, groups=groups)
    assert not beam["exhaustive"] and all(len(set(g) & set(beam["kept"])) == per for g in groups)
    assert beam["loss"] >= res["loss"]


@pytest.mark.parametrize("family,overrides", [
    ("qwen3_moe", {"num_experts": 64, "num_experts_per_tok": 8}),
    ("deepseek_v3", {"n_routed_experts": 64, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4}),
])
def test_beam_search_on_64_experts(family, overrides):
    model, adapter = _setup(family, **overrides)
    i = adapter.moe_layer_indices()[0]
    layer = adapter.decoder_layers(model)[i]
    x = _moe_inputs(model, adapter, i, n=4)
    keep = 48
    assert adapter.check_keep(keep) is None
    loss = BlockLoss([x], adapter.router(layer), adapter.expert_weights(layer))
    res = search(loss, 64, keep, max_subsets=1000, beam_width=2, groups=adapter.groups())
    assert not res["exhaustive"] and "beam search" in res["search"] and len(res["kept"]) == keep
    groups = adapter.groups() or [list(range(64))]
    assert all(len(set(g) & set(res["kept"])) == keep // len(groups) for g in groups)
    assert res["loss"] == loss([tuple(res["dropped"])])[0]  # the reported loss is its set's
    # and the search beats keeping the most-selected experts (the frequency baseline, per group)
    frequent = top_experts(adapter.router(layer).route(x).counts(64).tolist(), keep, adapter.groups())
    assert res["loss"] < loss([tuple(e for e in range(64) if e not in frequent)])[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_values_a_grouped_router_cannot_take_are_refused(family):
    adapter = get_adapter(make_model(family).config)
    assert adapter.check_keep(adapter.num_experts) is not None and adapter.check_keep(adapter.top_k - 1) is not None
    if adapter.groups():
        bad = next(k for k in range(adapter.top_k, adapter.num_experts) if k % len(adapter.groups()))
        assert "n_group" in adapter.check_keep(bad)


@pytest.mark.parametrize("family,layout", [(f, lay) for f in FAMILIES for lay in LAYOUTS[f]])
def test_per_layer_reads_from_the_shards_equal_the_loaded_model(family, layout, tmp_path):
    """What per-layer jobs read from the checkpoint (experts, router with its biases) in either on-disk layout
    equals what the loaded model holds."""
    path = save_checkpoint(family, tmp_path / layout, layout)
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    adapter, disk = get_adapter(model.config), get_adapter(load_config(path))
    x = torch.randn(20, model.config.hidden_size)
    for i in adapter.moe_layer_indices():
        layer = adapter.decoder_layers(model)[i]
        ex, got = adapter.expert_weights(layer), read_experts(path, disk, i)
        with torch.no_grad():
            torch.testing.assert_close(got.outputs(x), ex.outputs(x), rtol=0, atol=0)
        r, rd = adapter.router(layer), read_router(path, disk, i)
        torch.testing.assert_close(rd.route(x).weights, r.route(x).weights, rtol=0, atol=0)
        assert torch.equal(rd.route(x).index, r.route(x).index)


FAMILY_WORDS = re.compile(r"mixtral|qwen|olmoe|deepseek|glm4|gpt.?oss|gate_up_proj|down_proj|block_sparse_moe|"
                          r"e_score_correction|(?<!prune)\.shared_experts?\b|shared_expert_gate|act_fn|num_local_experts|n_routed_experts", re.IGNORECASE)


def test_nothing_outside_the_adapters_names_a_family():
    # the memory, GPU and peer benchmarks build checkpoints of named families, as the tests do; they run the library
    # as is (the peer benchmark's random model is Mixtral-shaped, as its issue asks)
    # (and its peer-side driver, run in the peer's venv, names the peer's expert Linear layers)
    builders = {ROOT / "bench/bench_memory.py", ROOT / "bench/bench_gpu_mixtral.py", ROOT / "bench/bench_peers.py",
                ROOT / "bench/peers/llmc_driver.py"}
    files = [p for d in ("pruning", "workflow", "bench") for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".smk")
             and p not in builders and "out" not in p.relative_to(ROOT).parts[1:2]]  # bench/out: ignored outputs
    files.append(ROOT / "Snakefile")
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in files if "models" not in p.relative_to(ROOT).parts[:2]
            for n, line in enumerate(p.read_text().splitlines(), 1) if FAMILY_WORDS.search(line)]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_shared_experts_pruned_on_request_as_an_always_routed_expert(family):
    """prune.shared_experts: the shared MLP's statistics are those of one expert every token reaches with its
    combine weight (1, or Qwen2-MoE's sigmoid gate), and its masks assemble into its gate/up/down weights."""
    model, adapter = _setup(family)
    i = adapter.moe_layer_indices()[0]
    layer = adapter.decoder_layers(model)[i]
    mlp = _mlp(adapter, model, i)
    source = ResidentSource(model, adapter)
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    hidden = embed(source, ids, 2)
    for k in range(i):
        hidden = torch.cat([adapter.decoder_layers(model)[k](hidden[j:j + 2], **source.context(16, k)) for j in range(0, 4, 2)])
    _, x, st = calibrate_layer(adapter, layer, hidden, source.context(16, i), 2)
    shared_mlp = getattr(mlp, "shared_expert", None) or mlp.shared_experts
    want_x2, want_h2 = torch.zeros(x.shape[1], dtype=torch.float64), 0
    for t in range(x.shape[0]):  # per token, from the raw modules
        g = torch.sigmoid(mlp.shared_expert_gate.weight[0] @ x[t]) if family == "qwen2_moe" else 1.0
        h = nn.functional.silu(shared_mlp.gate_proj.weight @ x[t]) * (shared_mlp.up_proj.weight @ x[t])
        want_x2 = want_x2 + (g * x[t]) ** 2
        want_h2 = want_h2 + (g * h) ** 2
    assert int(st["shared.count"][0]) == x.shape[0]
    torch.testing.assert_close(st["shared.gate_up.sum_gx2"][0].double(), want_x2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st["shared.down.sum_gx2"][0].double(), want_h2, rtol=1e-5, atol=1e-6)
    shared = adapter.shared_expert_weights(layer)
    masks, _ = layer_masks("moe_pruner", Pattern.parse("2:4"), shared.to(torch.float32).with_weights(
        shared.gate_up.detach().float(), shared.down.detach().float()), {k[7:]: v for k, v in st.items() if k.startswith("shared.")})
    routed, _ = layer_masks("magnitude", Pattern.parse("2:4"), adapter.expert_weights(layer), None)
    pruned = copy.deepcopy(model)
    player = adapter.decoder_layers(pruned)[i]
    prune_layer(adapter, player, {**routed, **{f"shared.{k}": v for k, v in masks.items()}})
    check_layer_nm(adapter, player, {**routed, **{f"shared.{k}": v for k, v in masks.items()}}, 2, 4)
    pm = _mlp(adapter, pruned, i)
    pshared = getattr(pm, "shared_expert", None) or pm.shared_experts
    inter = shared_mlp.gate_proj.weight.shape[0]
    assert torch.equal(pshared.gate_proj.weight, shared_mlp.gate_proj.weight * masks["gate_up"][0][:inter])
    assert torch.equal(pshared.up_proj.weight, shared_mlp.up_proj.weight * masks["gate_up"][0][inter:])
    assert torch.equal(pshared.down_proj.weight, shared_mlp.down_proj.weight * masks["down"][0])
    rep = sparsity_report(adapter, pruned)
    assert 0 < rep["shared_expert_sparsity"] < 0.5  # half of one layer's shared MLP (the gate stays dense)
