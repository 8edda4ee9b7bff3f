"""One command for a dataset's whole experiment: every (configuration, fold) as its own submitit job, on local
GPUs/CPUs or SLURM, then nnUNetv2_find_best_configuration. `python experiment.py --help` lists every option.

Idempotent: finished folds (checkpoint_final.pth) are skipped, started ones resume (--resume), a fold whose job is
live (experiment_scheduler.is_live) gets no second job. On SLURM the jobs outlive this command; model selection is a
job that depends on them (afterok). Preemption and time limits are handled inside the training (stop_signals.py).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from submitit.core.utils import JobPaths

from resenc_lightning import experiment_job
from resenc_lightning.experiment_config import parse
from resenc_lightning.experiment_plan import FoldJob, dataset_name, plan, results_root
from resenc_lightning.experiment_scheduler import (
    JobRef,
    is_live,
    job_ref,
    live_slurm_job_named,
    local_executor,
    read_pointer,
    scheduler_state,
    slurm_executor,
    write_pointer,
)
from resenc_lightning.experiment_status import status_table


class Experiment:
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.results = results_root(cfg.results_dir)
        self.dataset = dataset_name(cfg.dataset)
        self.waves = plan(cfg.configurations, cfg.folds, cfg.plans, cfg.trainer_name, self.results, self.dataset)
        self.log_dir = Path(cfg.log_dir) if cfg.log_dir else self.results / self.dataset / "experiment_logs"
        self.slurm = cfg.slurm.partition is not None

    @property
    def jobs(self) -> list[FoldJob]:
        return [j for wave in self.waves for j in wave]

    def train_call(self, job: FoldJob) -> tuple[Any, ...]:
        extra = list(self.cfg.train_args)
        opts = self.cfg.slurm
        if self.slurm and opts.tasks_per_node * opts.nodes > 1 and not any(a.startswith("--trainer.devices") for a in extra):
            extra += ["--trainer.devices", str(opts.tasks_per_node), "--trainer.num_nodes", str(opts.nodes)]
        args = job.train_args(self.cfg.plans, self.dataset, self.cfg.trainer_name, self.results, extra)
        return experiment_job.train_fold, args, self.dataset, self.cfg.stage_to, self.cfg.stage_clean

    def find_best_call(self) -> tuple[Any, ...]:
        return (experiment_job.find_best, self.dataset, list(self.cfg.configurations), self.cfg.plans,
                self.cfg.trainer_name, list(self.cfg.folds), str(self.results))

    # -- failures -------------------------------------------------------------------------------------------
    def refuse_if_failed(self, jobs: list[FoldJob]) -> None:
        failed = [(j, read_pointer(j.folder)) for j in jobs if not j.done]
        failed = [(j, ref) for j, ref in failed if ref is not None and scheduler_state(ref) == "failed"]
        if failed:
            job, ref = failed[0]
            more = f" (and {len(failed) - 1} more fold(s))" if len(failed) > 1 else ""
            raise SystemExit(f"error: {job.name} failed{more}, see {ref.log}; model selection not run. Fix it and rerun "
                             f"this command: finished folds are kept, the failed one resumes.")

    # -- SLURM ----------------------------------------------------------------------------------------------
    def run_slurm(self) -> None:
        job_name = f"resenc-{self.dataset}"
        depend: list[str] = []  # job ids model selection waits for
        submitted: list[tuple[FoldJob, JobRef]] = []
        for wave in self.waves:
            todo, live = self.split(wave)
            depend += [ref.job_id for _, ref in live]
            executor = slurm_executor(self.log_dir, self.cfg.slurm, job_name)
            if depend and wave is not self.waves[0]:
                executor.update_parameters(dependency="afterok:" + ":".join(depend))
            if not todo:
                continue
            with executor.batch():
                handles = [executor.submit(*self.train_call(j)) for j in todo]
            for job, handle in zip(todo, handles):
                ref = job_ref(handle, "slurm", self.log_dir)
                write_pointer(job.folder, ref)
                submitted.append((job, ref))
                depend.append(ref.job_id)
            print(f"Submitted {len(todo)} job(s) as array {handles[0].job_id.split('_')[0]}: "
                  f"{', '.join(j.name for j in todo)}", flush=True)
        best_ref = None
        live_best = live_slurm_job_named(f"{job_name}-find-best") if self.cfg.find_best else None
        if live_best is not None and not submitted:
            best_ref = JobRef("slurm", live_best, str(JobPaths(self.log_dir, job_id=live_best, task_id=0).stdout),
                              str(self.log_dir))
            print(f"Model selection job {live_best} is live (waits for the folds), not started again.", flush=True)
        elif self.cfg.find_best:
            if live_best is not None:  # it waits on the old jobs only: replace it by one that waits on all
                subprocess.run(["scancel", live_best], check=False)
            executor = slurm_executor(self.log_dir, self.cfg.slurm, f"{job_name}-find-best")
            executor.update_parameters(ntasks_per_node=1, nodes=1, cpus_per_task=min(2, self.cfg.slurm.cpus_per_task),
                                       **({"dependency": "afterok:" + ":".join(depend)} if depend else {}))
            if self.cfg.slurm.gpus_per_node:
                executor.update_parameters(gpus_per_node=0)
            handle = executor.submit(*self.find_best_call())
            best_ref = job_ref(handle, "slurm", self.log_dir)
            print(f"Submitted model selection as job {best_ref.job_id} (runs once every fold is done).", flush=True)
        if not self.cfg.wait:
            print("Not waiting (--wait false): the jobs go on; `experiment.py status` with the same options shows them.")
            return
        self.wait_slurm(best_ref)

    def split(self, wave: list[FoldJob]) -> tuple[list[FoldJob], list[tuple[FoldJob, JobRef]]]:
        """(jobs to submit, jobs already live) of a wave; done folds are neither."""
        todo, live = [], []
        for job in wave:
            if job.done:
                print(f"{job.name}: done, skipped.", flush=True)
                continue
            ref = read_pointer(job.folder)
            if ref is not None and is_live(ref):
                print(f"{job.name}: job {ref.job_id} is live ({scheduler_state(ref)}), not started again.", flush=True)
                live.append((job, ref))
            else:
                todo.append(job)
        return todo, live

    def wait_slurm(self, best_ref: JobRef | None) -> None:
        while True:
            pending = [j for j in self.jobs if not j.done and is_live(read_pointer(j.folder))]
            if not pending:
                break
            time.sleep(self.cfg.poll_s)
        try:
            self.refuse_if_failed(self.jobs)
        except SystemExit:
            if best_ref is not None:  # its dependency can never be satisfied
                subprocess.run(["scancel", best_ref.job_id], check=False)
            raise
        if best_ref is None:
            return
        while is_live(best_ref):
            time.sleep(self.cfg.poll_s)
        self.print_selection(best_ref)

    def print_selection(self, ref: JobRef) -> None:
        if scheduler_state(ref) == "failed":
            raise SystemExit(f"error: nnUNetv2_find_best_configuration failed, see {ref.log}.")
        instructions = self.results / self.dataset / "inference_instructions.txt"
        print(f"Model selection done ({ref.log}). nnU-Net's inference commands ({instructions}):", flush=True)
        print(instructions.read_text(), flush=True)

    # -- local ----------------------------------------------------------------------------------------------
    def run_local(self) -> None:
        slots: list[int | None] = list(self.cfg.gpus) if self.cfg.gpus else [None] * max(1, self.cfg.jobs)
        for wave in self.waves:
            todo, live = self.split(wave)
            if live:
                raise SystemExit(f"error: {live[0][0].name} has a live job ({live[0][1].job_id}); wait for it to end "
                                 f"(`experiment.py status`) and rerun.")
            running: dict[int, tuple[FoldJob, Any]] = {}
            while todo or running:
                for slot, gpu in enumerate(slots):
                    if slot not in running and todo:
                        job = todo.pop(0)
                        handle = local_executor(self.log_dir, gpu).submit(*self.train_call(job))
                        write_pointer(job.folder, job_ref(handle, "local", self.log_dir))
                        where = "CPU" if gpu is None else f"GPU {gpu}"
                        print(f"{job.name}: started (pid {handle.job_id}, {where}).", flush=True)
                        running[slot] = (job, handle)
                for slot, (job, handle) in list(running.items()):
                    if handle.done():
                        del running[slot]
                        handle.wait()
                        print(f"{job.name}: {'done' if job.done else 'ended unfinished'}.", flush=True)
                time.sleep(0.5)
            self.refuse_if_failed(wave)
            unfinished = [j for j in wave if not j.done]
            if unfinished:
                log = read_pointer(unfinished[0].folder).log
                raise SystemExit(f"error: {unfinished[0].name} ended unfinished, see {log}; rerun this command to "
                                 f"continue it.")
        if self.cfg.find_best:
            handle = local_executor(self.log_dir, None).submit(*self.find_best_call())
            ref = job_ref(handle, "local", self.log_dir)
            try:
                handle.result()
            except Exception:
                raise SystemExit(f"error: nnUNetv2_find_best_configuration failed, see {ref.log}.") from None
            self.print_selection(ref)


def main(argv: list[str] | None = None) -> None:
    command, cfg = parse(sys.argv[1:] if argv is None else argv)
    experiment = Experiment(cfg)
    if command == "status":
        print(status_table(experiment.jobs), flush=True)
        return
    experiment.log_dir.mkdir(parents=True, exist_ok=True)
    if experiment.slurm:
        experiment.run_slurm()
    else:
        experiment.run_local()
