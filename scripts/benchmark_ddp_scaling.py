"""DDP scaling: steps/s, samples/s and data wait for 1..N processes on the same data and plans.

    python scripts/benchmark_ddp_scaling.py                       # CPU here: 1 vs 2 processes (gloo), ~6 min
    python scripts/benchmark_ddp_scaling.py --device cuda --processes 1,2,4,8 --global-batch 8

Each run is `python train.py` in its own process group, as a user runs it, with a small timing
callback (`StepClock`, below) on every rank. nnU-Net's semantics make this strong scaling: the
plans' batch is the global batch, split over the ranks, so more processes = smaller per-rank
batches, same samples per step. On CPU each rank gets one torch thread (gloo), like one GPU per rank:
N processes use N cores. (Two intra-op threads in one process on a loaded 2-core machine were 10x
slower per step than one thread in our measurements: OpenMP spin-waits under contention.) Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

REPO = Path(__file__).resolve().parents[1]
DATASET_ID, DATASET_NAME = 988, "Dataset988_ResEncScaling"
SOURCE_PLANS = "nnUNetResEncUNetLPlans"


class StepClock(pl.Callback):
    """Per-rank wall time of each training step and the time blocked on its batch (first epoch skipped)."""

    def __init__(self, out_dir: str, skip_epochs: int = 1) -> None:
        self.out_dir = Path(out_dir)
        self.skip_epochs = skip_epochs
        self.steps: list[float] = []
        self.waits: list[float] = []
        self._last_end: float | None = None
        self._start = 0.0

    def _now(self, pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last_end = self._now(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()
        if trainer.current_epoch >= self.skip_epochs and self._last_end is not None:
            self.waits.append(self._start - self._last_end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_end = self._now(pl_module)
        if trainer.current_epoch >= self.skip_epochs:
            self.steps.append(self._last_end - self._start)

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "steps": self.steps,
                  "waits": self.waits, "batch_size": trainer.datamodule.batch_size}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--processes", default=None, help="comma-separated process counts (cpu: 1,2; cuda: 1,2,...,#GPUs)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/resenc_ddp_scaling"))
    p.add_argument("--global-batch", type=int, default=None,
                   help="override the plans' (global) batch size, >= the largest process count (cpu default 4)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per process count, alternated (1 2 1 2 ...); the table gives medians")
    p.add_argument("--features", default="4,8,16,32",
                   help="cpu: features_per_stage of the shrunk ResEnc L plans (cuda uses the real plans)")
    p.add_argument("--patch", type=int, default=32, help="cpu: cubic patch size of the shrunk plans")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--shape", type=int, default=40, help="edge length of the synthetic cases")
    p.add_argument("--iters", type=int, default=12, help="training steps per epoch")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; the first is warm-up and not timed")
    p.add_argument("--threads", type=int, default=None,
                   help="cpu: torch threads per process (default 1: one core per rank, as one GPU per rank)")
    p.add_argument("--n-proc-da", type=int, default=None,
                   help="augmentation workers per rank (nnUNet_n_proc_DA); default 0 on cpu, 8 on cuda")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> str:
    """Synthetic dataset planned by nnunetv2's ResEnc L planner; returns the plans identifier to train."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[var] = str(args.workdir / var)
        Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
    from resenc_lightning import demo

    folder = demo.build_dataset(DATASET_ID, DATASET_NAME, SOURCE_PLANS, n_cases=args.cases,
                                shape_range=(args.shape - 4, args.shape + 4), extra_configuration=False)
    plans = json.loads((folder / f"{SOURCE_PLANS}.json").read_text())
    name = f"{SOURCE_PLANS}_scaling_{args.device}"
    global_batch = args.global_batch or (4 if args.device == "cpu" else None)
    if args.device == "cpu":
        plans = demo.derive_plans(plans, name, features=[int(f) for f in args.features.split(",")], patch=args.patch,
                                  batch_size=global_batch)
    else:
        plans = demo.derive_plans(plans, name, batch_size=global_batch)
    (folder / f"{name}.json").write_text(json.dumps(plans, indent=2))
    return name


