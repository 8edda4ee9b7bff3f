"""GpuMonitor and gpu_info with a fake pynvml: device report, other processes, degraded NVML, WSL.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch
from callback_helpers import FakeNvml

from resenc_lightning import gpu_info
from resenc_lightning.callbacks.gpu_monitor import ExclusiveGpuError, GpuMonitor
from resenc_lightning.memory_target import GB


@pytest.fixture()
def not_wsl(monkeypatch):
    monkeypatch.setattr(gpu_info, "is_wsl", lambda *a: False)


# -- GpuMonitor and gpu_info -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [b"NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"])
def test_gpu_monitor_reports_device_and_warns_about_other_processes(name, not_wsl):
    me = os.getpid()
    nv = FakeNvml(name, compute=[(me, 10 * GB), (4242, 5 * GB)], graphics=[(4242, 5 * GB), (777, None)])
    monitor = GpuMonitor()
    with pytest.warns(UserWarning, match="2 other process"):
        snap = monitor.start(nv, ("handle", 0))
    assert snap.other_processes == [(4242, 5 * GB), (777, 0)]  # our own pid excluded, duplicates merged
    assert (snap.utilization_pct, snap.sm_clock_mhz, snap.temperature_c) == (87, 1755, 64)
    info, warning = monitor.messages
    assert "NVIDIA H100 80GB HBM3, driver 550.54.15" in info and "30.0 of 80.0 GB" in info
    assert "b'" not in info
    assert "pid 4242 (5.0 GB)" in warning and "pid 777" in warning and f"pid {me} " not in warning

    logged = {}
    module = SimpleNamespace(log_dict=lambda metrics, **kw: logged.update(metrics))
    monitor.on_train_epoch_end(None, module)
    assert logged == {"gpu/memory_used_gb": 30.0, "gpu/other_processes": 2.0, "gpu/utilization_pct": 87.0,
                      "gpu/sm_clock_mhz": 1755.0, "gpu/temperature_c": 64.0}


def test_gpu_monitor_require_exclusive_gpu(not_wsl):
    nv = FakeNvml(compute=[(os.getpid(), GB), (4242, 3 * GB)])
    with pytest.raises(ExclusiveGpuError, match=r"--require_exclusive_gpu: 1 other process.*pid 4242"):
        GpuMonitor(require_exclusive_gpu=True).start(nv, ("handle", 0))
    # alone on the GPU: starts, one info line
    monitor = GpuMonitor(require_exclusive_gpu=True)
    monitor.start(FakeNvml(compute=[(os.getpid(), GB)]), ("handle", 0))
    assert len(monitor.messages) == 1 and "driver 550.54.15" in monitor.messages[0]


def test_gpu_monitor_degrades_when_nvml_lacks_a_query_and_warns_on_wsl(monkeypatch):
    monkeypatch.setattr(gpu_info, "is_wsl", lambda *a: True)
    monitor = GpuMonitor()
    with pytest.warns(UserWarning, match="WSL"):
        snap = monitor.start(FakeNvml(utilization=False), ("handle", 0))
    assert snap.utilization_pct is None
    logged = {}
    monitor.on_train_epoch_end(None, SimpleNamespace(log_dict=lambda metrics, **kw: logged.update(metrics)))
    assert "gpu/utilization_pct" not in logged and logged["gpu/sm_clock_mhz"] == 1755.0


def test_is_wsl_reads_proc_version(tmp_path):
    wsl = tmp_path / "wsl"
    wsl.write_text("Linux version 5.15.153.1-microsoft-standard-WSL2 (root@941d701f84f1) #1 SMP\n")
    wsl1 = tmp_path / "wsl1"
    wsl1.write_text("Linux version 4.4.0-19041-Microsoft (Microsoft@Microsoft.com) (gcc version 5.4.0)\n")
    linux = tmp_path / "linux"
    linux.write_text("Linux version 6.8.0-45-generic (buildd@lcy02-amd64-075) (gcc 13.2.0) #45-Ubuntu SMP\n")
    assert gpu_info.is_wsl(str(wsl)) and gpu_info.is_wsl(str(wsl1))
    assert not gpu_info.is_wsl(str(linux))
    assert not gpu_info.is_wsl(str(tmp_path / "missing"))


def test_load_nvml(monkeypatch):
    import pynvml

    def no_driver():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    assert gpu_info.load_nvml() is None
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert gpu_info.load_nvml() is fake and fake.initialised
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert gpu_info.load_nvml() is None


def test_handle_for_respects_cuda_visible_devices_without_uuid(monkeypatch):
    def no_props(index):
        raise RuntimeError("no CUDA")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_props)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA's indices are NVML's only in PCI bus order
    nv = FakeNvml()
    nv.nvmlDeviceGetCount = lambda: 4
    assert gpu_info.handle_for(nv, 0) == ("handle", 3)
    assert gpu_info.handle_for(nv, 1) == ("handle", 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid="8e1b-42"))
    assert gpu_info.handle_for(nv, 0) == ("handle", "GPU-8e1b-42")


