"""Validation of params.yaml: every problem is reported as one line naming the key and what is allowed."""
from __future__ import annotations

from pathlib import Path

import yaml

from .methods import WEIGHT_METHODS
from .weights.pattern import Pattern


class ParamsError(ValueError):
    pass


def yaml_without_base60() -> None:
    """Make PyYAML read ``2:4`` as the string it is, not the YAML 1.1 base-60 integer 124.

    ``dvc exp run -S 'prune.sparsities=[0.5,"2:4"]'`` rewrites params.yaml as YAML 1.2, where ``2:4`` needs no
    quotes, but Snakemake reads config files with PyYAML (YAML 1.1). Called by the Snakefile before it loads
    params.yaml; only the base-60 alternatives of the int and float resolvers are removed.
    """
    import re

    base60 = re.compile(r"\s*\|\[-\+\]\?\[[0-9-]+\]\[0-9_\]\*\(\?::\[0-5\]\?\[0-9\]\)\+(\\\.\[0-9_\]\*)?")
    for cls in (yaml.resolver.BaseResolver, yaml.resolver.Resolver, yaml.SafeLoader, yaml.FullLoader, yaml.Loader):
        table = cls.__dict__.get("yaml_implicit_resolvers")
        if not table:
            continue
        for first, resolvers in table.items():
            table[first] = [
                (tag, re.compile(base60.sub("", rx.pattern), rx.flags) if tag.endswith((":int", ":float")) else rx)
                for tag, rx in resolvers
            ]


def _path(err) -> str:
    parts = []
    for p in err.absolute_path:
        parts.append(f"[{p}]" if isinstance(p, int) else (f".{p}" if parts else str(p)))
    return "".join(parts) or "(top level)"


def _message(err) -> str:
    if err.validator == "enum":
        return f"{err.instance!r} is not allowed; allowed values: {', '.join(map(str, err.validator_value))}"
    if err.validator == "anyOf" and err.absolute_path and "sparsities" in err.absolute_path:
        return f"{err.instance!r} is not a sparsity in (0, 1) nor an 'N:M' pattern"
    if err.validator == "anyOf" and list(err.absolute_path) == ["lm_eval", "tasks"]:
        return f"{err.instance!r} is not allowed; allowed: auto, or a list of lm-eval task names ([] = no lm-eval)"
    if err.validator == "anyOf" and list(err.absolute_path) == ["lm_eval", "num_fewshot"]:
        return f"{err.instance!r} is not allowed; allowed: a few-shot count >= 0, or {{task: count}}"
    if err.validator in ("exclusiveMinimum", "exclusiveMaximum", "minimum", "maximum"):
        return f"{err.instance!r} is out of range ({err.validator} {err.validator_value})"
    if err.validator == "additionalProperties":
        return err.message.replace("Additional properties are not allowed", "unknown key")
    return err.message


def check_schema(config: dict, schema_path) -> None:
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        raise ParamsError(f"{_path(e)}: {_message(e)}")


def _patterns(config: dict) -> list[tuple[str, Pattern, list[str]]]:
    """(key, pattern, methods) of every sparsity a mask is computed for: the prune sweep and the distilled
    variants, each parsed once with one error line naming the bad entry."""
    distill = config.get("distill") or {}
    out = []
    for section, values, methods in (("prune", config["prune"]["sparsities"], config["prune"]["methods"]),
                                     ("distill", distill.get("sparsities", []), distill.get("methods", []))):
        for i, s in enumerate(values):
            try:
                out.append((f"{section}.sparsities[{i}]", Pattern.parse(s), methods))
            except ValueError as exc:
                raise ParamsError(f"{section}.sparsities[{i}]: {exc}") from None
    return out


def check_semantics(config: dict) -> None:
    swept = _patterns(config)
    check_distill(config)
    blocksize = config["prune"].get("sparsegpt", {}).get("blocksize", 128)
    for key, p, methods in swept:
        if p.is_nm and blocksize % p.m and any(WEIGHT_METHODS[m].updates_weights for m in methods):
            raise ParamsError(f"{key}: M={p.m} must divide prune.sparsegpt.blocksize ({blocksize})")
    if config["model"]["name_or_path"] == "builtin":
        arch = config["tiny"]["arch"]
        if arch["top_k"] > arch["num_experts"]:
            raise ParamsError("tiny.arch.top_k: must not exceed tiny.arch.num_experts")
        if arch["num_heads"] % arch["num_kv_heads"] or arch["hidden_size"] % arch["num_heads"]:
            raise ParamsError("tiny.arch: hidden_size must divide by num_heads, num_heads by num_kv_heads")
        for key, p, _ in swept:
            if p.is_nm and (arch["hidden_size"] % p.m or arch["intermediate_size"] % p.m):
                raise ParamsError(f"{key}: M={p.m} must divide hidden_size and intermediate_size")


