"""Remove the dropped experts (expert weights and router rows), update the config, save a standard checkpoint."""
import json

from transformers import AutoTokenizer

from pruning import jobs
from pruning.atomic import atomic_dir, write_json
from pruning.experts.removal import expert_saving, reduce_experts, stored_bytes
from pruning.models import get_adapter
from pruning.models.checkpoint import file_bytes, load_model, parameter_count, tensor_bytes

log = jobs.start(snakemake.log[0])
p, out = snakemake.params, snakemake.output
searches = [json.load(open(f)) for f in snakemake.input.searches]
model = load_model(p.model_dir, p.model["dtype"], "cpu", p.model["trust_remote_code"])
adapter = get_adapter(model.config)
E = adapter.num_experts
itemsize = adapter.expert_weights(adapter.decoder_layers(model)[adapter.moe_layer_indices()[0]]).gate_up.element_size()
kept = {s["layer"]: s["chosen"][p.method] for s in searches}
params_before, stored_before = parameter_count(model), stored_bytes(model)
expected, expected_bytes = expert_saving(adapter, model, {i: E - len(k) for i, k in kept.items()})
reduce_experts(adapter, model, kept, {"method": p.method, "calib_id": p.calib_id})
params_after, stored_after = parameter_count(model), stored_bytes(model)
if params_before - params_after != expected:
    raise AssertionError(f"removed {params_before - params_after} parameters, the dropped experts hold {expected}")
with atomic_dir(out.checkpoint) as d:
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(p.model_dir).save_pretrained(d)
    after_tensor, after_file = tensor_bytes(d), file_bytes(d)
if after_tensor != stored_after:
    raise AssertionError(f"saved {after_tensor} tensor bytes, the model's parameters and buffers hold {stored_after}")
before_tensor = tensor_bytes(p.model_dir)
same_dtype = before_tensor == stored_before  # the original is stored in the dtype we saved
report = {
    "method": p.method, "calib_id": p.calib_id, "num_experts_before": E, "num_experts_after": len(next(iter(kept.values()))),
    "parameters_before": params_before, "parameters_after": params_after, "parameters_saved": params_before - params_after,
    "parameters_saved_expected": expected, "dtype_bytes": itemsize,
    "tensor_bytes_before": before_tensor, "tensor_bytes_after": after_tensor,
    "file_bytes_before": file_bytes(p.model_dir), "file_bytes_after": after_file,
    "tensor_bytes_saving_exact": (before_tensor - after_tensor == expected_bytes) if same_dtype else None,
}
if same_dtype and not report["tensor_bytes_saving_exact"]:
    raise AssertionError(f"tensor bytes saved {before_tensor - after_tensor} != {expected_bytes}")
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
