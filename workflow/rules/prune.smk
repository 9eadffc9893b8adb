# Per-layer masks and the assembled pruned checkpoint.


rule mask:
    """Score methods, one job per layer: score every expert matrix and choose its mask."""
    input:
        stats=_stats,
        model=base_inputs,
        code=pkg("prune", "scores", "masks", "checkpoint"),
    output:
        f"{VARIANT}/masks/layer_{{layer}}.safetensors",
    log:
        f"{LOGS}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/mask_{{layer}}.log",
    benchmark:
        f"{BENCH}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/mask_{{layer}}.tsv"
    params:
        model_dir=lambda w: base_dir(w.base),
        model=config["model"],
    wildcard_constraints:
        method="|".join(SCORE_METHODS),
    resources:
        gpu=1,
    script:
        "../scripts/mask.py"


rule mask_sparsegpt:
    """SparseGPT methods, one job per layer: OBS masks and updated weights from the cached MoE-block inputs."""
    input:
        inputs=_moe_inputs,
        model=base_inputs,
        code=pkg("prune", "sparsegpt", "hessian", "masks", "checkpoint", "adapters/base", "adapters/mixtral"),
    output:
        masks=f"{VARIANT}/masks/layer_{{layer}}.safetensors",
        weights=f"{VARIANT}/weights/layer_{{layer}}.safetensors",
    log:
        f"{LOGS}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/mask_{{layer}}.log",
    benchmark:
        f"{BENCH}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/mask_{{layer}}.tsv"
    params:
        model_dir=lambda w: base_dir(w.base),
        model=config["model"],
        sparsegpt=config["prune"]["sparsegpt"],
    wildcard_constraints:
        method="|".join(SPARSEGPT_METHODS),
    resources:
        gpu=1,
    script:
        "../scripts/mask_sparsegpt.py"


rule apply:
    """Write the pruned model as a standard HF checkpoint plus the achieved sparsity."""
    input:
        unpack(_layer_files),
        model=base_inputs,
        code=pkg("apply", "masks", "checkpoint"),
    output:
        checkpoint=_checkpoint(directory(f"{VARIANT}/checkpoint")),
        sparsity=f"{VARIANT}/sparsity.json",
    log:
        f"{LOGS}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/apply.log",
    benchmark:
        f"{BENCH}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/apply.tsv"
    params:
        model_dir=lambda w: base_dir(w.base),
        model=config["model"],
    script:
        "../scripts/apply.py"
