"""Text sources and the token windows cut from them, for training, calibration and evaluation.

Sources: ``builtin`` (the stdlib corpus splits), ``builtin:<package>`` (the part of the built-in corpus whose files
lie under one standard-library package, e.g. ``builtin:encodings``, per split: task-specific calibration and its
evaluation), a local text/JSONL file, or ``c4`` / ``wikitext2`` through ``datasets`` when the hub can be reached
(the Wanda protocol).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from .corpus import read_docs
from .source_check import ALLOWED, HUB_SOURCES, domain_of  # noqa: F401 (domain_of: part of this module's API)


def tokenize_docs(tokenizer, texts: list[str]) -> torch.Tensor:
    """Documents joined by the EOS token into one 1-D stream."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: torch.Tensor, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens at seeded random offsets: (n, seqlen)."""
    if stream.numel() <= seqlen:
        raise ValueError(f"token stream of {stream.numel()} tokens is shorter than seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen, (n,), generator=g)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def windows(stream: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping fixed-length windows (the tail shorter than seqlen is dropped): (n, seqlen).

    With ``max_windows`` below the number of windows, that many are taken evenly spaced over the whole
    stream (deterministic), so a capped evaluation still covers every part of the split.
    """
    n = stream.numel() // seqlen
    all_windows = stream[: n * seqlen].reshape(n, seqlen)
    if max_windows and max_windows < n:
        return all_windows[torch.linspace(0, n - 1, max_windows).round().long()]
    return all_windows


def _hub_text(name: str, split: str) -> list[str]:
    from datasets import load_dataset

    if name == "wikitext2":
        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        return ["\n\n".join(ds["text"])]
    if name == "c4":
        files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
        ds = load_dataset("allenai/c4", data_files={split: files[split]}, split=split)
        return list(ds["text"])
    raise ValueError(name)


def _domain_docs(pkg: str, source: str, split: str, corpus_dir) -> list[str]:
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


def docs(source: str, split: str, corpus_dir=None) -> list[str]:
    """Documents of ``split`` (train/validation/test) for a data source."""
    pkg = domain_of(source)
    if pkg is not None:
        return _domain_docs(pkg, source, split, corpus_dir)
    if source == "builtin":
        return read_docs(Path(corpus_dir) / f"{split}.jsonl")
    if source in ("c4", "wikitext2"):
        hub_split = {"validation": "validation", "test": "test" if source == "wikitext2" else "validation"}.get(split, split)
        return _hub_text(source, hub_split)
    p = Path(source)
    if p.is_file():
        try:
            out = read_docs(p) if p.suffix == ".jsonl" else [p.read_text(encoding="utf-8")]
        except UnicodeDecodeError as exc:
            raise ValueError(f"{source}: not UTF-8 text (invalid byte at offset {exc.start})") from None
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{source}: not JSONL with a \"text\" string on every line") from None
        if not any(d.strip() for d in out):
            raise ValueError(f"{source}: holds no text")
        return out
    raise ValueError(f"unknown data source {source!r}: {ALLOWED}")


def _too_short(source: str, split: str, n: int, seqlen: int, need: int) -> ValueError:
    what = f"{split} split of {source}" if domain_of(source) is not None or source in HUB_SOURCES + ("builtin",) else source
    return ValueError(f"{what}: {n} tokens, fewer than one sample needs ({need} tokens for seqlen={seqlen})")


def eval_windows(tokenizer, source: str, split: str, seqlen: int, max_windows: int | None = None, corpus_dir=None) -> torch.Tensor:
    """``windows`` of a data source's ``split``, failing with one line naming the source when its text is shorter
    than one window."""
    stream = tokenize_docs(tokenizer, docs(source, split, corpus_dir))
    if stream.numel() < seqlen:
        raise _too_short(source, split, stream.numel(), seqlen, seqlen)
    return windows(stream, seqlen, max_windows)


def calibration_tokens(tokenizer, source, nsamples, seqlen, seed, corpus_dir=None) -> torch.Tensor:
    """(nsamples, seqlen) calibration windows. c4 follows Wanda: random document longer than seqlen,
    then a random window inside it; other sources draw windows from the joined training stream."""
    train = docs(source, "train", corpus_dir)
    if source != "c4":
        stream = tokenize_docs(tokenizer, train)
        if stream.numel() <= seqlen:  # a window and the token after it
            raise _too_short(source, "train", stream.numel(), seqlen, seqlen + 1)
        return random_windows(stream, nsamples, seqlen, seed)
    rng = random.Random(seed)
    out = []
    while len(out) < nsamples:
        ids = tokenizer(train[rng.randint(0, len(train) - 1)], add_special_tokens=False)["input_ids"]
        if len(ids) > seqlen:
            s = rng.randint(0, len(ids) - seqlen - 1)
            out.append(torch.tensor(ids[s : s + seqlen]))
    return torch.stack(out)
