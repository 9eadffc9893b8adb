"""Zero-shot evaluation of an in-memory model with lm-evaluation-harness (pinned in pyproject.toml).

The model object is handed to ``HFLM`` as is (dense, pruned, expert-pruned, skipping or distilled), with the
tokenizer object (no hub lookup) and an explicit ``max_length``. What comes back is reduced to the figures
the report needs, plus lm-eval's own per-task versions, few-shot counts and sample counts; wall-clock fields
are left out so the same model and settings give the same bytes.

Multiple-choice scoring is packed (``packing=True``, the default): lm-eval's ``HFLM`` scores every (context,
continuation) request as its own sequence, so a context shared by k choices goes through the model k times.
``_PackedHFLM`` scores each context once, followed by all its continuations, under a block-causal 4D attention
mask (a continuation sees the context and, causally, itself, never the other continuations) with position ids
restarting after the context for each continuation: the same log-probabilities as lm-eval's, from fewer tokens.
Whatever does not fit (rolling windows, a lone continuation, truncation at max_length, seq2seq, attention
implementations that take no dense 4D mask) is scored by ``HFLM`` itself; the first packed batch of a run (cut to
about ``batch_size`` requests) is scored both ways and, should they disagree, the whole run falls back to ``HFLM``
with a warning.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# The nine zero-shot tasks of the Wanda / MoE-Pruner tables (lm-eval 0.4 names).
PAPER_TASKS = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "mmlu", "openbookqa", "piqa", "rte", "winogrande"]
# Offline tasks over the held-out split (workflow/lm_eval_tasks/), with their chance accuracy.
LOCAL_TASKS = {"code_next_line": {"kind": "multiple_choice"}, "code_rolling": {"kind": "rolling"}}
METRICS = ("acc", "acc_norm", "word_perplexity", "byte_perplexity", "bits_per_byte")


def resolve_tasks(tasks, builtin: bool) -> list[str]:
    """``auto``: the local tasks for the embedded model (no data sets can be downloaded), else the papers' nine."""
    if tasks == "auto":
        return list(LOCAL_TASKS) if builtin else list(PAPER_TASKS)
    return list(tasks)


def fewshot_groups(tasks: list[str], num_fewshot) -> dict[int, list[str]]:
    """Tasks grouped by their few-shot count (``num_fewshot``: one int, or ``{task: n}`` with 0 elsewhere)."""
    out: dict[int, list[str]] = {}
    for t in tasks:
        n = num_fewshot.get(t, 0) if isinstance(num_fewshot, dict) else int(num_fewshot)
        out.setdefault(n, []).append(t)
    return out


def summarize(results: dict, tasks: list[str]) -> dict:
    """Per requested task: acc / acc_norm / perplexities (with stderr where lm-eval computed one), the task's
    version, few-shot count and number of scored documents."""
    out = {}
    res, versions = results["results"], results.get("versions", {})
    for t in tasks:
        r = res[t]
        row = {}
        for m in METRICS:
            if f"{m},none" in r:
                row[m] = float(r[f"{m},none"])
                se = r.get(f"{m}_stderr,none")
                if isinstance(se, (int, float)):
                    row[f"{m}_stderr"] = float(se)
        n = results.get("n-samples", {}).get(t, {})
        row.update({"version": versions.get(t), "num_fewshot": results.get("n-shot", {}).get(t),
                    "samples": n.get("effective") if isinstance(n, dict) else None})
        out[t] = row
    return out


# Reduced-precision models score the same tokens with rounding of their own at every layer; a mask that is ignored
# changes a continuation's log-probability by far more than these.
_CHECK_RTOL = 1e-4                # float32 / float64: relative, on each request's summed log-probability
_CHECK_RTOL_REDUCED = 2e-2        # float16 / bfloat16 weights or autocast
_CHECK_GREEDY_SLACK_REDUCED = 0.05  # share of is_greedy flips tolerated in reduced precision (argmax near-ties)


def make_lm(model, tokenizer, *, batch_size=8, max_length=2048, packing=True):
    """``_PackedHFLM`` over the in-memory ``model``; with ``packing=False`` every call is ``HFLM``'s own."""
    cls = _packed_hflm_class()
    return cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, packing=packing)


def _plen(pack) -> int:
    """Tokens of a pack: its context, then every continuation but its last token."""
    return len(pack[0]) + sum(len(c) - 1 for c, _ in pack[1])


