import csv
import io
import json
import shutil
from pathlib import Path

from pruning import report, summary
from pruning.atomic import atomic_path, write_json, write_text
from pruning.distill import HISTORY_FIELDS
from pruning.joblog import to_log

log = to_log(snakemake.log[0])
inp, out, p = snakemake.input, snakemake.output, snakemake.params
dense = json.load(open(inp.dense))
from safetensors.torch import load_file

from pruning.diagnose import channel_outlier_ratio

rows = report.rows(p.variants, inp.variants, inp.sparsity, inp.block_error)
outliers = [channel_outlier_ratio(load_file(f)["gate_up.sum_x2"]) for f in inp.calib_stats]

header = (
    f"Model `{p.model}`, calibration `{p.calib_id}`, evaluation: token perplexity on the `{p.eval['dataset']}` "
    f"test split, {dense['windows']} non-overlapping windows of {p.eval['seqlen']} tokens."
)
if inp.base_report:
    b = json.load(open(inp.base_report[0]))
    header += (
        f"\n\nEmbedded tiny Mixtral ({b['parameters']:,} parameters, trained on {b['train_tokens']:,} tokens in "
        f"{b['train_seconds'] / 60:.1f} min): validation token perplexity **{b['validation_ppl']:.2f}** vs "
        f"**{b['unigram_ppl']:.2f}** for a unigram model of the training split."
    )
for r, v in zip(rows, p.variants):  # weight pruning on an expert-pruned model: named in the method column
    if v["base"] != "full":
        r["method"] = f"{r['method']}@{v['base']}"
report.LABELS.update({f"{m}@{b}": f"{report.LABELS.get(m, m)} on {report.model_label(b)}"
                      for b in {v["base"] for v in p.variants} if b != "full" for m in {v["method"] for v in p.variants}})

bases = p.expert_bases
reductions = {b: json.load(open(f)) for b, f in zip(bases, inp.reductions)}
searches = {b: json.load(open(f)) for b, f in zip(bases, inp.searches)}
erows = report.expert_rows(p.models, inp.models, reductions, searches)
trows = report.task_rows(p.models, inp.models)
table = report.markdown(rows, dense["token_ppl"], header, outliers) if rows else header + "\n"
table += "\n" + report.experts_markdown(erows, trows, p.eval)
drows = report.distill_rows(p.distilled, p.tunes, dense["token_ppl"], inp.distill_pruned, inp.distill_eval, inp.distill_info)
table += "\n" + report.distill_markdown(drows, p.tunes, dense["token_ppl"], p.distill)
if rows:
    report.plot(rows, dense["token_ppl"], out.plot)
else:
    report.plot([{"propagation": "dense", "method": "dense", "label": "0%", "target_sparsity": 0.0, "token_ppl": dense["token_ppl"]}],
                dense["token_ppl"], out.plot)
evals = {m: json.load(open(f)) for (m, ds), f in zip(p.models, inp.models) if ds == "ppl"}
panels = [("dense", evals["full"])]
naee = sorted((b for b in bases if b.startswith("naee-k") and not b.endswith("-task")), key=lambda b: int(b.split("-k")[1]))
pick = naee[0] if naee else (bases[0] if bases else None)
if pick:
    panels.append((report.model_label(pick), evals[pick]))
for b in ([pick] if pick else []) + ["full"]:
    if f"{b}/skip" in evals and len(panels) < 4:
        panels.append((report.model_label(f"{b}/skip"), evals[f"{b}/skip"]))
report.usage_plot(panels, dense["num_experts"], out.usage_plot)

# DVC flattens nested keys with '.', so keys carry no dots: unpruned.token_ppl, dense.wanda.sp50.token_ppl
metrics = {"unpruned": {"token_ppl": dense["token_ppl"]}}
for r in rows:
    metrics.setdefault(r["propagation"], {}).setdefault(r["method"], {})[report.metric_key(r["sparsity"])] = {
        "token_ppl": r["token_ppl"], "expert_sparsity": r["expert_sparsity"], "block_error": r["block_error"]}
for r in erows:
    if r["model"] != "full":
        metrics.setdefault("experts", {})[r["model"].replace("/", "_")] = {
            "token_ppl": r["token_ppl"], "parameters": r["parameters"], "calls_per_token_rel": r["calls_rel"],
            "skip_rate": r["skip_rate"]}
