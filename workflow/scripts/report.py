"""Every table, plot and metrics file of the run (pruning.report.build), from the pipeline's own outputs."""
from pruning.warm_start import handoff

handoff()  # in a local run: continue in a process forked from the warm interpreter

from pruning import jobs
from pruning.report.build import build

log = jobs.start(snakemake.log[0])
p = snakemake.params
results = build(p.config, dict(snakemake.output.items()), lm_eval=p.lm_eval, calib_stats=p.calib_stats,
                base_report=p.base_report, lm_tasks=p.lm_tasks, schema=snakemake.input.schema)
log.info("wrote the report of %d models", len(results.models))
