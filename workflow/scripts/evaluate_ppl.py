"""Token perplexity on a held-out split with fixed-length non-overlapping windows, plus the expert calls each
layer makes per token (and the skip rate of a skipping model)."""
from pruning.warm_start import handoff

handoff()  # in a local run: continue in a process forked from the warm interpreter

import time

from transformers import AutoTokenizer

from pruning import jobs
from pruning.atomic import write_json
from pruning.data.sources import eval_windows
from pruning.eval.perplexity import perplexity
from pruning.eval.usage import count_expert_calls
from pruning.experts.removal import original_index
from pruning.experts import skipping
from pruning.experts.skipping import skip_rates
from pruning.gpu_pool import claim_devices, log_device
from pruning.models.checkpoint import file_bytes, parameter_count
from pruning.models.layer_source import open_source

p = snakemake.params
e, m, ckpt = p.eval, p.model, p.checkpoint
log = jobs.start(snakemake.log[0], p.seed, snakemake.threads)
with claim_devices(m["gpus"]) as devices:  # whole-model job: model.gpus devices
    device = devices[0]
    log_device(log, devices)
    tok = AutoTokenizer.from_pretrained(ckpt)
    win = eval_windows(tok, e["dataset"], "test", e["seqlen"], e["max_windows"], p.corpus_dir)
    skipping.register()  # a checkpoint whose config.betas is set skips, resident or streamed
    source = open_source(ckpt, m["dtype"], device, m["offload"], m["trust_remote_code"])
    model, adapter = source.model, source.adapter
    log.info("layers from %s", type(source).__name__)
    t0 = time.time()
    with count_expert_calls(adapter, model) as usage:
        ppl = perplexity(source, win, e["batch_size"], device, progress=True)
    log.info("perplexity %.4f in %.1f s", ppl, time.time() - t0)  # wall time: log and benchmark file only
    result = {
        "token_ppl": ppl,
        "metric": "token perplexity, non-overlapping windows",
        "dataset": e["dataset"],
        "split": "test",
        "seqlen": e["seqlen"],
        "windows": int(win.shape[0]),
        "tokens_predicted": int(win.shape[0] * (win.shape[1] - 1)),
        "num_experts": adapter.num_experts,
        "top_k": adapter.top_k,
        "parameters": parameter_count(model),
        "checkpoint_bytes": file_bytes(ckpt),
        "expert_usage": usage.summary(lambda i, n: original_index(model.config, i, n)),
        "skipping": {str(k): v for k, v in skip_rates(model).items()},
        "environment": jobs.environment(devices),
    }
write_json(snakemake.output[0], result)
log.info("token perplexity %.3f over %d windows; expert calls per token %.3f", ppl, win.shape[0],
         result["expert_usage"]["calls_per_token"])
