"""lm-eval on an in-memory model against a naive per-document computation; the local tasks' construction."""
import json
import math
import re

import pytest
import torch

from conftest import ROOT, make_tiny_mixtral
from pruning.data import lm_tasks
from pruning.eval import lm_harness as harness

DOCS = [
    "import os\nimport sys\n\ndef main(argv):\n    path = os.path.join(argv[0], 'x')\n    return path\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def norm(self):\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n",
    "for item in sorted(values):\n    total = total + item\n    print('running total', total)\nresult = total / len(values)\n",
]


def test_next_line_items_hand_example():
    items = lm_tasks.next_line_items(DOCS, 3, seed=0, context_lines=3, num_choices=3, min_chars=12)
    assert len(items) == 3 and items == sorted(items, key=lambda it: (it["doc"], it["line"]))
    for it in items:
        lines = DOCS[it["doc"]].split("\n")
        answer = lines[it["line"]]
        assert it["choices"][it["label"]] == answer and len(it["choices"]) == 3 and len(set(it["choices"])) == 3
        assert it["context"] == "\n".join(lines[max(0, it["line"] - 3) : it["line"]])
        assert sum(1 for x in it["context"].split("\n") if x.strip()) >= 2 and len(answer.strip()) >= 12
        for j, c in enumerate(it["choices"]):
            if j != it["label"]:  # distractors: lines of the other documents
                assert any(c in d.split("\n") for k, d in enumerate(DOCS) if k != it["doc"])
                assert c not in lines
    # seeded: the same inputs give the same items, another seed other ones
    assert lm_tasks.next_line_items(DOCS, 3, 0, 3, 3) == items
    assert lm_tasks.next_line_items(DOCS, 3, 1, 3, 3) != items
    with pytest.raises(ValueError, match="only"):
        lm_tasks.next_line_items(DOCS, 100, 0, 3, 3)


def test_rolling_docs_evenly_spaced():
    docs = [f"doc {i}" for i in range(10)]
    assert [d["doc"] for d in lm_tasks.rolling_docs(docs, 4)] == [0, 3, 6, 9]
    assert [d["doc"] for d in lm_tasks.rolling_docs(docs, None)] == list(range(10))
    assert lm_tasks.rolling_docs(docs, 1) == [{"doc": 0, "text": "doc 0"}]


def test_resolve_tasks_and_fewshot_groups():
    assert harness.resolve_tasks("auto", builtin=True) == ["code_next_line", "code_rolling"]
    assert harness.resolve_tasks("auto", builtin=False) == harness.PAPER_TASKS and len(harness.PAPER_TASKS) == 9
    assert harness.resolve_tasks(["piqa"], builtin=True) == ["piqa"]
    assert harness.fewshot_groups(["a", "mmlu", "b"], {"mmlu": 5}) == {0: ["a", "b"], 5: ["mmlu"]}
    assert harness.fewshot_groups(["a", "b"], 2) == {2: ["a", "b"]}


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from pruning.models.tiny import train_tokenizer

    tok = train_tokenizer(DOCS * 4, 300)
    model = make_tiny_mixtral(seed=3, vocab=len(tok))
    return model, tok


@torch.no_grad()
def _logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, one plain forward of the whole sequence."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_lm_eval_matches_naive_scoring(model_and_tokenizer, tmp_path, monkeypatch):
    """acc / acc_norm of the multiple-choice task and the word/byte perplexity of the rolling task, from lm-eval,
    equal a per-document loop over the same model: each choice's summed log-probability after its context
    (argmax; acc_norm divides by the choice's length in characters), and each document's log-likelihood
    after the prefix token, summed over documents and divided by words (whitespace split) or bytes."""
    model, tok = model_and_tokenizer
    items = lm_tasks.next_line_items(DOCS, 6, seed=0, context_lines=3, num_choices=3)
    rolling = lm_tasks.rolling_docs(DOCS)
    (tmp_path / "data/lm_eval").mkdir(parents=True)
    for name, rows in (("code_next_line", items), ("code_rolling", rolling)):
        (tmp_path / f"data/lm_eval/{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)  # the task YAMLs name their data files relative to the working directory
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    out = harness.evaluate(model, tok, ["code_next_line", "code_rolling"], task_dir=ROOT / "workflow/lm_eval_tasks",
                           batch_size=4, max_length=128, bootstrap_iters=0)

    hits, hits_norm = [], []
    for it in items:
        ctx = tok(it["context"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in it["choices"]:
            whole = tok(it["context"] + "\n" + choice, add_special_tokens=False)["input_ids"]
            assert whole[: len(ctx)] == ctx
            scores.append(_logprobs(model, whole)[len(ctx) - 1 :].sum().item())
        hits.append(max(range(len(scores)), key=lambda j: scores[j]) == it["label"])
        norm = [s / len(c) for s, c in zip(scores, it["choices"])]
        hits_norm.append(max(range(len(norm)), key=lambda j: norm[j]) == it["label"])
    mc = out["tasks"]["code_next_line"]
    assert mc["samples"] == len(items) and mc["version"] == 1.0 and mc["num_fewshot"] == 0
    assert mc["acc"] == pytest.approx(sum(hits) / len(hits)) and mc["acc_norm"] == pytest.approx(sum(hits_norm) / len(hits))

    ll, words, nbytes = 0.0, 0, 0
    for d in rolling:
        ids = [tok.bos_token_id] + tok(d["text"], add_special_tokens=False)["input_ids"]
        assert len(ids) <= 128  # one window: the whole document after the prefix token
        ll += _logprobs(model, ids).sum().item()
        words += len(re.split(r"\s+", d["text"]))
        nbytes += len(d["text"].encode("utf-8"))
    roll = out["tasks"]["code_rolling"]
    assert roll["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-5)
    assert roll["byte_perplexity"] == pytest.approx(math.exp(-ll / nbytes), rel=1e-5)
    assert roll["bits_per_byte"] == pytest.approx(-ll / nbytes / math.log(2), rel=1e-5)
    assert out["lm_eval_version"] == "0.4.13" and out["versions"]["code_rolling"] == 1.0
    json.dumps(out)  # JSON-safe


def test_hub_task_offline_fails_with_one_clear_message(model_and_tokenizer, tmp_path, monkeypatch):
    """Offline, with no cached data set, a hub task fails naming lm_eval.tasks and the local alternative."""
    model, tok = model_and_tokenizer
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    with pytest.raises(RuntimeError, match=r"lm_eval.tasks \['piqa'\].*local tasks: lm_eval.tasks: \['code_next_line', 'code_rolling'\]"):
        harness.evaluate(model, tok, ["piqa"], batch_size=2, max_length=64, bootstrap_iters=0)
