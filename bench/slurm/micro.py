"""The micro config through workflow/profiles/slurm on the cluster of bench/slurm/cluster.sh, and locally; compare.

    bench/slurm/cluster.sh start
    .venv/bin/python bench/slurm/micro.py --out bench/out/slurm --snapshot   # the whole micro config (108 jobs)
    .venv/bin/python bench/slurm/micro.py --out bench/out/slurm --small      # the test's subset (14 jobs)
    bench/slurm/cluster.sh stop

Both runs get the same params in fresh working directories (<out>/local, <out>/slurm). The local run is the one of
tests/test_workflow.py (``--cores 2 --resources gpu=2``). The SLURM run is ``--workflow-profile
workflow/profiles/slurm`` with what a user of a small CPU-only cluster overrides on the command line:

* ``--slurm-status-command squeue``: the cluster has no slurmdbd, so ``sacct`` only answers "Slurm accounting
  storage is disabled" (exit 1), and with sacct the plugin never learns that a job ended (it waits forever).
  squeue sees finished jobs for MinJobAge (3600 s in cluster.sh's slurm.conf).
* ``--default-resources`` / ``--set-resources``: no account (the cluster has none), partition ``cpu`` for every
  rule, ``gpu=0`` for the rules that declare a GPU (no GPUs here), and memory capped to what the node has.
  Snakemake replaces a profile's top-level key as a whole when the command line sets it, so the lists are built
  from the profile: every other entry (runtimes, tasks_per_gpu) is passed on unchanged.
* ``--set-threads``: each rule gets the threads it has in the local run (the profile's 8 do not fit a 2-CPU node,
  and the same threads keep torch's reductions the same).

Then every output file of both runs is compared: byte for byte, or for JSON after dropping the fields that are
wall times or describe the machine (IGNORED_KEYS), or for metrics/results.md after masking its training wall time
(IGNORED_TEXT). Logs, benchmark TSVs and Snakemake's own state are not compared.
The summary (times, counts, differences) goes to <out>/comparison.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "workflow/profiles/slurm"
CLUSTER = ROOT / "bench/slurm/cluster.sh"
MICRO = ROOT / "tests/micro_params.yaml"

# JSON fields that are wall times or describe the machine/process, not the result
IGNORED_KEYS = {"seconds", "train_seconds", "environment"}
# wall times in text outputs: metrics/results.md's "trained on N tokens in X min"
IGNORED_TEXT = re.compile(r"(?<=tokens in )[0-9.]+(?= min)")
# not results: per-run logs, timing benchmarks, Snakemake's and SLURM's own state
SKIPPED = re.compile(r"(^|/)(\.snakemake|\.gpu_pool|logs|benchmarks)(/|$)|\.snakemake_timestamp$")


def micro_params(small: bool = False) -> dict:
    """tests/micro_params.yaml as test_workflow runs it; ``small``: one method, dense propagation, on the full
    model only (calibration, per-layer masks, apply, perplexity, block error, one lm-eval task, report)."""
    p = yaml.safe_load(MICRO.read_text())
    p["artifacts"]["keep_pruned_checkpoints"] = True
    if small:
        p["prune"].update(methods=["moe_pruner"], propagation=["dense"], bases=["full"])
        p["experts"] = {"methods": [], "keep": [], "task": None}
        p["skipping"] = {"bases": []}
        p["distill"]["methods"] = []
        # one lm-eval task (code_next_line, an accuracy task): with none, the report's accuracy plot fails
        # (pruning/report/plots.py, acc_avg None)
        p["lm_eval"]["tasks"] = ["code_next_line"]
    return p


def snakemake_cmd(src: Path) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(src / "Snakefile")]


def local_plan(workdir: Path, src: Path, env: dict) -> str:
    """The local run's dry run (its jobs with their threads and resources)."""
    return subprocess.run(snakemake_cmd(src) + ["-n", "--cores", "2", "--resources", "gpu=2"], cwd=workdir, env=env,
                          capture_output=True, text=True, check=True).stdout


def _rule_lines(plan: str):
    rule = None
    for line in plan.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line)
        rule = m.group(1) if m else rule
        if rule:
            yield rule, line


def local_threads(plan: str) -> dict[str, int]:
    """Threads of every rule in the local run."""
    threads = {}
    for rule, line in _rule_lines(plan):
        m = re.match(r"^\s+threads: (\d+)", line)
        threads[rule] = int(m.group(1)) if m else threads.get(rule, 1)
    return threads


