"""lm-evaluation-harness on one model in memory (dense, pruned, expert-pruned, skipping or distilled)."""
from pruning.warm_start import handoff

handoff()  # in a local run: continue in a process forked from the warm interpreter

import os
import tempfile

from pruning.eval.lm_harness import LOCAL_TASKS

p = snakemake.params
if all(t in LOCAL_TASKS for t in p.lm_eval["tasks"]):  # nothing to download: never let `datasets` try the hub
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoTokenizer  # noqa: E402

from pruning import jobs  # noqa: E402
from pruning.atomic import write_json  # noqa: E402
from pruning.eval import lm_harness  # noqa: E402
from pruning.experts import skipping  # noqa: E402
from pruning.experts.skipping import skip_rates  # noqa: E402
from pruning.gpu_pool import claim_devices, log_device  # noqa: E402
from pruning.models.layer_source import load_placed  # noqa: E402

cfg, m, ckpt = p.lm_eval, p.model, p.checkpoint
log = jobs.start(snakemake.log[0], p.seed, snakemake.threads)
with claim_devices(m["gpus"]) as devices:  # whole-model job: model.gpus devices
    device = devices[0]
    log_device(log, devices)
    tok = AutoTokenizer.from_pretrained(ckpt)
    skipping.register()  # a checkpoint whose config.betas is set skips
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(snakemake.output[0]))) as offload_dir:
        model = load_placed(ckpt, m["dtype"], devices, m["offload"], offload_dir, m["trust_remote_code"])
        log.info("placement: %s", getattr(model, "hf_device_map", device))
        out = lm_harness.evaluate(
            model, tok, cfg["tasks"], task_dir=p.task_dir, num_fewshot=cfg["num_fewshot"], limit=cfg["limit"],
            batch_size=cfg["batch_size"], max_length=cfg["max_length"], bootstrap_iters=cfg["bootstrap_iters"], seed=cfg["seed"],
        )
        out["settings"] = cfg
        out["skipping"] = {str(k): v for k, v in skip_rates(model).items()}
        out["environment"] = jobs.environment(devices)
write_json(snakemake.output[0], out)
for t, r in out["tasks"].items():
    log.info("%s: %s", t, {k: round(v, 4) for k, v in r.items() if isinstance(v, float)})
