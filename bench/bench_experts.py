"""Forward time of expert pruning and dynamic skipping against the dense model, side by side in one run.

Four checkpoints: dense, dense + dynamic skipping, expert-pruned (naee-k<keep>) and expert-pruned + skipping,
all loaded at once and timed interleaved call by call (background load hits every model alike), under
torch.inference_mode, after warm-up calls, as the median of several repeats:

  MoE blocks  wall time inside the MoE blocks, summed over layers (forward pre/post hooks), of one forward
  prefill     one forward of B x L tokens (no KV cache), without hooks
  decode      greedy decoding with a KV cache after an L_p-token prompt: time per step (B_d sequences, one
              token each; default B_d = 1, single-stream generation), without hooks; every timed call restarts from a copy of the prompt's cache
              (the copy is timed too: the same small cost for every model)

Tokens are B evenly spaced L-token windows of the built-in test split (as the evaluation takes them), or
random ids with --random-tokens. Expert calls per token (sentinel slots of skipped experts left out) are
counted in the same run, in a separate untimed call of each workload.

Ideal speedup from the expert calls saved, r = model calls / dense calls per token:
  MoE blocks   1 / r
  whole model  1 / (1 - f (1 - r)),  f = the dense model's share of time in its MoE blocks in that mode
               (prefill or decode), measured with the hooks in this run.
"Of ideal" = (speedup - 1) / (ideal - 1), shown when ideal > 1.001; the target is >= 80%. Top-2 routing
over fewer experts still calls 2 experts per token, so the pruned model's ideal from calls is 1.0 (its
measured ratio is reported anyway).

    python bench/bench_experts.py [--keep 4] [--device cpu|cuda] [--threads 2] [--batch 8 --seqlen 256]
                                  [--prompt-len 32 --new-tokens 32] [--repeats 5]

prints a Markdown table and writes the same numbers to bench/out/bench_experts.json (--out to change);
--readme README.md also writes the report into the README's bench_experts block.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from timing import ROOT, splice_readme, timed  # also puts the repository on sys.path

from pruning.atomic import write_json
from pruning.eval.usage import count_expert_calls
from pruning.experts.skipping import load_model
from pruning.models import get_adapter

TARGET = 0.8
MEASURES = [("moe_prefill", "MoE blocks, prefill"), ("moe_decode", "MoE blocks, decode"),
            ("prefill", "prefill"), ("decode", "decode")]


class MoEClock:
    """While entered: wall time spent inside the model's MoE blocks, summed over layers."""

    def __init__(self, model, adapter, sync):
        layers = adapter.decoder_layers(model)
        self.blocks = [adapter.moe_block(layers[i]) for i in adapter.moe_layer_indices()]
        self.sync, self.handles, self.seconds = sync, [], 0.0

    def __enter__(self):
        self.seconds = 0.0
        for b in self.blocks:
            self.handles += [b.register_forward_pre_hook(self._start), b.register_forward_hook(self._stop)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _start(self, module, args):
        self.sync()
        self.t0 = time.perf_counter()

    def _stop(self, module, args, output):
        self.sync()
        self.seconds += time.perf_counter() - self.t0


class Decode:
    """``n`` greedy decode steps with a KV cache, each call from a fresh copy of the prompt's cache."""

    def __init__(self, model, prompt, n):
        out = model(input_ids=prompt, use_cache=True)
        self.model, self.n, self.cache, self.first = model, n, out.past_key_values, out.logits[:, -1:].argmax(-1)

    def __call__(self):
        past, tok = copy.deepcopy(self.cache), self.first
        for _ in range(self.n):
            out = self.model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)


