# Parse time, before any job: params validation (one clear line per problem, nothing written), then the settings
# derived from params that the rules share. Paths are in paths.smk; what the run builds is pruning.sweep.
import os
import sys
from pathlib import Path

from snakemake.utils import validate

from pruning.eval.lm_harness import LOCAL_TASKS, resolve_tasks
from pruning.params import ParamsError, check_params
from pruning.sweep import Sweep

SCHEMA = Path(workflow.basedir) / "workflow/schemas/params.schema.yaml"
try:  # fills the schema's defaults between the checks that need them
    EXTERNAL_MODEL_CONFIG = check_params(config, SCHEMA, fill_defaults=lambda c: validate(c, str(SCHEMA)))
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


def script_code(script):
    """A rule's code inputs: its script in workflow/scripts/ and every library file that script imports, directly
    or not (pruning.import_closure, read when the workflow loads). Snakemake does not track imported code itself.

    Relative to the working directory, so a clone or a moved checkout keeps its provenance."""
    from pruning.import_closure import import_closure

    path = Path(workflow.basedir) / "workflow/scripts" / script
    return [os.path.relpath(f) for f in (path, *import_closure(path, Path(workflow.basedir) / "pruning"))]
