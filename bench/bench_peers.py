"""Side by side against llm-compressor: the pipeline's one-shot runs and its sweep vs llm-compressor's oneshot runs.

Both sides get the same calibration token ids and the same evaluation windows, on the same checkpoints, and are
run interleaved in one session on the same (shared) machine, so only ratios are reported:

* ours: the real pipeline, ``snakemake --cores N`` in a fresh copy of the repository's code (results/ of the
  checkout is never touched) with a params.yaml that turns off everything but weight pruning of the full model
  and its perplexity; its targets are the variants' ``eval/ppl.json``. One single run = calibration + masks (+
  SparseGPT weights) + apply + perplexity of one (method, sparsity); the sweep = 4 methods x 5 patterns in ONE
  run (one shared calibration).
* peer: ``bench/peers/llmc_driver.py`` in llm-compressor's own venv (``bench/peers/install.sh``): load, oneshot
  on the same calibration ids, save the pruned model, token perplexity over the same windows with the pipeline's
  formula. One process per (method, pattern): what a user of oneshot runs.

The calibration ids are the pipeline's own (``calibration_tokens`` of calib.source=builtin, nsamples, seqlen, seed:
checked equal to every run's ``calib/.../tokens.safetensors``), and the windows are ``eval_windows`` of the
test split, as ``evaluate_ppl`` draws them. Wall time and peak RSS of the whole process tree (the entry process and
every descendant, RSS summed, polled every 0.1 s) are measured from outside for both sides.

    bash bench/peers/install.sh                                     # once: bench/out/venv-llmcompressor
    .venv/bin/python bench/bench_peers.py                           # tiny model: single runs + sweep
    .venv/bin/python bench/bench_peers.py --models tiny,random --parts single,sweep --readme README.md
    .venv/bin/python bench/bench_peers.py --from-json bench/out/peers.json --readme README.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
import yaml

from timing import ROOT, splice_readme

from pruning.data.sources import calibration_tokens, eval_windows  # noqa: E402
from pruning.variant import Variant, calib_id  # noqa: E402
from pruning.weights.pattern import Pattern  # noqa: E402

OUT = ROOT / "bench/out"
PEER_PY = OUT / "venv-llmcompressor/bin/python"
DRIVER = ROOT / "bench/peers/llmc_driver.py"
BIN = Path(sys.executable).absolute().parent
CODE = ("Snakefile", "workflow", "pruning", "pyproject.toml")
SINGLES = [("wanda", "0.5"), ("wanda", "0.7"), ("sparsegpt", "0.5"), ("sparsegpt", "0.7")]
SWEEP_METHODS = ["magnitude", "wanda", "sparsegpt", "moe_pruner"]
SWEEP_PATTERNS = ["0.5", "0.6", "0.7", "2:4", "4:8"]
# The peer's method for each of ours: llm-compressor has no MoE-Pruner (router-weighted Wanda); Wanda is closest.
PEER_OF = {"magnitude": "magnitude", "wanda": "wanda", "sparsegpt": "sparsegpt", "moe_pruner": "wanda"}
# llm-compressor 0.14's MagnitudePruningModifier masks: unstructured, channel, filter, block_* (no N:M).
PEER_UNSUPPORTED = {("magnitude", "2:4"): "ValueError: Invalid mask_structure: 2:4",
                    ("magnitude", "4:8"): "ValueError: Invalid mask_structure: 4:8"}
NOISE = 0.01  # relative ppl difference treated as noise
LABEL = {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT", "moe_pruner": "MoE-Pruner"}
RANDOM_ARCH = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                   num_key_value_heads=6, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512)


# -- measurement ---------------------------------------------------------------------------------------------------
def measure(cmd, cwd, env, log: Path, timeout: float) -> dict:
    """Run ``cmd``: wall time, the peak of the summed RSS of its process tree (polled every 0.1 s), and from wait4
    the CPU time (user + system) of every process of the tree and the largest RSS of any one of them. On a shared
    machine CPU time is the steadier measure; wall time is the one a user waits."""
    peak = [0]
    done = threading.Event()
    with open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)

        def poll():
            root = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    procs = [root] + root.children(recursive=True)
                    rss = 0
                    for p in procs:
                        try:
                            rss += p.memory_info().rss
                        except psutil.Error:
                            pass
                    peak[0] = max(peak[0], rss)
                except psutil.Error:
                    pass
                done.wait(0.1)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        _, status, ru = os.wait4(proc.pid, 0)  # rusage of the tree's reaped processes: CPU time, largest RSS
        wall = time.perf_counter() - t0
        killer.cancel()
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        done.set()
        th.join()
    if rc != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))}... exited {rc} (log {log}):\n" + "\n".join(tail))
    return {"wall_s": wall, "peak_rss_mib": peak[0] / 2**20, "cpu_s": ru.ru_utime + ru.ru_stime,
            "max_rss_one_process_mib": ru.ru_maxrss / 1024}


# -- inputs ----------------------------------------------------------------------------------------------------------
def build_random_model(out: Path, tokenizer_from: Path, seed: int) -> Path:
    """A seeded random Mixtral-architecture checkpoint (safetensors), larger than the tiny model, sharing its
    tokenizer (so the pipeline's builtin calibration/evaluation ids are the same ids for both models)."""
    if (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists():
        return out
    from transformers import MixtralConfig, MixtralForCausalLM

    tok_cfg = json.loads((tokenizer_from / "config.json").read_text())
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=tok_cfg["vocab_size"], bos_token_id=tok_cfg.get("bos_token_id"),
                        eos_token_id=tok_cfg.get("eos_token_id"), rope_theta=1e6, **RANDOM_ARCH)
    model = MixtralForCausalLM(cfg)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / f).exists():
            shutil.copy(tokenizer_from / f, tmp / f)
    tmp.rename(out)
    return out


