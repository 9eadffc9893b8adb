"""Token perplexity on a held-out split with fixed-length non-overlapping windows, plus the expert calls each
layer makes per token (and the skip rate of a skipping model)."""
import time

from transformers import AutoTokenizer

from pruning.adapters import get_adapter
from pruning.atomic import write_json
from pruning.checkpoint import load_model
from pruning.data import tokenize_docs, windows
from pruning.env import environment, seed_everything
from pruning.evaluate import perplexity
from pruning.gpu_pool import claim_device
from pruning.joblog import to_log, torch_dtype
from pruning.reduce import file_bytes, original_index
from pruning.skipping import skip_rates
from pruning.sources import docs
from pruning.usage import count_expert_calls

log = to_log(snakemake.log[0])
e, m = snakemake.params.eval, snakemake.params.model
ckpt = snakemake.params.get("checkpoint") or snakemake.input.checkpoint
seed_everything(0, snakemake.threads)
with claim_device(".gpu_pool") as device:
    tok = AutoTokenizer.from_pretrained(ckpt)
    win = windows(tokenize_docs(tok, docs(e["dataset"], "test", snakemake.params.corpus_dir)), e["seqlen"], e["max_windows"])
    model = load_model(ckpt, torch_dtype(m["dtype"]), device, m["trust_remote_code"])  # skips when config.betas is set
    adapter = get_adapter(model.config)
    t0 = time.time()
    with count_expert_calls(adapter, model) as usage:
        ppl = perplexity(model, win, e["batch_size"], device, progress=True)
    seconds = time.time() - t0
    result = {
        "token_ppl": ppl,
        "metric": "token perplexity, non-overlapping windows",
        "dataset": e["dataset"],
        "split": "test",
        "seqlen": e["seqlen"],
        "windows": int(win.shape[0]),
        "tokens_predicted": int(win.shape[0] * (win.shape[1] - 1)),
        "seconds": seconds,
        "num_experts": adapter.num_experts,
        "top_k": adapter.top_k,
        "parameters": sum(p.numel() for p in model.parameters()),
        "checkpoint_bytes": file_bytes(ckpt),
        "expert_usage": usage.summary(lambda i, n: original_index(model.config, i, n)),
        "skipping": {str(k): v for k, v in skip_rates(model).items()},
        "environment": environment(device),
    }
write_json(snakemake.output[0], result)
log.info("token perplexity %.3f over %d windows; expert calls per token %.3f", ppl, win.shape[0],
         result["expert_usage"]["calls_per_token"])
