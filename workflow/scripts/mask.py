"""One layer's masks: reads only that layer's expert weights from the checkpoint shards."""
from safetensors.torch import load_file

from pruning.adapters import get_adapter
from pruning.checkpoint import load_config, read_expert_weights
from pruning.env import seed_everything
from pruning.gpu_pool import claim_device
from pruning.joblog import to_log
from pruning.masks import kept_fraction, mask_metadata, save_masks
from pruning.params import parse_sparsity_token
from pruning.prune import layer_masks

log = to_log(snakemake.log[0])
seed_everything(0, snakemake.threads)
w = snakemake.wildcards
layer, pattern = int(w.layer), parse_sparsity_token(w.sp)
with claim_device(".gpu_pool") as device:
    adapter = get_adapter(load_config(snakemake.params.model_dir))
    gate_up, down = read_expert_weights(snakemake.params.model_dir, adapter, layer)
    stats = load_file(snakemake.input.stats)
    masks, info = layer_masks(w.method, pattern, gate_up.to(device), down.to(device), stats)
    if info["fallback_experts"]:
        log.warning("layer %d: experts %s got no calibration tokens; pruned by magnitude", layer, info["fallback_experts"])
    meta = mask_metadata(w.method, pattern, w.prop, layer, snakemake.input.stats, info)
    save_masks(snakemake.output[0], {k: v.cpu() for k, v in masks.items()}, meta)
    log.info("layer %d: %s %s, kept %.4f", layer, w.method, pattern, kept_fraction(masks))
