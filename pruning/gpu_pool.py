"""Give each job that declares ``gpu=N`` its own N CUDA devices.

Snakemake counts GPUs (``--resources gpu=8``) but never assigns them. A job calls ``claim_device()`` (or
``claim_devices(n)``): it takes an exclusive ``fcntl`` lock on ``<pool_dir>/gpu<id>.lock`` for free devices
and yields explicit torch devices ``"cuda:k"``, k the device's position in the process's own visible list.
``CUDA_VISIBLE_DEVICES`` is never changed: CUDA reads it once, when the process first touches it (often at
import), so a later change would be ignored and every job would run on device 0 (pytorch/pytorch#159641).
Lock files are named by the physical id (the ``CUDA_VISIBLE_DEVICES`` entry, an ordinal or a UUID, else
the ordinal), so all jobs on a node must name devices alike. The lock dies with the process, so a killed job
never leaks a device. Without CUDA the job runs on ``"cpu"``.

``PRUNING_SIMULATED_GPUS`` (e.g. ``0,1,2,3``; empty: none) replaces the visible list. Tests only.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from pathlib import Path

SIMULATED = "PRUNING_SIMULATED_GPUS"
POOL_DIR = ".gpu_pool"  # the lock files, in the working directory the jobs share

_log = logging.getLogger("pruning")


def _entries(value: str) -> list[str]:
    """A device list as CUDA reads it: comma separated, cut at the first invalid ('-1' or empty) entry."""
    out = []
    for d in value.split(","):
        d = d.strip()
        if not d or d == "-1":
            break
        out.append(d)
    return out


def _torch_cuda():
    """torch.cuda when CUDA is usable, else None (never raises)."""
    try:
        import torch

        return torch.cuda if torch.cuda.is_available() else None
    except Exception:
        return None


def visible_devices() -> list[str]:
    """This process's devices in CUDA order, by physical id: index k in the list is ``cuda:k``."""
    for var in (SIMULATED, "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(var)
        if value is not None:
            return _entries(value)
    cuda = _torch_cuda()
    try:
        return [str(i) for i in range(cuda.device_count())] if cuda else []
    except Exception:
        return []


def _lock_path(pool: Path, dev: str) -> Path:
    return pool / ("gpu" + re.sub(r"[^A-Za-z0-9._-]", "_", dev) + ".lock")


def _order(dev: str):
    """One order over physical ids for every job, numbers by value: locks are always tried in it."""
    return (0, int(dev), dev) if dev.isdigit() else (1, 0, dev)


def _try_lock(path: Path):
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")  # who holds it, for whoever looks
    fh.flush()
    return fh


def _release(handles) -> None:
    for fh in handles:
        try:
            fcntl.flock(fh, fcntl.LOCK_UN)
        finally:
            fh.close()


def _set_current(index: int):
    """Make cuda:index torch's current device when CUDA is usable; return the previous one (or None)."""
    cuda = _torch_cuda()
    if cuda is None:
        return None
    try:
        if index >= cuda.device_count():
            return None
        previous = cuda.current_device()
        cuda.set_device(index)
        return previous
    except Exception as e:  # the explicit "cuda:k" still holds; only the current-device default is left
        _log.warning("torch.cuda.set_device(%d) failed: %s", index, e)
        return None


@contextlib.contextmanager
def claim_devices(n: int, pool_dir=POOL_DIR, devices: list[str] | None = None, timeout: float = 3600.0,
                  poll: float = 0.5):
    """Yield n distinct free devices as ``["cuda:k", ...]`` (k ascending), or ``["cpu"]`` if n <= 0 or there
    are none. ``devices``: the visible list in CUDA order (default ``visible_devices()``).

    Locks are tried without waiting, in one order over physical ids; with fewer than n free, the job drops
    what it took and retries after ``poll`` s, so two multi-GPU jobs never deadlock. TimeoutError after
    ``timeout`` s; ValueError if n exceeds the visible devices. Sets torch's current device to the first.
    """
    devices = visible_devices() if devices is None else list(devices)
    if n <= 0 or not devices:
        yield ["cpu"]
        return
    index: dict[str, int] = {}
    for k, dev in enumerate(devices):
        index.setdefault(dev, k)
    if n > len(index):
        raise ValueError(f"a job asks for {n} GPUs but only {len(index)} are visible ({','.join(index)})")
    pool = Path(pool_dir)
    pool.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    while True:
        held: list[tuple[str, object]] = []
        try:
            for dev in sorted(index, key=_order):
                fh = _try_lock(_lock_path(pool, dev))
                if fh is not None:
                    held.append((dev, fh))
                    if len(held) == n:
                        break
        except BaseException:
            _release(fh for _, fh in held)
            raise
        if len(held) == n:
            break
        _release(fh for _, fh in held)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {n} free GPUs among {devices} in {pool} after {timeout:g} s")
        time.sleep(poll)
    claimed = sorted(index[dev] for dev, _ in held)
    previous = _set_current(claimed[0])
    try:
        yield [f"cuda:{k}" for k in claimed]
    finally:
        if previous is not None:
            with contextlib.suppress(Exception):
                _torch_cuda().set_device(previous)
        _release(fh for _, fh in held)


@contextlib.contextmanager
def claim_device(pool_dir=POOL_DIR, devices: list[str] | None = None, timeout: float = 3600.0, poll: float = 0.5):
    """Yield one free device as ``"cuda:k"``, or ``"cpu"`` if there is none (see ``claim_devices``)."""
    with claim_devices(1, pool_dir, devices, timeout, poll) as claimed:
        yield claimed[0]


def describe_device(device, devices: list[str] | None = None) -> dict:
    """What a job ran on: ``{"device", "index", "physical", "uuid", "name"}`` for ``cuda:k``
    (uuid and name None without CUDA), ``{"device": "cpu"}`` otherwise."""
    device = str(device)
    if not device.startswith("cuda"):
        return {"device": device}
    cuda = _torch_cuda()
    if ":" in device:
        k = int(device.split(":", 1)[1])
    else:
        k = cuda.current_device() if cuda else 0
    devices = visible_devices() if devices is None else devices
    info = {"device": f"cuda:{k}", "index": k, "physical": devices[k] if k < len(devices) else None,
            "uuid": None, "name": None}
    if cuda is not None:
        try:
            props = cuda.get_device_properties(k)
            info["uuid"] = str(props.uuid)
            info["name"] = props.name
        except Exception:
            pass
    return info


def log_device(log: logging.Logger, device) -> None:
    """One log line per device (a device string or a list of them): index, physical id and UUID."""
    for d in device if isinstance(device, (list, tuple)) else [device]:
        info = describe_device(d)
        if "index" in info:
            log.info("device %s: index %d, physical %s, uuid %s, %s", info["device"], info["index"],
                     info["physical"], info["uuid"], info["name"])
        else:
            log.info("device %s", info["device"])