def check_distill(config: dict) -> None:
    d = config.get("distill") or {}
    if d.get("methods") and not d.get("sparsities"):
        raise ParamsError("distill.sparsities: required (non-empty) when distill.methods is set")
    per_step = d.get("batch_size", 8) * d.get("grad_accum", 1)
    if d.get("methods") and d.get("samples", 1000) < per_step:
        raise ParamsError(f"distill.samples: {d.get('samples')} is fewer than one optimiser step "
                          f"(batch_size x grad_accum = {per_step})")


def check_model(config: dict) -> dict:
    """Resolve and check model.name_or_path: an MoE config.json of a supported family and intact safetensors
    weights (headers, shard sizes, index; no tensor is read). Returns its config.json (or None for builtin)."""
    from .models.checkpoint import check_moe_config, check_weights, read_config, resolve_dir

    m = config["model"]
    if m["name_or_path"] == "builtin":
        return None
    try:
        model_dir = resolve_dir(m["name_or_path"])
        try:
            cfg = read_config(model_dir)
        except ValueError:  # JSONDecodeError
            raise ParamsError(f"model.name_or_path: {model_dir}/config.json is not valid JSON; "
                              f"allowed: a Hugging Face checkpoint directory") from None
        check_moe_config(cfg)
        check_weights(model_dir)
    except ParamsError:
        raise
    except ValueError as exc:
        raise ParamsError(str(exc)) from None
    return cfg


def check_experts(config: dict, model_config: dict | None) -> None:
    """Expert counts against the model: top_k <= keep < E (and a group-limited router's grouping), skipping
    needs top_k >= 2, bases name real variants."""
    from .methods import EXPERT_METHODS
    from .variant import parse_base

    if model_config is None:
        arch = config["tiny"]["arch"]
        num_experts, top_k = arch["num_experts"], arch["top_k"]
        adapter = None
    else:
        from .models import get_adapter

        adapter = get_adapter(model_config)
        num_experts, top_k = adapter.num_experts, adapter.top_k
    ex = config.get("experts", {})
    task = ex.get("task") or {}
    keeps = [("experts.keep", i, k) for i, k in enumerate(ex.get("keep", []))]
    keeps += [("experts.task.keep", i, k) for i, k in enumerate(task.get("keep", []))] if task.get("source") else []

    def check_keep(key, keep):
        if not top_k <= keep < num_experts:
            raise ParamsError(f"{key}: keep={keep} is not allowed; experts kept per layer must be in "
                              f"[top_k, num_experts) = [{top_k}, {num_experts})")
        why = adapter.check_keep(keep) if adapter is not None else None
        if why:
            raise ParamsError(f"{key}: keep={keep} is not allowed; {why}")

    for key, i, k in keeps:
        check_keep(f"{key}[{i}]", k)
    if task.get("source") and not task["source"].startswith("builtin:") and not task.get("eval"):
        raise ParamsError("experts.task.eval: required when experts.task.source is not builtin:<package> "
                          "(the domain perplexity must not be measured on the calibration text)")
    for key in ("prune.bases", "skipping.bases", "distill.bases"):
        section, name = key.split(".")
        for i, b in enumerate(config.get(section, {}).get(name, [])):
            try:
                parsed = parse_base(b)
            except ValueError as exc:
                raise ParamsError(f"{key}[{i}]: {exc}") from None
            if parsed is None:
                continue
            method, keep, is_task = parsed
            if method not in EXPERT_METHODS:
                raise ParamsError(f"{key}[{i}]: unknown expert method {method!r}; allowed: {', '.join(EXPERT_METHODS)}")
            if is_task and not task.get("source"):
                raise ParamsError(f"{key}[{i}]: {b!r} needs experts.task.source")
            check_keep(f"{key}[{i}]", keep)
    if config.get("prune", {}).get("shared_experts") and not (adapter is not None and adapter.has_shared_experts):
        raise ParamsError("prune.shared_experts: true, but the model has no shared experts; allowed: false")
    if config.get("skipping", {}).get("bases") and top_k < 2:
        raise ParamsError(f"skipping.bases: dynamic skipping needs top_k >= 2; this model has top_k={top_k}")


