"""A rank that dies ends the job: kill -9 of one rank of a 2-process DDP run (gloo, CPU, real augmentation workers).

Within 60 s of the kill every process of the job (both ranks and their workers, collected from the process tree
before the kill) is gone and the exit code is non-zero; last.ckpt loads; `--resume` finishes the run. Rank 1 dying
is Lightning's launcher's to handle (its child-process observer kills the rest); rank 0 dying leaves rank 1, its
child, blocked in a collective unless our watchdog (rank_watchdog.py) ends it. Kills land at an event (both ranks
paused at a step by the test-only pause hook), never after a sleep.
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
from conftest import tiny_args, wait_for
from test_faults import FOLD, alive, descendants, pause_at

import resenc_lightning

REPO = Path(__file__).resolve().parents[1]
EPOCHS, ITERS = 2, 3
PAUSE_STEP = ITERS + 1  # in epoch 1, after epoch 0's last.ckpt
GONE_WITHIN_S = 60.0


def spawn_ddp(results: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python train.py` on 2 CPU ranks with one augmentation worker per loader; both ranks log to train.log."""
    results.mkdir(parents=True, exist_ok=True)
    args = tiny_args(results, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                     "--final_validation", "false", "--nnunet_export.plot_progress", "false", *extra,
                     epochs=EPOCHS, iters=ITERS, val_iters=1)
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1",
               "PYTHONPATH": os.pathsep.join([str(Path(resenc_lightning.__file__).parents[1]),
                                              os.environ.get("PYTHONPATH", "")]), **(env or {})}
    log = open(results / "train.log", "ab")
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], env=environ, stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO)


def log_of(results: Path) -> str:
    return (results / "train.log").read_text(errors="replace")[-4000:]


def rank_pid(launcher: int, local_rank: int) -> int:
    """The rank Lightning's launcher started: its direct child whose initial environment has LOCAL_RANK=<rank>
    (the launcher's augmentation workers are forked, so their initial environment is the launcher's, without it)."""
    for pid in descendants(launcher):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == launcher and f"LOCAL_RANK={local_rank}".encode() in environ:
            return pid
    raise AssertionError(f"no rank {local_rank} among the children of {launcher}")


def describe(pids: set[int]) -> list[str]:
    out = []
    for pid in sorted(pids):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120].decode(errors="replace")
            out.append(f"{pid}: {cmdline}")
        except OSError:
            out.append(f"{pid}: gone")
    return out


@pytest.mark.parametrize(("killed", "survivor_goes_on"), [(0, False), (1, False), (0, True)],
                         ids=["rank0-survivor-held", "rank1-survivor-held", "rank0-survivor-in-collective"])
