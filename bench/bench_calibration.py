"""Benchmarks, printed side by side in one run.

1. The calibration pass (layer-by-layer streaming with statistics) over a plain forward of the same
   tokens through the same decoder layers (target <= 1.3x), and the same pass with the statistics
   accumulated in the per-statistic form (one temporary and one reduction per statistic and expert call,
   the form before issue 17): its ratio, and whether its statistics are bitwise those of the pass.
   The three are timed interleaved (plain, pass, per-statistic pass, repeated), on a shared machine; the
   ratio is the median of the per-repeat ratios. ``--hidden H`` times a random model of the built-in tiny
   model's architecture (``pruning.models.tiny.build_config``) of hidden size H (intermediate 2H, ``--experts``
   experts, top-2, 4 layers) instead of ``--model``, so that the ratio
   is not the Python overhead of a toy.
2. One sweep of 3 methods x 3 sparsities (one shared calibration) against 9 separate single runs,
   each a fresh Snakemake run from the same trained model.

    python bench/bench_calibration.py [--model results/tiny/base] [--skip-sweep]
    python bench/bench_calibration.py --hidden 512 --skip-sweep
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from timing import ROOT  # also puts the repository on sys.path

import pruning.calib.stream as calib_stream
from pruning.calib.stats import LayerStats
from pruning.calib.stream import stream
from pruning.models import get_adapter
from pruning.models.checkpoint import load_model
from pruning.models.layer_source import ResidentSource


class PerStatisticStats(LayerStats):
    """The per-statistic form: a temporary and a reduction for each statistic of each expert call."""

    def add_expert(self, e, x, g, h):
        n = x.shape[0]
        self._count[e] += n
        if n == 0:
            return
        H, I = self.hidden, self.intermediate
        x, h, g = x.float(), h.float(), g.float()[:, None]
        self._sums[e, :H] += (x * x).sum(0)
        self._sums[e, H : H + I] += (h * h).sum(0)
        self._sums[e, H + I : 2 * H + I] += ((g * x) ** 2).sum(0)
        self._sums[e, 2 * H + I :] += ((g * h) ** 2).sum(0)
        self._sum_weight[e] += g.sum()


def random_model(hidden: int, experts: int, layers: int = 4, seed: int = 0) -> Path:
    """A seeded random checkpoint of the tiny model's architecture (intermediate 2 x hidden, top-2) in a temporary
    directory."""
    from transformers import AutoModelForCausalLM

    from pruning.models.tiny import build_config

    torch.manual_seed(seed)
    heads = max(4, hidden // 64)
    arch = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_layers": layers, "num_heads": heads,
            "num_kv_heads": heads, "num_experts": experts, "top_k": 2, "router_aux_loss_coef": 0.0}
    d = Path(tempfile.mkdtemp(prefix="bench-calib-"))
    AutoModelForCausalLM.from_config(build_config(4096, arch, 512, 0)).save_pretrained(d)
    return d


def bench_calibration(model_dir, nsamples, seqlen, batch_size, repeats):
    model = load_model(model_dir)
    adapter = get_adapter(model.config)
    tokens = torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def plain():
        for i in range(0, nsamples, batch_size):
            model.model(input_ids=tokens[i : i + batch_size])

    def calib(stats_class=LayerStats):
        calib_stream.LayerStats = stats_class
        try:
            return {i: st for i, _, st in stream(ResidentSource(model, adapter), adapter, tokens, batch_size,
                                                  progress=False)}
        finally:
            calib_stream.LayerStats = LayerStats

    plain()  # warm-up
    runs = {"plain": plain, "pass": calib, "per-statistic": lambda: calib(PerStatisticStats)}
    times = {k: [] for k in runs}
    for _ in range(repeats):  # interleaved: a load change on the shared machine hits all three alike
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    same = _same_stats(calib(), calib(PerStatisticStats))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = lambda k: statistics.median(t / p for t, p in zip(times[k], times["plain"]))  # noqa: E731
    cfg = model.config
    print(f"calibration pass  {nsamples}x{seqlen} tokens, {adapter.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{adapter.num_experts} experts, top-{cfg.num_experts_per_tok}, batch {batch_size}, "
          f"{torch.get_num_threads()} threads, median of {repeats} interleaved")
    print(f"  plain forward              {med['plain']:8.3f} s")
    print(f"  calibration pass           {med['pass']:8.3f} s   ratio {ratio('pass'):5.2f} x   (target <= 1.3x)")
    print(f"  per-statistic form (old)   {med['per-statistic']:8.3f} s   ratio {ratio('per-statistic'):5.2f} x")
    print(f"  statistics bitwise equal to the per-statistic form: {same}")
    return ratio("pass")


def _same_stats(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[i].keys() == b[i].keys() and all(torch.equal(a[i][k], b[i][k]) for k in a[i]) for i in a)


def bench_sweep(model_dir, corpus_dir, gpus):
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    base["model"] = {**base["model"], "name": "bench", "name_or_path": str(Path(model_dir).resolve())}
    base["report"]["update_readme"] = False
    base["artifacts"]["keep_pruned_checkpoints"] = False
    base["prune"]["propagation"] = ["dense"]
    base["eval"]["max_windows"] = 64  # the sweep's saving is in calibration; keep evaluation short
    methods, sparsities = ["magnitude", "wanda", "moe_pruner"], [0.5, 0.6, 0.7]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-q", "--resources", f"gpu={gpus}", "--cores", "all"]

    def run(params):
        d = Path(tempfile.mkdtemp(prefix="bench-"))
        shutil.copytree(corpus_dir, d / "data/builtin")  # copytree keeps mtimes: the corpus is up to date
        (d / "params.yaml").write_text(yaml.safe_dump(params))
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=d, check=True, capture_output=True)
        dt = time.perf_counter() - t0
        shutil.rmtree(d)
        return dt

    sweep = run({**base, "prune": {**base["prune"], "methods": methods, "sparsities": sparsities}})
    singles = [run({**base, "prune": {**base["prune"], "methods": [m], "sparsities": [s]}}) for m in methods for s in sparsities]
    print(f"sweep of {len(methods)} methods x {len(sparsities)} sparsities (dense propagation, one calibration)")
    print(f"  one sweep run      {sweep:8.1f} s")
    print(f"  9 single runs      {sum(singles):8.1f} s   (each {min(singles):.1f}-{max(singles):.1f} s)")
    print(f"  ratio              {sweep / sum(singles):8.2f} x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "results/tiny/base"), help="an HF MoE checkpoint directory")
    ap.add_argument("--corpus", default=str(ROOT / "data/builtin"), help="the built-in corpus directory")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--gpus", type=int, default=2, help="--resources gpu=N for the Snakemake runs (jobs run on CPU without CUDA)")
    ap.add_argument("--hidden", type=int, help="time a random model of this hidden size instead of --model")
    ap.add_argument("--experts", type=int, default=8, help="experts of the --hidden model")
    a = ap.parse_args()
    if a.hidden:
        d = random_model(a.hidden, a.experts)
        try:
            bench_calibration(d, a.nsamples, a.seqlen, a.batch_size, a.repeats)
        finally:
            shutil.rmtree(d)
    else:
        if not Path(a.model, "config.json").exists():
            sys.exit(f"{a.model}: no checkpoint; run the pipeline first (dvc repro) or pass --model")
        bench_calibration(a.model, a.nsamples, a.seqlen, a.batch_size, a.repeats)
    if not a.skip_sweep:
        bench_sweep(a.model, a.corpus, a.gpus)
