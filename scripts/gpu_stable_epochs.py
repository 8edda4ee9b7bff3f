"""GPU evidence for the stable-epoch callbacks: fresh vs resumed step time, memory and cuDNN kernels.

One command (see README, "GPU evidence"); on one H100/H200 it fits in ~10 minutes:

    source scripts/gpu_env.sh        # only on a machine without the pip packages (bundle of wheels)
    python scripts/gpu_stable_epochs.py --out results/

What it does:
1. builds a synthetic dataset big enough for a realistic ResEnc L 3D patch and runs nnunetv2's own
   fingerprinting, nnUNetPlannerResEncL planning and preprocessing on the machine's CPUs;
2. emulates a 24 GB card on a bigger one (a ballast allocation leaves `--target-gb` usable, so
   cuDNN's free-memory query sees what it would see on that card);
3. measures, each arm in its own process, fresh and then resumed from the fresh run's checkpoint:
   (a) native nnU-Net (`nnUNetTrainer.train_step`, resume via its own `load_checkpoint`, which
   loads onto the GPU, then `cudnn.benchmark=True` as `run_training` does), (b) ours with the
   stable-epoch callbacks off, (c) ours with them on (memory cap in emulate mode, cuDNN pinning):
   median CUDA-synchronised step time over `--steps` steps, peak reserved memory (ballast
   excluded), and the set of convolution kernel names seen by torch.profiler over 3 steps;
4. a controlled-pressure arm: `--pressure` GB occupied while cuDNN benchmarks (released after the
   first step, as a checkpoint left on the GPU would be), with and without pinning;
5. prints one table (resumed/fresh ratios) and writes results.md and results.jsonl to `--out`.

Arms run in priority order under `--deadline-s`; results are written as each arm finishes.
`--smoke` runs the whole pipeline on CPU with a tiny dataset and network (used by the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GB = 1024**3
DATASET_ID = 988
DATASET_NAME = f"Dataset{DATASET_ID}_StableEpochs"
#: cuDNN's legacy low/no-workspace engines: what a convolution falls back to when the fast, big-workspace
#: implicit-GEMM kernels did not fit at benchmark time (seen on H200: dgrad_alg1_nd_float_engine).
FALLBACK_PATTERN = re.compile(r"_alg\d|_engine<|implicit_convolve|precomputed_convolve|fft", re.I)
KERNEL_PATTERN = re.compile(r"conv|cudnn|xmma|fprop|dgrad|wgrad|implicit|winograd|fft|cutlass|sm\d\d_", re.I)


# -- dataset ---------------------------------------------------------------------------------------------
def prepare(args: argparse.Namespace) -> dict:
    from resenc_lightning import demo

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[var] = str(Path(args.workdir) / var)
        Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
    plans_name = args.plans
    t0 = time.time()
    folder = demo.build_dataset(DATASET_ID, DATASET_NAME, plans_name, n_cases=args.cases,
                                shape_range=(args.shape - 8, args.shape), num_processes=args.np,
                                extra_configuration=False)
    plans = json.loads((folder / f"{plans_name}.json").read_text())
    if args.smoke:
        plans = _shrink(plans)
        plans_name = plans["plans_name"]
        (folder / f"{plans_name}.json").write_text(json.dumps(plans, indent=2))
    cfg = plans["configurations"]["3d_fullres"]
    info = {"plans": plans_name, "patch_size": cfg["patch_size"], "batch_size": cfg["batch_size"],
            "features": cfg["architecture"]["arch_kwargs"]["features_per_stage"],
            "prepare_s": round(time.time() - t0, 1)}
    print(f"dataset ready in {info['prepare_s']} s: {info}", flush=True)
    return info


def _shrink(plans: dict) -> dict:
    from resenc_lightning.demo import derive_plans

    return derive_plans(plans, plans["plans_name"] + "_smoke", features=[4, 8, 16], blocks_per_stage=1, patch=16,
                        batch_size=2)


# -- measurement helpers (run inside an arm process) ------------------------------------------------------
def _device():
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _ballast(target_gb: float):
    """Occupy free - target so the card looks like a `target_gb` card (cudaMemGetInfo included)."""
    import torch

    if not torch.cuda.is_available() or target_gb <= 0:
        return None, 0
    free, _ = torch.cuda.mem_get_info()
    size = int(max(free - target_gb * GB, 0))
    return torch.empty(size, dtype=torch.uint8, device="cuda"), size


def _kernels(run_steps, n: int = 3) -> list[str]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        run_steps(n)
    return _conv_kernel_names(prof)


def _conv_kernel_names(prof) -> list[str]:
    """Convolution kernel names a finished torch.profiler run saw (device kernels on CUDA, ops on CPU)."""
    import torch

    names = set()
    for evt in prof.events():
        if torch.cuda.is_available() and evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if KERNEL_PATTERN.search(evt.name):
            names.add(evt.name[:160])
    return sorted(names)


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def arm_native(spec: dict) -> dict:
    """nnUNetTrainer's own train_step; resume through its load_checkpoint (onto the GPU)."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    ballast, ballast_bytes = _ballast(spec["target_gb"])
    pp = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME
    plans = json.loads((pp / f"{spec['plans']}.json").read_text())
    plans["continue_training"] = spec["phase"] == "resume"
    dataset_json = json.loads((pp / "dataset.json").read_text())
    trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset_json, device=_device())
    ckpt = Path(spec["workdir"]) / "native_checkpoint.pth"
    if spec["phase"] == "resume":
        trainer.load_checkpoint(str(ckpt))  # map_location=cuda, as nnU-Net does
    else:
        trainer.initialize()
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # run_training sets it after loading the checkpoint
        torch.cuda.reset_peak_memory_stats()
    dl_train, dl_val = trainer.get_dataloaders()
    trainer.network.train()
    trainer.optimizer.param_groups[0]["lr"] = 1e-3

    times = []

    def steps(n: int) -> None:
        for _ in range(n):
            batch = next(dl_train)
            _sync()
            t = time.perf_counter()
            trainer.train_step(batch)
            _sync()
            times.append(time.perf_counter() - t)

    steps(spec["steps"] + 1)
    step_times = times[1:]
    kernels = _kernels(steps)
    peak = (torch.cuda.max_memory_reserved() - ballast_bytes) / GB if torch.cuda.is_available() else 0.0
    if spec["phase"] == "fresh":
        trainer.current_epoch = 1
        trainer.save_checkpoint(str(ckpt))
    for dl in (dl_train, dl_val):
        if hasattr(dl, "_finish"):
            dl._finish()
    del ballast
    return {"step_ms": 1000 * statistics.median(step_times), "peak_reserved_gb": peak, "kernels": kernels}


