"""Zero the masked expert weights and save a standard HF checkpoint (safetensors) + achieved sparsity."""
import json

from transformers import AutoTokenizer

from pruning.adapters import get_adapter
from pruning.apply import apply_layer_masks, check_nm, sparsity_report
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
for path in snakemake.input.masks:
    masks, meta = load_masks(path)
    layer = int(meta["layer"])
    apply_layer_masks(adapter, adapter.decoder_layers(model)[layer], masks)
    mask_meta[layer] = {"fallback_experts": json.loads(meta["fallback_experts"]), "stats_sha256": meta["stats_sha256"]}

report = sparsity_report(adapter, model)
if pattern.is_nm:
    for i in adapter.moe_layer_indices():
        ex = adapter.experts(adapter.decoder_layers(model)[i])
        assert check_nm(ex.gate_up_proj, pattern.n, pattern.m) and check_nm(ex.down_proj, pattern.n, pattern.m), i
report.update(
    method=w.method, pattern=str(pattern) if pattern.is_nm else "unstructured", target_sparsity=pattern.target,
    propagation=w.prop, masks=mask_meta,
)
with atomic_dir(snakemake.output.checkpoint) as d:
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(snakemake.params.model_dir).save_pretrained(d)
    write_json(f"{d}/pruning_config.json", {k: v for k, v in report.items() if k != "layers"})
write_json(snakemake.output.sparsity, report)
log.info("expert sparsity %.4f (target %s); non-expert sparsity %.6f", report["expert_sparsity"], pattern, report["non_expert_sparsity"])
