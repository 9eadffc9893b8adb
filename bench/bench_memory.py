"""Peak memory of every job type against the model's depth, and a sweep inside a memory cgroup a third of the model.

Random-weight checkpoints of two families (Mixtral-shaped; DeepSeek-V3-shaped: shared expert, sigmoid router with
selection bias, group-limited routing, a dense first layer), in the hub's per-expert layout, at two depths, run
through the real pipeline (Snakemake, ``model.offload: always``) on one sweep: MoE-Pruner and SparseGPT masks,
NAEE expert pruning, dynamic skipping, perplexity and lm-eval of every model. Each job's peak RSS
comes from its Snakemake benchmark file. Printed per job type:

- peak RSS at both depths and deep / shallow (target <= 1.2);
- (peak - floor) / (largest decoder layer + one layer's activations) (target <= 2), where floor is the same job's
  peak on a model of the same depth and structure but hidden size 64: the interpreter, torch, transformers,
  lm-eval, the tokenizer and the corpus, which no model size changes.

Then the deep Mixtral-shaped model (``--cap-hidden`` wide) runs the same sweep twice with ``model.offload: auto``:
once uncapped (the model fits: resident), once with Snakemake and all its jobs (one at a time, in both runs) in a cgroup (v1 or v2) whose memory
limit is a third of the checkpoint's size (auto streams the layers); every result file must be equal.

    .venv/bin/python bench/bench_memory.py              # ~30 min on 2 cores; writes bench/out/memory.json
    .venv/bin/python bench/bench_memory.py --quick      # toy sizes, a smoke test of the script itself
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from timing import ROOT, splice_readme

sys.path.insert(0, str(ROOT / "tests"))

OUT = ROOT / "bench/out/memory.json"  # outside DVC's results/, not tracked
JOB_TYPES = ("calibrate", "mask (score methods)", "mask (SparseGPT)", "expert search", "apply masks", "remove experts",
             "skip calibration", "evaluate (perplexity)", "evaluate (lm-eval)", "block error")


def job_type(f: Path) -> str | None:
    """The job type of a Snakemake benchmark file, from its name and where it lies."""
    stem = f.stem.rstrip("0123456789").rstrip("_")
    if stem == "mask":
        return "mask (SparseGPT)" if "sparsegpt" in str(f) else "mask (score methods)"
    if stem == "layer" and "/search/" in str(f):
        return "expert search"
    return {"calibrate": "calibrate", "apply": "apply masks", "apply_experts": "remove experts",
            "skip_calibrate": "skip calibration", "evaluate_ppl": "evaluate (perplexity)",
            "evaluate_task_ppl": "evaluate (perplexity)", "lm_eval": "evaluate (lm-eval)",
            "block_error": "block error"}.get(stem)


IGNORED_KEYS = {"environment", "seconds", "wall_seconds", "elapsed"}


def shapes(family: str, hidden: int, depth: int) -> dict:
    """Config overrides: the family's structure at ``hidden`` width, 8 routed experts of 4 x hidden (Mixtral) or 16 of
    2 x hidden with one shared expert and a dense first layer (DeepSeek-V3), 4 attention heads."""
    common = dict(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=4, num_key_value_heads=4,
                  max_position_embeddings=512)
    if family == "mixtral":
        return {**common, "intermediate_size": 4 * hidden, "num_local_experts": 8}
    return {**common, "intermediate_size": 4 * hidden, "moe_intermediate_size": 2 * hidden, "n_routed_experts": 16,
            "n_group": 4, "topk_group": 2, "kv_lora_rank": hidden // 4, "q_lora_rank": hidden // 2,
            "qk_rope_head_dim": hidden // 16, "qk_nope_head_dim": hidden // 8, "v_head_dim": hidden // 8}


KEEP = {"mixtral": 6, "deepseek_v3": 12}


def build(family: str, hidden: int, depth: int, out: Path) -> Path:
    from families import save_checkpoint, tiny_tokenizer

    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(family, tmp, layout="per_expert", seed=0, tokenizer=tiny_tokenizer(300),
                        **shapes(family, hidden, depth))
        tmp.rename(out)
    return out


def params(family: str, ckpt: Path, offload: str) -> dict:
    p = yaml.safe_load((ROOT / "tests/micro_params.yaml").read_text())
    p["model"] = {"name": "bench", "name_or_path": str(ckpt), "dtype": "float32", "offload": offload}
    p["calib"] = {"source": "builtin", "nsamples": 8, "seqlen": 64, "batch_size": 4}
    p["prune"] = {"methods": ["moe_pruner", "sparsegpt"], "sparsities": [0.5], "propagation": ["dense"],
                  "bases": ["full"], "sparsegpt": {"blocksize": 128, "dampening": 0.01}}
    p["experts"] = {"methods": ["naee"], "keep": [KEEP[family]], "task": None}
    p["skipping"] = {"bases": ["full"]}
    p["distill"] = {"methods": []}
    p["eval"] = {"dataset": "builtin", "seqlen": 64, "max_windows": 8, "batch_size": 4}
    p["lm_eval"] = {"tasks": ["code_next_line"], "batch_size": 8, "max_length": 128, "bootstrap_iters": 10,
                    "local": {"next_line_items": 16, "context_lines": 2, "rolling_docs": 2}}
    p["artifacts"] = {"keep_pruned_checkpoints": False}
    p["report"] = {"update_readme": False}
    return p


def run(work: Path, p: dict, cgroup: Path | None = None, cores: int = 2, allow_failure: bool = False):
    """The sweep in ``work`` (Snakemake on ``cores`` cores); inside ``cgroup`` if given. Returns (wall time, None),
    or with ``allow_failure`` (wall time, what failed) for a sweep that failed."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "params.yaml").write_text(yaml.safe_dump(p))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", str(cores), "--resources", "gpu=0"]
    pre = None
    if cgroup is not None:
        procs = cgroup / "cgroup.procs"
        pre = lambda: procs.write_text(str(os.getpid()))  # noqa: E731  (the child, before exec)
    env = {**os.environ, "PRUNING_WARM_START": "0"}  # cold jobs: the benchmark files' max_rss is then each job's
    t0 = time.time()
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, preexec_fn=pre, env=env)
    wall = time.time() - t0
    (work / "snakemake.out").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        failed = [line.strip() for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error in rule")
                  or "died with <Signals" in line]
        if not allow_failure:
            raise SystemExit(f"sweep in {work} failed (see {work}/snakemake.out):\n{r.stderr[-3000:]}")
        return wall, failed or [f"exit {r.returncode}"]
    return wall, None


