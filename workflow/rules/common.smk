# Parse-time helpers: params validation, path builders, the sweep. Pure Python, no rules.
import os
import sys
from pathlib import Path

from snakemake.utils import validate

from pruning.experts import EXPERT_METHODS
from pruning.harness import LOCAL_TASKS, resolve_tasks
from pruning.report import run_name
from pruning.prune import METHODS as ALL_METHODS, SCORE_METHODS, SPARSEGPT_METHODS, updates_weights
from pruning.params import (
    ParamsError,
    base_token,
    calib_id,
    check_experts,
    check_model,
    check_schema,
    check_semantics,
    parse_base,
    sparsity_token,
)

SCHEMA = Path(workflow.basedir) / "workflow/schemas/params.schema.yaml"
try:
    check_schema(config, SCHEMA)  # one clear line per problem, before anything runs
    check_semantics(config)
    EXTERNAL_MODEL_CONFIG = check_model(config)
    if isinstance(config.get("experts"), dict) and config["experts"].get("task", {}) is None:
        config["experts"]["task"] = {}  # `-S experts.task=null`: Snakemake's default-filling validator cannot enter null
    validate(config, str(SCHEMA))  # fills schema defaults
    check_experts(config, EXTERNAL_MODEL_CONFIG)
except ParamsError as exc:
    sys.stderr.write(f"params.yaml: {exc}\n")
    sys.exit(1)

BUILTIN = config["model"]["name_or_path"] == "builtin"
ROOT = f"results/{config['model']['name']}"
CID = calib_id(config["calib"], config["seed"])
CALIB_SETS = {CID: config["calib"]}  # every calibration set the run uses, by its id
TASK = config["experts"]["task"] if (config["experts"].get("task") or {}).get("source") else None
if TASK:
    TASK_CID = calib_id({**config["calib"], "source": TASK["source"]}, config["seed"])
    CALIB_SETS[TASK_CID] = {**config["calib"], "source": TASK["source"]}
    TASK_EVAL = TASK.get("eval") or TASK["source"]
LOGS = f"{ROOT}/logs"
BENCH = f"{ROOT}/benchmarks"
CORPUS = "data/builtin"
CORPUS_FILES = [f"{CORPUS}/{s}.jsonl" for s in ("train", "validation", "test")] + [f"{CORPUS}/manifest.json"]
# lm-eval: the resolved task list ('auto' -> local tasks for the builtin model, the papers' nine otherwise)
LM_TASKS = resolve_tasks(config["lm_eval"]["tasks"], config["model"]["name_or_path"] == "builtin")
LM_EVAL = {k: v for k, v in config["lm_eval"].items() if k != "local"}  # what an evaluation's result depends on
LM_EVAL.update(tasks=LM_TASKS, max_length=config["lm_eval"]["max_length"] or config["eval"]["seqlen"])
LM_TASK_DATA = "data/lm_eval"  # the task YAMLs name these files, relative to the working directory
LM_TASK_DIR = os.path.relpath(Path(workflow.basedir) / "workflow/lm_eval_tasks")
NEEDS_CORPUS = BUILTIN or any(t in LOCAL_TASKS for t in LM_TASKS) or any(
    s.split(":")[0] == "builtin" for s in [config["calib"]["source"], config["eval"]["dataset"]] + ([TASK["source"], TASK_EVAL] if TASK else [])
)

if BUILTIN:
    MODEL_DIR = f"{ROOT}/base"
    NUM_LAYERS = config["tiny"]["arch"]["num_layers"]
else:
    from pruning.checkpoint import resolve_dir

    MODEL_DIR = str(resolve_dir(config["model"]["name_or_path"]))
    NUM_LAYERS = EXTERNAL_MODEL_CONFIG["num_hidden_layers"]
LAYERS = list(range(NUM_LAYERS))

