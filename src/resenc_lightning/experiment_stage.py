"""`--stage_to`: copy the preprocessed dataset to node-local storage before a job trains, and train from the copy.

nnU-Net's loader reads many small files per step; from network storage that is a common cluster bottleneck
(nnU-Net #680, #2155). A file is copied only when the copy's size or mtime differs (copy2 keeps the mtime), so a
second job on the node skips it. Ranks of one job (and jobs sharing a node) serialise on a lock file.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path


def stage(source: Path, target_root: Path) -> tuple[Path, int]:
    """Bring `target_root/<source.name>` up to date with `source`; returns it and the number of files copied."""
    target = target_root / source.name
    target_root.mkdir(parents=True, exist_ok=True)
    copied = 0
    with open(target_root / f".{source.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for path in sorted(source.rglob("*")):
            dest = target / path.relative_to(source)
            if path.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            st = path.stat()
            if dest.is_file():
                dst = dest.stat()
                if dst.st_size == st.st_size and int(dst.st_mtime) == int(st.st_mtime):
                    continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.staging")
            shutil.copy2(path, tmp)
            os.replace(tmp, dest)  # a job killed mid-copy leaves no half file under the real name
            copied += 1
    return target, copied


def unstage(target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
