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
