"""Remove the dropped experts (expert weights and router rows), update the config, save a standard checkpoint.

The model is never loaded: the base checkpoint streams tensor by tensor into new shards in its key layout and
stored dtype (``experts.removal.reduce_checkpoint``); parameter and byte counts come from the headers."""
from pruning.warm_start import handoff

handoff()  # in a local run: continue in a process forked from the warm interpreter

import json

from pruning import jobs
from pruning.atomic import write_json
from pruning.experts.removal import reduce_checkpoint
from pruning.models import get_adapter
from pruning.models.checkpoint import file_bytes, read_config, tensor_bytes

log = jobs.start(snakemake.log[0])
p, out = snakemake.params, snakemake.output
searches = [json.load(open(f)) for f in snakemake.input.searches]
E = get_adapter(read_config(p.model_dir)).num_experts
kept = {s["layer"]: s["chosen"][p.method] for s in searches}
red = reduce_checkpoint(p.model_dir, out.checkpoint, kept, {"method": p.method, "calib_id": p.calib_id},
                        trust_remote_code=p.model["trust_remote_code"])
params_before, params_after, expected = red["parameters_before"], red["parameters_after"], red["parameters_saved_expected"]
if params_before - params_after != expected:
    raise AssertionError(f"removed {params_before - params_after} parameters, the dropped experts hold {expected}")
before_tensor, after_tensor = tensor_bytes(p.model_dir), tensor_bytes(out.checkpoint)
if after_tensor != red["tensor_bytes_after"]:
    raise AssertionError(f"saved {after_tensor} tensor bytes, the rewritten index holds {red['tensor_bytes_after']}")
whole = before_tensor == red["tensor_bytes_before"]  # the base's safetensors hold only its indexed tensors
report = {
    "method": p.method, "calib_id": p.calib_id, "num_experts_before": E, "num_experts_after": red["num_experts_after"],
    "parameters_before": params_before, "parameters_after": params_after, "parameters_saved": params_before - params_after,
    "parameters_saved_expected": expected, "dtype_bytes": red["dtype_bytes"],
    "tensor_bytes_before": before_tensor, "tensor_bytes_after": after_tensor,
    "file_bytes_before": file_bytes(p.model_dir), "file_bytes_after": file_bytes(out.checkpoint),
    "tensor_bytes_saving_exact": (before_tensor - after_tensor == red["tensor_bytes_saved_expected"]) if whole else None,
}
if whole and not report["tensor_bytes_saving_exact"]:
    raise AssertionError(f"tensor bytes saved {before_tensor - after_tensor} != {red['tensor_bytes_saved_expected']}")
layers = {}
for s in searches:
    m = p.method
    layers[str(s["layer"])] = {"kept": s["chosen"][m], "dropped": [e for e in range(E) if e not in s["chosen"][m]],
                               "loss": s["loss"][m], "relative_loss": s["relative_loss"][m], "search": s["search"]}
write_json(out.search, {"method": p.method, "calib_id": p.calib_id, "keep": report["num_experts_after"], "layers": layers,
                        "mean_relative_loss": sum(v["relative_loss"] for v in layers.values()) / len(layers)})
write_json(out.reduction, report)
log.info("%s: %d -> %d experts, parameters %d -> %d (saved %d, expected %d), tensor bytes %d -> %d",
         p.method, E, report["num_experts_after"], params_before, params_after, params_before - params_after, expected,
         before_tensor, after_tensor)
