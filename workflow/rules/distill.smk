# Expert-wise knowledge distillation of pruned variants from the unpruned model (MoE-Pruner §3.3), then
# their evaluation. Masks stay fixed; a killed run resumes from its last training state.
# {tune}: kd = the configured loss L_CE + λ·L_expert; ce = the control, L_CE only (λ = 0), same data and schedule.
TUNED = f"{VARIANT}/{{tune}}"


rule distill:
    """Train one pruned variant against the unpruned model: L_CE + λ·Σ expert MSE, masks fixed, resumable
    (training states under <variant>/<tune>.resume, removed when the run completes). tune=ce: the
    CE-only control (λ = 0) with the same data and schedule."""
    input:
        unpack(_layer_files),
        checkpoint=f"{VARIANT}/checkpoint",
        sparsity=f"{VARIANT}/sparsity.json",
        teacher=model_inputs(),
        corpus=corpus_inputs(),
        code=pkg("distill", "checkpoint", "sources", "data", "apply", "masks", "reduce", "atomic", "adapters/base",
                 "adapters/mixtral"),
    output:
        checkpoint=directory(f"{TUNED}/checkpoint"),
        history=f"{TUNED}/history.csv",
        info=f"{TUNED}/distill.json",
    log:
        f"{LOGS}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/{{tune}}.log",
    benchmark:
        f"{BENCH}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/{{tune}}.tsv"
    params:
        teacher_dir=MODEL_DIR,
        model=config["model"],
        distill=lambda w: DISTILL_TRAINING if w.tune == "kd" else {**DISTILL_TRAINING, "lambda": 0.0},
        seed=config["seed"],
        corpus_dir=CORPUS,
        resume_dir=lambda w: f"{TUNED}.resume".format(**w),
    threads: min(4, workflow.cores)
    resources:
        gpu=1,
    script:
        "../scripts/distill.py"


use rule evaluate_ppl as evaluate_distilled with:
    input:
        checkpoint=f"{TUNED}/checkpoint",
        corpus=corpus_inputs(),
        code=pkg("evaluate", "data", "sources", "usage", "skipping", "reduce", "checkpoint"),
    output:
        f"{TUNED}/eval/ppl.json",
    log:
        f"{LOGS}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/evaluate_{{tune}}.log",
    benchmark:
        f"{BENCH}/{{base}}/{CID}/{{prop}}/{{method}}/{{sp}}/evaluate_{{tune}}.tsv"
