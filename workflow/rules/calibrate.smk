# Calibration. The cache of a base model is keyed by what determines it (calibration set id = source, nsamples,
# seqlen, seed), so changing only the method or the sparsity never recomputes it.


rule calibrate:
    """Dense propagation: one layer-by-layer streaming pass shared by every method and sparsity."""
    input:
        model=base_inputs,
        corpus=corpus_inputs(),
        code=script_code("calibrate.py"),
    output:
        tokens=tokens_file("{base}", "{cid}"),
        stats=expand(calib_file("{base}", "{cid}", "stats"), layer=LAYERS, allow_missing=True),
        inputs=expand(calib_file("{base}", "{cid}", "inputs"), layer=LAYERS, allow_missing=True),
    log:
        log_file("{base}/calib/{cid}", "calibrate"),
    benchmark:
        bench_file("{base}/calib/{cid}", "calibrate")
    params:
        model_dir=lambda w: base_dir(w.base),
        model=config["model"],
        calib=lambda w: SWEEP.calib_sets[w.cid],
        seed=config["seed"],
        corpus_dir=CORPUS,
        layers=LAYERS,  # the order of the stats and inputs outputs
    threads: workflow.cores
    resources:
        gpu=1,
    script:
        "../scripts/calibrate.py"


rule calibrate_sequential:
    """Sequential propagation, one job per layer: layer i's statistics come from inputs that passed
    through the already-pruned layers < i. An interrupted run resumes at the first missing layer."""
    input:
        unpack(previous_layer),
        model=base_inputs,
        code=script_code("calibrate_sequential.py"),
    output:
        hidden=seq_file(VARIANT.dir, "hidden"),
        stats=seq_file(VARIANT.dir, "stats"),
        inputs=seq_file(VARIANT.dir, "inputs"),
    log:
        log_file(VARIANT.path, "calibrate_sequential_{layer}"),
    benchmark:
        bench_file(VARIANT.path, "calibrate_sequential_{layer}")
    params:
        model_dir=lambda w: base_dir(w.base),
        model=config["model"],
        calib=config["calib"],
        seed=config["seed"],
        previous=lambda w: previous_moe_layer(w.layer),
    wildcard_constraints:
        prop="sequential",
    threads: workflow.cores
    resources:
        gpu=1,
    script:
        "../scripts/calibrate_sequential.py"
