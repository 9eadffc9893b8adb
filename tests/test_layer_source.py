"""Layers from the shards (``ShardSource``) against the model loaded whole, for every family and on-disk layout:
the same tensors, the same calibration statistics, the same perplexity, skip rates and expert usage; and the
choice between them (``model.offload``), and lm-eval's big-model placement with disk offload."""
import json

import pytest
import torch
from families import FAMILIES, LAYOUTS, save_checkpoint

from pruning.calib.stream import run_layers, stream
from pruning.eval.perplexity import perplexity
from pruning.eval.usage import count_expert_calls
from pruning.experts import skipping
from pruning.models import layer_source
from pruning.models.checkpoint import load_model
from pruning.models.layer_source import ResidentSource, ShardSource, load_placed, open_source, should_offload

CASES = [(f, layout) for f in FAMILIES for layout in LAYOUTS[f]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {(f, layout): save_checkpoint(f, root / f"{f}-{layout}", layout=layout) for f, layout in CASES}


def _materialised(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.device.type != "meta"}


@pytest.mark.parametrize("family,layout", CASES)
def test_shard_layers_equal_the_loaded_model(checkpoints, family, layout):
    d = checkpoints[family, layout]
    model = load_model(d)
    src = ShardSource(d)
    n = src.adapter.num_layers
    outer = _materialised(src.model)
    assert outer and not any(".layers." in k for k in outer)  # only embeddings, final norm, LM head
    for i in range(n):
        buffers = [id(b) for b in src.adapter.decoder_layers(src.model)[i].buffers()]
        with src.layer(i) as layer:
            got, want = layer.state_dict(), model.model.layers[i].state_dict()
            assert got.keys() == want.keys()
            for k in want:
                assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (i, k)
            assert {k for k in _materialised(src.model) if ".layers." in k} == {f"model.layers.{i}.{k}"
                                                                                 for k, _ in layer.named_parameters()}
        assert _materialised(src.model) == outer  # emptied again
        # and its buffers are the skeleton's again: one read from the shards (DeepSeek's selection bias) can be a
        # view of the shard's memory map, which kept every page read for the layer resident (RSS grew per layer)
        assert [id(b) for b in src.adapter.decoder_layers(src.model)[i].buffers()] == buffers
    tokens = torch.randint(1, 300, (5, 12))
    res = ResidentSource(model)
    from pruning.calib.stream import embed

    logits = {type(s).__name__: s.head(run_layers(s, embed(s, tokens, 2), 0, n, 2)) for s in (res, src)}
    assert torch.equal(logits["ResidentSource"], logits["ShardSource"])
    torch.testing.assert_close(logits["ShardSource"], model(tokens).logits, rtol=1e-5, atol=1e-5)
    # calibration statistics: identical, layer by layer
    got = {i: (x, st) for i, x, st in stream(src, src.adapter, tokens, 2, progress=False)}
    for i, x, st in stream(res, res.adapter, tokens, 2, progress=False):
        assert torch.equal(x, got[i][0])
        assert st.keys() == got[i][1].keys() and all(torch.equal(st[k], got[i][1][k]) for k in st), i


@pytest.fixture
def registered():
    """skipping.register() for one test: the Auto mapping's extra entries are put back afterwards."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    before = dict(MODEL_FOR_CAUSAL_LM_MAPPING._extra_content)
    skipping.register()
    yield
    MODEL_FOR_CAUSAL_LM_MAPPING._extra_content.clear()
    MODEL_FOR_CAUSAL_LM_MAPPING._extra_content.update(before)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_streamed_perplexity_skipping_and_usage_equal_resident(checkpoints, family, tmp_path, registered):
    src_dir = checkpoints[family, LAYOUTS[family][-1]]
    d = tmp_path / "skip"
    d.mkdir()
    for f in src_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    res = open_source(d, offload="never")
    cfg["betas"] = {str(i): 0.6 for i in res.adapter.moe_layer_indices()}
    (d / "config.json").write_text(json.dumps(cfg))
    windows = torch.randint(1, 300, (9, 20))
    out = {}
    for mode in ("never", "always"):
        s = open_source(d, offload=mode)
        assert isinstance(s, ShardSource) == (mode == "always")
        with count_expert_calls(s.adapter, s.model) as usage:
            ppl = perplexity(s, windows, batch_size=4)
        out[mode] = (ppl, usage.summary(), skipping.skip_rates(s.model))
    assert out["never"][2] and out["never"][2] == out["always"][2]  # skipping really happened, the same way
    assert out["never"][1] == out["always"][1]
    assert out["always"][0] == pytest.approx(out["never"][0], rel=1e-6)
    # several groups of windows (each layer read once per group) give the same sums
    s = ShardSource(d)
    one = layer_source_nll(s, windows, group=None)
    three = layer_source_nll(s, windows, group=3)
    assert one[1] == three[1] and one[0] == pytest.approx(three[0], rel=1e-6)  # batch composition differs


def layer_source_nll(source, windows, group):
    from pruning.eval.perplexity import streamed_nll

    return streamed_nll(source, windows, batch_size=2, group=group)


def test_offload_choice(checkpoints, monkeypatch):
    d = checkpoints["mixtral", "fused"]
    size = layer_source.model_bytes(d, "float32")
    assert size == sum(p.numel() * 4 for p in load_model(d).parameters())
    assert layer_source.model_bytes(d, "bfloat16") == size // 2
    monkeypatch.setattr(layer_source, "free_bytes", lambda device="cpu": 2 * size)  # fits, but not with headroom
    assert should_offload(d, "float32", "cpu", "auto")
    assert not should_offload(d, "bfloat16", "cpu", "auto")
    assert not should_offload(d, "float32", "cpu", "never") and should_offload(d, "float32", "cpu", "always")
    assert isinstance(open_source(d, "float32", "cpu", "auto"), ShardSource)
    with pytest.raises(ValueError, match="model.offload: 'sometimes' is not one of auto, never, always"):
        should_offload(d, "float32", "cpu", "sometimes")


def test_cgroup_limit_bounds_free_memory(monkeypatch):
    monkeypatch.setattr(layer_source, "_cgroup_limit", lambda: 1 << 30)
    assert layer_source.free_bytes("cpu") <= 1 << 30


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_lm_eval_placement_offloads_to_disk_with_equal_logits(checkpoints, family, tmp_path):
    d = checkpoints[family, LAYOUTS[family][-1]]
    resident = load_placed(d, offload="never")
    assert not hasattr(resident, "hf_device_map") or not resident.hf_device_map
    placed = load_placed(d, offload="always", offload_folder=tmp_path / "offload")
    assert "disk" in set(placed.hf_device_map.values())
    assert any((tmp_path / "offload").iterdir())
    tokens = torch.randint(1, 300, (2, 16))
    assert torch.equal(placed(tokens).logits, resident(tokens).logits)
