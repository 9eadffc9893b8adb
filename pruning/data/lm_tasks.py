"""Offline lm-eval tasks built from a held-out split (never the training split).

* ``next_line`` (multiple choice): a few lines of a held-out file as context; the choices are the true next
  line and ``num_choices - 1`` lines drawn from *other* held-out files. Chance accuracy is ``1 / num_choices``.
* ``rolling`` (loglikelihood_rolling): whole held-out documents, scored by lm-eval's rolling-window
  log-likelihood; lm-eval reports *word* perplexity (whitespace words), byte perplexity and bits per byte.

Everything is a pure function of the documents and a seed: the same split gives the same JSONL bytes.
"""
from __future__ import annotations

import random


def next_line_items(docs: list[str], n: int, seed: int, context_lines: int = 6, num_choices: int = 4,
                    min_chars: int = 12, max_chars: int = 100) -> list[dict]:
    """``n`` multiple-choice items ``{"doc", "line", "context", "choices", "label"}`` from ``docs``.

    A candidate answer is a line of ``min_chars`` to ``max_chars`` non-blank characters (every choice fits a short
    evaluation window) with at least two non-blank lines among the ``context_lines`` before it. Items are drawn
    uniformly over all candidates (seeded) and kept in document order; distractors are distinct candidate-length lines of other documents (indentation
    included, so a model that knows Python's block structure gains from it, as a real model would).
    """
    lines = [d.split("\n") for d in docs]
    candidates = []  # (doc, line)
    pool: list[tuple[int, str]] = []  # (doc, line) of every line long enough to be a choice
    for di, ls in enumerate(lines):
        for li, line in enumerate(ls):
            if not min_chars <= len(line.strip()) <= max_chars:
                continue
            pool.append((di, line))
            if sum(1 for x in ls[max(0, li - context_lines) : li] if x.strip()) >= 2:
                candidates.append((di, li))
    rng = random.Random(seed)
    order = rng.sample(range(len(candidates)), len(candidates))
    items = []
    for k in order:
        di, li = candidates[k]
        answer = lines[di][li]
        choices: list[str] = []
        for _ in range(100 * num_choices):  # distinct lines of other documents, none equal to the answer
            dj, line = pool[rng.randrange(len(pool))]
            if dj != di and line.strip() != answer.strip() and line not in choices:
                choices.append(line)
                if len(choices) == num_choices - 1:
                    break
        if len(choices) < num_choices - 1:
            continue
        label = rng.randrange(num_choices)
        choices.insert(label, answer)
        items.append({"doc": di, "line": li, "context": "\n".join(lines[di][max(0, li - context_lines) : li]),
                      "choices": choices, "label": label})
        if len(items) == n:
            break
    if len(items) < n:
        raise ValueError(f"next_line: only {len(items)} items can be built from {len(docs)} documents, {n} asked")
    return sorted(items, key=lambda it: (it["doc"], it["line"]))


def rolling_docs(docs: list[str], max_docs: int | None = None) -> list[dict]:
    """``{"doc", "text"}`` per document; with ``max_docs`` below the count, that many evenly spaced."""
    idx = list(range(len(docs)))
    if max_docs and max_docs < len(docs):
        idx = sorted({round(i * (len(docs) - 1) / (max_docs - 1)) for i in range(max_docs)}) if max_docs > 1 else [0]
    return [{"doc": i, "text": docs[i]} for i in idx]
