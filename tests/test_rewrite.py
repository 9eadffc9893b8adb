"""Streaming checkpoint rewrites (``pruning.models.rewrite``) against today's in-memory path, on every family and
on-disk layout: masks (with N:M checks), masks with updated weights, and expert removal give byte-equal tensors
to ``load_model`` -> ``prune_layer`` / ``reduce_experts``, the base's key layout, a sparsity report equal to the
model-based one and exact expert-removal savings; sharded bases round-trip with an index; and the rewrite holds
about one tensor in memory (peak RSS of a subprocess on a 200 MB checkpoint)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from families import FAMILIES, LAYOUTS, make_model, save_checkpoint, tiny_tokenizer
from pruning.atomic import save_safetensors
from pruning.experts.baselines import random_experts
from pruning.experts.removal import PRUNED_KEY, expert_saving, reduce_checkpoint, reduce_experts
from pruning.models import get_adapter
from pruning.models.checkpoint import load_config, load_model, parameter_count, read_experts, read_shared_experts
from pruning.models.rewrite import INDEX, SINGLE, rewrite_checkpoint
from pruning.safetensors_io import SafetensorsReader, read_header
from pruning.weights.assemble import prune_layer
from pruning.weights.masks import nm_mask, save_masks
from pruning.weights.sparsity import sparsity_report

ROOT = Path(__file__).resolve().parents[1]
CASES = [(f, lay) for f in FAMILIES for lay in LAYOUTS[f]]
# the tiny DeepSeek routers (8 experts in 4 groups) have no valid keep below 8; 16 experts in 4 groups have keep=8
OVERRIDES = {"deepseek_v2": {"n_routed_experts": 16}, "deepseek_v3": {"n_routed_experts": 16}}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """One tiny checkpoint per family and layout, built once."""
    cache = {}

    def get(family, layout):
        if (family, layout) not in cache:
            d = tmp_path_factory.mktemp(f"{family}-{layout}")
            cache[family, layout] = save_checkpoint(family, d, layout, **OVERRIDES.get(family, {}))
        return cache[family, layout]

    return get


def _keys(path) -> set[str]:
    path = Path(path)
    if (path / INDEX).is_file():
        return set(json.loads((path / INDEX).read_text())["weight_map"])
    return set(read_header(path / SINGLE)[1])


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def _assert_same_state(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    bad = [k for k in want if not _same_bytes(got[k], want[k])]
    assert not bad, bad


def _canonical_shapes(base, adapter, i) -> dict[str, tuple]:
    ex = read_experts(base, adapter, i)
    shapes = {"gate_up": tuple(ex.gate_up.shape), "down": tuple(ex.down.shape)}
    if adapter.has_shared_experts:
        shared, _ = read_shared_experts(base, adapter, i)
        shapes.update({"shared.gate_up": tuple(shared.gate_up.shape), "shared.down": tuple(shared.down.shape)})
    return shapes


def _layer_files(base, tmp, nm: bool, updated: bool, seed=0):
    """Random masks (2:4 along the inputs, or unstructured) and updated weights for every MoE layer, routed and
    shared experts, saved as the mask jobs save them; and the tensors themselves for today's path."""
    adapter = get_adapter(load_config(base))
    g = torch.Generator().manual_seed(seed)
    files, tensors = {"masks": {}, "weights": {}}, {}
    for i in adapter.moe_layer_indices():
        masks, weights = {}, {}
        for name, shape in _canonical_shapes(base, adapter, i).items():
            scores = torch.rand(shape, generator=g)
            masks[name] = (nm_mask(scores.reshape(-1, shape[-1]), 2, 4).reshape(shape) if nm else scores > 0.5)
            if updated:
                weights[name] = torch.randn(shape, generator=g)
        files["masks"][i] = tmp / f"mask_{i}.safetensors"
        save_masks(files["masks"][i], masks, {"layer": i, "method": "test", "fallback_experts": []})
        if updated:
            files["weights"][i] = tmp / f"weights_{i}.safetensors"
            save_safetensors(files["weights"][i], weights, {"layer": i})
        tensors[i] = (masks, weights or None)
    return files, tensors


