"""Zero the masked expert weights and save a standard HF checkpoint (safetensors) + achieved sparsity."""
import json

from transformers import AutoTokenizer

from pruning.adapters import get_adapter
from safetensors.torch import load_file

from pruning.apply import apply_layer_masks, check_nm, set_layer_weights, sparsity_report
from pruning.atomic import atomic_dir, write_json
from pruning.checkpoint import load_model
from pruning.joblog import to_log, torch_dtype
from pruning.masks import load_masks
from pruning.params import parse_sparsity_token

log = to_log(snakemake.log[0])
m, w = snakemake.params.model, snakemake.wildcards
pattern = parse_sparsity_token(w.sp)
model = load_model(snakemake.params.model_dir, torch_dtype(m["dtype"]), "cpu", m["trust_remote_code"])
adapter = get_adapter(model.config)
mask_meta = {}
weight_files = snakemake.input.get("weights", [])  # SparseGPT methods: updated surviving weights
for li, path in enumerate(snakemake.input.masks):
    masks, meta = load_masks(path)
    layer = adapter.decoder_layers(model)[int(meta["layer"])]
    if weight_files:
        set_layer_weights(adapter, layer, load_file(weight_files[li]))
    apply_layer_masks(adapter, layer, masks)
    mask_meta[int(meta["layer"])] = {"fallback_experts": json.loads(meta["fallback_experts"]), "stats_sha256": meta["stats_sha256"]}
    if pattern.is_nm:  # exactly N of every M pruned, and zero, in what is saved
        ex = adapter.experts(layer)
        check_nm(ex.gate_up_proj, masks["gate_up_proj"], pattern.n, pattern.m)
        check_nm(ex.down_proj, masks["down_proj"], pattern.n, pattern.m)

report = sparsity_report(adapter, model)
report.update(
    method=w.method, pattern=str(pattern) if pattern.is_nm else "unstructured", target_sparsity=pattern.target,
    propagation=w.prop, masks=mask_meta, weights_updated=bool(weight_files),
)
with atomic_dir(snakemake.output.checkpoint) as d:
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(snakemake.params.model_dir).save_pretrained(d)
    write_json(f"{d}/pruning_config.json", {k: v for k, v in report.items() if k != "layers"})
write_json(snakemake.output.sparsity, report)
log.info("expert sparsity %.4f (target %s); non-expert sparsity %.6f", report["expert_sparsity"], pattern, report["non_expert_sparsity"])
