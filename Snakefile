# The one definition of the DAG. Parameters: params.yaml. Run settings: workflow/profiles/.
from snakemake.utils import min_version

min_version("9.0")

import os

from pruning.params import yaml_without_base60
from pruning.warm_start import enable as enable_warm_start

yaml_without_base60()  # "2:4" written unquoted by `dvc exp run -S` stays an N:M pattern
if workflow.local_exec and not workflow.remote_exec:  # not in SLURM jobs; PRUNING_WARM_START=0 turns it off
    enable_warm_start(os.getpid())  # jobs fork from one warm interpreter instead of importing torch each


configfile: "params.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/config.smk"  # params validation, settings derived from params
include: "workflow/rules/paths.smk"  # where every artifact lives
include: "workflow/rules/model.smk"  # corpus -> tiny model
include: "workflow/rules/calibrate.smk"  # calibration passes
include: "workflow/rules/prune.smk"  # weight pruning: masks -> pruned checkpoint
include: "workflow/rules/experts.smk"  # expert pruning and dynamic skipping
include: "workflow/rules/distill.smk"  # expert-wise distillation of pruned models
include: "workflow/rules/evaluate.smk"  # perplexity of every model, block error
include: "workflow/rules/lm_eval.smk"  # lm-eval of every model
include: "workflow/rules/report.smk"  # tables, plots, metrics, README


rule all:
    default_target: True
    input:
        final_outputs(),
