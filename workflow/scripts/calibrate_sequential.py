"""Sequential propagation, layer i: run the pruned layer i-1 on its inputs, then calibrate layer i."""
import torch
from safetensors.torch import load_file

from pruning.adapters import get_adapter
from pruning.apply import apply_layer_masks, set_layer_weights
from pruning.atomic import save_safetensors
from pruning.calibrate import ResidentSource, calibrate_layer, run_layer
from pruning.checkpoint import load_model
from pruning.env import seed_everything
from pruning.gpu_pool import claim_device
from pruning.joblog import to_log, torch_dtype
from pruning.masks import load_masks

log = to_log(snakemake.log[0])
c, m = snakemake.params.calib, snakemake.params.model
i = int(snakemake.wildcards.layer)
seed_everything(0, snakemake.threads)
with claim_device(".gpu_pool") as device:
    model = load_model(snakemake.params.model_dir, torch_dtype(m["dtype"]), device, m["trust_remote_code"])
    adapter = get_adapter(model.config)
    source = ResidentSource(model, adapter, device)
    if i == 0:
        tokens = load_file(snakemake.input.tokens)["input_ids"]
        hidden = torch.cat([source.embed(tokens[j : j + c["batch_size"]]) for j in range(0, tokens.shape[0], c["batch_size"])])
    else:
        prev = load_file(snakemake.input.hidden)["hidden_states"].to(device)
        masks, _ = load_masks(snakemake.input.mask)
        with source.layer(i - 1) as layer:
            if "weights" in snakemake.input.keys():  # SparseGPT: the updated surviving weights
                set_layer_weights(adapter, layer, load_file(snakemake.input.weights))
            apply_layer_masks(adapter, layer, masks)
            hidden = run_layer(layer, prev, source.context(prev.shape[1]), c["batch_size"])
    with source.layer(i) as layer:
        _, inputs, st = calibrate_layer(adapter, layer, hidden, source.context(hidden.shape[1]), c["batch_size"])
    meta = {"layer": i, "propagation": "sequential", **dict(snakemake.wildcards)}
    save_safetensors(snakemake.output.hidden, {"hidden_states": hidden}, meta)
    save_safetensors(snakemake.output.inputs, {"hidden_states": inputs}, meta)
    save_safetensors(snakemake.output.stats, st, meta)
    log.info("layer %d: routed tokens per expert %s", i, st["count"].tolist())
