"""The whole DAG on a micro config for every family: a tiny random checkpoint of each MoE family (tests/families.py,
the hub's per-expert layout where the family has one) as ``model.name_or_path``, run end to end by Snakemake in a
temp dir: calibration on the built-in corpus, 2:4 weight pruning (router-weighted SparseGPT with dense and
sequential propagation; MoE-Pruner, a score method, for the distilled variant; shared experts too where the family
has them), NAEE expert pruning, dynamic skipping, distillation of one variant, perplexity and lm-eval on the local
tasks, and the report. 37 jobs per family (the other methods run on every family in test_families.py)."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from families import FAMILIES, LAYOUTS, moe_layers, save_checkpoint, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--resources", "gpu=2", "--cores", "2"]
MICRO = yaml.safe_load((ROOT / "tests/micro_params.yaml").read_text())

# Experts kept per layer: top_k <= keep < E, and for group-limited routers a multiple of n_group whose groups still
# hold top_k experts in topk_group groups (and >= 2 per group where groups are scored by their top-2 sum). The tiny
# deepseek configs (8 experts in n_group 4, topk_group 2) have no valid keep below 8: deepseek_v2 (top-3) needs
# 2 per group, deepseek_v3 (top-2 sum) as well. So both are built with 2 groups of 4, routing within 1 group
# (still group-limited): deepseek_v2 keeps 6 (3 per group for its top-3), deepseek_v3 keeps 4 (2 per group).
KEEP = {"mixtral": 3, "qwen2_moe": 6, "qwen3_moe": 6, "olmoe": 6, "deepseek_v2": 6, "deepseek_v3": 4, "glm4_moe": 4,
        "gpt_oss": 6}
OVERRIDES = {"deepseek_v2": {"n_group": 2, "topk_group": 1}, "deepseek_v3": {"n_group": 2, "topk_group": 1}}
METHODS = ["sparsegpt_gate_weighted"]  # a SparseGPT method; the distilled variant brings a score method
PROPS = ["dense", "sequential"]
PRUNED = [(p, m) for p in PROPS for m in METHODS] + [("dense", "moe_pruner")]  # (propagation, method) variants
EXPERT_METHODS = ["naee"]
SHARED = {"qwen2_moe", "deepseek_v2", "deepseek_v3", "glm4_moe"}  # families with shared experts
CALIB = {"source": "builtin", "nsamples": 8, "seqlen": 32, "batch_size": 4}
CID = "builtin-n8-l32-s0"
LOCAL_TASKS = ["code_next_line", "code_rolling"]  # 'auto' means the papers' hub tasks for an external model
DENSE_FIRST = {"qwen2_moe", "deepseek_v2", "deepseek_v3", "glm4_moe"}  # tiny configs whose layer 0 is a dense MLP


def family_params(family: str, checkpoint: Path) -> dict:
    p = yaml.safe_load(yaml.safe_dump(MICRO))
    p["model"] = {"name": family, "name_or_path": str(checkpoint), "dtype": "float32", "trust_remote_code": False}
    p["calib"] = dict(CALIB)
    p["prune"] = {"methods": METHODS, "sparsities": ["2:4"], "propagation": PROPS, "bases": ["full"],
                  "sparsegpt": {"blocksize": 16, "dampening": 0.01}, "shared_experts": family in SHARED}
    p["experts"] = {"methods": EXPERT_METHODS, "keep": [KEEP[family]], "task": None}
    p["skipping"] = {"bases": ["full"]}
    p["distill"] = {"methods": ["moe_pruner"], "sparsities": ["2:4"], "bases": ["full"], "propagation": ["dense"],
                    "samples": 8, "seqlen": 32, "epochs": 1, "lr": 1.0e-3, "batch_size": 4, "checkpoint_every": 1,
                    "ce_control": False}
    p["eval"] = {"dataset": "builtin", "seqlen": 32, "max_windows": 8, "batch_size": 8}
    p["lm_eval"] = {"tasks": LOCAL_TASKS, "batch_size": 8, "max_length": 128, "bootstrap_iters": 10,
                    "local": {"next_line_items": 8, "context_lines": 2, "rolling_docs": 2}}
    p["artifacts"] = {"keep_pruned_checkpoints": True}
    p["report"] = {"update_readme": False}
    return p


def _stock(path):
    """Stock transformers, no options: every tensor of the checkpoint loads into the model and none is missing."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, output_loading_info=True)
    assert not any(info.values()), (path, info)
    return model.eval()


