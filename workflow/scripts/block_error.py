"""Relative MoE-block output error of one pruned variant, per layer, on the calibration tokens it was pruned on."""
import json

from safetensors.torch import load_file

from pruning.adapters import get_adapter
from pruning.atomic import write_json
from pruning.checkpoint import load_config, read_expert_weights, read_router_weight
from pruning.diagnose import relative_block_error
from pruning.env import environment, seed_everything
from pruning.hessian import route_all
from pruning.joblog import to_log
from pruning.masks import load_masks

log = to_log(snakemake.log[0])
seed_everything(0, snakemake.threads)
model_dir = snakemake.params.model_dir
adapter = get_adapter(load_config(model_dir))
act = adapter.activation()
weights = snakemake.input.get("weights", [])
errors = {}
for li, (mask_path, inputs_path) in enumerate(zip(snakemake.input.masks, snakemake.input.inputs)):
    masks, meta = load_masks(mask_path)
    layer = int(meta["layer"])
    gate_up, down = read_expert_weights(model_dir, adapter, layer)
    router = read_router_weight(model_dir, adapter, layer).float()
    if weights:
        new = load_file(weights[li])
        p_gu, p_dn = new["gate_up_proj"], new["down_proj"]
    else:
        p_gu, p_dn = gate_up, down
    p_gu, p_dn = p_gu * masks["gate_up_proj"], p_dn * masks["down_proj"]
    inputs = load_file(inputs_path)["hidden_states"].float()
    routing = route_all(lambda x: adapter.route(router, x), inputs)
    errors[str(layer)] = relative_block_error((gate_up, down), (p_gu, p_dn), act, inputs, routing)
    log.info("layer %d: relative MoE-block output error %.5f", layer, errors[str(layer)])
mean = sum(errors.values()) / len(errors)
write_json(snakemake.output[0], {"relative_block_error": errors, "mean": mean, "environment": environment()})