for r in trows:
    metrics.setdefault("task", {})[r["model"]] = {"task_ppl": r["task_ppl"]}
for r in drows:  # distilled.<base>.<prop>.<method>.<sparsity>.{pruned_ppl, kd_ppl, kd_gap_recovered, ...}
    m = {"pruned_ppl": r["pruned_ppl"]}
    for t in p.tunes:
        m.update({f"{t}_ppl": r[t]["token_ppl"], f"{t}_gap_recovered": r[t]["gap_recovered"]})
    metrics.setdefault("distilled", {}).setdefault(r["base"], {}).setdefault(r["prop"], {}).setdefault(
        r["method"], {})[report.metric_key(r["sp"])] = m
write_json(out.json, metrics)
runs = []
for i, v in enumerate(p.distilled):  # DVC plots: one loss-curve CSV per tuning run in metrics/distill/
    for j, t in enumerate(p.tunes):
        k = i * len(p.tunes) + j
        with atomic_path(out.distill_curves[k]) as tmp:
            shutil.copyfile(inp.distill_history[k], tmp)
        runs.append({"label": f"{drows[i]['label']} {drows[i]['sparsity_label']}, {report.TUNE_LABELS[t]}", "variant": i,
                     "tune": t, "history": report.read_history(inp.distill_history[k])})
if not runs:
    write_text(out.distill_curves[0], ",".join(HISTORY_FIELDS) + "\n")
for stale in set(Path("metrics/distill").glob("*.csv")) - {Path(f) for f in out.distill_curves}:
    stale.unlink()  # curves of runs this configuration no longer has
report.distill_plot(runs, out.distill_plot)
ebuf = io.StringIO()
efields = ["model", "experts", "skipping", "token_ppl", "parameters", "bytes", "calls_per_token", "calls_rel", "skip_rate", "block_loss"]
ew = csv.DictWriter(ebuf, fieldnames=efields, extrasaction="ignore", lineterminator="\n")
ew.writeheader()
ew.writerows(erows)
write_text(out.experts_csv, ebuf.getvalue())

# The summary: one row per model, the full table, accuracy and per-expert-sparsity plots.
srows = summary.rows(p.entries)
token_ppl = {"metric": "token perplexity, non-overlapping windows (Wanda protocol)", "dataset": p.eval["dataset"],
             "split": "test", "seqlen": p.eval["seqlen"], "windows": dense["windows"]}
first_lm = next((e["lm_eval"] for e in p.entries.values() if e.get("lm_eval")), None)
task_manifest = json.load(open(inp.lm_tasks[0])) if inp.lm_tasks else None
lm_info = summary.lm_eval_info(json.load(open(first_lm)) if first_lm else None, task_manifest)
doc = summary.summary(srows, p.model, token_ppl, lm_info)
summary.validate(doc, inp.schema)
write_json(out.summary_json, doc)
write_text(out.summary_csv, summary.to_csv(srows))
full_table = summary.markdown(srows, token_ppl, lm_info)
write_text(out.table, table + "\n" + full_table)
chance = [t["chance_acc"] for t in (lm_info or {}).get("tasks", {}).values() if "chance_acc" in t]
summary.accuracy_plot(srows, out.acc_plot, sum(chance) / len(chance) if chance else None)
panels = []
for eid, e in p.entries.items():
    if e["kind"] == "variant":
        kept = None
        if e["base"] != "full":
            kept_by_layer = searches[e["base"]]["layers"]
            kept = [kept_by_layer[k]["kept"] for k in sorted(kept_by_layer, key=int)]
        label = next(r["label"] for r in srows if r["id"] == eid)
        panels.append((label, summary.expert_sparsity_matrix(json.load(open(e["sparsity"])), kept, dense["num_experts"])))
summary.expert_sparsity_plot(panels[:6], out.sparsity_plot)

buf = io.StringIO()
fields = ["propagation", "method", "sparsity", "target_sparsity", "expert_sparsity", "token_ppl", "block_error"]
w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
w.writeheader()
w.writerow({"propagation": "none", "method": "dense", "sparsity": "0", "target_sparsity": 0.0, "expert_sparsity": 0.0,
            "token_ppl": dense["token_ppl"]})
w.writerows(rows)
write_text(out.csv, buf.getvalue())
log.info("wrote %d rows", len(rows))
