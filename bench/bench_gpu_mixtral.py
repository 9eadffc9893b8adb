"""A Mixtral-8x7B-shaped random-weight model streamed layer by layer and pruned with MoE-Pruner (and SparseGPT) on
one GPU: end-to-end time and peak GPU memory. Ready for a GPU machine; ``--tiny`` checks the script on a CPU.

The checkpoint (32 layers, 8 experts of 14336, hidden 4096, bf16, the hub's per-expert layout: about 93 GB) is
written tensor by tensor, never whole. Timed from the checkpoint on disk to every layer's masks on disk:

1. calibration: ``ShardSource`` builds one decoder layer at a time from the shards on the GPU and runs the
   calibration tokens (128 x 2048 by default) through it, observing the experts (``pruning.calib.stream``);
2. masks: each layer's MoE-Pruner masks from its statistics and its experts read from the shards
   (``pruning.weights.prune.layer_masks``), saved as the pipeline's mask files;
3. with ``--sparsegpt``: router-weighted SparseGPT per layer from the same MoE inputs.

These are the library calls the pipeline's calibrate and mask jobs make, in one process (the DAG adds one process
start per job). When the disk cannot hold the whole model, ``--layers`` is lowered to what fits and the time per
layer is reported next to the 32-layer extrapolation, marked as such.

    python bench/bench_gpu_mixtral.py --device cuda:0 [--sparsegpt] [--dir /scratch/mixtral-random]
    python bench/bench_gpu_mixtral.py --tiny          # CPU, toy widths
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from timing import ROOT

FULL = dict(hidden=4096, inter=14336, experts=8, layers=32, heads=32, kv_heads=8, vocab=32000)
TINY = dict(hidden=64, inter=128, experts=8, layers=4, heads=4, kv_heads=2, vocab=320)


def write_checkpoint(out: Path, s: dict, dtype: torch.dtype, device: str) -> int:
    """A random Mixtral checkpoint in the hub's per-expert layout, one shard per decoder layer; returns its bytes."""
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    if (out / "model.safetensors.index.json").is_file():
        return json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = MixtralConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                        num_local_experts=s["experts"], num_experts_per_tok=2, max_position_embeddings=4096,
                        tie_word_embeddings=False)
    cfg.dtype = dtype
    cfg.save_pretrained(tmp)
    g = torch.Generator(device=device).manual_seed(0)
    h, i_, kv = s["hidden"], s["inter"], s["hidden"] // s["heads"] * s["kv_heads"]

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype).cpu()

    wmap, total = {}, 0

    def shard(name, tensors):
        nonlocal total
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            wmap[k] = name
            total += t.numel() * t.element_size()

    shard("model-embed.safetensors", {"model.embed_tokens.weight": rand(s["vocab"], h),
                                      "model.norm.weight": torch.ones(h, dtype=dtype), "lm_head.weight": rand(s["vocab"], h)})
    for layer in range(s["layers"]):
        p = f"model.layers.{layer}"
        t = {f"{p}.self_attn.q_proj.weight": rand(h, h), f"{p}.self_attn.k_proj.weight": rand(kv, h),
             f"{p}.self_attn.v_proj.weight": rand(kv, h), f"{p}.self_attn.o_proj.weight": rand(h, h),
             f"{p}.input_layernorm.weight": torch.ones(h, dtype=dtype),
             f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
             f"{p}.block_sparse_moe.gate.weight": rand(s["experts"], h, std=0.2)}
        for e in range(s["experts"]):
            q = f"{p}.block_sparse_moe.experts.{e}"
            t.update({f"{q}.w1.weight": rand(i_, h), f"{q}.w3.weight": rand(i_, h), f"{q}.w2.weight": rand(h, i_)})
        shard(f"model-layer{layer:03d}.safetensors", t)
        print(f"wrote layer {layer + 1}/{s['layers']}", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}))
    tmp.rename(out)
    return total


