"""End to end: the whole DAG on the micro config in a temp dir, then its rerun semantics."""
import hashlib
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pruning.weights.masks import load_masks

ROOT = Path(__file__).resolve().parents[1]
# The workflow runs from a copy of its code inside each run directory (code/), so that a test can edit a module
# or a script and ask Snakemake what reruns without touching the repository.
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", "code/Snakefile", "--resources", "gpu=2", "--cores", "2"]
MICRO = yaml.safe_load((ROOT / "tests/micro_params.yaml").read_text())
MICRO["artifacts"]["keep_pruned_checkpoints"] = True
VARIANTS = "results/micro/full/builtin-n8-l32-s0"
CALIB = "results/micro/full/calib/builtin-n8-l32-s0/dense"


def copy_code(workdir):
    import shutil

    (workdir / "code").mkdir()
    shutil.copy2(ROOT / "Snakefile", workdir / "code/Snakefile")
    for name in ("workflow", "pruning"):
        shutil.copytree(ROOT / name, workdir / "code" / name, ignore=shutil.ignore_patterns("__pycache__"))


def smk(workdir, *args, timeout=1200, env=None):
    r = subprocess.run(SNAKEMAKE + list(args), cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def planned_jobs(workdir, params) -> dict:
    """Job counts per rule of a dry run with ``params`` (passed as an extra configfile, nothing edited)."""
    (workdir / "changed.yaml").write_text(yaml.safe_dump(params))
    out = smk(workdir, "-n", "--configfile", "changed.yaml")
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    copy_code(d)
    (d / "params.yaml").write_text(yaml.safe_dump(MICRO))
    smk(d)
    return d


def test_outputs_and_metrics(run):
    metrics = json.loads((run / "metrics/ppl.json").read_text())
    assert metrics["unpruned"]["token_ppl"] > 1
    for base, prop, method in itertools.product(("full", "naee-k3"), ("dense", "sequential"), MICRO["prune"]["methods"]):
        sp = "2of4"
        v = run / f"results/micro/{base}/builtin-n8-l32-s0" / prop / method / sp
        key = method if base == "full" else f"{method}@{base}"
        assert metrics[prop][key][sp]["token_ppl"] > 1
        err = json.loads((v / "eval/block_error.json").read_text())
        assert 0 < err["mean"] < 1 and set(err["relative_block_error"]) == {"0", "1"}
        rep = json.loads((v / "sparsity.json").read_text())
        assert rep["expert_sparsity"] == 0.5 and rep["non_expert_sparsity"] == 0.0
        for layer in (0, 1):
            masks, meta = load_masks(v / f"masks/layer_{layer}.safetensors")
            assert meta["method"] == method and meta["propagation"] == prop and len(meta["stats_sha256"]) == 64
            for m in masks.values():
                assert (~m).sum().item() == m.numel() // 2
    table = (run / "metrics/results.md").read_text()
    assert "MoE-Pruner" in table and "router-weighted SparseGPT" in table and "2:4" in table
    assert "MoE-block output error" in table and "Input-channel norms" in table
    base = json.loads((run / "results/micro/base_report.json").read_text())
    assert base["validation_ppl"] > 1 and base["unigram_ppl"] > 1
    manifest = json.loads((run / "data/builtin/manifest.json").read_text())
    assert sum(s["n_files"] for s in manifest["splits"].values()) > 0 and len(manifest["splits"]["test"]["sha256"]) == 64
    for rule_log in ("full/calib/builtin-n8-l32-s0/calibrate.log", "train_tiny.log", "full/builtin-n8-l32-s0/dense/moe_pruner/2of4/mask_1.log"):
        assert (run / "results/micro/logs" / rule_log).stat().st_size > 0, rule_log
    assert (run / "results/micro/benchmarks/full/calib/builtin-n8-l32-s0/calibrate.tsv").exists()


def test_assembled_checkpoint_is_standard_hf(run):
    from transformers import AutoModelForCausalLM

    from pruning.weights.sparsity import nm_zero_counts

    for method in MICRO["prune"]["methods"]:
        model = AutoModelForCausalLM.from_pretrained(run / VARIANTS / f"dense/{method}/2of4/checkpoint", use_safetensors=True)
        for layer in model.model.layers:
            for w in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                assert (nm_zero_counts(w, 4) == 2).all(), method  # exactly N zeros in every group of M
            assert (layer.mlp.gate.weight != 0).all()  # router stays dense
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_sequential_matches_dense_on_layer0_and_differs_after(run):
    from safetensors.torch import load_file

    dense = [load_file(run / f"{CALIB}/layer_{i}.stats.safetensors") for i in (0, 1)]
    seq = [load_file(run / f"{VARIANTS}/sequential/moe_pruner/2of4/seqcalib/layer_{i}.stats.safetensors") for i in (0, 1)]
    for k in dense[0]:
        assert torch.equal(dense[0][k], seq[0][k]), k
    assert not torch.equal(dense[1]["gate_up.sum_x2"], seq[1]["gate_up.sum_x2"])
    # SparseGPT's chain feeds its updated weights forward: same layer-0 inputs, different layer-1 inputs
    calib = CALIB
    seq_dir = f"{VARIANTS}/sequential/sparsegpt_gate_weighted/2of4/seqcalib"
    x = {(src, i): load_file(run / f"{d}/layer_{i}.inputs.safetensors")["hidden_states"]
         for src, d in (("dense", calib), ("seq", seq_dir)) for i in (0, 1)}
    assert torch.equal(x["dense", 0], x["seq", 0]) and not torch.allclose(x["dense", 1], x["seq", 1])


def artifact_hashes(workdir) -> dict[str, str]:
    """sha256 of every artifact: results (logs and benchmark files aside: wall times), data and metrics."""
    out = {}
    for top in ("results", "data", "metrics"):
        for p in sorted((workdir / top).rglob("*")):
            rel = p.relative_to(workdir).as_posix()
            if p.is_file() and not re.match(r"results/(?:[^/]+/)?(?:logs|benchmarks)/", rel):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_a_second_clean_run_is_byte_identical(run, tmp_path):
    """Determinism: a fresh run of the same params in another directory writes the same bytes: corpus, model,
    statistics, masks, weights, checkpoints, searches, evaluations, metrics and plots. (The same --cores: with
    another thread count the jobs that take every core reduce in other chunks; the README lists what differs.)
    The first run's jobs ran warm (all but the few before the warm server was ready), this one's cold
    (PRUNING_WARM_START=0)."""
    import os

    d = tmp_path / "again"
    d.mkdir()
    copy_code(d)
    (d / "params.yaml").write_text(yaml.safe_dump(MICRO))
    smk(d, env={**os.environ, "PRUNING_WARM_START": "0"})
    first, second = artifact_hashes(run), artifact_hashes(d)
    assert len(first) > 250 and set(first) == set(second)
    differ = sorted(k for k in first if first[k] != second[k])
    assert not differ, differ


def test_second_dry_run_has_nothing_to_do(run):
    assert "Nothing to be done" in smk(run, "-n")


@pytest.mark.parametrize("section,key,value,expected", [
    ("eval", "max_windows", 8, {"evaluate_ppl", "report", "all"}),  # one rule evaluates every model
    ("lm_eval", "limit", 5, {"evaluate_lm_eval", "report", "all"}),
])
def test_evaluation_setting_change_reruns_only_that_evaluation(run, section, key, value, expected):
    changed = yaml.safe_load(yaml.safe_dump(MICRO))
    changed[section][key] = value
    jobs = planned_jobs(run, changed)
    assert set(jobs) == expected, jobs


def jobs_after_editing(workdir, *files) -> dict:
    """Job counts per rule of a dry run after a comment was added to each of ``files`` (paths in the run's copy
    of the code); contents and modification times are restored afterwards."""
    import os

    paths = [workdir / "code" / f for f in files]
    before = [(p.read_bytes(), p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in paths]
    try:
        for p in paths:
            p.write_bytes(p.read_bytes() + b"# an edit\n")
        out = smk(workdir, "-n")
    finally:
        for p, (text, atime, mtime) in zip(paths, before):
            p.write_bytes(text)
            os.utime(p, ns=(atime, mtime))
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


# Rules downstream of a SparseGPT variant's masks (sequential propagation feeds the masks of layer 0 forward).
SPARSEGPT_DESCENDANTS = {"mask_sparsegpt", "calibrate_sequential", "apply", "block_error", "evaluate_ppl", "evaluate_lm_eval",
                         "report", "all"}


@pytest.mark.parametrize("module", ["pruning/weights/sparsegpt.py",  # imported by the SparseGPT mask script
                                    "pruning/weights/hessian.py"])   # imported by sparsegpt.py only: indirectly
def test_library_edit_reruns_exactly_the_jobs_whose_scripts_import_it(run, module):
    jobs = jobs_after_editing(run, module)
    assert set(jobs) == SPARSEGPT_DESCENDANTS, jobs  # no score-method mask, no calibration, no distillation
    variants = 2 * 2  # bases x propagations, one SparseGPT method at one sparsity
    assert jobs["mask_sparsegpt"] == variants * 2 and jobs["apply"] == jobs["block_error"] == variants
    assert jobs["calibrate_sequential"] == 2  # layer 1 of each sequential chain (layer 0 reads only the tokens)
    assert jobs["evaluate_ppl"] == jobs["evaluate_lm_eval"] == variants


def test_script_edit_reruns_its_rule(run):
    jobs = jobs_after_editing(run, "workflow/scripts/apply.py")
    assert set(jobs) == {"apply", "distill", "evaluate_ppl", "evaluate_lm_eval", "report", "all"}, jobs
    assert jobs["apply"] == 2 * 2 * 2 and jobs["distill"] == 4  # every weight-pruned variant; the tuned ones from them
    assert set(jobs_after_editing(run, "pruning/report/tables.py")) == {"report", "all"}  # the report's code only


def test_params_edit_builds_the_new_variants_with_a_bare_snakemake(run):
    """params.yaml itself edited (no --configfile): a bare `snakemake` builds the new methods' variants."""
    params = run / "params.yaml"
    original = params.read_text()
    changed = yaml.safe_load(original)
    changed["prune"]["methods"] = changed["prune"]["methods"] + ["wanda"]
    try:
        params.write_text(yaml.safe_dump(changed))
        out = smk(run, "-n")
    finally:
        params.write_text(original)
    assert "Nothing to be done" not in out
    table = out.split("Job stats:")[1].split("total")[0]
    jobs = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}
    assert jobs["mask"] == 2 * 2 * 2 and jobs["apply"] == 2 * 2 and "report" in jobs, jobs  # wanda: bases x props x layers


def test_method_or_sparsity_change_never_recalibrates(run):
    changed = yaml.safe_load(yaml.safe_dump(MICRO))
    changed["prune"]["sparsities"] = ["2:4", 0.6]
    changed["prune"]["propagation"] = ["dense"]
    jobs = planned_jobs(run, changed)
    assert not {"calibrate", "train_tiny", "expert_search", "apply_experts", "skip_calibrate", "distill"} & set(jobs), jobs
    n = len(MICRO["prune"]["methods"]) * len(MICRO["prune"]["bases"])
    assert jobs.get("mask", 0) + jobs.get("mask_sparsegpt", 0) == n * 2  # only the new sparsity, per layer and base
    assert jobs["apply"] == n


def test_masks_are_byte_identical_when_recomputed(run):
    target = f"{VARIANTS}/dense/moe_pruner/2of4/masks/layer_1.safetensors"
    before = hashlib.sha256((run / target).read_bytes()).hexdigest()
    smk(run, target, "--force")
    assert hashlib.sha256((run / target).read_bytes()).hexdigest() == before


def test_expert_pruning_outputs(run):
    from transformers import AutoModelForCausalLM

    search = run / "results/micro/search/builtin-n8-l32-s0/k3"
    layerwise = [json.loads((search / f"layer_{i}.json").read_text()) for i in (0, 1)]
    progressive = [json.loads((search / f"progressive/layer_{i}.json").read_text()) for i in (0, 1)]
    for s in layerwise:
        assert len(s["candidates"]) == 4 and s["exhaustive"] and set(s["chosen"]) == {"naee", "frequency", "reap", "ean", "random"}
        assert min(v for _, v in s["candidates"]) == s["loss"]["naee"] <= min(s["loss"].values())
    # layer 0 sees the same inputs and targets in both modes
    assert progressive[0]["chosen"]["naee_progressive"] == layerwise[0]["chosen"]["naee"]
    assert [d for d, _ in progressive[0]["candidates"]] == [d for d, _ in layerwise[0]["candidates"]]
    assert [v for _, v in progressive[0]["candidates"]] == pytest.approx([v for _, v in layerwise[0]["candidates"]])
    for base in ("naee-k3", "naee_progressive-k3", "frequency-k3", "random-k3", "naee-k3-task"):
        red = json.loads((run / f"results/micro/{base}/reduction.json").read_text())
        assert red["parameters_saved"] == red["parameters_saved_expected"] > 0 and red["tensor_bytes_saving_exact"]
        ev = json.loads((run / f"results/micro/{base}/eval/ppl.json").read_text())
        assert ev["num_experts"] == 3 and ev["expert_usage"]["calls_per_token"] == 2.0
    model = AutoModelForCausalLM.from_pretrained(run / "results/micro/naee-k3/checkpoint")  # stock transformers
    assert model.config.num_local_experts == 3 and model.model.layers[1].mlp.gate.weight.shape[0] == 3
    kept = json.loads((run / "results/micro/naee-k3/search.json").read_text())["layers"]
    assert model.config.pruned_experts["kept"] == {i: kept[i]["kept"] for i in ("0", "1")}
    # weight pruning composed on the reduced model: masks for 3 experts, 2:4 exact
    masks, _ = load_masks(run / "results/micro/naee-k3/builtin-n8-l32-s0/dense/moe_pruner/2of4/masks/layer_0.safetensors")
    assert masks["gate_up"].shape[0] == 3
    task = json.loads((run / "results/micro/naee-k3-task/search.json").read_text())
    assert task["calib_id"].startswith("builtin.asyncio-")


def test_skipping_outputs(run):
    for base in ("full", "naee-k3"):
        cfg = json.loads((run / f"results/micro/{base}/skip/checkpoint/config.json").read_text())
        betas = json.loads((run / f"results/micro/{base}/skip/betas.json").read_text())["betas"]
        assert cfg["betas"] == betas and set(betas) == {"0", "1"} and all(0 < b <= 1 for b in betas.values())
        ev = json.loads((run / f"results/micro/{base}/skip/eval/ppl.json").read_text())
        assert set(ev["skipping"]) == {"0", "1"} and all(0 < v["rate"] < 1 for v in ev["skipping"].values())
        calls = ev["expert_usage"]["calls_per_token"]
        rate = sum(v["rate"] for v in ev["skipping"].values()) / 2
        assert calls == pytest.approx(2 - rate)  # every skipped token costs one expert call less
    table = (run / "metrics/results.md").read_text()
    assert "dense + skipping" in table and "Task-specific pruning" in table and "expert calls / token" in table
    assert "calls_rel" in (run / "metrics/experts.csv").read_text().splitlines()[0]


def test_distillation_outputs(run):
    from pruning.models import get_adapter
    from pruning.models.checkpoint import load_config, read_experts
    from pruning.weights.sparsity import check_nm

    metrics = json.loads((run / "metrics/ppl.json").read_text())
    for base in ("full", "naee-k3"):
        v = run / f"results/micro/{base}/builtin-n8-l32-s0/dense/moe_pruner/2of4"
        for tune in ("kd", "ce"):
            info = json.loads((v / f"{tune}/distill.json").read_text())
            assert info["steps"] == 8 and info["split"] == "train" and info["samples"] == 16
            assert (info["lambda"] > 0) if tune == "kd" else (info["lambda"] == 0.0)
            assert info["expert_sparsity"] == info["expert_sparsity_before"] == 0.5
            assert not (v / f"{tune}.resume").exists()  # resumable states removed once the run completed
            history = (v / f"{tune}/history.csv").read_text().splitlines()
            assert history[0].startswith("step,epoch,lr,loss,ce_loss,expert_loss") and len(history) == 9
            adapter = get_adapter(load_config(v / f"{tune}/checkpoint"))
            for layer in (0, 1):  # the masks held through training: still exactly 2:4, pruned positions zero
                masks, _ = load_masks(v / f"masks/layer_{layer}.safetensors")
                a_ex, b_ex = read_experts(v / f"{tune}/checkpoint", adapter, layer), read_experts(v / "checkpoint", adapter, layer)
                after, before = {"gate_up": a_ex.gate_up, "down": a_ex.down}, {"gate_up": b_ex.gate_up, "down": b_ex.down}
                for name, m in masks.items():
                    assert after[name].shape[0] == (4 if base == "full" else 3)
                    check_nm(after[name], m, 2, 4)
                    assert not torch.equal(after[name], before[name])  # the kept weights trained
            ev = json.loads((v / f"{tune}/eval/ppl.json").read_text())
            key = metrics["distilled"][base]["dense"]["moe_pruner"]["2of4"]
            assert key[f"{tune}_ppl"] == ev["token_ppl"]
    table = (run / "metrics/results.md").read_text()
    assert "Expert-wise knowledge distillation" in table and "CE-only control" in table and "gap recovered" in table
    curves = sorted(p.name for p in (run / "metrics/distill").iterdir())
    assert curves == sorted(f"{b}_dense_moe_pruner_2of4_{t}.csv" for b in ("full", "naee-k3") for t in ("kd", "ce"))


def test_distill_setting_change_reruns_only_distillation(run):
    changed = yaml.safe_load(yaml.safe_dump(MICRO))
    changed["distill"]["lr"] = 2.0e-3
    jobs = planned_jobs(run, changed)
    assert set(jobs) == {"distill", "evaluate_ppl", "evaluate_lm_eval", "report", "all"}, jobs
    assert jobs["distill"] == jobs["evaluate_ppl"] == jobs["evaluate_lm_eval"] == 4  # the tuned models only


def test_lm_eval_and_summary(run):
    """Every evaluated model has lm-eval results; metrics/summary.json validates against its schema and holds one
    row per model, dense first; the CSV, the full table and the plots are written from them."""
    import csv

    from pruning.report.build import validate

    doc = json.loads((run / "metrics/summary.json").read_text())
    validate(doc, ROOT / "workflow/schemas/summary.schema.yaml")
    rows = doc["variants"]
    assert doc["dense"] == "full" and rows["full"]["pattern"] is None and rows["full"]["experts_kept"] == 4
    whole = ["full", "naee-k3", "naee_progressive-k3", "frequency-k3", "random-k3", "naee-k3-task", "full_skip", "naee-k3_skip"]
    pruned = [f"{b}_{p}_{m}_2of4" for b in ("full", "naee-k3") for p in ("dense", "sequential") for m in MICRO["prune"]["methods"]]
    tuned = [f"{b}_dense_moe_pruner_2of4_{t}" for b in ("full", "naee-k3") for t in ("kd", "ce")]
    assert set(rows) == set(whole + pruned + tuned)
    for key, r in rows.items():
        assert 0 <= r["acc"]["code_next_line"] <= 1 and 0 <= r["acc_norm"]["code_next_line"] <= 1
        assert r["word_perplexity"] > 1 and r["byte_perplexity"] > 1 and r["token_ppl"] > 1
        assert r["acc_avg"] == r["acc"]["code_next_line"]
    assert rows["full_dense_moe_pruner_2of4"]["pattern"] == "2:4" and rows["full_dense_moe_pruner_2of4"]["expert_sparsity"] == 0.5
    assert rows["naee-k3"]["experts_kept"] == 3 and rows["naee-k3"]["parameters"] < rows["full"]["parameters"]
    assert rows["full_skip"]["skipping"] and rows["full_dense_moe_pruner_2of4_kd"]["distilled"] == "kd"
    assert doc["lm_eval"]["version"] == "0.4.13"
    tasks = doc["lm_eval"]["tasks"]
    assert tasks["code_next_line"] == {"version": 1.0, "num_fewshot": 0, "samples": 20, "kind": "multiple_choice", "chance_acc": 0.25}
    assert tasks["code_rolling"]["kind"] == "rolling" and tasks["code_rolling"]["samples"] == 3
    # the dense model's own lm-eval file agrees with the summary
    dense_lm = json.loads((run / "results/micro/full/eval/lm_eval.json").read_text())
    assert dense_lm["tasks"]["code_next_line"]["acc"] == rows["full"]["acc"]["code_next_line"]
    assert "date" not in dense_lm and "samples" not in dense_lm  # no wall-clock fields, no per-prompt dumps
    with open(run / "metrics/summary.csv") as f:
        table = list(csv.DictReader(f))
    assert table[0]["id"] == "full" and sorted(r["id"] for r in table) == sorted(r["id"] for r in rows.values())
    assert {"method", "pattern", "sparsity", "experts_kept", "skipping", "distilled", "token_ppl", "word_perplexity",
            "acc_code_next_line", "acc_norm_code_next_line", "acc_avg", "parameters", "bytes"} <= set(table[0])
    md = (run / "metrics/results.md").read_text()
    assert "code_next_line acc" in md and "word ppl (lm-eval)" in md and "token ppl" in md and "lm-eval 0.4.13" in md


def test_local_tasks_rebuild_identically_from_the_test_split(run):
    """The JSONL files the rule built equal a rebuild from the test split, and every line of them is test-split text."""
    from pruning.data import lm_tasks

    test = [json.loads(x)["text"] for x in (run / "data/builtin/test.jsonl").read_text().splitlines() if x.strip()]
    c = MICRO["lm_eval"]["local"]
    items = lm_tasks.next_line_items(test, c["next_line_items"], 0, c["context_lines"], 4)
    built = (run / "data/lm_eval/code_next_line.jsonl").read_text()
    assert built == "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in items)
    for it in items:
        doc = test[it["doc"]]
        assert it["context"] + "\n" + it["choices"][it["label"]] in doc
        assert all(any(ch in d.split("\n") for d in test) for ch in it["choices"])
    rolling = [json.loads(x) for x in (run / "data/lm_eval/code_rolling.jsonl").read_text().splitlines()]
    assert len(rolling) == 3 and all(r["text"] == test[r["doc"]] for r in rolling)


def test_snakemake_html_report(run):
    smk(run, "--report", "report.html")
    html = (run / "report.html").read_text(errors="replace")
    assert (run / "report.html").stat().st_size > 10000
    for name in ("acc_vs_sparsity.png", "expert_sparsity.png", "ppl_vs_sparsity.png", "summary.csv"):
        assert name in html, name


def test_figures_draw_the_runs_results(run, monkeypatch):
    """Each PNG of metrics/ is byte for byte the figure of the run's rows, and each figure draws the values the
    run's metrics files hold (tests/test_report.py checks the figures against hand-made rows)."""
    from matplotlib.image import AxesImage
    from snakemake.utils import validate

    from pruning.report import build, plots, rows
    from pruning.sweep import Sweep

    config = yaml.safe_load(yaml.safe_dump(MICRO))
    validate(config, str(ROOT / "workflow/schemas/params.schema.yaml"))  # fills the defaults, as the workflow does
    monkeypatch.chdir(run)
    results = rows.load(Sweep(config), True, json.loads((run / "data/lm_eval/manifest.json").read_text()))
    figures = build.figures(results)
    files = {"ppl_plot": "ppl_vs_sparsity", "usage_plot": "expert_usage", "distill_plot": "distill_loss",
             "acc_plot": "acc_vs_sparsity", "sparsity_plot": "expert_sparsity"}
    summary = json.loads((run / "metrics/summary.json").read_text())["variants"]
    ppl = json.loads((run / "metrics/ppl.json").read_text())

    # perplexity vs sparsity: every method on every base at 2:4 is a cross at (target sparsity, its token ppl)
    fig = figures["ppl_plot"][0]
    for ax, prop in zip(fig.axes, ("dense", "sequential")):
        crosses = sorted(tuple(p) for c in ax.collections for p in c.get_offsets())
        want = sorted((0.5, m["2of4"]["token_ppl"]) for m in ppl[prop].values())
        assert crosses == want and len(want) == 4, prop
    # accuracy vs sparsity: the dense point, each 2:4 model's cross, each expert method's line
    weights, experts = figures["acc_plot"][0].axes
    crosses = sorted(tuple(p) for c in weights.collections for p in c.get_offsets())
    assert crosses == sorted((r["expert_sparsity"], r["acc_avg"]) for r in summary.values() if r["pattern"] == "2:4")
    lines = {ln.get_label(): list(zip(ln.get_xdata(), ln.get_ydata())) for ln in experts.get_lines()}
    assert lines["NAEE (layerwise)"] == [(0.0, summary["full"]["acc_avg"]), (0.25, summary["naee-k3"]["acc_avg"])]
    # expert usage: the dense model's fraction of tokens per expert, from its evaluation
    dense_ev = json.loads((run / "results/micro/full/eval/ppl.json").read_text())["expert_usage"]["layers"]
    (img,) = [a for a in figures["usage_plot"][0].axes[0].get_children() if isinstance(a, AxesImage)]
    assert img.get_array().tolist() == [[v["selections"][str(e)] / v["tokens"] for e in range(4)] for _, v in sorted(dense_ev.items())]
    # per-expert sparsity: 2:4 prunes every kept expert to 50%; removed experts are 1 ("cut")
    for ax in figures["sparsity_plot"][0].axes[:-1]:  # the last axes is the colour bar
        (img,) = [a for a in ax.get_children() if isinstance(a, AxesImage)]
        values = img.get_array().flatten().tolist()
        assert set(values) <= {0.5, 1.0} and values.count(1.0) == (2 if "NAEE" in ax.get_title() else 0), ax.get_title()
    # distillation: the raw curve of each run is its history
    ce = figures["distill_plot"][0].axes[0]
    history = (run / f"{VARIANTS}/dense/moe_pruner/2of4/kd/history.csv").read_text().splitlines()[1:]
    assert list(ce.get_lines()[0].get_ydata()) == [float(h.split(",")[4]) for h in history]
    for name, (fig, tight) in figures.items():
        path = run / f"redrawn_{name}.png"
        plots.save(fig, path, tight_bbox=tight)
        assert path.read_bytes() == (run / f"metrics/{files[name]}.png").read_bytes(), name
