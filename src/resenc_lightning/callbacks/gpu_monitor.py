"""Report the GPU we train on and what else runs on it (pynvml), at start and every epoch.

Another process on the same GPU is the most common cause of a run that is suddenly slower; WSL
adds its own overhead. Without NVIDIA/NVML this prints one info line and does nothing else.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl

from resenc_lightning import gpu_info, rank_report
from resenc_lightning.memory_target import GB


class ExclusiveGpuError(RuntimeError):
    """Raised with --require_exclusive_gpu when other processes use our GPU."""


class GpuMonitor(pl.Callback):
    """Device, driver, memory and other processes at start; memory, utilisation, SM clock, temperature per epoch.

    Args:
        enabled: switch the monitor off.
        require_exclusive_gpu: fail at start (one line, before training) if other processes use the GPU.
    """

    def __init__(self, enabled: bool = True, require_exclusive_gpu: bool = False) -> None:
        self.enabled = enabled
        self.require_exclusive_gpu = require_exclusive_gpu
        self.start_snapshot: gpu_info.GpuSnapshot | None = None
        self.messages: list[str] = []
        self._nv: Any = None
        self._handle: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled or self._handle is not None:
            return
        device = trainer.strategy.root_device
        if device.type != "cuda":
            self._info(f"GpuMonitor: training on {device.type}; no NVIDIA GPU to monitor.")
            return
        nv = gpu_info.load_nvml()
        if nv is None:
            self._info("GpuMonitor: NVML (nvidia-ml-py) unavailable; GPU monitoring off.")
            return
        self.start(nv, gpu_info.handle_for(nv, device.index or 0), rank=trainer.global_rank)

    def start(self, nv: Any, handle: Any, rank: int = 0) -> gpu_info.GpuSnapshot:
        self._nv, self._handle = nv, handle
        snap = gpu_info.snapshot(nv, handle, {os.getpid()})
        self.start_snapshot = snap
        self._info(f"GpuMonitor[rank {rank}]: {snap.name}, driver {snap.driver}, "
                   f"{snap.used_bytes / GB:.1f} of {snap.total_bytes / GB:.1f} GB in use at start.")
        if snap.other_processes:
            listed = ", ".join(f"pid {pid} ({used / GB:.1f} GB)" for pid, used in snap.other_processes)
            message = (f"{len(snap.other_processes)} other process(es) use this GPU: {listed}; they compete for "
                       f"memory and compute, and change which cuDNN algorithms fit.")
            if self.require_exclusive_gpu:
                raise ExclusiveGpuError(f"--require_exclusive_gpu: {message} Stop them or pick another GPU "
                                        f"(CUDA_VISIBLE_DEVICES).")
            self._warn(f"GpuMonitor: {message}")
        if gpu_info.is_wsl():
            self._warn("GpuMonitor: running under WSL; GPU memory and kernel launches are slower there. "
                       "Bare-metal Linux is advised for training.")
        return snap

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handle is None:
            return
        snap = gpu_info.snapshot(self._nv, self._handle, {os.getpid()})
        metrics = {"gpu/memory_used_gb": snap.used_bytes / GB, "gpu/other_processes": float(len(snap.other_processes))}
        if snap.utilization_pct is not None:
            metrics["gpu/utilization_pct"] = float(snap.utilization_pct)
        if snap.sm_clock_mhz is not None:
            metrics["gpu/sm_clock_mhz"] = float(snap.sm_clock_mhz)
        if snap.temperature_c is not None:
            metrics["gpu/temperature_c"] = float(snap.temperature_c)
        pl_module.log_dict(metrics, on_step=False, on_epoch=True)

    def _info(self, message: str) -> None:
        self.messages.append(message)
        rank_report.info(message)

    def _warn(self, message: str) -> None:
        self.messages.append(message)
        rank_report.warn(message)
