"""Job plumbing shared by the workflow scripts: send all output to the rule's log file, seed and pin the
threads, record the environment (package versions, device) beside the results."""
from __future__ import annotations

import atexit
import logging
import os
import platform
import random
import sys
import time
from importlib import metadata

PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "snakemake", "dvc", "lm-eval", "datasets")


def to_log(path) -> logging.Logger:
    """Redirect stdout/stderr (Python and C level, so tqdm and warnings too) to ``path``."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fh = open(path, "a", buffering=1)
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        sys.stdout = sys.stderr = fh
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr, force=True)
    return logging.getLogger("pruning")


def seed_everything(seed: int, threads: int | None = None) -> None:
    """Seed Python, NumPy and torch, deterministic algorithms, no TF32; pin torch's threads to the job's."""
    import numpy as np
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if threads:
        torch.set_num_threads(threads)


TIMING = "job timing: start-up %.3f s, compute %.3f s"  # the last line of every job's log (bench/bench_startup.py)


def log_timing(log: logging.Logger) -> None:
    """Log, when the job exits, its start-up (from its process's start to here: interpreter, imports, Snakemake's
    preamble; under warm start the client's) and its compute time (from here to the exit)."""
    from .warm_start import T0_ENV, process_start_time

    now = time.time()
    try:
        t0 = float(os.environ.get(T0_ENV) or process_start_time())
    except (OSError, ValueError):
        return
    atexit.register(lambda: log.info(TIMING, now - t0, time.time() - now))


def start(log_path, seed: int | None = None, threads: int | None = None) -> logging.Logger:
    """The first line of every job: its output to the log file, then (for jobs that compute) seeding."""
    log = to_log(log_path)
    log_timing(log)
    if seed is not None:
        seed_everything(seed, threads)
    return log


def environment(device: str | list[str] = "cpu") -> dict:
    """Package versions, platform and what the job ran on: ``device`` as given (a string or a list, as
    ``gpu_pool.claim_device(s)`` yields), and ``devices``, one ``gpu_pool.describe_device`` per device."""
    import torch

    from .gpu_pool import describe_device

    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    devices = list(device) if isinstance(device, (list, tuple)) else [device]
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "device": [str(d) for d in devices] if isinstance(device, (list, tuple)) else str(device),
        "devices": [describe_device(d) for d in devices],
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
    }
    if any(str(d).startswith("cuda") for d in devices):
        info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return info
