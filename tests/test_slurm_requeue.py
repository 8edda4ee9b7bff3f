"""SLURM auto-requeue: the requeue signal saves a checkpoint and requeues the job; the requeued job resumes by itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import TINY_ID, TINY_PLANS, tiny_args
from test_training import nnunet_lrs

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 8


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"training exited (rc {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_requeue_signal_saves_requeues_and_the_requeued_job_resumes(tiny_dataset, results_dir, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "scontrol_calls"
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (fake_bin / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NAME": "resenc", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    cmd = [sys.executable, str(REPO / "train.py"),
           *tiny_args(results_dir, "--trainer.accelerator", "cpu", "--final_validation", "false",
                      epochs=EPOCHS, iters=4, val_iters=1)]
    fold = results_dir / f"Dataset{TINY_ID}_Tiny" / f"nnUNetTrainer_Lightning__{TINY_PLANS}__3d_fullres" / "fold_0"
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (fold / "checkpoints" / "last.ckpt").is_file(), proc, "the first checkpoint")
        proc.send_signal(signal.SIGUSR1)  # what SLURM sends before the time limit (#SBATCH --signal=SIGUSR1@90)
        wait_for(calls.is_file, proc, "scontrol requeue")
    finally:
        proc.kill()  # SLURM ends the job after the grace period
        proc.wait()
    assert calls.read_text().split() == ["requeue", "4242"]
    hpc = fold / "hpc_ckpt_1.ckpt"
    assert hpc.is_file()
    interrupted_at = torch.load(hpc, map_location="cpu", weights_only=False)["epoch"]
    assert interrupted_at < EPOCHS - 1

    # The requeued job runs the same command; SLURM counts the restart. No --resume needed, nothing refused.
    requeued = subprocess.run(cmd, cwd=REPO, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True,
                              timeout=600)
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    assert "SLURM job 4242 requeued: resuming from" in requeued.stdout
    final = torch.load(fold / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["epoch"] == EPOCHS - 1
    log_lists = final["nnunet"]["logging"]
    # one entry per epoch even though an epoch was restarted mid-way, and nnU-Net's LR for each
    assert all(len(v) == EPOCHS for v in log_lists.values()), {k: len(v) for k, v in log_lists.items()}
    assert log_lists["lrs"] == nnunet_lrs(0.01, EPOCHS, EPOCHS)
