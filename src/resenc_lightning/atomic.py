"""Crash-safe file writes: a file we write is either the complete old one or the complete new one.

Every checkpoint, export and summary goes through `atomic_write`: the bytes go to a hidden
temporary file in the same folder (same filesystem, so the rename is atomic), are flushed and
fsynced, and only then renamed over the target; the folder is fsynced so the rename survives a
power loss. A kill -9 or a full disk mid-write leaves the previous file untouched and at most a
`.<name>.tmp-<pid>` file, which `remove_stale_temporaries` deletes at the next start.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from resenc_lightning.fault_hooks import PAUSE_ENV, pause_before_rename

TMP_MARKER = ".tmp-"


class CheckpointWriteError(OSError):
    """Writing a checkpoint/export failed (disk full, quota, permissions); the previous file is intact."""


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; on success fsync and rename it over `path`."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if PAUSE_ENV in os.environ:  # test-only: kill -9 tests aim between fsync and rename
            pause_before_rename(path)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, CheckpointWriteError):
            reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
            raise CheckpointWriteError(
                e.errno, f"could not write {path}: {reason}; the previous {path.name} is intact. Free space (or fix "
                         f"the folder) and continue with --resume"
            ) from e
        raise
    _fsync_dir(path.parent)


def atomic_save(obj: Any, path: str | Path, save: Callable[[Any, IO[bytes]], None] | None = None) -> None:
    """`torch.save` (or another writer taking a file object) to `path`, atomically."""
    with atomic_write(path, "wb") as f:
        (save or torch.save)(obj, f)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_copy(source: str | Path, target: str | Path) -> None:
    with open(source, "rb") as src, atomic_write(target, "wb") as dst:
        shutil.copyfileobj(src, dst)


def remove_stale_temporaries(*folders: str | Path) -> list[Path]:
    """Delete `.<name>.tmp-<pid>` files a killed write left behind (not recursive). Returns what was removed."""
    removed = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for p in folder.glob(f".*{TMP_MARKER}*"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, but local checkpoints are written atomically (remote URLs unchanged)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options, got {storage_options!r}.")
        fs = get_filesystem(path)
        if type(fs).__name__ != "LocalFileSystem":
            return super().save_checkpoint(checkpoint, path, storage_options)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_save(checkpoint, path)
