"""The README's DVC workflow on a nano config in a fresh git + DVC repository: `dvc repro`, `dvc exp run -S`,
`dvc exp show`, `dvc metrics diff`, `dvc params diff`, and a checkout of an older commit restoring its masks and
metrics from the DVC cache without recomputation."""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MICRO = yaml.safe_load((ROOT / "tests/micro_params.yaml").read_text())
NANO = copy.deepcopy(MICRO)
NANO["prune"].update(methods=["moe_pruner"], sparsities=[0.5], propagation=["dense"], bases=["full"])
NANO["experts"] = {"methods": [], "keep": [3], "task": None}
NANO["skipping"] = {"bases": []}
NANO["distill"].update(methods=[], bases=["full"])
VARIANT = "results/micro/full/builtin-n8-l32-s0/dense/moe_pruner"


def _env(home: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]  # dvc.yaml's `snakemake`
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(home / "dvc_site"), DVC_GLOBAL_CONFIG_DIR=str(home / "dvc_global"))
    return env


def test_experiments_diffs_and_checkout_restore(tmp_path):
    repo, env = tmp_path / "repo", _env(tmp_path)
    repo.mkdir()

    def run(*cmd, timeout=900):
        r = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"{cmd}: {r.stdout[-3000:]}{r.stderr[-3000:]}"
        return r.stdout + r.stderr

    for name in ("Snakefile", "dvc.yaml", "pyproject.toml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("workflow", "pruning"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(yaml.safe_dump(NANO))
    dvc = [str(Path(sys.executable).parent / "dvc")]
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run(*dvc, "repro")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline: moe_pruner 50%")
    base_rev = run("git", "rev-parse", "HEAD").strip()
    mask = repo / VARIANT / "0.5/masks/layer_0.safetensors"
    mask_bytes, summary0 = mask.read_bytes(), (repo / "metrics/summary.json").read_text()

    # the same pipeline again from nothing: the same bytes everywhere, so git sees no change at all (no wall
    # times in tracked files; logs and benchmark files, which hold them, are outside DVC's hashes: .dvcignore)
    for out in ("results", "data/builtin", "data/lm_eval", ".snakemake"):
        shutil.rmtree(repo / out)
    run(*dvc, "repro", "--force")
    assert run("git", "status", "--porcelain").strip() == ""
    assert mask.read_bytes() == mask_bytes

    # an experiment: one -S override, results in the workspace, metrics as columns in `dvc exp show`
    run(*dvc, "exp", "run", "-n", "sp60", "-S", "prune.sparsities=[0.6]")
    assert (repo / VARIANT / "0.6/masks/layer_0.safetensors").exists()
    show = run(*dvc, "exp", "show", "--json")
    assert "sp60" in show and "full_dense_moe_pruner_sp60" in show and "acc_avg" in show and "token_ppl" in show
    mdiff = json.loads(run(*dvc, "metrics", "diff", "HEAD", "--json"))
    changed = mdiff["metrics/summary.json"]
    assert "variants.full_dense_moe_pruner_sp60.token_ppl" in changed
    pdiff = json.loads(run(*dvc, "params", "diff", "HEAD", "--json"))
    assert str(pdiff["params.yaml"]["prune.sparsities"]["new"]) == "[0.6]"  # DVC reports the list as text
    run("git", "add", "-A")
    run("git", "commit", "-qm", "moe_pruner 60%")
    assert "full_dense_moe_pruner_sp60" in (repo / "metrics/summary.json").read_text()

    # back to the baseline commit: git restores params and metrics, DVC the masks, from its cache
    run("git", "checkout", "-q", base_rev)
    shutil.rmtree(repo / "results")
    run(*dvc, "checkout")
    assert mask.read_bytes() == mask_bytes
    assert not (repo / VARIANT / "0.6").exists()
    assert (repo / "metrics/summary.json").read_text() == summary0
    assert "up to date" in run(*dvc, "status")
    out = run(*dvc, "repro")
    assert "didn't change" in out and "Finished jobid" not in out  # nothing recomputed
    # Snakemake run directly on restored files: one --touch pass, then nothing to do
    smk = [sys.executable, "-m", "snakemake", "--cores", "1"]
    run(*smk, "--touch")
    assert "Nothing to be done" in run(*smk, "-n")
