"""Bad params.yaml fails at workflow load with one clear line; no job runs and nothing is written."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pruning.methods import EXPERT_METHODS, WEIGHT_METHODS

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((ROOT / "workflow/schemas/params.schema.yaml").read_text())
MICRO = yaml.safe_load((ROOT / "tests/micro_params.yaml").read_text())
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "1"]


def _dry_run(tmp_path, params):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run(SNAKEMAKE + ["-n"], cwd=tmp_path, capture_output=True, text=True, timeout=300)


def _with(path, value):
    p = yaml.safe_load(yaml.safe_dump(MICRO))
    node = p
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return p


def _save_model(tmp_path, config):
    from transformers import AutoModelForCausalLM

    d = tmp_path / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(d)
    return str(d)


def _dense_model(tmp_path):
    from transformers import LlamaConfig

    return _save_model(tmp_path, LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1))


def _unsupported_moe(tmp_path):
    from transformers import GraniteMoeConfig

    return _save_model(tmp_path, GraniteMoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, num_key_value_heads=1, num_local_experts=4))


CASES = {
    "unknown method": (lambda t: _with("prune.methods", ["wanda", "sparsegptx"]), "prune.methods[1]", "allowed values: " + ", ".join(WEIGHT_METHODS)),
    "sparsity above 1": (lambda t: _with("prune.sparsities", [1.5]), "prune.sparsities[0]", "(0, 1)"),
    "sparsity zero": (lambda t: _with("prune.sparsities", [0]), "prune.sparsities[0]", "(0, 1)"),
    "N >= M": (lambda t: _with("prune.sparsities", ["4:4"]), "prune.sparsities[0]", "0 < N < M"),
    "unknown propagation": (lambda t: _with("prune.propagation", ["lazy"]), "prune.propagation[0]", "dense, sequential"),
    "unknown key": (lambda t: _with("prune.sparsity", 0.5), "prune", "unknown key"),
    "M does not divide the SparseGPT block": (lambda t: _with("prune.sparsities", ["3:5"]), "prune.sparsities[0]", "prune.sparsegpt.blocksize"),
    "zero dampening": (lambda t: _with("prune.sparsegpt", {"blocksize": 16, "dampening": 0}), "prune.sparsegpt.dampening", "out of range"),
    "keep zero": (lambda t: _with("experts.keep", [0]), "experts.keep[0]", "[top_k, num_experts) = [2, 4)"),
    "keep all experts": (lambda t: _with("experts.keep", [4]), "experts.keep[0]", "[top_k, num_experts) = [2, 4)"),
    "keep below top-k": (lambda t: _with("experts.keep", [3, 1]), "experts.keep[1]", "[top_k, num_experts) = [2, 4)"),
    "unknown expert method": (lambda t: _with("experts.methods", ["naee", "magnitude"]), "experts.methods[1]", "allowed values: " + ", ".join(EXPERT_METHODS)),
    "bad base": (lambda t: _with("prune.bases", ["full", "reap-k9"]), "prune.bases[1]", "[top_k, num_experts) = [2, 4)"),
    "unknown base method": (lambda t: _with("skipping.bases", ["wanda-k3"]), "skipping.bases[0]", "allowed: " + ", ".join(EXPERT_METHODS)),
    "skipping with top-1": (lambda t: _with("tiny.arch", {**MICRO["tiny"]["arch"], "top_k": 1}), "skipping.bases", "top_k >= 2"),
    "task file without eval": (lambda t: _with("experts.task", {"source": "notes.txt", "methods": ["naee"], "keep": [3]}), "experts.task.eval", "required"),
    "unknown distill method": (lambda t: _with("distill.methods", ["wandax"]), "distill.methods[0]", "allowed values: " + ", ".join(WEIGHT_METHODS)),
    "distill N >= M": (lambda t: _with("distill.sparsities", ["4:2"]), "distill.sparsities[0]", "0 < N < M"),
    "distill sparsity zero": (lambda t: _with("distill.sparsities", [0.0]), "distill.sparsities[0]", "(0, 1)"),
    "distill lr zero": (lambda t: _with("distill.lr", 0), "distill.lr", "out of range"),
    "distill token mode": (lambda t: _with("distill.expert_tokens", "student_routed"), "distill.expert_tokens", "allowed values: teacher_routed, all"),
    "distill samples below one step": (lambda t: _with("distill.samples", 3), "distill.samples", "batch_size x grad_accum = 4"),
    "distill bad base": (lambda t: _with("distill.bases", ["naee-k4"]), "distill.bases[0]", "[top_k, num_experts) = [2, 4)"),
    "lm_eval tasks": (lambda t: _with("lm_eval.tasks", "all"), "lm_eval.tasks", "allowed: auto, or a list of lm-eval task names"),
    "lm_eval few-shot": (lambda t: _with("lm_eval.num_fewshot", -1), "lm_eval.num_fewshot", "allowed: a few-shot count >= 0"),
    "lm_eval one choice": (lambda t: _with("lm_eval.local", {"num_choices": 1}), "lm_eval.local.num_choices", "out of range"),
    "lm_eval local source": (lambda t: _with("lm_eval.local", {"source": "c4"}), "lm_eval.local.source", "does not match"),
    "missing model path": (lambda t: _with("model.name_or_path", "./no/such/model"), "model.name_or_path", "not a directory"),
    "dense model": (lambda t: _with("model.name_or_path", _dense_model(t)), "model.name_or_path", "dense (non-MoE)"),
    "unsupported MoE": (lambda t: _with("model.name_or_path", _unsupported_moe(t)), "granitemoe", "supported MoE families: deepseek_v2, deepseek_v3, glm4_moe, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_params_fail_early_with_one_line(tmp_path, case):
    make, key, allowed = CASES[case]
    r = _dry_run(tmp_path, make(tmp_path))
    assert r.returncode != 0
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("params.yaml: ") and key in lines[0] and allowed in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) in (["params.yaml"], ["model", "params.yaml"])


def test_valid_micro_params_dry_run(tmp_path):
    r = _dry_run(tmp_path, MICRO)
    assert r.returncode == 0, r.stderr


def test_unquoted_nm_pattern_as_dvc_writes_it(tmp_path):
    """`dvc exp run -S` writes YAML 1.2, where 2:4 needs no quotes; YAML 1.1 would read it as 124."""
    text = yaml.safe_dump(_with("prune.sparsities", ["2:4"])).replace("'2:4'", "2:4")
    assert "- 2:4" in text
    (tmp_path / "params.yaml").write_text(text)
    r = subprocess.run(SNAKEMAKE + ["-n"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "/2of4/" in r.stdout


def test_schema_names_exactly_the_registered_methods():
    """params.yaml's method names are pruning.methods' registries: a method added to one is added to the other."""
    assert SCHEMA["$defs"]["weight_method"]["enum"] == list(WEIGHT_METHODS)
    assert SCHEMA["$defs"]["expert_method"]["enum"] == list(EXPERT_METHODS)


def test_slurm_profile_names_existing_rules(tmp_path):
    """The SLURM profile's per-rule resources and threads name rules the workflow has (a renamed rule would
    silently fall back to the default resources)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(MICRO))
    r = subprocess.run(SNAKEMAKE + ["--list-rules"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rules = set(r.stdout.split())
    profile = yaml.safe_load((ROOT / "workflow/profiles/slurm/config.yaml").read_text())
    named = set(profile["set-resources"]) | set(profile["set-threads"])
    assert named <= rules, sorted(named - rules)
    assert {"calibrate", "mask", "mask_sparsegpt", "distill", "evaluate_ppl", "evaluate_lm_eval"} <= named