def gpu_rules_missing_from_profile(plan: str) -> list[str]:
    """Rules that declare a GPU but have no set-resources entry in the profile (they would ask the default
    partition for a GPU)."""
    prof = yaml.safe_load((PROFILE / "config.yaml").read_text())
    gpu = {rule for rule, line in _rule_lines(plan) if re.match(r"^\s+resources:.*\bgpu=[1-9]", line)}
    return sorted(gpu - set(prof.get("set-resources", {})))


def slurm_overrides(threads: dict[str, int], mem_mb: int, partition: str = "cpu") -> list[str]:
    """Command-line settings on top of the profile for a CPU-only cluster without accounting (see the docstring)."""
    prof = yaml.safe_load((PROFILE / "config.yaml").read_text())
    default = dict(prof.get("default-resources", {}))
    default.pop("slurm_account", None)
    default.update(slurm_partition=partition, mem_mb=min(int(default.get("mem_mb", mem_mb)), mem_mb))
    args = ["--default-resources"] + [f"{k}={v}" for k, v in default.items()]
    set_res = []
    for rule, res in prof.get("set-resources", {}).items():
        res = dict(res)
        res.pop("cpus_per_gpu", None)  # only read for GPU jobs
        res["slurm_partition"] = partition
        if "gpu" in res:
            res["gpu"] = 0
        if "mem_mb" in res:
            res["mem_mb"] = min(int(res["mem_mb"]), mem_mb)
        set_res += [f"{rule}:{k}={v}" for k, v in res.items()]
    args += ["--set-resources"] + set_res
    rules = sorted(set(prof.get("set-threads", {})) | {r for r, t in threads.items() if t > 1})
    args += ["--set-threads"] + [f"{r}={threads.get(r, 1)}" for r in rules]
    return args + ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
                   "--slurm-keep-successful-logs"]


def run(cmd: list[str], workdir: Path, env: dict, log: Path, timeout: float) -> float:
    t0 = time.monotonic()
    with open(log, "w") as fh:
        r = subprocess.run(cmd, cwd=workdir, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    seconds = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({r.returncode}); the end of {log}:\n"
                           + log.read_text()[-4000:])
    return seconds


def _strip(o):
    if isinstance(o, dict):
        return {k: _strip(v) for k, v in o.items() if k not in IGNORED_KEYS}
    if isinstance(o, list):
        return [_strip(v) for v in o]
    return o


