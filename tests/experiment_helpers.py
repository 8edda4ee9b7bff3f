"""Running `experiment.py` on the tiny dataset from the tests, and waiting on the scheduler (not on the clock)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import TINY_ID, TINY_NAME, TINY_PLANS, wait_for

REPO = Path(__file__).resolve().parents[1]
MODEL = f"nnUNetTrainer_Lightning__{TINY_PLANS}__3d_fullres"


def tiny_train(epochs: int = 1, iters: int = 2, *extra: str) -> list[str]:
    return ["--data.num_iterations_per_epoch", str(iters), "--data.num_val_iterations_per_epoch", "1",
            "--trainer.max_epochs", str(epochs), "--trainer.accelerator", "cpu", "--trainer.enable_model_summary",
            "false", "--nnunet_export.plot_progress", "false", *extra]


def experiment(results: Path, *args: str, train: list[str] | None = None, env: dict[str, str] | None = None,
               timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "experiment.py"), *args[:1]] if args[:1] == ("status",) else \
        [sys.executable, str(REPO / "experiment.py")]
    rest = args[1:] if args[:1] == ("status",) else args
    cmd += ["--plans", TINY_PLANS, "--dataset", str(TINY_ID), "--results_dir", str(results), "--poll_s", "0.5", *rest]
    if train is not None:
        cmd += ["--", *train]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_def_n_proc": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def fold_folder(results: Path, fold: int | str) -> Path:
    return results / TINY_NAME / MODEL / f"fold_{fold}"


def slurm_partition() -> str | None:
    """The default partition of a SLURM that answers, else None (the tests that need it skip)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.stdout.splitlines():
        name, _, avail = line.partition(" ")
        if name.endswith("*") and avail.strip() == "up":
            return name[:-1]
    return None


def wait_until(predicate, what: str, timeout: float = 600.0) -> None:
    """conftest.wait_for (poll an event: a marker file, a job state), failing with what was awaited; the timeout
    only bounds a hung job."""
    if not wait_for(predicate, timeout, poll=0.1):
        raise AssertionError(f"timed out waiting for {what}")


def submissions() -> set[str]:
    """The submissions SLURM holds now (an array counts once, whatever its tasks' states)."""
    out = subprocess.run(["squeue", "-h", "-o", "%F"], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def start_requeued_now(job_id: str) -> None:
    """SLURM holds a requeued job back for 120 s (its BeginTime); once it is back in the queue, let it start now."""
    from resenc_lightning.experiment_scheduler import slurm_job

    def requeued() -> bool:
        info = slurm_job(job_id) or {}
        return int(info.get("Restarts", "0")) > 0 and info.get("JobState") == "PENDING"

    wait_until(requeued, f"job {job_id} back in the queue")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
