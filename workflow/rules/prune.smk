# Weight pruning: per-layer masks (and SparseGPT's updated weights), then the assembled pruned checkpoint.


rule mask:
    """Score methods, one job per layer: score every expert matrix and choose its mask."""
    input:
        stats=stats_file,
        model=base_inputs,
        code=script_code("mask.py"),
    output:
        mask_file(VARIANT.dir),
    log:
        log_file(VARIANT.path, "mask_{layer}"),
    benchmark:
        bench_file(VARIANT.path, "mask_{layer}")
    params:
        model_dir=lambda w: base_dir(w.base),
        seed=config["seed"],
        shared=config["prune"]["shared_experts"],
    wildcard_constraints:
        method="|".join(SCORE_METHODS),
    resources:
        gpu=1,
    script:
        "../scripts/mask.py"


rule mask_sparsegpt:
    """SparseGPT methods, one job per layer: OBS masks and updated weights from the cached MoE-block inputs."""
    input:
        inputs=lambda w: moe_inputs_file(w, w.layer),
        model=base_inputs,
        code=script_code("mask_sparsegpt.py"),
    output:
        masks=mask_file(VARIANT.dir),
        weights=weights_file(VARIANT.dir),
    log:
        log_file(VARIANT.path, "mask_{layer}"),
    benchmark:
        bench_file(VARIANT.path, "mask_{layer}")
    params:
        model_dir=lambda w: base_dir(w.base),
        sparsegpt=config["prune"]["sparsegpt"],
        seed=config["seed"],
        shared=config["prune"]["shared_experts"],
    wildcard_constraints:
        method="|".join(SPARSEGPT_METHODS),
    resources:
        gpu=1,
    script:
        "../scripts/mask_sparsegpt.py"


rule apply:
    """Write the pruned model as a standard HF checkpoint plus the achieved sparsity."""
    input:
        unpack(layer_files),
        model=base_inputs,
        code=script_code("apply.py"),
    output:
        checkpoint=checkpoint_output(directory(VARIANT.file("checkpoint"))),
        sparsity=VARIANT.file("sparsity"),
    log:
        log_file(VARIANT.path, "apply"),
    benchmark:
        bench_file(VARIANT.path, "apply")
    params:
        model_dir=lambda w: base_dir(w.base),
        model=config["model"],
    script:
        "../scripts/apply.py"
