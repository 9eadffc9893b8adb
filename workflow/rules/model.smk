# The embedded default: corpus -> tokenizer + tiny MoE (only when model.name_or_path == builtin).


rule corpus:
    input:
        code=script_code("build_corpus.py"),
    output:
        CORPUS_FILES,
    log:
        "results/logs/corpus.log",
    benchmark:
        "results/benchmarks/corpus.tsv"
    params:
        corpus=config["corpus"],
    script:
        "../scripts/build_corpus.py"


rule train_tiny:
    input:
        corpus=CORPUS_FILES,
        code=script_code("train_tiny.py"),
    output:
        model=directory(MODEL_DIR),
        report=f"{ROOT}/base_report.json",
    log:
        log_file("train_tiny"),
    benchmark:
        bench_file("train_tiny")
    params:
        tiny=config["tiny"],
        seed=config["seed"],
    threads: workflow.cores
    script:
        "../scripts/train_tiny.py"
