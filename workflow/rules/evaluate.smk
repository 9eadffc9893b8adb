# Token perplexity of the dense model and of every variant, then the results table.


rule evaluate_ppl_dense:
    input:
        model=model_inputs(),
        corpus=corpus_inputs(),
        code=pkg("evaluate", "data"),
    output:
        f"{ROOT}/eval/dense/ppl.json",
    log:
        f"{LOGS}/eval/dense.log",
    benchmark:
        f"{BENCH}/eval/dense.tsv"
    params:
        checkpoint=MODEL_DIR,
        model=config["model"],
        eval=config["eval"],
        corpus_dir=CORPUS,
    threads: workflow.cores
    resources:
        gpu=1,
    script:
        "../scripts/evaluate_ppl.py"


rule evaluate_ppl:
    input:
        checkpoint=f"{VARIANT}/checkpoint",
        sparsity=f"{VARIANT}/sparsity.json",
        corpus=corpus_inputs(),
        code=pkg("evaluate", "data"),
    output:
        f"{VARIANT}/eval/ppl.json",
    log:
        f"{LOGS}/{CID}/{{prop}}/{{method}}/{{sp}}/evaluate_ppl.log",
    benchmark:
        f"{BENCH}/{CID}/{{prop}}/{{method}}/{{sp}}/evaluate_ppl.tsv"
    params:
        model=config["model"],
        eval=config["eval"],
        corpus_dir=CORPUS,
    threads: workflow.cores
    resources:
        gpu=1,
    script:
        "../scripts/evaluate_ppl.py"


rule block_error:
    """Relative MoE-block output error per layer on the calibration tokens: what the layer-wise methods minimise."""
    input:
        unpack(_layer_files),
        inputs=_all_moe_inputs,
        model=model_inputs(),
        code=pkg("diagnose", "hessian", "checkpoint", "masks"),
    output:
        f"{VARIANT}/eval/block_error.json",
    log:
        f"{LOGS}/{CID}/{{prop}}/{{method}}/{{sp}}/block_error.log",
    benchmark:
        f"{BENCH}/{CID}/{{prop}}/{{method}}/{{sp}}/block_error.tsv"
    params:
        model_dir=MODEL_DIR,
    script:
        "../scripts/block_error.py"


rule report:
    """metrics/ppl.json (DVC metrics), metrics/ppl.csv + PNG (DVC plots), metrics/results.md (table)."""
    input:
        dense=f"{ROOT}/eval/dense/ppl.json",
        variants=[f"{VARIANT}/eval/ppl.json".format(**v) for v in variants()],
        sparsity=[f"{VARIANT}/sparsity.json".format(**v) for v in variants()],
        block_error=[f"{VARIANT}/eval/block_error.json".format(**v) for v in variants()],
        calib_stats=expand(f"{CALIB}/dense/layer_{{layer}}.stats.safetensors", layer=LAYERS),
        base_report=[f"{ROOT}/base_report.json"] if BUILTIN else [],
        code=pkg("report", "diagnose"),
    output:
        json="metrics/ppl.json",
        csv="metrics/ppl.csv",
        table="metrics/results.md",
        plot="metrics/ppl_vs_sparsity.png",
    log:
        f"{LOGS}/report.log",
    params:
        variants=variants(),
        model=config["model"]["name"],
        calib_id=CID,
        eval=config["eval"],
    script:
        "../scripts/report.py"


rule readme:
    """Splice metrics/results.md into README.md between the block's markers; the plot goes to docs/."""
    input:
        table="metrics/results.md",
        plot="metrics/ppl_vs_sparsity.png",
    output:
        stamp=touch(f"{ROOT}/readme.{README_BLOCK}.stamp"),
        plot=f"docs/{README_BLOCK}.png",
    log:
        f"{LOGS}/readme.log",
    params:
        readme="README.md",
        block=README_BLOCK,
    script:
        "../scripts/update_readme.py"
