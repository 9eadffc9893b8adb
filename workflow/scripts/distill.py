"""Expert-wise knowledge distillation of one pruned variant from the unpruned model, masks fixed; resumable.

The job trains over the devices it claims (``model.gpus``): one GPU, in this process; N GPUs, N processes
(PyTorch FSDP2 through torchrun, ``pruning.distill.distributed``), each reading only its shards of both models,
one decoder layer at a time. Without a GPU it runs on the CPU, in this process unless ``$PRUNING_DISTILL_WORLD_SIZE`` asks for more
(gloo)."""
from pruning.warm_start import handoff

handoff()  # in a local run: continue in a process forked from the warm interpreter

import csv
import functools
import io
import json
import shutil
import time

from transformers import AutoTokenizer

from pruning import jobs
from pruning.atomic import atomic_dir, write_json, write_text
from pruning.data.sources import calibration_tokens
from pruning.distill import HISTORY_FIELDS
from pruning.distill import train as distill
from pruning.distill.distributed import CheckpointLoader, distill_distributed, world_size_for
from pruning.distill.state import fingerprint
from pruning.gpu_pool import claim_devices, log_device
from pruning.models import get_adapter
from pruning.models.checkpoint import torch_dtype
from pruning.weights.masks import load_layer_masks
from pruning.weights.pattern import Pattern
from pruning.weights.sparsity import check_layer_nm, sparsity_report

p, inp, out, w = snakemake.params, snakemake.input, snakemake.output, snakemake.wildcards
log = jobs.start(snakemake.log[0], p.seed, snakemake.threads)
kd = p.distill
cfg = distill.KDConfig.from_params(kd, p.seed)
pattern = Pattern.parse(w.sp)
mask_files = [str(f) for f in inp.masks]
t0 = time.time()
with claim_devices(p.model.get("gpus", 1)) as devices:  # whole-model job: model.gpus devices, one process each
    log_device(log, devices)
    world = world_size_for(devices)
    tok = AutoTokenizer.from_pretrained(inp.checkpoint)
    data = calibration_tokens(tok, kd["source"], kd["samples"], kd["seqlen"], p.seed, p.corpus_dir)  # train split
    key = fingerprint(cfg, data, mask_files + list(inp.get("weights", [])) + [f"{inp.checkpoint}/config.json"])
    log.info("distilling %s on %d x %d tokens from %s, %s, %d process(es) (%d steps)", inp.checkpoint, *data.shape,
             kd["source"], ",".join(devices), world, distill.steps_per_epoch(data.shape[0], cfg) * cfg.epochs)
    # fp32 master weights for AdamW (bf16 runs as autocast on top); the teacher stays in the model's dtype.
    # Loaders, not models: with N processes each worker reads only its shards, layer by layer.
    trc = p.model["trust_remote_code"]
    student, record = distill_distributed(
        world, devices, CheckpointLoader(str(inp.checkpoint), "float32", trc),
        CheckpointLoader(str(p.teacher_dir), p.model["dtype"], trc),
        functools.partial(load_layer_masks, mask_files), data, cfg, state_dir=p.resume_dir, fingerprint=key, log=log)
    # saved in the model's dtype; a zero stays zero when rounded
    student = student.to("cpu", torch_dtype(p.model["dtype"]))
s_adapter = get_adapter(student.config)

# Masks exactly fixed: distill() asserted every pruned position is zero; N:M variants keep exact N:M.
if pattern.is_nm:
    for layer, m in load_layer_masks(mask_files).items():
        check_layer_nm(s_adapter, s_adapter.decoder_layers(student)[layer], m, pattern.n, pattern.m)
report = sparsity_report(s_adapter, student)
before = json.load(open(inp.sparsity))
if report["expert_sparsity"] < before["expert_sparsity"]:
    raise AssertionError(f"expert sparsity fell from {before['expert_sparsity']} to {report['expert_sparsity']}")

info = {
    "lambda": record["lambda"], "lambda_source": record["lambda_source"], "steps": record["total_steps"],
    "steps_per_epoch": record["steps_per_epoch"], "epochs": cfg.epochs, "samples": int(data.shape[0]),
    "seqlen": int(data.shape[1]), "tokens_per_epoch": int(data.numel()), "source": kd["source"], "split": "train",
    "config": record["config"], "expert_sparsity": report["expert_sparsity"], "expert_sparsity_before": before["expert_sparsity"],
    "pattern": pattern.kind, "final": record["history"][-1],
    "environment": jobs.environment(devices),
}  # no wall times or resume points: a resumed run writes the same bytes as an uninterrupted one (they go to the log)
with atomic_dir(out.checkpoint) as d:
    student.save_pretrained(d)
    tok.save_pretrained(d)
    pc = json.load(open(f"{inp.checkpoint}/pruning_config.json"))
    write_json(f"{d}/pruning_config.json", {**pc, "distillation": {k: info[k] for k in ("lambda", "steps", "samples", "seqlen", "config")}})
buf = io.StringIO()
writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore", lineterminator="\n")
writer.writeheader()
writer.writerows(record["history"])
write_text(out.history, buf.getvalue())
write_json(out.info, info)
shutil.rmtree(p.resume_dir, ignore_errors=True)  # finished: the resumable states are no longer needed
log.info("%.0f s in all (%.0f s training in this run, resumed from step %d)", time.time() - t0,
         record["seconds_this_run"], record["resumed_from_step"])
log.info("lambda %.4g; CE %.4f -> %.4f over %d steps; expert MSE %.4g -> %.4g", record["lambda"],
         record["history"][0]["ce_loss"], record["history"][-1]["ce_loss"], record["total_steps"],
         record["history"][0]["expert_loss"], record["history"][-1]["expert_loss"])
