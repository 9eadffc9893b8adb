"""Kill and restart: SIGKILL the pipeline at random moments, restart it with the README's recovery, and compare.

One uninterrupted reference run of a small micro sweep (every rule type runs), then two chains in fresh
directories, one through ``snakemake --cores all`` and one through ``dvc repro`` (a fresh git + DVC repository
with the repository's dvc.yaml). Each chain SIGKILLs its whole session (the entry command, Snakemake, every job)
at ``--trials / 2`` moments, each chosen while a job of a targeted rule type runs (jobs are seen in /proc by
their ``.snakemake/scripts/tmp*.<script>.py`` command line) plus a seeded random delay within that rule's
reference duration. The 17 rule types are targeted round-robin in pipeline order, alternately to the two chains,
so the two chains together cover every type. At each kill moment every file under an output name of the DAG
(``snakemake --summary``) must be byte-identical to the reference's or absent, and a directory output present
must hold exactly the reference's files. The chain restarts with ``RECOVERY`` (the README's commands, nothing
else), and after the last kill runs to the end; then every file under results/, data/ and metrics/ (except
``IGNORED``) must equal the reference's, with no extra file (temporary or training-state leftovers included).
A trial is identical when both hold.

    .venv/bin/python bench/bench_kill.py                          # 20 kills, ~3 uninterrupted runs of the sweep
    .venv/bin/python bench/bench_kill.py --trials 2 --readme ''   # smoke
    .venv/bin/python bench/bench_kill.py --readme README.md       # writes the README's kill block
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from timing import ROOT, splice_readme

BIN = Path(sys.executable).parent
SNAKEMAKE = ["snakemake", "--cores", "all"]
UNLOCK = ["snakemake", "--unlock", "--cores", "1"]
ENTRY = {"snakemake": SNAKEMAKE, "dvc": ["dvc", "repro"]}
# The README's recovery after a hard kill: unlock once, then the command again with --rerun-incomplete (dvc.yaml's
# command passes it). Nothing is done about DVC's own locks (see the README).
RECOVERY = {"snakemake": [UNLOCK, SNAKEMAKE + ["--rerun-incomplete"]], "dvc": [UNLOCK, ["dvc", "repro"]]}
CODE = ("Snakefile", "dvc.yaml", "pyproject.toml", ".gitignore", ".dvcignore", "workflow", "pruning")
SCANNED = ("results", "data", "metrics")
IGNORED_DIRS = ("logs", "benchmarks")  # logs and benchmark TSVs: wall times, pids
TIME_KEY = re.compile(r"(^|_)(wall|elapsed|seconds|duration|time)(_|$)")  # JSON wall-time fields, if any remain
SCRIPT = re.compile(r"/\.snakemake/scripts/tmp[a-z0-9_]{8}\.(\w+)\.py$")
MARKER = "/.snakemake_timestamp"  # Snakemake's own marker, touched in a directory output after its job ends
IGNORED = [f"any path with a directory named {d}/" for d in IGNORED_DIRS] + [
    f"JSON keys matching /{TIME_KEY.pattern}/ (compared with those keys removed; listed per file when used)",
    ".snakemake/, .dvc/, dvc.lock, the segment logs (outside results/, data/, metrics/)",
    "at a kill moment only: a directory output's .snakemake_timestamp (Snakemake touches it after the job; "
    "it is compared in the final tree)"]


def micro_params() -> dict:
    """tests/micro_params.yaml narrowed so that every rule type runs (52 jobs); pruned checkpoints kept, so
    that every directory output is compared."""
    p = yaml.safe_load((ROOT / "tests/micro_params.yaml").read_text())
    p["artifacts"]["keep_pruned_checkpoints"] = True
    p["prune"].update(bases=["full"])
    p["experts"].update(methods=["naee", "naee_progressive"], task=None)
    p["skipping"] = {"bases": ["full"]}
    p["distill"].update(bases=["full"], ce_control=False)
    return p


def env(home: Path, code: Path) -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e['PATH']}"
    e["PYTHONPATH"] = str(code)  # every job imports the run's own copy of pruning/
    e.update(GIT_AUTHOR_NAME="k", GIT_AUTHOR_EMAIL="k@k", GIT_COMMITTER_NAME="k", GIT_COMMITTER_EMAIL="k@k",
             DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(home / "dvc_site"),
             DVC_GLOBAL_CONFIG_DIR=str(home / "dvc_global"))
    return e


def prepare(run: Path, code: Path, params: dict, dvc: bool, e: dict) -> None:
    run.mkdir(parents=True)
    for name in CODE:
        src = code / name
        if src.is_dir():
            shutil.copytree(src, run / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, run / name)
    if params:
        (run / "params.yaml").write_text(yaml.safe_dump(params))
    if dvc:
        for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "kill bench"]):
            subprocess.run(cmd, cwd=run, env=e, check=True, capture_output=True)


def script_rules(code: Path) -> dict:
    """Script stem -> rule name, from the rule files."""
    out = {}
    for smk in sorted((code / "workflow/rules").glob("*.smk")):
        for m in re.finditer(r"^rule (\w+):.*?^\s+script:\s*\n\s+\"\.\./scripts/(\w+)\.py\"", smk.read_text(), re.M | re.S):
            out[m.group(2)] = m.group(1)
    return out


def session_pids(sid: int) -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.getsid(int(p)) == sid:
                    pids.append(int(p))
            except OSError:
                pass
    return pids


def running_jobs(sid: int, rules: dict) -> dict:
    """pid -> rule of every job script running in session ``sid``."""
    out = {}
    for pid in session_pids(sid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for a in args:
            m = SCRIPT.search(a.decode(errors="replace"))
            if m:
                out[pid] = rules.get(m.group(1), m.group(1))
                break
    return out


def kill_session(sid: int) -> None:
    """SIGKILL every process of the session (the group first), until none is left."""
    with_suppress = (ProcessLookupError, PermissionError)
    try:
        os.killpg(sid, signal.SIGKILL)
    except with_suppress:
        pass
    for _ in range(200):
        left = [p for p in session_pids(sid) if p != os.getpid()]
        if not left:
            return
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except with_suppress:
                pass
        time.sleep(0.02)


def pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"
    except (OSError, IndexError):
        return False


def _strip_times(obj, dropped: set, at=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if TIME_KEY.search(str(k)):
                dropped.add(f"{at}{k}")
            else:
                out[k] = _strip_times(v, dropped, f"{at}{k}.")
        return out
    if isinstance(obj, list):
        return [_strip_times(v, dropped, at) for v in obj]
    return obj


def digests(path: Path) -> tuple[str, str | None, list]:
    """sha256 of the bytes; for JSON also of the content without wall-time keys, and the keys dropped."""
    data = path.read_bytes()
    raw = hashlib.sha256(data).hexdigest()
    if path.suffix != ".json":
        return raw, None, []
    try:
        dropped: set = set()
        norm = json.dumps(_strip_times(json.loads(data), dropped), sort_keys=True)
    except ValueError:  # not JSON (half-written?): only the bytes count
        return raw, None, []
    return raw, hashlib.sha256(norm.encode()).hexdigest(), sorted(dropped)


def tree(run: Path) -> dict:
    """Relative path -> digests of every file under SCANNED, except IGNORED_DIRS."""
    out = {}
    for top in SCANNED:
        for dirpath, dirnames, filenames in os.walk(run / top):
            dirnames[:] = [d for d in dirnames if d not in IGNORED_DIRS]
            for f in filenames:
                p = Path(dirpath) / f
                out[str(p.relative_to(run))] = digests(p)
    return out


def same(a, b) -> tuple[bool, list]:
    """Equal bytes, or equal JSON once wall-time keys are removed (then the keys ignored)."""
    if a[0] == b[0]:
        return True, []
    if a[1] is not None and a[1] == b[1]:
        return True, a[2] or b[2]
    return False, []


def dag_outputs(ref: Path, e: dict) -> tuple[dict, set]:
    """Output name -> rule, from ``snakemake --summary`` of the reference run; and the directory outputs."""
    r = subprocess.run(SNAKEMAKE + ["--summary"], cwd=ref, env=e, capture_output=True, text=True, check=True)
    outs = {}
    for line in r.stdout.splitlines():
        cols = line.split("\t")
        if len(cols) >= 3 and cols[0] != "output_file" and cols[0].split("/")[0] in SCANNED:
            outs[cols[0].rstrip("/")] = cols[2]
    return outs, {o for o in outs if (ref / o).is_dir()}


def check_visible(run: Path, ref_tree: dict, outputs: dict, dirs: set) -> dict:
    """At a kill moment: every file under an output name equals the reference's or is absent; a directory
    output present holds exactly the reference's files. Other files (temporaries, training states) listed."""
    now = tree(run)
    bad, visible, other = [], 0, []
    out_dirs = tuple(d + "/" for d in dirs)
    for p, dig in now.items():
        if p in outputs or p.startswith(out_dirs):
            visible += 1
            if p not in ref_tree or not same(dig, ref_tree[p])[0]:
                bad.append(f"differs: {p}")
        else:
            other.append(p)
    for d in dirs:
        if (run / d).exists():
            want = {p for p in ref_tree if p.startswith(d + "/") and not p.endswith(MARKER)}
            have = {p for p in now if p.startswith(d + "/") and not p.endswith(MARKER)}
            if want != have:
                bad.append(f"directory {d}: {len(have)} of {len(want)} files, missing "
                           f"{sorted(Path(p).name for p in want - have)}, extra {sorted(Path(p).name for p in have - want)}")
    return {"visible": visible, "bad": bad, "other": other}


