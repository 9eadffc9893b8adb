"""The report's figures, from a run's rows (``rows``). Each ``*_figure`` returns the matplotlib Figure, so what
is drawn (series, values) can be checked; ``save`` writes it as PNG."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from ..atomic import atomic_path  # noqa: E402
from ..methods import EXPERT_METHODS  # noqa: E402


def save(fig, path, tight_bbox: bool = False) -> None:
    """The figure as PNG at ``path`` (atomically), then closed."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, **({"bbox_inches": "tight"} if tight_bbox else {}))
    plt.close(fig)


def ppl_figure(points: list[dict], dense_ppl: float):
    """Perplexity vs sparsity, one panel per propagation mode and one line per method (N:M as crosses).

    ``points``: {"prop", "series" (the method on its base), "label" (pattern label: '50%', '2:4'), "x" (target
    sparsity), "y" (token perplexity)}."""
    props = list(dict.fromkeys(r["prop"] for r in points))
    series = list(dict.fromkeys(r["series"] for r in points))
    colors = {m: f"C{i}" for i, m in enumerate(series)}
    fig, axes = plt.subplots(1, len(props), figsize=(5.5 * len(props), 4), sharey=True, squeeze=False)
    for ax, prop in zip(axes[0], props):
        for name in series:
            sub = [r for r in points if r["prop"] == prop and r["series"] == name]
            un = sorted([r for r in sub if r["label"].endswith("%")], key=lambda r: r["x"])
            ax.plot([r["x"] for r in un], [r["y"] for r in un], marker="o", color=colors[name], label=name)
            for r in sub:
                if not r["label"].endswith("%"):
                    ax.scatter([r["x"]], [r["y"]], marker="x", color=colors[name])
        for lab in dict.fromkeys(r["label"] for r in points if r["prop"] == prop and not r["label"].endswith("%")):
            top = max(r["y"] for r in points if r["prop"] == prop and r["label"] == lab)
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
    return fig


def usage_matrix(usage: dict, num_experts: int) -> list[list[float]]:
    """(layers, original experts) fraction of tokens routed to each expert; NaN where the expert was removed."""
    layers = usage["layers"]
    out = []
    for i in sorted(layers, key=int):
        sel, tokens = layers[i]["selections"], layers[i]["tokens"]
        out.append([sel[str(e)] / tokens if str(e) in sel else math.nan for e in range(num_experts)])
    return out


def usage_figure(panels: list[tuple[str, dict]], num_experts: int):
    """Heatmaps of expert usage per layer (fraction of tokens routed to each original expert), one per model;
    ``panels``: (title, the model's ``expert_usage``)."""
    mats = [np.array(usage_matrix(usage, num_experts), dtype=float) for _, usage in panels]
    vmax = max(float(np.nanmax(m)) for m in mats)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 2.8), squeeze=False)
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("lightgrey")
    for ax, (title, usage), mat in zip(axes[0], panels, mats):
        im = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(f"{title}\n{usage['calls_per_token']:.2f} expert calls / token", fontsize=8)
        ax.set_xlabel("expert (original index)", fontsize=8)
        ax.set_xticks(range(num_experts))
        ax.set_yticks(range(mat.shape[0]))
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("layer", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02, label="tokens routed (fraction)")
    return fig


def distill_figure(runs: list[dict]):
    """Loss curves of every tuning run (``{"label", "variant", "tune", "history"}``): L_CE per step (left) and the
    unweighted expert MSE (right); one colour per variant, dashed = CE-only control."""
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
    return fig


def accuracy_figure(rows: list[dict], chance: float | None = None):
    """Mean zero-shot accuracy vs sparsity: weight pruning (x = expert-weight sparsity, one line per method and
    base; N:M as crosses) and expert pruning (x = fraction of experts removed); dense and chance as lines.
    Without accuracies (lm-eval off: ``lm_eval.tasks: []``) the panels say so."""
    have = [r for r in rows if r["acc_avg"] is not None]
    dense = rows[0]["acc_avg"]
    start = [(0.0, dense)] if dense is not None else []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    groups: dict[str, list[dict]] = {}
    for r in have:
        if r["pattern"] is not None:
            v = r["variant"]
            groups.setdefault(v.method_label + (f" + {v.tune_label}" if v.tune else ""), []).append(r)
    for i, (name, sub) in enumerate(groups.items()):
        un = sorted((r for r in sub if r["pattern"] == "unstructured"), key=lambda r: r["sparsity"])
        pts = start + [(r["sparsity"], r["acc_avg"]) for r in un]
        if pts:
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
            em = EXPERT_METHODS.get(r["expert_method"])
            egroups.setdefault((em.label if em else r["expert_method"]) + (" + skipping" if r["skipping"] else "")
                               + (" (task)" if r["base"].endswith("-task") else ""), []).append(r)
    for i, (name, sub) in enumerate(egroups.items()):
        sub = sorted(sub, key=lambda r: r["experts_kept"], reverse=True)
        pts = start + [(1 - r["experts_kept"] / r["experts_total"], r["acc_avg"]) for r in sub]
        axes[1].plot(*zip(*pts), marker="o", color=f"C{i}", label=name)
    for r in have:
        if r["id"] == "full/skip":
            axes[1].scatter([0.0], [r["acc_avg"]], marker="s", color="k", label="dense + skipping")
    axes[1].set_xlabel("fraction of experts removed")
    for ax in axes:
        if not have:
            ax.text(0.5, 0.5, "no lm-eval accuracy (lm_eval.tasks: [])", ha="center", va="center", transform=ax.transAxes)
            continue
        if dense is not None:
            ax.axhline(dense, color="k", ls="--", lw=1, label="dense")
        if chance is not None:
            ax.axhline(chance, color="grey", ls=":", lw=1, label="chance")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("mean zero-shot accuracy (lm-eval acc)")
    axes[0].set_title("weight pruning", fontsize=9)
    axes[1].set_title("expert pruning", fontsize=9)
    fig.tight_layout()
    return fig


def expert_sparsity_matrix(layers: dict, kept: list[list[int]] | None, num_experts: int) -> list[list[float]]:
    """(layers, original experts) achieved sparsity of each expert: the mean over its gate, up and down matrices
    (equal sizes); 1.0 where expert pruning removed the expert. ``layers``: sparsity.json's per-layer report."""
    out = []
    for i in sorted(layers, key=int):
        per = layers[i]["experts"]
        row = [1.0] * num_experts
        for j, s in enumerate(per):
            e = kept[int(i)][j] if kept else j
            row[e] = (s["gate"] + s["up"] + s["down"]) / 3
        out.append(row)
    return out


def expert_sparsity_figure(panels: list[tuple[str, list[list[float]]]]):
    """Heatmaps of per-expert sparsity (layer x original expert), one panel per weight-pruned variant."""
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
    return fig