def arm_ours(spec: dict) -> dict:
    import lightning.pytorch as pl
    import torch

    from resenc_lightning.callbacks.cudnn_pinning import CudnnPinning
    from resenc_lightning.callbacks.epoch_timing import EpochTiming
    from resenc_lightning.cli import build_cli

    callbacks_on = spec["callbacks"]
    ballast, ballast_bytes = (None, 0) if callbacks_on else _ballast(spec["target_gb"])
    results_dir = Path(spec["workdir"]) / f"results_{spec['pair']}"
    if spec["phase"] == "fresh":
        shutil.rmtree(results_dir, ignore_errors=True)
    n_steps = spec["steps"] + 3
    args = [
        "--plans", spec["plans"], "--dataset", str(DATASET_ID), "--configuration", "3d_fullres", "--fold", "0",
        "--data.results_dir", str(results_dir), "--data.num_iterations_per_epoch", str(n_steps),
        "--data.num_val_iterations_per_epoch", "2", "--trainer.max_epochs", "1" if spec["phase"] == "fresh" else "2",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--seed_everything", "0", "--model.compile", "false", "--model.num_epochs", "1000",
        "--cudnn_pinning.enabled", str(callbacks_on).lower(), "--gpu_monitor.enabled", str(callbacks_on).lower(),
        "--epoch_timing.enabled", "true",
    ]
    if callbacks_on and torch.cuda.is_available():
        args += ["--memory_cap.mode", "emulate", "--memory_cap.target_gb", str(spec["target_gb"])]
    else:
        args += ["--memory_cap.enabled", "false"]
    if spec["phase"] == "resume":
        args += ["--resume", "true"]
    if spec.get("smoke"):
        args += ["--cudnn_pinning.run_on_cpu", str(callbacks_on).lower()]

    kernels: list[str] = []

    class Probe(pl.Callback):
        """Pressure while cuDNN benchmarks (released after step 0); kernel names over 3 late steps; the run's peak
        reserved memory sampled after the warm-up and at each epoch end (EpochTiming resets the device's peaks at
        each epoch start, so the final reading alone would miss the warm-up's benchmark, which native includes)."""

        def __init__(self) -> None:
            self.pressure = None
            self.prof = None
            self.peak_reserved = 0

        def _sample_peak(self) -> None:
            if torch.cuda.is_available():
                self.peak_reserved = max(self.peak_reserved, torch.cuda.max_memory_reserved())

        def on_train_start(self, trainer, pl_module):  # after CudnnPinning's warm-up: this probe is appended last
            self._sample_peak()

        def on_train_epoch_end(self, trainer, pl_module):
            self._sample_peak()

        def setup(self, trainer, pl_module, stage):
            if spec["pressure_gb"] > 0 and torch.cuda.is_available():
                self.pressure = torch.empty(int(spec["pressure_gb"] * GB), dtype=torch.uint8, device="cuda")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == n_steps - 3:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
                self.prof = profile(activities=acts)
                self.prof.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                self.pressure = None
            if batch_idx == n_steps - 1 and self.prof is not None:
                _sync()
                self.prof.__exit__(None, None, None)
                kernels.extend(_conv_kernel_names(self.prof))
                self.prof = None

    cli = build_cli(args)
    probe = Probe()
    cli.trainer.callbacks.append(probe)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resolve_ckpt_path())
    timing = next(c for c in cli.trainer.callbacks if isinstance(c, EpochTiming))
    pin = next((c for c in cli.trainer.callbacks if isinstance(c, CudnnPinning)), None)
    cap_ballast = sum(int(getattr(c, "ballast_bytes", 0)) for c in cli.trainer.callbacks)
    probe._sample_peak()
    peak = (probe.peak_reserved - ballast_bytes - cap_ballast) / GB if torch.cuda.is_available() else 0.0
    del ballast
    last = timing.epochs[-1]
    return {"step_ms": 1000 * last["step_median_s"], "peak_reserved_gb": max(peak, 0.0), "kernels": sorted(set(kernels)),
            "data_wait_frac": last["data_wait_frac"],
            "warmup": (pin.history[-1] if pin is not None and pin.history else None),
            "pin_warning": getattr(pin, "warning", None), "timing_warning": timing.warning}


