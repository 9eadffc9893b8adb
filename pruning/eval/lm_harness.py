"""Zero-shot evaluation of an in-memory model with lm-evaluation-harness (pinned in pyproject.toml).

The model object is handed to ``HFLM`` as is (dense, pruned, expert-pruned, skipping or distilled), with the
tokenizer object (no hub lookup) and an explicit ``max_length``. What comes back is reduced to the figures
the report needs, plus lm-eval's own per-task versions, few-shot counts and sample counts; wall-clock fields
are left out so the same model and settings give the same bytes.
"""
from __future__ import annotations

import json
from pathlib import Path

# The nine zero-shot tasks of the Wanda / MoE-Pruner tables (lm-eval 0.4 names).
PAPER_TASKS = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "mmlu", "openbookqa", "piqa", "rte", "winogrande"]
# Offline tasks over the held-out split (workflow/lm_eval_tasks/), with their chance accuracy.
LOCAL_TASKS = {"code_next_line": {"kind": "multiple_choice"}, "code_rolling": {"kind": "rolling"}}
METRICS = ("acc", "acc_norm", "word_perplexity", "byte_perplexity", "bits_per_byte")


def resolve_tasks(tasks, builtin: bool) -> list[str]:
    """``auto``: the local tasks for the embedded model (no data sets can be downloaded), else the papers' nine."""
    if tasks == "auto":
        return list(LOCAL_TASKS) if builtin else list(PAPER_TASKS)
    return list(tasks)


def fewshot_groups(tasks: list[str], num_fewshot) -> dict[int, list[str]]:
    """Tasks grouped by their few-shot count (``num_fewshot``: one int, or ``{task: n}`` with 0 elsewhere)."""
    out: dict[int, list[str]] = {}
    for t in tasks:
        n = num_fewshot.get(t, 0) if isinstance(num_fewshot, dict) else int(num_fewshot)
        out.setdefault(n, []).append(t)
    return out


def summarize(results: dict, tasks: list[str]) -> dict:
    """Per requested task: acc / acc_norm / perplexities (with stderr where lm-eval computed one), the task's
    version, few-shot count and number of scored documents."""
    out = {}
    res, versions = results["results"], results.get("versions", {})
    for t in tasks:
        r = res[t]
        row = {}
        for m in METRICS:
            if f"{m},none" in r:
                row[m] = float(r[f"{m},none"])
                se = r.get(f"{m}_stderr,none")
                if isinstance(se, (int, float)):
                    row[f"{m}_stderr"] = float(se)
        n = results.get("n-samples", {}).get(t, {})
        row.update({"version": versions.get(t), "num_fewshot": results.get("n-shot", {}).get(t),
                    "samples": n.get("effective") if isinstance(n, dict) else None})
        out[t] = row
    return out


def evaluate(model, tokenizer, tasks: list[str], *, task_dir=None, num_fewshot=0, limit=None, batch_size=8,
             max_length=2048, bootstrap_iters=1000, seed=1234) -> dict:
    """Run lm-eval on ``model``; returns ``{"tasks": summarize(...), "lm_eval_version", "results",
    "versions", "n-shot", "n-samples", "higher_is_better"}`` (no samples, no timings)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    needs_defaults = any(t not in LOCAL_TASKS for t in tasks)
    tm = TaskManager(include_path=str(Path(task_dir).resolve()) if task_dir else None, include_defaults=needs_defaults)
    merged: dict = {"results": {}, "versions": {}, "n-shot": {}, "n-samples": {}, "higher_is_better": {}}
    for n, group in fewshot_groups(tasks, num_fewshot).items():
        try:
            res = lm_eval.simple_evaluate(
                model=lm, tasks=group, num_fewshot=n, task_manager=tm, limit=limit, bootstrap_iters=bootstrap_iters,
                log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except Exception as exc:  # unknown task names, or data sets neither reachable nor cached
            hub = [t for t in group if t not in LOCAL_TASKS]
            if not hub:
                raise
            raise RuntimeError(
                f"lm_eval.tasks {hub}: lm-eval could not build these tasks ({type(exc).__name__}: {exc}). Their data "
                f"sets must be reachable or in the HF cache of the same lm-eval and datasets versions; offline, use "
                f"the local tasks: lm_eval.tasks: {list(LOCAL_TASKS)}") from exc
        for key in merged:
            merged[key].update(res.get(key) or {})
    # JSON-safe (lm-eval leaves numpy scalars and the odd non-serialisable object in its results)
    merged = json.loads(json.dumps(merged, default=handle_non_serializable))
    return {"tasks": summarize(merged, tasks), "lm_eval_version": lm_eval.__version__, **merged}
