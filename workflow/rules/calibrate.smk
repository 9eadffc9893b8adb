# Calibration-stat caching. Files are keyed by what determines them (base model, source, nsamples, seqlen,
# seed = cid), so changing only the method or the sparsity never recomputes them.
CALIB_PATH = f"{ROOT}/{{base}}/calib/{{cid}}"


rule calibrate:
    """Dense propagation: one layer-by-layer streaming pass shared by every method and sparsity."""
    input:
        model=base_inputs,
        corpus=corpus_inputs(),
        code=pkg("calibrate", "stats", "data", "sources", "skipping", "adapters/base", "adapters/mixtral"),
    output:
        tokens=f"{CALIB_PATH}/tokens.safetensors",
        stats=expand(f"{CALIB_PATH}/dense/layer_{{layer}}.stats.safetensors", layer=LAYERS, allow_missing=True),
        inputs=expand(f"{CALIB_PATH}/dense/layer_{{layer}}.inputs.safetensors", layer=LAYERS, allow_missing=True),
    log:
        f"{LOGS}/calibrate/{{base}}/{{cid}}.log",
    benchmark:
        f"{BENCH}/calibrate/{{base}}/{{cid}}.tsv"
    params:
        model_dir=lambda w: base_dir(w.base),
        model=config["model"],
        calib=lambda w: CALIB_SETS[w.cid],
        seed=config["seed"],
        corpus_dir=CORPUS,
        out_dir=lambda w: f"{calib_dir(w.base, w.cid)}/dense",
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
        model=base_inputs,
        code=pkg("calibrate", "stats", "apply", "adapters/base", "adapters/mixtral"),
    output:
        hidden=f"{VARIANT}/seqcalib/layer_{{layer}}.hidden.safetensors",
        stats=f"{VARIANT}/seqcalib/layer_{{layer}}.stats.safetensors",
        inputs=f"{VARIANT}/seqcalib/layer_{{layer}}.inputs.safetensors",
    log:
        f"{LOGS}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/calibrate_sequential_{{layer}}.log",
    benchmark:
        f"{BENCH}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/calibrate_sequential_{{layer}}.tsv"
    params:
        model_dir=lambda w: base_dir(w.base),
        model=config["model"],
        calib=config["calib"],
    wildcard_constraints:
        prop="sequential",
    threads: workflow.cores
    resources:
        gpu=1,
    script:
        "../scripts/calibrate_sequential.py"