METHODS = config["prune"]["methods"]
SPARSITIES = [sparsity_token(s) for s in config["prune"]["sparsities"]]
PROPAGATIONS = config["prune"]["propagation"]
BASES = config["prune"]["bases"]  # models weight pruning runs on: full, or expert-pruned models
README_BLOCK = config["report"].get("readme_block", "results")
# What the distill rule's result depends on (not which variants are distilled: adding one reruns nothing).
DISTILL_TRAINING = {k: v for k, v in config["distill"].items() if k not in ("methods", "sparsities", "bases", "propagation", "ce_control")}
TUNES = ["kd", "ce"] if config["distill"]["ce_control"] else ["kd"]  # ce: the CE-only fine-tuning control
# A base model is "full" (the checkpoint) or an expert-pruned one, "<expert method>-k<keep>[-task]".
VARIANT = f"{ROOT}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}"  # one weight-pruned variant of a base model
SEARCH = f"{ROOT}/search/{{cid}}/k{{keep}}"  # expert search results per calibration set and kept count
BASE_RE = r"full|(?:" + "|".join(EXPERT_METHODS) + r")-k\d+(?:-task)?"


wildcard_constraints:
    prop="dense|sequential",
    method="|".join(ALL_METHODS),
    sp=r"0\.\d+|\d+of\d+",
    layer=r"\d+",
    base=BASE_RE,
    cid=r"[A-Za-z0-9_.-]+?-n\d+-l\d+-s\d+",
    keep=r"\d+",
    mdl=rf"(?:{BASE_RE})(?:/skip)?",
    ds="ppl|task_ppl",
    tune="kd|ce",


def model_inputs():
    """Files that stand for the base model (its directory when the pipeline builds it)."""
    return [MODEL_DIR] if BUILTIN else [f"{MODEL_DIR}/config.json"]


def base_dir(base):
    """Checkpoint directory of a base model."""
    return MODEL_DIR if base == "full" else f"{ROOT}/{base}/checkpoint"


def base_inputs(wildcards):
    return model_inputs() if wildcards.base == "full" else [base_dir(wildcards.base)]


def base_cid(base):
    """Calibration set an expert-pruned model was searched on."""
    return TASK_CID if base.endswith("-task") else CID


def calib_dir(base, cid=CID):
    return f"{ROOT}/{base}/calib/{cid}"


def model_dir_of(mdl):
    """Checkpoint directory of an evaluated model: full, an expert-pruned base, or '<base>/skip'."""
    return f"{ROOT}/{mdl}/checkpoint" if mdl.endswith("/skip") else base_dir(mdl)


def expert_bases():
    """Every expert-pruned model the run builds and evaluates."""
    out = [base_token(m, k) for m in config["experts"]["methods"] for k in config["experts"]["keep"]]
    if TASK:
        out += [base_token(m, k, task=True) for m in TASK["methods"] for k in TASK["keep"]]
    return out


def evaluated_models():
    """(model, data set) pairs whose perplexity the report needs, beyond the weight-pruned variants."""
    models = ["full"] + expert_bases() + [f"{b}/skip" for b in config["skipping"]["bases"]]
    out = [(m, "ppl") for m in dict.fromkeys(models)]
    if TASK:  # domain perplexity: dense, task-agnostic and task-specific models of the same method and keep
        task_models = ["full"] + [base_token(m, k, t) for m in TASK["methods"] for k in TASK["keep"] for t in (False, True)]
        out += [(m, "task_ppl") for m in task_models]
    return out


def corpus_inputs():
    return CORPUS_FILES if NEEDS_CORPUS else []


def lm_task_inputs():
    """The local tasks' data files and YAMLs the evaluation reads (none for hub tasks)."""
    local = [t for t in LM_TASKS if t in LOCAL_TASKS]
    return [f"{LM_TASK_DATA}/{t}.jsonl" for t in local] + [f"{LM_TASK_DIR}/{t}.yaml" for t in local]


def summary_entries():
    """Every model of metrics/summary.json, dense first, by id: whole models ('full', '<base>', '<base>/skip'),
    weight-pruned variants ('<base>/<prop>/<method>/<sp>') and distilled ones ('.../kd'), with their files."""
    lm = lambda d: f"{d}/eval/lm_eval.json" if LM_TASKS else None  # noqa: E731
    out = {}
    for m, ds in evaluated_models():
        if ds == "ppl":
            out[m] = {"kind": "model", "model": m, "ppl": f"{ROOT}/{m}/eval/ppl.json", "lm_eval": lm(f"{ROOT}/{m}")}
    for v in variants() + distilled_variants():
        d = VARIANT.format(**v)
        out[f"{v['base']}/{v['prop']}/{v['method']}/{v['sp']}"] = {
            "kind": "variant", **v, "ppl": f"{d}/eval/ppl.json", "sparsity": f"{d}/sparsity.json", "lm_eval": lm(d)}
    for v in distilled_variants():
        d = VARIANT.format(**v)
        for t in TUNES:
            out[f"{v['base']}/{v['prop']}/{v['method']}/{v['sp']}/{t}"] = {
                "kind": "distilled", **v, "tune": t, "ppl": f"{d}/{t}/eval/ppl.json", "sparsity": f"{d}/sparsity.json",
                "lm_eval": lm(f"{d}/{t}")}
    return out


