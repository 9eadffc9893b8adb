# Where every artifact lives: the path builders and input functions of the rules. A model's directory is its
# pruning.variant.Variant (the report reads the same paths); the patterns below are Variants of wildcards.
import re

from pruning.methods import EXPERT_METHODS, SCORE_METHODS, SPARSEGPT_METHODS, TUNES, WEIGHT_METHODS
from pruning.variant import Variant, model_root, parse_base

ROOT = model_root(MODEL)
MODEL_DIR = f"{ROOT}/base" if BUILTIN else INPUT_MODEL_DIR  # the input checkpoint ("full")
CORPUS = "data/builtin"
CORPUS_FILES = [f"{CORPUS}/{s}.jsonl" for s in ("train", "validation", "test")] + [f"{CORPUS}/manifest.json"]
LM_TASK_DATA = "data/lm_eval"  # the task YAMLs name these files, relative to the working directory
LM_TASK_DIR = os.path.relpath(Path(workflow.basedir) / "workflow/lm_eval_tasks")

WHOLE = Variant(MODEL, base="{base}")  # the input model or an expert-pruned one
SKIPPING = WHOLE.replace(skip=True)  # a base with dynamic skipping
VARIANT = Variant(MODEL, base="{base}", calib=CID, prop="{prop}", method="{method}", sp="{sp}")  # weight-pruned
TUNED = VARIANT.replace(tune="{tune}")  # weight-pruned, then distilled
ANY = f"{ROOT}/{{mdl}}"  # any of the above, by its path: what evaluations take
SEARCH = f"{ROOT}/search/{{cid}}/k{{keep}}"  # expert search per calibration set and kept count

BASE_RE = r"full|(?:" + "|".join(EXPERT_METHODS) + r")-k\d+(?:-task)?"
PROP_RE = "dense|sequential"
METHOD_RE = "|".join(WEIGHT_METHODS)
SP_RE = r"0\.\d+|\d+of\d+"
TUNE_RE = "|".join(TUNES)


wildcard_constraints:
    base=BASE_RE,
    prop=PROP_RE,
    method=METHOD_RE,
    sp=SP_RE,
    tune=TUNE_RE,
    layer=r"\d+",
    cid=r"[A-Za-z0-9_.-]+?-n\d+-l\d+-s\d+",
    keep=r"\d+",
    mdl=rf"(?:{BASE_RE})(?:/skip)?|(?:{BASE_RE})/{re.escape(CID)}/(?:{PROP_RE})/(?:{METHOD_RE})/(?:{SP_RE})(?:/(?:{TUNE_RE}))?",
    ds="ppl|task_ppl",


def log_file(*parts):
    """A rule's log file, under the path of what it writes: log_file(VARIANT.path, "mask_{layer}")."""
    return f"{ROOT}/logs/" + "/".join(parts) + ".log"


def bench_file(*parts):
    """A rule's benchmark file (wall time, peak memory), beside its log."""
    return f"{ROOT}/benchmarks/" + "/".join(parts) + ".tsv"


def calib_dir(base, cid):
    """Calibration cache of a base model on one calibration set."""
    return f"{WHOLE.replace(base=base).dir}/calib/{cid}"


def tokens_file(base, cid):
    """The calibration set's token windows (N, L) as one calibration pass drew them."""
    return f"{calib_dir(base, cid)}/tokens.safetensors"


def calib_file(base, cid, kind, layer="{layer}"):
    """One layer's file of the dense calibration pass: kind 'stats' or 'inputs' (the MoE-block inputs)."""
    return f"{calib_dir(base, cid)}/dense/layer_{layer}.{kind}.safetensors"


def seq_file(directory, kind, layer="{layer}"):
    """One layer's file of a weight-pruned model's sequential pass: kind 'hidden', 'stats' or 'inputs'."""
    return f"{directory}/seqcalib/layer_{layer}.{kind}.safetensors"


def mask_file(directory, layer="{layer}"):
    return f"{directory}/masks/layer_{layer}.safetensors"


def weights_file(directory, layer="{layer}"):
    """SparseGPT methods: one layer's updated expert weights."""
    return f"{directory}/weights/layer_{layer}.safetensors"


def model_inputs():
    """Files that stand for the input model (its directory when the pipeline builds it)."""
    return [MODEL_DIR] if BUILTIN else [f"{MODEL_DIR}/config.json"]


