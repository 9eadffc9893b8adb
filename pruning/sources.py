"""Data sources with domain splits: ``builtin:<package>`` is the part of the built-in corpus whose files lie
under one standard-library package (e.g. ``builtin:encodings``), per split, for task-specific calibration and
its evaluation. Every other source is handled by ``pruning.data``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import data


def domain_of(source: str) -> str | None:
    return source.split(":", 1)[1] if source.startswith("builtin:") else None


def docs(source: str, split: str, corpus_dir=None) -> list[str]:
    pkg = domain_of(source)
    if pkg is None:
        return data.source_docs(source, split, corpus_dir)
    out = []
    with open(Path(corpus_dir) / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                if d["path"].startswith(pkg + "/"):
                    out.append(d["text"])
    if not out:
        raise ValueError(f"data source {source!r}: no {split} files under {pkg}/ in the built-in corpus")
    return out


def calibration_tokens(tokenizer, source, nsamples, seqlen, seed, corpus_dir=None) -> torch.Tensor:
    if domain_of(source) is None:
        return data.calibration_tokens(tokenizer, source, nsamples, seqlen, seed, corpus_dir)
    return data.random_windows(data.tokenize_docs(tokenizer, docs(source, "train", corpus_dir)), nsamples, seqlen, seed)
