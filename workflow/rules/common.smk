# Parse-time helpers: params validation, path builders, the sweep. Pure Python, no rules.
import os
import sys
from pathlib import Path

from snakemake.utils import validate

from pruning.prune import METHODS as ALL_METHODS, SCORE_METHODS, SPARSEGPT_METHODS, updates_weights
from pruning.params import (
    ParamsError,
    calib_id,
    check_model,
    check_schema,
    check_semantics,
    sparsity_token,
)

SCHEMA = Path(workflow.basedir) / "workflow/schemas/params.schema.yaml"
try:
    check_schema(config, SCHEMA)  # one clear line per problem, before anything runs
    check_semantics(config)
    EXTERNAL_MODEL_CONFIG = check_model(config)
except ParamsError as exc:
    sys.stderr.write(f"params.yaml: {exc}\n")
    sys.exit(1)
validate(config, str(SCHEMA))  # fills schema defaults

BUILTIN = config["model"]["name_or_path"] == "builtin"
ROOT = f"results/{config['model']['name']}"
CID = calib_id(config["calib"], config["seed"])
CALIB = f"{ROOT}/calib/{CID}"
LOGS = f"{ROOT}/logs"
BENCH = f"{ROOT}/benchmarks"
CORPUS = "data/builtin"
CORPUS_FILES = [f"{CORPUS}/{s}.jsonl" for s in ("train", "validation", "test")] + [f"{CORPUS}/manifest.json"]
NEEDS_CORPUS = BUILTIN or "builtin" in (config["calib"]["source"], config["eval"]["dataset"])

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
README_BLOCK = config["report"].get("readme_block", "results")
VARIANT = f"{ROOT}/{CID}/{{prop}}/{{method}}/{{sp}}"  # one pruned variant


wildcard_constraints:
    prop="dense|sequential",
    method="|".join(ALL_METHODS),
    sp=r"0\.\d+|\d+of\d+",
    layer=r"\d+",


def model_inputs():
    """Files that stand for the base model (its directory when the pipeline builds it)."""
    return [MODEL_DIR] if BUILTIN else [f"{MODEL_DIR}/config.json"]


def corpus_inputs():
    return CORPUS_FILES if NEEDS_CORPUS else []


def variants():
    return [dict(prop=p, method=m, sp=s) for p in PROPAGATIONS for m in METHODS for s in SPARSITIES]


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
        return {"tokens": f"{CALIB}/tokens.safetensors"}
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
        return f"{CALIB}/dense/layer_{wildcards.layer}.stats.safetensors"
    variant = VARIANT.format(**wildcards)
    return f"{variant}/seqcalib/layer_{wildcards.layer}.stats.safetensors"


def _moe_inputs(wildcards):
    """Cached MoE-block inputs of one layer (dense pass, or this variant's sequential chain)."""
    return _moe_inputs_of(wildcards.prop, wildcards.method, wildcards.sp, wildcards.layer)


def _moe_inputs_of(prop, method, sp, layer):
    if prop == "dense":
        return f"{CALIB}/dense/layer_{layer}.inputs.safetensors"
    variant = VARIANT.format(prop=prop, method=method, sp=sp)
    return f"{variant}/seqcalib/layer_{layer}.inputs.safetensors"


def _all_moe_inputs(wildcards):
    return [_moe_inputs_of(wildcards.prop, wildcards.method, wildcards.sp, i) for i in LAYERS]


def _layer_files(wildcards):
    """Per-layer results ``apply`` assembles: masks, plus updated weights for SparseGPT methods."""
    variant = VARIANT.format(**wildcards)
    out = {"masks": [f"{variant}/masks/layer_{i}.safetensors" for i in LAYERS]}
    if updates_weights(wildcards.method):
        out["weights"] = [f"{variant}/weights/layer_{i}.safetensors" for i in LAYERS]
    return out


def _checkpoint(path):
    return path if config["artifacts"]["keep_pruned_checkpoints"] else temp(path)
