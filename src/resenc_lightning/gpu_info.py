"""What NVML (pynvml, from nvidia-ml-py) says about our GPU: memory, clocks, other processes.

Everything degrades to None on machines without an NVIDIA driver; callers print one info line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class GpuSnapshot:
    name: str
    driver: str
    total_bytes: int
    used_bytes: int
    utilization_pct: int | None
    sm_clock_mhz: int | None
    temperature_c: int | None
    other_processes: list[tuple[int, int]] = field(default_factory=list)  # (pid, used bytes)


def load_nvml() -> Any | None:
    """The initialised pynvml module, or None without a usable NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def handle_for(nv: Any, torch_index: int) -> Any:
    """NVML handle of torch's device `torch_index` (by UUID, so CUDA_VISIBLE_DEVICES is respected)."""
    try:
        uuid = str(torch.cuda.get_device_properties(torch_index).uuid)
        uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        return nv.nvmlDeviceGetHandleByUUID(uuid)
    except Exception:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        physical = int(ids[torch_index]) if torch_index < len(ids) and ids[torch_index].isdigit() else torch_index
        return nv.nvmlDeviceGetHandleByIndex(physical)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _try(fn, *args) -> Any:
    try:
        return fn(*args)
    except Exception:
        return None


def snapshot(nv: Any, handle: Any, own_pids: set[int] | None = None) -> GpuSnapshot:
    own = own_pids or {os.getpid()}
    mem = nv.nvmlDeviceGetMemoryInfo(handle)
    util = _try(nv.nvmlDeviceGetUtilizationRates, handle)
    procs = []
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        for p in _try(getattr(nv, getter), handle) or []:
            if p.pid not in own and p.pid not in {q[0] for q in procs}:
                procs.append((int(p.pid), int(p.usedGpuMemory or 0)))
    return GpuSnapshot(
        name=_text(nv.nvmlDeviceGetName(handle)),
        driver=_text(_try(nv.nvmlSystemGetDriverVersion) or "unknown"),
        total_bytes=int(mem.total), used_bytes=int(mem.used),
        utilization_pct=int(util.gpu) if util is not None else None,
        sm_clock_mhz=_try(nv.nvmlDeviceGetClockInfo, handle, getattr(nv, "NVML_CLOCK_SM", 1)),
        temperature_c=_try(nv.nvmlDeviceGetTemperature, handle, getattr(nv, "NVML_TEMPERATURE_GPU", 0)),
        other_processes=procs,
    )


def is_wsl(proc_version: str = "/proc/version") -> bool:
    try:
        with open(proc_version) as fh:
            return "microsoft" in fh.read().lower()
    except OSError:
        return False