def test_a_rank_killed_with_sigkill_ends_the_job_and_resume_finishes_the_run(tiny_dataset, tmp_path, killed,
                                                                             survivor_goes_on):
    """`survivor_goes_on`: the surviving rank leaves its pause into the next step's collectives (gloo notices the
    dead peer there, "Connection reset by peer"); held, it stands for a rank that does not notice, as NCCL ranks
    blocked in a collective on GPUs (they wait for NCCL's timeout, 30 min by default)."""
    results = tmp_path / "results"
    marker = tmp_path / "paused"
    markers = [marker.with_name(f"{marker.name}.rank{r}") for r in (0, 1)]  # the pause hook's per-rank files
    proc = spawn_ddp(results, env=pause_at(f"step={PAUSE_STEP}", marker))
    job: set[int] = set()
    try:
        assert wait_for(lambda: all(m.exists() for m in markers), 400, proc), log_of(results)
        ranks = {0: proc.pid, 1: rank_pid(proc.pid, 1)}
        job = {proc.pid} | descendants(proc.pid)
        workers = job - set(ranks.values())
        assert len(workers) >= 4, f"expected a training and a validation worker per rank: {describe(job)}"
        last = results / FOLD / "checkpoints" / "last.ckpt"
        # epoch 0's last.ckpt is written by rank 0's background writer, which goes on while the training thread is
        # paused: its atomic rename is the event (a kill before it would leave no last.ckpt, as intended)
        assert wait_for(last.is_file, 400, proc), log_of(results)

        os.kill(ranks[killed], signal.SIGKILL)
        killed_at = time.monotonic()
        if survivor_goes_on:
            survivor = markers[1 - killed]
            survivor.with_name(survivor.name + ".release").touch()
        gone = wait_for(lambda: not alive(job), GONE_WITHIN_S)
        took = time.monotonic() - killed_at
        left = alive(job)
        assert gone, (f"{GONE_WITHIN_S:.0f} s after kill -9 of rank {killed} these are still alive: {describe(left)}\n"
                      + log_of(results))
        code = proc.wait(10)
        print(f"kill -9 of rank {killed}: every process of the job gone after {took:.1f} s, exit code {code}")
        assert code != 0, log_of(results)
        if killed == 0 and not survivor_goes_on:  # the survivor says why it ended (rank_watchdog.py)
            assert f"rank 1 (pid {ranks[1]}) ends: rank 0 (pid {proc.pid})" in log_of(results), log_of(results)
        if killed == 1:  # Lightning's observer in rank 0 ended the job
            assert f"Child process with PID {ranks[1]} terminated with code -9" in log_of(results), log_of(results)

        ckpt = torch.load(last, map_location="cpu", weights_only=False)  # intact: the kill never tears it
        assert (ckpt["epoch"], ckpt["global_step"]) == (0, ITERS)
    finally:
        for pid in alive(job | {proc.pid}):  # only what a failed test leaves behind, by pid
            os.kill(pid, signal.SIGKILL)
        proc.wait(30)

    ended_by_watchdog = (results / "train.log").read_text(errors="replace").count("which started it, is gone")
    start = time.monotonic()
    resumed = spawn_ddp(results, "--resume", "true")
    assert resumed.wait(600) == 0, log_of(results)
    full_log = (results / "train.log").read_text(errors="replace")
    assert full_log.count("which started it, is gone") == ended_by_watchdog  # the finished run: no false alarm
    print(f"--resume after killing rank {killed} finished in {time.monotonic() - start:.1f} s")
    done = torch.load(last, map_location="cpu", weights_only=False)
    assert done["global_step"] == EPOCHS * ITERS
    assert (results / FOLD / "checkpoint_final.pth").is_file()


# -- the watchdog itself (rank_watchdog.py), without training ----------------------------------------------------------
ARMED_CHILD = """
import threading
from resenc_lightning.rank_watchdog import watch_launcher
with watch_launcher() as watchdog:
    print("armed" if watchdog is not None else "off", flush=True)
    threading.Event().wait()  # blocked, as a rank in a collective
"""
LAUNCHER = """
import os, subprocess, sys
env = {**os.environ, "RESENC_LIGHTNING_LAUNCHER": f"{os.getpid()}:0", "LOCAL_RANK": "1"}
with open(sys.argv[1], "wb") as out:
    child = subprocess.Popen([sys.executable, "-c", sys.argv[2]], env=env, stdout=out, stderr=subprocess.STDOUT)
print(child.pid, flush=True)
child.wait()
"""


def python_env() -> dict[str, str]:
    src = str(Path(resenc_lightning.__file__).parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def test_the_watchdog_ends_a_launched_rank_when_its_launcher_is_killed(tmp_path):
    out = tmp_path / "child.log"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(out), ARMED_CHILD], env=python_env(),
                                stdout=subprocess.PIPE, text=True)
    child = int(launcher.stdout.readline())
    try:
        assert wait_for(lambda: out.exists() and "armed" in out.read_text(), 60, launcher), out.read_text()
        launcher.kill()
        launcher.wait(10)
        assert wait_for(lambda: not alive({child}), 10), "the launched rank outlived its launcher"
        assert f"rank 1 (pid {child}) ends: rank 0 (pid {launcher.pid}), which started it, is gone" in out.read_text()
    finally:
        for pid in alive({child}):
            os.kill(pid, signal.SIGKILL)
        launcher.wait(10)


