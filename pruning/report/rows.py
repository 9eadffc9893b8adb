"""Every measured figure of every model of a run, read once from the pipeline's own output files.

One row per model of the sweep (``pruning.sweep.Sweep.summary_models``: dense first, then expert-pruned and
skipping models, weight-pruned ones, distilled ones), found by its ``Variant``'s files. Every table, plot and
metrics file of the report is a selection or projection of these rows. Token perplexity (the Wanda protocol,
``pruning.eval.perplexity``) and lm-eval's word perplexity (rolling windows, words = whitespace-separated) are
different numbers and are always named apart.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..sweep import Sweep
from ..variant import Variant, parse_base

MC_METRICS = ("acc", "acc_norm")
ROLLING_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
# What metrics/summary.json holds per model (workflow/schemas/summary.schema.yaml).
SUMMARY_FIELDS = ("id", "label", "base", "expert_method", "experts_kept", "experts_total", "skipping", "skip_rate",
                  "method", "pattern", "sparsity", "expert_sparsity", "distilled", "token_ppl", "parameters", "bytes",
                  "calls_per_token", "acc", "acc_norm", "acc_stderr", "acc_avg", "acc_norm_avg", "word_perplexity",
                  "byte_perplexity", "bits_per_byte")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def lm_eval_row(result: dict | None) -> dict:
    """acc / acc_norm (+ stderr) per multiple-choice task, their means, and the rolling task's perplexities."""
    row = {"acc": {}, "acc_norm": {}, "acc_stderr": {}, "acc_avg": None, "acc_norm_avg": None,
           "word_perplexity": None, "byte_perplexity": None, "bits_per_byte": None}
    if not result:
        return row
    for task, r in result["tasks"].items():
        for m in MC_METRICS:
            if m in r:
                row[m][task] = r[m]
        if "acc_stderr" in r:
            row["acc_stderr"][task] = r["acc_stderr"]
        for m in ROLLING_METRICS:
            if m in r and row[m] is None:
                row[m] = r[m]
    if row["acc"]:
        row["acc_avg"] = sum(row["acc"].values()) / len(row["acc"])
    if row["acc_norm"]:
        row["acc_norm_avg"] = sum(row["acc_norm"].values()) / len(row["acc_norm"])
    return row


def lm_eval_info(result: dict | None, task_manifest: dict | None) -> dict | None:
    """lm-eval version, settings and each task's version / few-shot count / documents (and chance accuracy)."""
    if not result:
        return None
    tasks = {}
    for t, r in result["tasks"].items():
        tasks[t] = {"version": r.get("version"), "num_fewshot": r.get("num_fewshot"), "samples": r.get("samples"),
                    "kind": "multiple_choice" if "acc" in r else ("rolling" if "word_perplexity" in r else "other")}
        if task_manifest and t in task_manifest and "chance_acc" in task_manifest[t]:
            tasks[t]["chance_acc"] = task_manifest[t]["chance_acc"]
    return {"version": result["lm_eval_version"], "settings": result["settings"], "tasks": tasks,
            "average": "unweighted mean of acc (and of acc_norm) over the multiple-choice tasks"}


@dataclass
class Results:
    """The rows of one run. ``models``: one per model of the summary, in its order (``rows[0]`` is dense);
    ``tasks``: the task-domain perplexities; ``token_ppl`` and ``lm_eval``: the evaluation settings."""

    sweep: Sweep
    models: list[dict]
    tasks: list[dict]
    token_ppl: dict
    lm_eval: dict | None

    @property
    def dense(self) -> dict:
        return self.models[0]

    def row(self, v: Variant) -> dict:
        return next(r for r in self.models if r["variant"] == v)

    def weight_rows(self) -> list[dict]:
        """The weight-pruning sweep's models (the perplexity-vs-sparsity tables and plot)."""
        return [self.row(v) for v in self.sweep.weight_variants()]

    def whole_rows(self) -> list[dict]:
        """Dense, expert-pruned and skipping models (the expert-pruning table)."""
        return [r for r in self.models if not r["variant"].weight_pruned]

    def distill_rows(self) -> list[dict]:
        """Per distilled model: its pruned row with each tuning's row under ``tuned[tune]``."""
        return [{**self.row(v), "tuned": {t: self.row(v.replace(tune=t)) for t in self.sweep.tunes}}
                for v in self.sweep.distilled()]


