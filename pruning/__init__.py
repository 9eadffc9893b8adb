"""moe-pruning's library: pure functions and small types the workflow's thin scripts call. It imports neither
Snakemake nor DVC. Read it in the order of the DAG:

    data/       the built-in corpus, text sources and token windows, the local lm-eval tasks
    models/     one adapter per MoE family, checkpoints (read, load, sizes), layers one at a time from the shards
                (layer_source), the embedded tiny model
    moe         the MoE primitives every stage computes with: routing, an expert's forward, the block output
    calib/      calibration passes over the decoder layers and the statistics they accumulate
    weights/    pruning expert weights: patterns, scores, masks, Hessians, SparseGPT, assembling the model
    experts/    pruning whole experts: NAEE's search, the baselines, removal, dynamic skipping
    distill/    expert-wise distillation of a pruned model from the unpruned one
    eval/       perplexity, lm-eval, expert usage, the block-error diagnostic
    report/     every table, plot and metrics file, from the pipeline's own outputs

Across stages: ``methods`` (every method's name and label), ``variant`` (a model's identity: path, label,
metric key), ``sweep`` (the models a params file asks for), ``params`` (validation), and the job plumbing
``jobs`` (logs, seeds, environment), ``gpu_pool`` (explicit devices per job) and ``atomic`` (atomic artifact writes).
"""
