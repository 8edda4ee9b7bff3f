"""Checkpoints off the training thread: the training thread copies the state to host memory, a writer thread
serialises it once per boundary and writes every file of that boundary from the one serialisation.

Lightning's `AsyncCheckpointIO` is the base (its executor, its teardown wait), but its `save_checkpoint` clones each
tensor where it lives, i.e. on the GPU: the extra device memory would change the memory picture the cuDNN callbacks
equalise. `BackgroundCheckpointIO` snapshots to (pinned) host memory instead, and batches the saves of one boundary:
`last.ckpt`, `best.ckpt` and `epoch_NNNN.ckpt` of the same epoch and step are one `torch.save` (the dict of the
boundary's last call, which carries every ModelCheckpoint's updated state), the other names are kernel copies of the
finished file (to a temporary name, then renamed: still atomic; copies, not hard links, see `copy_finished`).
nnU-Net-format files (`save_derived`) come from the same host snapshot: a tensor already copied for this boundary is
not copied again. When a boundary has both
(an improving epoch: last, best and checkpoint_best.pth), the one serialised dict holds Lightning's keys and
nnU-Net's (they are disjoint; nnU-Net's `network_weights` and `optimizer_state` are the same host tensors as
Lightning's `state_dict` and `optimizer_states`, so torch.save stores each tensor once) and checkpoint_best.pth is a
copy of it too: the state is serialised once per epoch. Every key of either format is plain data (the file loads with
`weights_only=True`), so nnU-Net's loaders, which read only their keys, work without Lightning installed.

Ordering and waits: one writer thread runs the jobs in submission order, and a new boundary's snapshot starts only
after the previous boundary's writes have finished (in a real run they finished long before: an epoch takes far
longer than a write), so a file is never written twice at once, and the host buffers of the previous snapshot are
reused: one state's worth of (pinned) host memory in all, allocated once. A write error is kept and raised on the
training thread at the next boundary (`flush`/`wait`/`save_checkpoint`) as the one-line `CheckpointWriteError` of
`atomic.py`; the failed file's temporary is gone and the previous file intact. `synchronous()` (stop signals,
requeue) writes on the caller thread after the queue has drained.
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

from resenc_lightning.atomic import AtomicCheckpointIO, atomic_save, atomic_write
from resenc_lightning.fault_hooks import PAUSE_ENV, waiting_for_writes


class HostSnapshot:
    """Copies tensors to host memory once per boundary, keyed by storage address, shape and version counter (an
    in-place update bumps the version, so a stale copy is never reused). Device tensors go to pinned memory with
    non-blocking copies and one synchronisation (`finish`); no tensor is ever cloned on the device. The host buffers
    come from `pool` (the previous boundary's, already written) when shapes match: no allocation, no page faults,
    no repeated pinning after the first boundary."""

    def __init__(self, pool: dict[tuple, list[torch.Tensor]] | None = None) -> None:
        self._copies: dict[tuple, torch.Tensor] = {}
        self._pinned: set[tuple] = set()  # keys whose copy is a pinned buffer of a device tensor
        self._devices: set[torch.device] = set()
        self._pool = pool if pool is not None else {}
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
            if not on_host(t):
                self._pinned.add(key)
            self.nbytes += copy.numel() * copy.element_size()
        return copy

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        host = on_host(t)
        free = self._pool.get((tuple(t.shape), t.dtype, host))
        out = free.pop() if free else (torch.empty(t.shape, dtype=t.dtype) if host else pinned_empty(t))
        if host:
            return out.copy_(t)  # training updates parameters in place: the writer needs its own copy
        out.copy_(t, non_blocking=True)
        self._devices.add(t.device)
        return out

    def finish(self) -> None:
        """Wait for the non-blocking device-to-host copies (the writer must not read a half-copied buffer)."""
        for device in self._devices:
            synchronize(device)
        self._devices.clear()

    def buffers(self) -> dict[tuple, list[torch.Tensor]]:
        """The host buffers, as a pool for the next boundary (call only once the writes that use them are done)."""
        pool: dict[tuple, list[torch.Tensor]] = {}
        for key, copy in self._copies.items():
            pool.setdefault((tuple(copy.shape), copy.dtype, key not in self._pinned), []).append(copy)
        return pool


# -- the device calls, one place each (tests replace them to exercise the CUDA path without a GPU)
def on_host(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def pinned_empty(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)


def synchronize(device: torch.device) -> None:
    torch.cuda.synchronize(device)


@dataclass
class _Batch:
    """One boundary's saves: the Lightning files, the nnU-Net files, and the jobs that follow them, in order."""

    key: tuple
    snapshot: HostSnapshot = field(default_factory=HostSnapshot)
    checkpoint: dict | None = None
    paths: list[Path] = field(default_factory=list)
    derived: list[tuple[int, Any, Path]] = field(default_factory=list)  # (id of the source dict, host copy, path)
    jobs: list[Callable[[], None]] = field(default_factory=list)

    def run(self) -> None:
        derived = list(self.derived)
        if self.checkpoint is not None:
            obj, paths = self.checkpoint, list(self.paths)
            if derived and len({source for source, _, _ in derived}) == 1 and not set(derived[0][1]) & set(obj):
                # one file that is both: Lightning's keys and nnU-Net's, the tensors stored once (see module doc)
                obj = {**obj, **derived[0][1]}
                paths += [path for _, _, path in derived]
                derived = []
            first, *others = paths
            atomic_save(obj, first)
            for other in others:
                copy_finished(first, other)
        for _, obj, path in derived:
            atomic_save(obj, path)
        for job in self.jobs:
            job()


def copy_finished(source: Path, target: Path) -> None:
    """`target` becomes a copy of the finished `source` file, atomically (temporary, fsync, rename). A copy, not a
    hard link: `cp x last.ckpt` or a damaged last.ckpt must not change best.ckpt too (resume.py falls back on it).
    The kernel copies (copy_file_range: no trip through Python, a reflink where the filesystem has them)."""
    with open(source, "rb") as src, atomic_write(target, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        try:
            copied = 0
            while copied < size:
                n = os.copy_file_range(src.fileno(), dst.fileno(), size - copied)
                if n == 0:
                    break
                copied += n
        except OSError:  # not supported here (e.g. across filesystems on an old kernel): plain read/write
            src.seek(0)
            dst.seek(0)
            dst.truncate()
            shutil.copyfileobj(src, dst, 16 * 2**20)
        else:
            if copied < size:
                raise OSError(f"short copy of {source} to {target}: {copied} of {size} bytes")


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """Lightning's AsyncCheckpointIO around our AtomicCheckpointIO, with a host snapshot and one serialisation per
    boundary (see the module docstring). Only rank 0 calls it (Lightning's strategies save on global zero)."""

    def __init__(self, checkpoint_io: Any | None = None) -> None:
        super().__init__(checkpoint_io if checkpoint_io is not None else AtomicCheckpointIO())
        self._batch: _Batch | None = None
        self._pending: Future | None = None
        self._pool: dict[tuple, list[torch.Tensor]] = {}  # the last written boundary's host buffers
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
        batch.derived.append((id(obj), batch.snapshot(obj), Path(path)))
        self._note_memory(batch)

    def then(self, job: Callable[[], None], key: tuple) -> None:
        """Run `job` on the writer after boundary `key`'s writes (e.g. remove checkpoint_latest.pth after final)."""
        if self._sync:
            self.wait()
            return job()
        self._batch_for(key).jobs.append(job)

    def flush(self) -> None:
        """Close the current boundary: submit its writes (the previous boundary's finished before it began)."""
        self.raise_error()
        batch, self._batch = self._batch, None
        if batch is None:
            return
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
            # The previous boundary's writes finish first: a file is never written twice at once, its host buffers
            # are reused (one state's worth of host memory in all), and its error is raised here, at this boundary.
            self._wait_pending()
            self.raise_error()
            self._batch = _Batch(key, HostSnapshot(self._pool))
            self._pool = {}
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
        finally:
            self._pool = batch.snapshot.buffers()  # read only after this future is done (`_wait_pending`)

    def _note_memory(self, batch: _Batch) -> None:
        self.peak_snapshot_bytes = max(self.peak_snapshot_bytes, batch.snapshot.nbytes)


def background_io(trainer: Any) -> BackgroundCheckpointIO | None:
    """The trainer's BackgroundCheckpointIO, or None when it saves another way."""
    io = getattr(trainer.strategy, "checkpoint_io", None)
    return io if isinstance(io, BackgroundCheckpointIO) else None
