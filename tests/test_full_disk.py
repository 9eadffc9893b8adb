"""A full disk, simulated with RLIMIT_FSIZE: the writer fails with one message naming the file, and nothing is
left under the output name nor as a temporary. And safetensors without metadata."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pruning.atomic import save_safetensors

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 64 * 1024  # bytes any one file may grow to

WRITERS = {
    "safetensors": ("w.safetensors", "save_safetensors(out, {'w': torch.ones(256, 256)}, {'method': 'x'})"),
    "json": ("big.json", "write_json(out, {'x': list(range(100_000))})"),
    "checkpoint": ("checkpoint", textwrap.dedent("""\
        with atomic_dir(out) as d:
            write_json(d / 'config.json', {'a': 1})
            save_safetensors(d / 'model.safetensors', {'w': torch.ones(256, 256)})""")),
}


def _run_limited(tmp_path: Path, name: str, body: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent("""\
        import resource, signal, sys
        from pathlib import Path
        import torch
        from pruning.atomic import atomic_dir, save_safetensors, write_json
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        out = Path(sys.argv[1])
        """).format(limit=LIMIT) + body + "\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_full_disk_fails_clearly_and_leaves_nothing(tmp_path, kind):
    name, body = WRITERS[kind]
    r = _run_limited(tmp_path, name, body)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("OSError") and "file too large" in last and str(tmp_path / name) in last, r.stderr
    assert r.stderr.count("Traceback") == 1, r.stderr  # one error, not a chain
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)  # no output, no temporary


def test_under_the_limit_the_same_writers_succeed(tmp_path):
    r = _run_limited(tmp_path, "small.json", "write_json(out, {'x': 1})")
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path) == ["small.json"]


def test_save_safetensors_without_metadata(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    t = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(4, dtype=torch.bfloat16)}
    save_safetensors(tmp_path / "x.safetensors", t)
    save_safetensors(tmp_path / "y.safetensors", t, {})
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == {"a", "b"} and all(torch.equal(back[k], t[k]) for k in t)
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert not f.metadata()
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["x.safetensors", "y.safetensors"]


def test_a_rewrite_removes_what_a_killed_writer_left(tmp_path):
    """Temporaries of a process that no longer runs (SIGKILLed mid-write) go with the next write of that name;
    a live process's stay. Files get the umask's mode, not mkstemp's 0600."""
    from pruning.atomic import atomic_dir, write_json

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".a.json.{dead}.x1.tmp").write_text("{half")
    (tmp_path / f".ck.{dead}.x2.tmp").mkdir()
    (tmp_path / f".ck.{dead}.x3.old").mkdir()
    live = tmp_path / f".a.json.{os.getppid()}.x4.tmp"
    live.write_text("{")
    write_json(tmp_path / "a.json", {"a": 1})
    with atomic_dir(tmp_path / "ck") as d:
        (d / "f").write_text("1")
    with atomic_dir(tmp_path / "ck") as d:  # replaces the first: the old one renamed aside, then removed
        (d / "g").write_text("2")
    assert sorted(os.listdir(tmp_path)) == sorted(["a.json", "ck", live.name])
    assert os.listdir(tmp_path / "ck") == ["g"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
