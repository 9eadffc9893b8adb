# The one definition of the DAG. Parameters: params.yaml. Run settings: workflow/profiles/.
from snakemake.utils import min_version

min_version("9.0")

from pruning.params import yaml_without_base60

yaml_without_base60()  # "2:4" written unquoted by `dvc exp run -S` stays an N:M pattern



configfile: "params.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/prune.smk"
include: "workflow/rules/experts.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/lm_eval.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
