"""Benchmarks, printed side by side in one run.

1. The calibration pass (layer-by-layer streaming with statistics) over a plain forward of the same
   tokens through the same decoder layers (target <= 1.3x).
2. One sweep of 3 methods x 3 sparsities (one shared calibration) against 9 separate single runs,
   each a fresh Snakemake run from the same trained model.

    python bench/bench_calibration.py [--model results/tiny/base] [--skip-sweep]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from timing import ROOT, timed  # also puts the repository on sys.path

from pruning.calib.stream import ResidentSource, stream
from pruning.models import get_adapter
from pruning.models.checkpoint import load_model


def bench_calibration(model_dir, nsamples, seqlen, batch_size, repeats):
    model = load_model(model_dir)
    adapter = get_adapter(model.config)
    tokens = torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def plain():
        for i in range(0, nsamples, batch_size):
            model.model(input_ids=tokens[i : i + batch_size])

    def calib():
        for _ in stream(ResidentSource(model, adapter), adapter, tokens, batch_size, progress=False):
            pass

    plain()  # warm-up
    t_plain, t_calib = timed(plain, repeats), timed(calib, repeats)
    print(f"calibration pass  {nsamples}x{seqlen} tokens, {adapter.num_layers} layers, batch {batch_size}")
    print(f"  plain forward      {t_plain:8.3f} s")
    print(f"  calibration pass   {t_calib:8.3f} s")
    print(f"  ratio              {t_calib / t_plain:8.2f} x   (target <= 1.3x)")


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
    a = ap.parse_args()
    if not Path(a.model, "config.json").exists():
        sys.exit(f"{a.model}: no checkpoint; run the pipeline first (dvc repro) or pass --model")
    bench_calibration(a.model, a.nsamples, a.seqlen, a.batch_size, a.repeats)
    if not a.skip_sweep:
        bench_sweep(a.model, a.corpus, a.gpus)
