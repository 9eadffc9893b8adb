# The embedded default: corpus -> tokenizer + tiny Mixtral (only when model.name_or_path == builtin).


rule corpus:
    output:
        CORPUS_FILES,
    log:
        "results/logs/corpus.log",
    benchmark:
        "results/benchmarks/corpus.tsv"
    params:
        corpus=config["corpus"],
    input:
        code=pkg("corpus", "atomic"),
    script:
        "../scripts/build_corpus.py"


rule train_tiny:
    input:
        corpus=CORPUS_FILES,
        code=pkg("tiny", "data", "evaluate"),
    output:
        model=directory(f"{ROOT}/base"),
        report=f"{ROOT}/base_report.json",
    log:
        f"{LOGS}/train_tiny.log",
    benchmark:
        f"{BENCH}/train_tiny.tsv"
    params:
        tiny=config["tiny"],
        seed=config["seed"],
    threads: workflow.cores
    script:
        "../scripts/train_tiny.py"
