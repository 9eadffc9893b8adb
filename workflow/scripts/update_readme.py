"""Replace the text between a block's markers in README.md with metrics/results.md and the plot."""
from pruning.warm_start import handoff

handoff()  # in a local run: continue in a process forked from the warm interpreter

import shutil
from pathlib import Path

from pruning import jobs
from pruning.atomic import atomic_path, write_text

log = jobs.start(snakemake.log[0])
block = snakemake.params.block
BEGIN, END = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
inp, out = snakemake.input, snakemake.output
for src, dst in ((inp.plot, out.plot), (inp.usage_plot, out.usage_plot), (inp.distill_plot, out.distill_plot),
                 (inp.acc_plot, out.acc_plot), (inp.sparsity_plot, out.sparsity_plot)):
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
readme = Path(snakemake.params.readme)
table = Path(snakemake.input.table).read_text().strip()
body = f"{table}\n\n![token perplexity vs sparsity]({snakemake.output.plot})"
if snakemake.params.lm_eval:
    body += f"\n\n![mean zero-shot accuracy vs sparsity]({snakemake.output.acc_plot})"
body += f"\n\n![achieved sparsity of every expert per layer]({snakemake.output.sparsity_plot})"
if snakemake.params.experts:
    body += f"\n\n![expert usage per layer, before and after expert pruning and skipping]({snakemake.output.usage_plot})"
if snakemake.params.distilled:
    body += f"\n\n![distillation loss curves]({snakemake.output.distill_plot})"
text = readme.read_text() if readme.exists() else ""
if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    write_text(readme, f"{head}{BEGIN}\n{body}\n{END}{tail}")
    log.info("updated block %r of %s", block, readme)
else:
    log.warning("%s has no %s markers; left unchanged", readme, block)
