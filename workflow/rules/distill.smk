# Expert-wise knowledge distillation of pruned variants from the unpruned model (MoE-Pruner §3.3); the tuned
# models are evaluated like every other (evaluate.smk, lm_eval.smk). Masks stay fixed; a killed run resumes
# from its last training state. {tune}: kd = L_CE + λ·L_expert; ce = the control, L_CE only (λ = 0).


rule distill:
    """Train one pruned variant against the unpruned model: L_CE + λ·Σ expert MSE, masks fixed, resumable
    (training states under <variant>/<tune>.resume, removed when the run completes). tune=ce: the
    CE-only control (λ = 0) with the same data and schedule. With model.gpus = N > 1 the job trains over its
    N claimed GPUs (N processes, PyTorch FSDP2 through torchrun: pruning.distill.distributed); on the CPU over
    $PRUNING_DISTILL_WORLD_SIZE processes (gloo; default 1, in the job's own process)."""
    input:
        unpack(layer_files),
        checkpoint=VARIANT.file("checkpoint"),
        sparsity=VARIANT.file("sparsity"),
        teacher=model_inputs(),
        corpus=corpus_inputs(),
        code=script_code("distill.py"),
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
        gpu=config["model"].get("gpus", 1),  # one training process per claimed GPU (FSDP2 when more than one)
    script:
        "../scripts/distill.py"
