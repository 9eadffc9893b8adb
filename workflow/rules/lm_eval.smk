# Zero-shot evaluation with lm-evaluation-harness: offline tasks built from the held-out split, then one job
# per evaluated model (dense, expert-pruned, skipping, weight-pruned, distilled) on the model in memory.


rule lm_eval_tasks:
    """The local lm-eval tasks' JSONL files, from the test split only (workflow/lm_eval_tasks/*.yaml read them)."""
    input:
        corpus=CORPUS_FILES,
        code=script_code("build_lm_tasks.py"),
    output:
        **{t: f"{LM_TASK_DATA}/{t}.jsonl" for t in LOCAL_TASKS},
        manifest=f"{LM_TASK_DATA}/manifest.json",
    log:
        "results/logs/lm_eval_tasks.log",
    benchmark:
        "results/benchmarks/lm_eval_tasks.tsv"
    params:
        local=config["lm_eval"]["local"],
        corpus_dir=CORPUS,
    script:
        "../scripts/build_lm_tasks.py"


rule evaluate_lm_eval:
    """lm-eval tasks (lm_eval.tasks) on one model, whatever made it."""
    input:
        checkpoint=checkpoint_inputs,
        tasks=lm_task_inputs(),
        code=script_code("evaluate_lm_eval.py"),
    output:
        f"{ANY}/eval/lm_eval.json",
    log:
        log_file("{mdl}", "lm_eval"),
    benchmark:
        bench_file("{mdl}", "lm_eval")
    params:
        checkpoint=lambda w: Variant.from_path(MODEL, w.mdl).checkpoint(MODEL_DIR),
        model=config["model"],
        lm_eval=LM_EVAL,
        seed=config["seed"],
        task_dir=LM_TASK_DIR,
    threads: 1
    resources:
        gpu=config["model"]["gpus"],  # a model larger than one GPU spreads over model.gpus
    script:
        "../scripts/evaluate_lm_eval.py"
