"""Side-by-side speed of native nnU-Net (`nnUNetTrainer.run_training`) and ours, on the same data and plans.

One command prints a markdown table:

    python scripts/benchmark_vs_nnunet.py --device cpu            # ~6 min on 2 cores
    python scripts/benchmark_vs_nnunet.py --device cuda --pairs 3  # unmodified ResEnc L plans

Both sides train the same preprocessed synthetic dataset (made by `resenc_lightning.demo.build_dataset`,
i.e. nnunetv2's own fingerprinting, `nnUNetPlannerResEncL` planning and preprocessing) with the same plans
file and the same number of augmentation workers (`nnUNet_n_proc_DA`). On CPU the plans are a copy of the
ResEnc L plans with `features_per_stage` divided by `--cpu-feature-divisor` and batch 2, so that a step
takes about a second on 2 cores. Each run is its own process; runs alternate native, ours, ours, native, ...
(`--pairs`; the order flips every other pair so a load trend cancels), because a shared machine drifts: we
report medians over runs and the median of the per-pair ratios ours/native.

Measured inside each child by one small clock (native: a `nnUNetTrainer` subclass; ours: a Lightning
callback injected into `resenc_lightning.cli.main`), both timing the same boundaries:
- train step: wall interval between consecutive training-step ends (so it includes data loading and the
  loop's own overhead), median over the epochs after the first;
- data wait: time blocked in `next()` on the training augmenter, median per step;
- val step: validation phase wall (data included) / validation steps, median over epochs after the first;
- start-up: from the parent's spawn to the end of the first training step (imports, dataset, network,
  augmentation workers, first step);
- epoch wall: start-to-start of consecutive epochs (validation, checkpoint writing, progress.png included);
- peak RSS of the training process (augmentation workers excluded); on CUDA peak allocated/reserved
  memory and steps/s (train phase wall with a synchronise at its end, no per-step synchronise).
`--smoke` is the `--device cpu` run, same dataset, planner patch and plans derivation, with fewer steps and
epochs and one pair (about a minute; used by the tests, so what breaks the real run breaks it).

`--parity` measures what each side learns instead (README, "Parity with nnU-Net"): pair i seeds both sides with
`--seed` + i before the network is built (identical initial weights, checked by a hash each child prints), runs
nnU-Net's final validation, and reports Dice per class per side, the paired differences with a paired-t verdict,
and the per-epoch train/val loss from each side's checkpoint_final.pth `logging` (parity.md / parity.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DATASET_ID = 989
DATASET_NAME = f"Dataset{DATASET_ID}_Benchmark"
SOURCE_PLANS = "nnUNetResEncUNetLPlans"
RESULT_TAG = "BENCH_RESULT "
PARITY_EPOCHS = 6


# -- dataset and plans -------------------------------------------------------------------------------------
def set_paths(workdir: Path) -> None:
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[var] = str(workdir / var)
        Path(os.environ[var]).mkdir(parents=True, exist_ok=True)


def derived_plans(plans: dict, name: str, divisor: int) -> dict:
    """The planner's ResEnc L plans (its patch as planned) with narrower stages and batch 2."""
    from resenc_lightning.demo import derive_plans

    return derive_plans(plans, name, feature_divisor=divisor, batch_size=2)


