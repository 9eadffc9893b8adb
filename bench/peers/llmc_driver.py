"""Peer side of bench/bench_peers.py: one llm-compressor oneshot run, then token perplexity, in the peer's own venv.

Runs under bench/out/venv-llmcompressor/bin/python (bench/peers/install.sh), never under the project's venv: it imports
nothing from pruning/. It reads the calibration ids and the evaluation windows from the safetensors file that
bench_peers.py wrote (the very ids the pipeline draws), prunes the expert Linear layers only (the router, attention,
embeddings and lm_head stay dense, as in the pipeline), and writes one JSON.

    python llmc_driver.py --model DIR --tokens FILE --method wanda --pattern 0.5 --out run.json [--save DIR]

The perplexity is the pipeline's formula: exp(sum of next-token cross-entropy / number of predicted tokens) over
the windows, in batches of --eval-batch, every position of each window but the first predicted.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

T_START = time.perf_counter()

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

# Transformers 5 keeps Mixtral's experts as fused 3-D tensors (gate_up_proj, down_proj), which are not nn.Linear;
# llm-compressor 0.14 splits them into one Linear per projection and expert ("linearize") before it can prune them.
EXPERT_TARGETS = r"re:.*\.experts\.\d+\.(gate_proj|up_proj|down_proj)$"


def expert_linears(model):
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(f".experts.{i}." in n + "." for i in range(4096))
            and n.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")}


def sparsity(modules) -> float:
    zero = sum(int((m.weight == 0).sum()) for m in modules.values())
    total = sum(m.weight.numel() for m in modules.values())
    return zero / max(total, 1)


def other_linear_sparsity(model, experts) -> float:
    rest = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in experts}
    return sparsity(rest)


@torch.no_grad()
def token_nll(model, windows, batch_size):
    """(sum of NLL, number of predicted tokens, NLL sum of each window)."""
    total, count, per_window = 0.0, 0, []
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size]
        logits = model(input_ids=ids).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        per_window += nll.view(ids.shape[0], -1).sum(1).tolist()
        total += nll.sum().item()
        count += ids[:, 1:].numel()
    return total, count, per_window


def recipe(method: str, pattern: str):
    nm = ":" in pattern
    frac = int(pattern.split(":")[0]) / int(pattern.split(":")[1]) if nm else float(pattern)
    structure = pattern if nm else "0:0"
    if method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(sparsity=frac, mask_structure=structure, targets=[EXPERT_TARGETS])
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return SparseGPTModifier(sparsity=frac, mask_structure=structure, targets=[EXPERT_TARGETS],
                                 block_size=128, dampening_frac=0.01)
    if method == "magnitude":
        from llmcompressor.modifiers.pruning import MagnitudePruningModifier

        # a schedule-driven (training) modifier: oneshot applies it at start=0 with init = final sparsity
        return MagnitudePruningModifier(targets=[EXPERT_TARGETS], init_sparsity=frac, final_sparsity=frac,
                                        mask_structure="unstructured" if not nm else pattern,
                                        start=0, end=1)
    raise ValueError(method)


def magnitude_lifecycle(model, modifier):
    """llm-compressor's MagnitudePruningModifier is a training-time modifier: under ``oneshot`` it computes its masks
    but applies them to the weights only at an optimiser step, so oneshot's output stays dense (expert sparsity 0.0,
    checked). This drives the peer's own lifecycle as its training integration does, with zero optimiser steps:
    initialize (masks from |W| at start=0), one batch start, one optimiser pre- and post-step (the post-step applies the masks to the
    weights), finalize."""
    from llmcompressor.core import active_session, callbacks

    session = active_session()
    session.reset()
    session.initialize(model=model, recipe=[modifier], start=0, steps_per_epoch=1, batches_per_step=1)
    callbacks.batch_start(global_step=0)
    callbacks.optim_pre_step(global_step=0)  # masks the gradients (there are none)
    callbacks.optim_post_step(global_step=0)  # masks the weights
    callbacks.batch_end(global_step=0)
    session.finalize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", required=True, help="safetensors with calib_ids (N, L) and eval_ids (W, L)")
    ap.add_argument("--method", required=True, choices=["dense", "magnitude", "wanda", "sparsegpt"])
    ap.add_argument("--pattern", default="0.5", help="unstructured fraction or N:M")
    ap.add_argument("--out", required=True)
    ap.add_argument("--save", help="also save the pruned model here (as a user of oneshot does)")
    ap.add_argument("--calib-batch", type=int, default=8)
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--routed", action="store_true",
                    help="moe_calibrate_all_experts=False: each expert calibrated on its routed tokens only "
                         "(llm-compressor's default sends every token through every expert)")
    ap.add_argument("--pipeline", default=None, help="oneshot pipeline (default: llm-compressor's own choice)")
    a = ap.parse_args()

    t = {"import_torch": time.perf_counter() - T_START}
    t0 = time.perf_counter()
    from transformers import AutoModelForCausalLM

    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import load_quantizable_moe
    t["import_peer"] = time.perf_counter() - t0

    toks = load_file(a.tokens)
    calib, windows = toks["calib_ids"].long(), toks["eval_ids"].long()

    t0 = time.perf_counter()
    with load_quantizable_moe(AutoModelForCausalLM):
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.eval()
    t["load"] = time.perf_counter() - t0

    experts = expert_linears(model)
    result = {"method": a.method, "pattern": a.pattern, "expert_linears": len(experts),
              "linearized": len(experts) > 0, "moe_calibrate_all_experts": not a.routed}
    if a.method != "dense":
        from datasets import Dataset

        ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
        kwargs = dict(model=model, dataset=ds, recipe=recipe(a.method, a.pattern),
                      num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
                      shuffle_calibration_samples=False, batch_size=a.calib_batch,
                      moe_calibrate_all_experts=not a.routed)
        if a.pipeline:
            kwargs["pipeline"] = a.pipeline
        t0 = time.perf_counter()
        if a.method == "magnitude":
            magnitude_lifecycle(model, recipe(a.method, a.pattern))
            result["magnitude_via"] = "training lifecycle, zero optimiser steps (oneshot leaves it dense)"
        else:
            model = oneshot(**kwargs) or model
        t["oneshot"] = time.perf_counter() - t0
        model.eval()
        experts = expert_linears(model)
        result["expert_linears"] = len(experts)
    result["expert_sparsity"] = sparsity(experts)
    result["other_linear_sparsity"] = other_linear_sparsity(model, experts)

    if a.save:
        t0 = time.perf_counter()
        model.save_pretrained(a.save)
        t["save"] = time.perf_counter() - t0
        saved = {}
        for f in sorted(Path(a.save).glob("*.safetensors")):
            saved.update(load_file(str(f)))
        ex = {k: v for k, v in saved.items() if ".experts." in k and v.dim() == 2 and k.endswith("weight")}
        if ex:
            result["saved_expert_sparsity"] = sum(int((v == 0).sum()) for v in ex.values()) / sum(v.numel() for v in ex.values())
        result["saved_expert_tensors"] = len(ex)
        result["saved_keys_sample"] = sorted(saved)[:4]

    t0 = time.perf_counter()
    total, count, per_window = token_nll(model, windows, a.eval_batch)
    t["eval"] = time.perf_counter() - t0
    result.update(token_ppl=math.exp(total / count), nll_sum=total, tokens_predicted=count, window_nll=per_window,
                  windows=int(windows.shape[0]), seconds=t, wall_in_process=time.perf_counter() - T_START,
                  self_maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  threads=torch.get_num_threads())
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("method", "pattern", "token_ppl", "expert_sparsity")}))


if __name__ == "__main__":
    main()
