"""The local lm-eval tasks' JSONL files from the held-out test split (see pruning/data/lm_tasks.py)."""
from pruning.warm_start import handoff

handoff()  # in a local run: continue in a process forked from the warm interpreter

import json

from pruning import jobs
from pruning.atomic import sha256_file, write_json, write_text
from pruning.data import lm_tasks
from pruning.data.sources import docs

log = jobs.start(snakemake.log[0])
c, out = snakemake.params.local, snakemake.output
test = docs(c["source"], "test", snakemake.params.corpus_dir)
items = lm_tasks.next_line_items(test, c["next_line_items"], c["seed"], c["context_lines"], c["num_choices"])
rolling = lm_tasks.rolling_docs(test, c["rolling_docs"])
for path, rows in ((out.code_next_line, items), (out.code_rolling, rolling)):
    write_text(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))
write_json(out.manifest, {
    "source": c["source"], "split": "test", "test_documents": len(test), "settings": c,
    "code_next_line": {"items": len(items), "num_choices": c["num_choices"], "chance_acc": 1 / c["num_choices"],
                       "sha256": sha256_file(out.code_next_line)},
    "code_rolling": {"documents": len(rolling), "words": sum(len(r["text"].split()) for r in rolling),
                     "bytes": sum(len(r["text"].encode()) for r in rolling), "sha256": sha256_file(out.code_rolling)},
})
log.info("code_next_line: %d items from %d test documents; code_rolling: %d documents", len(items), len(test), len(rolling))
