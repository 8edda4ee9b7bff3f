"""experiment.py's plan and job requests without running jobs: the cascade waits for 3d_lowres, finished folds are
skipped and started ones resume, GPU jobs see one GPU each, SLURM jobs carry our signal (not submitit's)."""

from __future__ import annotations

import pytest

from resenc_lightning.experiment_config import SlurmOptions, parse
from resenc_lightning.experiment_plan import plan
from resenc_lightning.experiment_scheduler import local_executor, slurm_executor


def test_cascade_waits_for_its_lowres_folds_and_needs_them(tmp_path):
    waves = plan(["3d_cascade_fullres", "3d_lowres", "2d"], ["0", "1"], "P", "T", tmp_path, "Dataset001_X")
    assert [[(j.configuration, j.fold) for j in w] for w in waves] == [
        [("3d_lowres", "0"), ("3d_lowres", "1"), ("2d", "0"), ("2d", "1")],
        [("3d_cascade_fullres", "0"), ("3d_cascade_fullres", "1")]]
    with pytest.raises(SystemExit) as e:
        plan(["3d_cascade_fullres"], ["0", "1"], "P", "T", tmp_path, "Dataset001_X")
    assert str(e.value.code) == (f"error: 3d_cascade_fullres needs 3d_lowres folds 0 1 finished in "
                                 f"{tmp_path / 'Dataset001_X' / 'T__P__3d_lowres'}; add 3d_lowres to --configurations.")


def test_finished_folds_are_done_and_started_ones_resume(tmp_path):
    fresh, started, done = plan(["2d"], ["0", "1", "2"], "P", "T", tmp_path, "D")[0]
    (started.folder / "checkpoints").mkdir(parents=True)
    (started.folder / "checkpoints" / "last.ckpt").write_bytes(b"x")
    done.folder.mkdir(parents=True)
    (done.folder / "checkpoint_final.pth").write_bytes(b"x")
    assert (fresh.done, started.done, done.done) == (False, False, True)
    assert "--resume" not in fresh.train_args("P", "D", "T", tmp_path, [])
    assert started.train_args("P", "D", "T", tmp_path, ["--npz"])[-3:] == ["--npz", "--resume", "true"]


def test_training_options_after_the_double_dash_and_gpu_lists():
    command, cfg = parse(["status", "--dataset", "4", "--folds", "0", "1", "--gpus", "0,1", "2", "--", "--npz",
                          "--trainer.max_epochs", "5"])
    assert (command, cfg.folds, cfg.gpus) == ("status", ["0", "1"], [0, 1, 2])
    assert cfg.train_args == ["--npz", "--trainer.max_epochs", "5"]


def test_a_gpu_job_sees_one_gpu_and_a_cpu_job_none(tmp_path):
    assert local_executor(tmp_path, 3).parameters["visible_gpus"] == (3,)
    assert local_executor(tmp_path, 3).parameters["gpus_per_node"] == 1
    assert local_executor(tmp_path, None).parameters["gpus_per_node"] == 0


def test_slurm_jobs_carry_our_requeue_signal_and_the_users_sbatch_lines(tmp_path):
    opts = SlurmOptions(partition="gpu", time_min=60, tasks_per_node=4, gpus_per_node=4, cpus_per_task=6, mem_gb=64,
                        signal_delay_s=120, extra_sbatch=["--qos=high", "--exclusive"], setup=["module load cuda"])
    script = slurm_executor(tmp_path, opts, "resenc-Dataset004_Hippocampus")._make_submission_file_text("CMD", "u")
    lines = set(script.splitlines())
    assert {"#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --qos=high", "#SBATCH --exclusive",
            "#SBATCH --partition=gpu", "#SBATCH --time=60", "#SBATCH --ntasks-per-node=4",
            "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=6", "#SBATCH --mem=65536MB",
            "module load cuda"} <= lines, script
    assert not any("USR2" in line for line in lines)  # submitit's own preemption signal is never requested