def _today(base, tensors, dtype="float32"):
    """The in-memory path: load the model, prune every layer, the report."""
    model = load_model(base, dtype)
    adapter = get_adapter(model.config)
    for i, (masks, weights) in tensors.items():
        prune_layer(adapter, adapter.decoder_layers(model)[i], masks, weights)
    return model, sparsity_report(adapter, model)


def _check_pruned(base, out, result, tensors, dtype="float32"):
    model, report = _today(base, tensors, dtype)
    loaded = AutoModelForCausalLM.from_pretrained(out)  # stock transformers, the stored dtype
    _assert_same_state(loaded.state_dict(), model.state_dict())
    assert _keys(out) == _keys(base)
    assert result.sparsity == report
    assert json.dumps(result.sparsity, sort_keys=True) == json.dumps(report, sort_keys=True)
    assert result.unmapped == []


@pytest.mark.parametrize("family,layout", CASES)
def test_masks_equal_todays_path(family, layout, bases, tmp_path):
    """2:4 masks on every MoE layer's routed (and shared) experts, N:M checked while streaming."""
    base = bases(family, layout)
    files, tensors = _layer_files(base, tmp_path, nm=True, updated=False)
    out = tmp_path / "out"
    result = rewrite_checkpoint(base, out, masks=files["masks"], nm=(2, 4), report=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", SINGLE]
    assert (out / "config.json").read_text() == (base / "config.json").read_text()
    _check_pruned(base, out, result, tensors)
    assert 0.5 <= result.sparsity["expert_sparsity"] < 0.51  # (a random init has no zeros)


@pytest.mark.parametrize("family,layout", CASES)
def test_masks_and_updated_weights_equal_todays_path(family, layout, bases, tmp_path):
    """SparseGPT-style: updated weights, then unstructured masks."""
    base = bases(family, layout)
    files, tensors = _layer_files(base, tmp_path, nm=False, updated=True, seed=1)
    result = rewrite_checkpoint(base, tmp_path / "out", masks=files["masks"], weights=files["weights"], report=True)
    _check_pruned(base, tmp_path / "out", result, tensors)


def test_a_wrong_nm_mask_is_refused(bases, tmp_path):
    base = bases("qwen2_moe", "per_expert")
    files, _ = _layer_files(base, tmp_path, nm=False, updated=False)
    with pytest.raises(AssertionError, match="2 of every 4"):
        rewrite_checkpoint(base, tmp_path / "out", masks=files["masks"], nm=(2, 4))
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("family,layout", [("gpt_oss", "fused"), ("deepseek_v3", "per_expert")])
def test_one_layer_masked_and_masks_of_another_shape_refused(family, layout, bases, tmp_path):
    """A layer without a mask file streams through unchanged (and is in the report); a mask whose expert count
    or shape is not the checkpoint's is refused before anything is written."""
    base = bases(family, layout)
    files, tensors = _layer_files(base, tmp_path, nm=False, updated=False)
    last = max(files["masks"])
    result = rewrite_checkpoint(base, tmp_path / "out", masks={last: files["masks"][last]}, report=True)
    _check_pruned(base, tmp_path / "out", result, {last: tensors[last]})
    masks, _ = tensors[last]
    for bad in ({**masks, "gate_up": masks["gate_up"][1:]}, {**masks, "down": masks["down"][..., 4:]}):
        save_masks(tmp_path / "bad.safetensors", bad, {"layer": last})
        with pytest.raises(ValueError, match="shape"):
            rewrite_checkpoint(base, tmp_path / "bad", masks={last: tmp_path / "bad.safetensors"})
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("family,layout", [("gpt_oss", "fused"), ("qwen2_moe", "per_expert"), ("deepseek_v3", "fused")])
def test_bf16_base_stays_bf16(family, layout, tmp_path):
    """Stored dtype kept: masks multiply exactly, fp32 updated weights are cast to bf16 as today's path does."""
    base = tmp_path / "base"
    make_model(family).to(torch.bfloat16).save_pretrained(base, save_original_format=layout == "per_expert")
    files, tensors = _layer_files(base, tmp_path, nm=False, updated=True)
    result = rewrite_checkpoint(base, tmp_path / "out", masks=files["masks"], weights=files["weights"], report=True)
    assert {i.dtype for i in read_header(tmp_path / "out" / SINGLE)[1].values()} == {"BF16"}
    _check_pruned(base, tmp_path / "out", result, tensors, "bfloat16")


def _valid_keep(adapter):
    return next(k for k in range(adapter.top_k, adapter.num_experts) if adapter.check_keep(k) is None)


@pytest.mark.parametrize("family,layout", CASES)
def test_expert_removal_equals_todays_path(family, layout, bases, tmp_path):
    base = bases(family, layout)
    adapter = get_adapter(load_config(base))
    E, keep, groups = adapter.num_experts, _valid_keep(adapter), adapter.groups()
    kept = {i: random_experts(E, keep, 3, i, groups) for i in adapter.moe_layer_indices()}
    assert any(ks != list(range(keep)) for ks in kept.values())
    info = {"method": "test", "calib_id": "c0"}
    model = load_model(base)
    saved, saved_bytes = expert_saving(adapter, model, {i: E - keep for i in kept})
    before = parameter_count(model)
    reduce_experts(get_adapter(model.config), model, kept, info)
    out = tmp_path / "out"
    red = reduce_checkpoint(base, out, kept, info)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    _assert_same_state(loaded.state_dict(), model.state_dict())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg[PRUNED_KEY] == getattr(model.config, PRUNED_KEY) == {
        "original_num_experts": E, "kept": {str(i): kept[i] for i in sorted(kept)}, **info}
    assert get_adapter(cfg).num_experts == keep == get_adapter(loaded.config).num_experts
    assert red["num_experts_before"] == E and red["num_experts_after"] == keep
    assert red["parameters_before"] == before and red["parameters_after"] == parameter_count(loaded) == parameter_count(model)
    assert red["parameters_before"] - red["parameters_after"] == red["parameters_saved_expected"] == saved
    assert red["tensor_bytes_before"] - red["tensor_bytes_after"] == red["tensor_bytes_saved_expected"] == saved_bytes
    assert red["dtype_bytes"] == 4
    # the base's key layout: fused keys all stay; per-expert keys renumbered 0..keep-1, the rest gone
    want = _keys(base)
    if layout == "per_expert":
        gone = {k for i in kept for k in adapter.expert_weight_keys(i)["per_expert"]
                if int(k.split(".experts.")[1].split(".")[0]) >= keep}
        assert gone and gone <= want
        want -= gone
    assert _keys(out) == want


def test_sharded_base_round_trips_with_an_index(tmp_path):
    """Several base shards + index: the output keeps the shards (and an index), splits further at
    max_shard_size, copies the tokenizer; a single-file base written in several shards gets an index."""
    base = tmp_path / "base"
    tok = tiny_tokenizer()
    make_model("qwen2_moe").save_pretrained(base, max_shard_size="100KB")
    tok.save_pretrained(base)
    n_base = len(list(base.glob("*.safetensors")))
    assert n_base > 2 and (base / INDEX).is_file()
    files, tensors = _layer_files(base, tmp_path, nm=False, updated=True)
    out = tmp_path / "out"
    result = rewrite_checkpoint(base, out, masks=files["masks"], weights=files["weights"], report=True)
    assert len(list(out.glob("*.safetensors"))) == n_base and (out / INDEX).is_file()
    index = json.loads((out / INDEX).read_text())
    assert index["weight_map"] == result.weight_map and set(result.weight_map) == _keys(base)
    sizes = {f: sum(i.nbytes for i in read_header(out / f)[1].values()) for f in set(result.weight_map.values())}
    assert index["metadata"]["total_size"] == sum(sizes.values()) == result.tensor_bytes
    _check_pruned(base, out, result, tensors)
    assert AutoTokenizer.from_pretrained(out)("hello world").input_ids == tok("hello world").input_ids
    # a limit below the base's shards splits them; one tensor over the limit gets a shard of its own
    small = tmp_path / "small"
    res = rewrite_checkpoint(base, small, masks=files["masks"], weights=files["weights"], max_shard_size=30_000,
                             report=True)
    assert len(set(res.weight_map.values())) > n_base
    for f in set(res.weight_map.values()):
        infos = list(read_header(small / f)[1].values())
        assert len(infos) == 1 or sum(i.nbytes for i in infos) <= 30_000
        # every tensor starts at a multiple of its element size
        assert all((i.start - infos[0].start) % torch.empty(0, dtype=i.torch_dtype).element_size() == 0 for i in infos)
    _check_pruned(base, small, res, tensors)
    # a single-file base in several output shards
    single = bases_single = tmp_path / "single"
    make_model("mixtral").save_pretrained(single)
    split = rewrite_checkpoint(bases_single, tmp_path / "split", max_shard_size=100_000)
    assert (tmp_path / "split" / INDEX).is_file() and not (tmp_path / "split" / SINGLE).exists()
    _assert_same_state(AutoModelForCausalLM.from_pretrained(tmp_path / "split").state_dict(),
                       AutoModelForCausalLM.from_pretrained(single).state_dict())
    assert split.tensor_bytes == sum(i.nbytes for i in read_header(single / SINGLE)[1].values())


def test_reader_reads_rows_and_ranges(tmp_path):
    t = torch.arange(6 * 5 * 3, dtype=torch.float32).reshape(6, 5, 3)
    b = torch.arange(7, dtype=torch.bfloat16)
    save_safetensors(tmp_path / "a.safetensors", {"t": t, "b": b}, {"what": "test"})
    with SafetensorsReader(tmp_path / "a.safetensors") as r:
        assert torch.equal(r.read("t"), t) and torch.equal(r.read("b"), b)
        assert torch.equal(r.read_rows("t", [0, 2, 3, 5]), t[[0, 2, 3, 5]])
        assert torch.equal(r.read_range("t", 7, 20), t.reshape(-1)[7:27])
        assert torch.equal(torch.cat(list(r.chunks("t", 64))).view(torch.float32), t.reshape(-1))
        with pytest.raises(IndexError):
            r.read_rows("t", [5, 6])


_PEAK = textwrap.dedent("""
    import json, resource, sys
    import torch
    from pruning.models.rewrite import rewrite_checkpoint
    def rss_kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])
    small, big, out = [json.loads(a) for a in sys.argv[1:4]]
    rewrite_checkpoint(small["base"], out + "-warm", masks=small["masks"], weights=small["weights"], nm=(2, 4), report=True)
    try:  # reset the high-water mark to the current RSS
        open("/proc/self/clear_refs", "w").write("5")
        reset = True
    except OSError:
        reset = False
    base_kb = rss_kb("VmRSS:") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rewrite_checkpoint(big["base"], out, masks=big["masks"], weights=big["weights"], nm=(2, 4), report=True)
    peak_kb = rss_kb("VmHWM:") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth": (peak_kb - base_kb) * 1024, "reset": reset}))
""")


def test_peak_memory_is_about_one_tensor(tmp_path):
    """A 200 MB single-file checkpoint (16 MB expert tensors) rewritten with masks on every layer, updated
    weights on two, N:M checks and the report in a subprocess: its peak RSS grows by less than 3 tensors."""
    big = save_checkpoint("mixtral", tmp_path / "big", "fused", hidden_size=256, intermediate_size=2048,
                          num_local_experts=4, num_hidden_layers=8)
    infos = read_header(big / SINGLE)[1].values()
    largest, total = max(i.nbytes for i in infos), sum(i.nbytes for i in infos)
    assert largest == 16 * 2**20 and total > 190 * 2**20
    small = save_checkpoint("mixtral", tmp_path / "small", "fused")
    args = []
    for name, base, updated in (("small", small, (0, 1)), ("big", big, (2, 5))):
        (tmp_path / name / "files").mkdir()
        files, _ = _layer_files(base, tmp_path / name / "files", nm=True, updated=True)
        args.append(json.dumps({"base": str(base), "masks": {i: str(p) for i, p in files["masks"].items()},
                                "weights": {i: str(p) for i, p in files["weights"].items() if i in updated}}))
    run = subprocess.run([sys.executable, "-c", _PEAK, *args, json.dumps(str(tmp_path / "out"))], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["growth"] < 3 * largest, (got, largest, total)
    assert sum(i.nbytes for i in read_header(tmp_path / "out" / SINGLE)[1].values()) == total
