"""Expert search for one layer and kept count: NAEE's loss of every dropped set, and the baselines' choices."""
from pruning.warm_start import handoff

handoff()  # in a local run: continue in a process forked from the warm interpreter

from safetensors.torch import load_file

from pruning import jobs
from pruning.atomic import write_json
from pruning.experts.baselines import add_scores, method_scores, random_experts, routed_scores, top_experts
from pruning.experts.search import BlockLoss, search
from pruning.gpu_pool import claim_device, log_device
from pruning.models import get_adapter
from pruning.models.checkpoint import load_config, read_experts, read_router

w, p = snakemake.wildcards, snakemake.params
layer, keep = int(w.layer), int(w.keep)
log = jobs.start(snakemake.log[0], p.seed, snakemake.threads)
adapter = get_adapter(load_config(p.model_dir))
E = adapter.num_experts
with claim_device() as device:
    log_device(log, device)
    x = load_file(snakemake.input.inputs)["hidden_states"].to(device)
    experts = read_experts(p.model_dir, adapter, layer).to(device)
    router = read_router(p.model_dir, adapter, layer).to(device=device)
    groups = adapter.groups()  # a group-limited router keeps the same number of experts per group
    per = p.calib["seqlen"] * p.calib["batch_size"]  # one calibration batch of sequences, as in NAEE
    batches = [x[i : i + per] for i in range(0, x.shape[0], per)]
    loss = BlockLoss(batches, router, experts)  # targets: the unpruned block
    res = search(loss, E, keep, p.search["max_subsets"], p.search["beam_width"], groups)
    sums = None
    for b in batches:  # the model's own routing (its dtype) and combine weights
        sums = add_scores(sums, routed_scores(b, router.to(b.dtype).route(b), experts))
    scores = method_scores(sums)
    chosen = {"naee": res["kept"], **{m: top_experts(scores[m], keep, groups) for m in scores},
              "random": random_experts(E, keep, p.seed, layer, groups)}
    known = {tuple(d): v for d, v in res["candidates"]}
    dropped = {m: tuple(e for e in range(E) if e not in k) for m, k in chosen.items()}
    missing = sorted({d for d in dropped.values() if d not in known})
    known.update(zip(missing, loss(missing)))
    target_norm = loss.target_norm
    env = jobs.environment(device)
write_json(snakemake.output[0], {
    "layer": layer, "keep": keep, "num_experts": E, "top_k": adapter.top_k, "calib_id": w.cid, "mode": "layerwise",
    "tokens": int(x.shape[0]), "batches": len(batches), "search": res["search"], "exhaustive": res["exhaustive"],
    "objective": "sum over batches of ||Z_b - F_D(X_b)||_F, float64",
    "target_norm": target_norm,
    "chosen": chosen,
    "loss": {m: known[d] for m, d in dropped.items()},
    "relative_loss": {m: known[d] / target_norm for m, d in dropped.items()},
    "scores": {**scores, "count": sums["count"].tolist()},
    "candidates": res["candidates"],
    "environment": env,
})
log.info("layer %d keep %d: %s; NAEE drops %s (loss %.4f, %.2f%% of ||Z||)", layer, keep, res["search"], res["dropped"],
         res["loss"], 100 * res["loss"] / target_norm)
for m, k in chosen.items():
    log.info("  %-9s keeps %s  loss %.4f", m, k, known[dropped[m]])
