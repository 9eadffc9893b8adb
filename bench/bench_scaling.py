"""How each step's cost grows with calibration tokens, experts and layers, printed side by side in one run.

Random seeded models of the built-in tiny model's architecture (``pruning.models.tiny.build_config``: top-k
routed SwiGLU experts; small hidden size) go through the library's own code for each step, on the CPU:

  calibration        the streaming pass with statistics over every layer (``pruning.calib.stream.stream``)
  wanda / moe_pruner score-method masks of every layer from those statistics (``weights.prune.layer_masks``)
  sparsegpt          SparseGPT masks and weight updates of every layer (``weights.sparsegpt.layer_sparsegpt``)
  expert search      NAEE's search, keep half of the experts, of one layer (the pipeline runs one job per layer;
                     ``experts.search``, the pipeline's ``experts.max_subsets`` and ``beam_width``)
  perplexity         a plain model forward with the LM head and the loss over as many tokens (``eval.perplexity``)

Three axes from a base (hidden 64, intermediate 128, 8 experts, top-2, 4 layers, 32 x 128 tokens): tokens x1, x2, x4
(the calibration tokens, and the perplexity forward's), experts 8 -> 16 -> 32 -> 64, layers 4 -> 8 -> 16. Each
time is the minimum of ``--repeats`` runs (the least disturbed, on a shared machine). For each step and axis the
log-log slope (least squares) of time against the factor is printed next to the expected one:

  tokens   1 for every step that runs over the tokens (calibration, SparseGPT's Hessians, the search's expert
           outputs and subset losses, perplexity); 0 for the score-method masks (the statistics are already
           summed: the mask is a function of the weights); SparseGPT: its OBS updates do not depend on the tokens,
           so between 0 and 1.
  layers   1 for every step (each layer is the same work), 0 for the expert search of one layer.
  experts  calibration and perplexity: 0 in FLOPs (each token still visits top-k experts; only the router's E x H
           product grows) but up to 1 in per-expert operations (the eager loop visits every expert with tokens), so
           between 0 and 1, near 1 on a toy like this one; masks and SparseGPT: 1 (every expert's matrices);
           expert search: C(E, E/2) dropped sets, each a routing and a weighted sum over E experts, while that is
           <= max_subsets (exhaustive: E=8: 70 sets, E=16: 12870), then beam search: E/2 steps of about
           beam_width x E candidate sets, each again O(E), and each step recomputing every expert's outputs:
           ~E^3 in the sets' work, ~E^2 in the expert outputs. The expected exponent printed for the search is the
           log-log slope of (sets evaluated x E), per interval, from the search's own counts.

    .venv/bin/python bench/bench_scaling.py                       # ~6-10 min on 2 shared cores
    .venv/bin/python bench/bench_scaling.py --quick               # a smoke test of the script
    .venv/bin/python bench/bench_scaling.py --readme README.md    # also splice the table between
                                                                  # <!-- scaling:begin --> and <!-- scaling:end -->
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import yaml

from timing import ROOT, splice_readme  # also puts the repository on sys.path

from pruning.calib.stream import stream
from pruning.eval.perplexity import token_nll
from pruning.experts.search import BlockLoss, search
from pruning.models import get_adapter
from pruning.models.layer_source import ResidentSource
from pruning.moe import Router
from pruning.weights.pattern import Pattern
from pruning.weights.prune import layer_masks
from pruning.weights.sparsegpt import layer_sparsegpt

STEPS = ("calibration", "wanda", "moe_pruner", "sparsegpt", "expert search", "perplexity")
BASE = {"hidden": 64, "experts": 8, "layers": 4, "tokens": 1}
AXES = {"tokens": [1, 2, 4], "experts": [8, 16, 32, 64], "layers": [4, 8, 16]}
EXPECTED = {
    "tokens": {"calibration": "1", "wanda": "0", "moe_pruner": "0", "sparsegpt": "0..1", "expert search": "1",
               "perplexity": "1"},
    "layers": {**{s: "1" for s in STEPS}, "expert search": "0"},
    "experts": {"calibration": "0..1", "wanda": "1", "moe_pruner": "1", "sparsegpt": "1", "expert search": None,
                "perplexity": "0..1"},
}


def build(hidden: int, experts: int, layers: int, seed: int = 0):
    from transformers import AutoModelForCausalLM

    from pruning.models.tiny import build_config

    torch.manual_seed(seed)
    arch = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_layers": layers, "num_heads": 4,
            "num_kv_heads": 4, "num_experts": experts, "top_k": 2, "router_aux_loss_coef": 0.0}
    cfg = build_config(512, arch, 512, 0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", experts_implementation="eager").eval()


def run_point(hidden, experts, layers, tokens, seqlen, nsamples, batch_size, search_cfg, repeats):
    """Seconds of every step on one model size (the minimum of ``repeats``), and the search's evaluated sets."""
    model = build(hidden, experts, layers)
    adapter = get_adapter(model.config)
    n = nsamples * tokens
    ids = torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(1))
    best = {s: math.inf for s in STEPS}
    pattern = Pattern.parse("0.5")
    keep = experts // 2
    sets = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        cal = list(stream(ResidentSource(model, adapter), adapter, ids, batch_size, progress=False))
        best["calibration"] = min(best["calibration"], time.perf_counter() - t0)
        layer_mods = adapter.decoder_layers(model)
        for step in ("wanda", "moe_pruner", "sparsegpt", "expert search"):
            t0 = time.perf_counter()
            for i, inputs, st in cal:
                ex = adapter.expert_weights(layer_mods[i])
                experts_i = ex.with_weights(ex.gate_up.detach(), ex.down.detach())
                router = Router(adapter.router(layer_mods[i]).weight.detach(), adapter.rule())
                if step == "sparsegpt":
                    layer_sparsegpt(step, pattern, experts_i, inputs, router.route(inputs))
                elif step == "expert search":
                    if i != cal[0][0]:
                        continue
                    per = seqlen * batch_size  # one calibration batch of sequences per loss batch, as the job does
                    batches = [inputs[j : j + per] for j in range(0, inputs.shape[0], per)]
                    res = search(BlockLoss(batches, router, experts_i), experts, keep, search_cfg["max_subsets"],
                                 search_cfg["beam_width"])
                    sets = len(res["candidates"])
                else:
                    layer_masks(step, pattern, experts_i, st)
            best[step] = min(best[step], time.perf_counter() - t0)
        t0 = time.perf_counter()
        token_nll(model, ids, batch_size)
        best["perplexity"] = min(best["perplexity"], time.perf_counter() - t0)
    return best, sets


