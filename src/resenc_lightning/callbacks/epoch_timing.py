"""Epoch wall time, median step time and data-wait fraction; drift vs the fresh run's reference.

The reference (the fresh run's first full epochs) is kept in the checkpoint, so a resumed run is
compared with the run it continues. A fresh run that stopped before its reference epoch leaves
none: the next resumed run then takes its own first epoch after `reference_skip_epochs`, marked
`reference_resumed` ("first resumed run's" in the warning), and later resumes compare with it.
That reference is second best (it may itself carry a resume-caused slowdown, the drift looked
for here), but without it drift would never be reported for the run. On drift beyond
``tolerance`` one warning names the most likely cause from the evidence at hand: other processes
on the GPU, data loading (more waiting for batches), or less memory reserved than the reference
(cuDNN picked smaller-workspace, slower algorithms).

Rank 0 also draws the history into `epoch_times.png` in the fold folder every epoch (`epoch_plot.py`): the
per-epoch history, the resume points and the drift warnings live in the callback's checkpoint state, so the
picture of a resumed run still shows the epochs, the reference and the resumes before it.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from resenc_lightning import epoch_plot, gpu_info, nvml_pids, rank_report


class EpochTiming(pl.Callback):
    """Per-epoch `time/epoch_s`, `time/step_median_s`, `time/data_wait_frac` to every logger; drift warning.

    Args:
        enabled: switch timing off.
        tolerance: relative increase of the median step time over the reference that triggers the warning.
        reference_skip_epochs: epochs of a fresh run not used as reference (epoch 0 includes start-up work).
        cuda_sync: synchronise CUDA at every step end (exact per-step GPU times, but a host-device sync per
            step that nnU-Net's loop does not need). Off: epoch boundaries are synchronised, steps are timed
            between launches, which in steady state is the GPU time because the launch queue is bounded.
        plot: write `epoch_times.png` (epoch/step times, data wait, reference band, resumes, drift) into the fold
            folder every epoch, next to nnU-Net's progress.png (rank 0).
    """

    def __init__(self, enabled: bool = True, tolerance: float = 0.10, reference_skip_epochs: int = 1,
                 cuda_sync: bool = False, plot: bool = True) -> None:
        self.enabled = enabled
        self.tolerance = tolerance
        self.reference_skip_epochs = reference_skip_epochs
        self.cuda_sync = cuda_sync
        self.plot = plot
        self.reference: dict[str, float] | None = None
        self.reference_resumed = False  # taken by a resumed run (the fresh one stopped before its reference epoch)
        self.epochs: list[dict[str, float]] = []
        self.resumes: list[int] = []  # the epoch each resumed process started in
        self.drifts: list[dict[str, Any]] = []  # every drift warning of the run: epoch, ratio, step, named cause
        self.warning: str | None = None
        self._warned = False
        self._start_epoch: int | None = None  # this process's first epoch
        self._restored = False
        self._compare = False  # a reference came with the checkpoint: this run checks for drift against it
        self._rank_pids: list[int] = []  # this trainer's ranks: never "other processes" on the GPU
        self._reset()

    def _reset(self) -> None:
        self._epoch_start: float | None = None
        self._last_end: float | None = None
        self._step_start = 0.0
        self._steps: list[float] = []
        self._wait = 0.0

    def _now(self, pl_module: pl.LightningModule, sync: bool = True) -> float:
        if sync and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    # -- hooks -----------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start_epoch is None:
            self._start_epoch = trainer.current_epoch
            if self._restored:
                self.resumes.append(trainer.current_epoch)
        if pl_module.device.type == "cuda":
            self._rank_pids = nvml_pids.rank_pids()  # collective: every rank starts training here

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        if self.enabled and pl_module.device.type == "cuda":  # reserved_gb: this epoch's peak, not the process's
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._epoch_start = self._last_end = self._now(pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._epoch_start is None:  # resumed mid-epoch: Lightning does not call on_train_epoch_start then
            self.on_train_epoch_start(trainer, pl_module)
        now = time.perf_counter()
        if self._last_end is not None:
            self._wait += now - self._last_end  # blocked on the next batch (plus negligible loop overhead)
        self._step_start = now

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = self._now(pl_module, sync=self.cuda_sync)
        self._steps.append(now - self._step_start)
        self._last_end = now

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or not self._steps:
            return
        assert self._epoch_start is not None  # set by the epoch's start or its first batch
        epoch_s = self._now(pl_module) - self._epoch_start
        train_s = sum(self._steps) + self._wait
        record = {
            "epoch": float(trainer.current_epoch), "epoch_s": epoch_s, "steps": float(len(self._steps)),
            "step_median_s": statistics.median(self._steps),
            "data_wait_frac": self._wait / train_s if train_s > 0 else 0.0,
            "reserved_gb": torch.cuda.max_memory_reserved(pl_module.device) / 2**30
            if pl_module.device.type == "cuda" else 0.0,
        }
        self.epochs.append(record)
        metrics = {"time/epoch_s": epoch_s, "time/step_median_s": record["step_median_s"],
                   "time/data_wait_frac": record["data_wait_frac"]}
        if trainer.world_size > 1:
            metrics.update(self._per_rank(pl_module, record))
        pl_module.log_dict(metrics, on_step=False, on_epoch=True)
        self._update_reference(trainer, record)
        if self._compare and not self._warned:
            self._check_drift(trainer, pl_module, record)
        spec = getattr(pl_module, "spec", None)  # our module knows the fold folder; another one has none
        if self.plot and spec is not None and trainer.is_global_zero:
            self._write_plot(spec)

    def _write_plot(self, spec: Any) -> None:
        try:
            epoch_plot.write(spec.output_folder, epochs=self.epochs, reference=self.reference,
                             tolerance=self.tolerance, resumes=self.resumes, drifts=self.drifts,
                             reference_resumed=self.reference_resumed)
        except Exception as e:  # a plotting or disk problem must never stop training; the history is in the state
            rank_zero_info(f"EpochTiming: {epoch_plot.FILE_NAME} not written ({e}).")

    @staticmethod
    def _per_rank(pl_module: pl.LightningModule, record: dict[str, float]) -> dict[str, float]:
        """Every rank's step time, data wait and reserved memory (loggers write rank 0's row only)."""
        keys = ("step_median_s", "data_wait_frac", "reserved_gb")
        mine = torch.tensor([record[k] for k in keys], dtype=torch.float64, device=pl_module.device)
        gathered = pl_module.all_gather(mine).cpu()  # (world_size, 3), collective: every rank ends its epoch here
        return {f"time/rank{rank}/{key}": float(gathered[rank, i]) for rank in range(gathered.shape[0])
                for i, key in enumerate(keys)}

    def _update_reference(self, trainer: pl.Trainer, record: dict[str, float]) -> None:
        """The first epoch after `reference_skip_epochs` of this process is the reference if there is none yet: the
        fresh run's, or (when the fresh run stopped before it) the first resumed run's, marked `reference_resumed`."""
        if self.reference is not None:
            return
        if trainer.current_epoch - (self._start_epoch or 0) >= self.reference_skip_epochs:
            self.reference = dict(record)
            self.reference_resumed = self._restored

    def _check_drift(self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: dict[str, float]) -> None:
        ref = self.reference
        assert ref is not None
        ratio = record["step_median_s"] / ref["step_median_s"] if ref["step_median_s"] > 0 else 1.0
        if ratio <= 1 + self.tolerance:
            return
        self._warned = True
        cause = self.likely_cause(record, ref, pl_module)
        self.drifts.append({"epoch": int(record["epoch"]), "ratio": ratio, "step_median_s": record["step_median_s"],
                            "cause": cause})
        self.warning = (
            f"EpochTiming: resumed epoch {int(record['epoch'])} median step {record['step_median_s'] * 1000:.0f} ms is "
            f"{ratio - 1:+.0%} vs the {'first resumed' if self.reference_resumed else 'fresh'} run's "
            f"{ref['step_median_s'] * 1000:.0f} ms (epoch {int(ref['epoch'])}). "
            f"Likely cause: {cause}"
        )
        rank_report.warn(self.warning)

    def likely_cause(self, record: dict[str, float], ref: dict[str, float], pl_module: pl.LightningModule) -> str:
        others = self._other_gpu_processes(pl_module)
        if others:
            return (f"{len(others)} other process(es) on this GPU (pids {', '.join(str(p) for p, _ in others)}); "
                    f"stop them or use another GPU.")
        if record["data_wait_frac"] > ref["data_wait_frac"] + 0.05:
            return (f"waiting for data ({record['data_wait_frac']:.0%} of the epoch vs {ref['data_wait_frac']:.0%}); "
                    f"raise nnUNet_n_proc_DA (now {os.environ.get('nnUNet_n_proc_DA', 'default')}) or check the disk.")
        if ref["reserved_gb"] > 0 and record["reserved_gb"] < 0.95 * ref["reserved_gb"]:
            return (f"less GPU memory reserved ({record['reserved_gb']:.1f} vs {ref['reserved_gb']:.1f} GiB): cuDNN "
                    f"likely picked smaller-workspace algorithms; keep CudnnPinning on (re-warm-up at resume) or lower "
                    f"the memory target.")
        return "no evidence of GPU sharing, data wait or memory change; check clocks/thermals (GpuMonitor logs them)."

    def _other_gpu_processes(self, pl_module: pl.LightningModule) -> list[tuple[int, int]]:
        """Others on our GPU; none when NVML cannot tell (GpuMonitor warns about that once)."""
        if pl_module.device.type != "cuda":
            return []
        return gpu_info.other_processes(pl_module.device, self._rank_pids) or []

    # -- checkpoint state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "reference_resumed": self.reference_resumed, "epochs": self.epochs,
                "resumes": self.resumes, "drifts": self.drifts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = state_dict.get("reference")
        self.reference_resumed = bool(state_dict.get("reference_resumed", False))
        self.epochs = list(state_dict.get("epochs", []))
        self.resumes = list(state_dict.get("resumes", []))
        self.drifts = list(state_dict.get("drifts", []))
        self._restored = True
        self._compare = self.reference is not None
