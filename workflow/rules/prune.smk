# Per-layer masks and the assembled pruned checkpoint.


rule mask:
    """One job per layer: score every expert matrix and choose its mask."""
    input:
        stats=_stats,
        model=model_inputs(),
        code=pkg("prune", "scores", "masks", "checkpoint"),
    output:
        f"{VARIANT}/masks/layer_{{layer}}.safetensors",
    log:
        f"{LOGS}/{CID}/{{prop}}/{{method}}/{{sp}}/mask_{{layer}}.log",
    benchmark:
        f"{BENCH}/{CID}/{{prop}}/{{method}}/{{sp}}/mask_{{layer}}.tsv"
    params:
        model_dir=MODEL_DIR,
        model=config["model"],
    resources:
        gpu=1,
    script:
        "../scripts/mask.py"


rule apply:
    """Write the pruned model as a standard HF checkpoint plus the achieved sparsity."""
    input:
        masks=expand(f"{VARIANT}/masks/layer_{{layer}}.safetensors", layer=LAYERS, allow_missing=True),
        model=model_inputs(),
        code=pkg("apply", "masks", "checkpoint"),
    output:
        checkpoint=_checkpoint(directory(f"{VARIANT}/checkpoint")),
        sparsity=f"{VARIANT}/sparsity.json",
    log:
        f"{LOGS}/{CID}/{{prop}}/{{method}}/{{sp}}/apply.log",
    benchmark:
        f"{BENCH}/{CID}/{{prop}}/{{method}}/{{sp}}/apply.tsv"
    params:
        model_dir=MODEL_DIR,
        model=config["model"],
    script:
        "../scripts/apply.py"