def base_dir(base):
    """Checkpoint directory of a base model."""
    return WHOLE.replace(base=base).checkpoint(MODEL_DIR)


def base_inputs(wildcards):
    return model_inputs() if wildcards.base == "full" else [base_dir(wildcards.base)]


def checkpoint_inputs(wildcards):
    """The checkpoint an evaluation of model ``mdl`` reads."""
    v = Variant.from_path(MODEL, wildcards.mdl)
    return model_inputs() if v.path == "full" else [v.checkpoint(MODEL_DIR)]


def corpus_inputs():
    return CORPUS_FILES if NEEDS_CORPUS else []


def lm_task_inputs():
    """The local tasks' data files and YAMLs the evaluation reads (none for hub tasks)."""
    return [f"{LM_TASK_DATA}/{t}.jsonl" for t in LOCAL_LM_TASKS] + [f"{LM_TASK_DIR}/{t}.yaml" for t in LOCAL_LM_TASKS]


def checkpoint_output(path):
    return path if config["artifacts"]["keep_pruned_checkpoints"] else temp(path)


def variant_of(wildcards) -> Variant:
    """The weight-pruned model of a rule's wildcards."""
    return VARIANT.replace(**{k: wildcards[k] for k in ("base", "prop", "method", "sp")})


def moe_inputs_file(wildcards, layer):
    """Cached MoE-block inputs of one layer: the dense pass of the base, or this variant's sequential chain."""
    if wildcards.prop == "dense":
        return calib_file(wildcards.base, CID, "inputs", layer)
    return seq_file(variant_of(wildcards).dir, "inputs", layer)


def stats_file(wildcards):
    if wildcards.prop == "dense":
        return calib_file(wildcards.base, CID, "stats", wildcards.layer)
    return seq_file(variant_of(wildcards).dir, "stats", wildcards.layer)


def layer_files(wildcards):
    """Per-layer results a pruned model is assembled from: masks, plus updated weights for SparseGPT methods."""
    d = variant_of(wildcards).dir
    out = {"masks": [mask_file(d, i) for i in LAYERS]}
    if WEIGHT_METHODS[wildcards.method].updates_weights:
        out["weights"] = [weights_file(d, i) for i in LAYERS]
    return out


def previous_moe_layer(layer) -> int | None:
    """The MoE layer before ``layer`` (dense layers in between are run as they are), None for the first."""
    k = LAYERS.index(int(layer))
    return LAYERS[k - 1] if k else None


def previous_layer(wildcards):
    """Sequential propagation, MoE layer i: the calibration tokens (the first MoE layer), else the previous MoE
    layer's inputs and results."""
    j = previous_moe_layer(wildcards.layer)
    if j is None:
        return {"tokens": tokens_file(wildcards.base, CID)}
    d = variant_of(wildcards).dir
    out = {"hidden": seq_file(d, "hidden", j), "mask": mask_file(d, j)}
    if WEIGHT_METHODS[wildcards.method].updates_weights:
        out["weights"] = weights_file(d, j)
    return out


def report_inputs():
    """Every file the report reads, from the sweep (pruning.report reads them by the same Variants)."""
    files = [v.file(ds) for v, ds in SWEEP.evaluations()]
    files += [v.file("lm_eval") for v in SWEEP.summary_models()] if LM_TASKS else []
    files += [v.file(f) for v in SWEEP.weight_variants() for f in ("sparsity", "block_error")]
    files += [v.file("sparsity") for v in SWEEP.distilled()]
    files += [v.file(f) for v in SWEEP.tuned() for f in ("distill", "history")]
    files += [SWEEP.whole(b).file(f) for b in SWEEP.expert_bases() for f in ("reduction", "search")]
    files += [SWEEP.whole(b, skip=True).file("betas") for b in SWEEP.skip_bases()]
    files += [calib_file("full", CID, "stats", i) for i in LAYERS]
    files += [f"{ROOT}/base_report.json"] if BUILTIN else []
    files += [f"{LM_TASK_DATA}/manifest.json"] if LOCAL_LM_TASKS else []
    return list(dict.fromkeys(files))


def final_outputs():
    out = ["metrics/ppl.json", "metrics/results.md"]
    if BUILTIN:
        out.append(f"{ROOT}/base_report.json")
    if config["report"]["update_readme"]:
        out.append(f"{ROOT}/readme.{README_BLOCK}.stamp")
    return out
