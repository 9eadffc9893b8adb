"""Warm start (pruning/warm_start.py): a job handed to the warm server runs in a forked child exactly as it would
in its own process (cwd, environment, argv, stdio, exit status, thread count), dies with its client, and the
server goes when its owner goes. That the workflow's artifacts are the same bytes warm and cold is checked by
tests/test_workflow.py::test_a_second_clean_run_is_byte_identical (the first run warm, the second cold)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = '''
from pruning.warm_start import handoff
handoff()
import json, os, sys, time
import torch
print(json.dumps({"pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv, "flag": os.environ.get("FLAG"),
                  "threads": torch.get_num_threads(), "child": os.environ.get("PRUNING_WARM_CHILD")}), flush=True)
print("to stderr", file=sys.stderr, flush=True)
mode = os.environ.get("MODE")
if mode == "raise":
    raise ValueError("a job failed")
if mode == "sleep":
    open(os.environ["PIDFILE"], "w").write(str(os.getpid()))
    time.sleep(120)
sys.exit(int(os.environ.get("CODE", "0")))
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(cond, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture()
def warm(tmp_path):
    """A socket path owned by a sleeping process (the stand-in for Snakemake), and the script to run."""
    owner = subprocess.Popen(["sleep", "600"])
    sock = Path("/tmp") / f"pruning-warm-test-{os.getpid()}-{owner.pid}" / "s.sock"
    (tmp_path / "job.py").write_text(SCRIPT)
    env = {**os.environ, "PRUNING_WARM_SOCKET": str(sock), "PRUNING_WARM_OWNER": str(owner.pid), "FLAG": "on",
           "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    env.pop("PRUNING_WARM_CHILD", None)
    yield tmp_path, sock, env, owner
    owner.kill()
    owner.wait()
    _wait(lambda: not sock.exists(), 10)


def _run(tmp_path, env, **extra):
    return subprocess.Popen([sys.executable, str(tmp_path / "job.py"), "arg1"], cwd=tmp_path, env={**env, **extra},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _first_cold_then_warm(tmp_path, sock, env):
    """The first job runs cold and starts the server; once it listens, jobs run warm."""
    p = _run(tmp_path, env)
    out, _ = p.communicate(timeout=120)
    first = __import__("json").loads(out.splitlines()[0])
    assert first["pid"] == p.pid and first["child"] is None  # cold: in its own process
    assert _wait(sock.exists, 120), "the warm server never listened"


def test_without_the_socket_the_job_runs_in_its_own_process(tmp_path):
    (tmp_path / "job.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRUNING_WARM")}
    p = subprocess.run([sys.executable, str(tmp_path / "job.py")], cwd=tmp_path, capture_output=True, text=True,
                       env={**env, "PYTHONPATH": str(ROOT), "CODE": "4"}, timeout=120)
    assert p.returncode == 4
    assert "to stderr" in p.stderr


def test_a_warm_job_is_the_job(warm):
    import json

    tmp_path, sock, env, _ = warm
    _first_cold_then_warm(tmp_path, sock, env)
    p = _run(tmp_path, env, CODE="3", FLAG="job's own")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 3, err
    got = json.loads(out.splitlines()[0])
    assert got["pid"] != p.pid and got["child"] == "1"  # ran in the forked child
    assert got["cwd"] == str(tmp_path) and got["argv"][1:] == ["arg1"] and got["argv"][0].endswith("job.py")
    assert got["flag"] == "job's own"  # the client's environment, not the server's
    assert got["threads"] == 2  # OMP_NUM_THREADS, as in a cold process
    assert "to stderr" in err  # the client's stderr

    p = _run(tmp_path, env, MODE="raise")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "ValueError: a job failed" in err


def test_killing_the_client_kills_the_job(warm):
    tmp_path, sock, env, _ = warm
    _first_cold_then_warm(tmp_path, sock, env)
    pidfile = tmp_path / "pid"
    p = _run(tmp_path, env, MODE="sleep", PIDFILE=str(pidfile))
    assert _wait(pidfile.exists, 60)
    child = int(pidfile.read_text())
    assert child != p.pid and _alive(child)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert _wait(lambda: not _alive(child), 10), "the job outlived its client"


def test_the_server_leaves_with_its_owner(warm):
    tmp_path, sock, env, owner = warm
    _first_cold_then_warm(tmp_path, sock, env)
    owner.kill()
    owner.wait()
    assert _wait(lambda: not sock.exists() and not Path(str(sock) + ".lock").exists(), 10)
