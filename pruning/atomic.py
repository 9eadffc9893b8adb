"""Atomic artifact writes: every file is written to a temporary sibling and renamed into place.

A run killed at any moment leaves either the previous file or none, never a half-written one; a directory
output appears whole or not at all. Temporary names are hidden siblings, ``.<name>.<pid>.<random>.tmp``: a
later write of the same name removes those left by a killed process (one whose pid no longer runs), so a
restarted job leaves nothing behind. A full disk (ENOSPC, EDQUOT) or a file size limit (EFBIG) ends the write
with one OSError naming the output, and nothing under that name.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_UMASK = os.umask(0)
os.umask(_UMASK)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(path: Path) -> None:
    """Remove the temporaries of ``path`` left by processes that no longer run (killed mid-write)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[^.]+\.(tmp|old)$")
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path.parent):
            m = pattern.match(entry.name)
            if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)


def _full_disk(err: OSError, path: Path) -> OSError:
    what = "no space left" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "file too large (size limit)"
    return OSError(err.errno, f"{what} writing {path}: {err.strerror}; nothing was written under that name")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # the mode a plain open() gives, not mkstemp's 0600
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in _FULL:
            raise _full_disk(err, path) from None
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary directory next to ``path``; it replaces ``path`` if the block succeeds. An existing
    ``path`` is first renamed aside (then removed), so ``path`` is never seen half-deleted either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # the mode a plain mkdir gives, not mkdtemp's 0700
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".old", dir=path.parent))
            os.rmdir(old)  # a unique name reserved, then ``path`` renamed onto it
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in _FULL:
            raise _full_disk(err, path) from None
        raise


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """A safetensors file written atomically, with a canonical header (metadata values that are not strings as
    sorted JSON, keys sorted), so the same tensors and metadata give the same bytes; written one tensor at a
    time (``safetensors_io.write_file``: no bytes copy of the tensors; DTensors gathered as they are written)."""
    from .safetensors_io import write_file

    meta = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        write_file(tmp, tensors, meta)


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
