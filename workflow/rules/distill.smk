# Expert-wise knowledge distillation of pruned variants from the unpruned model (MoE-Pruner §3.3); the tuned
# models are evaluated like every other (evaluate.smk, lm_eval.smk). Masks stay fixed; a killed run resumes
# from its last training state. {tune}: kd = L_CE + λ·L_expert; ce = the control, L_CE only (λ = 0).


rule distill:
    """Train one pruned variant against the unpruned model: L_CE + λ·Σ expert MSE, masks fixed, resumable
    (training states under <variant>/<tune>.resume, removed when the run completes). tune=ce: the
    CE-only control (λ = 0) with the same data and schedule."""
    input:
        unpack(layer_files),
        checkpoint=VARIANT.file("checkpoint"),
        sparsity=VARIANT.file("sparsity"),
        teacher=model_inputs(),
        corpus=corpus_inputs(),
        code=pkg(*MODEL_CODE, "distill/train", "distill/loss", "distill/state", "experts/removal", "weights/sparsity",
                 "weights/masks", "weights/pattern", "data/sources", "data/corpus"),
    output:
        checkpoint=directory(TUNED.file("checkpoint")),
        history=TUNED.file("history"),
        info=TUNED.file("distill"),
    log:
        log_file(TUNED.path, "distill"),
    benchmark:
        bench_file(TUNED.path, "distill")
    params:
        teacher_dir=MODEL_DIR,
        model=config["model"],
        distill=lambda w: DISTILL_TRAINING if w.tune == "kd" else {**DISTILL_TRAINING, "lambda": 0.0},
        seed=config["seed"],
        corpus_dir=CORPUS,
        resume_dir=lambda w: f"{TUNED.dir}.resume".format(**w),
    threads: min(4, workflow.cores)
    resources:
        gpu=1,
    script:
        "../scripts/distill.py"
