"""The built-in offline corpus: the installed Python standard library's source files.

Files are listed in sorted relative-path order and assigned to a split by a hash of that path, so the
split of a file never depends on which other files exist.
"""
from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from pathlib import Path

from ..atomic import sha256_file, write_json, write_text

SPLITS = ("train", "validation", "test")
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(root: Path, max_files: int | None = None) -> list[str]:
    rels = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if p.is_file() and not (set(p.relative_to(root).parts[:-1]) & EXCLUDED_DIRS)
    )
    return rels[:max_files] if max_files else rels


def split_of(relpath: str, val_frac: float, test_frac: float) -> str:
    u = int(hashlib.sha256(relpath.encode()).hexdigest()[:12], 16) / 16**12
    if u < test_frac:
        return "test"
    if u < test_frac + val_frac:
        return "validation"
    return "train"


def build(out_dir, val_frac=0.05, test_frac=0.05, max_files=None, root=None) -> dict:
    """Write ``{split}.jsonl`` ({"path", "text"} per line) and ``manifest.json`` (file lists + sha256)."""
    root = Path(root) if root else stdlib_root()
    out_dir = Path(out_dir)
    docs = {s: [] for s in SPLITS}
    for rel in list_files(root, max_files):
        text = (root / rel).read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs[split_of(rel, val_frac, test_frac)].append({"path": rel, "text": text})
    manifest = {
        "source": "python-stdlib",
        "python": sys.version.split()[0],
        "root": str(root),
        "val_frac": val_frac,
        "test_frac": test_frac,
        "splits": {},
    }
    for s in SPLITS:
        path = out_dir / f"{s}.jsonl"
        write_text(path, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs[s]))
        manifest["splits"][s] = {
            "files": [d["path"] for d in docs[s]],
            "n_files": len(docs[s]),
            "bytes": sum(len(d["text"].encode()) for d in docs[s]),
            "sha256": sha256_file(path),
        }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def read_docs(path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]
