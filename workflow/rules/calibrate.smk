# Calibration-stat caching. Files are keyed by what determines them (model, source, nsamples, seqlen,
# seed = CID), so changing only the method or the sparsity never recomputes them.


rule calibrate:
    """Dense propagation: one layer-by-layer streaming pass shared by every method and sparsity."""
    input:
        model=model_inputs(),
        corpus=corpus_inputs(),
        code=pkg("calibrate", "stats", "data", "adapters/base", "adapters/mixtral"),
    output:
        tokens=f"{CALIB}/tokens.safetensors",
        stats=expand(f"{CALIB}/dense/layer_{{layer}}.stats.safetensors", layer=LAYERS),
        inputs=expand(f"{CALIB}/dense/layer_{{layer}}.inputs.safetensors", layer=LAYERS),
    log:
        f"{LOGS}/calibrate/{CID}.log",
    benchmark:
        f"{BENCH}/calibrate/{CID}.tsv"
    params:
        model_dir=MODEL_DIR,
        model=config["model"],
        calib=config["calib"],
        seed=config["seed"],
        corpus_dir=CORPUS,
        out_dir=f"{CALIB}/dense",
    threads: workflow.cores
    resources:
        gpu=1,
    script:
        "../scripts/calibrate.py"


rule calibrate_sequential:
    """Sequential propagation, one job per layer: layer i's statistics come from inputs that passed
    through the already-pruned layers < i. An interrupted run resumes at the first missing layer."""
    input:
        unpack(_previous_layer),
        model=model_inputs(),
        code=pkg("calibrate", "stats", "apply", "adapters/base", "adapters/mixtral"),
    output:
        hidden=f"{VARIANT}/seqcalib/layer_{{layer}}.hidden.safetensors",
        stats=f"{VARIANT}/seqcalib/layer_{{layer}}.stats.safetensors",
        inputs=f"{VARIANT}/seqcalib/layer_{{layer}}.inputs.safetensors",
    log:
        f"{LOGS}/{CID}/{{prop}}/{{method}}/{{sp}}/calibrate_sequential_{{layer}}.log",
    benchmark:
        f"{BENCH}/{CID}/{{prop}}/{{method}}/{{sp}}/calibrate_sequential_{{layer}}.tsv"
    params:
        model_dir=MODEL_DIR,
        model=config["model"],
        calib=config["calib"],
    wildcard_constraints:
        prop="sequential",
    threads: workflow.cores
    resources:
        gpu=1,
    script:
        "../scripts/calibrate_sequential.py"
