"""A real SLURM cluster on this machine (bench/slurm/cluster.sh: Debian's slurmctld + slurmd + munge): a subset of
the micro config through workflow/profiles/slurm gives the local run's results, file for file.

Deselect with ``-m "not slurm"``. Skips only where the SLURM packages cannot be installed (no apt-get, not root)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "bench/slurm/cluster.sh"
sys.path.insert(0, str(ROOT / "bench/slurm"))
import micro  # noqa: E402

CANNOT_INSTALL = 3  # cluster.sh's exit status when the packages are missing and cannot be installed
RULES = ("corpus", "train_tiny", "calibrate", "mask", "apply", "evaluate_ppl", "block_error", "lm_eval_tasks",
         "evaluate_lm_eval", "report")  # every job of micro_params(small=True) but `all`: 13 SLURM jobs


@pytest.mark.slurm
def test_micro_run_through_slurm_equals_local_run(tmp_path):
    start = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=900)
    try:
        if start.returncode == CANNOT_INSTALL:
            pytest.skip(f"SLURM packages cannot be installed: {start.stderr.strip()[-300:]}")
        assert start.returncode == 0, start.stderr[-3000:]
        s = micro.main(["--out", str(tmp_path), "--small", "--parallel", "--timeout", "1200"])
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=300)
    c = s["comparison"]
    assert c["counts"]["different"] == 0 and c["counts"]["only_in_one"] == 0, (
        c["different"], c["only_in_local"], c["only_in_slurm"])
    # 45 files: masks, calibration statistics, checkpoints, metrics JSON/CSV, plots
    assert c["counts"]["identical"] >= 30 and c["counts"]["by_kind"][".safetensors"] >= 8, c["counts"]
    for f, fields in c["equal_but_ignored_fields"].items():  # wall times only
        assert all(x.endswith("seconds") or x.endswith("(wall time)") for x in fields), (f, fields)
    # every job but the target `all` ran as a SLURM job, and each rule has its SLURM log
    assert (s["slurm_jobs_submitted"], s["local_rule_jobs"]) == (13, 1)
    logs = tmp_path / "slurm/.snakemake/slurm_logs"
    assert {p.name for p in logs.iterdir()} == {f"rule_{r}" for r in RULES}