def _model_row(v: Variant, ev: dict, dense_ev: dict, show_prop: bool, read) -> dict:
    """One model: the summary's fields, and what the other tables add (relative figures, per-layer rates)."""
    skip = ev.get("skipping") or {}
    parsed = parse_base(v.base)
    dense_calls = dense_ev["expert_usage"]["calls_per_token"]
    row = {
        "variant": v, "id": v.id, "key": v.key, "label": v.label(show_prop), "base": v.base,
        "expert_method": parsed[0] if parsed else None,
        "experts_kept": ev["num_experts"], "experts_total": dense_ev["num_experts"],
        "skipping": bool(skip), "skip_rate": sum(s["rate"] for s in skip.values()) / len(skip) if skip else 0.0,
        "skip_rates": [skip[k]["rate"] for k in sorted(skip, key=int)],
        "method": v.method, "pattern": None, "sparsity": 0.0, "expert_sparsity": 0.0, "distilled": v.tune,
        "token_ppl": ev["token_ppl"], "parameters": ev["parameters"], "bytes": ev["checkpoint_bytes"],
        "calls_per_token": ev["expert_usage"]["calls_per_token"],
        "ppl_rel": ev["token_ppl"] / dense_ev["token_ppl"], "params_rel": ev["parameters"] / dense_ev["parameters"],
        "calls_rel": ev["expert_usage"]["calls_per_token"] / dense_calls, "usage": ev["expert_usage"],
        "block_loss": None, "kept": None, "sparsity_layers": None, "block_error": None, "distill": None,
    }
    if parsed:  # expert-pruned: its objective, and the original index of each kept expert per layer
        search = read(v.whole_base.file("search"))
        row["block_loss"] = search["mean_relative_loss"]
        row["kept"] = [search["layers"][k]["kept"] for k in sorted(search["layers"], key=int)]
    if v.weight_pruned:
        sp = read(v.untuned.file("sparsity"))
        row.update(pattern=v.pattern.kind, sparsity=sp["target_sparsity"], expert_sparsity=sp["expert_sparsity"],
                   sparsity_layers=sp["layers"])
    if v.tune:
        row["distill"] = read(v.file("distill"))
    return row


def load(sweep: Sweep, lm_eval: bool, task_manifest: dict | None = None, read=read_json) -> Results:
    """Read every model of ``sweep`` (``lm_eval``: whether lm-eval results exist)."""
    models = sweep.summary_models()
    show_prop = len({v.prop for v in models if v.weight_pruned}) > 1
    dense_ev = read(models[0].file("ppl"))
    rows = []
    for v in models:
        row = _model_row(v, read(v.file("ppl")), dense_ev, show_prop, read)
        row.update(lm_eval_row(read(v.file("lm_eval")) if lm_eval else None))
        rows.append(row)
    for v in sweep.weight_variants():
        next(r for r in rows if r["variant"] == v)["block_error"] = read(v.file("block_error"))["mean"]
    ppl = {r["variant"]: r["token_ppl"] for r in rows}
    tasks = []
    for v in sweep.task_models():
        ev = read(v.file("task_ppl"))
        tasks.append({"model": v.id, "label": v.label(), "task_ppl": ev["token_ppl"], "dataset": ev["dataset"],
                      "windows": ev["windows"], "token_ppl": ppl.get(v)})
    token_ppl = {"metric": "token perplexity, non-overlapping windows (Wanda protocol)", "dataset": sweep.config["eval"]["dataset"],
                 "split": "test", "seqlen": sweep.config["eval"]["seqlen"], "windows": dense_ev["windows"]}
    info = lm_eval_info(read(models[0].file("lm_eval")) if lm_eval else None, task_manifest)
    return Results(sweep, rows, tasks, token_ppl, info)