def summary_inputs():
    files = [f for e in summary_entries().values() for k, f in e.items() if k in ("ppl", "sparsity", "lm_eval") and f]
    return list(dict.fromkeys(files))


def _sweep(bases, props, methods, sparsities):
    return [dict(base=b, prop=p, method=m, sp=s) for b in bases for p in props for m in methods for s in sparsities]


def variants():
    return _sweep(BASES, PROPAGATIONS, METHODS, SPARSITIES)


def distilled_variants():
    """Weight-pruned variants the run distills (and evaluates before and after)."""
    d = config["distill"]
    return _sweep(d["bases"], d["propagation"], d["methods"], [sparsity_token(s) for s in d["sparsities"]])


def final_outputs():
    out = ["metrics/ppl.json", "metrics/results.md"]
    if BUILTIN:
        out.append(f"{ROOT}/base_report.json")
    if config["report"]["update_readme"]:
        out.append(f"{ROOT}/readme.{README_BLOCK}.stamp")
    return out


def pkg(*modules):
    """Library modules a rule's result depends on (Snakemake does not track imported code itself).

    Relative to the working directory, so a clone or a moved checkout keeps its provenance."""
    return [os.path.relpath(Path(workflow.basedir) / "pruning" / f"{m}.py") for m in modules]


# Input functions of the rules.


def _previous_layer(wildcards):
    i = int(wildcards.layer)
    if i == 0:
        return {"tokens": f"{calib_dir(wildcards.base)}/tokens.safetensors"}
    prev = VARIANT.format(**{**wildcards, "layer": i - 1})
    out = {
        "hidden": f"{prev}/seqcalib/layer_{i - 1}.hidden.safetensors",
        "mask": f"{prev}/masks/layer_{i - 1}.safetensors",
    }
    if updates_weights(wildcards.method):
        out["weights"] = f"{prev}/weights/layer_{i - 1}.safetensors"
    return out


def _stats(wildcards):
    if wildcards.prop == "dense":
        return f"{calib_dir(wildcards.base)}/dense/layer_{wildcards.layer}.stats.safetensors"
    variant = VARIANT.format(**wildcards)
    return f"{variant}/seqcalib/layer_{wildcards.layer}.stats.safetensors"


def _moe_inputs(wildcards):
    """Cached MoE-block inputs of one layer (dense pass, or this variant's sequential chain)."""
    return _moe_inputs_of(wildcards, wildcards.layer)


def _moe_inputs_of(wildcards, layer):
    if wildcards.prop == "dense":
        return f"{calib_dir(wildcards.base)}/dense/layer_{layer}.inputs.safetensors"
    variant = VARIANT.format(**{k: wildcards[k] for k in ("base", "prop", "method", "sp")})
    return f"{variant}/seqcalib/layer_{layer}.inputs.safetensors"


def _all_moe_inputs(wildcards):
    return [_moe_inputs_of(wildcards, i) for i in LAYERS]


def _layer_files(wildcards):
    """Per-layer results ``apply`` assembles: masks, plus updated weights for SparseGPT methods."""
    variant = VARIANT.format(**{k: wildcards[k] for k in ("base", "prop", "method", "sp")})
    out = {"masks": [f"{variant}/masks/layer_{i}.safetensors" for i in LAYERS]}
    if updates_weights(wildcards.method):
        out["weights"] = [f"{variant}/weights/layer_{i}.safetensors" for i in LAYERS]
    return out


def _checkpoint(path):
    return path if config["artifacts"]["keep_pruned_checkpoints"] else temp(path)
