"""Signals under 2-process DDP (gloo): one rank, the other, or the whole process group (Ctrl+C), in training, in
validation and in the final validation. Every time the job ends within 60 s of the signal, every rank with it,
with an intact last.ckpt at the agreed point, and `--resume` continues from it.

Runs are `python train.py --trainer.devices 2` (Lightning launches rank 1 as rank 0's child). Both ranks are held at
the event by the test-only pause hook (fault_hooks.py), so the signal lands exactly there on any machine; a rank
leaves its pause when it takes the signal, the others when the test releases them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_ID, TINY_PLANS, tiny_args, wait_for

import resenc_lightning
from resenc_lightning.fault_hooks import PAUSE_ENV

REPO = Path(__file__).resolve().parents[1]
FOLD = Path(f"Dataset{TINY_ID}_Tiny") / f"nnUNetTrainer_Lightning__{TINY_PLANS}__3d_fullres" / "fold_0"
EPOCHS, ITERS = 2, 3
BOUND_S = 60.0  # from the signal to the end of every process of the job
#: who gets which signal: SIGUSR1 outside SLURM means SIGTERM; "all" is what a terminal's Ctrl+C does
TARGETS = {"rank0": signal.SIGTERM, "rank1": signal.SIGUSR1, "all": signal.SIGINT}
#: the event both ranks are held at, and the global step last.ckpt must hold after the stop
PHASES = {"train": ("step=4", 4), "val": ("val=0", ITERS), "final": ("final=1", EPOCHS * ITERS)}
RESUMED = {("all", "train"), ("rank0", "val"), ("rank1", "val"), ("rank0", "final")}  # the --resume continuations


def launch(results: Path, *extra: str, pause: str | None = None, marker: Path | None = None) -> subprocess.Popen:
    results.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(resenc_lightning.__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    if pause is not None:
        env[PAUSE_ENV] = f"{pause}@{marker}"
    args = tiny_args(results, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                     "--nnunet_export.plot_progress", "false", *extra, epochs=EPOCHS, iters=ITERS, val_iters=2)
    log = open(results / "train.log", "ab")
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def log_of(results: Path) -> str:
    return (results / "train.log").read_text(errors="replace")[-4000:]


def rank1_pid(rank0: int) -> int:
    """Rank 1 is the `train.py` child Lightning's launcher started (other children are worker pools)."""
    for task in Path(f"/proc/{rank0}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"train.py" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise AssertionError("rank 1 not found among rank 0's children")


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("target", list(TARGETS))
def test_a_signal_stops_every_rank_together_and_resume_continues(tiny_dataset, tmp_path, target, phase):
    event, step = PHASES[phase]
    signum = TARGETS[target]
    results, marker = tmp_path / "results", tmp_path / "paused"
    final = ("--final_validation", "true" if phase == "final" else "false")
    proc = launch(results, *final, pause=event, marker=marker)
    held = [marker.with_name(f"paused.rank{r}") for r in (0, 1)]
    rank1 = None
    try:
        assert wait_for(lambda: all(m.exists() for m in held), 300, proc), log_of(results)
        rank1 = rank1_pid(proc.pid)
        start = time.monotonic()
        if target == "all":
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid if target == "rank0" else rank1, signum)
        signalled = [0, 1] if target == "all" else [int(target[-1])]
        took = wait_for(lambda: all(held[r].with_name(held[r].name + ".left").exists() for r in signalled), BOUND_S,
                        proc)
        for r in set((0, 1)) - set(signalled):  # a rank without a signal of its own carries on
            held[r].with_name(held[r].name + ".release").touch()
        ended = wait_for(lambda: proc.poll() is not None and gone(rank1), max(1.0, BOUND_S - (time.monotonic() - start)))
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None or (rank1 is not None and not gone(rank1)):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    name = signal.Signals(signum).name
    assert took and ended, f"{target} {name} in {phase}: no graceful stop within {BOUND_S:.0f}s (every signalled " \
                           f"rank took it: {took}; job ended: {ended}, exit {proc.returncode})\n{log_of(results)}"
    log = log_of(results)
    assert proc.returncode == 128 + signum, log
    ckpt = torch.load(results / FOLD / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == step, (ckpt["global_step"], log)
    assert len(ckpt["callbacks"]["RNGStateCheckpoint"]["rng_states_per_rank"]) == 2
    assert f"Stopped by {name}" in log and "--resume" in log, log
    print(f"{target} {name} in {phase}: job ended {elapsed:.1f}s after the signal")
    if phase == "final":
        assert not (results / FOLD / "validation" / "summary.json").exists()

    if (target, phase) not in RESUMED:
        return
    resumed = launch(results, *final, "--resume", "true")
    assert resumed.wait(600) == 0, log_of(results)
    done = torch.load(results / FOLD / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (done["epoch"], done["global_step"]) == (EPOCHS - 1, EPOCHS * ITERS)
    lengths = {key: len(v) for key, v in done["nnunet"]["logging"].items()}
    assert set(lengths.values()) == {EPOCHS}, f"nnU-Net's per-epoch log lost an epoch across the stop: {lengths}"
    if phase == "final":
        assert (results / FOLD / "validation" / "summary.json").is_file()


def test_lightning_never_installs_its_handlers_and_ours_stay_until_restored():
    """Lightning registers its handlers in Trainer._run after setup and removes them at fit's end (before the final
    validation); under SLURM its requeue handler saves inside the handler. Ours replace that registration: a requeue
    signal at any point only sets the flag, and the handlers stay until the very end."""
    import lightning.pytorch as pl
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from resenc_lightning.stop_signals import StopSignals, install_on

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         plugins=[SLURMEnvironment(auto_requeue=True)])
    signals = StopSignals()
    assert install_on(trainer, signals)
    try:
        trainer._signal_connector.register_signal_handlers()  # what Trainer._run does after setup
        os.kill(os.getpid(), signal.SIGUSR1)  # the requeue signal: a flag, no checkpoint, no collective
        assert signals.requeue_requested and signals.code() > signal.SIGUSR1
        trainer._signal_connector.teardown()  # fit's end: still ours, through the final validation
        assert all(signal.getsignal(s) == signals._handle for s in before)
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl+C stops at once
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signals.restore()
    assert {s: signal.getsignal(s) for s in before} == before
