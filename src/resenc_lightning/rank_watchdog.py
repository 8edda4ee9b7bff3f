"""A rank that Lightning's launcher started ends as soon as the launcher (rank 0 of its node) dies.

Lightning's `ddp` launcher runs `python train.py ...` again for ranks 1..N-1 as children of rank 0, and its
`_ChildProcessObserver` in rank 0 kills the whole job when a child dies. Nothing watches the other way: after a
kill -9 of rank 0 its children wait on — NCCL ranks in their collective until NCCL's timeout (30 min by default),
any rank busy elsewhere until it next talks to rank 0 — together with their augmentation workers. So the launcher
leaves `<pid>:<rank>` in the environment its children inherit, and each child runs a daemon thread that ends the
process (one line on stderr, exit code 1) once its parent is no longer that pid; its workers follow by
`PR_SET_PDEATHSIG` (orphans.py). A thread, not a signal: a Python signal handler would wait for the main thread,
which may be blocked in the collective. A launcher that finishes normally waits for its ranks, so the watchdog
never fires then; ranks started by someone else (srun, torchrun) never inherit the variable, so it stays off there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

LAUNCHER_ENV = "RESENC_LIGHTNING_LAUNCHER"
EXIT_CODE = 1
_POLL_S = 0.2
_LAUNCHER_WAIT_S = 30.0
_active: LauncherWatchdog | None = None  # this process's watchdog, while watch_launcher runs


def starts_ranks(trainer: Any) -> bool:
    """Whether `trainer.fit` in this process will start the node's other ranks (Lightning's `ddp` launcher)."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    return env is not None and not env.creates_processes_externally and int(trainer.num_devices) > 1


@contextmanager
def launching_ranks(trainer: Any) -> Iterator[None]:
    """Around `trainer.fit` in the launching process: the ranks it starts inherit its pid and global rank."""
    if not starts_ranks(trainer):
        yield
        return
    previous = os.environ.get(LAUNCHER_ENV)
    os.environ[LAUNCHER_ENV] = f"{os.getpid()}:{int(trainer.node_rank) * int(trainer.num_devices)}"
    try:
        yield
    finally:  # nothing started after the fit inherits it
        if previous is None:
            os.environ.pop(LAUNCHER_ENV, None)
        else:
            os.environ[LAUNCHER_ENV] = previous


def outlive_started_ranks(trainer: Any, timeout_s: float = 120.0) -> None:
    """After a run that ended normally, the launcher waits (bounded) for the ranks it started: they leave the last
    collective with it, and one still tearing down must not find its parent gone and report it as a failure."""
    for proc in getattr(trainer.strategy.launcher, "procs", None) or []:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return


class LauncherWatchdog(threading.Thread):
    """Ends this process when its parent, the launcher, is gone (its parent pid changes)."""

    def __init__(self, launcher_pid: int, launcher_rank: int, rank: int, poll_s: float = _POLL_S) -> None:
        super().__init__(daemon=True, name="launcher-watchdog")
        self.launcher_pid, self.launcher_rank, self.rank, self.poll_s = launcher_pid, launcher_rank, rank, poll_s
        self._stopped = threading.Event()

    def launcher_gone(self) -> bool:
        return os.getppid() != self.launcher_pid

    def run(self) -> None:
        while not self._stopped.wait(self.poll_s):
            if self.launcher_gone():
                self.end()

    def stop(self) -> None:
        self._stopped.set()

    def end(self) -> None:
        print(f"resenc-lightning: rank {self.rank} (pid {os.getpid()}) ends: rank {self.launcher_rank} "
              f"(pid {self.launcher_pid}), which started it, is gone; continue the run with --resume.",
              file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)


def launcher_watchdog(environ: Mapping[str, str] | None = None) -> LauncherWatchdog | None:
    """The watchdog for this process if Lightning's launcher started it (LOCAL_RANK and our variable set, and the
    variable names another process), else None."""
    environ = os.environ if environ is None else environ
    launcher, local_rank = environ.get(LAUNCHER_ENV), environ.get("LOCAL_RANK")
    if not launcher or local_rank is None:
        return None
    try:
        pid, rank = (int(part) for part in launcher.split(":"))
        local = int(local_rank)
    except ValueError:
        return None
    if pid == os.getpid():
        return None
    return LauncherWatchdog(pid, rank, rank + local)


@contextmanager
def watch_launcher() -> Iterator[LauncherWatchdog | None]:
    """Around a launched rank's whole run (cli.main); elsewhere a no-op. Stopped on leaving: the rank's collectives
    are over then, and the launcher may be gone without anything being wrong."""
    global _active
    watchdog = _active = launcher_watchdog()
    if watchdog is not None:
        if watchdog.launcher_gone():  # died before this rank got here
            watchdog.end()
        watchdog.start()
    try:
        yield watchdog
    finally:
        _active = None
        if watchdog is not None:
            watchdog.stop()


def leave_after_launcher(timeout_s: float = _LAUNCHER_WAIT_S) -> None:
    """On a stop (a signal the ranks agreed on), a rank the launcher started waits, bounded, until the launcher has
    exited: Lightning's child-process observer in the launcher SIGKILLs it within 5 s of a child's non-zero exit,
    which would cut rank 0's stop short (its message, its exit status). Every rank has saved and left all
    collectives by now, so the launcher going first is expected: the watchdog is stopped before waiting."""
    watchdog = _active
    if watchdog is None:  # the launcher itself, or ranks that srun / torchrun started
        return
    watchdog.stop()
    end = time.monotonic() + timeout_s
    while not watchdog.launcher_gone() and time.monotonic() < end:
        time.sleep(0.02)
