"""Checkpoints off the training thread: the training thread copies the state to host memory, a writer thread
serialises it once per boundary and writes every file of that boundary from the one serialisation.

Lightning's `AsyncCheckpointIO` is the base (its executor, its teardown wait), but its `save_checkpoint` clones each
tensor where it lives, i.e. on the GPU: the extra device memory would change the memory picture the cuDNN callbacks
equalise. `BackgroundCheckpointIO` snapshots to (pinned) host memory instead, and batches the saves of one boundary:
`last.ckpt`, `best.ckpt` and `epoch_NNNN.ckpt` of the same epoch and step are one `torch.save` (the dict of the
boundary's last call, which carries every ModelCheckpoint's updated state), the other names are hard links to the
finished file (linked to a temporary name, then renamed: still atomic). nnU-Net-format files (`save_derived`) come
from the same host snapshot: a tensor already copied for this boundary is not copied again.

Ordering and waits: one writer thread runs the jobs in submission order, and a new boundary's batch is submitted
only after the previous batch has finished, so a file is never written twice at once and at most one boundary's
snapshot is held besides the one being taken. A write error is kept and raised on the training thread at the next
boundary (`flush`/`wait`/`save_checkpoint`) as the one-line `CheckpointWriteError` of `atomic.py`; the failed file's
temporary is gone and the previous file intact. `synchronous()` (stop signals, requeue) writes on the caller thread
after the queue has drained.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection

from resenc_lightning.atomic import AtomicCheckpointIO, _fsync_dir, atomic_save, atomic_write, temporary_path
from resenc_lightning.fault_hooks import PAUSE_ENV, pause_before_rename, waiting_for_writes


class HostSnapshot:
    """Copies tensors to host memory once per boundary, keyed by storage address, shape and version counter (an
    in-place update bumps the version, so a stale copy is never reused). Device tensors go to pinned memory with
    non-blocking copies and one synchronisation (`finish`); no tensor is ever cloned on the device."""

    def __init__(self) -> None:
        self._copies: dict[tuple, torch.Tensor] = {}
        self._devices: set[torch.device] = set()
        self.nbytes = 0  # host bytes held by this snapshot

    def __call__(self, obj: Any) -> Any:
        out = apply_to_collection(obj, torch.Tensor, self._copy)
        self.finish()
        return out

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        try:
            version = t._version
        except RuntimeError:  # inference tensors have no version counter: never shared
            version = id(t)
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), version)
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = self._to_host(t)
            self.nbytes += copy.numel() * copy.element_size()
        return copy

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if on_host(t):
            return t.clone()  # training updates parameters in place: the writer needs its own copy
        out = pinned_empty(t)
        out.copy_(t, non_blocking=True)
        self._devices.add(t.device)
        return out

    def finish(self) -> None:
        """Wait for the non-blocking device-to-host copies (the writer must not read a half-copied buffer)."""
        for device in self._devices:
            synchronize(device)
        self._devices.clear()


# -- the device calls, one place each (tests replace them to exercise the CUDA path without a GPU)
def on_host(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def pinned_empty(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)


def synchronize(device: torch.device) -> None:
    torch.cuda.synchronize(device)


@dataclass
class _Batch:
    """One boundary's saves: the Lightning files (one serialisation) and the jobs that follow it in order."""

    key: tuple
    snapshot: HostSnapshot = field(default_factory=HostSnapshot)
    checkpoint: dict | None = None
    paths: list[Path] = field(default_factory=list)
    jobs: list[Callable[[], None]] = field(default_factory=list)

    def run(self) -> None:
        if self.checkpoint is not None:
            first, *others = self.paths
            atomic_save(self.checkpoint, first)
            for other in others:
                atomic_link(first, other)
        for job in self.jobs:
            job()


