"""The Markdown tables of metrics/results.md (and the README's results block), from a run's rows (``rows``)."""
from __future__ import annotations

from ..methods import TUNES


def _f(x, fmt) -> str:
    return "" if x is None else format(x, fmt)


def _pct(x) -> str:
    return "" if x is None else f"{x:.0%}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


# -- weight pruning: methods x sparsities --------------------------------------------------------------------


def _table(sub: list[dict], value, fmt: str, suffix: str = "") -> list[str]:
    """Methods (on their base) as rows, sparsities as columns; the best (lowest) cell of each column in bold."""
    cols = list(dict.fromkeys(r["variant"].sp for r in sub))
    labels = {r["variant"].sp: r["variant"].pattern.label for r in sub}
    best = {c: min(value(r) for r in sub if r["variant"].sp == c) for c in cols}
    lines = ["| method | " + " | ".join(labels[c] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for method in dict.fromkeys(r["variant"].method_label for r in sub):
        cells = {r["variant"].sp: r for r in sub if r["variant"].method_label == method}
        cell = lambda r: (f"**{value(r):{fmt}}{suffix}**" if value(r) == best[r["variant"].sp] else f"{value(r):{fmt}}{suffix}")  # noqa: E731
        lines.append(f"| {method} | " + " | ".join(cell(cells[c]) if c in cells else "" for c in cols) + " |")
    return lines


def _achieved(sub: list[dict]) -> str:
    """'50% → 0.5000, 60% → 0.5951 (Magnitude, Wanda), 0.6000 (SparseGPT)': the methods named where they differ."""
    parts = []
    for label in dict.fromkeys(r["variant"].pattern.label for r in sub):
        by_value: dict[str, list[str]] = {}
        for r in sub:
            if r["variant"].pattern.label == label:
                by_value.setdefault(f"{r['expert_sparsity']:.4f}", []).append(r["variant"].method_label)
        if len(by_value) == 1:
            parts.append(f"{label} → {next(iter(by_value))}")
        else:
            parts.append(f"{label} → " + ", ".join(f"{v} ({', '.join(ms)})" for v, ms in by_value.items()))
    return ", ".join(parts)


def weight_tables(rows: list[dict], dense_ppl: float, outlier_ratios: list[float] | None = None) -> list[str]:
    """Per propagation mode: token perplexity, then the MoE-block output error, methods x sparsities."""
    lines = []
    for prop in dict.fromkeys(r["variant"].prop for r in rows):
        sub = [r for r in rows if r["variant"].prop == prop]
        lines += [f"Token perplexity (lower is better), `{prop}` propagation. Dense model: **{dense_ppl:.2f}**.", ""]
        lines += _table(sub, lambda r: r["token_ppl"], ".2f")
        lines.append("")
        if all(r["block_error"] is not None for r in sub):
            lines += [f"Relative MoE-block output error on the calibration tokens, mean over layers (lower is better; "
                      f"the layer-wise objective), `{prop}` propagation:", ""]
            lines += _table(sub, lambda r: 100 * r["block_error"], ".2f", "%")
            lines.append("")
        lines.append("Achieved expert sparsity: " + _achieved(sub) + ".")
        lines.append("")
    if outlier_ratios:
        lines.append("Input-channel norms of the MoE blocks (largest / median, per layer, dense calibration pass): "
                     + ", ".join(f"{x:.1f}" for x in outlier_ratios) + ".")
        lines.append("")
    return lines


# -- expert pruning and dynamic skipping -----------------------------------------------------------------------


def expert_tables(rows: list[dict], task: list[dict], eval_cfg: dict) -> str:
    """Every whole model (dense, expert-pruned, skipping) on the general split; then the task-domain table."""
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
    best = min((r["token_ppl"] for r in rows if r["id"] != "full"), default=None)
    for r in rows:
        ppl = f"{r['token_ppl']:.2f}"
        if r["id"] != "full" and r["token_ppl"] == best:
            ppl = f"**{ppl}**"
        lines.append(
            f"| {r['label']} | {r['experts_kept']} | {ppl} | {r['ppl_rel']:.3f}x | {r['parameters']:,} ({r['params_rel']:.1%}) | "
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


# -- expert-wise knowledge distillation --------------------------------------------------------------------------


def gap_recovered(dense: float, pruned: float, tuned: float) -> float | None:
    """Fraction of the dense-to-pruned perplexity gap that tuning closed (1 = back to dense; > 1 = below dense)."""
    return (pruned - tuned) / (pruned - dense) if pruned != dense else None


def distill_table(rows: list[dict], tunes: list[str], dense_ppl: float, cfg: dict) -> str:
    """Per distilled model (``Results.distill_rows``): pruned perplexity, each tuning's, the gap recovered, λ."""
    if not rows:
        return ""
    first = rows[0]["tuned"][tunes[0]]["distill"]
    lines = [
        f"Expert-wise knowledge distillation from the unpruned model, masks fixed: token perplexity before and after "
        f"(same evaluation as above; dense model **{dense_ppl:.2f}**). Training on the `{cfg['source']}` train split, "
        f"{cfg['samples']} windows of {cfg['seqlen']} tokens x {cfg['epochs']} epochs = {first['steps']} steps "
        f"({first['tokens_per_epoch'] * first['epochs']:,} tokens), lr {cfg['lr']:g} cosine, expert MSE on the "
        f"`{cfg['expert_tokens']}` tokens with the {cfg['expert_inputs']}'s hidden states. Gap recovered = "
        "(pruned − tuned) / (pruned − dense).",
        "",
    ]
    head = "| method | sparsity | pruned |"
    rule = "|---|---|---:|"
    for t in tunes:
        head += f" {TUNES[t]} | gap recovered |"
        rule += "---:|---:|"
    lines += [head + " λ |", rule + "---:|"]
    for r in rows:
        cells = f"| {r['variant'].method_label} | {r['variant'].pattern.label} | {r['token_ppl']:.2f} |"
        for t in tunes:
            tuned = r["tuned"][t]["token_ppl"]
            cells += f" {tuned:.2f} | {_pct(gap_recovered(dense_ppl, r['token_ppl'], tuned))} |"
        lines.append(cells + f" {r['tuned']['kd']['distill']['lambda']:.3g} |")
    lines.append("")
    return "\n".join(lines)


# -- every model, one evaluation setting -------------------------------------------------------------------------


def summary_table(rows: list[dict], token_ppl: dict, lm_info: dict | None) -> str:
    """The full table: every model with its token perplexity, lm-eval word perplexity and accuracies."""
    tasks = list(dict.fromkeys(t for r in rows for t in r["acc"]))
    has_word = any(r["word_perplexity"] is not None for r in rows)
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
    for r in rows:
        weights = "dense" if r["pattern"] is None else (
            f"{r['pattern']}" if r["pattern"] != "unstructured" else f"{r['sparsity']:.0%}")
        if r["distilled"]:
            weights += f", {TUNES[r['distilled']]}"
        cells = [r["label"], f"{r['experts_kept']}/{r['experts_total']}" + (" + skip" if r["skipping"] else ""), weights,
                 f"{r['token_ppl']:.2f}"]
        if has_word:
            cells.append(_f(r["word_perplexity"], ",.0f"))
        for t in tasks:
            cells += [_f(r["acc"].get(t) and 100 * r["acc"][t], ".1f"), _f(r["acc_norm"].get(t) and 100 * r["acc_norm"][t], ".1f")]
        if len(tasks) > 1:
            cells += [_f(r["acc_avg"] and 100 * r["acc_avg"], ".1f"), _f(r["acc_norm_avg"] and 100 * r["acc_norm_avg"], ".1f")]
        cells += [f"{r['parameters']:,}", _mib(r["bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    se = [r["acc_stderr"] for r in rows if r["acc_stderr"]]
    if se:
        lo = min(v for d in se for v in d.values())
        hi = max(v for d in se for v in d.values())
        lines += ["", f"Standard error of each accuracy (lm-eval bootstrap): {100 * lo:.1f} to {100 * hi:.1f} points."]
    return "\n".join(lines) + "\n"


def results_markdown(results, header: str, outlier_ratios: list[float], eval_cfg: dict, distill_cfg: dict) -> str:
    """metrics/results.md: the weight-pruning tables, the expert-pruning tables, distillation, then every model."""
    weights = results.weight_rows()
    if weights:
        text = "\n".join([header, ""] + weight_tables(weights, results.dense["token_ppl"], outlier_ratios))
    else:
        text = header + "\n"
    text += "\n" + expert_tables(results.whole_rows(), results.tasks, eval_cfg)
    text += "\n" + distill_table(results.distill_rows(), results.sweep.tunes, results.dense["token_ppl"], distill_cfg)
    return text + "\n" + summary_table(results.models, results.token_ppl, results.lm_eval)
