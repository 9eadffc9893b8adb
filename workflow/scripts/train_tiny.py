"""The embedded default model: a BPE tokenizer and a tiny MoE trained on the corpus's train split."""
from pruning.warm_start import handoff

handoff()  # in a local run: continue in a process forked from the warm interpreter

import time

from pruning import jobs
from pruning.atomic import atomic_dir, write_json
from pruning.data import corpus
from pruning.data.sources import tokenize_docs, windows
from pruning.eval.perplexity import perplexity, unigram_perplexity
from pruning.models import tiny
from pruning.models.checkpoint import parameter_count

log = jobs.start(snakemake.log[0], snakemake.params.seed, snakemake.threads)
p = snakemake.params.tiny
corpus_dir = snakemake.input.corpus[0].rsplit("/", 1)[0]

t0 = time.time()
train_docs = corpus.read_docs(f"{corpus_dir}/train.jsonl")
tok = tiny.train_tokenizer(train_docs, p["vocab_size"])
stream = tokenize_docs(tok, train_docs)
log.info("tokenizer: vocab %d, train stream %d tokens (%.1fs)", len(tok), stream.numel(), time.time() - t0)

config = tiny.build_config(len(tok), p["arch"], p["train"]["seqlen"], tok.eos_token_id)
model, history = tiny.train(config, stream, {**p["train"], "seed": snakemake.params.seed})
log.info("trained %d steps in %.1f s", p["train"]["steps"], time.time() - t0)  # wall time: log and benchmark file only

val = windows(tokenize_docs(tok, corpus.read_docs(f"{corpus_dir}/validation.jsonl")), p["train"]["seqlen"], p["val_windows"])
val_ppl = perplexity(model, val, batch_size=8)
uni_ppl = unigram_perplexity(stream, val, len(tok))
log.info("validation token perplexity %.2f vs unigram %.2f", val_ppl, uni_ppl)

with atomic_dir(snakemake.output.model) as d:
    model.save_pretrained(d)
    tok.save_pretrained(d)
write_json(
    snakemake.output.report,
    {
        "validation_ppl": val_ppl,
        "unigram_ppl": uni_ppl,
        "validation_windows": int(val.shape[0]),
        "seqlen": p["train"]["seqlen"],
        "parameters": parameter_count(model),
        "train_tokens": p["train"]["steps"] * p["train"]["batch_size"] * p["train"]["seqlen"],
        "train_steps": p["train"]["steps"],
        "history": history,
        "environment": jobs.environment("cpu"),
    },
)
