"""Which of the processes NVML lists on our GPU are this trainer's, and whether NVML's pids are ours to compare at all.

Ours: every rank (gathered once, since under DDP a rank may hold a context on another rank's GPU), this process's
parent (rank 0 under Lightning's launcher) and the descendants of all of them (the augmentation workers).

NVML reports pids in the host's PID namespace. In a container without the host PID namespace they match no local
process: this trainer would then count itself as "another process", `--require_exclusive_gpu` would refuse to train
and EpochTiming would blame other processes. So: if one of our pids is listed, the namespaces agree; if none is
listed although this process holds CUDA memory on the device, or some listed pid does not exist here, they do not,
and who else uses the GPU is unknown (None), not a list.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch.distributed as dist

CONTAINER = "unknown (container without host PID namespace: NVML's process ids are not this container's)"
UNLISTED = "unknown (NVML lists no process on this GPU, not even this one)"


def rank_pids() -> list[int]:
    """Every rank's pid. A collective under torch.distributed: call it on every rank at the same point."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[int | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, os.getpid())
        return [int(p) for p in gathered if p is not None]
    return [os.getpid()]


def _children(proc: Path) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    try:
        entries = [p for p in proc.iterdir() if p.name.isdigit()]
    except OSError:
        return children
    for entry in entries:
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # after "(comm) state": ppid
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def own_pids(roots: Iterable[int] = (), proc: str = "/proc") -> set[int]:
    """`roots` (the ranks), this process and its parent, and every descendant of the ranks and this process."""
    start = {os.getpid(), *(int(r) for r in roots)}
    children = _children(Path(proc))
    own, todo = set(start), list(start)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in own:
                own.add(child)
                todo.append(child)
    own.add(os.getppid())
    return own


def pid_exists(pid: int) -> bool:
    """A process with this pid exists in this PID namespace (signal 0 checks without sending anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # exists, another user's
    except (OSError, OverflowError, ValueError):
        return False
    return True


def others(listed: dict[int, int], own: set[int], expect_own_listed: bool,
           exists: Callable[[int], bool] = pid_exists) -> tuple[list[tuple[int, int]] | None, str | None]:
    """The (pid, bytes) NVML lists that are not ours, or (None, why) when NVML's pids cannot be compared with ours."""
    if any(pid in own for pid in listed):
        return [(pid, used) for pid, used in listed.items() if pid not in own], None
    if not listed:
        return (None, UNLISTED) if expect_own_listed else ([], None)
    if expect_own_listed or not all(exists(pid) for pid in listed):
        return None, CONTAINER
    return list(listed.items()), None
