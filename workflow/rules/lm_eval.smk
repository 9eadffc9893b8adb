# Zero-shot evaluation with lm-evaluation-harness: offline tasks built from the held-out split, then one job
# per evaluated model (dense, expert-pruned, skipping, weight-pruned, distilled) on the model in memory.


rule lm_eval_tasks:
    """The local lm-eval tasks' JSONL files, from the test split only (workflow/lm_eval_tasks/*.yaml read them)."""
    input:
        corpus=CORPUS_FILES,
        code=pkg("lm_tasks", "sources", "data", "corpus", "atomic"),
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


LM_EVAL_INPUTS = dict(tasks=lm_task_inputs(), code=pkg("harness", "checkpoint", "skipping", "reduce"))


rule evaluate_lm_eval:
    """lm-eval tasks (lm_eval.tasks) on a whole model: full, an expert-pruned base, or a skipping model."""
    input:
        checkpoint=lambda w: model_inputs() if w.mdl == "full" else [model_dir_of(w.mdl)],
        **LM_EVAL_INPUTS,
    output:
        f"{ROOT}/{{mdl}}/eval/lm_eval.json",
    log:
        f"{LOGS}/eval/{{mdl}}/lm_eval.log",
    benchmark:
        f"{BENCH}/eval/{{mdl}}/lm_eval.tsv"
    params:
        # the checkpoint directory of a whole model (its input may be config.json); variants read input.checkpoint
        checkpoint=lambda w: model_dir_of(w.mdl) if "mdl" in w.keys() else None,
        model=config["model"],
        lm_eval=LM_EVAL,
        task_dir=LM_TASK_DIR,
    threads: 1
    resources:
        gpu=1,
    script:
        "../scripts/evaluate_lm_eval.py"


use rule evaluate_lm_eval as evaluate_lm_eval_variant with:
    input:
        checkpoint=f"{VARIANT}/checkpoint",
        **LM_EVAL_INPUTS,
    output:
        f"{VARIANT}/eval/lm_eval.json",
    log:
        f"{LOGS}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/lm_eval.log",
    benchmark:
        f"{BENCH}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/lm_eval.tsv"


use rule evaluate_lm_eval as evaluate_lm_eval_distilled with:
    input:
        checkpoint=f"{TUNED}/checkpoint",
        **LM_EVAL_INPUTS,
    output:
        f"{TUNED}/eval/lm_eval.json",
    log:
        f"{LOGS}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/lm_eval_{{tune}}.log",
    benchmark:
        f"{BENCH}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/lm_eval_{{tune}}.tsv"
