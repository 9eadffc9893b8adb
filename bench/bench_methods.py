"""Per-layer pruning time of every method, printed side by side in one run.

For each MoE layer of a model, from the pipeline's cached calibration files (MoE-block inputs and
statistics), time what one ``mask`` job computes for each method (scores + mask selection, or SparseGPT's
Hessians + OBS updates), relative to the Wanda mask time and to the forward time of that decoder layer over
the same calibration tokens. The SparseGPT methods run as the pipeline runs them (``hessians='auto'``); a
second table compares the batched Hessians (``hessian.layer_hessians``) with the per-expert path
(``expert_hessians``, one expert at a time): the Hessians alone and the whole SparseGPT mask job, timed interleaved, their ratio, the largest
difference of the Hessians (relative to the largest entry) and whether masks and weights come out equal.

    python bench/bench_methods.py [--model results/tiny/base] [--calib results/tiny/full/calib/builtin-n64-l256-s0]
                                  [--sparsity 0.5] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from safetensors.torch import load_file

from timing import timed  # also puts the repository on sys.path

from pruning.calib.stream import run_layer
from pruning.methods import WEIGHT_METHODS
from pruning.models import get_adapter
from pruning.models.checkpoint import load_model
from pruning.moe import Router
from pruning.weights.hessian import expert_hessians, layer_hessians
from pruning.weights.pattern import Pattern
from pruning.weights.prune import layer_masks
from pruning.weights.sparsegpt import layer_sparsegpt

METHODS = list(WEIGHT_METHODS)
SPARSEGPT = [m for m in METHODS if WEIGHT_METHODS[m].updates_weights]


def interleaved(fns: dict, repeats: int) -> dict:
    """Median wall time of each function, the functions called in turn ``repeats`` times (shared machine: a load
    change hits all alike)."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def compare_hessians(method, pattern, experts, inputs, routing, repeats):
    """Batched against per-expert Hessians for one SparseGPT method on one layer: times, max relative difference,
    masks and weights equal."""
    mode = WEIGHT_METHODS[method].hessian
    per_expert = lambda: [expert_hessians(mode, inputs, routing, e, experts) for e in range(experts.num_experts)]  # noqa: E731
    t = interleaved({
        "h_batched": lambda: layer_hessians(mode, inputs, routing, experts),
        "h_per_expert": per_expert,
        "job_batched": lambda: layer_sparsegpt(method, pattern, experts, inputs, routing, hessians="batched"),
        "job_per_expert": lambda: layer_sparsegpt(method, pattern, experts, inputs, routing, hessians="per_expert"),
    }, repeats)
    h_in, h_mid, _ = layer_hessians(mode, inputs, routing, experts)
    diff = 0.0
    for e, (r_in, r_mid, _) in enumerate(per_expert()):
        for a, b in ((h_in[e], r_in), (h_mid[e], r_mid)):
            diff = max(diff, float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)))
    mb, wb, _ = layer_sparsegpt(method, pattern, experts, inputs, routing, hessians="batched")
    mp, wp, _ = layer_sparsegpt(method, pattern, experts, inputs, routing, hessians="per_expert")
    masks_equal = all(torch.equal(mb[k], mp[k]) for k in mb)
    flips = sum(int((mb[k] != mp[k]).sum()) for k in mb)
    wdiff = max(float((wb[k] - wp[k]).abs().max()) for k in wb)
    return t, diff, masks_equal, flips, wdiff


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="results/tiny/base")
    ap.add_argument("--calib", default="results/tiny/full/calib/builtin-n64-l256-s0")
    ap.add_argument("--sparsity", default="0.5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--skip-hessians", action="store_true", help="no batched vs per-expert Hessian comparison")
    ap.add_argument("--layers", type=int, nargs="*", help="only these MoE layers (default: all)")
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
    hess_rows = []
    for i in range(max(args.layers) + 1 if args.layers else len(layers)):
        layer = layers[i]
        if i not in adapter.moe_layer_indices() or (args.layers and i not in args.layers):
            with torch.no_grad():
                hidden = run_layer(layer, hidden, ctx[i], args.batch_size)
            continue
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
        if not args.skip_hessians:
            routing = Router(router, adapter.rule()).route(inputs)
            hess_rows += [(i, m, *compare_hessians(m, pattern, experts, inputs, routing, args.repeats)) for m in SPARSEGPT]
        print(f"{i:>5} {'(decoder layer forward)':<26} {t_fwd:9.3f}")
        total_fwd += t_fwd
        hidden = next_hidden
    print("all layers")
    for m in METHODS:
        print(f"{'':>5} {m:<26} {totals[m]:9.3f} {totals[m] / totals['wanda']:8.2f} {totals[m] / total_fwd:12.2f}")
    if hess_rows:
        print(f"\nSparseGPT Hessians, batched vs per-expert, {adapter.num_experts} experts, "
              f"median of {args.repeats} interleaved; ratio = batched / per-expert")
        print(f"{'layer':>5} {'method':<24} {'H batched':>9} {'H per-exp':>9} {'ratio':>6} {'job batch':>9} "
              f"{'job per-e':>9} {'ratio':>6} {'max rel dH':>10} {'masks':>9} {'max |dW|':>9}")
        sums = {}
        for i, m, t, diff, same, flips, wdiff in hess_rows:
            print(f"{i:>5} {m:<24} {t['h_batched']:9.3f} {t['h_per_expert']:9.3f} {t['h_batched'] / t['h_per_expert']:6.2f} "
                  f"{t['job_batched']:9.3f} {t['job_per_expert']:9.3f} {t['job_batched'] / t['job_per_expert']:6.2f} "
                  f"{diff:10.1e} {'equal' if same else f'{flips} flip':>9} {wdiff:9.1e}")
            for k, v in t.items():
                sums.setdefault(m, {}).setdefault(k, 0.0)
                sums[m][k] += v
        for m, t in sums.items():
            print(f"{'all':>5} {m:<24} {t['h_batched']:9.3f} {t['h_per_expert']:9.3f} {t['h_batched'] / t['h_per_expert']:6.2f} "
                  f"{t['job_batched']:9.3f} {t['job_per_expert']:9.3f} {t['job_batched'] / t['job_per_expert']:6.2f}")


if __name__ == "__main__":
    main()
