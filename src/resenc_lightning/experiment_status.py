"""`experiment.py status`: one row per (configuration, fold) from the fold folder (nnU-Net's checkpoints, our CSV
log) and the scheduler (experiment_scheduler.scheduler_state), never from a state file of its own."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from resenc_lightning.experiment_plan import FoldJob
from resenc_lightning.experiment_scheduler import read_pointer, scheduler_state


@dataclass
class FoldStatus:
    job: FoldJob
    state: str  # pending / running / requeued / done / failed / stopped / not started
    job_id: str = "-"
    epoch: str = "-"
    ema: str = "-"
    epoch_time: str = "-"
    log: str = "-"

    def row(self) -> list[str]:
        return [self.job.configuration, self.job.fold, self.state, self.job_id, self.epoch, self.ema,
                self.epoch_time, self.log]


HEADER = ["configuration", "fold", "state", "job", "epoch", "EMA Dice", "epoch time", "log"]


def _last_metrics(folder: Path) -> dict[str, str]:
    """The newest CSV log row with an EMA pseudo-Dice (logs/version_N/metrics.csv; a resumed run adds a version)."""
    versions = sorted((folder / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    for path in reversed(versions):
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("ema_fg_dice")]
        if rows:
            return rows[-1]
    return {}


def _max_epochs(folder: Path) -> str:
    """trainer.max_epochs from the config.yaml the run saved next to its logs."""
    for path in sorted((folder / "logs").glob("version_*/config.yaml"), reverse=True) + [folder / "config.yaml"]:
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip().startswith("max_epochs:"):
                    return line.split(":", 1)[1].strip()
    return "?"


def fold_status(job: FoldJob) -> FoldStatus:
    ref = read_pointer(job.folder)
    live = scheduler_state(ref) if ref is not None else None
    if job.done:
        state = "done"
    elif live in ("pending", "running", "requeued", "failed"):
        state = live
    elif ref is None:
        state = "not started"
    else:
        state = "stopped"  # ended without finishing, or forgotten by the scheduler: a rerun resumes it
    status = FoldStatus(job, state)
    if ref is not None:
        status.job_id, status.log = ref.job_id, ref.log
    metrics = _last_metrics(job.folder)
    if metrics:
        status.epoch = f"{int(float(metrics['epoch'])) + 1}/{_max_epochs(job.folder)}"
        status.ema = f"{float(metrics['ema_fg_dice']):.4f}"
        if metrics.get("time/epoch_s"):
            status.epoch_time = f"{float(metrics['time/epoch_s']):.1f} s"
    return status


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def status_table(jobs: list[FoldJob]) -> str:
    return format_table([HEADER, *(fold_status(j).row() for j in jobs)])
