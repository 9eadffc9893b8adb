"""Results tables and plots built only from the pipeline's own output files."""
from __future__ import annotations

import json

from .masks import Pattern

LABELS = {
    "magnitude": "Magnitude", "wanda": "Wanda", "moe_pruner": "MoE-Pruner", "sparsegpt": "SparseGPT",
    "sparsegpt_all_tokens": "SparseGPT (all tokens)", "sparsegpt_gate_weighted": "router-weighted SparseGPT",
}


def _sp_label(token: str) -> str:
    p = Pattern.parse(token.replace("of", ":"))
    return str(p) if p.is_nm else f"{p.sparsity:.0%}"


def metric_key(token: str) -> str:
    """Dot-free metric key of a sparsity token: '0.5' -> 'sp50', '2of4' -> '2of4'."""
    p = Pattern.parse(token.replace("of", ":"))
    return token if p.is_nm else f"sp{p.sparsity * 100:g}".replace(".", "_")


def rows(variants: list[dict], ppl_files: list[str], sparsity_files: list[str], error_files=None) -> list[dict]:
    out = []
    for i, (v, pf, sf) in enumerate(zip(variants, ppl_files, sparsity_files)):
        ppl, sp = json.load(open(pf)), json.load(open(sf))
        out.append({
            "propagation": v["prop"], "method": v["method"], "sparsity": v["sp"], "label": _sp_label(v["sp"]),
            "target_sparsity": sp["target_sparsity"], "expert_sparsity": sp["expert_sparsity"], "token_ppl": ppl["token_ppl"],
            "block_error": json.load(open(error_files[i]))["mean"] if error_files else None,
        })
    return out


def _table(sub: list[dict], key: str, fmt: str, suffix: str = "") -> list[str]:
    """Methods as rows, sparsities as columns; the best (lowest) cell of each column in bold."""
    cols = list(dict.fromkeys(r["sparsity"] for r in sub))
    labels = {r["sparsity"]: r["label"] for r in sub}
    best = {c: min(r[key] for r in sub if r["sparsity"] == c) for c in cols}
    lines = ["| method | " + " | ".join(labels[c] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for method in dict.fromkeys(r["method"] for r in sub):
        cells = {r["sparsity"]: r for r in sub if r["method"] == method}
        cell = lambda r: (f"**{r[key]:{fmt}}{suffix}**" if r[key] == best[r["sparsity"]] else f"{r[key]:{fmt}}{suffix}")  # noqa: E731
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cell(cells[c]) if c in cells else "" for c in cols) + " |")
    return lines


def _achieved(sub: list[dict]) -> str:
    """'50% → 0.5000, 60% → 0.5951 (Magnitude, Wanda), 0.6000 (SparseGPT)': the methods named where they differ."""
    parts = []
    for label in dict.fromkeys(r["label"] for r in sub):
        by_value: dict[str, list[str]] = {}
        for r in sub:
            if r["label"] == label:
                by_value.setdefault(f"{r['expert_sparsity']:.4f}", []).append(LABELS.get(r["method"], r["method"]))
        if len(by_value) == 1:
            parts.append(f"{label} → {next(iter(by_value))}")
        else:
            parts.append(f"{label} → " + ", ".join(f"{v} ({', '.join(ms)})" for v, ms in by_value.items()))
    return ", ".join(parts)