def compare_final(run: Path, ref_tree: dict) -> dict:
    now = tree(run)
    missing = sorted(set(ref_tree) - set(now))
    extra = sorted(set(now) - set(ref_tree))
    differ, ignored = [], {}
    for p in sorted(set(now) & set(ref_tree)):
        ok, keys = same(now[p], ref_tree[p])
        if not ok:
            differ.append(p)
        elif keys:
            ignored[p] = keys
    return {"files": len(now), "equal": len(set(now) & set(ref_tree)) - len(differ), "missing": missing,
            "extra": extra, "differ": differ, "ignored_json_keys": ignored,
            "identical": not (missing or extra or differ)}


def run_segment(cmd, run: Path, e: dict, log: Path, rules: dict, pool: list, pending, rng, ref_dur: dict,
                single: set):
    """Run ``cmd`` until it ends, or kill it while a job of a rule in ``pool`` runs (after a random delay)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=run, env=e, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    seen, plan, targets, next_pending = {}, None, None, 0.0
    while True:
        rc = proc.poll()
        if rc is not None:
            return {"rc": rc}
        now = time.monotonic()
        if pool and plan is None and now >= next_pending:  # targets: pool types with work left, else any
            left = pending()
            targets = {t for t in pool if t in left} or set(left)
            next_pending = now + 0.5
        if pool:
            for pid, rule in running_jobs(proc.pid, rules).items():
                seen.setdefault(pid, now)
                # a rule with one job in the DAG takes over a plan on a rule with several (those run again later),
                # so that short single jobs running beside the planned one are not missed
                switch = plan is not None and rule != plan["rule"] and rule in single and plan["rule"] not in single
                if (plan is None or switch) and targets and rule in targets:
                    plan = {"pid": pid, "rule": rule, "t0": seen[pid],
                            "at": seen[pid] + rng.uniform(0.0, ref_dur.get(rule, 5.0))}
            if plan and now >= plan["at"]:
                alive = pid_alive(plan["pid"])
                kill_session(proc.pid)
                proc.wait()
                return {"rc": None, "rule": plan["rule"], "seconds": round(now - plan["t0"], 2),
                        "job_running": alive}
        time.sleep(0.05)


def reference(work: Path, code: Path, params: dict, e: dict, rules: dict, given: Path | None):
    """The uninterrupted run (or ``given``), with each rule's median job duration and first start order."""
    if given:
        info = json.loads((given / "kill_reference.json").read_text()) if (given / "kill_reference.json").exists() else {}
        order = info.get("order") or list(dict.fromkeys(
            m.group(1) for log in sorted(given.glob("*.log")) for m in re.finditer(r"^(?:local)?rule (\w+):", log.read_text(), re.M)))
        return given, info.get("durations", {}), order
    ref = work / "reference"
    prepare(ref, code, params, False, e)
    t0 = time.monotonic()
    with open(ref / "segment.log", "w") as f:
        proc = subprocess.Popen(SNAKEMAKE, cwd=ref, env=e, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    first, last, rule_of = {}, {}, {}
    while proc.poll() is None:
        now = time.monotonic()
        for pid, rule in running_jobs(proc.pid, rules).items():
            first.setdefault(pid, now)
            last[pid], rule_of[pid] = now, rule
        time.sleep(0.05)
    assert proc.returncode == 0, (ref / "segment.log").read_text()[-3000:]
    durs: dict = {}
    for pid, rule in rule_of.items():
        durs.setdefault(rule, []).append(last[pid] - first[pid])
    order = sorted(durs, key=lambda r: min(first[p] for p in rule_of if rule_of[p] == r))
    info = {"durations": {r: round(statistics.median(v), 2) for r, v in durs.items()}, "order": order,
            "wall_s": round(time.monotonic() - t0, 1)}
    (ref / "kill_reference.json").write_text(json.dumps(info, indent=2))
    return ref, info["durations"], order


def chain(entry, work, code, params, e, rules, pool, rng, ref_tree, outputs, dirs, ref_dur, trial0, stop_early,
          single):
    run = work / entry
    prepare(run, code, params, entry == "dvc", e)
    pool, trials, n, t0 = list(pool), [], 0, time.monotonic()

    def pending():
        return {rule for out, rule in outputs.items() if not (run / out).exists()}

    cmd = ENTRY[entry]
    while True:
        res = run_segment(cmd, run, e, run / f"segment{n}.log", rules, pool, pending, rng,
                          ref_dur, single)
        n += 1
        if res["rc"] is not None:
            if res["rc"] != 0:
                tail = (run / f"segment{n - 1}.log").read_text()[-2500:]
                return trials, {"identical": False, "error": f"segment {n - 1} exited {res['rc']}", "log_tail": tail}, time.monotonic() - t0
            break
        vis = check_visible(run, ref_tree, outputs, dirs)
        pool.remove(res["rule"] if res["rule"] in pool else pool[0])
        trials.append({"trial": trial0 + len(trials) + 1, "entry": entry, "rule": res["rule"], "seconds": res["seconds"],
                       "job_running": res["job_running"], "visible": vis["visible"], "visible_bad": vis["bad"],
                       "other_files": vis["other"]})
        print(f"  {entry}: kill {len(trials)} in {res['rule']} at {res['seconds']} s: {vis['visible']} visible, "
              f"{len(vis['bad'])} bad, {len(vis['other'])} other", flush=True)
        if stop_early and not pool:
            return trials, {"identical": None, "skipped": "stopped after the kills (--no-finish)"}, time.monotonic() - t0
        for rcmd in RECOVERY[entry][:-1]:  # the recovery's preparatory commands; its last is the next segment
            r = subprocess.run(rcmd, cwd=run, env=e, capture_output=True, text=True)
            if r.returncode != 0:
                return trials, {"identical": False, "error": f"{' '.join(rcmd)} exited {r.returncode}",
                                "log_tail": (r.stdout + r.stderr)[-2500:]}, time.monotonic() - t0
        cmd = RECOVERY[entry][-1]
    return trials, compare_final(run, ref_tree), time.monotonic() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="kill moments in all, half per chain")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--code", type=Path, default=ROOT, help="where Snakefile, workflow/, pruning/ ... are copied from")
    ap.add_argument("--reference", type=Path, help="a finished uninterrupted run of the same sweep to reuse")
    ap.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary directory, removed)")
    ap.add_argument("--chains", default="snakemake,dvc")
    ap.add_argument("--no-finish", action="store_true", help="smoke: stop each chain after its kills")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/kill.json")
    ap.add_argument("--readme", default="", help="write the summary into this README's kill block")
    ap.add_argument("--from-json", type=Path, help="only write the README block from this earlier kill.json")
    args = ap.parse_args()
    if args.from_json:
        splice_readme(args.readme, "kill", readme_block(json.loads(args.from_json.read_text())))
        return 0

    t_start = time.monotonic()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_kill."))
    work.mkdir(parents=True, exist_ok=True)
    code = work / "code"  # one snapshot of the code for every run (the checkout may change meanwhile)
    if not code.exists():
        prepare(code, args.code.resolve(), {}, False, {})
    e, params, rules = env(work, code), micro_params(), script_rules(code)
    ref, ref_dur, order = reference(work, code, params, e, rules, args.reference)
    e_ref = env(work, ref)
    ref_tree = tree(ref)
    outputs, dirs = dag_outputs(ref, e_ref)
    types = [r for r in order if r in set(outputs.values())] + sorted(set(outputs.values()) - set(order))
    print(f"reference {ref}: {len(ref_tree)} files, {len(outputs)} output names ({len(dirs)} directories), "
          f"rule types in pipeline order: {' '.join(types)}", flush=True)
    jobs = {}
    for log in ref.glob("*.log"):  # jobs per rule in the reference run
        for m in re.finditer(r"^(?:local)?rule (\w+):", log.read_text(), re.M):
            jobs[m.group(1)] = jobs.get(m.group(1), 0) + 1
    single = {r for r, n in jobs.items() if n == 1}
    chains = args.chains.split(",")
    targets = [types[k % len(types)] for k in range(args.trials)]
    pools = {c: targets[i::len(chains)] for i, c in enumerate(chains)}
    rng = random.Random(args.seed)
    trials, finals, walls = [], {}, {}
    for c in chains:
        t, final, wall = chain(c, work, code, params, env(work, work / c), rules, pools[c], rng, ref_tree, outputs,
                               dirs, ref_dur, len(trials), args.no_finish, single)
        trials += t
        finals[c], walls[c] = final, round(wall, 1)
        print(f"{c}: {len(t)} kills, final {'identical' if final.get('identical') else final}", flush=True)
    for t in trials:
        t["identical"] = not t["visible_bad"] and bool(finals[t["entry"]].get("identical"))
    n_ok = sum(t["identical"] for t in trials)
    covered = sorted({t["rule"] for t in trials})
    result = {"summary": f"{n_ok} of {len(trials)} identical", "identical": n_ok, "trials": trials, "finals": finals,
              "chain_wall_s": walls, "wall_s": round(time.monotonic() - t_start, 1),
              "reference": {"dir": str(ref), "files": len(ref_tree), "outputs": len(outputs),
                            "directory_outputs": len(dirs), "durations_s": ref_dur, "order": types,
                            "wall_s": json.loads((ref / "kill_reference.json").read_text()).get("wall_s")
                            if (ref / "kill_reference.json").exists() else None},
              "recovery": {c: [" ".join(x) for x in r] for c, r in RECOVERY.items()}, "ignored": IGNORED,
              "recovery_cmds": list(RECOVERY.values()),
              "rule_types_killed": covered, "seed": args.seed, "params": params}
    print("\n".join(table(result)))
    for c, f in finals.items():
        print(f"{c} final: {json.dumps({k: v for k, v in f.items() if k != 'ignored_json_keys'})[:600]}")
    print(f"ignored: {IGNORED}")
    print(f"rule types killed: {len(covered)} of {len(types)}; missed: {sorted(set(types) - set(covered))}")
    print(f"{result['summary']} (wall {result['wall_s']} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.readme:
        splice_readme(args.readme, "kill", readme_block(result))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if n_ok == len(trials) else 1


def table(result: dict) -> list[str]:
    rows = ["| trial | entry point | rule killed | s into the job | job still running | files visible | verdict |",
            "|---:|---|---|---:|---|---:|---|"]
    for t in result["trials"]:
        verdict = "identical" if t["identical"] else (
            "visible: " + "; ".join(t["visible_bad"][:2]) if t["visible_bad"] else "final differs")
        rows.append(f"| {t['trial']} | {t['entry']} | {t['rule']} | {t['seconds']} | "
                    f"{'yes' if t['job_running'] else 'no (it had just ended)'} | {t['visible']} | {verdict} |")
    return rows


def readme_block(result: dict) -> str:
    trials, ref = result["trials"], result["reference"]
    every = result["identical"] == len(trials)
    ends = [c for c, f in result["finals"].items() if f.get("identical")]
    finals = (f", and {'both chains' if len(ends) == 2 else ' and '.join(ends) or 'no chain'} ended with the "
              f"uninterrupted run's files, sha256 for sha256, and no other file (no temporary, no training state)")
    return (
        f"**Kill and restart** (`bench/bench_kill.py`, seed {result['seed']}): **{result['summary']}**. The micro "
        f"sweep ({len(ref['order'])} rule types; {ref['files']} files under results/, data/ and metrics/, logs and "
        f"benchmark TSVs aside) was SIGKILLed {len(trials)} times, the whole process group, "
        f"{sum(t['entry'] == 'snakemake' for t in trials)} times through `snakemake --cores all` and "
        f"{sum(t['entry'] == 'dvc' for t in trials)} through `dvc repro`, each time during a job of the targeted "
        f"rule ({len(result['rule_types_killed'])} rule types in all) after a seeded random delay, and restarted each "
        f"time with the recovery of \"Experiments with DVC\" (`snakemake --unlock --cores 1`, then "
        f"{' or '.join('`' + ' '.join(r[-1]) + '`' for r in result['recovery_cmds'])}). {'At every kill' if every else 'Where the verdict says identical, at the kill'} each file under "
        f"an output name of the DAG was the uninterrupted run's (same sha256) or absent, each directory output "
        f"whole or absent{finals}. On the shared 2-core machine the two chains took "
        f"{sum(result['chain_wall_s'].values()) / 60:.0f} min and the uninterrupted run "
        f"{(ref.get('wall_s') or 0) / 60:.0f} min.\n\n" + "\n".join(table(result)))


if __name__ == "__main__":
    sys.exit(main())
