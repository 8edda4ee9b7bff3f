"""Where the data pipeline's time goes: nnU-Net's CPU augmentation vs the device path (`--data.augment_on_device`).

One command prints, side by side:

    python scripts/benchmark_data_pipeline.py --device cpu    # a few minutes on 2 cores (dataset built once)
    python scripts/benchmark_data_pipeline.py --device cuda   # + ResEnc L training arms (scripts/gpu_check.sh)

1. CPU milliseconds per batch, per worker (one process, 1 torch thread, as an augmentation worker runs), of
   - nnU-Net's pipeline: `nnUNetDataLoader` with `get_training_transforms`, split into load+crop and transforms
     (the transforms call is timed inside the loader, so both parts come from the same batches);
   - the device path's CPU part: the same loader without transforms, at the initial (pre-rotation) patch size;
2. the device time of the transforms (the device path's augmentation on `--device` on that batch, CUDA-synchronised
   on CUDA; on CPU with 1 thread, i.e. its per-core cost), and on CUDA the main process's pinning and the copy;
3. `ratio ...` lines: CPU work left per batch = device-path CPU ms / nnU-Net CPU ms, and the transforms' speed-up.
Each round seeds numpy/torch alike before each path, so both paths load and crop the same cases at the same spots
(which path goes first alternates). Not in these per-worker figures: handing the batch to the main process (the
device path's batch is at the initial patch size, ~4x the voxels); the training arms include it.

On CUDA (`--training-arms`, default there) it then trains ResEnc L (the real plans nnunetv2's
`nnUNetPlannerResEncL` makes for ~184^3 volumes: patch 192^3, batch 2) through `train.py`'s CLI, 2 epochs x
`--steps` (30) steps, each arm its own process: nnU-Net's pipeline and ours with `nnUNet_n_proc_DA=--workers` (4),
and nnU-Net's pipeline with `--ref-workers` (12). Figures from the second epoch: train wall per step and samples/s
(synchronised), the `EpochTiming` callback's median step and data-wait fraction (CUDA-synchronised steps), and the
time blocked in next() on the CPU workers (`benchmark_vs_nnunet.TimedBatches`). Compile and the memory cap are off
in every arm (the same network code in all of them; the cap would bound the device path's extra buffers).

The dataset is `scripts/gpu_stable_epochs.py`'s (same builder and defaults), so on the GPU machine the one
`gpu_check.sh` builds is reused (`--workdir /tmp/rl_stable_epochs`); `--dataset/--plans` take an existing one.
`--smoke`: its tiny CPU variant (16^3 patch, 2 rounds), for the tests; with `--training-arms` it also rehearses the
arms on CPU (2 x 2 steps, 1/1/2 workers).

`--train-compare --seeds 3`: the embedded demo (`train.py` without --dataset, its own budget) trained with the switch
off and on, one seed per pair, both arms per seed; final-validation Dice per arm (mean +- sd), paired on - off
differences with a paired-t verdict (README, "Augmentation on the device"); raw records in `--out`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

RESULT_TAG = "DATAPIPE_RESULT "
SWITCH = "--data.augment_on_device"
DEMO_LABELS = {"1": "sphere", "2": "ellipsoid"}  # the embedded demo's dataset.json


def _script(name: str):
    """A sibling script as a module (scripts/ is not a package): its helpers are reused, not copied."""
    return importlib.import_module(name)


# -- dataset --------------------------------------------------------------------------------------------------
def prepare(args: argparse.Namespace) -> dict:
    """gpu_stable_epochs' dataset (nnunetv2 fingerprint, ResEnc L planner, preprocessing; tiny plans for --smoke),
    or with --dataset an existing preprocessed dataset and --plans as they are."""
    if args.dataset is not None:
        from resenc_lightning.plans import resolve_run

        spec = resolve_run(args.plans, args.dataset, "3d_fullres", "0")
        cm = spec.configuration_manager
        return {"plans": args.plans, "dataset": spec.dataset_name, "dataset_id": spec.dataset_name,
                "patch_size": list(cm.patch_size), "batch_size": cm.batch_size}
    gse = _script("gpu_stable_epochs")
    ns = argparse.Namespace(workdir=args.workdir, plans="nnUNetResEncUNetLPlans", cases=args.cases, shape=args.shape,
                            np=args.np, smoke=args.smoke)
    info = gse.prepare(ns)
    return {**info, "dataset": gse.DATASET_NAME, "dataset_id": gse.DATASET_ID}


# -- the two pipelines, one batch at a time ----------------------------------------------------------------
class TimedTransforms:
    """Wraps the loader's transforms: the time spent in them is the 'transforms' part of a batch."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.seconds = 0.0

    def __call__(self, **kwargs):
        t = time.perf_counter()
        out = self.inner(**kwargs)
        self.seconds += time.perf_counter() - t
        return out