def markdown(rows: list[dict], dense_ppl: float, header: str, outlier_ratios: list[float] | None = None) -> str:
    """Per propagation mode: token perplexity, then the MoE-block output error, methods x sparsities."""
    lines = [header, ""]
    for prop in dict.fromkeys(r["propagation"] for r in rows):
        sub = [r for r in rows if r["propagation"] == prop]
        lines += [f"Token perplexity (lower is better), `{prop}` propagation. Dense model: **{dense_ppl:.2f}**.", ""]
        lines += _table(sub, "token_ppl", ".2f")
        lines.append("")
        if all(r["block_error"] is not None for r in sub):
            lines += [f"Relative MoE-block output error on the calibration tokens, mean over layers (lower is better; "
                      f"the layer-wise objective), `{prop}` propagation:", ""]
            sub = [{**r, "block_error_pct": 100 * r["block_error"]} for r in sub]
            lines += _table(sub, "block_error_pct", ".2f", "%")
            lines.append("")
        lines.append("Achieved expert sparsity: " + _achieved(sub) + ".")
        lines.append("")
    if outlier_ratios:
        lines.append("Input-channel norms of the MoE blocks (largest / median, per layer, dense calibration pass): "
                     + ", ".join(f"{x:.1f}" for x in outlier_ratios) + ".")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], dense_ppl: float, path) -> None:
    """Perplexity vs sparsity, one panel per propagation mode and one line per method (N:M as crosses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from .atomic import atomic_path

    props = list(dict.fromkeys(r["propagation"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(props), figsize=(5.5 * len(props), 4), sharey=True, squeeze=False)
    for ax, prop in zip(axes[0], props):
        for method in methods:
            sub = [r for r in rows if r["propagation"] == prop and r["method"] == method]
            un = sorted([r for r in sub if r["label"].endswith("%")], key=lambda r: r["target_sparsity"])
            ax.plot([r["target_sparsity"] for r in un], [r["token_ppl"] for r in un], marker="o", color=colors[method],
                    label=LABELS.get(method, method))
            for r in sub:
                if not r["label"].endswith("%"):
                    ax.scatter([r["target_sparsity"]], [r["token_ppl"]], marker="x", color=colors[method])
        for lab in dict.fromkeys(r["label"] for r in rows if r["propagation"] == prop and not r["label"].endswith("%")):
            top = max(r["token_ppl"] for r in rows if r["propagation"] == prop and r["label"] == lab)
            ax.annotate(lab, (0.5, top), textcoords="offset points", xytext=(4, 2), fontsize=7)
        ax.axhline(dense_ppl, color="k", ls="--", lw=1, label="dense")
        ax.set_title(f"{prop} propagation", fontsize=9)
        ax.set_xlabel("expert-weight sparsity (x = N:M)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("token perplexity (log)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# -- expert pruning and dynamic skipping ---------------------------------------------------------------

EXPERT_LABELS = {"naee": "NAEE (layerwise)", "naee_progressive": "NAEE (progressive)", "frequency": "frequency",
                 "reap": "REAP", "ean": "EAN", "random": "random"}


def model_label(mdl: str) -> str:
    """'full' -> 'dense', 'naee-k4' -> 'NAEE (layerwise), keep 4', 'naee-k4/skip' -> '... + skipping'."""
    skip = mdl.endswith("/skip")
    base = mdl[: -len("/skip")] if skip else mdl
    if base == "full":
        label = "dense"
    else:
        method, rest = base.rsplit("-k", 1)
        keep, _, task = rest.partition("-")
        label = f"{EXPERT_LABELS.get(method, method)}, keep {keep}" + (" (task calibration)" if task else "")
    return label + (" + skipping" if skip else "")


def expert_rows(models: list[tuple[str, str]], eval_files: list[str], reductions: dict, searches: dict) -> list[dict]:
    """One row per evaluated whole model on the general split, measured figures only."""
    evals = {(m, ds): json.load(open(f)) for (m, ds), f in zip(models, eval_files)}
    dense = evals[("full", "ppl")]
    dense_calls = dense["expert_usage"]["calls_per_token"]
    out = []
    for (mdl, ds), ev in evals.items():
        if ds != "ppl":
            continue
        base = mdl[: -len("/skip")] if mdl.endswith("/skip") else mdl
        skip = ev.get("skipping") or {}
        red, srch = reductions.get(base), searches.get(base)
        out.append({
            "model": mdl, "label": model_label(mdl), "experts": ev["num_experts"], "skipping": bool(skip),
            "token_ppl": ev["token_ppl"], "ppl_rel": ev["token_ppl"] / dense["token_ppl"],
            "parameters": ev["parameters"], "params_rel": ev["parameters"] / dense["parameters"],
            "bytes": ev["checkpoint_bytes"],
            "calls_per_token": ev["expert_usage"]["calls_per_token"],
            "calls_rel": ev["expert_usage"]["calls_per_token"] / dense_calls,
            "skip_rate": sum(v["rate"] for v in skip.values()) / len(skip) if skip else 0.0,
            "skip_rates": [skip[k]["rate"] for k in sorted(skip, key=int)] if skip else [],
            "block_loss": srch["mean_relative_loss"] if srch else None,
            "parameters_saved_expected": red["parameters_saved_expected"] if red else 0,
        })
    return out


def task_rows(models, eval_files) -> list[dict]:
    evals = {(m, ds): json.load(open(f)) for (m, ds), f in zip(models, eval_files)}
    out = []
    for (mdl, ds), ev in evals.items():
        if ds == "task_ppl":
            general = evals.get((mdl, "ppl"))
            out.append({"model": mdl, "label": model_label(mdl), "task_ppl": ev["token_ppl"], "dataset": ev["dataset"],
                        "windows": ev["windows"], "token_ppl": general["token_ppl"] if general else None})
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def experts_markdown(rows: list[dict], task: list[dict], eval_cfg: dict) -> str:
    if len(rows) <= 1 and not task:
        return ""
    lines = [
        f"Expert pruning and dynamic skipping: token perplexity on the `{eval_cfg['dataset']}` test split; parameters "
        "and bytes of the saved checkpoint; expert calls per token counted during that evaluation (relative to dense); "
        "block loss = NAEE objective of the dropped set, relative to the unpruned block output, mean over layers "
        "(calibration tokens).",
        "",
        "| model | experts / layer | token ppl | vs dense | parameters | checkpoint | expert calls / token | skip rate | block loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    best = min((r["token_ppl"] for r in rows if r["model"] != "full"), default=None)
    for r in rows:
        ppl = f"{r['token_ppl']:.2f}"
        if r["model"] != "full" and r["token_ppl"] == best:
            ppl = f"**{ppl}**"
        lines.append(
            f"| {r['label']} | {r['experts']} | {ppl} | {r['ppl_rel']:.3f}x | {r['parameters']:,} ({r['params_rel']:.1%}) | "
            f"{_mib(r['bytes'])} | {r['calls_per_token']:.3f} ({r['calls_rel']:.1%}) | "
            f"{r['skip_rate']:.1%} | " + (f"{r['block_loss']:.2%}" if r["block_loss"] is not None else "") + " |")
    lines.append("")
    skips = [r for r in rows if r["skipping"]]
    if skips:
        lines.append("Skip rate per layer on the evaluation tokens: " + "; ".join(
            f"{r['label']}: " + ", ".join(f"{x:.0%}" for x in r["skip_rates"]) for r in skips) + ".")
        lines.append("")
    if task:
        ds = task[0]["dataset"]
        lines += [f"Task-specific pruning: token perplexity on the `{ds}` test files ({task[0]['windows']} windows) "
                  "and on the general test split.", "",
                  "| model | domain ppl | general ppl |", "|---|---:|---:|"]
        for r in task:
            lines.append(f"| {r['label']} | {r['task_ppl']:.2f} | " + (f"{r['token_ppl']:.2f}" if r["token_ppl"] else "") + " |")
        lines.append("")
    return "\n".join(lines)


def usage_matrix(ev: dict, num_experts: int):
    """(layers, original experts) fraction of tokens routed to each expert; NaN where the expert was removed."""
    import math

    layers = ev["expert_usage"]["layers"]
    out = []
    for i in sorted(layers, key=int):
        sel, tokens = layers[i]["selections"], layers[i]["tokens"]
        out.append([sel[str(e)] / tokens if str(e) in sel else math.nan for e in range(num_experts)])
    return out


def usage_plot(panels: list[tuple[str, dict]], num_experts: int, path) -> None:
    """Heatmaps of expert usage per layer (fraction of tokens routed to each original expert), one per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .atomic import atomic_path

    mats = [np.array(usage_matrix(ev, num_experts), dtype=float) for _, ev in panels]
    vmax = max(float(np.nanmax(m)) for m in mats)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 2.8), squeeze=False)
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("lightgrey")
    for ax, (title, ev), mat in zip(axes[0], panels, mats):
        im = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(f"{title}\n{ev['expert_usage']['calls_per_token']:.2f} expert calls / token", fontsize=8)
        ax.set_xlabel("expert (original index)", fontsize=8)
        ax.set_xticks(range(num_experts))
        ax.set_yticks(range(mat.shape[0]))
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("layer", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02, label="tokens routed (fraction)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


# -- expert-wise knowledge distillation ---------------------------------------------------------------------

TUNE_LABELS = {"kd": "expert-wise KD", "ce": "CE-only control"}


def run_name(v: dict, tune: str) -> str:
    """File-name id of one distillation run: 'full_dense_moe_pruner_0.5_kd'."""
    return f"{v['base']}_{v['prop']}_{v['method']}_{v['sp']}_{tune}"


def gap_recovered(dense: float, pruned: float, tuned: float) -> float | None:
    """Fraction of the dense-to-pruned perplexity gap that tuning closed (1 = back to dense; > 1 = below dense)."""
    return (pruned - tuned) / (pruned - dense) if pruned != dense else None


def distill_rows(variants: list[dict], tunes: list[str], dense_ppl: float, pruned_files, tuned_files, info_files) -> list[dict]:
    """One row per distilled variant: pruned perplexity, then each tuning's perplexity, recovered gap and λ.
    ``tuned_files`` / ``info_files`` are flat, variant-major then tune."""
    out = []
    for i, v in enumerate(variants):
        pruned = json.load(open(pruned_files[i]))["token_ppl"]
        row = {**v, "label": LABELS.get(v["method"], v["method"]) + ("" if v["base"] == "full" else f" on {model_label(v['base'])}"),
               "sparsity_label": _sp_label(v["sp"]), "dense_ppl": dense_ppl, "pruned_ppl": pruned}
        for j, t in enumerate(tunes):
            k = i * len(tunes) + j
            ppl, info = json.load(open(tuned_files[k]))["token_ppl"], json.load(open(info_files[k]))
            row[t] = {"token_ppl": ppl, "gap_recovered": gap_recovered(dense_ppl, pruned, ppl), "lambda": info["lambda"],
                      "steps": info["steps"], "tokens": info["tokens_per_epoch"] * info["epochs"]}
        out.append(row)
    return out


def _pct(x) -> str:
    return "" if x is None else f"{x:.0%}"


def distill_markdown(rows: list[dict], tunes: list[str], dense_ppl: float, cfg: dict) -> str:
    if not rows:
        return ""
    first = rows[0][tunes[0]]
    lines = [
        f"Expert-wise knowledge distillation from the unpruned model, masks fixed: token perplexity before and after "
        f"(same evaluation as above; dense model **{dense_ppl:.2f}**). Training on the `{cfg['source']}` train split, "
        f"{cfg['samples']} windows of {cfg['seqlen']} tokens x {cfg['epochs']} epochs = {first['steps']} steps "
        f"({first['tokens']:,} tokens), lr {cfg['lr']:g} cosine, expert MSE on the `{cfg['expert_tokens']}` tokens with "
        f"the {cfg['expert_inputs']}'s hidden states. Gap recovered = (pruned − tuned) / (pruned − dense).",
        "",
    ]
    head = "| method | sparsity | pruned |"
    rule = "|---|---|---:|"
    for t in tunes:
        head += f" {TUNE_LABELS[t]} | gap recovered |"
        rule += "---:|---:|"
    lines += [head + " λ |", rule + "---:|"]
    for r in rows:
        cells = f"| {r['label']} | {r['sparsity_label']} | {r['pruned_ppl']:.2f} |"
        for t in tunes:
            cells += f" {r[t]['token_ppl']:.2f} | {_pct(r[t]['gap_recovered'])} |"
        lines.append(cells + f" {r['kd']['lambda']:.3g} |")
    lines.append("")
    return "\n".join(lines)


def read_history(path) -> list[dict]:
    import csv

    with open(path) as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


def distill_plot(runs: list[dict], path) -> None:
    """Loss curves of every tuning run (``{"label", "variant", "tune", "history"}``): L_CE per step (left) and the
    unweighted expert MSE (right); one colour per variant, dashed = CE-only control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        steps = [h["step"] for h in r["history"]]
        window = max(1, len(steps) // 8)  # batches differ in difficulty: the trailing mean shows the trend
        kw = dict(ls="--" if r["tune"] == "ce" else "-", color=f"C{r['variant']}")
        for ax, key in zip(axes, ("ce_loss", "expert_loss")):
            ys = [h[key] for h in r["history"]]
            ax.plot(steps, ys, lw=0.5, alpha=0.3, **kw)
            smooth = [sum(ys[max(0, i - window + 1): i + 1]) / len(ys[max(0, i - window + 1): i + 1]) for i in range(len(ys))]
            ax.plot(steps, smooth, lw=1.5, label=r["label"], **kw)
    axes[0].set_title("L_CE (student next-token loss per step; bold: trailing mean)", fontsize=9)
    axes[1].set_title("L_expert (sum over layers and experts of the MSE)", fontsize=9)
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
