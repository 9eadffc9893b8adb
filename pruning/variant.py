"""The identity of every model the pipeline builds or evaluates, and the one place its spellings are made.

A ``Variant`` names a model by what made it:

    model   params ``model.name``: everything lives under results/<model>/
    base    ``full`` (the checkpoint) or an expert-pruned model ``<expert method>-k<keep>[-task]``
    skip    dynamic skipping calibrated on the base (whole models only)
    calib   the calibration set weight pruning used (``calib_id``: what determines it)
    prop    ``dense`` | ``sequential`` propagation of the calibration pass
    method  the weight-pruning method (``pruning.methods.WEIGHT_METHODS``)
    sp      the weight pattern's path token (``pruning.weights.pattern``: '0.5', '2of4')
    tune    ``kd`` | ``ce``: fine-tuned after pruning (``pruning.methods.TUNES``)

and has one function each for its directory (``dir``, and ``file`` for what is in it), its label and its metric
key. Its ``path`` is its directory below results/<model>/; its ``id``, the name the summary lists it by, is the
same without the calibration set:

    path                                        id
    full                                        full                           the checkpoint
    naee-k6, naee-k4-task, naee-k6/skip         (the same)                     expert-pruned, on the task set, skipping
    full/<calib>/dense/moe_pruner/0.5           full/dense/moe_pruner/0.5      weight-pruned (on any base)
    full/<calib>/dense/moe_pruner/0.5/kd        full/dense/moe_pruner/0.5/kd   ... then distilled

Fields may hold Snakemake wildcards ('{base}'): ``dir`` and ``file`` only join them, so the workflow's path
patterns come from the same functions as the paths the report reads.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from .methods import EXPERT_METHODS, TUNES, WEIGHT_METHODS
from .weights.pattern import Pattern

RESULTS = "results"


def model_root(model: str) -> str:
    """Where everything of one model lives: results/<model>."""
    return f"{RESULTS}/{model}"


# What a model's directory holds, by name (the rules write these files, the report reads them).
FILES = {
    "checkpoint": "checkpoint",            # a standard HF checkpoint (every model but the input one)
    "ppl": "eval/ppl.json",                # token perplexity on the evaluation split, expert usage
    "task_ppl": "eval/task_ppl.json",      # the same on the task domain's test split
    "lm_eval": "eval/lm_eval.json",        # lm-evaluation-harness
    "sparsity": "sparsity.json",           # weight-pruned: achieved sparsity of every matrix
    "block_error": "eval/block_error.json",  # weight-pruned: MoE-block output error per layer
    "reduction": "reduction.json",         # expert-pruned: parameters and bytes removed
    "search": "search.json",               # expert-pruned: the kept experts and their loss per layer
    "betas": "betas.json",                 # skipping: beta per layer
    "distill": "distill.json",             # tuned: the training run
    "history": "history.csv",              # tuned: losses per optimiser step
}


def base_name(method: str, keep: int, task: bool = False) -> str:
    """Name of an expert-pruned base: 'naee-k6', 'naee-k4-task' (searched on the task calibration set)."""
    return f"{method}-k{keep}" + ("-task" if task else "")


def parse_base(base: str) -> tuple[str, int, bool] | None:
    """'naee-k6' -> ('naee', 6, False); 'full' -> None."""
    if base == "full":
        return None
    m = re.fullmatch(r"([a-z_]+)-k(\d+)(-task)?", base)
    if not m:
        raise ValueError(f"{base!r} is not 'full' nor '<expert method>-k<keep>'")
    return m.group(1), int(m.group(2)), bool(m.group(3))


def calib_id(calib: dict, seed: int) -> str:
    """Name of a calibration set: exactly what determines it ('builtin-n64-l256-s0', 'builtin.encodings-...')."""
    src = calib["source"]
    if src.startswith("builtin:"):
        src = "builtin." + src.split(":", 1)[1]
    elif src not in ("builtin", "c4", "wikitext2"):
        src = Path(src).stem + "-" + hashlib.sha256(src.encode()).hexdigest()[:8]
    return f"{src}-n{calib['nsamples']}-l{calib['seqlen']}-s{seed}"


@dataclass(frozen=True)
class Variant:
    model: str
    base: str = "full"
    skip: bool = False
    calib: str | None = None
    prop: str | None = None
    method: str | None = None
    sp: str | None = None
    tune: str | None = None

    # -- identity ------------------------------------------------------------------------------------------
    @classmethod
    def from_path(cls, model: str, path: str) -> "Variant":
        """The variant whose ``path`` is ``path`` ('full', 'naee-k6/skip', 'full/<calib>/dense/moe_pruner/0.5/kd')."""
        parts = path.split("/")
        if len(parts) <= 2:
            if len(parts) == 2 and parts[1] != "skip":
                raise ValueError(f"{path!r}: a whole model is '<base>' or '<base>/skip'")
            return cls(model, parts[0], skip=len(parts) == 2)
        if len(parts) not in (5, 6):
            raise ValueError(f"{path!r}: a weight-pruned model is '<base>/<calib>/<prop>/<method>/<sp>[/<tune>]'")
        return cls(model, parts[0], calib=parts[1], prop=parts[2], method=parts[3], sp=parts[4],
                   tune=parts[5] if len(parts) == 6 else None)

    @property
    def weight_pruned(self) -> bool:
        return self.method is not None

    def _name(self, with_calib: bool) -> str:
        if not self.weight_pruned:
            return self.base + ("/skip" if self.skip else "")
        calib = [self.calib] if with_calib else []
        return "/".join([self.base, *calib, self.prop, self.method, self.sp] + ([self.tune] if self.tune else []))

    @property
    def id(self) -> str:
        """The name the summary lists it by: its path without the calibration set."""
        return self._name(with_calib=False)

    @property
    def pattern(self) -> Pattern:
        return Pattern.parse(self.sp)

    def replace(self, **changes) -> "Variant":
        return dataclasses.replace(self, **changes)

    @property
    def untuned(self) -> "Variant":
        """The weight-pruned model this one was fine-tuned from (itself when not tuned)."""
        return self.replace(tune=None)

    @property
    def whole_base(self) -> "Variant":
        """The whole model the weights were pruned on (itself for a whole model, without skipping)."""
        return Variant(self.model, self.base)

    # -- paths ---------------------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        """Its directory below results/<model>/."""
        return self._name(with_calib=True)

    @property
    def dir(self) -> str:
        return f"{model_root(self.model)}/{self.path}"

    def file(self, name: str) -> str:
        """A file of this model's directory, by its ``FILES`` name ('ppl', 'sparsity', ...)."""
        return f"{self.dir}/{FILES[name]}"

    def checkpoint(self, input_dir: str) -> str:
        """Its checkpoint directory; the unmodified model is the input checkpoint ``input_dir``."""
        return input_dir if self.path == "full" else self.file("checkpoint")

    # -- labels --------------------------------------------------------------------------------------------
    @property
    def base_label(self) -> str:
        """'dense', 'NAEE (layerwise), keep 4', '... (task calibration)', '... + skipping'."""
        parsed = parse_base(self.base)
        if parsed is None:
            label = "dense"
        else:
            method, keep, task = parsed
            em = EXPERT_METHODS.get(method)
            label = f"{em.label if em else method}, keep {keep}" + (" (task calibration)" if task else "")
        return label + (" + skipping" if self.skip else "")

    @property
    def method_label(self) -> str:
        """The weight-pruning method on its base: 'MoE-Pruner', 'MoE-Pruner on NAEE (layerwise), keep 6'."""
        wm = WEIGHT_METHODS.get(self.method)
        return (wm.label if wm else self.method) + ("" if self.base == "full" else f" on {self.whole_base.base_label}")

    @property
    def tune_label(self) -> str | None:
        return TUNES[self.tune] if self.tune else None

    def label(self, show_prop: bool = False) -> str:
        """What tables and plots call the model: 'NAEE (layerwise), keep 6 + skipping',
        'MoE-Pruner 50% on NAEE (layerwise), keep 6 (dense) + expert-wise KD'."""
        if not self.weight_pruned:
            return self.base_label
        wm = WEIGHT_METHODS.get(self.method)
        label = f"{wm.label if wm else self.method} {self.pattern.label}"
        if self.base != "full":
            label += f" on {self.whole_base.base_label}"
        if show_prop:
            label += f" ({self.prop})"
        return label + (f" + {self.tune_label}" if self.tune else "")

    # -- metrics -------------------------------------------------------------------------------------------
    @property
    def key(self) -> str:
        """Dot- and slash-free key (DVC flattens nested metrics with '.'), also the name of its run files:
        'full', 'naee-k6_skip', 'full_dense_moe_pruner_sp50', 'full_dense_moe_pruner_sp50_kd'."""
        if not self.weight_pruned:
            return self.path.replace("/", "_")
        key = f"{self.base}_{self.prop}_{self.method}_{self.pattern.metric_key}"
        return key + (f"_{self.tune}" if self.tune else "")
