"""Jobs through submitit (LocalExecutor or SlurmExecutor) and what the scheduler says about them now.

Each fold folder keeps one pointer, `experiment_job.json` (executor, job id, log): the job's state is always asked
of the scheduler (`scontrol show job`, or the local process), never stored, so it cannot drift. A fold whose job is
live gets no second job.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import JobPaths

from resenc_lightning.experiment_config import SlurmOptions

POINTER = "experiment_job.json"
LIVE_SLURM = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
              "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "PREEMPTED", "RESV_DEL_HOLD"}
FAILED_SLURM = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@dataclass
class JobRef:
    executor: str  # "slurm" or "local"
    job_id: str
    log: str
    folder: str  # submitit's folder (its pickles and result files)

    def result_file(self) -> Path:
        return JobPaths(self.folder, job_id=self.job_id, task_id=0).result_pickle


def job_ref(job: Any, executor: str, folder: Path) -> JobRef:
    return JobRef(executor, str(job.job_id), str(JobPaths(folder, job_id=str(job.job_id), task_id=0).stdout),
                  str(folder))


def write_pointer(fold_folder: Path, ref: JobRef) -> None:
    fold_folder.mkdir(parents=True, exist_ok=True)
    tmp = fold_folder / f".{POINTER}.tmp"
    tmp.write_text(json.dumps(ref.__dict__))
    os.replace(tmp, fold_folder / POINTER)


def read_pointer(fold_folder: Path) -> JobRef | None:
    try:
        return JobRef(**json.loads((fold_folder / POINTER).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def slurm_job(job_id: str) -> dict[str, str] | None:
    """`scontrol show job` as a dict (JobState, Restarts, ...); None once SLURM has forgotten the job."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or "JobState=" not in out.stdout:
        return None
    line = out.stdout.splitlines()[0]
    return dict(item.split("=", 1) for item in line.split() if "=" in item)


def live_slurm_job_named(name: str) -> str | None:
    """The id of a pending/running job with this name (the scheduler asked by job name), else None."""
    try:
        out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.stdout.splitlines():
        job_id, _, state = line.partition(" ")
        if state in LIVE_SLURM:
            return job_id
    return None


def local_alive(job_id: str) -> bool:
    """The LocalExecutor's controller process is still running (and is submitit's, not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{int(job_id)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"submitit" in cmdline


def scheduler_state(ref: JobRef) -> str | None:
    """pending / running / requeued / failed / ended, or None when the scheduler no longer knows the job."""
    if ref.executor == "local":
        if local_alive(ref.job_id):
            return "running"
        return _result_state(ref)
    info = slurm_job(ref.job_id)
    if info is None:
        return _result_state(ref)
    state = info.get("JobState", "")
    if state in LIVE_SLURM:
        if int(info.get("Restarts", "0") or 0) > 0 and state != "RUNNING":
            return "requeued"
        return "running" if state in ("RUNNING", "COMPLETING", "CONFIGURING") else "pending"
    return "failed" if state in FAILED_SLURM else "ended"


def _result_state(ref: JobRef) -> str | None:
    """submitit's result file: ("error", ...) for a job whose function raised."""
    path = ref.result_file()
    if not path.is_file():
        return None
    try:
        outcome = submitit.core.utils.pickle_load(path)[0]
    except Exception:
        return None
    return "failed" if outcome == "error" else "ended"


def is_live(ref: JobRef | None) -> bool:
    return ref is not None and scheduler_state(ref) in ("pending", "running", "requeued")


def slurm_executor(folder: Path, opts: SlurmOptions, job_name: str) -> submitit.SlurmExecutor:
    """Our signal, not submitit's: SIGUSR1 before the time limit goes to our handler (stop_signals.py), which
    saves at a step boundary and runs `scontrol requeue`; submitit's own USR2 handler is never signalled."""
    executor = submitit.SlurmExecutor(folder=folder)
    extra = dict(item.lstrip("-").split("=", 1) if "=" in item else (item.lstrip("-"), True)
                 for item in opts.extra_sbatch)
    params: dict[str, Any] = dict(job_name=job_name, time=opts.time_min, nodes=opts.nodes,
                                  ntasks_per_node=opts.tasks_per_node, cpus_per_task=opts.cpus_per_task,
                                  array_parallelism=opts.array_parallelism, signal_delay_s=opts.signal_delay_s,
                                  stderr_to_stdout=True, setup=list(opts.setup),
                                  additional_parameters={"signal": f"USR1@{opts.signal_delay_s}", "requeue": True,
                                                         **extra})
    if opts.partition:
        params["partition"] = opts.partition
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    if opts.mem_gb:
        params["mem"] = f"{int(opts.mem_gb * 1024)}MB"
    executor.update_parameters(**params)
    return executor


def local_executor(folder: Path, gpu: int | None) -> submitit.LocalExecutor:
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=60 * 24 * 365, stderr_to_stdout=True,
                               gpus_per_node=0 if gpu is None else 1,
                               **({} if gpu is None else {"visible_gpus": (gpu,)}))
    return executor