@functools.cache
def _packed_hflm_class():
    """``_PackedHFLM`` (built on first use: importing lm-eval takes seconds)."""
    import torch
    import torch.nn.functional as F
    from lm_eval.api.model import CacheHook
    from lm_eval.models.huggingface import HFLM
    from tqdm import tqdm

    class _PackedHFLM(HFLM):
        """``HFLM`` whose ``_loglikelihood_tokens`` scores requests sharing their context tokens in one sequence.

        Per request, lm-eval feeds ``(context + continuation)[-(max_length + 1):][:-1]`` and sums the log-softmax
        of the continuation tokens at the last ``len(continuation)`` positions; ``is_greedy`` is whether the
        argmax there is the continuation. A pack here is ``context + cont_1[:-1] + cont_2[:-1] + ...``: the first
        token of every continuation is predicted at the context's last position, token j >= 1 of ``cont_i`` at
        ``cont_i[j - 1]``, which sits at position ``len(context) + j - 1`` and attends to the context and to
        ``cont_i[:j]`` only -- exactly the inputs lm-eval's own sequence gives it. Packed only when no request
        of the pack would be truncated (``len(context) + len(cont) <= max_length + 1``), the context has two or
        more distinct continuations, the pack holds at most ``max_length`` tokens (else it is split) and no
        sliding window could bite; the rest goes to ``HFLM._loglikelihood_tokens`` unchanged."""

        def __init__(self, *args, packing: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self.packing = bool(packing)
            # None: no packed batch scored yet; then "passed", or why the run went back to HFLM's own scoring
            self.packing_check: str | None = None

        # -- planning ----------------------------------------------------------------------------------------------
        def _mask_kind(self):
            impl = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
            return {"sdpa": "bool", "eager": "additive"}.get(impl)

        def _sliding_window(self):
            cfg = self.model.config
            window = getattr(cfg, "sliding_window", None)
            if window is None or getattr(cfg, "use_sliding_window", True) is False:
                return None
            return int(window)

        def _plan(self, requests):
            """(packs, rest): packs as (context, [(continuation, [request indices])]) in ``max_length`` pieces,
            rest the indices HFLM scores."""
            window = self._sliding_window()
            groups: dict[tuple, dict[tuple, list[int]]] = {}
            rest = []
            for i, (_, ctx, cont) in enumerate(requests):
                n = len(ctx) + len(cont)
                if not ctx or not cont or n > self.max_length + 1 or (window is not None and n - 1 > window):
                    rest.append(i)
                else:
                    groups.setdefault(tuple(ctx), {}).setdefault(tuple(cont), []).append(i)
            packs = []
            for ctx, conts in groups.items():
                if len(conts) < 2:
                    rest.extend(i for idx in conts.values() for i in idx)
                    continue
                piece, length = [], len(ctx)
                for cont, idx in conts.items():
                    if piece and length + len(cont) - 1 > self.max_length:
                        packs.append((ctx, piece))
                        piece, length = [], len(ctx)
                    piece.append((cont, idx))
                    length += len(cont) - 1
                packs.append((ctx, piece))
            return packs, sorted(rest)

        def _batches(self, packs):
            """Batches of packs, longest first (as lm-eval orders its requests: any OOM comes at once); a batch
            holds at most ``batch_size`` rows and no more tokens than ``batch_size`` of lm-eval's inputs of its
            longest request's length."""
            def ulen(p):  # the longest input lm-eval would build for one of the pack's requests
                return len(p[0]) + max(len(c) for c, _ in p[1]) - 1

            packs = sorted(packs, key=lambda p: (-_plen(p), p[0], tuple(c for c, _ in p[1])))
            bs = int(self.batch_size)
            batch, width, longest = [], 0, 0
            for p in packs:
                w, u = max(width, _plen(p)), max(longest, ulen(p))
                if batch and (len(batch) + 1 > bs or (len(batch) + 1) * w > bs * u):
                    yield batch
                    batch, w, u = [], _plen(p), ulen(p)
                batch.append(p)
                width, longest = w, u
            if batch:
                yield batch

        def _keeps_logits(self) -> bool:
            """Whether the model's forward takes ``logits_to_keep`` (the last n positions' logits only)."""
            try:
                return "logits_to_keep" in inspect.signature(self.model.forward).parameters
            except (TypeError, ValueError):
                return False

        # -- scoring -----------------------------------------------------------------------------------------------
        def _score_packed(self, batch):
            """{request index: (log-prob, is_greedy)} for one batch of packs, one forward.

            Rows are right-padded; every scored logit lies at or after column ``min(len(context)) - 1``, so
            where the model takes ``logits_to_keep`` its LM head only runs from there."""
            rows, width = len(batch), max(_plen(p) for p in batch)
            first = min(len(ctx) for ctx, _ in batch) - 1  # the first column whose logits are scored
            ids = torch.zeros(rows, width, dtype=torch.long)
            pos = torch.zeros(rows, width, dtype=torch.long)
            seg = torch.full((rows, width), -1, dtype=torch.long)  # 0 context, i + 1 continuation i, -1 padding
            where = []  # (row, columns - first of the logits predicting the continuation, continuation, indices)
            for r, (ctx, conts) in enumerate(batch):
                n = len(ctx)
                ids[r, :n] = torch.tensor(ctx, dtype=torch.long)
                pos[r, :n] = torch.arange(n)
                seg[r, :n] = 0
                at = n
                for i, (cont, idx) in enumerate(conts):
                    k = len(cont) - 1
                    ids[r, at : at + k] = torch.tensor(cont[:-1], dtype=torch.long)
                    pos[r, at : at + k] = torch.arange(n, n + k)
                    seg[r, at : at + k] = i + 1
                    where.append((r, [n - 1 - first] + list(range(at - first, at + k - first)), cont, idx))
                    at += k
            q, k = seg[:, :, None], seg[:, None, :]
            allowed = (k == 0) | (k == q)
            allowed &= torch.ones(width, width, dtype=torch.bool).tril()
            allowed &= q != -1
            allowed |= torch.eye(width, dtype=torch.bool) & (q == -1)  # padding sees itself: no empty rows
            allowed = allowed[:, None]  # [rows, 1, width, width]
            if self._mask_kind() == "additive":
                dtype = self.model.dtype
                mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
            else:
                mask = allowed
            dev, keep = self.device, width - first
            kw = {"logits_to_keep": keep} if self._keeps_logits() else {}
            with (
                torch.no_grad(),
                torch.autocast(device_type=dev.type, dtype=self.mixed_precision_dtype,
                               enabled=self.mixed_precision_dtype is not None),
            ):
                logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                                    use_cache=False, **kw).logits
            if tuple(logits.shape[:2]) == (rows, width):
                logits = logits[:, first:]
            if tuple(logits.shape[:2]) != (rows, keep):  # e.g. virtual prefix tokens: not what the mask assumed
                raise RuntimeError(f"logits of shape {tuple(logits.shape)} for inputs of shape {(rows, width)}")
            row_idx = torch.tensor([r for r, at, _, _ in where for _ in at], device=logits.device)
            col_idx = torch.tensor([a for _, at, _, _ in where for a in at], device=logits.device)
            target = torch.tensor([t for _, _, cont, _ in where for t in cont], device=logits.device)
            logp = F.log_softmax(logits[row_idx, col_idx], dim=-1, dtype=self.softmax_dtype)  # [tokens, vocab]
            greedy = (logp.argmax(dim=-1) == target).tolist()
            picked = logp.gather(1, target[:, None])[:, 0]
            out, at = {}, 0
            for _, _, cont, idx in where:
                n = len(cont)
                answer = (float(picked[at : at + n].sum()), bool(all(greedy[at : at + n])))
                at += n
                for i in idx:
                    out[i] = answer
            return out

        def _agrees(self, packed, reference) -> bool:
            reduced = self.model.dtype in (torch.float16, torch.bfloat16) or self.mixed_precision_dtype is not None
            rtol = _CHECK_RTOL_REDUCED if reduced else _CHECK_RTOL
            flips = 0
            for (a, ga), (b, gb) in zip(packed, reference, strict=True):
                if not abs(a - b) <= rtol * max(1.0, abs(b)):
                    return False
                flips += ga != gb
            return flips <= (_CHECK_GREEDY_SLACK_REDUCED * len(packed) if reduced else 0)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            if (not self.packing or self.packing_check not in (None, "passed") or self.backend != "causal"
                    or not isinstance(self.batch_size, int) or self._mask_kind() is None or override_bs is not None
                    or any(req[0] is None for req in requests)):  # rolling windows: lm-eval's own path
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            packs, rest = self._plan(requests)
            if not packs:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm)
            batches = list(self._batches(packs))
            res: list = [None] * len(requests)
            done: dict[int, tuple[float, bool]] = {}
            if self.packing_check is None:  # the run's first packed batch, also scored lm-eval's way
                first = batches.pop(0)
                # ... cut to about batch_size requests, one forward of lm-eval's (the rest is a batch of its own)
                sizes = [sum(len(idx) for _, idx in conts) for _, conts in first]
                cut = 1
                while cut < len(first) and sum(sizes[: cut + 1]) <= int(self.batch_size):
                    cut += 1
                if cut < len(first):
                    batches.insert(0, first[cut:])
                    first = first[:cut]
                order = sorted(i for _, conts in first for _, idx in conts for i in idx)
                hook, self.cache_hook = self.cache_hook, CacheHook(None)
                try:
                    reference = super()._loglikelihood_tokens([requests[i] for i in order], disable_tqdm=True)
                finally:
                    self.cache_hook = hook
                try:
                    got = self._score_packed(first)
                    ok = self._agrees([got[i] for i in order], reference)
                    why = "packed and unpacked log-likelihoods differ"
                except Exception as exc:  # a family whose forward takes no 4D mask / position ids
                    ok, why = False, f"{type(exc).__name__}: {exc}"
                if not ok:
                    self.packing_check = f"failed ({why}); scored by lm-eval's HFLM"
                    log.warning("loglikelihood packing self-check failed for %s (%s): this run scores every request "
                                "with lm-eval's HFLM", type(self.model).__name__, why)
                    return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm)
                self.packing_check = "passed"
                log.info("loglikelihood packing self-check passed on %d requests", len(order))
                done.update(got)
            if rest:  # lone continuations, truncated requests: HFLM's own scoring (and its cache hook)
                for i, answer in zip(rest, super()._loglikelihood_tokens([requests[i] for i in rest],
                                                                         disable_tqdm=disable_tqdm), strict=True):
                    res[i] = answer
            pbar = tqdm(total=len(requests) - len(rest), disable=(disable_tqdm or (self.rank != 0)),
                        desc="Running packed loglikelihood requests")
            pbar.update(len(done))
            for batch in batches:
                got = self._score_packed(batch)
                done.update(got)
                pbar.update(len(got))
            pbar.close()
            for i, answer in done.items():
                res[i] = answer
                self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            assert all(r is not None for r in res)
            return res

    return _PackedHFLM


