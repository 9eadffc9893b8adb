"""Job plumbing shared by the workflow scripts: send all output to the rule's log file, seed, time."""
from __future__ import annotations

import logging
import os
import sys


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


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
