"""A model's identity: the pattern's spellings, a Variant's path, id, label and metric key (hand-written
examples), and the sweep a params file asks for."""
from pathlib import Path

import pytest
import yaml

from pruning.sweep import Sweep
from pruning.variant import Variant, base_name, calib_id, parse_base
from pruning.weights.pattern import Pattern

ROOT = Path(__file__).resolve().parents[1]
MICRO = yaml.safe_load((ROOT / "tests/micro_params.yaml").read_text())


@pytest.mark.parametrize("value,token,label,key,kind,target", [
    (0.5, "0.5", "50%", "sp50", "unstructured", 0.5),
    ("0.6", "0.6", "60%", "sp60", "unstructured", 0.6),
    (0.625, "0.625", "62%", "sp62_5", "unstructured", 0.625),
    ("2:4", "2of4", "2:4", "2of4", "2:4", 0.5),
    ("4of8", "4of8", "4:8", "4of8", "4:8", 0.5),
])
def test_pattern_spellings(value, token, label, key, kind, target):
    p = Pattern.parse(value)
    assert (p.token, p.label, p.metric_key, p.kind, p.target) == (token, label, key, kind, target)
    assert Pattern.parse(p.token) == p  # the path token reads back


def test_whole_models():
    full, naee, skip = Variant("tiny"), Variant("tiny", "naee-k6"), Variant("tiny", "naee-k4-task", skip=True)
    assert [v.path for v in (full, naee, skip)] == ["full", "naee-k6", "naee-k4-task/skip"]
    assert [v.id for v in (full, naee, skip)] == ["full", "naee-k6", "naee-k4-task/skip"]
    assert [v.key for v in (full, naee, skip)] == ["full", "naee-k6", "naee-k4-task_skip"]
    assert [v.label() for v in (full, naee, skip)] == [
        "dense", "NAEE (layerwise), keep 6", "NAEE (layerwise), keep 4 (task calibration) + skipping"]
    assert Variant("tiny", "full", skip=True).label() == "dense + skipping"
    assert full.checkpoint("results/tiny/base") == "results/tiny/base"
    assert naee.checkpoint("results/tiny/base") == "results/tiny/naee-k6/checkpoint"
    assert skip.file("betas") == "results/tiny/naee-k4-task/skip/betas.json"


def test_weight_pruned_and_tuned_models():
    v = Variant("tiny", "naee-k6", calib="builtin-n64-l256-s0", prop="dense", method="moe_pruner", sp="0.5")
    kd = v.replace(tune="kd")
    assert v.path == "naee-k6/builtin-n64-l256-s0/dense/moe_pruner/0.5" and v.id == "naee-k6/dense/moe_pruner/0.5"
    assert kd.dir == "results/tiny/naee-k6/builtin-n64-l256-s0/dense/moe_pruner/0.5/kd"
    assert kd.file("ppl") == kd.dir + "/eval/ppl.json" and kd.untuned == v and kd.whole_base == Variant("tiny", "naee-k6")
    assert v.key == "naee-k6_dense_moe_pruner_sp50" and kd.key == "naee-k6_dense_moe_pruner_sp50_kd"
    assert v.method_label == "MoE-Pruner on NAEE (layerwise), keep 6"
    assert v.label() == "MoE-Pruner 50% on NAEE (layerwise), keep 6"
    assert kd.label(show_prop=True) == "MoE-Pruner 50% on NAEE (layerwise), keep 6 (dense) + expert-wise KD"
    nm = Variant("tiny", calib="c", prop="sequential", method="sparsegpt_gate_weighted", sp="2of4", tune="ce")
    assert nm.label() == "router-weighted SparseGPT 2:4 + CE-only control" and nm.key == "full_sequential_sparsegpt_gate_weighted_2of4_ce"
    for x in (v, kd, nm, Variant("tiny", "reap-k4", skip=True)):
        assert Variant.from_path("tiny", x.path) == x
    # the workflow's path patterns are Variants of wildcards
    assert Variant("tiny", "{base}", calib="c", prop="{prop}", method="{method}", sp="{sp}").dir == \
        "results/tiny/{base}/c/{prop}/{method}/{sp}"


def test_base_names_and_calibration_ids():
    assert base_name("naee", 4, task=True) == "naee-k4-task" and parse_base("naee-k4-task") == ("naee", 4, True)
    assert parse_base("naee_progressive-k6") == ("naee_progressive", 6, False) and parse_base("full") is None
    with pytest.raises(ValueError):
        parse_base("naee-6")
    calib = {"source": "builtin:encodings", "nsamples": 64, "seqlen": 256}
    assert calib_id(calib, 0) == "builtin.encodings-n64-l256-s0"
    assert calib_id({**calib, "source": "data/notes.txt"}, 1).startswith("notes-")


def test_sweep_of_the_micro_params():
    s = Sweep({**MICRO, "distill": {"propagation": ["dense"], **MICRO["distill"]}})  # the schema's default filled in
    assert s.cid == "builtin-n8-l32-s0" and s.task_cid == "builtin.asyncio-n8-l32-s0" and s.tunes == ["kd", "ce"]
    assert s.expert_bases() == ["naee-k3", "naee_progressive-k3", "frequency-k3", "random-k3", "naee-k3-task"]
    models = s.summary_models()
    assert models[0].path == "full" and len(models) == len(set(models))
    whole = [v.id for v in models if not v.weight_pruned]
    assert whole == ["full", "naee-k3", "naee_progressive-k3", "frequency-k3", "random-k3", "naee-k3-task",
                     "full/skip", "naee-k3/skip"]
    weights = [v for v in models if v.weight_pruned and not v.tune]
    assert len(weights) == 2 * 2 * 2  # bases x propagations x methods at one pattern; the distilled ones among them
    assert [v.id for v in models if v.tune] == [f"{b}/dense/moe_pruner/2of4/{t}" for b in ("full", "naee-k3") for t in ("kd", "ce")]
    assert [v.id for v, ds in s.evaluations() if ds == "task_ppl"] == ["full", "naee-k3", "naee-k3-task"]
