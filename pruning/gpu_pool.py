"""Give each job that declares ``gpu=1`` its own CUDA device.

Snakemake counts GPUs (``--resources gpu=8``) but never assigns them. A job calls ``claim_device()``
before it touches CUDA: it takes an exclusive ``fcntl`` lock on ``<pool_dir>/gpu<k>.lock`` for the first
free device k and exports ``CUDA_VISIBLE_DEVICES=k``. The lock dies with the process, so a killed job
never leaks a device. Without CUDA the job runs on the CPU.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path


def visible_devices() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


POOL_DIR = ".gpu_pool"  # the lock files, in the working directory the jobs share


@contextlib.contextmanager
def claim_device(pool_dir=POOL_DIR, devices: list[str] | None = None, timeout: float = 3600.0, poll: float = 0.5):
    """Yield 'cuda' with CUDA_VISIBLE_DEVICES set to one free device, or 'cpu' if there is none."""
    devices = visible_devices() if devices is None else devices
    if not devices:
        yield "cpu"
        return
    pool = Path(pool_dir)
    pool.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    while True:
        for dev in devices:
            fh = open(pool / f"gpu{dev}.lock", "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            os.environ["CUDA_VISIBLE_DEVICES"] = dev
            try:
                yield "cuda"
            finally:
                if previous is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = previous
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no free GPU among {devices} in {pool}")
        time.sleep(poll)
