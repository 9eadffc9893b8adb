"""Warm start: run a workflow job in a process forked from a warm interpreter instead of a cold one.

A cold job process spends 3-5 s importing torch, transformers and (for lm-eval) lm_eval and datasets before it
computes anything; on a small model that is most of the job. Under a local Snakemake run, the Snakefile names
a socket in ``$PRUNING_WARM_SOCKET`` (one per Snakemake process). The first job to start launches a server
(``python pruning/warm_start.py``) that imports those third-party packages once, without running a single
tensor operation, and then forks one child per job (jobs that start before it is ready run cold). Every job script calls :func:`handoff` as its first
statement: the job's own process (the client Snakemake started) sends its argv, working directory, environment
and standard file descriptors to the server, and waits; the server forks a child that becomes the job (same
cwd, environment, stdout/stderr, argv, thread count) and runs the script from the top, where ``handoff`` is now
a no-op. The client exits with the child's exit status.

What stays exactly as in a cold process:
- The code: the server forgets this project's modules after reading the adapters' list of families, so every
  job imports the current sources of ``pruning/``; third-party packages are the ones a cold process would import.
- The numbers: each child sets torch's threads from ``OMP_NUM_THREADS`` as a cold process does, and jobs seed
  everything themselves. The server never runs a tensor operation, so no OpenMP pool exists at fork time.
- Killing: when the client dies (a kill of Snakemake's session, Ctrl-C, a job cancelled), the server sees its
  connection close and kills the child's process group, so nothing outlives the job.
- Failure: a child's traceback goes to the job's stderr/log, its exit status to Snakemake.
What differs: Snakemake's benchmark files measure the client, so their ``s`` (wall time) is the job's, but
``max_rss`` and ``cpu_time`` are not; memory benchmarks set ``PRUNING_WARM_START=0``. Without the variable
(SLURM jobs, scripts run by hand, the tests' in-process calls) :func:`handoff` does nothing.

The server exits when the Snakemake process that owns it is gone, or after ``IDLE_S`` seconds without a job
(long: while a long job that started before the server runs, e.g. training, the server must wait for the rest).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import time

SOCKET_ENV = "PRUNING_WARM_SOCKET"  # set by the Snakefile for local runs; unset = cold start
CHILD_ENV = "PRUNING_WARM_CHILD"  # set in a forked job: handoff() is then a no-op
T0_ENV = "PRUNING_JOB_T0"  # when the job's own (client) process started, for the start-up figure
OWNER_ENV = "PRUNING_WARM_OWNER"  # the Snakemake process the server serves: it exits when that one is gone
SWITCH_ENV = "PRUNING_WARM_START"  # 0 = every job starts cold (memory benchmarks: benchmark files then measure the job)
IDLE_S = 3600.0  # a safety net: the server leaves with its owner, and a job may run an hour without the server
# Imported once by the server: what a job's process otherwise spends its start-up on (Snakemake's script preamble
# included), then the modelling module of every supported family (their names from the adapters' registry).
PRELOAD = (
    "snakemake.script", "snakemake.io", "snakemake.iocontainers", "snakemake.logging", "numpy", "torch",
    "safetensors.torch", "tokenizers", "yaml", "tqdm", "transformers", "transformers.modeling_utils",
    "transformers.generation.utils", "transformers.models.auto.modeling_auto", "lm_eval.evaluator",
    "lm_eval.models.huggingface", "lm_eval.tasks",
)


def process_start_time(pid: int | str = "self") -> float:
    """Wall-clock time (epoch seconds) at which process ``pid`` started: its start in clock ticks since boot
    (/proc/<pid>/stat) against the uptime now (/proc/uptime), both to 10 ms."""
    with open(f"/proc/{pid}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


# ---------------------------------------------------------------------------------------------------- client


def enable(owner_pid: int) -> bool:
    """Called by the Snakefile of a local run: name this run's socket in the environment the jobs inherit
    (unless ``$PRUNING_WARM_START`` is 0). Returns whether warm start is on."""
    import secrets
    import tempfile

    if os.environ.get(SWITCH_ENV, "1") == "0":
        os.environ.pop(SOCKET_ENV, None)
        return False
    folder = os.path.join(tempfile.gettempdir(), f"pruning-warm-{os.getuid()}")
    os.environ[OWNER_ENV] = str(owner_pid)
    os.environ[SOCKET_ENV] = os.path.join(folder, f"{owner_pid}-{secrets.token_hex(4)}.sock")
    return True


def handoff() -> None:
    """First statement of every job script: in a warm-start run, have the job run in a forked child of the
    warm server and exit with its status; otherwise (or in that child) return and run here."""
    if os.environ.get(CHILD_ENV) or not os.environ.get(SOCKET_ENV):
        return
    path = os.environ[SOCKET_ENV]
    try:
        os.environ.setdefault(T0_ENV, repr(process_start_time()))
    except OSError:
        pass
    conn = _connect(path)
    if conn is None:  # no server yet: run cold
        return
    request = json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    try:
        socket.send_fds(conn, [struct.pack("!Q", len(request))], [0, 1, 2])
        conn.sendall(request)
        status = _recv_exact(conn, 4)
    except OSError:
        status = b""
    if len(status) != 4:
        sys.stderr.write(f"warm start: the server ({path}) closed the job's connection without a status\n")
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(struct.unpack("!i", status)[0])


def _connect(path: str):
    """A connection to the server at ``path``, or None: then this job runs cold, and the first job to get here
    starts the server in the background (it is ready for the jobs after it; nobody waits for its imports)."""
    import subprocess

    conn = _try_connect(path)
    if conn is not None:
        return conn
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:  # one server per socket path (one per Snakemake run): the first job to claim it starts it
        os.close(os.open(path + ".lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return None
    owner = os.environ.get(OWNER_ENV, str(os.getppid()))
    subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), path, owner], start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k not in (SOCKET_ENV, T0_ENV)},
    )
    return None


def _try_connect(path: str):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return s
    except OSError:
        s.close()
        return None


def _recv_exact(conn, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


# ---------------------------------------------------------------------------------------------------- server


def serve(path: str, owner_pid: int, idle_s: float = IDLE_S) -> None:
    """Import PRELOAD, listen on ``path``, fork a child per job; exit when the owner is gone or idle."""
    import importlib
    import selectors

    _preload(importlib)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    jobs: dict[int, socket.socket] = {}  # child pid -> its client's connection
    last = time.monotonic()
    try:
        while True:
            for key, _ in sel.select(timeout=0.2):
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    pid = _start_job(conn, listener, sel)
                    if pid is None:
                        conn.close()
                        continue
                    jobs[pid] = conn
                    sel.register(conn, selectors.EVENT_READ, pid)
                else:  # the client closed its end (killed): kill the job's process group
                    if key.data in jobs:
                        _kill_group(key.data)
                    sel.unregister(key.fileobj)
            while jobs:  # reap finished children, report their status to their clients
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                conn = jobs.pop(pid, None)
                if conn is None:
                    continue
                code = os.waitstatus_to_exitcode(status)
                try:
                    sel.unregister(conn)
                except (KeyError, ValueError):
                    pass
                try:
                    conn.sendall(struct.pack("!i", code if code >= 0 else 128 - code))
                except OSError:
                    pass
                conn.close()
            if jobs:
                last = time.monotonic()
            elif not _alive(owner_pid) or time.monotonic() - last > idle_s:
                break
    finally:
        for pid in jobs:
            _kill_group(pid)
        for f in (path, path + ".lock"):
            try:
                os.unlink(f)
            except OSError:
                pass


def _preload(importlib) -> None:
    """Import PRELOAD and the supported families' modelling modules; then forget this project's modules, so
    that every job imports the current sources."""
    names = list(PRELOAD)
    try:
        from pruning.models import SUPPORTED_MODEL_TYPES

        names += [f"transformers.models.{t}.modeling_{t}" for t in SUPPORTED_MODEL_TYPES]
    except Exception:  # noqa: BLE001 - the jobs will say what is wrong
        pass
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional package missing: jobs import what they need
            pass
    for name in [m for m in sys.modules if m == "pruning" or m.startswith("pruning.")]:
        del sys.modules[name]


def _start_job(conn, listener, sel) -> int | None:
    """Read one request and fork its child; returns the child's pid (None on a malformed request)."""
    try:
        msg, fds, _, _ = socket.recv_fds(conn, 8, 3)
        if len(msg) != 8 or len(fds) != 3:
            return None
        request = json.loads(_recv_exact(conn, struct.unpack("!Q", msg)[0]))
    except (OSError, ValueError):
        return None
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        return pid
    code = 1
    try:  # the child: become the job
        sel.close()
        listener.close()
        conn.close()
        code = _run_job(request, fds)
    except BaseException:  # noqa: BLE001 - report, then exit with a failure status
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _run_job(request: dict, fds: list[int]) -> int:
    """In the forked child: the client's cwd, environment, stdio, argv and thread count, then the script."""
    import atexit
    import runpy
    import tempfile

    os.setpgid(0, 0)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[CHILD_ENV] = "1"
    tempfile.tempdir = None  # recomputed from this job's TMPDIR
    argv = request["argv"]
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python script.py` would have it
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))
    code = 0
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            sys.stderr.write(f"{exc.code}\n")
    except BaseException:  # noqa: BLE001 - as the interpreter would: traceback on stderr, status 1
        import traceback

        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    return code


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


if __name__ == "__main__":
    del sys.path[0]  # this file's directory: the server imports no project module, jobs import them afresh
    serve(sys.argv[1], int(sys.argv[2]))