def peaks(work: Path) -> dict[str, float]:
    """Largest max_rss (MB) of each job type, from the Snakemake benchmark files."""
    out: dict[str, float] = {}
    for f in (work / "results/bench/benchmarks").rglob("*.tsv"):
        kind = job_type(f)
        if kind is None:
            continue
        row = next(csv.DictReader(f.open(), delimiter="\t"))
        try:
            rss = float(row["max_rss"])
        except ValueError:
            continue
        out[kind] = max(out.get(kind, 0.0), rss)
    return out


def layer_sizes(ckpt: Path) -> tuple[int, int]:
    """(bytes of the largest decoder layer, total tensor bytes), from the shards' safetensors headers."""
    from collections import defaultdict

    from pruning.safetensors_io import read_header

    per_layer, total = defaultdict(int), 0
    for f in sorted(ckpt.glob("*.safetensors")):
        for k, t in read_header(f)[1].items():
            total += t.nbytes
            if k.startswith("model.layers."):
                per_layer[int(k.split(".")[2])] += t.nbytes
    return max(per_layer.values()), total


def comparable(work: Path) -> dict[str, str]:
    """sha256 of every result file, JSON without environment and wall times, safetensors by tensors and metadata
    without the environment."""
    from safetensors import safe_open

    out = {}
    res = work / "results/bench"
    for f in sorted(res.rglob("*")):
        rel = str(f.relative_to(res))
        if not f.is_file() or rel.startswith(("logs/", "benchmarks/")):
            continue
        h = hashlib.sha256()
        if f.suffix == ".json":
            def strip(x):
                if isinstance(x, dict):
                    return {k: strip(v) for k, v in x.items() if k not in IGNORED_KEYS}
                return [strip(v) for v in x] if isinstance(x, list) else x
            h.update(json.dumps(strip(json.loads(f.read_text())), sort_keys=True).encode())
        elif f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                meta = {k: v for k, v in (st.metadata() or {}).items() if k not in IGNORED_KEYS}
                h.update(json.dumps(meta, sort_keys=True).encode())
                for k in sorted(st.keys()):
                    t = st.get_tensor(k)
                    h.update(k.encode() + str(t.dtype).encode() + t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
        else:
            h.update(f.read_bytes())
        out[rel] = h.hexdigest()
    return out


def make_cgroup(limit: int) -> Path:
    """A fresh memory cgroup (v2 if mounted, else v1) limited to ``limit`` bytes."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.is_file():
        cg = Path("/sys/fs/cgroup/pruning-bench-memory")
        cg.mkdir(exist_ok=True)
        (cg / "memory.max").write_text(str(limit))
        (cg / "memory.swap.max").write_text("0")
    else:
        cg = Path("/sys/fs/cgroup/memory/pruning-bench-memory")
        cg.mkdir(exist_ok=True)
        (cg / "memory.limit_in_bytes").write_text(str(limit))
    return cg


def cgroup_peak(cg: Path) -> int | None:
    for name in ("memory.peak", "memory.max_usage_in_bytes"):
        with __import__("contextlib").suppress(OSError, ValueError):
            return int((cg / name).read_text())
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="*", default=["mixtral", "deepseek_v3"])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--depths", type=int, nargs=2, default=[4, 16])
    ap.add_argument("--cap-hidden", type=int, default=768, help="width of the deep model of the cgroup run")
    ap.add_argument("--skip-cgroup", action="store_true")
    ap.add_argument("--reuse-runs", action="store_true",
                    help="cgroup pair: read the sweeps already in --work (their results and snakemake.out), run none")
    ap.add_argument("--merge", action="store_true", help="add to the report already in --out")
    ap.add_argument("--quick", action="store_true", help="toy sizes: checks the script, not the claims")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_memory"))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--readme", help="also write the tables into this file between <!-- bench_memory:begin/end -->")
    ap.add_argument("--from-json", type=Path, help="only print (and splice) the tables of an earlier run's JSON")
    a = ap.parse_args()
    if a.from_json:
        report = json.loads(a.from_json.read_text())
        print(markdown(report))
        if a.readme:
            splice_readme(a.readme, "bench_memory", markdown(report))
        return
    if a.quick:
        a.hidden, a.depths, a.cap_hidden = 128, [2, 4], 256
    shallow, deep = a.depths
    report = {"hidden": a.hidden, "depths": a.depths, "families": {}, "job_types": list(JOB_TYPES)}
    if a.merge and a.out.is_file():
        report = json.loads(a.out.read_text())
    for fam in a.families:
        rows = {}
        for tag, hidden, depth in (("floor", 64, shallow), ("shallow", a.hidden, shallow), ("deep", a.hidden, deep)):
            ckpt = build(fam, hidden, depth, a.work / f"{fam}-h{hidden}-d{depth}")
            wall, _ = run(a.work / f"run-{fam}-{tag}", params(fam, ckpt, "always"))
            layer, total = layer_sizes(ckpt)
            rows[tag] = {"peaks_mb": peaks(a.work / f"run-{fam}-{tag}"), "layer_bytes": layer, "model_bytes": total,
                         "wall_s": round(wall, 1)}
            print(f"{fam} {tag}: {total / 1e9:.2f} GB, largest layer {layer / 1e6:.0f} MB, {wall:.0f} s", flush=True)
            shutil.rmtree(a.work / f"run-{fam}-{tag}")
        acts = 8 * 64 * a.hidden * 4  # one layer's activations: the calibration tokens' hidden states, fp32
        table = {}
        for kind in sorted(rows["deep"]["peaks_mb"]):
            s, d = rows["shallow"]["peaks_mb"].get(kind), rows["deep"]["peaks_mb"][kind]
            floor = rows["floor"]["peaks_mb"].get(kind, 0.0)
            layer_mb = (rows["deep"]["layer_bytes"] + acts) / 2**20
            table[kind] = {"shallow_mb": s, "deep_mb": d, "deep_over_shallow": d / s if s else None, "floor_mb": floor,
                           "net_over_layer": (d - floor) / layer_mb}
        report["families"][fam] = {"runs": rows, "activations_bytes": acts, "table": table}
        save(a.out, report)
    if not a.skip_cgroup:
        fam = "mixtral"
        ckpt = build(fam, a.cap_hidden, deep, a.work / f"{fam}-h{a.cap_hidden}-d{deep}")
        _, total = layer_sizes(ckpt)
        free_run, capped_run = a.work / "run-uncapped", a.work / "run-capped"
        limit = total // 3
        if a.reuse_runs:
            out = (capped_run / "snakemake.out").read_text()
            failed = [line.strip() for line in out.splitlines() if line.startswith("Error in rule")
                      or "died with <Signals" in line] or None
            wall_free = wall_capped = peak = None
        else:
            wall_free, _ = run(free_run, params(fam, ckpt, "auto"), cores=1)
            cg = make_cgroup(limit)
            try:
                wall_capped, failed = run(capped_run, params(fam, ckpt, "auto"), cgroup=cg, cores=1, allow_failure=True)
                peak = cgroup_peak(cg)
            finally:
                with __import__("contextlib").suppress(OSError):
                    cg.rmdir()
        h_free, h_capped = comparable(free_run), comparable(capped_run)
        differ = sorted(k for k in set(h_free) | set(h_capped) if h_free.get(k) != h_capped.get(k))
        both = sorted(set(h_free) & set(h_capped))  # what a failed capped run produced before it stopped
        logs = "\n".join(f.read_text() for f in (capped_run / "results/bench/logs").rglob("calibrate*.log"))
        report["cgroup"] = {
            "family": fam, "hidden": a.cap_hidden, "depth": deep, "model_bytes": total, "limit_bytes": limit,
            "cgroup_peak_bytes": peak, "files_compared": len(h_free), "files_differing": differ, "failed": failed,
            "files_in_both": both, "equal_in_both": [k for k in both if h_free[k] == h_capped[k]],
            "capped_streamed": "ShardSource" in logs, "wall_uncapped_s": wall_free and round(wall_free, 1),
            "wall_capped_s": wall_capped and round(wall_capped, 1),
            "peaks_mb": {"uncapped": peaks(free_run), "capped": peaks(capped_run)}}
        print(f"cgroup: model {total / 1e9:.2f} GB, limit {limit / 1e9:.2f} GB, failed: {failed}; "
              f"{len(h_free)} result files, {len(differ)} differ {differ[:5]}", flush=True)
        if not a.reuse_runs:
            shutil.rmtree(free_run)
            shutil.rmtree(capped_run)
    save(a.out, report)
    print(markdown(report))
    if a.readme:
        splice_readme(a.readme, "bench_memory", markdown(report))


def save(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def markdown(report: dict) -> str:
    """The README table."""
    lines = []
    d0, d1 = report["depths"]
    for fam, r in report["families"].items():
        lines += [f"**{fam}-shaped**, hidden {report['hidden']}, {r['runs']['deep']['model_bytes'] / 1e9:.2f} GB at "
                  f"{d1} layers (largest layer {r['runs']['deep']['layer_bytes'] / 2**20:.0f} MiB)", "",
                  f"| job type | peak RSS, {d0} layers (MiB) | peak RSS, {d1} layers (MiB) | {d1} / {d0} layers "
                  f"| floor (MiB) | (peak - floor) / (layer + activations) |", "|---|---|---|---|---|---|"]
        for kind, t in sorted(r["table"].items()):
            ratio = f"{t['deep_over_shallow']:.2f}" if t["deep_over_shallow"] else "-"
            lines.append(f"| {kind} | {t['shallow_mb']:.0f} | {t['deep_mb']:.0f} | {ratio} | {t['floor_mb']:.0f} "
                         f"| {t['net_over_layer']:.2f} |")
        deep_miss = [k for k, t in sorted(r["table"].items()) if (t["deep_over_shallow"] or 0) > 1.2]
        layer_miss = [k for k, t in sorted(r["table"].items()) if t["net_over_layer"] > 2]
        n = len(r["table"])
        lines += ["", f"{d1} / {d0} layers <= 1.2: {n - len(deep_miss)} of {n} job types"
                  + (f" (not: {', '.join(deep_miss)})" if deep_miss else "")
                  + f"; (peak - floor) / (layer + activations) <= 2: {n - len(layer_miss)} of {n}"
                  + (f" (not: {', '.join(layer_miss)})" if layer_miss else "") + ".", ""]
    c = report.get("cgroup")
    if c:
        peak = f"cgroup peak {c['cgroup_peak_bytes'] / 1e9:.2f} GB; " if c.get("cgroup_peak_bytes") else ""
        capped = ", ".join(f"{k} {v:.0f}" for k, v in sorted(c.get("peaks_mb", {}).get("capped", {}).items()))
        lines.append(f"Cgroup run: {c['family']}-shaped, hidden {c['hidden']}, {c['depth']} layers, "
                     f"{c['model_bytes'] / 1e9:.2f} GB, memory limit {c['limit_bytes'] / 1e9:.2f} GB (a third); {peak}"
                     f"layers streamed: {c['capped_streamed']}; peak RSS (MiB) of the jobs that ran: {capped}. " + (
                         f"It FAILED: {c['failed'][0]} Of the {len(c['files_in_both'])} result files it wrote before, "
                         f"{len(c['equal_in_both'])} equal the uncapped (resident) run's." if c.get("failed") else
                         f"{c['files_compared']} result files compared with the uncapped (resident) run, "
                         f"{len(c['files_differing'])} differ."))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