def atomic_link(source: Path, target: Path) -> None:
    """`target` becomes the finished `source` file: hard link to a temporary name, then rename (a copy where the
    filesystem has no hard links). Either the old or the new `target` exists at any moment."""
    tmp = temporary_path(target)
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        with open(source, "rb") as src, atomic_write(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return
    try:
        if PAUSE_ENV in os.environ:
            pause_before_rename(target)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """Lightning's AsyncCheckpointIO around our AtomicCheckpointIO, with a host snapshot and one serialisation per
    boundary (see the module docstring). Only rank 0 calls it (Lightning's strategies save on global zero)."""

    def __init__(self, checkpoint_io: Any | None = None) -> None:
        super().__init__(checkpoint_io if checkpoint_io is not None else AtomicCheckpointIO())
        self._batch: _Batch | None = None
        self._pending: Future | None = None
        self._sync = False
        self._lock = threading.Lock()
        self.peak_snapshot_bytes = 0

    # -- Lightning's CheckpointIO interface -----------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.raise_error()
        if self._sync or type(get_filesystem(path)).__name__ != "LocalFileSystem" or storage_options is not None:
            self.wait()
            assert self.checkpoint_io is not None
            return self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options)
        batch = self._batch_for((checkpoint.get("epoch"), checkpoint.get("global_step")))
        batch.checkpoint = batch.snapshot(checkpoint)  # the boundary's last dict wins: it has every callback's update
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path not in batch.paths:
            batch.paths.append(path)
        self._note_memory(batch)

    def remove_checkpoint(self, path: Any) -> None:
        if self._batch is None and self._pending is None:
            return super().remove_checkpoint(path)
        assert self.checkpoint_io is not None
        io = self.checkpoint_io
        batch = self._batch or self._batch_for(("remove", str(path)))
        batch.jobs.append(lambda: io.remove_checkpoint(path))

    def teardown(self) -> None:
        try:
            self.wait()
        finally:
            super().teardown()

    # -- ours -----------------------------------------------------------------------------------------------
    def save_derived(self, obj: Any, path: str | Path, key: tuple) -> None:
        """Write another format (nnU-Net's checkpoint_*.pth) of boundary `key`'s state from the same host snapshot."""
        self.raise_error()
        if self._sync:
            self.wait()
            return atomic_save(apply_to_collection(obj, torch.Tensor, lambda t: t.detach().cpu()), path)
        batch = self._batch_for(key)
        copy = batch.snapshot(obj)
        batch.jobs.append(lambda: atomic_save(copy, path))
        self._note_memory(batch)

    def then(self, job: Callable[[], None], key: tuple) -> None:
        """Run `job` on the writer after boundary `key`'s writes (e.g. remove checkpoint_latest.pth after final)."""
        if self._sync:
            self.wait()
            return job()
        self._batch_for(key).jobs.append(job)

    def flush(self) -> None:
        """Close the current boundary: submit its writes, after the previous boundary's have finished."""
        self.raise_error()
        batch, self._batch = self._batch, None
        if batch is None:
            return
        self._wait_pending()
        self._ensure_setup()
        assert self._executor is not None
        self._pending = self._executor.submit(self._run, batch)

    def wait(self, note: str | None = None) -> None:
        """Submit what is batched and block until every write has finished; raise a write error here."""
        self.flush()
        if note and self._pending is not None and not self._pending.done():
            rank_zero_info(note)
        self._wait_pending()
        self.raise_error()

    def raise_error(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    @property
    def pending(self) -> bool:
        return self._batch is not None or (self._pending is not None and not self._pending.done())

    @contextmanager
    def synchronous(self, note: str | None = None) -> Iterator[None]:
        """Drain the queue, then write on the caller thread (a stop or requeue saves and exits right after)."""
        self.wait(note)
        self._sync = True
        try:
            yield
        finally:
            self._sync = False

    def _batch_for(self, key: tuple) -> _Batch:
        if self._batch is not None and self._batch.key != key:
            self.flush()
        if self._batch is None:
            self._batch = _Batch(key)
        return self._batch

    def _wait_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            if PAUSE_ENV in os.environ:
                waiting_for_writes()
            pending.result()

    def _run(self, batch: _Batch) -> None:
        try:
            batch.run()
        except BaseException as e:
            with self._lock:
                self._error = self._error or e

    def _note_memory(self, batch: _Batch) -> None:
        self.peak_snapshot_bytes = max(self.peak_snapshot_bytes, batch.snapshot.nbytes)


def background_io(trainer: Any) -> BackgroundCheckpointIO | None:
    """The trainer's BackgroundCheckpointIO, or None when it saves another way."""
    io = getattr(trainer.strategy, "checkpoint_io", None)
    return io if isinstance(io, BackgroundCheckpointIO) else None