def layer_bytes(s: dict, itemsize: int) -> int:
    h, kv = s["hidden"], s["hidden"] // s["heads"] * s["kv_heads"]
    return itemsize * (2 * h * h + 2 * kv * h + 2 * h + s["experts"] * (h + 3 * h * s["inter"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mixtral-8x7b-random"))
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 32, fewer if the disk is short)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sparsegpt", action="store_true", help="also time router-weighted SparseGPT (2:4)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/gpu_mixtral.json")
    a = ap.parse_args()
    s = dict(TINY if a.tiny else FULL)
    dtype = torch.float32 if a.tiny else torch.bfloat16
    if a.tiny:
        a.nsamples, a.seqlen = 8, 64
        a.dir = a.dir.with_name(a.dir.name + "-tiny")
    itemsize = torch.empty(0, dtype=dtype).element_size()
    a.dir.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(a.dir.parent).free + (sum(f.stat().st_size for f in a.dir.glob("*")) if a.dir.exists() else 0)
    fit = int((free * 0.9 - 2 * s["vocab"] * s["hidden"] * itemsize) // layer_bytes(s, itemsize))
    s["layers"] = a.layers or min(s["layers"], fit)
    if s["layers"] < 1:
        raise SystemExit(f"{a.dir.parent}: {free / 1e9:.0f} GB free, one layer needs {layer_bytes(s, itemsize) / 1e9:.1f} GB")
    target_layers = TINY["layers"] if a.tiny else FULL["layers"]
    print(f"{s['layers']} of {target_layers} layers ({layer_bytes(s, itemsize) / 1e9:.2f} GB each) into {a.dir}", flush=True)
    gen_device = a.device if a.device.startswith("cuda") else "cpu"
    total_bytes = write_checkpoint(a.dir, s, dtype, gen_device)

    from pruning.calib.stream import stream
    from pruning.models.checkpoint import read_experts, read_router
    from pruning.models.layer_source import ShardSource
    from pruning.weights.masks import save_masks
    from pruning.weights.pattern import Pattern
    from pruning.weights.prune import layer_masks
    from pruning.weights.sparsegpt import layer_sparsegpt

    cuda = a.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(a.device)
    masks_dir = a.dir.with_name(a.dir.name + "-masks")
    shutil.rmtree(masks_dir, ignore_errors=True)
    masks_dir.mkdir()
    tokens = torch.randint(0, s["vocab"], (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0))
    times = {"calibrate": 0.0, "moe_pruner": 0.0, "sparsegpt": 0.0}
    t_start = time.perf_counter()
    source = ShardSource(a.dir, dtype, a.device)
    adapter = source.adapter
    t = time.perf_counter()
    for i, inputs, stats in stream(source, adapter, tokens, a.batch_size, progress=True):
        t1 = time.perf_counter()
        times["calibrate"] += t1 - t
        experts = read_experts(a.dir, adapter, i).to(a.device)
        masks, _ = layer_masks("moe_pruner", Pattern.parse(0.5), experts, {k: v.to(a.device) for k, v in stats.items()})
        save_masks(str(masks_dir / f"moe_pruner_layer_{i}.safetensors"), masks, {"layer": str(i)})
        t2 = time.perf_counter()
        times["moe_pruner"] += t2 - t1
        if a.sparsegpt:
            x = inputs.to(a.device, dtype)
            routing = read_router(a.dir, adapter, i).to(device=a.device).to(x.dtype).route(x)
            m2, new, _ = layer_sparsegpt("sparsegpt_gate_weighted", Pattern.parse("2:4"), experts, x, routing, 128, 0.01)
            save_masks(str(masks_dir / f"sparsegpt_layer_{i}.safetensors"), m2, {"layer": str(i)})
            del x, routing, m2, new
            times["sparsegpt"] += time.perf_counter() - t2
        del experts, masks, inputs, stats
        t = time.perf_counter()
    wall = time.perf_counter() - t_start
    scale = target_layers / s["layers"]
    import resource

    report = {
        "device": torch.cuda.get_device_name(torch.device(a.device)) if cuda else "cpu", "dtype": str(dtype),
        "layers": s["layers"], "target_layers": target_layers, "checkpoint_bytes": total_bytes,
        "calibration_tokens": [a.nsamples, a.seqlen], "seconds": {k: round(v, 2) for k, v in times.items()},
        "end_to_end_moe_pruner_s": round(wall - times["sparsegpt"], 2),
        "end_to_end_moe_pruner_s_at_target_layers": round((wall - times["sparsegpt"]) * scale, 2),
        "sparsegpt_s_at_target_layers": round(times["sparsegpt"] * scale, 2) if a.sparsegpt else None,
        "extrapolated": s["layers"] != target_layers,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(a.device) if cuda else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    ok = report["end_to_end_moe_pruner_s_at_target_layers"] <= 180
    print(f"MoE-Pruner end to end: {report['end_to_end_moe_pruner_s_at_target_layers']:.0f} s for {target_layers} layers"
          f"{' (extrapolated from ' + str(s['layers']) + ')' if report['extrapolated'] else ''}; target <= 180 s: "
          f"{'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
