"""One layer's SparseGPT masks and updated expert weights, from the layer's cached MoE-block inputs.

Reads only that layer's expert and router weights from the checkpoint shards."""
from pruning.warm_start import handoff

handoff()  # in a local run: continue in a process forked from the warm interpreter

import json

from safetensors.torch import load_file

from pruning import jobs
from pruning.atomic import save_safetensors
from pruning.gpu_pool import claim_device, log_device
from pruning.models import get_adapter
import torch

from pruning.models.checkpoint import load_config, read_experts, read_router, read_shared_experts
from pruning.moe import Routing
from pruning.weights.masks import kept_fraction, mask_metadata, save_masks
from pruning.weights.pattern import Pattern
from pruning.weights.sparsegpt import layer_sparsegpt

w, p = snakemake.wildcards, snakemake.params
blocksize, percdamp = p.sparsegpt.get("blocksize", 128), p.sparsegpt.get("dampening", 0.01)
layer, pattern = int(w.layer), Pattern.parse(w.sp)
log = jobs.start(snakemake.log[0], p.seed, snakemake.threads)
with claim_device() as device:
    log_device(log, device)
    adapter = get_adapter(load_config(p.model_dir))
    experts = read_experts(p.model_dir, adapter, layer).to(device)
    router = read_router(p.model_dir, adapter, layer).to(device=device)
    inputs = load_file(snakemake.input.inputs)["hidden_states"].to(device)
    routing = router.to(inputs.dtype).route(inputs)
    # the experts were read for this job alone: updated in place, not copied
    masks, new, info = layer_sparsegpt(w.method, pattern, experts, inputs, routing, blocksize, percdamp, inplace=True)
    if p.shared:  # the shared experts: one always-routed expert with its combine weight (1 or its sigmoid gate)
        shared, gate = read_shared_experts(p.model_dir, adapter, layer)
        g = adapter.shared_combine(None if gate is None else gate.to(device), inputs)
        always = Routing(torch.zeros(inputs.shape[0], 1, dtype=torch.long, device=device), g[:, None])
        s_masks, s_new, s_info = layer_sparsegpt(w.method, pattern, shared.to(device), inputs, always, blocksize,
                                                 percdamp, inplace=True)
        masks.update({f"shared.{k}": v for k, v in s_masks.items()})
        new.update({f"shared.{k}": v for k, v in s_new.items()})
        info["shared_obs_loss"] = s_info["obs_loss"]
    if info["fallback_experts"]:
        log.warning("layer %d: experts %s got no calibration tokens; pruned by magnitude", layer, info["fallback_experts"])
    if info["max_damp"] > percdamp:
        log.warning("layer %d: dampening raised to %.3g of the mean diagonal", layer, info["max_damp"])
    meta = mask_metadata(w.method, pattern, w.prop, layer, snakemake.input.inputs, info)
    save_masks(snakemake.output.masks, masks, meta)
    save_safetensors(snakemake.output.weights, new, {"layer": layer, "method": w.method, "pattern": meta["pattern"]})
    log.info("layer %d: %s %s, kept %.4f, tokens per expert %s, OBS loss %.4g, dead columns %d",
             layer, w.method, pattern, kept_fraction(masks), json.dumps(info["tokens_per_expert"]), info["obs_loss"], info["dead_columns"])
