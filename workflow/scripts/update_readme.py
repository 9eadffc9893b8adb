"""Replace the text between the results markers of README.md with metrics/results.md."""
from pathlib import Path

from pruning.atomic import write_text
from pruning.joblog import to_log

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
log = to_log(snakemake.log[0])
readme = Path(snakemake.params.readme)
table = Path(snakemake.input.table).read_text().strip()
text = readme.read_text() if readme.exists() else ""
if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    write_text(readme, f"{head}{BEGIN}\n{table}\n{END}{tail}")
    log.info("updated %s", readme)
else:
    log.warning("%s has no results markers; left unchanged", readme)