def _layer_indices(directory: Path, pattern: str) -> set[int]:
    return {int(f.name.split(".")[0].split("_")[1]) for f in directory.glob(pattern)}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_dag(family, tmp_path):
    layout = "per_expert" if "per_expert" in LAYOUTS[family] else "fused"
    ckpt = save_checkpoint(family, tmp_path / "input", layout=layout, seed=0, tokenizer=tiny_tokenizer(300),
                           **OVERRIDES.get(family, {}))
    work = tmp_path / "run"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(family_params(family, ckpt)))
    r = subprocess.run(SNAKEMAKE, cwd=work, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    check_outputs(family, layout, ckpt, work)


def check_outputs(family, layout, ckpt, work):
    from pruning.models import get_adapter

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:  # the input is in the hub's layout
        assert any(".experts.0." in k for k in f.keys()) == (layout == "per_expert")
    dense = _stock(ckpt)
    adapter = get_adapter(dense.config)
    layers = moe_layers(dense)
    assert adapter.moe_layer_indices() == layers and (0 not in layers) == (family in DENSE_FIRST)
    keep, num_experts = KEEP[family], adapter.num_experts
    assert adapter.check_keep(keep) is None

    res = work / f"results/{family}"
    variants = res / f"full/{CID}"
    # the workflow's MoE layers are the family's: calibration, masks and per-layer searches only for those
    calib = res / f"full/calib/{CID}/dense"
    assert _layer_indices(calib, "layer_*.stats.safetensors") == set(layers)
    assert _layer_indices(calib, "layer_*.inputs.safetensors") == set(layers)
    assert _layer_indices(res / f"search/{CID}/k{keep}", "layer_*.json") == set(layers)
    for prop, method in PRUNED:
        v = variants / prop / method / "2of4"
        assert _layer_indices(v / "masks", "layer_*.safetensors") == set(layers), (prop, method)
        if prop == "sequential":
            assert _layer_indices(v / "seqcalib", "layer_*.stats.safetensors") == set(layers)

    # weight-pruned checkpoints: stock transformers loads them; routed experts exactly 2:4 along the input dim
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    for prop, method in PRUNED:
        model = _stock(variants / prop / method / "2of4/checkpoint")
        for i in layers:
            layer, orig_layer = model.model.layers[i], dense.model.layers[i]
            ex, orig = adapter.expert_weights(layer), adapter.expert_weights(orig_layer)
            pairs = [("gate_up", ex.gate_up, orig.gate_up), ("down", ex.down, orig.down)]
            if family in SHARED:  # prune.shared_experts: the shared MLP is 2:4 as well
                sh, sh0 = adapter.shared_expert_weights(layer), adapter.shared_expert_weights(orig_layer)
                pairs += [("shared gate_up", sh.gate_up, sh0.gate_up), ("shared down", sh.down, sh0.down)]
            for name, w, w0 in pairs:
                assert w.shape == w0.shape
                zeros = (w.reshape(*w.shape[:-1], -1, 4) == 0).sum(-1)
                assert (zeros == 2).all(), (prop, method, i, name, zeros.unique())
                if method == "moe_pruner":  # a score method only zeroes weights
                    assert torch.equal(w, w0 * (w != 0)), (prop, i, name)
            assert ex.num_experts == num_experts
            assert (adapter.router(layer).weight != 0).all()  # the router stays dense
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids).logits).all()
        sp = json.loads((variants / prop / method / "2of4/sparsity.json").read_text())
        assert sp["expert_sparsity"] == 0.5 and sp["non_expert_sparsity"] < 0.01
        if family in SHARED:  # half of the shared MLPs (Qwen2-MoE's sigmoid gate stays dense)
            assert 0.49 < sp["shared_expert_sparsity"] <= 0.5, sp["shared_expert_sparsity"]

    # expert-pruned checkpoints: stock transformers loads them with `keep` experts in config and weights
    for method in EXPERT_METHODS:
        d = res / f"{method}-k{keep}"
        model = _stock(d / "checkpoint")
        a = get_adapter(model.config)
        assert a.num_experts == keep and a.moe_layer_indices() == layers, method
        kept = json.loads((d / "search.json").read_text())["layers"]
        assert set(kept) == {str(i) for i in layers}
        for i in layers:  # the kept experts' weights and router rows, unchanged
            layer, idx = model.model.layers[i], torch.tensor(kept[str(i)]["kept"])
            ex, orig = a.expert_weights(layer), adapter.expert_weights(dense.model.layers[i])
            assert ex.gate_up.shape[0] == ex.down.shape[0] == a.router(layer).weight.shape[0] == keep == len(idx)
            assert torch.equal(ex.gate_up, orig.gate_up[idx]) and torch.equal(ex.down, orig.down[idx]), (method, i)
            assert torch.equal(a.router(layer).weight, adapter.router(dense.model.layers[i]).weight[idx]), (method, i)
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids).logits).all()
        red = json.loads((d / "reduction.json").read_text())
        assert red["num_experts_before"] == num_experts and red["num_experts_after"] == keep
        assert red["parameters_saved"] == red["parameters_saved_expected"] > 0
        ev = json.loads((d / "eval/ppl.json").read_text())
        assert ev["num_experts"] == keep

    # dynamic skipping on the full model: a skip rate in (0, 1) on every MoE layer
    ev = json.loads((res / "full/skip/eval/ppl.json").read_text())
    assert set(ev["skipping"]) == {str(i) for i in layers}
    assert all(0 < v["rate"] < 1 for v in ev["skipping"].values()), ev["skipping"]

    # distillation of one variant
    kd = variants / "dense/moe_pruner/2of4/kd"
    history = (kd / "history.csv").read_text().splitlines()
    assert history[0].startswith("step,") and len(history) >= 3  # header + 2 steps (8 samples / batch 4, 1 epoch)
    info = json.loads((kd / "distill.json").read_text())
    assert info["steps"] == 2 and info["expert_sparsity"] == 0.5
    _stock(kd / "checkpoint")

    # the summary and the perplexity metrics: every model with finite perplexities and lm-eval results
    summary = json.loads((work / "metrics/summary.json").read_text())
    rows = summary["variants"]
    whole = ["full", f"naee-k{keep}", "full_skip"]
    pruned = [f"full_{p}_{m}_2of4" for p, m in PRUNED]
    assert set(rows) == set(whole + pruned + ["full_dense_moe_pruner_2of4_kd"])
    for key, row in rows.items():
        assert _finite(row["token_ppl"]) and row["token_ppl"] > 1, key
        assert _finite(row["word_perplexity"]) and row["word_perplexity"] > 1, key
        assert 0 <= row["acc"]["code_next_line"] <= 1, key
    assert rows[f"naee-k{keep}"]["experts_kept"] == keep and rows["full"]["experts_kept"] == num_experts
    ppl = json.loads((work / "metrics/ppl.json").read_text())
    assert _finite(ppl["unpruned"]["token_ppl"])
    for prop in PROPS:  # the sweep's methods (the distilled variant's base is in the summary above)
        for method in METHODS:
            assert _finite(ppl[prop][method]["2of4"]["token_ppl"]), (prop, method)
    with open(work / "metrics/summary.csv") as f:
        assert [row["id"] for row in csv.DictReader(f)][0] == "full"
    assert "MoE-Pruner" in (work / "metrics/results.md").read_text()
