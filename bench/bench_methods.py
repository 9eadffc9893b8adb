"""Per-layer pruning time of every method, printed side by side in one run.

For each MoE layer of a model, from the pipeline's cached calibration files (MoE-block inputs and
statistics), time what one ``mask`` job computes for each method (scores + mask selection, or SparseGPT's
Hessians + OBS updates), relative to the Wanda mask time and to the forward time of that decoder layer over
the same calibration tokens.

    python bench/bench_methods.py [--model results/tiny/base] [--calib results/tiny/full/calib/builtin-n64-l256-s0]
                                  [--sparsity 0.5] [--repeats 3]
"""
from __future__ import annotations

import argparse

import torch
from safetensors.torch import load_file

from timing import timed  # also puts the repository on sys.path

from pruning.calib.stream import run_layer
from pruning.methods import WEIGHT_METHODS
from pruning.models import get_adapter
from pruning.models.checkpoint import load_model
from pruning.moe import Experts, Router
from pruning.weights.pattern import Pattern
from pruning.weights.prune import layer_masks
from pruning.weights.sparsegpt import layer_sparsegpt

METHODS = list(WEIGHT_METHODS)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="results/tiny/base")
    ap.add_argument("--calib", default="results/tiny/full/calib/builtin-n64-l256-s0")
    ap.add_argument("--sparsity", default="0.5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    pattern = Pattern.parse(args.sparsity)
    model = load_model(args.model)
    adapter = get_adapter(model.config)
    tokens = load_file(f"{args.calib}/tokens.safetensors")["input_ids"]
    layers = adapter.decoder_layers(model)
    ctx = adapter.layer_context(model, tokens.shape[1], "cpu")
    with torch.no_grad():
        hidden = adapter.embed(model, tokens)
    print(f"per-layer pruning time, pattern {pattern}, {tokens.numel()} calibration tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    header = f"{'layer':>5} {'method':<26} {'seconds':>9} {'x wanda':>8} {'x layer fwd':>12}"
    print(header)
    totals = {m: 0.0 for m in METHODS}
    total_fwd = 0.0
    for i in adapter.moe_layer_indices():
        layer = layers[i]
        t_fwd = timed(lambda: run_layer(layer, hidden, ctx[i], args.batch_size), args.repeats)
        with torch.no_grad():
            next_hidden = run_layer(layer, hidden, ctx[i], args.batch_size)
        ex = adapter.expert_weights(layer)
        experts = ex.with_weights(ex.gate_up.detach(), ex.down.detach())
        stats = load_file(f"{args.calib}/dense/layer_{i}.stats.safetensors")
        inputs = load_file(f"{args.calib}/dense/layer_{i}.inputs.safetensors")["hidden_states"]
        router = adapter.router(layer).weight.detach()
        times = {}
        for m in METHODS:
            if WEIGHT_METHODS[m].updates_weights:
                def job(m=m):
                    layer_sparsegpt(m, pattern, experts, inputs, Router(router, adapter.rule()).route(inputs))
            else:
                def job(m=m):
                    layer_masks(m, pattern, experts, stats)
            times[m] = timed(job, args.repeats)
        for m in METHODS:
            print(f"{i:>5} {m:<26} {times[m]:9.3f} {times[m] / times['wanda']:8.2f} {times[m] / t_fwd:12.2f}")
            totals[m] += times[m]
        print(f"{i:>5} {'(decoder layer forward)':<26} {t_fwd:9.3f}")
        total_fwd += t_fwd
        hidden = next_hidden
    print("all layers")
    for m in METHODS:
        print(f"{'':>5} {m:<26} {totals[m]:9.3f} {totals[m] / totals['wanda']:8.2f} {totals[m] / total_fwd:12.2f}")


if __name__ == "__main__":
    main()
