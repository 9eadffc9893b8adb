# Expert pruning (NAEE search and the frequency / REAP / EAN / random baselines), the reduced checkpoints,
# and dynamic-skipping calibration.


rule expert_search:
    """One job per layer and kept count: the reconstruction loss of every dropped set (NAEE, layerwise: the
    unpruned model's inputs at every layer) and the baselines' scores, on one calibration set."""
    input:
        inputs=f"{ROOT}/full/calib/{{cid}}/dense/layer_{{layer}}.inputs.safetensors",
        model=model_inputs(),
        code=pkg("experts", "checkpoint", "adapters/base", "adapters/mixtral"),
    output:
        f"{SEARCH}/layer_{{layer}}.json",
    log:
        f"{LOGS}/search/{{cid}}/k{{keep}}/layer_{{layer}}.log",
    benchmark:
        f"{BENCH}/search/{{cid}}/k{{keep}}/layer_{{layer}}.tsv"
    params:
        model_dir=MODEL_DIR,
        seqlen=lambda w: CALIB_SETS[w.cid]["seqlen"],
        batch_size=lambda w: CALIB_SETS[w.cid]["batch_size"],
        seed=config["seed"],
        search={k: config["experts"][k] for k in ("max_subsets", "beam_width")},  # not the method/keep lists
    threads: 1
    resources:
        gpu=1,
    script:
        "../scripts/expert_search.py"


def _progressive_previous(wildcards):
    i = int(wildcards.layer)
    out = {"dense_inputs": f"{ROOT}/full/calib/{wildcards.cid}/dense/layer_{i}.inputs.safetensors"}
    if i == 0:
        out["tokens"] = f"{ROOT}/full/calib/{wildcards.cid}/tokens.safetensors"
    else:
        prev = SEARCH.format(cid=wildcards.cid, keep=wildcards.keep)
        out["hidden"] = f"{prev}/progressive/layer_{i - 1}.hidden_out.safetensors"
        out["previous"] = f"{prev}/progressive/layer_{i - 1}.json"
    return out


rule expert_search_progressive:
    """NAEE progressive mode, one job per layer in order: layer i's inputs pass through the already
    expert-pruned layers < i, the targets stay the unpruned model's outputs. Writes the hidden states
    leaving the pruned layer i for the next job."""
    input:
        unpack(_progressive_previous),
        model=model_inputs(),
        code=pkg("experts", "calibrate", "checkpoint", "adapters/base", "adapters/mixtral"),
    output:
        search=f"{SEARCH}/progressive/layer_{{layer}}.json",
        hidden=f"{SEARCH}/progressive/layer_{{layer}}.hidden_out.safetensors",
    log:
        f"{LOGS}/search/{{cid}}/k{{keep}}/progressive_{{layer}}.log",
    benchmark:
        f"{BENCH}/search/{{cid}}/k{{keep}}/progressive_{{layer}}.tsv"
    params:
        model_dir=MODEL_DIR,
        model=config["model"],
        seqlen=lambda w: CALIB_SETS[w.cid]["seqlen"],
        batch_size=lambda w: CALIB_SETS[w.cid]["batch_size"],
        search={k: config["experts"][k] for k in ("max_subsets", "beam_width")},  # not the method/keep lists
    threads: workflow.cores
    resources:
        gpu=1,
    script:
        "../scripts/expert_search_progressive.py"


def _searches(wildcards):
    method, keep, _ = parse_base(wildcards.base)
    prefix = SEARCH.format(cid=base_cid(wildcards.base), keep=keep)
    if method == "naee_progressive":
        return [f"{prefix}/progressive/layer_{i}.json" for i in LAYERS]
    return [f"{prefix}/layer_{i}.json" for i in LAYERS]


rule apply_experts:
    """The expert-pruned model as a standard HF checkpoint with fewer experts, plus its size against the original."""
    input:
        searches=_searches,
        model=model_inputs(),
        code=pkg("reduce", "checkpoint", "adapters/base", "adapters/mixtral"),
    output:
        checkpoint=_checkpoint(directory(f"{ROOT}/{{base}}/checkpoint")),
        reduction=f"{ROOT}/{{base}}/reduction.json",
        search=f"{ROOT}/{{base}}/search.json",
    log:
        f"{LOGS}/{{base}}/apply_experts.log",
    benchmark:
        f"{BENCH}/{{base}}/apply_experts.tsv"
    params:
        model_dir=MODEL_DIR,
        model=config["model"],
        method=lambda w: parse_base(w.base)[0],
        calib_id=lambda w: base_cid(w.base),
    wildcard_constraints:
        base=r"(?:" + "|".join(EXPERT_METHODS) + r")-k\d+(?:-task)?",
    script:
        "../scripts/apply_experts.py"


rule skip_calibrate:
    """Dynamic skipping: beta per layer = median over calibration tokens of the second / first top-2 weight
    of this model; the checkpoint with config.betas is written beside it."""
    input:
        stats=expand(f"{ROOT}/{{base}}/calib/{CID}/dense/layer_{{layer}}.stats.safetensors", layer=LAYERS, allow_missing=True),
        model=base_inputs,
        code=pkg("skipping", "atomic"),
    output:
        checkpoint=_checkpoint(directory(f"{ROOT}/{{base}}/skip/checkpoint")),
        betas=f"{ROOT}/{{base}}/skip/betas.json",
    log:
        f"{LOGS}/{{base}}/skip_calibrate.log",
    benchmark:
        f"{BENCH}/{{base}}/skip_calibrate.tsv"
    params:
        model_dir=lambda w: base_dir(w.base),
        calib_id=CID,
    script:
        "../scripts/skip_calibrate.py"
