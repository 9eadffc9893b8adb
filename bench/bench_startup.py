"""Where a run's time goes: process start-up against compute, per rule, from the run's own files.

Every job logs, as its last line, ``job timing: start-up X s, compute Y s`` (pruning/jobs.py): start-up is from
its process's start to its first line of work (interpreter, imports, Snakemake's script preamble; under warm
start the client's process, the fork and the imports of this project's modules), compute the rest. Snakemake's
benchmark file beside it gives the job's wall time ``s``, which also holds what Snakemake spends launching it.
The DAG's wall time runs from the first job's start to the last job's end (the log lines' timestamps).

    python bench/bench_startup.py RUN_DIR [RUN_DIR ...] [--label NAME ...] [--cores 2] [--readme README.md]

With several run directories (the same params run cold, ``PRUNING_WARM_START=0``, and warm), the table has one
block per run and the ratios of their DAG wall times.
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict
from datetime import datetime
from pathlib import Path

from timing import splice_readme  # also puts the repository on sys.path

LINE = re.compile(r"^(\S+ \S+) INFO job timing: start-up ([\d.]+) s, compute ([\d.]+) s$", re.M)


def rule_of(log: Path) -> str:
    """The rule behind a log file name (mask_3 -> mask, evaluate_ppl -> evaluate_ppl, layer_0 -> expert_search)."""
    name = re.sub(r"_\d+$", "", log.stem)
    return {"layer": "expert_search", "progressive": "expert_search_progressive", "lm_eval": "evaluate_lm_eval",
            "evaluate_task_ppl": "evaluate_ppl (task)", "mask": "mask"}.get(name, name)


def jobs(run: Path) -> list[dict]:
    """One row per job of the run: rule, wall s (benchmark file), start-up and compute s and end time (log)."""
    rows = []
    for log in sorted(run.glob("results/**/logs/**/*.log")):
        found = LINE.findall(log.read_text(errors="replace"))
        if not found:
            continue
        stamp, startup, compute = found[-1]
        rel = log.relative_to(run).as_posix()
        bench = run / (rel.replace("/logs/", "/benchmarks/", 1)[: -len(".log")] + ".tsv")
        wall = None
        if bench.exists():
            lines = bench.read_text().splitlines()
            wall = float(lines[1].split("\t")[0]) if len(lines) > 1 else None
        end = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        startup, compute = float(startup), float(compute)
        rows.append({"rule": rule_of(log), "wall": wall if wall is not None else startup + compute, "startup": startup,
                     "compute": compute, "end": end, "start": end - startup - compute})
    return rows


def summary(run: Path, cores: int, label: str | None = None) -> dict:
    rows = jobs(run)
    if not rows:
        raise SystemExit(f"{run}: no job logs with a timing line (a run of this code, under results/)")
    per_rule = defaultdict(lambda: {"jobs": 0, "wall": 0.0, "startup": 0.0, "compute": 0.0})
    for r in rows:
        agg = per_rule[r["rule"]]
        agg["jobs"] += 1
        for k in ("wall", "startup", "compute"):
            agg[k] += r[k]
    dag = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    total = {k: sum(r[k] for r in rows) for k in ("wall", "startup", "compute")}
    # What Snakemake spends around a job (writing its script, spawning, benchmarking) counts as start-up too.
    launch = sum(max(0.0, r["wall"] - r["startup"] - r["compute"]) for r in rows)
    return {"run": str(run), "label": label or run.name, "jobs": len(rows), "dag_wall": dag, "cores": cores, "per_rule": dict(per_rule),
            "total": total, "launch": launch,
            "startup_share_of_job_time": (total["startup"] + launch) / total["wall"],
            "startup_share_of_dag": (total["startup"] + launch) / (cores * dag)}


def table(runs: list[dict]) -> str:
    out = []
    for s in runs:
        out.append(f"**{s['label']}**: {s['jobs']} jobs in {s['dag_wall']:.0f} s, start-up "
                   f"{100 * s['startup_share_of_dag']:.1f}% of the DAG's wall time on {s['cores']} cores "
                   f"({100 * s['startup_share_of_job_time']:.1f}% of the job-seconds)\n")
        out.append("| rule | jobs | wall s / job | start-up s / job | compute s / job | start-up share |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for rule, a in sorted(s["per_rule"].items(), key=lambda kv: -kv[1]["wall"]):
            startup = max(0.0, a["wall"] - a["compute"])  # the process's start-up and Snakemake's launch
            out.append(f"| {rule} | {a['jobs']} | {a['wall'] / a['jobs']:.2f} | {startup / a['jobs']:.2f} | "
                       f"{a['compute'] / a['jobs']:.2f} | {100 * startup / max(a['wall'], 1e-9):.0f}% |")
        out.append("")
    if len(runs) > 1:
        ref = runs[0]
        for s in runs[1:]:
            out.append(f"DAG wall time, {s['label']} / {ref['label']}: "
                       f"{s['dag_wall'] / ref['dag_wall']:.2f}; start-up job-seconds: "
                       f"{(s['total']['startup'] + s['launch']) / (ref['total']['startup'] + ref['launch']):.2f}")
    return "\n".join(out).rstrip() + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--label", action="append", help="a run's name in the table, once per run (default: its folder)")
    ap.add_argument("--readme", type=Path, help="splice the table between <!-- startup:begin/end -->")
    args = ap.parse_args()
    labels = args.label or [None] * len(args.runs)
    runs = [summary(r, args.cores, label) for r, label in zip(args.runs, labels)]
    text = table(runs)
    print(text)
    if args.readme:
        splice_readme(args.readme, "startup", text)


if __name__ == "__main__":
    main()
