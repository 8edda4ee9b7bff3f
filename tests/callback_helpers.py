"""Shared by the per-callback test files: fit a tiny run, find a callback, compare states, a fake pynvml."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from lightning.pytorch import Callback

from resenc_lightning.callbacks.cudnn_pinning import CudnnPinning
from resenc_lightning.callbacks.epoch_timing import EpochTiming
from resenc_lightning.callbacks.gpu_monitor import GpuMonitor
from resenc_lightning.callbacks.memory_cap import CudaMemoryCap
from resenc_lightning.cli import build_cli
from resenc_lightning.memory_target import GB

PIN_ON_CPU = ("--cudnn_pinning.run_on_cpu", "true")
# A fixed PolyLR length for runs resumed with a larger max_epochs (the restored scheduler keeps the first run's length).
SCHEDULE = ("--model.num_epochs", "10")
PLANS_L = {"plans_name": "nnUNetResEncUNetLPlans", "experiment_planner_used": "nnUNetPlannerResEncL"}
STABLE_CALLBACKS = {"memory_cap": CudaMemoryCap, "cudnn_pinning": CudnnPinning, "epoch_timing": EpochTiming,
                    "gpu_monitor": GpuMonitor}


# -- helpers --------------------------------------------------------------------------------------------------------
def fit(args: list[str]):
    cli = build_cli(args)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resolve_ckpt_path())
    return cli


def build_and_fit(args: list[str], prepare=None):
    """build_cli, let `prepare(cli)` add probes, then fit."""
    cli = build_cli(args)
    if prepare is not None:
        prepare(cli)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resolve_ckpt_path())
    return cli


def the(cli, cls):
    found = [c for c in cli.trainer.callbacks if isinstance(c, cls)]
    assert len(found) == 1, [type(c).__name__ for c in cli.trainer.callbacks]
    return found[0]


def around(cli, cls, before: Callback, after: Callback) -> None:
    """Put `before` directly before and `after` directly after the `cls` callback (Lightning calls them in order)."""
    callbacks = cli.trainer.callbacks
    i = callbacks.index(the(cli, cls))
    callbacks.insert(i + 1, after)
    callbacks.insert(i, before)


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def csv_rows(cli, version: int = 0) -> list[dict[str, str]]:
    with open(cli.output_folder / "logs" / f"version_{version}" / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def assert_identical(a, b, where: str = "") -> None:
    """Bit-identical nested state: tensors and arrays element-wise (dtype included), the rest by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where




class FakeNvml:
    """pynvml's calls as the monitor uses them: one GPU, handles by index or UUID, processes by pid."""

    NVML_CLOCK_GRAPHICS, NVML_CLOCK_SM, NVML_CLOCK_MEM = 0, 1, 2
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, name: str | bytes = b"NVIDIA H100 80GB HBM3", compute=(), graphics=(), utilization=True):
        self.name = name
        self.compute = [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in compute]
        self.graphics = [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in graphics]
        self.utilization = utilization
        self.initialised = False
        self.handles: list = []

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int):
        self.handles.append(("index", index))
        return ("handle", index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str):
        self.handles.append(("uuid", uuid))
        return ("handle", uuid)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=80 * GB, used=30 * GB, free=50 * GB)

    def nvmlDeviceGetUtilizationRates(self, handle):
        if not self.utilization:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return SimpleNamespace(gpu=87, memory=41)

    def nvmlDeviceGetClockInfo(self, handle, clock_type: int) -> int:
        return {self.NVML_CLOCK_GRAPHICS: 1980, self.NVML_CLOCK_SM: 1755, self.NVML_CLOCK_MEM: 2619}[clock_type]

    def nvmlDeviceGetTemperature(self, handle, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return 64

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return list(self.compute)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return list(self.graphics)

    def nvmlDeviceGetName(self, handle):
        return self.name

    def nvmlSystemGetDriverVersion(self):
        return "550.54.15"


