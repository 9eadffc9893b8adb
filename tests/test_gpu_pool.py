"""The lock-file device pool, with simulated devices (no CUDA needed)."""
import fcntl
import json
import logging
import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pruning import jobs
from pruning.gpu_pool import SIMULATED, claim_device, claim_devices, describe_device, log_device, visible_devices

ROOT = Path(__file__).resolve().parents[1]

# A job as the workflow scripts run: torch imported and CUDA touched before the claim.
CHILD = r"""
import json, os, sys
import torch
torch.cuda.is_available()
from pruning.gpu_pool import claim_device
before = os.environ.get("CUDA_VISIBLE_DEVICES")
with claim_device(sys.argv[1], timeout=30, poll=0.05) as device:
    print(json.dumps([device, str(torch.device(device)), before, os.environ.get("CUDA_VISIBLE_DEVICES")]), flush=True)
    sys.stdin.read()  # hold the device until the test closes stdin
"""


@pytest.fixture(autouse=True)
def _no_host_devices(monkeypatch):
    monkeypatch.delenv(SIMULATED, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def _locked(path) -> bool:
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def _hold(pool, devices, n, q, release, timeout=30):
    with claim_devices(n, pool, devices, timeout=timeout, poll=0.05) as got:
        q.put((os.getpid(), got, os.environ.get("CUDA_VISIBLE_DEVICES")))
        release.wait(60)


def _start(target, *args):
    ctx = mp.get_context("fork")
    p = ctx.Process(target=target, args=args)
    p.start()
    return p


def test_processes_that_touched_cuda_get_distinct_explicit_devices(tmp_path):
    env = {**os.environ, SIMULATED: "0,1,2,3", "CUDA_VISIBLE_DEVICES": "0,1,2,3",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        got = [json.loads(p.stdout.readline()) for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
        rcs = [p.wait(30) for p in procs]
    assert rcs == [0, 0, 0, 0]
    assert sorted(g[0] for g in got) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert all(g[1] == g[0] for g in got)  # a valid torch device string
    assert all(g[2] == g[3] == "0,1,2,3" for g in got)  # the claim never touches CUDA_VISIBLE_DEVICES


def test_physical_ids_map_to_positions_and_name_the_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert visible_devices() == ["4", "6"]
    with claim_device(tmp_path, timeout=1, poll=0.05) as a, claim_device(tmp_path, timeout=1, poll=0.05) as b:
        assert (a, b) == ("cuda:0", "cuda:1")
        assert _locked(tmp_path / "gpu4.lock") and _locked(tmp_path / "gpu6.lock")
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,6"
    assert not _locked(tmp_path / "gpu4.lock") and not _locked(tmp_path / "gpu6.lock")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,6"
    monkeypatch.setenv(SIMULATED, "GPU-aa,MIG-GPU-bb/1/0")  # UUIDs; the simulated list wins
    assert visible_devices() == ["GPU-aa", "MIG-GPU-bb/1/0"]
    with claim_devices(2, tmp_path, timeout=1) as got:
        assert got == ["cuda:0", "cuda:1"]
        assert _locked(tmp_path / "gpuGPU-aa.lock") and _locked(tmp_path / "gpuMIG-GPU-bb_1_0.lock")


def test_visible_list_is_cut_like_cuda_cuts_it(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3,-1,5")
    assert visible_devices() == ["2", "3"]
    monkeypatch.setenv(SIMULATED, "1,0")
    assert visible_devices() == ["1", "0"]


def test_two_multi_gpu_jobs_share_four_devices(tmp_path):
    q, release = mp.get_context("fork").Queue(), mp.get_context("fork").Event()
    devices = ["0", "1", "2", "3"]
    procs = [_start(_hold, tmp_path, devices, 2, q, release) for _ in range(2)]
    try:
        got = [q.get(timeout=10) for _ in procs]
    finally:
        release.set()
        for p in procs:
            p.join(10)
    assert [p.exitcode for p in procs] == [0, 0]
    assert all(len(g[1]) == 2 for g in got)
    assert sorted(got[0][1] + got[1][1]) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert all(g[2] is None for g in got)


def test_two_jobs_asking_for_three_of_four_never_deadlock(tmp_path):
    ctx = mp.get_context("fork")
    q, release = ctx.Queue(), ctx.Event()
    devices = ["0", "1", "2", "3"]
    procs = [_start(_hold, tmp_path, devices, 3, q, release, 10) for _ in range(2)]
    try:
        first = q.get(timeout=10)
        with pytest.raises(queue.Empty):  # the other one waits (and retries; it never holds a partial set)
            q.get(timeout=0.5)
        release.set()
        second = q.get(timeout=10)
    finally:
        release.set()
        for p in procs:
            p.join(10)
    assert [p.exitcode for p in procs] == [0, 0]
    assert first[0] != second[0]
    assert len(set(first[1])) == len(set(second[1])) == 3


def test_failed_multi_claim_gives_back_what_it_took(tmp_path):
    devices = ["0", "1", "2", "3"]
    with claim_devices(3, tmp_path, devices, timeout=1) as three:
        with pytest.raises(TimeoutError):
            with claim_devices(2, tmp_path, devices, timeout=0.2, poll=0.05):
                pass
        with claim_device(tmp_path, devices, timeout=0.2, poll=0.05) as last:
            assert last == "cuda:3" and last not in three


def test_job_waits_for_a_free_device_and_killed_job_releases(tmp_path):
    ctx = mp.get_context("fork")
    q, release = ctx.Queue(), ctx.Event()
    holder = _start(_hold, tmp_path, ["7"], 1, q, release)
    assert q.get(timeout=10)[1] == ["cuda:0"]
    with pytest.raises(TimeoutError):
        with claim_device(tmp_path, ["7"], timeout=0.3, poll=0.05):
            pass
    os.kill(holder.pid, signal.SIGKILL)  # a killed job must not leak its device
    holder.join()
    with claim_device(tmp_path, ["7"], timeout=5, poll=0.05) as device:
        assert device == "cuda:0"
        assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_more_gpus_than_visible_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(SIMULATED, "0,1,2,3")
    with pytest.raises(ValueError, match="asks for 5 GPUs but only 4 are visible") as err:
        with claim_devices(5, tmp_path):
            pass
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing was locked


def test_no_devices_means_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_devices() == []
    with claim_device(tmp_path) as device:
        assert device == "cpu"
    monkeypatch.setenv(SIMULATED, "")
    with claim_devices(3, tmp_path) as got:
        assert got == ["cpu"]
    with claim_devices(0, tmp_path, ["0", "1"]) as got:
        assert got == ["cpu"]
    with claim_device(tmp_path, []) as device:
        assert device == "cpu"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "-1"


def test_device_is_described_and_logged(tmp_path, monkeypatch, caplog):
    import torch

    monkeypatch.setenv(SIMULATED, "4,6")
    assert describe_device("cpu") == {"device": "cpu"}
    d = describe_device("cuda:1")
    assert (d["device"], d["index"], d["physical"]) == ("cuda:1", 1, "6")
    if not torch.cuda.is_available():
        assert d["uuid"] is None and d["name"] is None
    env = jobs.environment(["cuda:0", "cuda:1"])
    assert env["device"] == ["cuda:0", "cuda:1"]
    assert [x["physical"] for x in env["devices"]] == ["4", "6"]
    assert jobs.environment("cpu")["devices"] == [{"device": "cpu"}]
    with caplog.at_level(logging.INFO, logger="pruning"):
        log_device(logging.getLogger("pruning"), ["cuda:0", "cuda:1"])
        log_device(logging.getLogger("pruning"), "cpu")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("device cuda:0: index 0, physical 4, uuid ")
    assert lines[1].startswith("device cuda:1: index 1, physical 6, uuid ")
    assert lines[2] == "device cpu"
