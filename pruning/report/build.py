"""The report pipeline: a run's rows (``rows.load``) to every file of metrics/: the DVC metrics (summary.json,
ppl.json), the CSVs DVC plots, the tables (results.md) and the figures. ``build`` is the one entry point."""
from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

from ..atomic import atomic_path, write_json, write_text
from ..calib.stats import channel_outlier_ratio
from ..distill import HISTORY_FIELDS
from ..methods import TUNES
from ..sweep import Sweep
from . import plots, tables
from .rows import MC_METRICS, SUMMARY_FIELDS, Results, load, read_json

SCHEMA_VERSION = 1
CSV_FIELDS = ["id", "label", "base", "expert_method", "experts_kept", "experts_total", "skipping", "skip_rate", "method",
              "pattern", "sparsity", "expert_sparsity", "distilled", "token_ppl", "word_perplexity", "byte_perplexity",
              "bits_per_byte", "acc_avg", "acc_norm_avg", "parameters", "bytes", "calls_per_token"]
PPL_FIELDS = ["propagation", "method", "sparsity", "target_sparsity", "expert_sparsity", "token_ppl", "block_error"]
EXPERT_FIELDS = ["model", "experts", "skipping", "token_ppl", "parameters", "bytes", "calls_per_token", "calls_rel",
                 "skip_rate", "block_loss"]


