# The embedded default: corpus -> tokenizer + tiny MoE (only when model.name_or_path == builtin).


rule corpus:
    input:
        code=pkg("data/corpus", "atomic", "jobs"),
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
        code=pkg("models/tiny", "models/checkpoint", "data/sources", "data/corpus", "eval/perplexity", "atomic", "jobs"),
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
