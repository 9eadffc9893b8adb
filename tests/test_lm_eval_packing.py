"""Context packing of lm-eval's loglikelihood requests (pruning.eval.lm_harness._PackedHFLM) against lm-eval's own
HFLM on the same model and the same token requests: the same sums (1e-4), the same is_greedy, in the same order,
with the same cache-hook calls; the fallback when a model ignores the mask; evaluate() with packing on and off."""
import collections
import json
import logging
import random
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_tiny_mixtral
from families import FAMILIES, make_model, tiny_tokenizer
from pruning.data import lm_tasks
from pruning.eval import lm_harness as harness

MAX_LEN = 64
BATCH = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread (several only contend, slowly, on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _model(name):
    if name == "mixtral-eager":  # the additive-mask path
        m = make_tiny_mixtral(seed=1, vocab=300)
        m.config._attn_implementation = "eager"
        return m
    return make_model(name, seed=1)


class _Hook:
    """Records lm-eval cache-hook calls."""

    def __init__(self):
        self.calls = []

    def add_partial(self, attr, req, res):
        self.calls.append((attr, req, res))


@torch.no_grad()
def _greedy(model, ctx, n):
    ids = list(ctx)
    for _ in range(n):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(ctx):]


def _requests(model, seed=0, vocab=300):
    """Multiple-choice-like token requests: shared contexts of several lengths with continuations of several
    lengths (one greedy, so is_greedy is sometimes true; a duplicated request), one-token choices only, a lone
    request, and a context near max_length: one continuation truncated (lm-eval's left truncation) and a pack
    too long for max_length (split in two); shuffled."""
    rng = random.Random(seed)

    def toks(n):
        return [rng.randrange(1, vocab) for _ in range(n)]

    groups = []
    for ctx_len in (3, 9, 20, 33):
        ctx = toks(ctx_len)
        conts = [toks(n) for n in (1, 2, 5, 11)] + [_greedy(model, ctx, 4), _greedy(model, ctx, 1)]
        groups.append((ctx, conts))
    groups.append((toks(12), [toks(1) for _ in range(4)]))     # one-token choices only: the pack is the context
    groups.append((toks(7), [toks(6)]))                        # a lone continuation: HFLM's own path
    ctx = toks(MAX_LEN - 4)
    groups.append((ctx, [toks(3), toks(5), _greedy(model, ctx, 2), toks(8)]))  # toks(8): 56 + 8 > 65, truncated
    reqs = []
    for g, (ctx, conts) in enumerate(groups):
        for j, cont in enumerate(conts):
            reqs.append(((f"ctx{g}", f"cont{j}"), ctx, cont))
    reqs.append(reqs[2])  # an identical request twice
    rng.shuffle(reqs)
    return reqs


def _count_tokens(model):
    n = [0]

    def pre(_mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        n[0] += ids.numel()

    return n, model.register_forward_pre_hook(pre, with_kwargs=True)


@pytest.mark.parametrize("family", ["mixtral-eager", *FAMILIES])
def test_packed_equals_lm_eval(family, tok):
    from lm_eval.models.huggingface import HFLM

    model = _model(family)
    reqs = _requests(model)
    ref_lm = HFLM(pretrained=model, tokenizer=tok, batch_size=BATCH, max_length=MAX_LEN)
    ref_lm.cache_hook = ref_hook = _Hook()
    ref = ref_lm._loglikelihood_tokens(reqs, disable_tqdm=True)

    lm = harness.make_lm(model, tok, batch_size=BATCH, max_length=MAX_LEN)
    lm.cache_hook = hook = _Hook()
    packs, rest = lm._plan(reqs)
    lone = [i for i, r in enumerate(reqs) if r[0][0] == "ctx5"]
    truncated = [i for i, r in enumerate(reqs) if len(r[1]) + len(r[2]) > MAX_LEN + 1]
    assert packs and len(truncated) == 1 and set(lone + truncated) <= set(rest)
    if family == "gpt_oss":  # sliding window of 8 tokens: only requests of <= 9 tokens are packed
        assert all(len(ctx) + len(c) - 1 <= 8 for ctx, conts in packs for c, _ in conts)
    else:
        assert len(list(lm._batches(packs))) >= 2  # several batches of packs: a batch boundary
        assert sum(len(ctx) == MAX_LEN - 4 for ctx, _ in packs) >= 2  # over max_length: split

    got = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert lm.packing_check == "passed"
    assert len(got) == len(ref) == len(reqs)
    assert any(g for _, g in ref) and not all(g for _, g in ref)  # is_greedy both ways in the reference
    for (s, g), (s_ref, g_ref), r in zip(got, ref, reqs, strict=True):  # same order: request by request
        assert s == pytest.approx(s_ref, abs=1e-4), r[0]
        assert g == g_ref, r[0]
    # one cache-hook call per request, with the answer returned for it (the check's reference run adds none)
    assert collections.Counter(c[:2] for c in hook.calls) == collections.Counter(c[:2] for c in ref_hook.calls)
    answers = {r[0]: a for r, a in zip(reqs, got)}
    assert all(res == answers[req] for _, req, res in hook.calls)

    # once checked, a second call packs without the reference run, through fewer tokens than lm-eval feeds
    n_ref, h = _count_tokens(model)
    ref_lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    h.remove()
    n_packed, h = _count_tokens(model)
    again = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    h.remove()
    assert [g for _, g in again] == [g for _, g in got]  # batches differ from the first call's (no check cut)
    assert [s for s, _ in again] == pytest.approx([s for s, _ in ref], abs=1e-4)
    if family != "gpt_oss":  # its sliding window (8 tokens) leaves most requests to HFLM
        assert n_packed[0] < 0.8 * n_ref[0]


def test_sliding_window_requests_go_to_lm_eval(tok):
    """A request longer than the sliding window is never packed (the custom mask replaces the model's own)."""
    model = make_tiny_mixtral(seed=2, vocab=300)
    model.config.sliding_window = 10
    reqs = _requests(model)
    lm = harness.make_lm(model, tok, batch_size=BATCH, max_length=MAX_LEN)
    packs, rest = lm._plan(reqs)
    assert packs and all(len(ctx) + len(cont) - 1 <= 10 for ctx, conts in packs for cont, _ in conts)
    assert all(len(reqs[i][1]) + len(reqs[i][2]) - 1 > 10 or reqs[i][0][0] == "ctx5" for i in rest)
    from lm_eval.models.huggingface import HFLM

    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=BATCH, max_length=MAX_LEN)._loglikelihood_tokens(reqs)
    got = lm._loglikelihood_tokens(reqs)
    assert lm.packing_check == "passed"
    for (s, g), (s_ref, g_ref) in zip(got, ref, strict=True):
        assert s == pytest.approx(s_ref, abs=1e-4) and g == g_ref


