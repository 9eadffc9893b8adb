"""Data sources as params.yaml names them, checked when the workflow loads, before any job runs: one line naming
the params key and what is allowed. Nothing here imports torch or builds anything (no tokenizer may exist yet: the
builtin model's is trained by the pipeline), so a sample's length is bounded by the bytes of text; the jobs check
tokens (``sources.calibration_tokens``, ``sources.eval_windows``)."""
from __future__ import annotations

import json
from pathlib import Path

HUB_SOURCES = ("c4", "wikitext2")
ALLOWED = "builtin, builtin:<package> (a standard-library package), c4, wikitext2, or a local .txt/.jsonl file"
CHECK_BYTES = 16 << 20  # a local file is checked whole up to this size, by its first part beyond


def domain_of(source: str) -> str | None:
    """The standard-library package of a ``builtin:<package>`` source, else None."""
    return source.split(":", 1)[1] if source.startswith("builtin:") else None


class SourceError(ValueError):
    pass


def _max_tokens(text_bytes: int, n_docs: int) -> int:
    """An upper bound on the tokens a text makes in ``tokenize_docs`` with any tokenizer that has no more tokens
    than bytes plus one per document (byte-level BPE; SentencePiece's prefix space), plus each document's EOS."""
    return text_bytes + 2 * n_docs


def _builtin_domain(key: str, source: str, split: str, corpus: dict) -> tuple[int, int]:
    """(text bytes, documents) of a ``builtin:<package>`` source's split, from the standard library the corpus
    job reads (the same files and split assignment, without building anything; an upper bound under
    ``corpus.max_files``)."""
    from .corpus import EXCLUDED_DIRS, list_files, split_of, stdlib_root

    pkg, root = domain_of(source), stdlib_root()
    # the package's files alone are listed (the whole library takes a second): with corpus.max_files the corpus
    # holds a subset of them, so what is missing or too short here is missing or too short there
    files = [f"{pkg}/{f}" for f in list_files(root / pkg)] if pkg and (root / pkg).is_dir() and pkg not in EXCLUDED_DIRS else []
    if not pkg or not files:
        import difflib

        if pkg and (root / pkg).is_dir():
            raise SourceError(f"{key}: {source!r}: the built-in corpus holds no files of {pkg}/; allowed: {ALLOWED}")
        pkgs = sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "__init__.py").is_file())
        near = difflib.get_close_matches(pkg or "", pkgs, n=1)
        hint = f" (did you mean 'builtin:{near[0]}'?)" if near else ""
        raise SourceError(f"{key}: {source!r} names no standard-library package{hint}; allowed: {ALLOWED}")
    files = [f for f in files if split_of(f, corpus.get("val_frac", 0.05), corpus.get("test_frac", 0.05)) == split]
    texts = [t for t in ((root / f).read_text(encoding="utf-8", errors="replace") for f in files) if t.strip()]
    if not texts:
        raise SourceError(f"{key}: {source!r}: no {split} files under {pkg}/ in the built-in corpus; "
                          f"allowed: a package with {split} files, or {ALLOWED}")
    return sum(len(t.encode()) for t in texts), len(texts)


def _local_file(key: str, source: str) -> tuple[int, int] | None:
    """(text bytes, documents) of a local text or JSONL file, or None when it is too large to count cheaply
    (its first ``CHECK_BYTES`` are checked then)."""
    import codecs
    import difflib

    p = Path(source)
    if not p.exists():
        near = difflib.get_close_matches(source, ["builtin", *HUB_SOURCES], n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SourceError(f"{key}: {source!r} is neither a data set name nor an existing file{hint}; allowed: {ALLOWED}")
    if not p.is_file():
        raise SourceError(f"{key}: {source} is not a file; allowed: {ALLOWED}")
    size = p.stat().st_size
    if size == 0:
        raise SourceError(f"{key}: {source} is empty; allowed: {ALLOWED}")
    with open(p, "rb") as f:
        raw = f.read(CHECK_BYTES)
    whole = size <= CHECK_BYTES
    if b"\0" in raw:
        raise SourceError(f"{key}: {source} is not text (binary: it holds NUL bytes); allowed: {ALLOWED}")
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(raw, final=whole)
    except UnicodeDecodeError as exc:
        raise SourceError(f"{key}: {source} is not UTF-8 text (invalid byte at offset {exc.start}); allowed: {ALLOWED}") from None
    if p.suffix != ".jsonl":
        return (len(text.encode()), 1) if whole else None
    lines = text.split("\n")
    if not whole:
        lines = lines[:-1]  # the last line may go on past the part read
    n_bytes = n_docs = 0
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError:
            raise SourceError(f"{key}: {source} line {i} is not JSON; allowed: JSONL with a \"text\" string per line") from None
        if not isinstance(d, dict) or not isinstance(d.get("text"), str):
            raise SourceError(f"{key}: {source} line {i} has no \"text\" string; allowed: JSONL with a \"text\" "
                              f"string per line")
        n_bytes, n_docs = n_bytes + len(d["text"].encode()), n_docs + 1
    if whole and not n_docs:
        raise SourceError(f"{key}: {source} holds no documents; allowed: JSONL with a \"text\" string per line")
    return (n_bytes, n_docs) if whole else None


def check_source(key: str, source: str, split: str, seqlen: int, seqlen_key: str, *, windows_need: int | None = None,
                 corpus: dict | None = None) -> None:
    """A data source as params.yaml names it, checked at workflow load: one of the allowed forms, a standard-library
    package that has ``split`` files in the built-in corpus, or a local file that is UTF-8 text (JSONL: a "text"
    string per line) holding more than one sample: ``windows_need`` tokens (calibration: ``seqlen`` + 1, evaluation:
    ``seqlen``), by a bound on tokens per byte, as no tokenizer may exist yet. ``builtin``, c4 and wikitext2 are
    taken as they are (the hub is not asked). Raises ``SourceError`` naming ``key``."""
    need = seqlen + 1 if windows_need is None else windows_need
    if source == "builtin" or source in HUB_SOURCES:
        return
    if source.startswith("builtin:"):
        counted = _builtin_domain(key, source, split, corpus or {})
    else:
        counted = _local_file(key, source)
    if counted is not None and _max_tokens(*counted) < need:
        what = f"the {split} files of {source!r}" if source.startswith("builtin:") else source
        raise SourceError(f"{key}: {what} hold {counted[0]} bytes of text, fewer than one sample of {seqlen_key}={seqlen} "
                          f"tokens needs; allowed: a text longer than one sample, or {ALLOWED}")
