"""Dense propagation: one streaming pass writes every layer's MoE inputs and statistics."""
import torch

from pruning.adapters import get_adapter
from pruning.atomic import save_safetensors
from pruning.calibrate import ResidentSource, stream
from pruning.checkpoint import load_model
from pruning.sources import calibration_tokens
from pruning.env import environment, seed_everything
from pruning.gpu_pool import claim_device
from pruning.joblog import to_log, torch_dtype
from transformers import AutoTokenizer

log = to_log(snakemake.log[0])
c, m = snakemake.params.calib, snakemake.params.model
seed_everything(snakemake.params.seed, snakemake.threads)
with claim_device(".gpu_pool") as device:
    tok = AutoTokenizer.from_pretrained(snakemake.params.model_dir)
    tokens = calibration_tokens(tok, c["source"], c["nsamples"], c["seqlen"], snakemake.params.seed, snakemake.params.corpus_dir)
    meta = {"source": c["source"], "nsamples": c["nsamples"], "seqlen": c["seqlen"], "seed": snakemake.params.seed}
    save_safetensors(snakemake.output.tokens, {"input_ids": tokens}, meta)
    model = load_model(snakemake.params.model_dir, torch_dtype(m["dtype"]), device, m["trust_remote_code"])
    adapter = get_adapter(model.config)
    out = snakemake.params.out_dir
    env = environment(device)
    for i, inputs, st in stream(ResidentSource(model, adapter, device), adapter, tokens, c["batch_size"]):
        lmeta = {**meta, "layer": i, "propagation": "dense", "tokens": inputs.shape[0], "environment": env}
        save_safetensors(f"{out}/layer_{i}.inputs.safetensors", {"hidden_states": inputs}, lmeta)
        save_safetensors(f"{out}/layer_{i}.stats.safetensors", st, lmeta)
        counts = st["count"].tolist()
        log.info("layer %d: routed tokens per expert %s", i, counts)
        if min(counts) == 0:
            log.warning("layer %d: experts %s got no calibration tokens", i, [e for e, n in enumerate(counts) if n == 0])