def bench_tokens(a, dense_dir, vocab_size):
    if a.random_tokens:
        return torch.randint(0, vocab_size, (a.batch, a.seqlen), generator=torch.Generator().manual_seed(0))
    from transformers import AutoTokenizer

    from pruning.data.sources import docs, tokenize_docs, windows

    stream = tokenize_docs(AutoTokenizer.from_pretrained(dense_dir), docs("builtin", "test", a.corpus))
    ids = windows(stream, a.seqlen, a.batch)
    if ids.shape[0] < a.batch:
        sys.exit(f"the test split holds only {ids.shape[0]} windows of {a.seqlen} tokens; lower --batch/--seqlen")
    return ids


def measure(models, mode, repeats, clock=False):
    """Per model, medians over ``repeats`` interleaved calls of its ``mode`` workload: {"wall"[, "moe"]} seconds."""
    runs = {name: {"wall": [], "moe": []} for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            if clock:
                with m["clock"]:
                    runs[name]["wall"].append(timed(m[mode], 1))
                runs[name]["moe"].append(m["clock"].seconds)
            else:
                runs[name]["wall"].append(timed(m[mode], 1))
    return {name: {k: statistics.median(v) for k, v in r.items() if v} for name, r in runs.items()}


def calls_per_token(m, mode):
    with count_expert_calls(m["adapter"], m["model"]) as usage:
        m[mode]()
    return usage.summary()["calls_per_token"]


def run(a, paths, sync):
    """Load the models, build their workloads, and measure: {mode: {model: wall, hooked_wall, moe, calls}}."""
    models = {}
    with torch.inference_mode():
        for name, p in paths.items():
            model = load_model(p, getattr(torch, a.dtype), a.device)
            adapter = get_adapter(model.config)
            models[name] = {"model": model, "adapter": adapter, "clock": MoEClock(model, adapter, sync)}
        ids = bench_tokens(a, a.dense, models["dense"]["model"].config.vocab_size).to(a.device)
        for m in models.values():
            def prefill(model=m["model"]):
                model(input_ids=ids, use_cache=False)
                sync()

            def decode(steps=Decode(m["model"], ids[: a.decode_batch, : a.prompt_len], a.new_tokens)):
                steps()
                sync()

            m["prefill"], m["decode"] = prefill, decode
        stats = {}
        for mode in ("prefill", "decode"):
            for m in models.values():
                for _ in range(a.warmup):
                    m[mode]()
            plain, hooked = measure(models, mode, a.repeats), measure(models, mode, a.repeats, clock=True)
            stats[mode] = {name: {"wall": plain[name]["wall"], "hooked_wall": hooked[name]["wall"],
                                  "moe": hooked[name]["moe"], "calls": calls_per_token(m, mode)}
                           for name, m in models.items()}
    return stats, {name: m["adapter"].num_experts for name, m in models.items()}


def table_rows(stats, share, steps):
    rows = []
    for key, label in MEASURES:
        mode = key.removeprefix("moe_")
        kind = "moe" if key.startswith("moe_") else "wall"
        dense = stats[mode]["dense"]
        for name, s in stats[mode].items():
            r = s["calls"] / dense["calls"]
            ideal = 1 / r if kind == "moe" else 1 / (1 - share[mode] * (1 - r))
            speedup = dense[kind] / s[kind]
            frac = (speedup - 1) / (ideal - 1) if ideal > 1.001 else None
            rows.append({"measure": key, "label": label, "model": name, "seconds": s[kind] / steps[mode],
                         "speedup": speedup, "calls_per_token": s["calls"], "calls_rel": r, "ideal": ideal,
                         "fraction_of_ideal": frac, "meets_target": None if frac is None else frac >= TARGET})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=int, default=4, help="experts kept by the pruned model: naee-k<keep>")
    ap.add_argument("--dense", default=str(ROOT / "results/tiny/base"))
    ap.add_argument("--skip", default=str(ROOT / "results/tiny/full/skip/checkpoint"))
    ap.add_argument("--pruned", help="default results/tiny/naee-k<keep>/checkpoint")
    ap.add_argument("--pruned-skip", help="default results/tiny/naee-k<keep>/skip/checkpoint")
    ap.add_argument("--corpus", default=str(ROOT / "data/builtin"), help="the built-in corpus (test split)")
    ap.add_argument("--random-tokens", action="store_true", help="random token ids instead of test windows")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256, help="prefill length L")
    ap.add_argument("--decode-batch", type=int, default=1, help="sequences decoded together (B_d)")
    ap.add_argument("--prompt-len", type=int, default=32, help="decode prompt length L_p (first tokens of the windows)")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps N")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", help="JSON file; default bench/out/bench_experts.json")
    ap.add_argument("--readme", help="also write the printed report into this file between "
                                     "<!-- bench_experts:begin --> and <!-- bench_experts:end -->")
    a = ap.parse_args()
    paths = {"dense": a.dense, "skip": a.skip,
             "pruned": a.pruned or str(ROOT / f"results/tiny/naee-k{a.keep}/checkpoint"),
             "pruned+skip": a.pruned_skip or str(ROOT / f"results/tiny/naee-k{a.keep}/skip/checkpoint")}
    for name, p in paths.items():
        if not Path(p, "config.json").exists():
            sys.exit(f"{p}: no {name} checkpoint; run the pipeline first (dvc repro) or pass --{name.replace('+', '-')}")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)

    stats, experts = run(a, paths, sync)
    share = {mode: s["dense"]["moe"] / s["dense"]["hooked_wall"] for mode, s in stats.items()}
    rows = table_rows(stats, share, {"prefill": 1, "decode": a.new_tokens})  # decode: seconds per step

    lines = [
        f"expert pruning ({experts['pruned']} of {experts['dense']} experts per MoE layer) and dynamic skipping "
        f"vs dense: {a.device}, {a.dtype}, {torch.get_num_threads()} threads, median of {a.repeats} after "
        f"{a.warmup} warm-up; prefill {a.batch} x {a.seqlen} tokens "
        f"({'random ids' if a.random_tokens else 'test-split windows'}); decode {a.new_tokens} steps x "
        f"{a.decode_batch} sequence(s) after a {a.prompt_len}-token prompt (ms per step); the dense model's time "
        f"share in MoE blocks f: prefill {share['prefill']:.3f}, decode {share['decode']:.3f}.",
        "",
        "| measure | model | ms | speedup | calls/token | calls vs dense | ideal | of ideal | >= 80% |",
        "|---|---|--:|--:|--:|--:|--:|--:|:-:|",
    ]
    for r in rows:
        frac = "-" if r["fraction_of_ideal"] is None else f"{100 * r['fraction_of_ideal']:.0f}%"
        ok = {None: "-", True: "yes", False: "no"}[r["meets_target"]]
        lines.append(f"| {r['label']} | {r['model']} | {1e3 * r['seconds']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['calls_per_token']:.3f} | {r['calls_rel']:.3f} | {r['ideal']:.2f}x | {frac} | {ok} |")
    lines += ["", "'-': ideal <= 1.001 (no expert calls saved). The pruned model routes top-2 over fewer experts, so "
              "it still makes 2 calls per token and its ideal from calls is 1.0; its speedup is reported as measured."]
    report = "\n".join(lines)
    print(report)
    if a.readme:
        splice_readme(a.readme, "bench_experts", report)
    out = Path(a.out) if a.out else ROOT / "bench/out/bench_experts.json"  # outside DVC's results/
    setup = {k: getattr(a, k) for k in ("batch", "decode_batch", "seqlen", "prompt_len", "new_tokens", "warmup", "repeats", "device",
                                        "dtype", "random_tokens")}
    setup.update(threads=torch.get_num_threads(), target_fraction_of_ideal=TARGET,
                 tokens="random ids" if a.random_tokens else "builtin test-split windows")
    write_json(out, {"setup": setup, "checkpoints": paths, "experts_per_layer": experts, "moe_share_dense": share,
                     "rows": rows})  # atomic: a temporary sibling, then os.replace
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
