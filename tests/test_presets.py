"""Every documented off-switch and every preset of the README runs end to end on the micro config.

One module fixture trains the micro model and builds the corpus and the local lm-eval tasks; each preset runs
in a copy of that directory (modification times kept, so Snakemake reuses the trained model), with params.yaml
edited by the README's own `-S` options (as `dvc exp run -S` would), and must finish with the report, the
README block where the preset writes one, and the metrics of what it asked for.
"""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--resources", "gpu=2", "--cores", "2"]
MICRO = yaml.safe_load((ROOT / "tests/micro_params.yaml").read_text())
# The micro config with one variant per kind (a run of about 20 jobs), each kind on like params.yaml's defaults:
# weight pruning, expert pruning, skipping, distillation and lm-eval. The presets turn kinds off or sweep more.
MICRO["prune"].update(methods=["moe_pruner"], sparsities=["2:4"], propagation=["dense"], bases=["full"])
MICRO["experts"].update(methods=["naee"], keep=[3], task=None)
MICRO["skipping"]["bases"] = ["full"]
MICRO["distill"].update(methods=["moe_pruner"], sparsities=["2:4"], bases=["full"], ce_control=False, epochs=1)
README = ROOT / "README.md"


def _readme_options(block: str) -> list[str]:
    """The `-S key=value` options of the README's `dvc exp run -n <block>` command."""
    text = README.read_text()
    m = re.search(rf"dvc exp run -n {block} \\\n(.*?)\n```", text, re.S)
    assert m, f"README has no `dvc exp run -n {block}` command"
    return re.findall(r"-S '?([^ ']+)'?", m.group(1))


def _set(params: dict, option: str) -> None:
    """Apply one `-S key=value` the way DVC does (the value is YAML)."""
    key, value = option.split("=", 1)
    node, keys = params, key.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = yaml.safe_load(value)


# preset -> (-S options, what the run must show). The README presets are read from the README itself; their
# sweeps are cut to the micro model's size where noted, every switch they turn is kept.
PRESETS = {
    "no expert methods": (["experts.methods=[]", "experts.task=null"], {}),
    "no skipping": (["skipping.bases=[]"], {}),
    "no distillation": (["distill.methods=[]"], {}),
    "no lm-eval": (["lm_eval.tasks=[]"], {}),
    "everything off but weight pruning": (["lm_eval.tasks=[]", "experts.methods=[]", "experts.task=null",
                                          "skipping.bases=[]", "distill.methods=[]"], {}),
    "comparison (README)": ("comparison", {"readme": "comparison"}),
    "distillation experiment (README)": ("distill", {"readme": "distill"}),
}
CUT = {  # the micro-sized sweep of a README preset: the same switches, fewer variants
    "comparison": ["prune.methods=[magnitude,sparsegpt]", "prune.sparsities=[\"2:4\"]"],
    "distill": ["prune.methods=[moe_pruner]", "prune.sparsities=[\"2:4\"]", "distill.methods=[moe_pruner]",
                "distill.sparsities=[\"2:4\"]"],
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("presets_base") / "run"  # as deep as each copy: the code inputs' relative paths match
    d.mkdir()
    (d / "params.yaml").write_text(yaml.safe_dump(MICRO))
    r = subprocess.run(SNAKEMAKE + ["results/micro/base", "data/lm_eval/manifest.json"], cwd=d, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_runs_end_to_end(trained, tmp_path, preset):
    options, expect = PRESETS[preset]
    work = tmp_path / "run"
    shutil.copytree(trained, work, symlinks=True)  # copy2: modification times kept, the trained model is reused
    params = yaml.safe_load(yaml.safe_dump(MICRO))
    if isinstance(options, str):  # a README preset: its own options, then the micro-sized cut of its sweep
        block = options
        options = _readme_options(block) + CUT[block]
        params["report"]["update_readme"] = True
        (work / "README.md").write_text(f"# r\n<!-- {block}:begin -->\nold\n<!-- {block}:end -->\ntail\n")
    for o in options:
        _set(params, o)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    r = subprocess.run(SNAKEMAKE, cwd=work, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "train_tiny" not in r.stdout + r.stderr  # the copy reused the trained model
    summary = json.loads((work / "metrics/summary.json").read_text())
    rows = summary["variants"]
    assert "full" in rows and (work / "metrics/results.md").stat().st_size > 0
    for png in ("ppl_vs_sparsity", "acc_vs_sparsity", "expert_usage", "distill_loss", "expert_sparsity"):
        assert (work / f"metrics/{png}.png").stat().st_size > 0, png
    # each kind of model is in the summary exactly when its switch is on
    assert any(r.get("acc_avg") is not None for r in rows.values()) == bool(params["lm_eval"]["tasks"])
    assert any(r.get("skipping") for r in rows.values()) == bool(params["skipping"]["bases"])
    assert any(r.get("experts_kept", 4) < 4 for r in rows.values()) == bool(params["experts"]["methods"])
    assert any(r.get("distilled") for r in rows.values()) == bool(params["distill"]["methods"])
    pr, di = params["prune"], params["distill"]
    pruned = {(p, m, str(s)) for p in pr["propagation"] for m in pr["methods"] for s in pr["sparsities"]}
    pruned |= {(p, m, str(s)) for p in di.get("propagation", ["dense"]) for m in di["methods"] for s in di["sparsities"]}
    assert sum(r.get("pattern") is not None and not r.get("distilled") for r in rows.values()) == len(pruned)  # distilled
    # variants outside the prune sweep are pruned first, and evaluated like the others
    if "readme" in expect:
        text = (work / "README.md").read_text()
        block = expect["readme"]
        assert "old" not in text and text.endswith("tail\n") and "Token perplexity" in text
        assert (work / f"docs/{block}.png").stat().st_size > 0