def write_tokens(model_dir: Path, corpus: Path, p: dict, path: Path) -> dict:
    """The pipeline's calibration ids and evaluation windows, for the peer (and checked against our runs)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    c, e = p["calib"], p["eval"]
    calib = calibration_tokens(tok, c["source"], c["nsamples"], c["seqlen"], p["seed"], corpus)
    win = eval_windows(tok, e["dataset"], "test", e["seqlen"], e["max_windows"], corpus)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"calib_ids": calib.contiguous(), "eval_ids": win.contiguous()}, str(path))
    return {"calib_shape": list(calib.shape), "eval_shape": list(win.shape), "file": str(path)}


def bench_params(model_dir: Path, name: str, methods, patterns) -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["model"].update(name=name, name_or_path=str(model_dir))
    p["prune"].update(methods=list(methods), sparsities=[s if ":" in s else float(s) for s in patterns],
                      propagation=["dense"], bases=["full"])
    p["experts"].update(methods=[], task=None)
    p["skipping"] = {"bases": []}
    p["distill"].update(methods=[])
    p["lm_eval"].update(tasks=[])
    p["report"].update(update_readme=False)
    return p


def variants(p: dict, methods, patterns):
    cid = calib_id(p["calib"], p["seed"])
    return {(m, s): Variant(p["model"]["name"], "full", calib=cid, prop="dense", method=m, sp=Pattern.parse(s).token)
            for m in methods for s in patterns}


# -- the two sides ---------------------------------------------------------------------------------------------------
def ours(model_dir: Path, name: str, methods, patterns, corpus: Path, work: Path, calib_ids, cores: int,
         timeout: float) -> dict:
    """One pipeline run (fresh copy of the code, fresh results/) of methods x patterns; targets their ppl.json."""
    from safetensors.torch import load_file

    run = Path(tempfile.mkdtemp(prefix="ours-", dir=work))
    for n in CODE:
        src = ROOT / n
        if src.is_dir():
            shutil.copytree(src, run / n, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, run / n)
    (run / "data/builtin").mkdir(parents=True)
    for f in corpus.iterdir():  # copied after the code: newer than build_corpus.py, so the corpus rule does not run
        shutil.copy(f, run / "data/builtin" / f.name)
    p = bench_params(model_dir, name, methods, patterns)
    (run / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    vs = variants(p, methods, patterns)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(run))
    cmd = [str(BIN / "snakemake"), *[v.file("ppl") for v in vs.values()], "--cores", str(cores)]
    m = measure(cmd, run, env, run / "snakemake.log", timeout)
    cells = {}
    for (meth, s), v in vs.items():
        ppl = json.loads((run / v.file("ppl")).read_text())
        sp = json.loads((run / v.file("sparsity")).read_text())
        cells[f"{meth}@{s}"] = {"token_ppl": ppl["token_ppl"], "windows": ppl["windows"],
                                "tokens_predicted": ppl["tokens_predicted"], "expert_sparsity": sp["expert_sparsity"],
                                "non_expert_sparsity": sp.get("non_expert_sparsity")}
    tok_file = run / f"results/{name}/full/calib/{calib_id(p['calib'], p['seed'])}/tokens.safetensors"
    same = torch.equal(load_file(str(tok_file))["input_ids"], calib_ids)
    if not same:
        raise RuntimeError(f"{tok_file}: the pipeline's calibration ids differ from the ones handed to the peer")
    shutil.rmtree(run, ignore_errors=True)
    return {**m, "cells": cells, "calib_ids_identical": same}


def peer(model_dir: Path, method: str, pattern: str, tokens: Path, work: Path, timeout: float, extra=()) -> dict:
    run = Path(tempfile.mkdtemp(prefix="peer-", dir=work))
    out = run / "result.json"
    cmd = [str(PEER_PY), str(DRIVER), "--model", str(model_dir), "--tokens", str(tokens), "--method", method,
           "--pattern", pattern, "--out", str(out), "--save", str(run / "pruned"), *extra]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    m = measure(cmd, run, env, run / "driver.log", timeout)
    r = json.loads(out.read_text())
    shutil.rmtree(run, ignore_errors=True)
    w = torch.tensor(r.pop("window_nll"), dtype=torch.float64) / (r["tokens_predicted"] / r["windows"])
    r["se_log_ppl"] = float(w.std() / math.sqrt(len(w)))  # across-window standard error of log(ppl)
    return {**m, **r}


# -- orchestration ---------------------------------------------------------------------------------------------------
def run_model(key: str, model_dir: Path, corpus: Path, parts, a, work: Path, report: dict, save):
    p = bench_params(model_dir, key, [], [])
    tokens = work / f"tokens-{key}.safetensors"
    info = write_tokens(model_dir, corpus, p, tokens)
    from safetensors.torch import load_file

    calib_ids = load_file(str(tokens))["calib_ids"]
    rep = report["models"].setdefault(key, {"checkpoint": str(model_dir), "tokens": info})
    cfg = json.loads((model_dir / "config.json").read_text())
    rep["arch"] = {k: cfg.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_local_experts", "num_experts_per_tok", "vocab_size")}
    peer_runs = rep.setdefault("peer_runs", {})

    def peer_cell(meth, s):
        k = f"{meth}@{s}"
        if k not in peer_runs:
            print(f"[{key}] peer {meth} {s}", flush=True)
            peer_runs[k] = peer(model_dir, meth, s, tokens, work, a.timeout, a.peer_args)
            save()
        return peer_runs[k]

    if "dense_peer" not in rep:  # formula check: the peer driver's dense ppl vs the pipeline's evaluation of the same model
        rep["dense_peer"] = peer(model_dir, "dense", "0.5", tokens, work, a.timeout)
    if "single" in parts:
        single = rep.setdefault("single", {})
        for i, (meth, s) in enumerate(SINGLES):
            k = f"{meth}@{s}"
            if k in single:
                continue
            order = ["ours", "peer"] if i % 2 == 0 else ["peer", "ours"]  # alternate who runs first
            row = {}
            for side in order:
                print(f"[{key}] single {side} {meth} {s}", flush=True)
                if side == "ours":
                    row["ours"] = ours(model_dir, key, [meth], [s], corpus, work, calib_ids, a.cores, a.timeout)
                else:
                    row["peer"] = peer_cell(meth, s)
            single[k] = row
            save()
    if "sweep" in parts:
        cells = [(m, s) for m in SWEEP_METHODS for s in SWEEP_PATTERNS]
        distinct = list(dict.fromkeys((PEER_OF[m], s) for m, s in cells if (PEER_OF[m], s) not in PEER_UNSUPPORTED))
        todo = [c for c in distinct if f"{c[0]}@{c[1]}" not in peer_runs
                and not (a.sweep_skip_singles and c in SINGLES)]  # those come from the single runs (--merge)
        half = len(todo) // 2
        for c in todo[:half]:  # the peer's runs are split around our sweep run
            peer_cell(*c)
        if "sweep_ours" not in rep:
            print(f"[{key}] sweep ours: {len(cells)} cells in one run", flush=True)
            rep["sweep_ours"] = ours(model_dir, key, SWEEP_METHODS, SWEEP_PATTERNS, corpus, work, calib_ids,
                                     a.cores, a.timeout)
            save()
        for c in todo[half:]:
            peer_cell(*c)
        rep["sweep_peer_distinct"] = [f"{m}@{s}" for m, s in distinct]
        save()


# -- report ----------------------------------------------------------------------------------------------------------
def fmt_ratio(x):
    return f"{x:.2f}x" if x >= 0.095 else f"{x:.3f}x"


def label(s):
    return Pattern.parse(s).label


def summarize(report: dict) -> tuple[str, dict]:
    """The markdown block and the headline numbers."""
    v = report.get("peer_versions", {})
    lines = [f"Ours (the pipeline, `snakemake --cores {report['cores']}`) vs llm-compressor {v.get('llmcompressor', '?')} "
             f"(transformers {v.get('transformers', '?')}, torch {v.get('torch', '?')}, its own venv), on the same "
             f"calibration ids ({report.get('calib', '')}) and the same evaluation windows ({report.get('eval', '')}), "
             f"run interleaved on one {report['machine']}. Ratios only (the machine is shared). Wall = the whole command "
             "(start-up, calibration, pruning, checkpoint written, perplexity); CPU = user + system time of every "
             "process of the command (steadier than wall on a shared machine); RSS = peak of the summed RSS of the "
             "process tree. The peer prunes the same expert Linear layers (after its own MoE linearisation), with "
             "its defaults otherwise: sequential pipeline, every token through every expert during calibration "
             "(`moe_calibrate_all_experts=True`). Δppl = ours − peer (negative: ours better), and relative. The noise "
             "of a pruned model's ppl over calibration draws was not measured; a cell counts as worse when ours is "
             f"more than {NOISE:.0%} above the peer's.", ""]
    heads = {}
    for key, rep in report["models"].items():
        arch = rep.get("arch", {})
        desc = (f"hidden {arch.get('hidden_size')}, {arch.get('num_hidden_layers')} layers, "
                f"{arch.get('num_local_experts')} experts top-{arch.get('num_experts_per_tok')}")
        title = {"tiny": "the default tiny model (trained)",
                 "random": "a random Mixtral-shaped model (its perplexity is meaningless in absolute terms; times are not)"}
        dense_o = f"{rep['dense_ours']:.3f}" if "dense_ours" in rep else "not measured in this run"
        lines.append(f"**{title.get(key, key)}** ({desc}). Dense token ppl: pipeline {dense_o}, peer driver "
                     f"{rep['dense_peer']['token_ppl']:.3f} (same formula, same windows).")
        lines.append("")
        if rep.get("single"):
            lines += ["| one run | wall ours/peer | CPU ours/peer | peak RSS ours/peer | ppl ours | ppl peer | Δppl | "
                      "expert sparsity ours / peer |", "|---|--:|--:|--:|--:|--:|--:|--:|"]
            for k, row in rep["single"].items():
                meth, s = k.split("@")
                o, pr = row["ours"], row["peer"]
                oc = o["cells"][k]
                lines.append(f"| {LABEL[meth]} {label(s)} | {fmt_ratio(o['wall_s'] / pr['wall_s'])} | "
                             f"{fmt_ratio(o['cpu_s'] / pr['cpu_s'])} | "
                             f"{fmt_ratio(o['peak_rss_mib'] / pr['peak_rss_mib'])} | {oc['token_ppl']:.2f} | "
                             f"{pr['token_ppl']:.2f} | {oc['token_ppl'] - pr['token_ppl']:+.2f} "
                             f"({100 * (oc['token_ppl'] / pr['token_ppl'] - 1):+.1f}%) | "
                             f"{oc['expert_sparsity']:.4f} / {pr.get('saved_expert_sparsity', pr['expert_sparsity']):.4f} |")
            lines.append("")
        if rep.get("sweep_ours"):
            so, pruns = rep["sweep_ours"], rep["peer_runs"]
            cells = so["cells"]
            lines += ["| sweep: ppl ours / peer (Δ) | " + " | ".join(label(s) for s in SWEEP_PATTERNS) + " |",
                      "|---|" + "--:|" * len(SWEEP_PATTERNS)]
            worse = []
            for m in SWEEP_METHODS:
                row = []
                for s in SWEEP_PATTERNS:
                    oc = cells[f"{m}@{s}"]["token_ppl"]
                    pk = f"{PEER_OF[m]}@{s}"
                    if pk in pruns:
                        pp = pruns[pk]["token_ppl"]
                        row.append(f"{oc:.2f} / {pp:.2f} ({100 * (oc / pp - 1):+.1f}%)")
                        if oc / pp - 1 > NOISE:
                            worse.append(f"{LABEL[m]} {label(s)}")
                    else:
                        row.append(f"{oc:.2f} / n/a")
                peer_name = "" if PEER_OF[m] == m else f" (peer: {LABEL[PEER_OF[m]]})"
                lines.append(f"| {LABEL[m]}{peer_name} | " + " | ".join(row) + " |")
            distinct = [f"{PEER_OF[m]}@{s}" for m in SWEEP_METHODS for s in SWEEP_PATTERNS
                        if (PEER_OF[m], s) not in PEER_UNSUPPORTED]
            distinct = list(dict.fromkeys(distinct))
            cell_all = [f"{PEER_OF[m]}@{s}" for m in SWEEP_METHODS for s in SWEEP_PATTERNS
                        if (PEER_OF[m], s) not in PEER_UNSUPPORTED]
            measured = [k for k in distinct if k in pruns]
            # a missing peer run (not measured in the time) counts as the mean of the measured ones: an estimate
            mean = {q: statistics.mean(pruns[k][q] for k in measured) for q in ("wall_s", "cpu_s")}
            est = len(measured) < len(distinct)

            def total(keys, q):
                return sum(pruns[k][q] if k in pruns else mean[q] for k in keys)

            r20, rd = so["wall_s"] / total(cell_all, "wall_s"), so["wall_s"] / total(distinct, "wall_s")
            c20, cd = so["cpu_s"] / total(cell_all, "cpu_s"), so["cpu_s"] / total(distinct, "cpu_s")
            cell_keys = cell_all
            rss = so["peak_rss_mib"] / max(pruns[k]["peak_rss_mib"] for k in measured)
            best70_o = min((cells[f"{m}@0.7"]["token_ppl"], m) for m in SWEEP_METHODS)
            best70_p = min((pruns[f"{m}@0.7"]["token_ppl"], m) for m in ("magnitude", "wanda", "sparsegpt")
                           if f"{m}@0.7" in pruns)
            lines.append("")
            if est:
                lines.append(f"**Estimate:** only {len(measured)} of the peer's {len(distinct)} distinct runs were "
                             f"measured ({', '.join(measured)}); each missing run is counted at the mean of the "
                             "measured ones in the sweep ratios below.")
            lines.append(f"Sweep wall time, ours (one run, {len(cells)} cells, one calibration) / peer: "
                         f"**{fmt_ratio(r20)}** against its {len(cell_keys)} runs for the cells it can fill "
                         f"(MoE-Pruner's cells re-use Wanda's runs; Magnitude at N:M is not available: "
                         f"MagnitudePruningModifier has no N:M mask), {fmt_ratio(rd)} against its "
                         f"{len(distinct)} distinct runs (speed-up {1 / r20:.1f}x and {1 / rd:.1f}x); CPU time {fmt_ratio(c20)} and "
                         f"{fmt_ratio(cd)}. Peak RSS, our sweep / "
                         f"the peer's largest run: {fmt_ratio(rss)}. Best at 70%: ours {LABEL[best70_o[1]]} "
                         f"{best70_o[0]:.2f}, peer {LABEL[best70_p[1]]} {best70_p[0]:.2f}. Cells where ours is worse "
                         f"than the peer's by more than {NOISE:.0%}: {', '.join(worse) if worse else 'none'}.")
            lines.append("")
            heads[key] = {"peer_runs_measured": measured, "estimated": est, "sweep_wall_ratio_vs_cells": r20, "sweep_wall_ratio_vs_distinct": rd, "sweep_rss_ratio": rss,
                          "sweep_cpu_ratio_vs_cells": c20, "sweep_cpu_ratio_vs_distinct": cd,
                          "best70_ours": best70_o, "best70_peer": best70_p, "worse_cells": worse}
    return "\n".join(lines).rstrip(), heads


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "results/tiny/base",
                    help="the trained tiny checkpoint (config.json, model.safetensors, tokenizer.json)")
    ap.add_argument("--corpus", type=Path, default=None,
                    help="the built-in corpus dir (train/validation/test.jsonl); default data/builtin of the checkout, "
                         "else the one beside --model's results/")
    ap.add_argument("--models", default="tiny", help="comma list of tiny, random")
    ap.add_argument("--parts", default="single,sweep", help="comma list of single, sweep")
    ap.add_argument("--random-parts", default=None, help="parts for the random model (default: --parts)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="the random model's weights")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--peer-args", nargs="*", default=[], help="extra llmc_driver.py arguments (e.g. --routed)")
    ap.add_argument("--out", type=Path, default=OUT / "peers.json")
    ap.add_argument("--resume", action="store_true", help="keep the measurements already in --out")
    ap.add_argument("--readme", help="also write the table into this file between <!-- peers:begin/end -->")
    ap.add_argument("--from-json", type=Path, help="only print (and splice) the table of an earlier run's JSON")
    ap.add_argument("--sweep-skip-singles", action="store_true",
                    help="the sweep does not rerun the peer's single-run cells (a separate process measures them)")
    ap.add_argument("--merge", type=Path, nargs="+",
                    help="merge the JSONs of separate runs (e.g. singles and sweep) into --out, then report it")
    a = ap.parse_args()

    if a.merge:
        report = merge([json.loads(f.read_text()) for f in a.merge])
        report["merged_from"] = [str(f) for f in a.merge]
        a.out.write_text(json.dumps(report, indent=1))
    elif a.from_json:
        report = json.loads(a.from_json.read_text())
    else:
        if not PEER_PY.exists():
            sys.exit(f"{PEER_PY} missing: run bash bench/peers/install.sh first")
        corpus = a.corpus
        if corpus is None:
            for c in (ROOT / "data/builtin", a.model.parents[2] / "data/builtin"):
                if (c / "test.jsonl").exists():
                    corpus = c
                    break
        if corpus is None or not (corpus / "test.jsonl").exists():
            sys.exit("no built-in corpus: pass --corpus (snakemake data/builtin/manifest.json builds one)")
        work = OUT / "peers"
        work.mkdir(parents=True, exist_ok=True)
        report = json.loads(a.out.read_text()) if a.resume and a.out.exists() else {"models": {}}
        report.update(cores=a.cores, machine=f"{os.cpu_count()}-core CPU, {psutil.virtual_memory().total / 2**30:.0f} GiB",
                      peer_versions=json.loads((PEER_PY.parents[1] / "versions.json").read_text()),
                      ours_versions={"torch": torch.__version__,
                                     "transformers": __import__("transformers").__version__},
                      corpus=str(corpus))
        p = yaml.safe_load((ROOT / "params.yaml").read_text())
        report["calib"] = f"{p['calib']['source']}, {p['calib']['nsamples']} x {p['calib']['seqlen']}, seed {p['seed']}"
        report["eval"] = f"{p['eval']['max_windows']} windows of {p['eval']['seqlen']} tokens of the test split"

        def save():
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(report, indent=1))

        for key in a.models.split(","):
            model_dir = a.model if key == "tiny" else build_random_model(work / f"mixtral-random-s{a.seed}", a.model, a.seed)
            parts = (a.random_parts or a.parts) if key == "random" else a.parts
            run_model(key, model_dir, corpus, parts.split(","), a, work, report, save)
            rep = report["models"][key]
            if "dense_ours" not in rep:  # the pipeline's own evaluation of the unpruned model
                rep["dense_ours"] = dense_ours(model_dir, key, corpus, work, a)
            save()
    md, heads = summarize(report)
    print(md)
    print(json.dumps(heads, indent=1))
    if a.readme:
        splice_readme(a.readme, "peers", md)


def merge(reports: list[dict]) -> dict:
    """One report from several runs' JSONs: per model, the peer's runs united, other entries from the first that
    has them."""
    out = {k: v for k, v in reports[0].items() if k != "models"}
    out["models"] = {}
    for r in reports:
        for key, rep in r["models"].items():
            m = out["models"].setdefault(key, {})
            for k, v in rep.items():
                if k in ("peer_runs", "single") and isinstance(v, dict):
                    m.setdefault(k, {}).update({kk: vv for kk, vv in v.items() if kk not in m.get(k, {})})
                else:
                    m.setdefault(k, v)
    return out


def dense_ours(model_dir: Path, key: str, corpus: Path, work: Path, a) -> float:
    """The pipeline's perplexity of the unpruned model (rule evaluate_ppl of 'full'), for the formula check."""
    run = Path(tempfile.mkdtemp(prefix="dense-", dir=work))
    for n in CODE:
        src = ROOT / n
        (shutil.copytree(src, run / n, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy(src, run / n))
    (run / "data/builtin").mkdir(parents=True)
    for f in corpus.iterdir():
        shutil.copy(f, run / "data/builtin" / f.name)
    p = bench_params(model_dir, key, ["wanda"], ["0.5"])
    (run / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    target = Variant(key, "full").file("ppl")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(run))
    measure([str(BIN / "snakemake"), target, "--cores", str(a.cores)], run, env,
            run / "snakemake.log", a.timeout)
    ppl = json.loads((run / target).read_text())["token_ppl"]
    shutil.rmtree(run, ignore_errors=True)
    return ppl


if __name__ == "__main__":
    main()
