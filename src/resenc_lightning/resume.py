"""Which checkpoint a run continues from, and whether it belongs to this run: the resume policy.

`--resume` (or a requeued SLURM job, which reruns the same command) continues from the fold's
last.ckpt, or from Lightning's newer `hpc_ckpt_N.ckpt` written on the requeue signal, or, when
last.ckpt is damaged, from the newest intact checkpoint. Without `--resume` a fold that already
has checkpoints is refused, so nothing on disk is overwritten.

Writes are atomic (atomic.py), so a damaged file means something outside our control (a copy
cut short, a failing disk, a file from an older version). We read each candidate's header
lazily (`mmap`, no tensor data), and fall back to the newest intact one by the (global_step,
epoch) stored inside.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from resenc_lightning.atomic import remove_stale_temporaries
from resenc_lightning.plans import RunSpec

LAST_CHECKPOINT = "last.ckpt"
BEST_CHECKPOINT = "best.ckpt"


class CheckpointError(ValueError):
    """No usable checkpoint: the message names the file(s) and what to do."""


class ResumeError(ValueError):
    """A user-fixable resume problem (one line: the file, and what to do)."""


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


def slurm_requeue(output_folder: Path) -> tuple[bool, CheckpointInfo | None]:
    """Whether this is a requeued SLURM job (SLURM_RESTART_COUNT > 0, or Lightning's `hpc_ckpt_N.ckpt`, written on
    the requeue signal, present), and the newest hpc checkpoint if it is intact."""
    if not SLURMEnvironment.detect():
        return False, None
    hpc = sorted(output_folder.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    if not hpc:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0, None
    try:
        return True, read_checkpoint_info(hpc[-1])
    except CheckpointError as e:
        print(f"error: {e}", flush=True)
        return True, None


def resume_checkpoint(checkpoint_dir: Path, output_folder: Path, spec: RunSpec, resume: bool,
                      is_global_zero: bool = True) -> str | None:
    """The checkpoint this run continues from (None: a fresh start). Raises ResumeError when --resume has nothing
    to continue from, when a fresh start would overwrite checkpoints, or when the checkpoint is another run's."""
    last = checkpoint_dir / LAST_CHECKPOINT
    for stale in remove_stale_temporaries(checkpoint_dir, output_folder, output_folder.parent):
        print(f"Removed {stale}, left by an interrupted write.", flush=True)
    requeued, hpc = slurm_requeue(output_folder)
    has_checkpoints = checkpoint_dir.is_dir() and any(checkpoint_dir.glob("*.ckpt"))
    if requeued and (has_checkpoints or hpc is not None):
        resume = True  # the requeued job runs the same command: no --resume needed
    if not resume:
        if has_checkpoints:
            raise ResumeError(f"{checkpoint_dir} already holds checkpoints; add --resume to continue that run, "
                              f"or pass another --fold / --data.trainer_name (nothing was overwritten).")
        return None
    if not has_checkpoints and hpc is None:
        raise ResumeError(f"--resume given but there is no checkpoint at {last}; run without --resume to start "
                          f"this fold.")
    chosen, problems = None, []
    if has_checkpoints:
        try:
            chosen, problems = choose_resume_checkpoint(checkpoint_dir, LAST_CHECKPOINT)
        except CheckpointError as e:
            if hpc is None:
                raise ResumeError(str(e)) from None
            problems = [str(e)]
    for problem in problems:
        print(f"error: {problem}", flush=True)
    if hpc is not None and (chosen is None or (hpc.global_step, hpc.epoch) > (chosen.global_step, chosen.epoch)):
        chosen = hpc  # written on the requeue signal, after the fold's last checkpoint
    if requeued and is_global_zero:
        print(f"SLURM job {os.environ.get('SLURM_JOB_ID', '?')} requeued: resuming from {chosen.path}", flush=True)
    elif problems:
        print(f"Resuming from the newest intact checkpoint {chosen.path} (epoch {chosen.epoch}, step "
              f"{chosen.global_step}).", flush=True)
    mismatch = spec.checkpoint_mismatch(chosen.nnunet)
    if mismatch:
        raise ResumeError(f"--resume checkpoint {chosen.path} was {mismatch}; resume with the same "
                          f"--dataset/--plans/--configuration/--fold or start a new run in another folder.")
    return str(chosen.path)


def validation_checkpoint(checkpoint_dir: Path, best: bool) -> Path:
    """--validate_only's checkpoint: the fold's last.ckpt, or best.ckpt with --val_best (nnU-Net's --val_best)."""
    path = checkpoint_dir / (BEST_CHECKPOINT if best else LAST_CHECKPOINT)
    if not path.is_file():
        raise ResumeError(f"--validate_only needs {path}, which does not exist; train this fold first "
                          f"(or drop --val_best to use {LAST_CHECKPOINT}).")
    return path
