# The report: every table, plot and DVC metric from the pipeline's own outputs (pruning.report), then the
# README's results block.


rule report:
    """metrics/summary.json + ppl.json (DVC metrics), the CSVs and PNGs (DVC plots), metrics/results.md."""
    input:
        report_inputs(),
        schema=os.path.relpath(Path(workflow.basedir) / "workflow/schemas/summary.schema.yaml"),
        code=script_code("report.py"),
    output:
        ppl_json="metrics/ppl.json",
        ppl_csv="metrics/ppl.csv",
        table=report("metrics/results.md", caption="../report/results.rst", category="Results"),
        ppl_plot=report("metrics/ppl_vs_sparsity.png", caption="../report/ppl.rst", category="Results"),
        experts_csv="metrics/experts.csv",
        usage_plot=report("metrics/expert_usage.png", caption="../report/usage.rst", category="Experts"),
        # DVC's plots directory must exist (and be in git) even without distillation: a header-only placeholder
        distill_curves=[f"metrics/distill/{v.key}.csv" for v in SWEEP.tuned()] or ["metrics/distill/no_runs.csv"],
        distill_plot=report("metrics/distill_loss.png", caption="../report/distill.rst", category="Distillation"),
        summary_json="metrics/summary.json",
        summary_csv=report("metrics/summary.csv", caption="../report/summary.rst", category="Results"),
        acc_plot=report("metrics/acc_vs_sparsity.png", caption="../report/acc.rst", category="Results"),
        sparsity_plot=report("metrics/expert_sparsity.png", caption="../report/sparsity.rst", category="Experts"),
    log:
        log_file("report"),
    params:
        # what the tables depend on: the sweep and the settings their headers describe
        config={k: config[k] for k in ("model", "seed", "calib", "prune", "experts", "skipping", "distill", "eval")},
        lm_eval=bool(LM_TASKS),
        calib_stats=[calib_file("full", CID, "stats", i) for i in LAYERS],
        base_report=f"{ROOT}/base_report.json" if BUILTIN else None,
        lm_tasks=f"{LM_TASK_DATA}/manifest.json" if LOCAL_LM_TASKS else None,
    script:
        "../scripts/report.py"


rule readme:
    """Splice metrics/results.md into README.md between the block's markers; the plots go to docs/."""
    input:
        table="metrics/results.md",
        plot="metrics/ppl_vs_sparsity.png",
        usage_plot="metrics/expert_usage.png",
        distill_plot="metrics/distill_loss.png",
        acc_plot="metrics/acc_vs_sparsity.png",
        sparsity_plot="metrics/expert_sparsity.png",
        code=script_code("update_readme.py"),
    output:
        stamp=touch(f"{ROOT}/readme.{README_BLOCK}.stamp"),
        plot=f"docs/{README_BLOCK}.png",
        usage_plot=f"docs/{README_BLOCK}_expert_usage.png",
        distill_plot=f"docs/{README_BLOCK}_distill_loss.png",
        acc_plot=f"docs/{README_BLOCK}_acc.png",
        sparsity_plot=f"docs/{README_BLOCK}_expert_sparsity.png",
    log:
        log_file("readme"),
    params:
        readme="README.md",
        block=README_BLOCK,
        distilled=bool(SWEEP.tuned()),
        experts=bool(SWEEP.expert_bases() or SWEEP.skip_bases()),
        lm_eval=bool(LM_TASKS),
    script:
        "../scripts/update_readme.py"
