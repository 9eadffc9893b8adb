"""Sequential propagation, layer i: run the pruned layer i-1 on its inputs, then calibrate layer i."""
from pruning.warm_start import handoff

handoff()  # in a local run: continue in a process forked from the warm interpreter

from safetensors.torch import load_file

from pruning import jobs
from pruning.atomic import save_safetensors
from pruning.calib.stream import calibrate_layer, embed, run_layer, run_layers
from pruning.gpu_pool import claim_device, log_device
from pruning.models.layer_source import open_source
from pruning.weights.assemble import prune_layer
from pruning.weights.masks import load_masks

p, inp = snakemake.params, snakemake.input
c, m = p.calib, p.model
i = int(snakemake.wildcards.layer)
log = jobs.start(snakemake.log[0], p.seed, snakemake.threads)
with claim_device() as device:
    log_device(log, device)
    source = open_source(p.model_dir, m["dtype"], device, m["offload"], m["trust_remote_code"])
    adapter = source.adapter
    j = p.previous  # the previous MoE layer (None: i is the first); dense layers in between run as they are
    if j is None:
        hidden = run_layers(source, embed(source, load_file(inp.tokens)["input_ids"], c["batch_size"]), 0, i, c["batch_size"])
    else:
        prev = load_file(inp.hidden)["hidden_states"].to(device)
        with source.layer(j) as layer:  # as its mask job left it (SparseGPT: with the updated weights)
            prune_layer(adapter, layer, load_masks(inp.mask)[0], load_file(inp.weights) if "weights" in inp.keys() else None)
            hidden = run_layer(layer, prev, source.context(prev.shape[1], j), c["batch_size"])
        hidden = run_layers(source, hidden, j + 1, i, c["batch_size"])
    with source.layer(i) as layer:
        _, inputs, st = calibrate_layer(adapter, layer, hidden, source.context(hidden.shape[1], i), c["batch_size"])
    meta = {"layer": i, "propagation": "sequential", **dict(snakemake.wildcards)}
    save_safetensors(snakemake.output.hidden, {"hidden_states": hidden}, meta)
    save_safetensors(snakemake.output.inputs, {"hidden_states": inputs}, meta)
    save_safetensors(snakemake.output.stats, st, meta)
    log.info("layer %d: routed tokens per expert %s", i, st["count"].tolist())
