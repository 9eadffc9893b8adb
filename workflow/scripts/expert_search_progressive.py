"""NAEE progressive mode, layer i: inputs through the already expert-pruned layers < i, targets from the
unpruned model; then run the pruned layer i to hand its output to layer i + 1."""
from pruning.warm_start import handoff

handoff()  # in a local run: continue in a process forked from the warm interpreter

import torch
from safetensors.torch import load_file

from pruning import jobs
from pruning.atomic import save_safetensors, write_json
from pruning.calib.stream import calibrate_layer, embed, run_layer, run_layers
from pruning.experts.search import BlockLoss, block_targets, search
from pruning.gpu_pool import claim_device, log_device
from pruning.models.layer_source import open_source

w, p, inp = snakemake.wildcards, snakemake.params, snakemake.input
i, keep, bs = int(w.layer), int(w.keep), p.calib["batch_size"]
log = jobs.start(snakemake.log[0], p.seed, snakemake.threads)
with claim_device() as device:
    log_device(log, device)
    m = p.model
    source = open_source(p.model_dir, m["dtype"], device, m["offload"], m["trust_remote_code"])
    adapter = source.adapter
    E = adapter.num_experts
    j = p.previous  # the previous MoE layer (None: i is the first); dense layers in between run as they are
    if j is None:
        hidden = run_layers(source, embed(source, load_file(inp.tokens)["input_ids"], bs), 0, i, bs)
    else:
        hidden = run_layers(source, load_file(inp.hidden)["hidden_states"].to(device), j + 1, i, bs)
    ctx = source.context(hidden.shape[1], i)
    with source.layer(i) as layer:
        _, x, _ = calibrate_layer(adapter, layer, hidden, ctx, bs)  # MoE inputs after the pruned layers < i
        x = x.to(device)
        dense = load_file(inp.dense_inputs)["hidden_states"].to(device)
        experts, router = adapter.expert_weights(layer), adapter.router(layer)
        per = p.calib["seqlen"] * bs  # one calibration batch of sequences, as in NAEE
        split = lambda t: [t[j : j + per] for j in range(0, t.shape[0], per)]  # noqa: E731
        targets = block_targets(split(dense), router, experts)
        loss = BlockLoss(split(x), router, experts, targets=targets)
        with torch.no_grad():
            res = search(loss, E, keep, p.search["max_subsets"], p.search["beam_width"], adapter.groups())
        target_norm = loss.target_norm
        adapter.drop_experts(layer, res["kept"])
        out = run_layer(layer, hidden, ctx, bs)
    env = jobs.environment(device)
save_safetensors(snakemake.output.hidden, {"hidden_states": out.cpu()}, {"layer": i, "keep": keep, "mode": "progressive"})
write_json(snakemake.output.search, {
    "layer": i, "keep": keep, "num_experts": E, "top_k": adapter.top_k, "calib_id": w.cid, "mode": "progressive",
    "tokens": int(x.shape[0]), "search": res["search"], "exhaustive": res["exhaustive"],
    "objective": "sum over batches of ||Z_b (unpruned model) - F_D(X_b) (inputs through pruned layers < i)||_F, float64",
    "target_norm": target_norm,
    "chosen": {"naee_progressive": res["kept"]},
    "loss": {"naee_progressive": res["loss"]},
    "relative_loss": {"naee_progressive": res["loss"] / target_norm},
    "candidates": res["candidates"],
    "environment": env,
})
log.info("layer %d keep %d (progressive): %s; drops %s (loss %.4f)", i, keep, res["search"], res["dropped"], res["loss"])
