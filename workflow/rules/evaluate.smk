# Token perplexity of the dense model and of every variant, then the results table.


rule evaluate_model:
    """Token perplexity of a whole model: the dense checkpoint (full), an expert-pruned one, or a skipping one
    ('<base>/skip'), on the evaluation split (ppl) or the task domain's test split (task_ppl). Also counts the
    expert calls per token and, for skipping models, the skip rate per layer."""
    input:
        checkpoint=lambda w: model_inputs() if w.mdl == "full" else [model_dir_of(w.mdl)],
        corpus=corpus_inputs(),
        code=pkg("evaluate", "data", "sources", "usage", "skipping", "reduce", "checkpoint"),
    output:
        f"{ROOT}/{{mdl}}/eval/{{ds}}.json",
    log:
        f"{LOGS}/eval/{{mdl}}/{{ds}}.log",
    benchmark:
        f"{BENCH}/eval/{{mdl}}/{{ds}}.tsv"
    params:
        checkpoint=lambda w: model_dir_of(w.mdl),
        model=config["model"],
        eval=lambda w: config["eval"] if w.ds == "ppl" else {**config["eval"], "dataset": TASK_EVAL},
        corpus_dir=CORPUS,
    threads: 1  # job start-up is single-threaded: on CPU two 1-thread jobs beat one 2-thread job
    resources:
        gpu=1,
    script:
        "../scripts/evaluate_ppl.py"


rule evaluate_ppl:
    input:
        checkpoint=f"{VARIANT}/checkpoint",
        sparsity=f"{VARIANT}/sparsity.json",
        corpus=corpus_inputs(),
        code=pkg("evaluate", "data", "sources", "usage", "skipping", "reduce", "checkpoint"),
    output:
        f"{VARIANT}/eval/ppl.json",
    log:
        f"{LOGS}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/evaluate_ppl.log",
    benchmark:
        f"{BENCH}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/evaluate_ppl.tsv"
    params:
        model=config["model"],
        eval=config["eval"],
        corpus_dir=CORPUS,
    threads: 1  # job start-up is single-threaded: on CPU two 1-thread jobs beat one 2-thread job
    resources:
        gpu=1,
    script:
        "../scripts/evaluate_ppl.py"


rule block_error:
    """Relative MoE-block output error per layer on the calibration tokens: what the layer-wise methods minimise."""
    input:
        unpack(_layer_files),
        inputs=_all_moe_inputs,
        model=base_inputs,
        code=pkg("diagnose", "hessian", "checkpoint", "masks"),
    output:
        f"{VARIANT}/eval/block_error.json",
    log:
        f"{LOGS}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/block_error.log",
    benchmark:
        f"{BENCH}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/block_error.tsv"
    params:
        model_dir=lambda w: base_dir(w.base),
    script:
        "../scripts/block_error.py"


rule report:
    """metrics/ppl.json (DVC metrics), metrics/ppl.csv + PNG (DVC plots), metrics/results.md (table)."""
    input:
        dense=f"{ROOT}/full/eval/ppl.json",
        models=[f"{ROOT}/{m}/eval/{ds}.json" for m, ds in evaluated_models()],
        reductions=[f"{ROOT}/{b}/reduction.json" for b in expert_bases()],
        searches=[f"{ROOT}/{b}/search.json" for b in expert_bases()],
        betas=[f"{ROOT}/{b}/skip/betas.json" for b in config["skipping"]["bases"]],
        variants=[f"{VARIANT}/eval/ppl.json".format(**v) for v in variants()],
        sparsity=[f"{VARIANT}/sparsity.json".format(**v) for v in variants()],
        block_error=[f"{VARIANT}/eval/block_error.json".format(**v) for v in variants()],
        calib_stats=expand(f"{calib_dir('full')}/dense/layer_{{layer}}.stats.safetensors", layer=LAYERS),
        base_report=[f"{ROOT}/base_report.json"] if BUILTIN else [],
        distill_pruned=[f"{VARIANT}/eval/ppl.json".format(**v) for v in distilled_variants()],
        distill_eval=[f"{VARIANT}/{t}/eval/ppl.json".format(**v) for v in distilled_variants() for t in TUNES],
        distill_info=[f"{VARIANT}/{t}/distill.json".format(**v) for v in distilled_variants() for t in TUNES],
        distill_history=[f"{VARIANT}/{t}/history.csv".format(**v) for v in distilled_variants() for t in TUNES],
        summary=summary_inputs(),
        lm_tasks=[f"{LM_TASK_DATA}/manifest.json"] if any(t in LOCAL_TASKS for t in LM_TASKS) else [],
        schema=os.path.relpath(Path(workflow.basedir) / "workflow/schemas/summary.schema.yaml"),
        code=pkg("report", "diagnose", "summary", "distill"),
    output:
        json="metrics/ppl.json",
        csv="metrics/ppl.csv",
        table=report("metrics/results.md", caption="../report/results.rst", category="Results"),
        plot=report("metrics/ppl_vs_sparsity.png", caption="../report/ppl.rst", category="Results"),
        experts_csv="metrics/experts.csv",
        usage_plot=report("metrics/expert_usage.png", caption="../report/usage.rst", category="Experts"),
        # DVC's plots directory must exist (and be in git) even without distillation: a header-only placeholder
        distill_curves=[f"metrics/distill/{run_name(v, t)}.csv" for v in distilled_variants() for t in TUNES]
        or ["metrics/distill/no_runs.csv"],
        distill_plot=report("metrics/distill_loss.png", caption="../report/distill.rst", category="Distillation"),
        summary_json="metrics/summary.json",
        summary_csv=report("metrics/summary.csv", caption="../report/summary.rst", category="Results"),
        acc_plot=report("metrics/acc_vs_sparsity.png", caption="../report/acc.rst", category="Results"),
        sparsity_plot=report("metrics/expert_sparsity.png", caption="../report/sparsity.rst", category="Experts"),
    log:
        f"{LOGS}/report.log",
    params:
        variants=variants(),
        models=evaluated_models(),
        expert_bases=expert_bases(),
        skip_bases=config["skipping"]["bases"],
        distilled=distilled_variants(),
        tunes=TUNES,
        distill=config["distill"],
        task=TASK,
        model=config["model"]["name"],
        calib_id=CID,
        eval=config["eval"],
        entries=summary_entries(),
    script:
        "../scripts/report.py"


rule readme:
    """Splice metrics/results.md into README.md between the block's markers; the plot goes to docs/."""
    input:
        table="metrics/results.md",
        plot="metrics/ppl_vs_sparsity.png",
        usage_plot="metrics/expert_usage.png",
        distill_plot="metrics/distill_loss.png",
        acc_plot="metrics/acc_vs_sparsity.png",
        sparsity_plot="metrics/expert_sparsity.png",
    output:
        stamp=touch(f"{ROOT}/readme.{README_BLOCK}.stamp"),
        plot=f"docs/{README_BLOCK}.png",
        usage_plot=f"docs/{README_BLOCK}_expert_usage.png",
        distill_plot=f"docs/{README_BLOCK}_distill_loss.png",
        acc_plot=f"docs/{README_BLOCK}_acc.png",
        sparsity_plot=f"docs/{README_BLOCK}_expert_sparsity.png",
    log:
        f"{LOGS}/readme.log",
    params:
        readme="README.md",
        block=README_BLOCK,
        distilled=bool(distilled_variants()),
        experts=bool(expert_bases() or config["skipping"]["bases"]),
        lm_eval=bool(LM_TASKS),
    script:
        "../scripts/update_readme.py"
