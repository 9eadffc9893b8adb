"""Zero the masked expert weights and save a standard HF checkpoint (safetensors) + achieved sparsity."""
import json

from safetensors.torch import load_file
from transformers import AutoTokenizer

from pruning import jobs
from pruning.atomic import atomic_dir, write_json
from pruning.models import get_adapter
from pruning.models.checkpoint import load_model
from pruning.weights.assemble import prune_layer
from pruning.weights.masks import load_masks
from pruning.weights.pattern import Pattern
from pruning.weights.sparsity import check_layer_nm, sparsity_report

log = jobs.start(snakemake.log[0])
p, w, inp = snakemake.params, snakemake.wildcards, snakemake.input
pattern = Pattern.parse(w.sp)
model = load_model(p.model_dir, p.model["dtype"], "cpu", p.model["trust_remote_code"])
adapter = get_adapter(model.config)
mask_meta = {}
weight_files = inp.get("weights", [])  # SparseGPT methods: updated surviving weights
for li, path in enumerate(inp.masks):
    masks, meta = load_masks(path)
    layer = adapter.decoder_layers(model)[int(meta["layer"])]
    prune_layer(adapter, layer, masks, load_file(weight_files[li]) if weight_files else None)
    mask_meta[int(meta["layer"])] = {"fallback_experts": json.loads(meta["fallback_experts"]), "stats_sha256": meta["stats_sha256"]}
    if pattern.is_nm:  # exactly N of every M pruned, and zero, in what is saved
        check_layer_nm(adapter, layer, masks, pattern.n, pattern.m)

report = sparsity_report(adapter, model)
report.update(method=w.method, pattern=pattern.kind, target_sparsity=pattern.target, propagation=w.prop, masks=mask_meta,
              weights_updated=bool(weight_files))
with atomic_dir(snakemake.output.checkpoint) as d:
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(p.model_dir).save_pretrained(d)
    write_json(f"{d}/pruning_config.json", {k: v for k, v in report.items() if k != "layers"})
write_json(snakemake.output.sparsity, report)
log.info("expert sparsity %.4f (target %s); non-expert sparsity %.6f", report["expert_sparsity"], pattern, report["non_expert_sparsity"])