def prepare(args: argparse.Namespace) -> dict:
    """Build (once) the dataset with nnunetv2's planner/preprocessor; write the derived plans for CPU."""
    from resenc_lightning import demo

    t0 = time.time()
    if args.dataset is not None:  # an existing preprocessed dataset and plans, as they are
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        name = maybe_convert_to_dataset_name(args.dataset)
        cfg = json.loads((Path(os.environ["nnUNet_preprocessed"]) / name / f"{args.plans}.json").read_text())
        cfg = cfg["configurations"]["3d_fullres"]
        return {"dataset": name, "plans": args.plans, "patch_size": cfg["patch_size"], "batch_size": cfg["batch_size"],
                "features_per_stage": cfg["architecture"]["arch_kwargs"]["features_per_stage"], "prepare_s": 0.0}
    set_paths(Path(args.workdir))
    folder = demo.build_dataset(DATASET_ID, DATASET_NAME, SOURCE_PLANS, n_cases=args.cases,
                                shape_range=(args.shape - 6, args.shape), num_processes=2,
                                extra_configuration=False)
    plans_name = SOURCE_PLANS
    if args.device == "cpu":
        plans_name = f"{SOURCE_PLANS}_cpu_div{args.cpu_feature_divisor}"
        plans = json.loads((folder / f"{SOURCE_PLANS}.json").read_text())
        plans = derived_plans(plans, plans_name, args.cpu_feature_divisor)
        (folder / f"{plans_name}.json").write_text(json.dumps(plans, indent=2))
    cfg = json.loads((folder / f"{plans_name}.json").read_text())["configurations"]["3d_fullres"]
    ak = cfg["architecture"]["arch_kwargs"]
    return {"dataset": DATASET_NAME, "plans": plans_name, "patch_size": cfg["patch_size"], "batch_size": cfg["batch_size"],
            "features_per_stage": ak["features_per_stage"], "n_blocks_per_stage": ak["n_blocks_per_stage"],
            "prepare_s": round(time.time() - t0, 1)}


# -- the clock both sides share (runs in the child) --------------------------------------------------------
class Clock:
    """Step boundaries -> figures. No device synchronise per step; one at each phase end on CUDA."""

    def __init__(self, spawn_time: float, device) -> None:
        self.spawn_time = spawn_time
        self.device = device
        self.epoch = -1
        self.steps: list[tuple[int, float, float]] = []  # (epoch, step wall, data wait)
        self.train_phase: list[tuple[int, float, int]] = []  # (epoch, wall, steps)
        self.val_phase: list[tuple[int, float, int]] = []
        self.first_step_end: float | None = None
        self.epoch_starts: list[float] = []
        self._prev_end = self._phase_start = 0.0
        self._wait = 0.0
        self._epoch_steps = self._val_steps = 0
        self.peaks = {"peak_alloc_gb": 0.0, "peak_reserved_gb": 0.0}

    def _sample_peaks(self) -> None:
        """The run's peaks as the maximum of per-epoch samples: our EpochTiming resets the device's peak counters
        at each epoch start (its reserved_gb is per epoch), nnU-Net never does; sampled at each validation end."""
        import torch

        if self.device.type == "cuda":
            for key, value in (("peak_alloc_gb", torch.cuda.max_memory_allocated(self.device)),
                               ("peak_reserved_gb", torch.cuda.max_memory_reserved(self.device))):
                self.peaks[key] = max(self.peaks[key], value / 2**30)

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def waited(self, seconds: float) -> None:
        self._wait += seconds

    def train_epoch_start(self) -> None:
        self.epoch += 1
        self._epoch_steps = 0
        self._wait = 0.0
        self._sync()
        self._prev_end = self._phase_start = time.perf_counter()
        self.epoch_starts.append(self._prev_end)

    def train_step_end(self) -> None:
        now = time.perf_counter()
        if self.first_step_end is None:
            self._sync()
            self.first_step_end = time.time()
            now = time.perf_counter()
        self.steps.append((self.epoch, now - self._prev_end, self._wait))
        self._wait = 0.0
        self._prev_end = now
        self._epoch_steps += 1

    def val_start(self) -> None:
        self._sync()
        now = time.perf_counter()
        self.train_phase.append((self.epoch, now - self._phase_start, self._epoch_steps))
        self._phase_start = now
        self._val_steps = 0

    def val_step_end(self) -> None:
        self._val_steps += 1

    def val_end(self) -> None:
        self._sync()
        self.val_phase.append((self.epoch, time.perf_counter() - self._phase_start, self._val_steps))
        self._sample_peaks()

    def result(self) -> dict:

        steps = [s for s in self.steps if s[0] >= 1] or self.steps[1:] or self.steps
        train = [p for p in self.train_phase if p[0] >= 1] or self.train_phase
        val = [p for p in self.val_phase if p[0] >= 1] or self.val_phase
        out = {
            "train_step_s": statistics.median(s[1] for s in steps),
            "data_wait_s": statistics.median(s[2] for s in steps),
            "val_step_s": statistics.median(w / max(n, 1) for _, w, n in val) if val else float("nan"),
            "steps_per_s": sum(n for _, _, n in train) / sum(w for _, w, _ in train),
            # start-to-start of consecutive epochs after the first: validation, checkpoints, plots, logging included
            "epoch_s": statistics.median(b - a for a, b in zip(self.epoch_starts[1:-1], self.epoch_starts[2:]))
            if len(self.epoch_starts) > 2 else float("nan"),
            "train_phase_step_s": sum(w for _, w, _ in train) / sum(n for _, _, n in train),
            "startup_s": (self.first_step_end or time.time()) - self.spawn_time,
            "peak_rss_mb": peak_rss_mb(),
            "n_steps_timed": len(steps),
        }
        if self.device.type == "cuda":
            self._sample_peaks()
            out.update(self.peaks)
        return out