def datamodule(info: dict, results_dir: str, on_device: bool):
    """Our NnUNetDataModule as training builds it (switch on or off), in-process, set up for fit."""
    from resenc_lightning.data import NnUNetDataModule

    kwargs = {"augment_on_device": True} if on_device else {}
    dm = NnUNetDataModule(plans=info["plans"], dataset=info["dataset"], configuration="3d_fullres", fold="0",
                          num_workers=0, results_dir=results_dir, **kwargs)
    dm.setup("fit")
    return dm


def device_augmenter(dm):
    """The device path's transforms as training runs them (`on_after_batch_transfer`): batch on device -> batch."""
    return dm.device_augmentation


def _seed(n: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(n)
    np.random.seed(n)
    torch.manual_seed(n)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to(batch, device):
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def measure_pipelines(info: dict, args: argparse.Namespace) -> dict:
    """Per round, both paths on the same seed (same cases, same crops), the first path alternating between rounds:
    nnU-Net's batch (load+crop and transforms timed apart); the device path's CPU batch, its copy, its transforms."""
    import torch

    torch.set_num_threads(1)  # an augmentation worker's budget (nnUNetDataLoader also limits its pools to 1)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    work = Path(args.workdir) / "dp_results"
    nnunet, ours = datamodule(info, str(work), on_device=False), datamodule(info, str(work), on_device=True)
    timed = TimedTransforms(nnunet._dl_train.transforms)
    nnunet._dl_train.transforms = timed
    augment = device_augmenter(ours)
    rows: dict[str, list[float]] = {k: [] for k in ("nn_total", "nn_transforms", "nn_pin", "dev_cpu", "dev_pin",
                                                    "dev_copy", "dev_aug")}
    shapes: dict[str, list[int]] = {}

    def pin(batch) -> float:
        """Seconds the main process's pin-memory thread spends on this batch (CUDA only: training pins there)."""
        if device.type != "cuda":
            return 0.0
        t = time.perf_counter()
        batch["data"], batch["target"] = _pinned(batch["data"]), _pinned(batch["target"])
        return time.perf_counter() - t

    def nnunet_batch(r: int) -> dict[str, float]:
        _seed(r)
        timed.seconds = 0.0
        t = time.perf_counter()
        batch = next(nnunet._dl_train)
        total = time.perf_counter() - t
        shapes["nnunet"] = list(batch["data"].shape)
        return {"nn_total": total, "nn_transforms": timed.seconds, "nn_pin": pin(batch)}

    def device_batch(r: int) -> dict[str, float]:
        _seed(r)
        t = time.perf_counter()
        raw = next(ours._dl_train)
        cpu = time.perf_counter() - t
        shapes["device_cpu"] = list(raw["data"].shape)
        pinned = pin(raw)
        _sync(device)
        t = time.perf_counter()
        moved = _to(raw, device)
        _sync(device)
        copy = time.perf_counter() - t
        t = time.perf_counter()
        out = augment(moved)
        _sync(device)
        shapes["device_out"] = list(out["data"].shape)
        return {"dev_cpu": cpu, "dev_pin": pinned, "dev_copy": copy, "dev_aug": time.perf_counter() - t}

    for r in range(args.warmup + args.rounds):
        first, second = (nnunet_batch, device_batch) if r % 2 == 0 else (device_batch, nnunet_batch)
        got = {**first(r), **second(r)}
        if r >= args.warmup:
            for k, v in got.items():
                rows[k].append(v * 1000)
    # means, not medians: a batch's cost depends on which transforms fire (the spatial one, rotation or scaling with
    # p 0.2 each per sample, is most of it), so the cost per batch in the long run is the mean over draws
    mean = {k: statistics.fmean(v) for k, v in rows.items()}
    mean["nn_load_crop"] = mean["nn_total"] - mean["nn_transforms"]
    return {"mean_ms": mean, "per_round_ms": rows, "shapes": shapes, "device": _device_name(device),
            "patch_size": info["patch_size"], "batch_size": info["batch_size"],
            "initial_patch_size": list(ours.aug.initial_patch_size), "rounds": args.rounds}


def _pinned(x):
    if isinstance(x, list):
        return [t.pin_memory() for t in x]
    return x.pin_memory()


def _cell(ms: float, device: str) -> str:
    return "-" if device == "cpu" else f"{ms:.1f}"


def pipeline_report(m: dict) -> str:
    """The side-by-side table and the ratio lines."""
    d = m["mean_ms"]
    on = m["device"]
    nn_cpu, dev_cpu = d["nn_total"], d["dev_cpu"]
    lines = [
        f"## Data pipeline per batch (batch {m['batch_size']}, patch {m['patch_size']}, initial patch "
        f"{m['initial_patch_size']}; mean of {m['rounds']} rounds, same cases and crops on both paths)",
        "",
        "| ms per batch | nnU-Net pipeline (CPU worker) | device path |",
        "|---|---|---|",
        f"| CPU: load + crop (per worker) | {d['nn_load_crop']:.1f} | {dev_cpu:.1f} |",
        f"| CPU: transforms (per worker) | {d['nn_transforms']:.1f} | 0 (on the device) |",
        f"| CPU total per batch (per worker) | {nn_cpu:.1f} | {dev_cpu:.1f} |",
        f"| main process: pin memory ({on}) | {_cell(d['nn_pin'], on)} | {_cell(d['dev_pin'], on)} |",
        f"| host-to-device copy ({on}) | - | {_cell(d['dev_copy'], on)} |",
        f"| device: transforms ({on}) | - | {d['dev_aug']:.1f} |",
        "",
        f"batch shapes: nnU-Net {m['shapes']['nnunet']}, device path CPU {m['shapes']['device_cpu']} -> "
        f"{m['shapes']['device_out']} after the device transforms; CPU timings with 1 torch thread"
        + ("; device timings CUDA-synchronised" if on != "cpu" else "; device = this CPU, 1 thread (per-core cost)"),
        "",
        f"ratio cpu_work_left_per_batch {dev_cpu / nn_cpu:.3f} (device-path CPU {dev_cpu:.1f} ms / nnU-Net CPU "
        f"{nn_cpu:.1f} ms)",
        f"ratio workers_for_equal_throughput {dev_cpu / nn_cpu:.3f} (a worker of the device path makes "
        f"{nn_cpu / dev_cpu:.1f}x the batches/s of an nnU-Net worker)",
        f"ratio transforms_device_vs_cpu {d['dev_aug'] / d['nn_transforms']:.3f} (device transforms {d['dev_aug']:.1f} "
        f"ms on {on} / nnU-Net CPU transforms {d['nn_transforms']:.1f} ms)",
    ]
    return "\n".join(lines)


# -- training arms (CUDA; rehearsed on CPU with --smoke --training-arms) ------------------------------------
def arm_specs(args: argparse.Namespace) -> list[dict]:
    """In priority order (a deadline drops the last): ours, the reference for the step-time goal, then nnU-Net with
    as few workers (data-bound, the slowest)."""
    return [{"name": f"device_w{args.workers}", "on_device": True, "workers": args.workers},
            {"name": f"nnunet_w{args.ref_workers}", "on_device": False, "workers": args.ref_workers},
            {"name": f"nnunet_w{args.workers}", "on_device": False, "workers": args.workers}]


def run_arm(spec: dict) -> dict:
    """One training arm in this process: train.py's CLI, 2 epochs; figures of the second (EpochTiming + wall)."""
    import lightning.pytorch as pl
    import torch

    from resenc_lightning.callbacks.epoch_timing import EpochTiming
    from resenc_lightning.cli import build_cli

    cuda = torch.cuda.is_available()
    args = ["--plans", spec["plans"], "--dataset", str(spec["dataset_id"]), "--configuration", "3d_fullres",
            "--fold", "0", "--data.results_dir", spec["results_dir"],
            "--data.num_iterations_per_epoch", str(spec["steps"]), "--data.num_val_iterations_per_epoch", "1",
            "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--seed", "0", "--model.compile", "false",
            "--memory_cap.enabled", "false", "--epoch_timing.cuda_sync", "true", SWITCH, str(spec["on_device"]).lower()]
    wall: dict[str, float] = {}
    blocked: list[float] = []

    class Blocked:
        """benchmark_vs_nnunet.TimedBatches' clock: seconds blocked in next() on the CPU workers, this epoch."""

        def waited(self, seconds: float) -> None:
            blocked.append(seconds)

    class TrainWall(pl.Callback):
        """Train-phase wall of the last epoch (synchronised): epoch start -> last step end; worker wait in it."""

        def on_train_epoch_start(self, trainer, pl_module):
            _sync(pl_module.device)
            blocked.clear()
            wall["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == spec["steps"] - 1:
                _sync(pl_module.device)
                wall["train_s"] = time.perf_counter() - wall["start"]
                wall["blocked_s"] = sum(blocked)
                wall["samples"] = spec["steps"] * trainer.datamodule.batch_size

    cli = build_cli(args)
    dm = cli.datamodule
    make_loader = dm.train_dataloader

    def timed_train_dataloader():
        epoch = make_loader()
        epoch.source = _script("benchmark_vs_nnunet").TimedBatches(epoch.source, Blocked())
        return epoch

    dm.train_dataloader = timed_train_dataloader
    cli.trainer.callbacks.append(TrainWall())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cli.trainer.fit(cli.model, datamodule=dm)
    last = next(c for c in cli.trainer.callbacks if isinstance(c, EpochTiming)).epochs[-1]
    return {"step_ms": 1000 * last["step_median_s"], "data_wait_frac": last["data_wait_frac"],
            "wall_step_ms": 1000 * wall["train_s"] / spec["steps"], "blocked_frac": wall["blocked_s"] / wall["train_s"],
            "samples_per_s": wall["samples"] / wall["train_s"], "train_s": wall["train_s"],
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0}


def run_arms(args: argparse.Namespace, info: dict, start: float) -> list[dict]:
    results = []
    for spec in arm_specs(args):
        left = args.deadline_s - (time.time() - start)
        if left < args.arm_min_s:
            results.append({**spec, "error": "skipped: deadline"})
            print(f"[{time.time() - start:5.0f}s] arm {spec['name']}: skipped (deadline)", flush=True)
            continue
        full = {**spec, "plans": info["plans"], "dataset_id": info["dataset_id"], "steps": args.steps,
                "results_dir": str(Path(args.workdir) / f"dp_arm_{spec['name']}")}
        env = {**os.environ, "nnUNet_n_proc_DA": str(spec["workers"])}
        r = _child(["_arm", json.dumps(full)], env, timeout=min(left, args.run_timeout))
        results.append({**spec, **r})
        status = r.get("error") or (f"step {r['step_ms']:.0f} ms, data wait {r['data_wait_frac']:.1%}, "
                                    f"{r['samples_per_s']:.2f} samples/s")
        print(f"[{time.time() - start:5.0f}s] arm {spec['name']}: {status}", flush=True)
    return results


def arms_report(results: list[dict], args: argparse.Namespace, info: dict) -> str:
    lines = [f"## ResEnc L training, {args.steps} steps (2nd of 2 epochs; patch {info['patch_size']}, batch "
             f"{info['batch_size']}, compile off)", "",
             "| arm | nnUNet_n_proc_DA | step ms (train wall / steps) | step ms (EpochTiming median) | data wait "
             "(EpochTiming) | blocked on CPU workers | samples/s |", "|---|---|---|---|---|---|---|"]
    by = {r["name"]: r for r in results}
    for r in results:
        label = "ours, transforms on the device" if r["on_device"] else "nnU-Net's pipeline (CPU workers)"
        if "error" in r:
            lines.append(f"| {label} | {r['workers']} | {r['error'].splitlines()[0][:80]} | - | - | - | - |")
        else:
            lines.append(f"| {label} | {r['workers']} | {r['wall_step_ms']:.1f} | {r['step_ms']:.1f} | "
                         f"{r['data_wait_frac']:.1%} | {r['blocked_frac']:.1%} | {r['samples_per_s']:.2f} |")
    lines += ["", "EpochTiming's data wait is the time between one step's end and the next step's start: the fetch, "
              "the host-to-device copy and, with the switch on, the device transforms (Lightning runs "
              "on_after_batch_transfer before on_train_batch_start); 'blocked on CPU workers' is next() alone."]
    dev, ref = by.get(f"device_w{args.workers}"), by.get(f"nnunet_w{args.ref_workers}")
    nn = by.get(f"nnunet_w{args.workers}")
    ok = [x for x in (dev, ref, nn) if x is not None and "error" not in x]
    if dev in ok:
        lines.append(f"goal data_wait<=5% with {args.workers} workers: "
                     f"{'met' if dev['data_wait_frac'] <= 0.05 else 'NOT met'} (EpochTiming {dev['data_wait_frac']:.1%}, "
                     f"blocked on workers {dev['blocked_frac']:.1%})")
    if dev in ok and ref in ok:
        ratio = dev["wall_step_ms"] / ref["wall_step_ms"]
        lines.append(f"ratio step_device_w{args.workers}_vs_nnunet_w{args.ref_workers} {ratio:.3f} (train wall per "
                     f"step); goal no worse than nnU-Net with {args.ref_workers} workers: "
                     f"{'met' if ratio <= 1.02 else 'NOT met'} (2% tolerance)")
    if dev in ok and nn in ok:
        speedup = dev["samples_per_s"] / nn["samples_per_s"]
        lines.append(f"ratio samples_per_s_device_vs_nnunet_w{args.workers} {speedup:.3f}")
    return "\n".join(lines)


# -- training comparison on the embedded demo -----------------------------------------------------------------
def demo_fold(results_dir: Path) -> Path:
    return next(results_dir.glob("Dataset*/*/fold_0"))


def run_demo(seed: int, on_device: bool, args: argparse.Namespace) -> dict:
    """`python train.py --seed N` (the demo, its own budget) with the switch on or off; final-validation Dice."""
    arm = "on" if on_device else "off"
    results_dir = Path(args.workdir) / f"demo_{arm}_seed{seed}"
    cmd = [sys.executable, str(ROOT / "train.py"), "--plans", "nnUNetResEncUNetLPlans", "--seed", str(seed),
           "--data.results_dir", str(results_dir), "--trainer.enable_progress_bar", "false", SWITCH,
           str(on_device).lower()]
    t0 = time.time()
    log = Path(args.out or args.workdir) / f"train_{arm}_seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy(), cwd=str(ROOT),
                              timeout=args.run_timeout)
    record = {"seed": seed, "arm": arm, "wall_s": round(time.time() - t0, 1), "log": log.name}
    if proc.returncode != 0:
        return {**record, "error": f"exit {proc.returncode}, see {log}"}
    summary = json.loads((demo_fold(results_dir) / "validation" / "summary.json").read_text())
    return {**record, "dice": {k: v["Dice"] for k, v in summary["mean"].items()},
            "dice_fg_mean": summary["foreground_mean"]["Dice"]}


def compare_table(records: list[dict], label_names: dict[str, str]) -> str:
    """Final-validation Dice per arm (mean +- sd over seeds), paired on - off differences and a paired-t verdict."""
    bench = _script("benchmark_vs_nnunet")
    by_seed: dict[int, dict[str, dict]] = {}
    for r in records:
        if "error" not in r:
            by_seed.setdefault(r["seed"], {})[r["arm"]] = r
    full = [p for _, p in sorted(by_seed.items()) if {"off", "on"} <= p.keys()]
    rows = [(f"{label_names.get(k, k)} (label {k})", lambda r, k=k: r["dice"].get(k, float("nan")))
            for k in sorted({k for p in full for k in p["off"]["dice"]}, key=int)]
    rows.append(("foreground mean", lambda r: r["dice_fg_mean"]))
    lines = ["| final-validation Dice | switch off (CPU transforms) | switch on (device transforms) | "
             "on − off (paired) | verdict |", "|---|---|---|---|---|"]
    for name, get in rows:
        off, on = [get(p["off"]) for p in full], [get(p["on"]) for p in full]
        diffs = [b - a for a, b in zip(off, on)]
        lines.append(f"| {name} | {bench._mean_sd(off)} | {bench._mean_sd(on)} | {bench._mean_sd(diffs)} | "
                     f"{bench._verdict(diffs)} |")
    seeds = [s for s, p in sorted(by_seed.items()) if {"off", "on"} <= p.keys()]
    per_seed = ", ".join(f"{p['off']['dice_fg_mean']:.3f}/{p['on']['dice_fg_mean']:.3f}" for p in full)
    lines += ["", f"{len(full)} seeds ({', '.join(map(str, seeds))}); per-seed foreground Dice off/on: {per_seed}"]
    return "\n".join(lines)


def tabulate_compare(args: argparse.Namespace) -> str:
    """--train-compare --tabulate: one table from several runs' train_compare.jsonl (seeds split over runs)."""
    bench = _script("benchmark_vs_nnunet")
    records = [json.loads(line) for f in args.tabulate for line in Path(f).read_text().splitlines() if line.strip()]
    records = [r for r in records if "error" not in r]  # failed runs are left out (their seed then has no pair)
    seeds = sorted({r["seed"] for r in records})
    text = (f"{compare_table(records, DEMO_LABELS)}\n\nembedded demo, switch off vs on, seeds {', '.join(map(str, seeds))}; "
            f"tabulated from {len(args.tabulate)} run(s): {', '.join(args.tabulate)}")
    print(text, flush=True)
    bench._write(args, "train_compare", text, records)
    return text


def train_compare(args: argparse.Namespace) -> str:
    if args.tabulate:
        return tabulate_compare(args)
    bench = _script("benchmark_vs_nnunet")
    start = time.time()
    bench.set_paths(Path(args.workdir))  # the demo is built here (nnunetv2's planner), results per run below
    records = []
    for seed in range(args.seed, args.seed + args.seeds):
        for on_device in ((False, True) if seed % 2 == 0 else (True, False)):  # order flips: a load trend cancels
            r = run_demo(seed, on_device, args)
            records.append(r)
            status = r.get("error") or f"foreground Dice {r['dice_fg_mean']:.3f} {r['dice']}"
            print(f"[{time.time() - start:5.0f}s] seed {seed} switch {r['arm']:>3}: {status}, {r['wall_s']:.0f} s",
                  flush=True)
    from resenc_lightning import demo

    names = bench.label_names(Path(os.environ["nnUNet_preprocessed"]) / demo.DEMO_DATASET_NAME / "dataset.json")
    text = (f"{compare_table(records, names)}\n\nembedded demo (`python train.py --plans nnUNetResEncUNetLPlans "
            f"--seed N [{SWITCH} true]`: its budget of {demo.DEMO_EPOCHS} epochs x {demo.DEMO_TRAIN_ITERATIONS} steps, "
            f"batch {demo.DEMO_BATCH_SIZE}, then nnU-Net's final validation); nnUNet_n_proc_DA="
            f"{os.environ.get('nnUNet_n_proc_DA', 'default')}; {time.time() - start:.0f} s in all")
    print(text, flush=True)
    bench._write(args, "train_compare", text, records)
    return text


# -- orchestration ------------------------------------------------------------------------------------------
def _child(argv: list[str], env: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"}
    return json.loads(lines[-1][len(RESULT_TAG):])


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--rounds", type=int, default=None, help="timed batches per path (cpu 20, cuda 12; smoke 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--workdir", default="/tmp/resenc_data_pipeline", help="nnU-Net folders for the dataset and runs")
    p.add_argument("--cases", type=int, default=5, help="synthetic training cases (gpu_stable_epochs' default)")
    p.add_argument("--shape", type=int, default=184, help="largest edge of the synthetic volumes (-> 192^3 patch)")
    p.add_argument("--np", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)), help="preprocessing processes")
    p.add_argument("--dataset", default=None,
                   help="an existing preprocessed dataset in $nnUNet_preprocessed (ID or name) with --plans, instead of "
                        "building the synthetic one")
    p.add_argument("--plans", default="nnUNetResEncUNetLPlans", help="with --dataset: the plans identifier")
    p.add_argument("--training-arms", action=argparse.BooleanOptionalAction, default=None,
                   help="the ResEnc L training arms (default: on with --device cuda)")
    p.add_argument("--steps", type=int, default=None, help="training steps per epoch of each arm (30; smoke 2)")
    p.add_argument("--workers", type=int, default=None, help="nnUNet_n_proc_DA of the compared arms (4; smoke 1)")
    p.add_argument("--ref-workers", type=int, default=None, help="nnUNet_n_proc_DA of nnU-Net's reference (12; smoke 2)")
    p.add_argument("--deadline-s", type=float, default=1e9,
                   help="every arm ends by this many seconds after the start (one that would not is not started)")
    p.add_argument("--arm-min-s", type=float, default=None, help="an arm needs this many seconds (cuda 60, cpu 30)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (16^3 patch, 2 rounds): the tests' pipeline check")
    p.add_argument("--train-compare", action="store_true", help="demo Dice with the switch off vs on instead")
    p.add_argument("--seeds", type=int, default=3, help="--train-compare: seeds (both arms each)")
    p.add_argument("--seed", type=int, default=0, help="--train-compare: first seed")
    p.add_argument("--tabulate", nargs="+", default=None, metavar="JSONL",
                   help="--train-compare: only the table, from earlier runs' train_compare.jsonl (paired by seed)")
    p.add_argument("--run-timeout", type=float, default=1800, help="seconds before a training run (arm, demo) is given up")
    p.add_argument("--out", default=None, help="also write the report (.md) and raw results (.jsonl) here")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.cases, args.shape, args.np = "cpu", 6, 24, 2
        args.rounds, args.warmup, args.steps = args.rounds or 2, 1, args.steps or 2
        args.workers, args.ref_workers = args.workers or 1, args.ref_workers or 2
    args.workers, args.ref_workers = args.workers or 4, args.ref_workers or 12
    args.rounds = args.rounds or (12 if args.device == "cuda" else 20)
    args.steps = args.steps or 30
    args.arm_min_s = args.arm_min_s or (60 if args.device == "cuda" else 30)
    if args.training_arms is None:
        args.training_arms = args.device == "cuda"
    return args


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "_arm":
        print(RESULT_TAG + json.dumps(run_arm(json.loads(argv[1]))), flush=True)
        return ""
    if len(argv) == 2 and argv[0] == "_pipelines":
        spec = json.loads(argv[1])
        print(RESULT_TAG + json.dumps(measure_pipelines(spec["info"], argparse.Namespace(**spec["args"]))), flush=True)
        return ""
    args = parse_args(argv)
    os.environ.setdefault("nnUNet_compile", "f")
    if args.train_compare:
        return train_compare(args)
    start = time.time()
    info = prepare(args)
    # its own process, like the arms: this one never holds the GPU (the arms would see it as another process)
    m = _child(["_pipelines", json.dumps({"info": info, "args": vars(args)})], dict(os.environ), args.run_timeout)
    if "error" in m:
        raise SystemExit(f"data-pipeline measurement failed: {m['error']}")
    text = pipeline_report(m)
    print(text, flush=True)
    records: list[dict] = [{"kind": "pipeline", **m}]
    if args.training_arms:
        arms = run_arms(args, info, start)
        records += [{"kind": "arm", **r} for r in arms]
        arms_text = arms_report(arms, args, info)
        print(arms_text, flush=True)
        text += "\n\n" + arms_text
    text += f"\n\ndevice {m['device']}; plans {info['plans']}; {time.time() - start:.0f} s in all"
    print(f"device {m['device']}; plans {info['plans']}; {time.time() - start:.0f} s in all", flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "data_pipeline.md").write_text(text + "\n")
        (out / "data_pipeline.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if any("error" in r for r in records):
        raise SystemExit(1)
    return text


if __name__ == "__main__":
    main()
