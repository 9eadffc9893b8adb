import csv
import io
import json

from pruning import report
from pruning.atomic import write_json, write_text
from pruning.joblog import to_log

log = to_log(snakemake.log[0])
inp, out, p = snakemake.input, snakemake.output, snakemake.params
dense = json.load(open(inp.dense))
from safetensors.torch import load_file

from pruning.diagnose import channel_outlier_ratio

rows = report.rows(p.variants, inp.variants, inp.sparsity, inp.block_error)
outliers = [channel_outlier_ratio(load_file(f)["gate_up.sum_x2"]) for f in inp.calib_stats]

header = (
    f"Model `{p.model}`, calibration `{p.calib_id}`, evaluation: token perplexity on the `{p.eval['dataset']}` "
    f"test split, {dense['windows']} non-overlapping windows of {p.eval['seqlen']} tokens."
)
if inp.base_report:
    b = json.load(open(inp.base_report[0]))
    header += (
        f"\n\nEmbedded tiny Mixtral ({b['parameters']:,} parameters, trained on {b['train_tokens']:,} tokens in "
        f"{b['train_seconds'] / 60:.1f} min): validation token perplexity **{b['validation_ppl']:.2f}** vs "
        f"**{b['unigram_ppl']:.2f}** for a unigram model of the training split."
    )
write_text(out.table, report.markdown(rows, dense["token_ppl"], header, outliers))
report.plot(rows, dense["token_ppl"], out.plot)

# DVC flattens nested keys with '.', so keys carry no dots: unpruned.token_ppl, dense.wanda.sp50.token_ppl
metrics = {"unpruned": {"token_ppl": dense["token_ppl"]}}
for r in rows:
    metrics.setdefault(r["propagation"], {}).setdefault(r["method"], {})[report.metric_key(r["sparsity"])] = {
        "token_ppl": r["token_ppl"], "expert_sparsity": r["expert_sparsity"], "block_error": r["block_error"]}
write_json(out.json, metrics)

buf = io.StringIO()
fields = ["propagation", "method", "sparsity", "target_sparsity", "expert_sparsity", "token_ppl", "block_error"]
w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
w.writeheader()
w.writerow({"propagation": "none", "method": "dense", "sparsity": "0", "target_sparsity": 0.0, "expert_sparsity": 0.0,
            "token_ppl": dense["token_ppl"]})
w.writerows(rows)
write_text(out.csv, buf.getvalue())
log.info("wrote %d rows", len(rows))
