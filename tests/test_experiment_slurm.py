"""experiment.py against a real single-node SLURM (scripts/slurm_cluster.sh start): arrays, model selection as a
dependent job, requeue and the pre-time-limit signal mid-epoch, DDP under srun, reruns while jobs are live, failed
folds. Every interruption waits on the test-only pause hook (fault_hooks.py), never on a sleep."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from experiment_helpers import (
    REPO,
    experiment,
    fold_folder,
    slurm_partition,
    start_requeued_now,
    submissions,
    tiny_train,
    wait_until,
)

from resenc_lightning.experiment_scheduler import is_live, read_pointer
from resenc_lightning.fault_hooks import PAUSE_ENV

PARTITION = slurm_partition()
pytestmark = pytest.mark.skipif(PARTITION is None, reason="no SLURM here (no sbatch, or no partition up): "
                                                         "`scripts/slurm_cluster.sh start` as root sets one up")


def slurm(*more: str) -> tuple[str, ...]:
    return ("--slurm.partition", PARTITION, "--slurm.gpus_per_node", "0", "--slurm.cpus_per_task", "1",
            "--slurm.time_min", "30", *more)


def log_of(results, fold) -> str:
    return open(read_pointer(fold_folder(results, fold)).log).read()


def test_array_of_two_folds_ends_in_model_selection_and_a_rerun_while_live_starts_nothing(tiny_dataset, tmp_path):
    results, marker = tmp_path / "results", tmp_path / "paused"
    hold = {PAUSE_ENV: f"step=1@{marker}"}  # a fold's job holds after its first step: the jobs are live for sure
    first = experiment(results, "--folds", "0", "1", "--wait", "false", *slurm(), train=tiny_train(), env=hold)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Submitted 2 job(s) as array" in first.stdout and "Submitted model selection as job" in first.stdout
    wait_until(marker.exists, "a fold's job at step 1")
    before = submissions()
    again = experiment(results, "--folds", "0", "1", "--wait", "false", *slurm(), train=tiny_train(), env=hold)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Submitted" not in again.stdout and again.stdout.count("not started again") == 3, again.stdout
    assert submissions() == before
    status = experiment(results, "status", "--folds", "0", "1", *slurm())
    assert status.stdout.count("running") + status.stdout.count("pending") == 2, status.stdout
    marker.with_name(marker.name + ".release").touch()
    final = experiment(results, "--folds", "0", "1", *slurm(), train=tiny_train())  # waits, prints the selection
    assert final.returncode == 0, final.stdout + final.stderr
    assert "nnUNetv2_predict -d Dataset555_Tiny" in final.stdout and "-f  0 1" in final.stdout, final.stdout
    rows = experiment(results, "status", "--folds", "0", "1", *slurm()).stdout.splitlines()
    assert [r.split()[2] for r in rows[1:]] == ["done", "done"], rows
    assert all(r.split()[4] == "1/1" for r in rows[1:]), rows  # epoch / max epochs


def test_requeue_and_time_limit_signal_mid_epoch_resume_bit_identically(tiny_dataset, tmp_path):
    """Two experiments at once, each held at step 3 of 2 x 5 steps: one is requeued with `scontrol requeue` (SIGTERM:
    saves last.ckpt), the other gets SLURM's pre-time-limit SIGUSR1 (saves hpc_ckpt_1.ckpt and requeues itself)."""
    train = tiny_train(2, 5, "--seed", "5", "--deterministic", "true", "--model.num_epochs", "2",
                       "--final_validation", "false")
    runs = {}
    for name in ("requeue", "usr1"):
        results, marker = tmp_path / name, tmp_path / f"{name}.paused"
        out = experiment(results, "--folds", "0", "--wait", "false", "--find_best", "false", *slurm(), train=train,
                         env={PAUSE_ENV: f"step=3@{marker}"})
        assert out.returncode == 0, out.stdout + out.stderr
        runs[name] = (results, marker)
    reference = subprocess.run([sys.executable, str(REPO / "train.py"), "--plans", "nnUNetResEncUNetLPlans_tiny",
                                "--dataset", "555", "--fold", "0", "--data.results_dir", str(tmp_path / "reference"),
                                *train], cwd=REPO, capture_output=True, text=True, timeout=900,
                               env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert reference.returncode == 0, reference.stdout[-2000:] + reference.stderr[-2000:]
    for name, command in (("requeue", ["scontrol", "requeue"]), ("usr1", ["scancel", "--signal=USR1"])):
        results, marker = runs[name]
        wait_until(marker.exists, f"the {name} job at step 3")
        job_id = read_pointer(fold_folder(results, 0)).job_id
        subprocess.run([*command, job_id], check=True)
        start_requeued_now(job_id)
    for name in runs:
        results, _ = runs[name]
        done = experiment(results, "--folds", "0", "--find_best", "false", *slurm(), train=train)  # waits for it
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Submitted" not in done.stdout  # the requeued job was live or done: no second job
    results, _ = runs["requeue"]
    log = log_of(results, 0)
    assert "Stopped by SIGTERM at epoch 0, step 3" in log and "requeued: resuming from" in log, log[-3000:]
    ref = torch.load(tmp_path / "reference" / "Dataset555_Tiny" / fold_folder(results, 0).relative_to(
        results / "Dataset555_Tiny") / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    got = torch.load(fold_folder(results, 0) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert got["global_step"] == ref["global_step"] == 10
    for key, value in ref["state_dict"].items():
        assert torch.equal(value, got["state_dict"][key]), key
    results, _ = runs["usr1"]
    log = log_of(results, 0)
    hpc = torch.load(fold_folder(results, 0) / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert hpc["global_step"] == 3 and "Received SIGUSR1 at step 3" in log, log[-3000:]
    assert "requeued: resuming from" in log and "hpc_ckpt_1.ckpt" in log, log[-3000:]
    assert (fold_folder(results, 0) / "checkpoint_final.pth").is_file()
    final = torch.load(fold_folder(results, 0) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    logged = final["nnunet"]["logging"]  # one entry per epoch although epoch 0 was restarted mid-way
    assert final["global_step"] == 10 and all(len(v) == 2 for v in logged.values()), {k: len(v) for k, v in logged.items()}


def test_two_task_ddp_job_under_srun_trains_and_resumes_after_a_requeue(tiny_dataset, tmp_path):
    results, marker = tmp_path / "results", tmp_path / "paused"
    train = tiny_train(2, 3, "--trainer.strategy", "ddp", "--final_validation", "false")
    out = experiment(results, "--folds", "0", "--wait", "false", "--find_best", "false",
                     *slurm("--slurm.tasks_per_node", "2"), train=train, env={PAUSE_ENV: f"step=2@{marker}"})
    assert out.returncode == 0, out.stdout + out.stderr
    ranks = [marker.with_name(f"{marker.name}.rank{r}") for r in (0, 1)]
    wait_until(lambda: all(m.exists() for m in ranks), "both ranks at step 2")
    job_id = read_pointer(fold_folder(results, 0)).job_id
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    start_requeued_now(job_id)
    done = experiment(results, "--folds", "0", "--find_best", "false", *slurm("--slurm.tasks_per_node", "2"),
                      train=train)
    assert done.returncode == 0, done.stdout + done.stderr
    log = log_of(results, 0)
    assert "requeued: resuming from" in log, log[-3000:]
    final = torch.load(fold_folder(results, 0) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 6 and len(final["callbacks"]["RNGStateCheckpoint"]["rng_states_per_rank"]) == 2


def test_a_failed_fold_stops_model_selection_with_one_line(tiny_dataset, tmp_path):
    results = tmp_path / "results"
    damaged = fold_folder(results, 1) / "checkpoints" / "last.ckpt"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a checkpoint")  # the fold resumes (--resume) from a checkpoint that cannot load
    out = experiment(results, "--folds", "1", *slurm(), train=tiny_train())
    assert out.returncode == 1
    line = out.stderr.strip().splitlines()[-1]
    log = read_pointer(fold_folder(results, 1)).log
    assert line == (f"error: 3d_fullres fold 1 failed, see {log}; model selection not run. Fix it and rerun this "
                    f"command: finished folds are kept, the failed one resumes."), out.stderr
    assert "no intact checkpoint" in open(log).read()
    assert not is_live(read_pointer(fold_folder(results, 1)))
    assert not any("find-best" in line for line in subprocess.run(
        ["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout.splitlines())  # cancelled, not left
