"""One row per evaluated model (dense, expert-pruned, skipping, weight-pruned, distilled): metrics/summary.json,
metrics/summary.csv, the full Markdown table and the accuracy / per-expert-sparsity plots.

Every figure comes from the pipeline's own evaluation files. Token perplexity (the Wanda protocol, pruning.evaluate)
and lm-eval's word perplexity (rolling windows, words = whitespace-separated) are different numbers and are
always named apart.
"""
from __future__ import annotations

import csv
import io
import json

from .masks import Pattern
from .params import parse_base
from .report import EXPERT_LABELS, LABELS, TUNE_LABELS, _sp_label, metric_key, model_label

SCHEMA_VERSION = 1
MC_METRICS = ("acc", "acc_norm")
ROLLING_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def entry_key(entry: dict) -> str:
    """Dot- and slash-free key of a row (DVC flattens metrics with '.'): 'full', 'naee-k6_skip',
    'full_dense_moe_pruner_sp50', 'full_dense_moe_pruner_sp50_kd'."""
    if entry["kind"] == "model":
        return entry["model"].replace("/", "_")
    key = f"{entry['base']}_{entry['prop']}_{entry['method']}_{metric_key(entry['sp'])}"
    return key + (f"_{entry['tune']}" if entry.get("tune") else "")


def _label(entry: dict, props: set[str]) -> str:
    if entry["kind"] == "model":
        return model_label(entry["model"])
    label = f"{LABELS.get(entry['method'], entry['method'])} {_sp_label(entry['sp'])}"
    if entry["base"] != "full":
        label += f" on {model_label(entry['base'])}"
    if len(props) > 1:
        label += f" ({entry['prop']})"
    return label + (f" + {TUNE_LABELS[entry['tune']]}" if entry.get("tune") else "")


def rows(entries: dict[str, dict], read=lambda p: json.load(open(p))) -> list[dict]:
    """``entries``: id -> {kind: model|variant|distilled, files (ppl, sparsity, lm_eval) and sweep fields}."""
    props = {e["prop"] for e in entries.values() if e["kind"] != "model"}
    dense = read(entries["full"]["ppl"])
    out = []
    for eid, e in entries.items():
        ev = read(e["ppl"])
        base = e["model"].removesuffix("/skip") if e["kind"] == "model" else e["base"]
        parsed = parse_base(base) if base != "full" else None
        skip = ev.get("skipping") or {}
        row = {
            "id": eid, "key": entry_key(e), "label": _label(e, props), "base": base,
            "expert_method": parsed[0] if parsed else None,
            "experts_kept": ev["num_experts"], "experts_total": dense["num_experts"],
            "skipping": bool(skip), "skip_rate": sum(v["rate"] for v in skip.values()) / len(skip) if skip else 0.0,
            "method": e.get("method"), "pattern": None, "sparsity": 0.0, "expert_sparsity": 0.0,
            "distilled": e.get("tune"),
            "token_ppl": ev["token_ppl"], "parameters": ev["parameters"], "bytes": ev["checkpoint_bytes"],
            "calls_per_token": ev["expert_usage"]["calls_per_token"],
        }
        if e["kind"] != "model":
            p = Pattern.parse(e["sp"].replace("of", ":"))
            sp = read(e["sparsity"])
            row.update(pattern=str(p) if p.is_nm else "unstructured", sparsity=sp["target_sparsity"],
                       expert_sparsity=sp["expert_sparsity"])
        row.update(lm_eval_row(read(e["lm_eval"]) if e.get("lm_eval") else None))
        out.append(row)
    return out


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


def summary(rows_: list[dict], model: str, token_ppl: dict, lm_info: dict | None) -> dict:
    return {"schema_version": SCHEMA_VERSION, "model": model, "token_ppl": token_ppl, "lm_eval": lm_info,
            "dense": rows_[0]["key"], "variants": {r["key"]: {k: v for k, v in r.items() if k != "key"} for r in rows_}}


def validate(obj: dict, schema_path) -> None:
    import jsonschema
    import yaml

    schema = yaml.safe_load(open(schema_path))
    jsonschema.Draft202012Validator(schema).validate(obj)


CSV_FIELDS = ["id", "label", "base", "expert_method", "experts_kept", "experts_total", "skipping", "skip_rate", "method",
              "pattern", "sparsity", "expert_sparsity", "distilled", "token_ppl", "word_perplexity", "byte_perplexity",
              "bits_per_byte", "acc_avg", "acc_norm_avg", "parameters", "bytes", "calls_per_token"]


