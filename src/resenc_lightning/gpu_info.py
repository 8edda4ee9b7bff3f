"""What NVML (pynvml, from nvidia-ml-py) says about our GPU: memory, clocks, other processes.

Everything degrades: without an NVIDIA driver `load_nvml` is None (callers print one info line); any NVML call that
fails (NO_PERMISSION is common in containers) leaves its reading None and its reason in `GpuSnapshot.problems`, so
a caller warns once and trains on. Which device is ours: `nvml_device`; whose processes are ours: `nvml_pids`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from resenc_lightning import nvml_device, nvml_pids


@dataclass
class GpuSnapshot:
    name: str
    driver: str
    total_bytes: int | None
    used_bytes: int | None
    utilization_pct: int | None
    sm_clock_mhz: int | None
    temperature_c: int | None
    other_processes: list[tuple[int, int]] | None = field(default_factory=list)  # (pid, used bytes); None: unknown
    problems: list[str] = field(default_factory=list)  # what NVML could not say, and why


def load_nvml() -> Any | None:
    """The initialised pynvml module, or None without a usable NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def handle_for(nv: Any, torch_index: int) -> Any | None:
    """NVML handle of torch's device `torch_index`, or None when it cannot be established (`nvml_device.locate`)."""
    return nvml_device.locate(nv, torch_index).handle


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _try(fn, *args) -> Any:
    try:
        return fn(*args)
    except Exception:
        return None


def holds_cuda_memory(device: torch.device) -> bool:
    """This process has memory on `device`, so it has a context there and NVML must list it."""
    try:
        return device.type == "cuda" and torch.cuda.is_initialized() and torch.cuda.memory_reserved(device) > 0
    except Exception:
        return False


def snapshot(nv: Any, handle: Any, own_pids: set[int] | None = None, expect_own_listed: bool = False,
             parent: Any = None) -> GpuSnapshot:
    """One reading; never raises. `own_pids`: this trainer's processes (`nvml_pids.own_pids`); `parent`: the physical
    GPU of a MIG instance (its clocks and temperature)."""
    problems: list[str] = []

    def needed(what: str, fn, *args) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            problems.append(f"{what} unknown (NVML: {nvml_device.nvml_reason(exc)})")
            return None

    mem = needed("memory", nv.nvmlDeviceGetMemoryInfo, handle)
    name = needed("device name", nv.nvmlDeviceGetName, handle)
    listed: dict[int, int] | None = {}
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            procs = getattr(nv, getter)(handle) or []
        except Exception as exc:
            if getter == "nvmlDeviceGetComputeRunningProcesses":  # graphics: often unsupported, never needed
                problems.append(f"other processes unknown (NVML: {nvml_device.nvml_reason(exc)})")
                listed = None
            continue
        if listed is not None:
            for p in procs:
                listed.setdefault(int(p.pid), int(p.usedGpuMemory or 0))
    others: list[tuple[int, int]] | None = None
    if listed is not None:
        others, why = nvml_pids.others(listed, own_pids or nvml_pids.own_pids(), expect_own_listed)
        if why is not None:
            problems.append(f"other processes {why}")
    util = _try(nv.nvmlDeviceGetUtilizationRates, handle)
    physical = handle if parent is None else parent
    return GpuSnapshot(
        name=_text(name) if name is not None else "unknown GPU",
        driver=_text(_try(nv.nvmlSystemGetDriverVersion) or "unknown"),
        total_bytes=int(mem.total) if mem is not None else None,
        used_bytes=int(mem.used) if mem is not None else None,
        utilization_pct=int(util.gpu) if util is not None else None,
        sm_clock_mhz=_try(nv.nvmlDeviceGetClockInfo, physical, getattr(nv, "NVML_CLOCK_SM", 1)),
        temperature_c=_try(nv.nvmlDeviceGetTemperature, physical, getattr(nv, "NVML_TEMPERATURE_GPU", 0)),
        other_processes=others,
        problems=problems,
    )


def other_processes(device: torch.device, rank_pids: list[int] | None = None) -> list[tuple[int, int]] | None:
    """Other processes on `device` (one NVML reading), None when NVML or the pid comparison cannot say. Never raises."""
    try:
        nv = load_nvml()
        if nv is None or device.type != "cuda":
            return None
        found = nvml_device.locate(nv, device.index or 0)
        if found.handle is None:
            return None
        return snapshot(nv, found.handle, nvml_pids.own_pids(rank_pids or ()), holds_cuda_memory(device),
                        found.parent).other_processes
    except Exception:
        return None


def is_wsl(proc_version: str = "/proc/version") -> bool:
    try:
        with open(proc_version) as fh:
            return "microsoft" in fh.read().lower()
    except OSError:
        return False