def peak_rss_mb() -> float:
    """VmHWM of this process (getrusage's ru_maxrss would include the parent's RSS at fork, kept over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TimedBatches:
    """Wraps an augmenter: time blocked in `next()` goes to the clock; everything else is passed through."""

    def __init__(self, source, clock: Clock) -> None:
        self._source = source
        self._clock = clock

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        batch = next(self._source)
        self._clock.waited(time.perf_counter() - t)
        return batch

    def __getattr__(self, name: str):
        return getattr(self._source, name)


# -- the two sides (each in its own process) ---------------------------------------------------------------
def run_native(spec: dict) -> dict:
    """nnUNetTrainer's own run_training loop; the clock sits in a subclass's hooks."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    device = torch.device(spec["device"], 0) if spec["device"] == "cuda" else torch.device("cpu")
    clock = Clock(spec["spawn_time"], device)

    class nnUNetTrainer_Bench(nnUNetTrainer):
        def on_train_start(self):
            super().on_train_start()
            self.dataloader_train = TimedBatches(self.dataloader_train, clock)

        def on_train_end(self):
            self.dataloader_train = self.dataloader_train._source  # nnU-Net finishes only its own augmenter types
            super().on_train_end()

        def on_train_epoch_start(self):
            super().on_train_epoch_start()
            clock.train_epoch_start()

        def train_step(self, batch):
            out = super().train_step(batch)
            clock.train_step_end()
            return out

        def on_validation_epoch_start(self):
            clock.val_start()
            super().on_validation_epoch_start()

        def validation_step(self, batch):
            out = super().validation_step(batch)
            clock.val_step_end()
            return out

        def on_validation_epoch_end(self, val_outputs):
            clock.val_end()
            super().on_validation_epoch_end(val_outputs)

    pp = Path(os.environ["nnUNet_preprocessed"]) / spec["dataset"]
    plans = json.loads((pp / f"{spec['plans']}.json").read_text())
    plans["continue_training"] = False  # what nnunetv2.run.run_training adds before constructing the trainer
    dataset_json = json.loads((pp / "dataset.json").read_text())
    trainer = nnUNetTrainer_Bench(plans, "3d_fullres", 0, dataset_json, device=device)
    shutil.rmtree(trainer.output_folder_base, ignore_errors=True)
    trainer.num_iterations_per_epoch = spec["iters"]
    trainer.num_val_iterations_per_epoch = spec["val_iters"]
    trainer.num_epochs = spec["epochs"]
    init_hash = None
    if spec.get("parity"):  # seeded exactly as Lightning's seed_everything(seed) seeds ours, before initialize()
        import random

        import numpy as np

        random.seed(spec["seed"])
        np.random.seed(spec["seed"])
        torch.manual_seed(spec["seed"])
        trainer.initialize()
        init_hash = state_hash(getattr(trainer.network, "_orig_mod", trainer.network))
    trainer.run_training()
    out = clock.result()
    if spec.get("parity"):
        trainer.perform_actual_validation(False)  # what nnunetv2's run_training() does after trainer.run_training()
        out.update(init_hash=init_hash, **outcome(Path(trainer.output_folder)))
    return out


