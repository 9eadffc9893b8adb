"""One layer's SparseGPT masks and updated expert weights, from the layer's cached MoE-block inputs.

Reads only that layer's expert and router weights from the checkpoint shards."""
import json

from safetensors.torch import load_file

from pruning.adapters import get_adapter
from pruning.atomic import save_safetensors
from pruning.checkpoint import load_config, read_expert_weights, read_router_weight
from pruning.env import seed_everything
from pruning.gpu_pool import claim_device
from pruning.hessian import route_all
from pruning.joblog import to_log
from pruning.masks import kept_fraction, mask_metadata, save_masks
from pruning.params import parse_sparsity_token
from pruning.prune import layer_sparsegpt

log = to_log(snakemake.log[0])
seed_everything(0, snakemake.threads)
w, opts = snakemake.wildcards, snakemake.params.sparsegpt
blocksize, percdamp = opts.get("blocksize", 128), opts.get("dampening", 0.01)
layer, pattern = int(w.layer), parse_sparsity_token(w.sp)
with claim_device(".gpu_pool") as device:
    adapter = get_adapter(load_config(snakemake.params.model_dir))
    gate_up, down = read_expert_weights(snakemake.params.model_dir, adapter, layer)
    router = read_router_weight(snakemake.params.model_dir, adapter, layer).to(device)
    inputs = load_file(snakemake.input.inputs)["hidden_states"].to(device)
    routing = route_all(lambda x: adapter.route(router.to(x.dtype), x), inputs)
    masks, new, info = layer_sparsegpt(
        w.method, pattern, gate_up.to(device), down.to(device), inputs, routing, adapter.activation(), blocksize, percdamp
    )
    if info["fallback_experts"]:
        log.warning("layer %d: experts %s got no calibration tokens; pruned by magnitude", layer, info["fallback_experts"])
    if info["max_damp"] > percdamp:
        log.warning("layer %d: dampening raised to %.3g of the mean diagonal", layer, info["max_damp"])
    meta = mask_metadata(w.method, pattern, w.prop, layer, snakemake.input.inputs, info)
    save_masks(snakemake.output.masks, {k: v.cpu() for k, v in masks.items()}, meta)
    save_safetensors(snakemake.output.weights, {k: v.cpu().contiguous() for k, v in new.items()},
                     {"layer": layer, "method": w.method, "pattern": meta["pattern"]})
    log.info("layer %d: %s %s, kept %.4f, tokens per expert %s, OBS loss %.4g, dead columns %d",
             layer, w.method, pattern, kept_fraction(masks), json.dumps(info["tokens_per_expert"]), info["obs_loss"], info["dead_columns"])