# -- orchestration -----------------------------------------------------------------------------------------
def run_arm_subprocess(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_arm", json.dumps(spec)]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ARM_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-1500:]
        return {**spec, "error": f"exit {proc.returncode}: {tail}"}
    return {**spec, **json.loads(lines[-1][len("ARM_RESULT "):]), "wall_s": round(time.time() - t0, 1)}


def plan_arms(args: argparse.Namespace, plans: str) -> list[dict]:
    base = {"plans": plans, "steps": args.steps, "target_gb": args.target_gb, "workdir": args.workdir,
            "pressure_gb": 0.0, "smoke": args.smoke}
    arms = []
    pairs = {"ours_off": ("ours", False), "ours_on": ("ours", True), "native": ("native", False)}
    for name in args.arms:
        if name in pairs:
            kind, callbacks = pairs[name]
            for phase in ("fresh", "resume"):
                arms.append({**base, "pair": name, "kind": kind, "callbacks": callbacks, "phase": phase})
        elif name == "pressure":
            for gb in args.pressure:
                for callbacks in (False, True):
                    arms.append({**base, "pair": f"pressure{gb:g}_{'on' if callbacks else 'off'}", "kind": "ours",
                                 "callbacks": callbacks, "phase": "fresh", "pressure_gb": gb})
        else:
            raise SystemExit(f"--arms {name!r} is not one of native, ours_on, ours_off, pressure.")
    return arms


def table(results: list[dict]) -> str:
    by = {(r["pair"], r["phase"]): r for r in results}
    lines = ["| arm | fresh ms/step | resumed ms/step | resumed/fresh | fresh GB | resumed GB | fallback kernels "
             "fresh / resumed | same conv kernels |", "|---|---|---|---|---|---|---|---|"]
    for pair in dict.fromkeys(r["pair"] for r in results):
        f, r = by.get((pair, "fresh")), by.get((pair, "resume"))

        def cell(x, key, fmt):
            return "err" if x is None or "error" in x else format(x[key], fmt)

        ratio = (f"{r['step_ms'] / f['step_ms']:.3f}" if f and r and "error" not in f and "error" not in r else "-")
        same = "-"
        if f and r and "error" not in f and "error" not in r:
            same = "yes" if f["kernels"] == r["kernels"] else f"no ({len(set(f['kernels']) ^ set(r['kernels']))} differ)"
        pressure = f" ({f['pressure_gb']:g} GB pressure)" if f and f.get("pressure_gb") else ""

        def fallbacks(x):
            if x is None or "error" in x:
                return "-"
            return str(sum(1 for k in x["kernels"] if FALLBACK_PATTERN.search(k)))
        lines.append(f"| {pair}{pressure} | {cell(f, 'step_ms', '.1f')} | {cell(r, 'step_ms', '.1f') if r else '-'} | "
                     f"{ratio} | {cell(f, 'peak_reserved_gb', '.2f')} | "
                     f"{cell(r, 'peak_reserved_gb', '.2f') if r else '-'} | {fallbacks(f)} / {fallbacks(r)} | {same} |")
    return "\n".join(lines)


#: README's rule for the default: pinning on must keep resumed/fresh within this, as callbacks off does.
DECISION_LIMIT = 1.02


def decision(results: list[dict]) -> str:
    """The README's decision rule for CudnnPinning's default, from the ours_on / ours_off fresh-vs-resumed ratios."""
    by = {(r["pair"], r["phase"]): r for r in results if "error" not in r}

    def ratio(pair: str) -> float | None:
        f, r = by.get((pair, "fresh")), by.get((pair, "resume"))
        return r["step_ms"] / f["step_ms"] if f and r else None

    on, off = ratio("ours_on"), ratio("ours_off")
    rule = (f"rule: if ours_on resumed/fresh > {DECISION_LIMIT} while ours_off <= {DECISION_LIMIT}, CudnnPinning goes "
            f"off by default")
    if on is None or off is None:
        return f"DECISION: undecided (ours_on {on}, ours_off {off}: an arm is missing); {rule}"
    got = f"ours_on {on:.3f}, ours_off {off:.3f}"
    if on > DECISION_LIMIT and off <= DECISION_LIMIT:
        return f"DECISION: CudnnPinning OFF by default ({got}); {rule}"
    if on <= DECISION_LIMIT:
        return f"DECISION: CudnnPinning stays ON by default ({got}); {rule}"
    return f"DECISION: undecided, callbacks off is not stable either ({got}): look elsewhere; {rule}"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_arm":
        spec = json.loads(sys.argv[2])
        for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            os.environ[k] = str(Path(spec["workdir"]) / k)
        result = arm_native(spec) if spec["kind"] == "native" else arm_ours(spec)
        print("ARM_RESULT " + json.dumps(result), flush=True)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_results", help="folder for results.md / results.jsonl")
    p.add_argument("--workdir", default="/tmp/rl_stable_epochs", help="nnU-Net folders for the synthetic dataset")
    p.add_argument("--plans", default="nnUNetResEncUNetLPlans", help="ResEnc plans (planner) to use")
    p.add_argument("--cases", type=int, default=5, help="synthetic training cases")
    p.add_argument("--shape", type=int, default=184, help="edge length of the synthetic volumes (voxels)")
    p.add_argument("--np", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)), help="preprocessing processes")
    p.add_argument("--steps", type=int, default=50, help="timed training steps per arm")
    p.add_argument("--target-gb", type=float, default=24.0, help="emulated card size")
    p.add_argument("--pressure", type=float, nargs="*", default=[2.0], help="GB occupied while cuDNN benchmarks")
    p.add_argument("--arms", nargs="*", default=["native", "ours_on", "ours_off", "pressure"],
                   help="arm pairs, run in this order: native, ours_on, ours_off, pressure")
    p.add_argument("--deadline-s", type=float, default=540, help="stop starting arms after this many seconds")
    p.add_argument("--smoke", action="store_true", help="CPU run on a tiny dataset/network (pipeline check)")
    args = p.parse_args()
    if args.smoke:
        args.cases, args.shape, args.steps, args.np = 6, 24, 3, 2
        os.environ.setdefault("nnUNet_n_proc_DA", "0")
    os.environ.setdefault("nnUNet_compile", "f")
    os.environ.setdefault("nnUNet_n_proc_DA", str(max(1, min(12, (os.cpu_count() or 2) - 2))))
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = prepare(args)
    (out / "plan.json").write_text(json.dumps(info, indent=2))
    results = []
    with open(out / "results.jsonl", "w") as fh:
        for spec in plan_arms(args, info["plans"]):
            left = args.deadline_s - (time.time() - start)
            if left < 20:
                results.append({**spec, "error": "skipped: deadline"})
                continue
            r = run_arm_subprocess(spec, timeout=left)
            results.append(r)
            fh.write(json.dumps(r) + "\n")
            fh.flush()
            status = r.get("error", f"{r.get('step_ms', 0):.1f} ms/step, {r.get('peak_reserved_gb', 0):.2f} GB")
            print(f"[{time.time() - start:6.0f}s] {spec['pair']:>16} {spec['phase']:>6}: {status}", flush=True)
    text = table(results)
    md = (f"# Stable-epoch evidence\n\nplan: {json.dumps(info)}\n\n{text}\n\n"
          f"device: {_device_name()}; steps per arm: {args.steps}; emulated card: {args.target_gb:g} GB\n")
    if {"ours_on", "ours_off"} <= set(args.arms):
        md += f"\n{decision(results)}\n"
    (out / "results.md").write_text(md)
    print(md, flush=True)


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