def run_ours(spec: dict) -> dict:
    """`resenc_lightning.cli.main` with its defaults (stable-epoch callbacks on); the clock is a callback."""
    import lightning.pytorch as pl

    from resenc_lightning import cli, data

    clock_box: list[Clock] = []
    hash_box: list[str] = []

    class BenchClock(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            clock_box.append(Clock(spec["spawn_time"], trainer.strategy.root_device))
            hash_box.append(state_hash(pl_module.network))  # untouched since the module built it

        def on_train_epoch_start(self, trainer, pl_module):
            clock_box[0].train_epoch_start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock_box[0].train_step_end()

        def on_validation_epoch_start(self, trainer, pl_module):
            clock_box[0].val_start()

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            clock_box[0].val_step_end()

        def on_validation_epoch_end(self, trainer, pl_module):
            clock_box[0].val_end()

    forced = cli.ResEncLightningCLI.forced_callbacks
    cli.ResEncLightningCLI.forced_callbacks = lambda self: [*forced(self), BenchClock()]
    augmenter = data.NnUNetDataModule._augmenter

    def timed_augmenter(self, loader, train):
        source = augmenter(self, loader, train)
        return TimedBatches(source, clock_box[0]) if train else source

    data.NnUNetDataModule._augmenter = timed_augmenter
    results = Path(spec["workdir"]) / ("results_ours" + (f"_{spec['pair']}" if spec.get("parity") else ""))
    shutil.rmtree(results, ignore_errors=True)
    accelerator = "gpu" if spec["device"] == "cuda" else "cpu"
    cli.main([
        "--plans", spec["plans"], "--dataset", spec["dataset"], "--configuration", "3d_fullres", "--fold", "0",
        "--data.results_dir", str(results), "--data.num_iterations_per_epoch", str(spec["iters"]),
        "--data.num_val_iterations_per_epoch", str(spec["val_iters"]), "--trainer.max_epochs", str(spec["epochs"]),
        "--trainer.accelerator", accelerator, "--trainer.devices", "1", "--trainer.enable_model_summary", "false",
        *(["--final_validation", "true", "--seed", str(spec["seed"])] if spec.get("parity")
          else ["--final_validation", "false", "--seed_everything", "0"]),
        *spec.get("ours_args", []),
    ])
    out = clock_box[0].result()
    if spec.get("parity"):
        fold = next(results.glob(f"{spec['dataset']}/*/fold_0"))
        out.update(init_hash=hash_box[0], **outcome(fold))
    return out


# -- parity: what each side learned (runs in the child) ----------------------------------------------------
def state_hash(network) -> str:
    """sha256 over the network's state_dict (names and bytes): equal on both sides = identical initial weights."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def outcome(fold: Path) -> dict:
    """nnU-Net's final validation (validation/summary.json) and per-epoch logging (checkpoint_final.pth)."""
    import torch

    summary = json.loads((fold / "validation" / "summary.json").read_text())
    logging = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    return {
        "dice": {k: v["Dice"] for k, v in summary["mean"].items()},
        "dice_fg_mean": summary["foreground_mean"]["Dice"],
        "curves": {k: [float(x) for x in logging[k]] for k in ("train_losses", "val_losses", "ema_fg_dice")},
    }


# -- orchestration (parent) --------------------------------------------------------------------------------
def run_child(spec: dict, timeout: float) -> dict:
    spec = {**spec, "spawn_time": time.time()}
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        return {**spec, "error": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"}
    return {**spec, **json.loads(lines[-1][len(RESULT_TAG):]), "wall_s": round(time.time() - spec["spawn_time"], 1)}


FIGURES = [  # key, label, format, scale
    ("train_step_s", "train step incl. data (ms, median)", ".0f", 1000),
    ("data_wait_s", "blocked on data per step (ms, median)", ".1f", 1000),
    ("val_step_s", "validation step (ms)", ".0f", 1000),
    ("train_phase_step_s", "train phase wall / steps (ms)", ".0f", 1000),
    ("steps_per_s", "train steps/s (higher is better)", ".2f", 1),
    ("epoch_s", "epoch wall incl. val + checkpoints (s)", ".2f", 1),
    ("startup_s", "start-up to 1st step done (s)", ".1f", 1),
    ("peak_rss_mb", "peak RSS, main process (MB)", ".0f", 1),
    ("peak_alloc_gb", "peak CUDA allocated (GiB)", ".2f", 1),
    ("peak_reserved_gb", "peak CUDA reserved (GiB)", ".2f", 1),
]


def table(results: list[dict]) -> str:
    """Medians per side and the median of per-pair ratios ours/native (and ours/ours_before when measured)."""
    ok = [r for r in results if "error" not in r]
    by_pair: dict[int, dict[str, dict]] = {}
    for r in ok:
        by_pair.setdefault(r["pair"], {})[r["side"]] = r
    names = [s for s in ("native", "ours", "ours_before") if any(r["side"] == s for r in results)]
    ratios_of = [("ours", "native")] + ([("ours", "ours_before")] if "ours_before" in names else [])
    head = ["figure", *(n.replace("native", "native nnU-Net") for n in names),
            *(f"{a}/{b} (median of pairs)" for a, b in ratios_of)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, fmt, scale in FIGURES:
        values = {n: [r[key] for r in ok if r["side"] == n and key in r] for n in names}
        if not any(values.values()):
            continue

        cells = [label, *(format(statistics.median(values[n]) * scale, fmt) if values[n] else "-" for n in names)]
        for a, b in ratios_of:
            ratios = [p[a][key] / p[b][key] for p in by_pair.values() if a in p and b in p and p[b].get(key)]
            cells.append(f"{statistics.median(ratios):.3f}" if ratios else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def _verdict(diffs: list[float]) -> str:
    """Paired t: a mean difference beyond t(0.975, n-1) standard errors of the pairs is a systematic gap."""
    if len(diffs) < 2:
        return "n < 2"
    from scipy.stats import t

    sd = statistics.stdev(diffs)
    bound = t.ppf(0.975, len(diffs) - 1) * sd / len(diffs) ** 0.5
    mean = statistics.mean(diffs)
    if sd == 0 and mean == 0:
        return "identical"
    return f"**GAP** (|mean| > {bound:.3f})" if abs(mean) > bound else f"within spread (95% bound ±{bound:.3f})"


def parity_table(results: list[dict], label_names: dict[str, str]) -> str:
    """Final-validation Dice per class per side (mean ± sd over pairs), paired differences, loss curves."""
    pairs: dict[int, dict[str, dict]] = {}
    for r in results:
        if "error" not in r:
            pairs.setdefault(r["pair"], {})[r["side"]] = r
    full = [p for _, p in sorted(pairs.items()) if {"native", "ours"} <= p.keys()]
    same_init = [p["native"]["init_hash"] == p["ours"]["init_hash"] for p in full]
    rows = [(f"{label_names.get(k, k)} (label {k})", lambda r, k=k: r["dice"].get(k, float("nan")))
            for k in sorted({k for p in full for k in p["native"]["dice"]}, key=int)]
    rows.append(("foreground mean", lambda r: r["dice_fg_mean"]))
    lines = ["| final-validation Dice | native nnU-Net | ours | ours − native (paired) | verdict |",
             "|---|---|---|---|---|"]
    for name, get in rows:
        nat, ours = [get(p["native"]) for p in full], [get(p["ours"]) for p in full]
        diffs = [o - n for o, n in zip(ours, nat)]
        lines.append(f"| {name} | {_mean_sd(nat)} | {_mean_sd(ours)} | {_mean_sd(diffs)} | {_verdict(diffs)} |")
    lines += ["", f"{len(full)} complete pairs; identical initial weights (sha256 of the network state right after "
              f"init, printed by each child) in {sum(same_init)}/{len(same_init)} pairs; per-pair foreground Dice "
              "native/ours: " + ", ".join(f"{p['native']['dice_fg_mean']:.3f}/{p['ours']['dice_fg_mean']:.3f}"
                                          for p in full), ""]
    lines += ["| epoch | train loss native | train loss ours | Δ train (paired) | val loss native | val loss ours "
              "| Δ val (paired) |", "|---|---|---|---|---|---|---|"]
    n_epochs = min((len(p[s]["curves"]["train_losses"]) for p in full for s in ("native", "ours")), default=0)
    for e in range(n_epochs):
        cells = [str(e)]
        for key in ("train_losses", "val_losses"):
            nat = [p["native"]["curves"][key][e] for p in full]
            ours = [p["ours"]["curves"][key][e] for p in full]
            cells += [_mean_sd(nat), _mean_sd(ours), _mean_sd([o - n for o, n in zip(ours, nat)])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_parity(args: argparse.Namespace, base: dict, info: dict, start: float) -> str:
    """Alternating native/ours pairs, each pair from one seed (identical initial weights), then the table."""
    from concurrent.futures import ThreadPoolExecutor

    results: list[dict] = []
    partial = Path(args.out) / "parity_partial.jsonl" if args.out else None
    if partial:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text("")

    def one_pair(pair: int) -> None:
        sides = ("native", "ours") if pair % 2 == 0 else ("ours", "native")
        for side in sides:
            r = run_child({**base, "pair": pair, "side": side, "src": None, "parity": True,
                           "seed": args.seed + pair}, timeout=args.run_timeout)
            results.append(r)
            if partial:
                with partial.open("a") as fh:
                    fh.write(json.dumps(r) + "\n")
            status = r.get("error") or (f"init {r['init_hash']}, fg Dice {r['dice_fg_mean']:.3f} "
                                        f"{ {k: round(v, 3) for k, v in r['dice'].items()} }, final train/val loss "
                                        f"{r['curves']['train_losses'][-1]:.3f}/{r['curves']['val_losses'][-1]:.3f}, "
                                        f"{r['wall_s']:.0f} s")
            print(f"[{time.time() - start:5.0f}s] pair {pair} (seed {args.seed + pair}) {side:>6}: {status}", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one_pair, range(args.pairs)))
    names = label_names(Path(os.environ["nnUNet_preprocessed"]) / info["dataset"] / "dataset.json")
    text = (f"{parity_table(results, names)}\n\ndevice {_device_name(args.device)}; plans {info['plans']} "
            f"(patch {info['patch_size']}, batch {info['batch_size']}, features {info['features_per_stage']}); "
            f"{args.pairs} pairs (seeds {args.seed}..{args.seed + args.pairs - 1}, order flips every pair) x "
            f"{args.epochs} epochs x {args.iters}+{args.val_iters} steps, then nnU-Net's final validation; "
            f"nnUNet_n_proc_DA={args.workers}; torch threads {args.threads or 'default'}; {args.jobs} pair(s) at a time; "
            f"{time.time() - start:.0f} s in all")
    print(text, flush=True)
    _write(args, "parity", text, results)
    return text


def label_names(dataset_json: Path) -> dict[str, str]:
    """Foreground label value -> name from dataset.json (empty when the file is gone)."""
    labels = json.loads(dataset_json.read_text())["labels"] if dataset_json.is_file() else {}
    return {str(v): k for k, v in labels.items() if isinstance(v, int) and v > 0}


def tabulate(args: argparse.Namespace) -> str:
    """--tabulate: one parity table from the jsonl of several runs (e.g. seeds split over machines); pairs by seed."""
    records = [json.loads(line) for f in args.tabulate for line in Path(f).read_text().splitlines() if line.strip()]
    records = [{**r, "pair": r["seed"]} for r in records if "error" not in r]  # runs cut short are left out
    first = records[0]
    names = label_names(Path(first["workdir"]) / "nnUNet_preprocessed" / first["dataset"] / "dataset.json")
    seeds = sorted({r["seed"] for r in records})
    text = (f"{parity_table(records, names)}\n\ndevice {first['device']}; plans {first['plans']}; {len(seeds)} pairs "
            f"(seeds {', '.join(map(str, seeds))}, native first in even pairs of each run) x {first['epochs']} epochs x "
            f"{first['iters']}+{first['val_iters']} steps, then nnU-Net's final validation; torch threads "
            f"{first['threads']}; tabulated from {len(args.tabulate)} run(s); longest run "
            f"{max(r.get('wall_s', 0) for r in records):.0f} s")
    print(text, flush=True)
    _write(args, "parity", text, records)
    return text


def _write(args: argparse.Namespace, stem: str, text: str, results: list[dict]) -> None:
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.md").write_text(text + "\n")
        (out / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    if any("error" in r for r in results):
        print("\n".join(r["error"] for r in results if "error" in r), file=sys.stderr)
        raise SystemExit(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--pairs", type=int, default=None, help="native/ours run pairs, alternating (3; --parity 5)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per run (3, the first is not timed; --parity: the learning budget, cpu 6)")
    p.add_argument("--iters", type=int, default=None, help="training steps per epoch (cpu 12, cuda 50)")
    p.add_argument("--val-iters", type=int, default=None, help="validation steps per epoch (cpu 2, cuda 10)")
    p.add_argument("--workers", type=int, default=None, help="nnUNet_n_proc_DA for both sides (cpu 2, cuda 12)")
    p.add_argument("--cases", type=int, default=None, help="synthetic training cases")
    p.add_argument("--shape", type=int, default=None, help="largest edge of the synthetic volumes (voxels)")
    p.add_argument("--cpu-feature-divisor", type=int, default=8, help="CPU plans: features_per_stage // this")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in both training processes (cpu default 1: on a shared 2-core machine "
                        "2 threads oversubscribe and make steps several times slower and noisier; cuda: torch's)")
    p.add_argument("--compile", action="store_true", help="nnUNet_compile=t for both sides (CUDA; default off)")
    p.add_argument("--workdir", default="/tmp/resenc_benchmark", help="nnU-Net folders for the synthetic dataset")
    p.add_argument("--dataset", default=None,
                   help="benchmark an existing preprocessed dataset in $nnUNet_preprocessed (ID or name) with --plans "
                        "as they are, instead of building the synthetic one")
    p.add_argument("--plans", default=SOURCE_PLANS, help="with --dataset: the plans identifier")
    p.add_argument("--baseline-src", default=None,
                   help="also run ours from another checkout's src/ (e.g. `git archive` of an earlier commit)")
    p.add_argument("--ours-args", default="", help="extra CLI arguments for ours, e.g. '--model.channels_last true'")
    p.add_argument("--out", default=None, help="also write the table and raw results (.md, .jsonl) here")
    p.add_argument("--smoke", action="store_true",
                   help="the --device cpu run with 1 pair of 2 epochs of 2+1 steps (about a minute; also with --parity)")
    p.add_argument("--parity", action="store_true",
                   help="learning-curve parity instead of speed: per pair one seed for both sides (identical initial "
                        "weights), nnU-Net's final validation; Dice per class and loss curves, paired differences")
    p.add_argument("--seed", type=int, default=0, help="--parity: pair i uses seed + i on both sides")
    p.add_argument("--jobs", type=int, default=1,
                   help="--parity: pairs run side by side (each pair's two runs still one after the other)")
    p.add_argument("--tabulate", nargs="+", default=None, metavar="JSONL",
                   help="--parity: only rebuild the table from earlier runs' parity(_partial).jsonl, pairs keyed by seed")
    p.add_argument("--run-timeout", type=float, default=1800, help="seconds before one run is abandoned")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if args.smoke:  # the --device cpu run, shorter: only counts change, not the data or the plans
        args.device, args.pairs, args.epochs = "cpu", args.pairs or 1, 2
        args.iters, args.val_iters = 2, 1
    args.pairs = args.pairs or (5 if args.parity else 3)
    args.epochs = args.epochs or (PARITY_EPOCHS if args.parity and not cuda else 3)
    if args.parity and args.workers is None:
        args.workers = 0  # in-process augmentation on the seeded global RNGs: the sides differ only where the code does
    args.iters = args.iters or (50 if cuda else 12)
    args.val_iters = args.val_iters or (10 if cuda else 2)
    args.workers = (12 if cuda else 1) if args.workers is None else args.workers
    args.cases = args.cases or (5 if cuda else 6)
    args.shape = args.shape or (200 if cuda else 44)
    args.threads = args.threads or (0 if cuda else 1)
    return args


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "_child":
        spec = json.loads(argv[1])
        if spec.get("parity"):  # one native results folder per pair: --jobs runs pairs side by side
            os.environ["nnUNet_results"] = str(Path(spec["workdir"]) / f"results_native_{spec['pair']}")
        if spec.get("src"):
            sys.path.insert(0, spec["src"])  # --baseline-src: an earlier checkout of ours
        if spec["threads"]:
            import torch

            torch.set_num_threads(spec["threads"])
        result = run_native(spec) if spec["side"] == "native" else run_ours(spec)
        if spec.get("src"):
            import resenc_lightning

            assert resenc_lightning.__file__.startswith(spec["src"]), resenc_lightning.__file__
        print(RESULT_TAG + json.dumps(result), flush=True)
        return ""
    args = parse_args(argv)
    if args.tabulate:
        return tabulate(args)
    os.environ["nnUNet_n_proc_DA"] = str(args.workers)
    os.environ["nnUNet_compile"] = "t" if args.compile else "f"
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # augmentation workers too
    if args.parity:
        os.environ.setdefault("nnUNet_def_n_proc", str(min(os.cpu_count() or 1, 8)))  # final-validation export pool
    start = time.time()
    info = prepare(args)
    print(f"dataset and plans ready in {info['prepare_s']} s: {json.dumps(info)}", flush=True)
    base = {"device": args.device, "dataset": info["dataset"], "plans": info["plans"], "epochs": args.epochs,
            "iters": args.iters, "val_iters": args.val_iters, "workdir": str(Path(args.workdir).resolve()),
            "threads": args.threads, "ours_args": shlex.split(args.ours_args)}
    if args.parity:
        return run_parity(args, base, info, start)
    results = []
    sides = [("native", None), ("ours", None)] + ([("ours_before", str(Path(args.baseline_src).resolve()))]
                                                 if args.baseline_src else [])
    for pair in range(args.pairs):
        for side, src in (sides if pair % 2 == 0 else sides[::-1]):  # A B, B A, ...: a load trend cancels out
            r = run_child({**base, "pair": pair, "side": side, "src": src}, timeout=900)
            results.append(r)
            status = r.get("error") or (f"step {r['train_step_s'] * 1000:.0f} ms, wait {r['data_wait_s'] * 1000:.1f} ms, "
                                        f"val {r['val_step_s'] * 1000:.0f} ms, start-up {r['startup_s']:.1f} s, "
                                        f"RSS {r['peak_rss_mb']:.0f} MB")
            print(f"[{time.time() - start:5.0f}s] pair {pair} {side:>11}: {status}", flush=True)
    extra = f"; ours with {args.ours_args}" if args.ours_args else ""
    text = (f"{table(results)}\n\ndevice {_device_name(args.device)}; plans {info['plans']} (patch {info['patch_size']}, "
            f"batch {info['batch_size']}, features {info['features_per_stage']}); {args.pairs} pairs x "
            f"{args.epochs} epochs x {args.iters}+{args.val_iters} steps; nnUNet_n_proc_DA={args.workers}; "
            f"torch threads {args.threads or 'default'}{extra}; "
            f"{time.time() - start:.0f} s in all")
    print(text, flush=True)
    _write(args, "benchmark", text, results)
    return text


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else device


if __name__ == "__main__":
    main()
