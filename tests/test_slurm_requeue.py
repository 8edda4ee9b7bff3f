"""SLURM auto-requeue details a real cluster cannot stage: the checkpoint is taken outside the signal handler (a signal
at an exact point of a step), and two ranks agree when only one was signalled. `scontrol` here is a recorder.
The whole path on a real SLURM (signal, hpc checkpoint, real `scontrol requeue`, the requeued job resuming, and a
requeue mid-epoch resuming bit-identically) is in test_experiment_slurm.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from conftest import TINY_ID, TINY_PLANS, tiny_args, wait_for

from resenc_lightning.callbacks import rng_state
from resenc_lightning.cli import build_cli, fit
from resenc_lightning.fault_hooks import PAUSE_ENV

REPO = Path(__file__).resolve().parents[1]


def wait_until(predicate, proc: subprocess.Popen, what: str, timeout: float = 180.0) -> None:
    """conftest.wait_for, failing with what was awaited and whether the run exited first."""
    if not wait_for(predicate, timeout, proc):
        assert proc.poll() is None, f"training exited (rc {proc.returncode}) before {what}"
        raise AssertionError(f"timed out waiting for {what}")


def fake_slurm(tmp_path: Path, ntasks: int = 1) -> tuple[dict[str, str], Path]:
    """SLURM's environment for one task, and an `scontrol` on PATH that records its calls."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    calls = tmp_path / "scontrol_calls"
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (fake_bin / "scontrol").chmod(0o755)
    env = {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "resenc",
           "SLURM_NTASKS": str(ntasks), "SLURM_NTASKS_PER_NODE": str(ntasks), "SLURM_NNODES": "1",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    return env, calls


def test_requeue_checkpoint_is_written_at_a_step_boundary_not_inside_the_signal_handler(tiny_dataset, results_dir,
                                                                                         tmp_path, monkeypatch):
    """Lightning's handler saved from inside the handler, mid-step; our RNG callback's state_dict then ran a
    collective from a signal handler. Every checkpoint must now be taken outside any handler, after a whole step."""
    slurm, calls = fake_slurm(tmp_path)
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    in_handler = [0]
    real_signal = signal.signal

    def tracked_signal(signum, handler):  # mark the time spent inside any SIGUSR1 handler
        if signum == signal.SIGUSR1 and callable(handler):
            def wrapped(s, frame, handler=handler):
                in_handler[0] += 1
                try:
                    return handler(s, frame)
                finally:
                    in_handler[0] -= 1
            wrapped.__wrapped__ = handler
            return real_signal(signum, wrapped)
        return real_signal(signum, handler)

    monkeypatch.setattr(signal, "signal", tracked_signal)
    taken = []
    real_state_dict = rng_state.RNGStateCheckpoint.state_dict
    monkeypatch.setattr(rng_state.RNGStateCheckpoint, "state_dict",
                        lambda self: taken.append(in_handler[0]) or real_state_dict(self))

    class SignalMidStep(pl.Callback):  # before step 3's forward pass
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

    cli = build_cli(tiny_args(results_dir, "--trainer.accelerator", "cpu", "--final_validation", "false",
                              "--nnunet_export.plot_progress", "false", epochs=1, iters=5, val_iters=1))
    cli.trainer.callbacks.append(SignalMidStep())
    code = 0
    try:
        fit(cli, None)
    except SystemExit as e:
        code = e.code
    assert taken and not any(taken), f"a checkpoint was taken inside the signal handler ({taken})"
    assert code == 128 + signal.SIGUSR1  # stopped after that step (scontrol requeue ends the job anyway)
    assert calls.read_text().split() == ["requeue", "4242"]
    hpc = torch.load(cli.output_folder / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    progress = hpc["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert hpc["global_step"] == 3  # the step the signal arrived in was finished, then saved
    assert progress["started"] == progress["processed"] == progress["completed"] == 3, progress


def test_two_ranks_agree_on_the_requeue_step_when_only_one_was_signalled(tiny_dataset, results_dir, tmp_path):
    """SLURM signals every rank, but not within the same step: any rank's signal stops all ranks after one common
    step, where the hpc checkpoint (with each rank's RNG streams) is written and the job requeued once."""
    slurm, calls = fake_slurm(tmp_path, ntasks=2)
    marker = tmp_path / "paused"
    args = tiny_args(results_dir, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                     "--final_validation", "false", "--nnunet_export.plot_progress", "false", epochs=3, iters=4,
                     val_iters=1)
    procs = []
    for rank in (0, 1):
        env = {**os.environ, **slurm, "SLURM_JOB_ID": "4343", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
               PAUSE_ENV: f"step=6@{marker}", "OMP_NUM_THREADS": "1", "nnUNet_def_n_proc": "1"}
        log = (tmp_path / f"rank{rank}.log").open("w")
        procs.append(subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    try:
        rank0, rank1 = (marker.with_name(f"paused.rank{r}") for r in (0, 1))
        wait_until(lambda: rank0.exists() and rank1.exists(), procs[0], "both ranks at step 6")
        procs[1].send_signal(signal.SIGUSR1)  # rank 1 only
        wait_until(rank1.with_name(rank1.name + ".left").exists, procs[1], "rank 1 to take the signal")
        rank0.with_name(rank0.name + ".release").touch()  # rank 0 continues without a signal of its own
        codes = [p.wait(180) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    logs = "".join((tmp_path / f"rank{r}.log").read_text()[-2000:] for r in (0, 1))
    assert codes == [128 + signal.SIGUSR1] * 2, logs
    assert calls.read_text().split() == ["requeue", "4343"], logs  # once, by rank 0
    fold = results_dir / f"Dataset{TINY_ID}_Tiny" / f"nnUNetTrainer_Lightning__{TINY_PLANS}__3d_fullres" / "fold_0"
    hpc = torch.load(fold / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert hpc["global_step"] == 6
    assert len(hpc["callbacks"]["RNGStateCheckpoint"]["rng_states_per_rank"]) == 2
