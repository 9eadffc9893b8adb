"""Relative MoE-block output error of one pruned variant, per layer, on the calibration tokens it was pruned on."""
from pruning.warm_start import handoff

handoff()  # in a local run: continue in a process forked from the warm interpreter

import torch
from safetensors.torch import load_file

from pruning import jobs
from pruning.atomic import write_json
from pruning.eval.block_error import relative_block_error
from pruning.models import get_adapter
from pruning.models.checkpoint import load_config, read_experts, read_router
from pruning.weights.masks import check_layer_masks, load_masks

p, inp = snakemake.params, snakemake.input
log = jobs.start(snakemake.log[0], p.seed, snakemake.threads)
adapter = get_adapter(load_config(p.model_dir))
weights = inp.get("weights", [])
errors = {}
for li, (mask_path, inputs_path) in enumerate(zip(inp.masks, inp.inputs)):
    masks, meta = load_masks(mask_path)
    layer = int(meta["layer"])
    dense = read_experts(p.model_dir, adapter, layer)
    check_layer_masks(mask_path, masks, meta, dense, inputs_path)  # shapes, and calibration data unchanged
    new = load_file(weights[li]) if weights else {"gate_up": dense.gate_up, "down": dense.down}

    def pruned(e, dense=dense, new=new, masks=masks):  # one pruned expert at a time, never a pruned copy of the layer
        s = slice(e, e + 1)
        return dense.expert(e).with_weights(new["gate_up"][s] * masks["gate_up"][s], new["down"][s] * masks["down"][s])

    inputs = load_file(inputs_path)["hidden_states"].float()
    routing = read_router(p.model_dir, adapter, layer).to(torch.float32).route(inputs)
    errors[str(layer)] = relative_block_error(dense, pruned, inputs, routing)
    del dense, new, masks, pruned
    log.info("layer %d: relative MoE-block output error %.5f", layer, errors[str(layer)])
mean = sum(errors.values()) / len(errors)
write_json(snakemake.output[0], {"relative_block_error": errors, "mean": mean, "environment": jobs.environment()})