def test_a_rank_whose_launcher_died_before_it_started_ends_at_once_with_exit_code_1():
    env = {**python_env(), "RESENC_LIGHTNING_LAUNCHER": "999999999:0", "LOCAL_RANK": "1"}  # not its parent
    proc = subprocess.run([sys.executable, "-c", ARMED_CHILD], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stdout == "" and "rank 1 " in proc.stderr and "rank 0 (pid 999999999)" in proc.stderr


def test_no_watchdog_where_lightning_did_not_launch_the_rank(monkeypatch):
    """srun / torchrun start every rank themselves: they set LOCAL_RANK, never our variable."""
    from types import SimpleNamespace

    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    from resenc_lightning import rank_watchdog as rw

    slurm = {"SLURM_JOB_ID": "1", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "2",
             "SLURM_NTASKS_PER_NODE": "2", "LOCAL_RANK": "1"}
    assert rw.launcher_watchdog(slurm) is None
    assert rw.launcher_watchdog({"LOCAL_RANK": "1", rw.LAUNCHER_ENV: f"{os.getpid()}:0"}) is None  # the launcher
    assert rw.launcher_watchdog({rw.LAUNCHER_ENV: "123:0"}) is None  # no LOCAL_RANK: not a launched rank
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv(rw.LAUNCHER_ENV, raising=False)
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)

    def trainer(env):
        return SimpleNamespace(strategy=SimpleNamespace(cluster_environment=env), num_devices=2, node_rank=0)

    assert not rw.starts_ranks(trainer(SLURMEnvironment()))  # srun created the processes
    with rw.launching_ranks(trainer(SLURMEnvironment())):
        assert rw.LAUNCHER_ENV not in os.environ
    monkeypatch.delenv("LOCAL_RANK")
    assert rw.starts_ranks(trainer(LightningEnvironment()))  # `python train.py --trainer.devices 2`
    with rw.launching_ranks(trainer(LightningEnvironment())):
        assert os.environ[rw.LAUNCHER_ENV] == f"{os.getpid()}:0"
    assert rw.LAUNCHER_ENV not in os.environ  # nothing started after the fit inherits it


def test_the_watchdog_stops_when_the_rank_is_done(monkeypatch):
    from resenc_lightning import rank_watchdog as rw

    monkeypatch.setenv(rw.LAUNCHER_ENV, f"{os.getppid()}:0")  # this process's parent plays the launcher
    monkeypatch.setenv("LOCAL_RANK", "1")
    with rw.watch_launcher() as watchdog:
        assert watchdog is not None and watchdog.is_alive() and watchdog.rank == 1
    watchdog.join(5)
    assert not watchdog.is_alive()  # after the run the launcher may exit first without ending this rank


def test_a_launcher_that_finished_waits_for_the_ranks_it_started():
    from types import SimpleNamespace

    from resenc_lightning.rank_watchdog import outlive_started_ranks

    ranks = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2)]
    outlive_started_ranks(SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=ranks))))
    assert [r.returncode for r in ranks] == [0, 0]
    outlive_started_ranks(SimpleNamespace(strategy=SimpleNamespace(launcher=None)))  # one process: nothing to wait


def test_under_ddp_checkpoints_are_written_atomically(tiny_dataset, tmp_path):
    """Only rank 0 writes, through the strategy's CheckpointIO: the atomic one (behind the background writer), so a
    kill -9 of any rank (or the observer's SIGKILL of rank 0) mid-save leaves the previous last.ckpt whole."""
    from resenc_lightning.atomic import AtomicCheckpointIO
    from resenc_lightning.background_io import BackgroundCheckpointIO
    from resenc_lightning.cli import build_cli

    cli = build_cli(tiny_args(tmp_path, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                              "--trainer.strategy", "ddp"))
    assert type(cli.trainer.strategy).__name__ == "DDPStrategy"
    io = cli.trainer.strategy.checkpoint_io
    assert isinstance(io, BackgroundCheckpointIO) and isinstance(io.checkpoint_io, AtomicCheckpointIO)
