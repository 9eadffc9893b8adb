# Parse time, before any job: params validation (one clear line per problem, nothing written), then the settings
# derived from params that the rules share. Paths are in paths.smk; what the run builds is pruning.sweep.
import os
import sys
from pathlib import Path

from snakemake.utils import validate

from pruning.eval.lm_harness import LOCAL_TASKS, resolve_tasks
from pruning.params import ParamsError, check_experts, check_model, check_schema, check_semantics
from pruning.sweep import Sweep

SCHEMA = Path(workflow.basedir) / "workflow/schemas/params.schema.yaml"
try:
    check_schema(config, SCHEMA)
    check_semantics(config)
    EXTERNAL_MODEL_CONFIG = check_model(config)
    if isinstance(config.get("experts"), dict) and config["experts"].get("task", {}) is None:
        config["experts"]["task"] = {}  # `-S experts.task=null`: Snakemake's default-filling validator cannot enter null
    validate(config, str(SCHEMA))  # fills schema defaults
    check_experts(config, EXTERNAL_MODEL_CONFIG)
except ParamsError as exc:
    sys.stderr.write(f"params.yaml: {exc}\n")
    sys.exit(1)

SWEEP = Sweep(config)
MODEL = SWEEP.model
CID = SWEEP.cid  # the calibration set of weight pruning and skipping
BUILTIN = config["model"]["name_or_path"] == "builtin"
if BUILTIN:
    LAYERS = list(range(config["tiny"]["arch"]["num_layers"]))  # the tiny model: every layer is an MoE layer
else:
    from pruning.models import get_adapter
    from pruning.models.checkpoint import resolve_dir

    INPUT_MODEL_DIR = str(resolve_dir(config["model"]["name_or_path"]))
    LAYERS = get_adapter(EXTERNAL_MODEL_CONFIG).moe_layer_indices()  # the MoE layers (dense ones are not pruned)

# lm-eval: the resolved task list ('auto' -> local tasks for the builtin model, the papers' nine otherwise)
LM_TASKS = resolve_tasks(config["lm_eval"]["tasks"], BUILTIN)
LM_EVAL = {k: v for k, v in config["lm_eval"].items() if k != "local"}  # what an evaluation's result depends on
LM_EVAL.update(tasks=LM_TASKS, max_length=config["lm_eval"]["max_length"] or config["eval"]["seqlen"])
LOCAL_LM_TASKS = [t for t in LM_TASKS if t in LOCAL_TASKS]
NEEDS_CORPUS = BUILTIN or bool(LOCAL_LM_TASKS) or any(
    s.split(":")[0] == "builtin"
    for s in [config["calib"]["source"], config["eval"]["dataset"]] + ([SWEEP.task["source"], SWEEP.task_eval] if SWEEP.task else [])
)
# What the distill rule's result depends on (not which variants are distilled: adding one reruns nothing).
DISTILL_TRAINING = {k: v for k, v in config["distill"].items() if k not in ("methods", "sparsities", "bases", "propagation", "ce_control")}
README_BLOCK = config["report"].get("readme_block", "results")


# Library modules most jobs run: the family adapters, checkpoints, the MoE primitives and the job plumbing.
MODEL_CODE = tuple(f"models/{f.stem}" for f in sorted((Path(workflow.basedir) / "pruning/models").glob("*.py"))) + (
    "moe", "jobs", "gpu_pool", "atomic")


def pkg(*modules):
    """Library modules a rule's result depends on (Snakemake does not track imported code itself).

    Relative to the working directory, so a clone or a moved checkout keeps its provenance."""
    return [os.path.relpath(Path(workflow.basedir) / "pruning" / f"{m}.py") for m in modules]
