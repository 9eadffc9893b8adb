"""The lock-file device pool, with simulated devices (no CUDA needed)."""
import multiprocessing as mp
import os
import signal
import time

import pytest

from pruning.gpu_pool import claim_device


def _hold(pool, devices, q, hold_s):
    with claim_device(pool, devices, timeout=30, poll=0.05) as kind:
        q.put((os.getpid(), kind, os.environ.get("CUDA_VISIBLE_DEVICES")))
        time.sleep(hold_s)


def test_concurrent_jobs_get_distinct_devices(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    devices = ["0", "1", "2", "3"]
    procs = [ctx.Process(target=_hold, args=(tmp_path, devices, q, 1.0)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [q.get(timeout=20) for _ in procs]
    for p in procs:
        p.join()
    assert {g[1] for g in got} == {"cuda"}
    assert sorted(g[2] for g in got) == devices  # eight jobs, eight GPUs: here four and four


def test_job_waits_for_a_free_device_and_killed_job_releases(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    holder = ctx.Process(target=_hold, args=(tmp_path, ["7"], q, 60))
    holder.start()
    assert q.get(timeout=20)[2] == "7"
    with pytest.raises(TimeoutError):
        with claim_device(tmp_path, ["7"], timeout=0.3, poll=0.05):
            pass
    os.kill(holder.pid, signal.SIGKILL)  # a killed job must not leak its device
    holder.join()
    with claim_device(tmp_path, ["7"], timeout=5, poll=0.05) as kind:
        assert kind == "cuda" and os.environ["CUDA_VISIBLE_DEVICES"] == "7"


def test_no_devices_means_cpu_and_env_restored(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    with claim_device(tmp_path, []) as kind:
        assert kind == "cpu"
    with claim_device(tmp_path, ["6"]) as kind:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,6"
