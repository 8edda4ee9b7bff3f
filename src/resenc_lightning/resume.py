"""Pick the checkpoint `--resume` continues from, surviving a corrupt or truncated last.ckpt.

Writes are atomic (atomic.py), so a damaged file means something outside our control (a copy
cut short, a failing disk, a file from an older version). We read each candidate's header
lazily (`mmap`, no tensor data), and fall back to the newest intact one by the (global_step,
epoch) stored inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """No usable checkpoint: the message names the file(s) and what to do."""


@dataclass
class CheckpointInfo:
    path: Path
    epoch: int
    global_step: int
    nnunet: dict


def read_checkpoint_info(path: Path) -> CheckpointInfo:
    """Open a Lightning checkpoint without loading tensors; raises CheckpointError naming the file when damaged."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "epoch" not in ckpt:
            raise ValueError("not a Lightning checkpoint")
        return CheckpointInfo(path, int(ckpt["epoch"]), int(ckpt.get("global_step", 0)), dict(ckpt.get("nnunet", {})))
    except Exception as e:  # truncated zip, garbage bytes, unpickling errors: all mean "not usable"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({reason})") from None


def choose_resume_checkpoint(folder: Path, preferred: str = "last.ckpt") -> tuple[CheckpointInfo, list[str]]:
    """`preferred` if intact, else the newest intact *.ckpt in `folder`. Returns it and the problems met."""
    problems: list[str] = []
    first = folder / preferred
    if first.is_file():
        try:
            return read_checkpoint_info(first), problems
        except CheckpointError as e:
            problems.append(str(e))
    else:
        problems.append(f"{first} is missing")
    intact = []
    for path in sorted(folder.glob("*.ckpt")):
        if path.name == preferred:
            continue
        try:
            intact.append(read_checkpoint_info(path))
        except CheckpointError as e:
            problems.append(str(e))
    if not intact:
        detail = "; ".join(problems) or f"there is no checkpoint in {folder}"
        raise CheckpointError(f"--resume found no intact checkpoint: {detail}; run without --resume (and another "
                              f"--fold or --data.trainer_name) to start over")
    return max(intact, key=lambda c: (c.global_step, c.epoch, c.path.name == "last.ckpt")), problems