def to_csv(rows_: list[dict]) -> str:
    """One row per model; per-task columns acc_<task>, acc_norm_<task>."""
    tasks = list(dict.fromkeys(t for r in rows_ for t in r["acc"]))
    fields = CSV_FIELDS + [f"{m}_{t}" for t in tasks for m in MC_METRICS]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows_:
        flat = {k: ("" if r[k] is None else r[k]) for k in CSV_FIELDS}
        flat.update({f"{m}_{t}": r[m].get(t, "") for t in tasks for m in MC_METRICS})
        w.writerow(flat)
    return buf.getvalue()


def _f(x, fmt) -> str:
    return "" if x is None else format(x, fmt)


def markdown(rows_: list[dict], token_ppl: dict, lm_info: dict | None) -> str:
    """The full table: every model with its token perplexity, lm-eval word perplexity and accuracies."""
    tasks = list(dict.fromkeys(t for r in rows_ for t in r["acc"]))
    has_word = any(r["word_perplexity"] is not None for r in rows_)
    lines = ["All models, one evaluation setting (the dense model measured in the same run). **token ppl**: token "
             f"perplexity, {token_ppl['windows']} non-overlapping windows of {token_ppl['seqlen']} tokens of the "
             f"`{token_ppl['dataset']}` test split (the Wanda protocol)."]
    if lm_info:
        s = lm_info["settings"]
        desc = []
        for t, ti in lm_info["tasks"].items():
            d = f"`{t}` v{ti['version']}, {ti['num_fewshot']}-shot, {ti['samples']} docs"
            if "chance_acc" in ti:
                d += f", chance acc {ti['chance_acc']:.0%}"
            desc.append(d)
        lines[0] += (f" lm-eval {lm_info['version']} (max_length {s['max_length']}, batch {s['batch_size']}"
                     + (f", limit {s['limit']}" if s.get("limit") else "") + "): " + "; ".join(desc) + ".")
        if has_word:
            lines[0] += (" **word ppl**: lm-eval's rolling-window word perplexity (words = whitespace-separated; not "
                         "comparable with token perplexity).")
        if tasks:
            lines[0] += " acc / acc_norm (length-normalised) in %; avg = " + lm_info["average"] + "."
    head = ["model", "experts", "weights", "token ppl"] + (["word ppl (lm-eval)"] if has_word else [])
    for t in tasks:
        head += [f"{t} acc", f"{t} acc_norm"]
    if len(tasks) > 1:
        head += ["avg acc", "avg acc_norm"]
    head += ["parameters", "checkpoint"]
    lines += ["", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows_:
        weights = "dense" if r["pattern"] is None else (
            f"{r['pattern']}" if r["pattern"] != "unstructured" else f"{r['sparsity']:.0%}")
        if r["distilled"]:
            weights += f", {TUNE_LABELS[r['distilled']]}"
        cells = [r["label"], f"{r['experts_kept']}/{r['experts_total']}" + (" + skip" if r["skipping"] else ""), weights,
                 f"{r['token_ppl']:.2f}"]
        if has_word:
            cells.append(_f(r["word_perplexity"], ",.0f"))
        for t in tasks:
            cells += [_f(r["acc"].get(t) and 100 * r["acc"][t], ".1f"), _f(r["acc_norm"].get(t) and 100 * r["acc_norm"][t], ".1f")]
        if len(tasks) > 1:
            cells += [_f(r["acc_avg"] and 100 * r["acc_avg"], ".1f"), _f(r["acc_norm_avg"] and 100 * r["acc_norm_avg"], ".1f")]
        cells += [f"{r['parameters']:,}", f"{r['bytes'] / 2**20:.2f} MiB"]
        lines.append("| " + " | ".join(cells) + " |")
    se = [r["acc_stderr"] for r in rows_ if r["acc_stderr"]]
    if se:
        lo = min(v for d in se for v in d.values())
        hi = max(v for d in se for v in d.values())
        lines += ["", f"Standard error of each accuracy (lm-eval bootstrap): {100 * lo:.1f} to {100 * hi:.1f} points."]
    return "\n".join(lines) + "\n"


def accuracy_plot(rows_: list[dict], path, chance: float | None = None) -> None:
    """Mean zero-shot accuracy vs sparsity: weight pruning (x = expert-weight sparsity, one line per method and
    base; N:M as crosses) and expert pruning (x = fraction of experts removed); dense and chance as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_path

    have = [r for r in rows_ if r["acc_avg"] is not None]
    dense = rows_[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    groups: dict[str, list[dict]] = {}
    for r in have:
        if r["pattern"] is not None:
            name = LABELS.get(r["method"], r["method"]) + ("" if r["base"] == "full" else f" on {model_label(r['base'])}")
            name += f" + {TUNE_LABELS[r['distilled']]}" if r["distilled"] else ""
            groups.setdefault(name, []).append(r)
    for i, (name, sub) in enumerate(groups.items()):
        un = sorted((r for r in sub if r["pattern"] == "unstructured"), key=lambda r: r["sparsity"])
        pts = [(0.0, dense["acc_avg"])] + [(r["sparsity"], r["acc_avg"]) for r in un]
        axes[0].plot(*zip(*pts), marker="o", color=f"C{i}", label=name)
        for r in sub:
            if r["pattern"] != "unstructured":
                axes[0].scatter([r["expert_sparsity"]], [r["acc_avg"]], marker="x", color=f"C{i}")
                axes[0].annotate(r["pattern"], (r["expert_sparsity"], r["acc_avg"]), textcoords="offset points",
                                 xytext=(4, 2), fontsize=7)
    axes[0].set_xlabel("expert-weight sparsity (x = N:M)")
    egroups: dict[str, list[dict]] = {}
    for r in have:
        if r["pattern"] is None and r["expert_method"]:
            egroups.setdefault(EXPERT_LABELS.get(r["expert_method"], r["expert_method"]) + (" + skipping" if r["skipping"] else "")
                               + (" (task)" if r["base"].endswith("-task") else ""), []).append(r)
    for i, (name, sub) in enumerate(egroups.items()):
        sub = sorted(sub, key=lambda r: r["experts_kept"], reverse=True)
        pts = [(0.0, dense["acc_avg"])] + [(1 - r["experts_kept"] / r["experts_total"], r["acc_avg"]) for r in sub]
        axes[1].plot(*zip(*pts), marker="o", color=f"C{i}", label=name)
    for r in have:
        if r["id"] == "full/skip":
            axes[1].scatter([0.0], [r["acc_avg"]], marker="s", color="k", label="dense + skipping")
    axes[1].set_xlabel("fraction of experts removed")
    for ax in axes:
        ax.axhline(dense["acc_avg"], color="k", ls="--", lw=1, label="dense")
        if chance is not None:
            ax.axhline(chance, color="grey", ls=":", lw=1, label="chance")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("mean zero-shot accuracy (lm-eval acc)")
    axes[0].set_title("weight pruning", fontsize=9)
    axes[1].set_title("expert pruning", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def expert_sparsity_matrix(sparsity: dict, kept: list[list[int]] | None, num_experts: int):
    """(layers, original experts) achieved sparsity of each expert: the mean over its gate, up and down matrices
    (equal sizes); 1.0 where expert pruning removed the expert."""
    out = []
    for i in sorted(sparsity["layers"], key=int):
        per = sparsity["layers"][i]["experts"]
        row = [1.0] * num_experts
        for j, s in enumerate(per):
            e = kept[int(i)][j] if kept else j
            row[e] = (s["gate"] + s["up"] + s["down"]) / 3
        out.append(row)
    return out


def expert_sparsity_plot(panels: list[tuple[str, list[list[float]]]], path) -> None:
    """Heatmaps of per-expert sparsity (layer x original expert), one panel per weight-pruned variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .atomic import atomic_path

    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 2.8), squeeze=False)
    im = None
    for ax, (title, mat) in zip(axes[0], panels):
        m = np.array(mat, dtype=float)
        im = ax.imshow(m, cmap="magma_r", vmin=0, vmax=1, aspect="auto")
        for (y, x), v in np.ndenumerate(m):
            ax.text(x, y, f"{v:.0%}" if v < 1 else "cut", ha="center", va="center", fontsize=5,
                    color="white" if v > 0.6 else "black")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("expert (original index)", fontsize=8)
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        ax.tick_params(labelsize=7)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no weight-pruned variants", ha="center", va="center")
        axes[0][0].axis("off")
    axes[0][0].set_ylabel("layer", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02, label="weights pruned (cut = expert removed)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