def _mask_ignoring_mixtral(kind):
    from transformers import MixtralForCausalLM

    class Ignoring(MixtralForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kw):
            if attention_mask is not None and attention_mask.dim() == 4:
                if kind == "raise":
                    raise TypeError("this family takes no 4D mask")
                attention_mask = position_ids = None  # ignored: plain causal attention over the pack
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)

    base = make_tiny_mixtral(seed=4, vocab=300)
    model = Ignoring(base.config).eval()
    model.load_state_dict(base.state_dict())
    return model


@pytest.mark.parametrize("kind", ["ignore", "raise"])
def test_self_check_falls_back_for_the_whole_run(kind, tok, caplog):
    from lm_eval.models.huggingface import HFLM

    model = _mask_ignoring_mixtral(kind)
    reqs = _requests(model)
    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=BATCH, max_length=MAX_LEN)._loglikelihood_tokens(reqs)
    lm = harness.make_lm(model, tok, batch_size=BATCH, max_length=MAX_LEN)
    lm.cache_hook = hook = _Hook()
    with caplog.at_level(logging.WARNING, logger="pruning.eval.lm_harness"):
        got = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert got == ref  # lm-eval's own scoring, bit for bit
    assert lm.packing_check.startswith("failed") and "self-check failed" in caplog.text
    assert sorted(c[1] for c in hook.calls) == sorted(r[0] for r in reqs)
    n, h = _count_tokens(model)
    assert lm._loglikelihood_tokens(reqs, disable_tqdm=True) == ref and n[0] > 0  # later calls: HFLM too
    h.remove()
    plain = harness.make_lm(model, tok, batch_size=BATCH, max_length=MAX_LEN, packing=False)
    assert plain._loglikelihood_tokens(reqs, disable_tqdm=True) == ref and plain.packing_check is None


def _docs():
    import asyncio

    files = sorted(Path(asyncio.__file__).parent.glob("*.py"))[:8]
    return [f.read_text(encoding="utf-8")[:3000] for f in files]


def test_evaluate_packing_on_off_same_metrics(tok, tmp_path, monkeypatch):
    """End to end on local task files: the same acc / acc_norm (identical) and stderr, the same perplexities."""
    docs = _docs()
    items = lm_tasks.next_line_items(docs, 40, seed=0, context_lines=3, num_choices=4)
    rolling = lm_tasks.rolling_docs(docs, 3)
    (tmp_path / "data/lm_eval").mkdir(parents=True)
    for name, rows in (("code_next_line", items), ("code_rolling", rolling)):
        (tmp_path / f"data/lm_eval/{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    model = make_tiny_mixtral(seed=5, vocab=300)
    kw = dict(task_dir=ROOT / "workflow/lm_eval_tasks", batch_size=4, max_length=128, bootstrap_iters=50)
    on = harness.evaluate(model, tok, ["code_next_line", "code_rolling"], **kw)
    off = harness.evaluate(model, tok, ["code_next_line", "code_rolling"], packing=False, **kw)
    assert on["loglikelihood_packing"] == {"enabled": True, "self_check": "passed"}
    assert off["loglikelihood_packing"] == {"enabled": False, "self_check": "off"}
    mc_on, mc_off = on["tasks"]["code_next_line"], off["tasks"]["code_next_line"]
    assert mc_on["samples"] == len(items) == 40
    for m in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert mc_on[m] == mc_off[m], m
    assert 0 < mc_on["acc"] < 1
    assert on["tasks"]["code_rolling"] == off["tasks"]["code_rolling"]  # rolling requests: lm-eval's path both ways