def run(args: argparse.Namespace, plans: str, processes: int) -> dict:
    tag = f"p{processes}"
    out = args.workdir / "clock" / tag
    results = args.workdir / "results" / tag
    for folder in (out, results):
        shutil.rmtree(folder, ignore_errors=True)
    clock = json.dumps({"class_path": "benchmark_ddp_scaling.StepClock", "init_args": {"out_dir": str(out)}})
    cmd = [sys.executable, str(REPO / "train.py"), "--plans", plans, "--dataset", str(DATASET_ID), "--fold", "0",
           "--data.results_dir", str(results), "--data.num_iterations_per_epoch", str(args.iters),
           "--data.num_val_iterations_per_epoch", "1", "--trainer.max_epochs", str(args.epochs),
           "--trainer.accelerator", "gpu" if args.device == "cuda" else "cpu", "--trainer.devices", str(processes),
           "--trainer.enable_model_summary", "false", "--final_validation", "false", "--nnunet_export.enabled", "false",
           "--seed_everything", "1", f"--trainer.callbacks+={clock}"]
    if processes > 1:
        cmd += ["--trainer.strategy", "ddp"]
    n_proc_da = args.n_proc_da if args.n_proc_da is not None else (0 if args.device == "cpu" else 8)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "scripts"), os.environ.get("PYTHONPATH", "")]),
           "nnUNet_n_proc_DA": str(n_proc_da), "nnUNet_compile": "f"}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(args.threads or 1)
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{processes}-process run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    # a DDP step ends when the slowest rank's gradients are reduced: per step, take the slowest rank
    step_s = [max(r["steps"][i] + r["waits"][i] for r in ranks) for i in range(len(ranks[0]["steps"]))]
    median_step = statistics.median(step_s)
    return {"processes": processes, "threads": env.get("OMP_NUM_THREADS", "-"),
            "per_rank_batch": "+".join(str(r["batch_size"]) for r in ranks),
            "global_batch": sum(r["batch_size"] for r in ranks), "step_ms": 1000 * median_step,
            "steps_per_s": 1 / median_step, "samples_per_s": sum(r["batch_size"] for r in ranks) / median_step,
            "wait_ms": 1000 * max(statistics.median(r["waits"]) for r in ranks), "wall_s": time.time() - start}


def median_row(runs: list[dict]) -> dict:
    """Median of each figure over the repeats of one process count."""
    row = dict(runs[0])
    for key in ("step_ms", "steps_per_s", "samples_per_s", "wait_ms", "wall_s"):
        row[key] = statistics.median(r[key] for r in runs)
    row["repeats"] = len(runs)
    return row


def table(rows: list[dict]) -> str:
    base = rows[0]["steps_per_s"]
    lines = ["| processes | threads each | per-rank batch | step ms (median) | steps/s | samples/s | speed-up vs 1 | "
             "data wait ms/step | run wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['processes']} | {r['threads']} | {r['per_rank_batch']} | {r['step_ms']:.0f} | "
                     f"{r['steps_per_s']:.2f} | {r['samples_per_s']:.2f} | {r['steps_per_s'] / base:.2f} | "
                     f"{r['wait_ms']:.0f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    default = "1,2" if args.device == "cpu" else ",".join(str(2**i) for i in range(8) if 2**i <= torch.cuda.device_count())
    counts = [int(c) for c in (args.processes or default).split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    plans = prepare(args)
    runs: dict[int, list[dict]] = {n: [] for n in counts}
    for _ in range(args.repeats):  # alternate, so machine noise hits every count alike
        for n in counts:
            runs[n].append(run(args, plans, n))
    rows = [median_row(runs[n]) for n in counts]
    print(f"\nDDP scaling on {args.device} ({os.cpu_count()} cores), plans {plans}, {args.iters} steps/epoch, "
          f"epoch 0 not timed, median of {args.repeats} alternating runs:\n")
    print(table(rows))
    (args.workdir / "scaling.json").write_text(json.dumps({"rows": rows, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