def data_sources(config: dict) -> list[tuple[str, str, str, int, str, int]]:
    """Every text source params.yaml names that a job will read: (key, source, split, seqlen, seqlen key, tokens
    one sample needs). Calibration draws a window and the token after it; evaluation cuts whole windows."""
    calib, ev = config["calib"], config["eval"]
    out = [("calib.source", calib["source"], "train", calib["seqlen"], "calib.seqlen", calib["seqlen"] + 1),
           ("eval.dataset", ev["dataset"], "test", ev["seqlen"], "eval.seqlen", ev["seqlen"])]
    task = (config.get("experts") or {}).get("task") or {}
    if task.get("source"):
        out.append(("experts.task.source", task["source"], "train", calib["seqlen"], "calib.seqlen", calib["seqlen"] + 1))
        out.append(("experts.task.eval" if task.get("eval") else "experts.task.source", task.get("eval") or task["source"],
                    "test", ev["seqlen"], "eval.seqlen", ev["seqlen"]))
    d = config.get("distill") or {}
    if d.get("methods"):
        out.append(("distill.source", d.get("source", "builtin"), "train", d.get("seqlen", 2048), "distill.seqlen",
                    d.get("seqlen", 2048) + 1))
    return out


def check_data(config: dict) -> None:
    """Calibration, evaluation, task and distillation text: an allowed name, a standard-library package with files
    in the split read, or a local UTF-8 text / JSONL file longer than one sample (``data.source_check``).
    Call after the schema's defaults are filled."""
    from .data.source_check import SourceError, check_source

    for key, source, split, seqlen, seqlen_key, need in data_sources(config):
        try:
            check_source(key, source, split, seqlen, seqlen_key, windows_need=need, corpus=config.get("corpus") or {})
        except SourceError as exc:
            raise ParamsError(str(exc)) from None


def check_lm_eval(config: dict) -> None:
    """lm_eval.tasks names tasks that exist: the local tasks, the papers' nine, or any task, group or tag of the
    installed lm-eval (its task index is built only when the list names another task: several seconds)."""
    from .eval.lm_harness import LOCAL_TASKS, PAPER_TASKS

    tasks = (config.get("lm_eval") or {}).get("tasks", "auto")
    if tasks == "auto":
        return
    others = [(i, t) for i, t in enumerate(tasks) if t not in LOCAL_TASKS and t not in PAPER_TASKS]
    if not others:
        return
    import difflib
    import logging
    from importlib import metadata

    level = logging.root.manager.disable
    logging.disable(logging.WARNING)  # lm-eval logs while it indexes; one line is all that may reach the user
    try:
        from lm_eval.tasks import TaskManager

        known = set(TaskManager().all_tasks)
    finally:
        logging.disable(level)
    for i, t in others:
        if t not in known:
            near = difflib.get_close_matches(t, sorted(known | set(LOCAL_TASKS)), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ParamsError(f"lm_eval.tasks[{i}]: {t!r} is not an lm-eval task{hint}; allowed: "
                              f"{', '.join(LOCAL_TASKS)} (local), or a task, group or tag of lm-eval "
                              f"{metadata.version('lm-eval')} (lm-eval --tasks list)")


def check_params(config: dict, schema_path, fill_defaults) -> dict | None:
    """Every check the workflow makes when it loads, in order, each problem one ``ParamsError`` line: the schema,
    the values against each other, the model directory, then (with the schema's defaults filled in by
    ``fill_defaults(config)``: Snakemake's validator, which the library does not import) the expert counts
    against the model, the data sources and the lm-eval task names. Returns the external model's config.json
    (None for builtin)."""
    check_schema(config, schema_path)
    check_semantics(config)
    model_config = check_model(config)
    if isinstance(config.get("experts"), dict) and config["experts"].get("task", {}) is None:
        config["experts"]["task"] = {}  # `-S experts.task=null`: Snakemake's default-filling validator cannot enter null
    fill_defaults(config)
    check_experts(config, model_config)
    check_data(config)  # calibration, evaluation, task and distillation text
    check_lm_eval(config)  # lm-eval task names
    return model_config
