"""Dynamic skipping: beta per layer from this model's calibration statistics, stored in config.betas."""
from pruning.warm_start import handoff

handoff()  # in a local run: continue in a process forked from the warm interpreter

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file

from pruning import jobs
from pruning.atomic import atomic_dir, write_json
from pruning.experts.skipping import BETAS_KEY, beta_from_stats

log = jobs.start(snakemake.log[0])
p, out = snakemake.params, snakemake.output
layers = {}
for i, f in zip(p.layers, snakemake.input.stats):
    st = load_file(f)
    levels, q = st["router.ratio_levels"].tolist(), st["router.ratio_quantiles"].tolist()
    layers[str(i)] = {"beta": beta_from_stats(st), "ratio_quantiles": dict(zip((f"{v:g}" for v in levels), q)),
                      "routed_selections": int(st["count"].sum())}
betas = {k: v["beta"] for k, v in sorted(layers.items(), key=lambda kv: int(kv[0]))}
src = Path(p.model_dir)
with atomic_dir(out.checkpoint) as d:
    for f in sorted(src.iterdir()):
        if f.name == "config.json":
            cfg = json.loads(f.read_text())
            cfg[BETAS_KEY] = betas
            (Path(d) / f.name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        elif f.is_file():  # a copy, not a hard link: Snakemake touches outputs, and a shared inode would
            shutil.copyfile(f, Path(d) / f.name)  # make the base checkpoint look newer than everything built on it
write_json(out.betas, {"rule": "beta_l = median over calibration tokens of w2/w1 (the two largest top-k weights); drop experts with w < beta_l w1",
                       "calib_id": p.calib_id, "betas": betas, "layers": layers})
log.info("betas %s", betas)