def _csv(fields: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _weights_key(v) -> str:
    """ppl.json's method level: the method, '@<base>' when pruned on an expert-pruned model."""
    return v.method if v.base == "full" else f"{v.method}@{v.base}"


def ppl_metrics(results: Results) -> dict:
    """metrics/ppl.json: token perplexity per propagation / method / sparsity, per expert-pruned or skipping model,
    per task model, and before/after distillation. Keys carry no dots (DVC flattens nested keys with '.')."""
    metrics = {"unpruned": {"token_ppl": results.dense["token_ppl"]}}
    for r in results.weight_rows():
        v = r["variant"]
        metrics.setdefault(v.prop, {}).setdefault(_weights_key(v), {})[v.pattern.metric_key] = {
            "token_ppl": r["token_ppl"], "expert_sparsity": r["expert_sparsity"], "block_error": r["block_error"]}
    for r in results.whole_rows()[1:]:
        metrics.setdefault("experts", {})[r["key"]] = {"token_ppl": r["token_ppl"], "parameters": r["parameters"],
                                                       "calls_per_token_rel": r["calls_rel"], "skip_rate": r["skip_rate"]}
    for r in results.tasks:
        metrics.setdefault("task", {})[r["model"]] = {"task_ppl": r["task_ppl"]}
    for r in results.distill_rows():
        v, m = r["variant"], {"pruned_ppl": r["token_ppl"]}
        for t, tuned in r["tuned"].items():
            m.update({f"{t}_ppl": tuned["token_ppl"],
                      f"{t}_gap_recovered": tables.gap_recovered(results.dense["token_ppl"], r["token_ppl"], tuned["token_ppl"])})
        metrics.setdefault("distilled", {}).setdefault(v.base, {}).setdefault(v.prop, {}).setdefault(
            v.method, {})[v.pattern.metric_key] = m
    return metrics


def summary(results: Results, model: str) -> dict:
    """metrics/summary.json: one entry per model by its key, the evaluation settings, the dense model's key."""
    return {"schema_version": SCHEMA_VERSION, "model": model, "token_ppl": results.token_ppl, "lm_eval": results.lm_eval,
            "dense": results.dense["key"],
            "variants": {r["key"]: {k: r[k] for k in SUMMARY_FIELDS} for r in results.models}}


def summary_csv(rows: list[dict]) -> str:
    """One row per model; per-task columns acc_<task>, acc_norm_<task>."""
    tasks = list(dict.fromkeys(t for r in rows for t in r["acc"]))
    flat = []
    for r in rows:
        row = {k: ("" if r[k] is None else r[k]) for k in CSV_FIELDS}
        row.update({f"{m}_{t}": r[m].get(t, "") for t in tasks for m in MC_METRICS})
        flat.append(row)
    return _csv(CSV_FIELDS + [f"{m}_{t}" for t in tasks for m in MC_METRICS], flat)


def validate(doc: dict, schema_path) -> None:
    import jsonschema
    import yaml

    with open(schema_path) as f:
        jsonschema.Draft202012Validator(yaml.safe_load(f)).validate(doc)


def header(results: Results, config: dict, base_report: dict | None) -> str:
    e = config["eval"]
    text = (f"Model `{results.sweep.model}`, calibration `{results.sweep.cid}`, evaluation: token perplexity on the "
            f"`{e['dataset']}` test split, {results.token_ppl['windows']} non-overlapping windows of {e['seqlen']} tokens.")
    if base_report:
        b = base_report
        text += (
            f"\n\nEmbedded tiny MoE ({b['parameters']:,} parameters, trained on {b['train_tokens']:,} tokens, "
            f"{b['train_steps']:,} steps): validation token perplexity **{b['validation_ppl']:.2f}** vs "
            f"**{b['unigram_ppl']:.2f}** for a unigram model of the training split."
        )
    return text


def usage_panels(results: Results) -> list[tuple[str, dict]]:
    """Dense, the NAEE model that keeps the fewest experts (else the first expert-pruned one), and skipping on
    either, at most four panels."""
    rows = {r["id"]: r for r in results.whole_rows()}
    bases = results.sweep.expert_bases()
    naee = sorted((b for b in bases if b.startswith("naee-k") and not b.endswith("-task")), key=lambda b: int(b.split("-k")[1]))
    pick = naee[0] if naee else (bases[0] if bases else None)
    panels = [(rows["full"]["label"], rows["full"]["usage"])]
    if pick:
        panels.append((rows[pick]["label"], rows[pick]["usage"]))
    for b in ([pick] if pick else []) + ["full"]:
        if f"{b}/skip" in rows and len(panels) < 4:
            panels.append((rows[f"{b}/skip"]["label"], rows[f"{b}/skip"]["usage"]))
    return panels


def read_history(path) -> list[dict]:
    with open(path) as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


def build(config: dict, out, *, lm_eval: bool, calib_stats: list[str], base_report: str | None, lm_tasks: str | None,
          schema) -> Results:
    """Read the run's outputs and write every report file. ``out``: the output paths by name (see
    workflow/rules/report.smk); ``calib_stats``: the dense model's per-layer calibration statistics."""
    from safetensors.torch import load_file

    results = load(Sweep(config), lm_eval, read_json(lm_tasks) if lm_tasks else None)
    outliers = [channel_outlier_ratio(load_file(f)["gate_up.sum_x2"]) for f in calib_stats]
    head = header(results, config, read_json(base_report) if base_report else None)

    # metrics and CSVs
    write_json(out["ppl_json"], ppl_metrics(results))
    dense_row = {"propagation": "none", "method": "dense", "sparsity": "0", "target_sparsity": 0.0, "expert_sparsity": 0.0,
                 "token_ppl": results.dense["token_ppl"]}
    weight_csv = [{**r, "propagation": r["variant"].prop, "method": _weights_key(r["variant"]), "sparsity": r["variant"].sp,
                   "target_sparsity": r["sparsity"]} for r in results.weight_rows()]
    write_text(out["ppl_csv"], _csv(PPL_FIELDS, [dense_row] + weight_csv))
    write_text(out["experts_csv"], _csv(EXPERT_FIELDS, [{**r, "model": r["id"], "experts": r["experts_kept"]}
                                                        for r in results.whole_rows()]))
    doc = summary(results, config["model"]["name"])
    validate(doc, schema)
    write_json(out["summary_json"], doc)
    write_text(out["summary_csv"], summary_csv(results.models))
    write_text(out["table"], tables.results_markdown(results, head, outliers, config["eval"], config["distill"]))

    # distillation: one loss-curve CSV per tuned model for DVC plots, in sweep order; stale ones removed
    tuned = results.sweep.tuned()
    for v, path in zip(tuned, out["distill_curves"]):
        with atomic_path(path) as tmp:
            shutil.copyfile(v.file("history"), tmp)
    if not tuned:
        write_text(out["distill_curves"][0], ",".join(HISTORY_FIELDS) + "\n")
    for stale in set(Path("metrics/distill").glob("*.csv")) - {Path(f) for f in out["distill_curves"]}:
        stale.unlink()  # curves of runs this configuration no longer has

    for name, (fig, tight) in figures(results).items():
        plots.save(fig, out[name], tight_bbox=tight)
    return results


def figures(results: Results) -> dict:
    """Every figure of the report by its output name: (matplotlib Figure, whether saved with a tight bounding box)."""
    dense_ppl, num_experts = results.dense["token_ppl"], results.dense["experts_kept"]
    points = [{"prop": r["variant"].prop, "series": r["variant"].method_label, "label": r["variant"].pattern.label,
               "x": r["sparsity"], "y": r["token_ppl"]} for r in results.weight_rows()]
    points = points or [{"prop": "dense", "series": "dense", "label": "0%", "x": 0.0, "y": dense_ppl}]
    runs = [{"label": f"{r['variant'].method_label} {r['variant'].pattern.label}, {TUNES[t]}", "variant": i, "tune": t,
             "history": read_history(tuned["variant"].file("history"))}
            for i, r in enumerate(results.distill_rows()) for t, tuned in r["tuned"].items()]
    chance = [t["chance_acc"] for t in (results.lm_eval or {}).get("tasks", {}).values() if "chance_acc" in t]
    panels = [(r["label"], plots.expert_sparsity_matrix(r["sparsity_layers"], r["kept"], num_experts))
              for r in results.models if r["variant"].weight_pruned and not r["variant"].tune]
    return {
        "ppl_plot": (plots.ppl_figure(points, dense_ppl), False),
        "usage_plot": (plots.usage_figure(usage_panels(results), num_experts), True),
        "distill_plot": (plots.distill_figure(runs), False),
        "acc_plot": (plots.accuracy_figure(results.models, sum(chance) / len(chance) if chance else None), False),
        "sparsity_plot": (plots.expert_sparsity_figure(panels[:6]), True),
    }
