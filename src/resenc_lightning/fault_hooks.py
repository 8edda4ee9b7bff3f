"""Test-only pause points: fault tests kill or signal a training process at an exact event, on any machine.

A test that sleeps and then kills hits "some time later", which on a fast machine is after the run ended.
With `RESENC_LIGHTNING_TEST_PAUSE=<event>@<marker file>` the process stops at the event, writes the marker
file and blocks until the test acts: it kills it, sends a stop signal (which ends the pause), or creates
`<marker>.release`. On leaving the pause the process writes `<marker>.left`. Events:

- `step=N`: after global step N's training step (first in `on_train_batch_end`, before any stop handling);
- `val=E`: after the first validation batch of epoch E;
- `final=1`: at the first network forward of the final (sliding-window) validation;
- `write=NAME`: while NAME's temporary file is complete and fsynced but not yet renamed (see `atomic.py`); with
  background checkpoints this holds the writer thread, and when the training thread then has to wait for that
  write (next boundary, stop, end of training) it writes `<marker>.waiting` first.

Under DDP each rank uses `<marker>.rank<N>`. Unset (every real run), the CLI adds no callback and
`atomic_write` does one dict lookup: production pays nothing. Never set it outside tests.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

PAUSE_ENV = "RESENC_LIGHTNING_TEST_PAUSE"
_POLL_S = 0.01


def pause_spec() -> tuple[str, str, Path] | None:
    """(event kind, its argument, marker path) from the environment, or None when no pause is asked for."""
    value = os.environ.get(PAUSE_ENV)
    if not value:
        return None
    event, _, marker = value.partition("@")
    kind, _, arg = event.partition("=")
    if kind not in ("step", "val", "write", "final") or not arg or not marker:
        raise ValueError(f"{PAUSE_ENV}={value!r}: expected step=N@FILE, val=E@FILE, final=1@FILE or write=NAME@FILE")
    return kind, arg, Path(marker)


def pause(marker: Path, note: str, released: Callable[[], bool] = lambda: False) -> None:
    """Write `marker`, block until `<marker>.release` exists or `released()`, then write `<marker>.left`."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    _write_whole(marker, note)
    release = marker.with_name(marker.name + ".release")
    while not (release.exists() or released()):
        time.sleep(_POLL_S)
    _write_whole(marker.with_name(marker.name + ".left"), note)


def _write_whole(path: Path, text: str) -> None:
    """The file appears with its text (rename): a test that waits for it to exist never reads it half written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def pause_before_rename(path: Path) -> None:
    """The `write=NAME` event, called by `atomic_write` between fsync and rename."""
    spec = pause_spec()
    if spec is not None and spec[0] == "write" and path.name == spec[1]:
        pause(spec[2], f"{path} on thread {threading.current_thread().name}")


def waiting_for_writes() -> None:
    """The training thread is about to block on a background write (the `write=NAME` event's `<marker>.waiting`)."""
    spec = pause_spec()
    if spec is not None and spec[0] == "write":
        _write_whole(spec[2].with_name(spec[2].name + ".waiting"), "waiting for a checkpoint write")


def rank_marker(marker: Path) -> Path:
    """`<marker>.rank<N>` under DDP, so each rank's pause is seen (and released) on its own."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return marker.with_name(f"{marker.name}.rank{dist.get_rank()}")
    return marker


def pause_in_final_validation(network: torch.nn.Module, released: Callable[[], bool]) -> Any:
    """The `final=1` event: a forward pre-hook that pauses once; returns its handle (None when not asked for)."""
    spec = pause_spec()
    if spec is None or spec[0] != "final":
        return None
    done: list[bool] = []

    def hook(module: torch.nn.Module, args: Any) -> None:
        if not done:
            done.append(True)
            pause(rank_marker(spec[2]), "final validation", released)

    return network.register_forward_pre_hook(hook)


class PauseAt(pl.Callback):
    """The `step=N` / `val=E` events (added by the CLI only when `RESENC_LIGHTNING_TEST_PAUSE` asks for one)."""

    def __init__(self, kind: str, value: int, marker: Path) -> None:
        self.kind, self.value, self.marker = kind, value, marker
        self.done = False

    @classmethod
    def from_env(cls) -> PauseAt | None:
        spec = pause_spec()
        if spec is None or spec[0] in ("write", "final"):
            return None
        return cls(spec[0], int(spec[1]), spec[2])

    def _pause(self, trainer: pl.Trainer) -> None:
        self.done = True
        marker = rank_marker(self.marker)

        def stop_requested() -> bool:
            return bool(trainer.received_sigterm) or any(getattr(c, "stop_pending", False) for c in trainer.callbacks)

        pause(marker, f"epoch {trainer.current_epoch} step {trainer.global_step}", stop_requested)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self.done and self.kind == "step" and trainer.global_step == self.value:
            self._pause(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self.done and self.kind == "val" and trainer.current_epoch == self.value and not trainer.sanity_checking:
            self._pause(trainer)