def slope(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=BASE["hidden"])
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=32, help="calibration sequences at tokens x1")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a shared machine")
    ap.add_argument("--quick", action="store_true", help="two points per axis, tiny sizes: a smoke test")
    ap.add_argument("--readme", help="also write the table into this file between <!-- scaling:begin/end --> "
                                     "(only if both markers are there)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    search_cfg = {"max_subsets": params["experts"]["max_subsets"], "beam_width": params["experts"]["beam_width"]}
    axes = {k: v[:2] for k, v in AXES.items()} if a.quick else AXES
    nsamples, seqlen = (2, 32) if a.quick else (a.nsamples, a.seqlen)
    base = {**BASE, "hidden": 32 if a.quick else a.hidden}
    print(f"scaling: random tiny-architecture models, hidden {base['hidden']}, intermediate {2 * base['hidden']}, top-2; "
          f"base {base['experts']} experts, {base['layers']} layers, {nsamples}x{seqlen} tokens; "
          f"{torch.get_num_threads()} threads, min of {a.repeats}; search keeps E/2 "
          f"(exhaustive up to {search_cfg['max_subsets']} sets, else beam width {search_cfg['beam_width']})")
    cache = {}
    t_all = time.perf_counter()
    lines = []
    for axis, values in axes.items():
        results = []
        for v in values:
            pt = {**base, axis: v}
            key = (pt["experts"], pt["layers"], pt["tokens"])
            if key not in cache:
                cache[key] = run_point(pt["hidden"], pt["experts"], pt["layers"], pt["tokens"], seqlen, nsamples,
                                       a.batch_size, search_cfg, a.repeats)
            results.append(cache[key])
            print(f"  {axis} = {v}: " + ", ".join(f"{s} {cache[key][0][s]:.3f} s" for s in STEPS), flush=True)
        labels = [f"x{v}" if axis == "tokens" else str(v) for v in values]
        lines.append(f"\n**{axis}** ({' -> '.join(labels)}): seconds, measured log-log slope, expected")
        lines.append("")
        lines.append("| step | " + " | ".join(labels) + " | slope | expected |")
        lines.append("|---|" + "---:|" * len(values) + "---:|---|")
        for s in STEPS:
            ts = [r[0][s] for r in results]
            exp = EXPECTED[axis][s]
            if exp is None:  # the search over experts: from the sets it evaluates, times E, per interval
                sets = [r[1] for r in results]
                work = [n * e for n, e in zip(sets, values)]
                steps = [f"{slope(values[i:i + 2], work[i:i + 2]):.1f}" for i in range(len(values) - 1)]
                exp = f"{' / '.join(steps)} per interval (sets x E; sets per layer: {', '.join(map(str, sets))})"
                meas = " / ".join(f"{slope(values[i:i + 2], ts[i:i + 2]):.1f}" for i in range(len(values) - 1))
            else:
                meas = f"{slope(values, ts):.2f}"
            lines.append(f"| {s} | " + " | ".join(f"{t:.3f}" for t in ts) + f" | {meas} | {exp} |")
    report = "\n".join(lines).strip()
    print()
    print(report)
    print(f"\n(total {time.perf_counter() - t_all:.0f} s)")
    if a.readme:
        splice_readme(a.readme, "scaling", report)


if __name__ == "__main__":
    main()
