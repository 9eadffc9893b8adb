"""Wall time of ``pruning.eval.lm_harness.evaluate`` with loglikelihood packing on and off, side by side.

One model, loaded once; the two ways alternate call by call (on, off, on, off, ...) in one process, so load
from other jobs hits both alike; the median of ``--repeats`` calls each. Every call is a whole lm-eval job
(task building included) on the local tasks. Also checks that both ways give the same metrics: acc and
acc_norm identical, perplexities within float noise (max abs differences printed), and prints the packing
self-check outcome.

Run from the workflow's working directory (the task YAMLs name data/lm_eval/*.jsonl relative to it):

    cd /tmp/fresh && HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 \\
        /work/main/.venv/bin/python /work/main/bench/bench_lm_eval.py \\
        [--model results/tiny/base] [--task-dir /work/main/workflow/lm_eval_tasks] [--threads 1] \\
        [--batch-size 32 --max-length 256] [--repeats 3] [--limit N] [--profile]

--profile adds one cProfile run of each way (not timed) and prints the time spent in the model's forward.
Writes the numbers to bench/out/bench_lm_eval.json (--out to change).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import ROOT  # noqa: E402  (puts the repository on sys.path)

TASKS = ["code_next_line", "code_rolling"]
EXACT = ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr")
CLOSE = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def forward_seconds(fn) -> float:
    """cumulative time in torch.nn.Module._call_impl (the model forwards, nested calls counted once), one run."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    st = pstats.Stats(prof)
    return max((v[3] for k, v in st.stats.items() if k[2] == "_call_impl" and "torch/nn/modules/module.py" in k[0]),
               default=float("nan"))


def compare(a: dict, b: dict) -> dict:
    """Per metric, the max abs difference over tasks between two ``evaluate`` outputs."""
    out = {}
    for t in a["tasks"]:
        for m, v in a["tasks"][t].items():
            if isinstance(v, float) and m != "version":
                d = abs(v - b["tasks"][t][m])
                out[m] = max(out.get(m, 0.0), d)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="results/tiny/base")
    ap.add_argument("--task-dir", default=str(ROOT / "workflow/lm_eval_tasks"))
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--bootstrap-iters", type=int, default=1000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench/out/bench_lm_eval.json"))
    args = ap.parse_args(argv)

    import logging

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pruning.eval import lm_harness

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)

    def run(packing: bool) -> dict:
        return lm_harness.evaluate(model, tok, args.tasks, task_dir=args.task_dir, limit=args.limit,
                                   batch_size=args.batch_size, max_length=args.max_length,
                                   bootstrap_iters=args.bootstrap_iters, packing=packing)

    times = {True: [], False: []}
    outs = {}
    run(True)  # warm-up: imports, task building, first-call allocations
    for _ in range(args.repeats):
        for packing in (True, False):
            t0 = time.perf_counter()
            outs[packing] = run(packing)
            times[packing].append(time.perf_counter() - t0)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    diffs = compare(outs[True], outs[False])
    exact = all(diffs.get(m, 0.0) == 0.0 for m in EXACT)
    close_max = max((diffs.get(m, 0.0) for m in CLOSE), default=0.0)

    print(f"model {args.model}, tasks {args.tasks}, threads {args.threads}, batch_size {args.batch_size}, "
          f"max_length {args.max_length}, limit {args.limit}, {args.repeats} repeats each (alternating)")
    print(f"packing self-check: {outs[True]['loglikelihood_packing']['self_check']}")
    print("| way | median s | all runs s |")
    print("|---|---|---|")
    for name, packing in (("packed", True), ("lm-eval HFLM", False)):
        print(f"| {name} | {statistics.median(times[packing]):.2f} | "
              f"{', '.join(f'{t:.2f}' for t in times[packing])} |")
    print(f"speed-up (unpacked / packed): {off / on:.2f}x")
    for t in args.tasks:
        for packing in (True, False):
            row = {m: v for m, v in outs[packing]["tasks"][t].items() if isinstance(v, float) and m != "version"}
            print(f"  {t} {'packed  ' if packing else 'unpacked'}: {row}")
    print("max abs difference: " + ", ".join(f"{m} {d:.3g}" for m, d in sorted(diffs.items())))
    print(f"acc / acc_norm and their stderr identical: {exact}; perplexities max abs difference {close_max:.3g}")

    result = {"args": vars(args), "seconds": {"packed": times[True], "unpacked": times[False]},
              "median": {"packed": on, "unpacked": off}, "ratio": off / on, "max_abs_diff": diffs,
              "acc_identical": exact, "self_check": outs[True]["loglikelihood_packing"]["self_check"],
              "tasks": {"packed": outs[True]["tasks"], "unpacked": outs[False]["tasks"]}}
    if args.profile:
        fwd = {p: forward_seconds(lambda p=p: run(p)) for p in (True, False)}
        print(f"cProfile, model forward: packed {fwd[True]:.2f} s, unpacked {fwd[False]:.2f} s")
        result["profile_forward_s"] = {"packed": fwd[True], "unpacked": fwd[False]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