def _ignored_paths(a, b, path="") -> list[str]:
    """The ignored fields whose values differ (where they are)."""
    out = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a.keys() & b.keys():
            if k in IGNORED_KEYS:
                if isinstance(a[k], dict) and isinstance(b[k], dict):
                    out += [f"{path}/{k}/{j}" for j in sorted(a[k].keys() | b[k].keys()) if a[k].get(j) != b[k].get(j)]
                elif a[k] != b[k]:
                    out.append(f"{path}/{k}")
            else:
                out += _ignored_paths(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            out += _ignored_paths(x, y, f"{path}/{i}")
    return out


def result_files(d: Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*")
            if p.is_file() and not SKIPPED.search(p.relative_to(d).as_posix())}


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def compare(a: Path, b: Path) -> dict:
    """Every result file of run a against run b."""
    fa, fb = result_files(a), result_files(b)
    rep = {"only_in_" + a.name: sorted(fa - fb), "only_in_" + b.name: sorted(fb - fa), "identical": [],
           "equal_but_ignored_fields": {}, "different": []}
    for f in sorted(fa & fb):
        if sha256(a / f) == sha256(b / f):
            rep["identical"].append(f)
            continue
        if f.endswith(".json"):
            ja, jb = json.loads((a / f).read_text()), json.loads((b / f).read_text())
            if _strip(ja) == _strip(jb):
                rep["equal_but_ignored_fields"][f] = _ignored_paths(ja, jb)
                continue
        if f.endswith(".md"):
            ta, tb = (a / f).read_text(), (b / f).read_text()
            if IGNORED_TEXT.sub("<wall time>", ta) == IGNORED_TEXT.sub("<wall time>", tb):
                rep["equal_but_ignored_fields"][f] = [f"{x} vs {y} (wall time)" for x, y in
                                                      zip(IGNORED_TEXT.findall(ta), IGNORED_TEXT.findall(tb)) if x != y]
                continue
        rep["different"].append(f)
    rep["counts"] = {"compared": len(fa & fb), "identical": len(rep["identical"]),
                     "equal_but_ignored_fields": len(rep["equal_but_ignored_fields"]),
                     "different": len(rep["different"]), "only_in_one": len(fa ^ fb)}
    by_kind: dict[str, int] = {}
    for f in fa & fb:
        kind = Path(f).suffix or Path(f).name
        by_kind[kind] = by_kind.get(kind, 0) + 1
    rep["counts"]["by_kind"] = dict(sorted(by_kind.items()))
    return rep


def snapshot(dst: Path) -> Path:
    """The workflow and library as they are now, so that edits made during the runs reach neither."""
    dst.mkdir(parents=True)
    shutil.copy2(ROOT / "Snakefile", dst)
    for d in ("workflow", "pruning"):
        shutil.copytree(ROOT / d, dst / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def slurm_env() -> dict:
    env = dict(os.environ)
    conf = subprocess.run(["bash", str(CLUSTER), "env"], capture_output=True, text=True, check=True).stdout
    env["SLURM_CONF"] = conf.strip().split("=", 1)[1]
    return env


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="a new directory for both runs and comparison.json")
    ap.add_argument("--small", action="store_true", help="the test's subset of the micro config")
    ap.add_argument("--snapshot", action="store_true", help="run a copy of the workflow and library (default: the checkout)")
    ap.add_argument("--src", type=Path, help="run this copy of the workflow and library (from an earlier --snapshot)")
    ap.add_argument("--mem-mb", type=int, default=4000, help="memory cap per SLURM job")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--skip-local", action="store_true", help="reuse <out>/local from an earlier call")
    ap.add_argument("--parallel", action="store_true", help="both runs at the same time (shorter, times not comparable)")
    a = ap.parse_args(argv)
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    src = ROOT
    env = slurm_env()
    if a.snapshot and not a.src:
        shutil.rmtree(out / "src", ignore_errors=True)
        src = snapshot(out / "src")
    if a.src:
        src = a.src.resolve()
    if src != ROOT:
        env["PYTHONPATH"] = os.pathsep.join([str(src)] + [p for p in [env.get("PYTHONPATH")] if p])
    params = yaml.safe_dump(micro_params(a.small))
    summary = {"params": "small" if a.small else "micro", "src": str(src)}
    for name in ("local", "slurm"):
        if name == "local" and a.skip_local:
            continue
        shutil.rmtree(out / name, ignore_errors=True)
        (out / name).mkdir()
        (out / name / "params.yaml").write_text(params)
    plan = local_plan(out / "slurm", src, env)
    threads = local_threads(plan)
    summary["gpu_rules_missing_from_profile"] = gpu_rules_missing_from_profile(plan)
    slurm_args = (["--workflow-profile", str(PROFILE)] + slurm_overrides(threads, a.mem_mb))
    summary["slurm_command"] = " ".join(["snakemake", "-s", str(src / "Snakefile")] + slurm_args)
    local_cmd = snakemake_cmd(src) + ["--cores", "2", "--resources", "gpu=2"]
    slurm_cmd = snakemake_cmd(src) + slurm_args
    if a.parallel and not a.skip_local:
        with ThreadPoolExecutor(2) as pool:
            local = pool.submit(run, local_cmd, out / "local", env, out / "local.log", a.timeout)
            slurm = pool.submit(run, slurm_cmd, out / "slurm", env, out / "slurm.log", a.timeout)
            summary["local_seconds"], summary["slurm_seconds"] = round(local.result(), 1), round(slurm.result(), 1)
        summary["parallel"] = True
    else:
        if not a.skip_local:
            summary["local_seconds"] = round(run(local_cmd, out / "local", env, out / "local.log", a.timeout), 1)
        summary["slurm_seconds"] = round(run(slurm_cmd, out / "slurm", env, out / "slurm.log", a.timeout), 1)
    log = (out / "slurm.log").read_text()
    summary["slurm_jobs_submitted"] = len(re.findall(r"has been submitted with SLURM jobid", log))
    summary["local_rule_jobs"] = len(re.findall(r"^localrule \w+:", log, re.M))
    summary["comparison"] = compare(out / "local", out / "slurm")
    (out / "comparison.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    s = main()
    c = s["comparison"]["counts"]
    print(json.dumps({k: v for k, v in s.items() if k != "comparison"}, indent=1))
    print(json.dumps(c, indent=1))
    sys.exit(0 if c["different"] == 0 and c["only_in_one"] == 0 else 1)
