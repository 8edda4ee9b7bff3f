"""Report the GPU we train on and what else runs on it (pynvml), at start and every epoch.

Another process on the same GPU is the most common cause of a run that is suddenly slower; WSL
adds its own overhead. Without NVIDIA/NVML this prints one info line and does nothing else.
NVML trouble (a MIG instance it cannot single out, NO_PERMISSION in a container, host pids without
the host PID namespace) makes the affected readings "unknown" with one warning; it never stops
training. The one decision that does, `--require_exclusive_gpu`, is agreed by all ranks, so no
rank waits for one that refused alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

from resenc_lightning import gpu_info, nvml_device, nvml_pids, rank_report
from resenc_lightning.memory_target import GB


class ExclusiveGpuError(RuntimeError):
    """Raised with --require_exclusive_gpu when other processes use our GPU (on any rank)."""


def _alone(decision: bool) -> bool:
    return decision


class GpuMonitor(pl.Callback):
    """Device, driver, memory and other processes at start; memory, utilisation, SM clock, temperature per epoch.

    Args:
        enabled: switch the monitor off.
        require_exclusive_gpu: fail at start (one line, before training, on every rank) if other processes use the
            GPU of any rank. Unknown (NVML cannot tell) does not fail.
    """

    def __init__(self, enabled: bool = True, require_exclusive_gpu: bool = False) -> None:
        self.enabled = enabled
        self.require_exclusive_gpu = require_exclusive_gpu
        self.start_snapshot: gpu_info.GpuSnapshot | None = None
        self.messages: list[str] = []
        self._nv: Any = None
        self._handle: Any = None
        self._parent: Any = None
        self._device: Any = None
        self._rank_pids: list[int] = []
        self._set_up = False
        self._warned_unknown = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled or self._set_up:
            return
        self._set_up = True
        device = trainer.strategy.root_device
        if device.type != "cuda":
            self._info(f"GpuMonitor: training on {device.type}; no NVIDIA GPU to monitor.")
            return
        self._device = device
        self._rank_pids = nvml_pids.rank_pids()  # collective: every rank, before anything that may fail locally
        snap = None
        try:
            nv = gpu_info.load_nvml()
            if nv is None:
                self._info("GpuMonitor: NVML (nvidia-ml-py) unavailable; GPU monitoring off.")
            else:
                found = nvml_device.locate(nv, device.index or 0)
                if found.handle is None:
                    self._unknown([f"the NVML device of cuda:{device.index or 0} is {found.how}"])
                else:
                    snap = self.inspect(nv, found.handle, trainer.global_rank, found.parent)
        except Exception as exc:  # never let NVML stop training
            self._unknown([f"NVML failed ({nvml_device.nvml_reason(exc)})"])
        self.refuse_if_shared(snap, lambda d: trainer.strategy.reduce_boolean_decision(d, all=False))

    def start(self, nv: Any, handle: Any, rank: int = 0) -> gpu_info.GpuSnapshot:
        """One process on its own: inspect, then refuse (--require_exclusive_gpu) without asking other ranks."""
        snap = self.inspect(nv, handle, rank)
        self.refuse_if_shared(snap, _alone)
        return snap

    def inspect(self, nv: Any, handle: Any, rank: int = 0, parent: Any = None) -> gpu_info.GpuSnapshot:
        """The start reading and its lines: one info, a warning for other processes, one for what is unknown."""
        self._nv, self._handle, self._parent = nv, handle, parent
        snap = self._read()
        self.start_snapshot = snap
        memory = (f"{snap.used_bytes / GB:.1f} of {snap.total_bytes / GB:.1f} GB in use at start"
                  if snap.used_bytes is not None and snap.total_bytes is not None else "memory in use unknown")
        self._info(f"GpuMonitor[rank {rank}]: {snap.name}, driver {snap.driver}, {memory}.")
        if snap.other_processes and not self.require_exclusive_gpu:  # with it, they are the error
            self._warn(f"GpuMonitor: {self._others(snap)}")
        self._unknown(snap.problems)
        if gpu_info.is_wsl():
            self._warn("GpuMonitor: running under WSL; GPU memory and kernel launches are slower there. "
                       "Bare-metal Linux is advised for training.")
        return snap

    def refuse_if_shared(self, snap: gpu_info.GpuSnapshot | None, agree: Callable[[bool], bool]) -> None:
        """--require_exclusive_gpu: raise on every rank if any rank saw other processes. `agree` (any-reduction over
        ranks) is called on every rank whatever its own reading, so none waits for one that raised alone."""
        if not self.require_exclusive_gpu:
            return
        mine = snap is not None and bool(snap.other_processes)
        if agree(mine):
            where = self._others(snap) if mine and snap is not None else \
                "another rank found other processes on its GPU (see that rank's error)."
            raise ExclusiveGpuError(f"--require_exclusive_gpu: {where} Stop them or pick another GPU "
                                    f"(CUDA_VISIBLE_DEVICES).")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handle is None:
            return
        try:
            snap = self._read()
        except Exception as exc:  # snapshot itself never raises; this is the last guard for training
            self._unknown([f"GPU reading failed ({nvml_device.nvml_reason(exc)})"])
            return
        self._unknown(snap.problems)
        metrics = {}
        if snap.used_bytes is not None:
            metrics["gpu/memory_used_gb"] = snap.used_bytes / GB
        if snap.other_processes is not None:
            metrics["gpu/other_processes"] = float(len(snap.other_processes))
        if snap.utilization_pct is not None:
            metrics["gpu/utilization_pct"] = float(snap.utilization_pct)
        if snap.sm_clock_mhz is not None:
            metrics["gpu/sm_clock_mhz"] = float(snap.sm_clock_mhz)
        if snap.temperature_c is not None:
            metrics["gpu/temperature_c"] = float(snap.temperature_c)
        if metrics:
            pl_module.log_dict(metrics, on_step=False, on_epoch=True)

    def _read(self) -> gpu_info.GpuSnapshot:
        own = nvml_pids.own_pids(self._rank_pids)
        expect = self._device is not None and gpu_info.holds_cuda_memory(self._device)
        return gpu_info.snapshot(self._nv, self._handle, own, expect, self._parent)

    @staticmethod
    def _others(snap: gpu_info.GpuSnapshot) -> str:
        others = snap.other_processes or []
        listed = ", ".join(f"pid {pid} ({used / GB:.1f} GB)" for pid, used in others)
        return (f"{len(others)} other process(es) use this GPU: {listed}; they compete for memory and compute, and "
                f"change which cuDNN algorithms fit.")

    def _unknown(self, problems: list[str]) -> None:
        """One warning per run for whatever NVML cannot tell; training is not affected."""
        if not problems or self._warned_unknown:
            return
        self._warned_unknown = True
        check = " --require_exclusive_gpu cannot check this GPU and does not refuse." if self.require_exclusive_gpu \
            else ""
        self._warn(f"GpuMonitor: {'; '.join(problems)}. Those readings stay unknown; training continues.{check}")

    def _info(self, message: str) -> None:
        self.messages.append(message)
        rank_report.info(message)

    def _warn(self, message: str) -> None:
        self.messages.append(message)
        rank_report.warn(message)
