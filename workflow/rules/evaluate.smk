# Evaluation of every model by one rule each, whatever made it (full, expert-pruned, skipping, weight-pruned,
# distilled: ``{mdl}`` is its Variant id), and the block-error diagnostic of the weight-pruned ones.


rule evaluate_ppl:
    """Token perplexity of a model on the evaluation split (ppl) or the task domain's test split (task_ppl),
    with the expert calls per token and, for skipping models, the skip rate per layer."""
    input:
        checkpoint=checkpoint_inputs,
        corpus=corpus_inputs(),
        code=script_code("evaluate_ppl.py"),
    output:
        f"{ANY}/eval/{{ds}}.json",
    log:
        log_file("{mdl}", "evaluate_{ds}"),
    benchmark:
        bench_file("{mdl}", "evaluate_{ds}")
    params:
        checkpoint=lambda w: Variant.from_path(MODEL, w.mdl).checkpoint(MODEL_DIR),
        model=config["model"],
        eval=lambda w: config["eval"] if w.ds == "ppl" else {**config["eval"], "dataset": SWEEP.task_eval},
        seed=config["seed"],
        corpus_dir=CORPUS,
    threads: 1  # job start-up is single-threaded: on CPU two 1-thread jobs beat one 2-thread job
    resources:
        gpu=config["model"]["gpus"],  # a model larger than one GPU spreads over model.gpus
    script:
        "../scripts/evaluate_ppl.py"


rule block_error:
    """Relative MoE-block output error per layer on the calibration tokens: what the layer-wise methods minimise."""
    input:
        unpack(layer_files),
        inputs=lambda w: [moe_inputs_file(w, i) for i in LAYERS],
        model=base_inputs,
        code=script_code("block_error.py"),
    output:
        VARIANT.file("block_error"),
    log:
        log_file(VARIANT.path, "block_error"),
    benchmark:
        bench_file(VARIANT.path, "block_error")
    params:
        model_dir=lambda w: base_dir(w.base),
        seed=config["seed"],
    script:
        "../scripts/block_error.py"