def evaluate(model, tokenizer, tasks: list[str], *, task_dir=None, num_fewshot=0, limit=None, batch_size=8,
             max_length=2048, bootstrap_iters=1000, seed=1234, packing=True) -> dict:
    """Run lm-eval on ``model``; returns ``{"tasks": summarize(...), "lm_eval_version", "results",
    "versions", "n-shot", "n-samples", "higher_is_better", "loglikelihood_packing"}`` (no samples, no timings).
    ``packing``: score the continuations of a shared context in one sequence (``_PackedHFLM``); the outcome of
    its self-check is ``loglikelihood_packing``."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    lm = make_lm(model, tokenizer, batch_size=batch_size, max_length=max_length, packing=packing)
    needs_defaults = any(t not in LOCAL_TASKS for t in tasks)
    tm = TaskManager(include_path=str(Path(task_dir).resolve()) if task_dir else None, include_defaults=needs_defaults)
    merged: dict = {"results": {}, "versions": {}, "n-shot": {}, "n-samples": {}, "higher_is_better": {}}
    for n, group in fewshot_groups(tasks, num_fewshot).items():
        try:
            res = lm_eval.simple_evaluate(
                model=lm, tasks=group, num_fewshot=n, task_manager=tm, limit=limit, bootstrap_iters=bootstrap_iters,
                log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except Exception as exc:  # unknown task names, or data sets neither reachable nor cached
            hub = [t for t in group if t not in LOCAL_TASKS]
            if not hub:
                raise
            raise RuntimeError(
                f"lm_eval.tasks {hub}: lm-eval could not build these tasks ({type(exc).__name__}: {exc}). Their data "
                f"sets must be reachable or in the HF cache of the same lm-eval and datasets versions; offline, use "
                f"the local tasks: lm_eval.tasks: {list(LOCAL_TASKS)}") from exc
        for key in merged:
            merged[key].update(res.get(key) or {})
    # JSON-safe (lm-eval leaves numpy scalars and the odd non-serialisable object in its results)
    merged = json.loads(json.dumps(merged, default=handle_non_serializable))
    packed = {"enabled": lm.packing,
              "self_check": lm.packing_check or ("not run (nothing to pack)" if lm.packing else "off")}
    return {"tasks": summarize(merged, tasks), "lm_eval_version": lm_eval.__version__, **merged,
            "loglikelihood_packing": packed}
