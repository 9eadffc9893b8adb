"""Dense propagation: one streaming pass writes every layer's MoE inputs and statistics."""
from pruning.warm_start import handoff

handoff()  # in a local run: continue in a process forked from the warm interpreter

from transformers import AutoTokenizer

from pruning import jobs
from pruning.atomic import save_safetensors
from pruning.calib.stream import stream
from pruning.data.sources import calibration_tokens
from pruning.gpu_pool import claim_device, log_device
from pruning.models.layer_source import open_source

p = snakemake.params
c, m = p.calib, p.model
log = jobs.start(snakemake.log[0], p.seed, snakemake.threads)
with claim_device() as device:
    log_device(log, device)
    tok = AutoTokenizer.from_pretrained(p.model_dir)
    tokens = calibration_tokens(tok, c["source"], c["nsamples"], c["seqlen"], p.seed, p.corpus_dir)
    meta = {"source": c["source"], "nsamples": c["nsamples"], "seqlen": c["seqlen"], "seed": p.seed}
    save_safetensors(snakemake.output.tokens, {"input_ids": tokens}, meta)
    source = open_source(p.model_dir, m["dtype"], device, m["offload"], m["trust_remote_code"])
    adapter = source.adapter
    log.info("layers from %s", type(source).__name__)
    env = jobs.environment(device)
    stats_out, inputs_out = dict(zip(p.layers, snakemake.output.stats)), dict(zip(p.layers, snakemake.output.inputs))
    for i, inputs, st in stream(source, adapter, tokens, c["batch_size"]):
        lmeta = {**meta, "layer": i, "propagation": "dense", "tokens": inputs.shape[0], "environment": env}
        save_safetensors(inputs_out[i], {"hidden_states": inputs}, lmeta)
        save_safetensors(stats_out[i], st, lmeta)
        counts = st["count"].tolist()
        log.info("layer %d: routed tokens per expert %s", i, counts)
        if min(counts) == 0:
            log.warning("layer %d: experts %s got no calibration tokens", i, [e for e, n in enumerate(counts) if n == 0])
