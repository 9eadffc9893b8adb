"""Shard reading, the assembled checkpoint, and token perplexity against naive computations."""
import math

import torch
from transformers import AutoModelForCausalLM

from pruning.models import get_adapter
from pruning.weights.assemble import apply_layer_masks
from pruning.weights.sparsity import nm_zero_counts, sparsity_report
from pruning.models.checkpoint import load_config, read_experts
from pruning.eval.perplexity import perplexity, unigram_perplexity
from pruning.weights.pattern import Pattern
from pruning.weights.prune import layer_masks


def test_read_expert_weights_from_shards(tiny_mixtral, tmp_path):
    tiny_mixtral.save_pretrained(tmp_path, max_shard_size="100KB")  # several shards, original key layout
    assert (tmp_path / "model.safetensors.index.json").exists()
    adapter = get_adapter(load_config(tmp_path))
    for i in (0, 1):
        got = read_experts(tmp_path, adapter, i)
        ex = tiny_mixtral.model.layers[i].mlp.experts
        assert torch.equal(got.gate_up, ex.gate_up_proj.detach()) and torch.equal(got.down, ex.down_proj.detach())


def test_pruned_checkpoint_loads_with_exact_sparsity(tmp_path):
    from conftest import make_tiny_mixtral

    for pattern in (Pattern.parse(0.5), Pattern.parse("2:4")):
        model = make_tiny_mixtral()
        adapter = get_adapter(model.config)
        for i in (0, 1):
            masks, _ = layer_masks("magnitude", pattern, adapter.expert_weights(model.model.layers[i]).to(torch.float32), None)
            apply_layer_masks(adapter, model.model.layers[i], masks)
        rep = sparsity_report(adapter, model)
        assert rep["expert_sparsity"] == 0.5 and rep["non_expert_sparsity"] == 0.0
        assert all(v == 0.5 for layer in rep["layers"].values() for e in layer["experts"] for v in e.values())
    out = tmp_path / "ckpt"
    model.save_pretrained(out)
    back = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    for i in (0, 1):
        ex = back.model.layers[i].mlp.experts
        assert (nm_zero_counts(ex.gate_up_proj, 4) == 2).all() and (nm_zero_counts(ex.down_proj, 4) == 2).all()
        assert torch.equal(ex.gate_up_proj, model.model.layers[i].mlp.experts.gate_up_proj)
    torch.testing.assert_close(back.model.layers[0].mlp.gate.weight, model.model.layers[0].mlp.gate.weight)


def test_token_perplexity_matches_per_token_loop(tiny_mixtral):
    windows = torch.randint(0, 64, (3, 10))
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            for t in range(1, w.numel()):  # predict token t from tokens < t, one prefix at a time
                logits = tiny_mixtral(input_ids=w[None, :t]).logits[0, -1]
                nll -= torch.log_softmax(logits.double(), -1)[w[t]].item()
                n += 1
    assert math.isclose(perplexity(tiny_mixtral, windows, batch_size=2), math.exp(nll / n), rel_tol=1e-5)


def test_unigram_perplexity_hand_example():
    train = torch.tensor([0, 0, 0, 1])  # add-one counts: 4, 2, 1 over vocab 3 -> p = 4/7, 2/7, 1/7
    windows = torch.tensor([[2, 0, 1]])  # predicted: 0, 1
    expected = math.exp(-(math.log(4 / 7) + math.log(2 / 7)) / 2)
    assert math.isclose(unigram_perplexity(train, windows, 3), expected, rel_tol=1e-9)


def test_windows_are_non_overlapping_and_capped_evenly():
    from pruning.data.sources import windows

    stream = torch.arange(103)
    w = windows(stream, 10)
    assert w.shape == (10, 10) and torch.equal(w.flatten(), torch.arange(100))
    capped = windows(stream, 10, max_windows=4)
    assert [int(r[0]) for r in capped] == [0, 30, 60, 90]  # spread over the split, not its prefix
