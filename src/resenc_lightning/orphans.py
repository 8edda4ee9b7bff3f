"""Augmentation workers die with the trainer, even when it is killed with SIGKILL.

batchgenerators' workers are daemon processes: a normal exit (or our DataModule teardown) stops
them, but after a kill -9 of the trainer they keep looping on their full queue forever. Each worker
calls `data_loader.set_thread_id` first thing, in the worker process; we hook that call to ask
the kernel (Linux `PR_SET_PDEATHSIG`) to kill the worker when its parent dies, with a watchdog
thread polling the parent pid as the fallback elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

_PR_SET_PDEATHSIG = 1


def die_with_parent(loader: Any) -> None:
    """Make the worker processes that will run `loader` exit when the current process dies."""
    if getattr(loader, "_dies_with_parent", False):
        return
    loader.set_thread_id = functools.partial(_set_thread_id_in_worker, loader.set_thread_id, os.getpid())
    loader._dies_with_parent = True


def _set_thread_id_in_worker(original: Callable[[int], None], parent_pid: int, thread_id: int) -> None:
    if os.getpid() != parent_pid:  # in-process augmentation calls this too: only act in a worker
        _arm(parent_pid)
    original(thread_id)


def _arm(parent_pid: int) -> None:
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:  # the parent died before we armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch, args=(parent_pid,), daemon=True).start()


def _watch(parent_pid: int, interval: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval)
    os._exit(1)
