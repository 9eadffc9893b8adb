"""What a run builds, from params.yaml: every model of the sweep as a ``Variant``, in the report's order.

The workflow asks this for its final targets and the report for its rows, so both see the same models.
"""
from __future__ import annotations

from .variant import Variant, base_name, calib_id
from .weights.pattern import Pattern


class Sweep:
    def __init__(self, config: dict):
        self.config = config
        self.model = config["model"]["name"]
        self.cid = calib_id(config["calib"], config["seed"])
        self.calib_sets = {self.cid: config["calib"]}  # every calibration set the run uses, by its id
        task = config["experts"].get("task") or {}
        self.task = task if task.get("source") else None  # task-specific expert pruning
        self.task_cid = None
        if self.task:
            calib = {**config["calib"], "source": self.task["source"]}
            self.task_cid = calib_id(calib, config["seed"])
            self.calib_sets[self.task_cid] = calib
        self.task_eval = (self.task.get("eval") or self.task["source"]) if self.task else None
        self.tunes = ["kd", "ce"] if config["distill"]["ce_control"] else ["kd"]

    def whole(self, base: str, skip: bool = False) -> Variant:
        return Variant(self.model, base, skip=skip)

    def base_cid(self, base: str) -> str:
        """The calibration set an expert-pruned base was searched on."""
        return self.task_cid if base.endswith("-task") else self.cid

    # -- expert pruning and skipping -----------------------------------------------------------------------
    def expert_bases(self) -> list[str]:
        """Every expert-pruned model the run builds and evaluates."""
        ex = self.config["experts"]
        out = [base_name(m, k) for m in ex["methods"] for k in ex["keep"]]
        if self.task:
            out += [base_name(m, k, task=True) for m in self.task["methods"] for k in self.task["keep"]]
        return out

    def skip_bases(self) -> list[str]:
        return list(self.config["skipping"]["bases"])

    def whole_models(self) -> list[Variant]:
        """The unpruned model, every expert-pruned one and every skipping one, each once."""
        bases = dict.fromkeys(["full"] + self.expert_bases())
        return [self.whole(b) for b in bases] + [self.whole(b, skip=True) for b in dict.fromkeys(self.skip_bases())]

    def task_models(self) -> list[Variant]:
        """Models whose perplexity on the task domain the report compares: dense, and task-agnostic against
        task-specific expert pruning of the same method and kept count."""
        if not self.task:
            return []
        bases = ["full"] + [base_name(m, k, t) for m in self.task["methods"] for k in self.task["keep"] for t in (False, True)]
        return [self.whole(b) for b in dict.fromkeys(bases)]

    # -- weight pruning and distillation ---------------------------------------------------------------------
    def _weights(self, bases, props, methods, sparsities) -> list[Variant]:
        return [Variant(self.model, b, calib=self.cid, prop=p, method=m, sp=Pattern.parse(s).token)
                for b in bases for p in props for m in methods for s in sparsities]

    def weight_variants(self) -> list[Variant]:
        """The weight-pruning sweep: bases x propagations x methods x sparsities."""
        p = self.config["prune"]
        return self._weights(p["bases"], p["propagation"], p["methods"], p["sparsities"])

    def distilled(self) -> list[Variant]:
        """The weight-pruned variants the run distills (each evaluated before and after)."""
        d = self.config["distill"]
        return self._weights(d["bases"], d["propagation"], d["methods"], d["sparsities"])

    def tuned(self) -> list[Variant]:
        return [v.replace(tune=t) for v in self.distilled() for t in self.tunes]

    # -- everything evaluated ----------------------------------------------------------------------------------
    def summary_models(self) -> list[Variant]:
        """Every model of the summary, once, dense first: whole models, weight-pruned ones, distilled ones."""
        return list(dict.fromkeys(self.whole_models() + self.weight_variants() + self.distilled() + self.tuned()))

    def evaluations(self) -> list[tuple[Variant, str]]:
        """(model, data set) of every perplexity evaluation: 'ppl' for every model, 'task_ppl' on the domain."""
        return [(v, "ppl") for v in self.summary_models()] + [(v, "task_ppl") for v in self.task_models()]
