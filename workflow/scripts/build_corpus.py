"""The built-in offline corpus: the installed standard library's sources, split by a hash of each path."""
from pruning.warm_start import handoff

handoff()  # in a local run: continue in a process forked from the warm interpreter

from pruning import jobs
from pruning.data import corpus

log = jobs.start(snakemake.log[0])
c = snakemake.params.corpus
m = corpus.build(
    snakemake.output[0].rsplit("/", 1)[0], val_frac=c["val_frac"], test_frac=c["test_frac"], max_files=c["max_files"]
)
log.info("corpus: %s", {s: (v["n_files"], v["bytes"]) for s, v in m["splits"].items()})
