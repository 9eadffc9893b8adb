"""One layer's masks by a score method: reads only that layer's expert weights from the checkpoint shards."""
from pruning.warm_start import handoff

handoff()  # in a local run: continue in a process forked from the warm interpreter

from pruning import jobs
from pruning.calib.stats import load_layer_stats
from pruning.gpu_pool import claim_device, log_device
from pruning.models import get_adapter
from pruning.models.checkpoint import load_config, read_experts, read_shared_experts
from pruning.weights.masks import kept_fraction, mask_metadata, save_masks
from pruning.weights.pattern import Pattern
from pruning.weights.prune import layer_masks

w, p = snakemake.wildcards, snakemake.params
layer, pattern = int(w.layer), Pattern.parse(w.sp)
log = jobs.start(snakemake.log[0], p.seed, snakemake.threads)
with claim_device() as device:
    log_device(log, device)
    adapter = get_adapter(load_config(p.model_dir))
    experts = read_experts(p.model_dir, adapter, layer).to(device)
    stats = load_layer_stats(snakemake.input.stats, layer, experts)  # one line naming a mismatched file
    masks, info = layer_masks(w.method, pattern, experts, stats)
    if p.shared:  # the shared experts: one always-routed expert, statistics weighted by its combine weight
        shared = read_shared_experts(p.model_dir, adapter, layer)[0].to(device)
        shared_masks, shared_info = layer_masks(w.method, pattern, shared, {k[7:]: v for k, v in stats.items() if k.startswith("shared.")})
        masks.update({f"shared.{k}": v for k, v in shared_masks.items()})
        info["shared_fallback"] = bool(shared_info["fallback_experts"])
    if info["fallback_experts"]:
        log.warning("layer %d: experts %s got no calibration tokens; pruned by magnitude", layer, info["fallback_experts"])
    meta = mask_metadata(w.method, pattern, w.prop, layer, snakemake.input.stats, info)
    save_masks(snakemake.output[0], masks, meta)
    log.info("layer %d: %s %s, kept %.4f", layer, w.method, pattern, kept_fraction(masks))
