"""Zero the masked expert weights and save a standard HF checkpoint (safetensors) + achieved sparsity.

The model is never loaded: the base checkpoint streams tensor by tensor through the masks (and a SparseGPT
method's updated weights) into new shards in the base's key layout and stored dtype (``models.rewrite``); the
sparsity report and the N:M check are computed on the way."""
from pruning.warm_start import handoff

handoff()  # in a local run: continue in a process forked from the warm interpreter

import json

from pruning import jobs
from pruning.atomic import write_json
from pruning.models.rewrite import rewrite_checkpoint
from pruning.safetensors_io import read_metadata
from pruning.weights.masks import check_mask_file
from pruning.weights.pattern import Pattern

log = jobs.start(snakemake.log[0])
p, w, inp = snakemake.params, snakemake.wildcards, snakemake.input
pattern = Pattern.parse(w.sp)
masks, weights, mask_meta = {}, {}, {}
weight_files = inp.get("weights", [])  # SparseGPT methods: updated surviving weights, one per mask file
for li, path in enumerate(inp.masks):
    meta = check_mask_file(path)  # an intact mask file, or one line naming it
    layer = int(meta["layer"])
    masks[layer] = path
    mask_meta[layer] = {"fallback_experts": json.loads(meta["fallback_experts"]), "stats_sha256": meta["stats_sha256"]}
    if weight_files:
        wlayer = read_metadata(weight_files[li]).get("layer")
        if wlayer is not None and int(wlayer) != layer:
            raise ValueError(f"{weight_files[li]} holds layer {wlayer}, its mask file {path} layer {layer}")
        weights[layer] = weight_files[li]


def build_report(sparsity: dict) -> dict:
    return {**sparsity, "method": w.method, "pattern": pattern.kind, "target_sparsity": pattern.target,
            "propagation": w.prop, "masks": mask_meta, "weights_updated": bool(weight_files)}


def finish(d, result):
    write_json(d / "pruning_config.json", {k: v for k, v in build_report(result.sparsity).items() if k != "layers"})


result = rewrite_checkpoint(p.model_dir, snakemake.output.checkpoint, masks=masks, weights=weights or None,
                            nm=(pattern.n, pattern.m) if pattern.is_nm else None,  # exactly N of every M pruned, and zero
                            report=True, trust_remote_code=p.model["trust_remote_code"], finish=finish)
report = build_report(result.sparsity)
write_json(snakemake.output.sparsity, report)
if result.unmapped:
    log.warning("%d checkpoint keys the model has no parameter for were copied unchanged (e.g. %s)",
                len(result.unmapped), result.unmapped[0])
log.info("expert sparsity %.4f (target %s); non-expert sparsity %.6f", report["expert_sparsity"], pattern, report["non_expert_sparsity"])
