# Expert pruning (NAEE search and the frequency / REAP / EAN / random baselines), the reduced checkpoints,
# and dynamic-skipping calibration.
DENSE_INPUTS = calib_file("full", "{cid}", "inputs")
SEARCH_PARAMS = {k: config["experts"][k] for k in ("max_subsets", "beam_width")}  # not the method/keep lists


rule expert_search:
    """One job per layer and kept count: the reconstruction loss of every dropped set (NAEE, layerwise: the
    unpruned model's inputs at every layer) and the baselines' scores, on one calibration set."""
    input:
        inputs=DENSE_INPUTS,
        model=model_inputs(),
        code=script_code("expert_search.py"),
    output:
        f"{SEARCH}/layer_{{layer}}.json",
    log:
        log_file("search/{cid}/k{keep}", "layer_{layer}"),
    benchmark:
        bench_file("search/{cid}/k{keep}", "layer_{layer}")
    params:
        model_dir=MODEL_DIR,
        calib=lambda w: SWEEP.calib_sets[w.cid],
        seed=config["seed"],
        search=SEARCH_PARAMS,
    threads: 1
    resources:
        gpu=1,
    script:
        "../scripts/expert_search.py"


def progressive_previous(wildcards):
    i, j = int(wildcards.layer), previous_moe_layer(wildcards.layer)
    out = {"dense_inputs": DENSE_INPUTS.format(cid=wildcards.cid, layer=i)}
    if j is None:
        out["tokens"] = tokens_file("full", wildcards.cid)
    else:
        prev = SEARCH.format(cid=wildcards.cid, keep=wildcards.keep)
        out["hidden"] = f"{prev}/progressive/layer_{j}.hidden_out.safetensors"
        out["previous"] = f"{prev}/progressive/layer_{j}.json"
    return out


rule expert_search_progressive:
    """NAEE progressive mode, one job per layer in order: layer i's inputs pass through the already
    expert-pruned layers < i, the targets stay the unpruned model's outputs. Writes the hidden states
    leaving the pruned layer i for the next job."""
    input:
        unpack(progressive_previous),
        model=model_inputs(),
        code=script_code("expert_search_progressive.py"),
    output:
        search=f"{SEARCH}/progressive/layer_{{layer}}.json",
        hidden=f"{SEARCH}/progressive/layer_{{layer}}.hidden_out.safetensors",
    log:
        log_file("search/{cid}/k{keep}", "progressive_{layer}"),
    benchmark:
        bench_file("search/{cid}/k{keep}", "progressive_{layer}")
    params:
        model_dir=MODEL_DIR,
        model=config["model"],
        calib=lambda w: SWEEP.calib_sets[w.cid],
        seed=config["seed"],
        search=SEARCH_PARAMS,
        previous=lambda w: previous_moe_layer(w.layer),
    threads: workflow.cores
    resources:
        gpu=1,
    script:
        "../scripts/expert_search_progressive.py"


def searches(wildcards):
    method, keep, _ = parse_base(wildcards.base)
    prefix = SEARCH.format(cid=SWEEP.base_cid(wildcards.base), keep=keep)
    if method == "naee_progressive":
        return [f"{prefix}/progressive/layer_{i}.json" for i in LAYERS]
    return [f"{prefix}/layer_{i}.json" for i in LAYERS]


rule apply_experts:
    """The expert-pruned model as a standard HF checkpoint with fewer experts, plus its size against the original."""
    input:
        searches=searches,
        model=model_inputs(),
        code=script_code("apply_experts.py"),
    output:
        checkpoint=checkpoint_output(directory(WHOLE.file("checkpoint"))),
        reduction=WHOLE.file("reduction"),
        search=WHOLE.file("search"),
    log:
        log_file("{base}", "apply_experts"),
    benchmark:
        bench_file("{base}", "apply_experts")
    params:
        model_dir=MODEL_DIR,
        model=config["model"],
        method=lambda w: parse_base(w.base)[0],
        calib_id=lambda w: SWEEP.base_cid(w.base),
    wildcard_constraints:
        base=r"(?:" + "|".join(EXPERT_METHODS) + r")-k\d+(?:-task)?",
    script:
        "../scripts/apply_experts.py"


rule skip_calibrate:
    """Dynamic skipping: beta per layer = median over calibration tokens of the second / first top-2 weight
    of this model; the checkpoint with config.betas is written beside it."""
    input:
        stats=expand(calib_file("{base}", CID, "stats"), layer=LAYERS, allow_missing=True),
        model=base_inputs,
        code=script_code("skip_calibrate.py"),
    output:
        checkpoint=checkpoint_output(directory(SKIPPING.file("checkpoint"))),
        betas=SKIPPING.file("betas"),
    log:
        log_file("{base}/skip", "skip_calibrate"),
    benchmark:
        bench_file("{base}/skip", "skip_calibrate")
    params:
        model_dir=lambda w: base_dir(w.base),
        calib_id=CID,
        layers=LAYERS,  # the order of the stats inputs
    script:
        "../scripts/skip_calibrate.py"
