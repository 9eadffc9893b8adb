"""Token perplexity on the held-out split with fixed-length non-overlapping windows."""
import time

from transformers import AutoTokenizer

from pruning.checkpoint import load_model
from pruning.data import source_docs, tokenize_docs, windows
from pruning.env import environment, seed_everything
from pruning.evaluate import perplexity
from pruning.gpu_pool import claim_device
from pruning.joblog import to_log, torch_dtype
from pruning.atomic import write_json

log = to_log(snakemake.log[0])
e, m = snakemake.params.eval, snakemake.params.model
ckpt = snakemake.input.get("checkpoint", snakemake.params.get("checkpoint"))
seed_everything(0, snakemake.threads)
with claim_device(".gpu_pool") as device:
    tok = AutoTokenizer.from_pretrained(ckpt)
    win = windows(tokenize_docs(tok, source_docs(e["dataset"], "test", snakemake.params.corpus_dir)), e["seqlen"], e["max_windows"])
    model = load_model(ckpt, torch_dtype(m["dtype"]), device, m["trust_remote_code"])
    t0 = time.time()
    ppl = perplexity(model, win, e["batch_size"], device, progress=True)
    result = {
        "token_ppl": ppl,
        "metric": "token perplexity, non-overlapping windows",
        "dataset": e["dataset"],
        "split": "test",
        "seqlen": e["seqlen"],
        "windows": int(win.shape[0]),
        "tokens_predicted": int(win.shape[0] * (win.shape[1] - 1)),
        "seconds": time.time() - t0,
        "environment": environment(device),
    }
write_json(snakemake.output[0], result)
log.info("token perplexity %.3f over %d windows", ppl, win.shape[0])
