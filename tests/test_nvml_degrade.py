"""NVML on MIG, in containers and under DDP, with a mocked pynvml: the right device or "unknown", never a wrong card;
NVML errors degrade to one warning and never stop training; the trainer's own processes are never "others"; the
--require_exclusive_gpu decision is agreed by every rank.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path
from types import SimpleNamespace

import pynvml
import pytest
import torch
from callback_helpers import FakeNvml
from conftest import wait_for

from resenc_lightning import gpu_info
from resenc_lightning.callbacks.epoch_timing import EpochTiming
from resenc_lightning.callbacks.gpu_monitor import ExclusiveGpuError, GpuMonitor
from resenc_lightning.memory_target import GB

GPU = "GPU-0b7e5c1a-0000-4000-8000-00000000000a"
MIG_A = "MIG-1d4f2c3b-1111-4111-8111-11111111111a"
MIG_B = "MIG-1d4f2c3b-2222-4222-8222-22222222222b"
HOST_PID, HOST_PID_2 = 4_200_001, 4_200_002  # above Linux's largest pid_max (2**22): no process here has them


class Nvml(FakeNvml):
    """Several GPUs in PCI order, MIG instances, and an NVMLError (as pynvml raises it) at any named call."""

    NVML_DEVICE_MIG_ENABLE = 1
    NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED

    def __init__(self, gpus=(GPU,), mig=None, fail=(), **kwargs):
        super().__init__(**kwargs)
        self.gpus = list(gpus)
        self.mig = dict(mig or {})  # GPU uuid -> its MIG instances' uuids
        self.fail = dict.fromkeys(fail, pynvml.NVML_ERROR_NO_PERMISSION)

    def __getattribute__(self, name):
        if name.startswith("nvml") and name in object.__getattribute__(self, "fail"):
            def failing(*args):
                raise pynvml.NVMLError(object.__getattribute__(self, "fail")[name])
            return failing
        return object.__getattribute__(self, name)

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", self.gpus[index])

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid in self.gpus:
            return ("gpu", uuid)
        if any(uuid in instances for instances in self.mig.values()):
            return ("mig", uuid)
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceIsMigDeviceHandle(self, handle):
        return handle[0] == "mig"

    def nvmlDeviceGetMigMode(self, handle):
        return [1, 1] if handle[1] in self.mig else [0, 0]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle):
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle, index):
        instances = self.mig[handle[1]]
        if index >= len(instances):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return ("mig", instances[index])

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle):
        return ("gpu", next(g for g, instances in self.mig.items() if handle[1] in instances))


@pytest.fixture()
def no_torch_uuid(monkeypatch):
    def no_props(index):
        raise RuntimeError("no CUDA")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_props)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.setattr(gpu_info, "is_wsl", lambda *a: False)


def torch_uuid(monkeypatch, uuid: str) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=uuid))


class Strategy:
    """What GpuMonitor.setup uses of a Lightning strategy; `peer` is the other rank's decision."""

    def __init__(self, peer: bool = False):
        self.root_device = torch.device("cuda", 0)
        self.peer = peer
        self.reduced: list[tuple[bool, bool]] = []

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        self.reduced.append((decision, all))
        return (decision and self.peer) if all else (decision or self.peer)


def set_up(monkeypatch, nv, monitor: GpuMonitor, strategy: Strategy | None = None):
    """GpuMonitor.setup as Lightning calls it on a CUDA rank; returns the warnings it gave."""
    monkeypatch.setattr(gpu_info, "load_nvml", lambda: nv)
    trainer = SimpleNamespace(strategy=strategy or Strategy(), global_rank=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.setup(trainer, None, "fit")
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


# -- which device ---------------------------------------------------------------------------------------------------
def test_a_mig_uuid_from_torch_is_looked_up_as_mig(no_torch_uuid, monkeypatch):
    """torch gives the MIG instance's UUID without prefix: NVML's `MIG-<uuid>`, not `GPU-<uuid>` (then index 0, the
    whole card)."""
    nv = Nvml(mig={GPU: [MIG_A, MIG_B]})
    torch_uuid(monkeypatch, MIG_A.removeprefix("MIG-"))
    assert gpu_info.handle_for(nv, 0) == ("mig", MIG_A)
    snap = GpuMonitor().start(nv, gpu_info.handle_for(nv, 0))
    assert snap.total_bytes == 80 * GB and snap.other_processes == []


def test_a_gpu_uuid_in_mig_mode_is_narrowed_to_its_instance_or_unknown(no_torch_uuid, monkeypatch):
    """A CUDA that reports the parent GPU's UUID for a MIG instance: its only instance, else unknown, never the card."""
    torch_uuid(monkeypatch, GPU.removeprefix("GPU-"))
    assert gpu_info.handle_for(Nvml(mig={GPU: [MIG_A]}), 0) == ("mig", MIG_A)
    assert gpu_info.handle_for(Nvml(mig={GPU: [MIG_A, MIG_B]}), 0) is None
    assert gpu_info.handle_for(Nvml(), 0) == ("gpu", GPU)  # no MIG: the card itself


def test_mig_in_cuda_visible_devices(no_torch_uuid, monkeypatch):
    nv = Nvml(gpus=[GPU, "GPU-other"], mig={GPU: [MIG_A, MIG_B]})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{MIG_B},{MIG_A}")
    assert gpu_info.handle_for(nv, 0) == ("mig", MIG_B)
    assert gpu_info.handle_for(nv, 1) == ("mig", MIG_A)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"MIG-{GPU}/1/0")  # CUDA 11.0's syntax: not resolvable by NVML
    assert gpu_info.handle_for(nv, 0) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1d4f")  # a shortened UUID (CUDA accepts it, NVML does not)
    assert gpu_info.handle_for(nv, 0) is None


def test_numeric_cuda_visible_devices_follow_cuda_device_order(no_torch_uuid, monkeypatch):
    nv = Nvml(gpus=["GPU-a", "GPU-b", "GPU-c", "GPU-d"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert gpu_info.handle_for(nv, 0) is None  # FASTEST_FIRST (CUDA's default): not NVML's PCI order
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    assert gpu_info.handle_for(nv, 1) is None
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert (gpu_info.handle_for(nv, 0), gpu_info.handle_for(nv, 1)) == (("gpu", "GPU-d"), ("gpu", "GPU-b"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_info.handle_for(nv, 2) == ("gpu", "GPU-c")
    monkeypatch.delenv("CUDA_DEVICE_ORDER")
    assert gpu_info.handle_for(nv, 2) is None
    assert gpu_info.handle_for(Nvml(gpus=["GPU-only"]), 0) == ("gpu", "GPU-only")  # one GPU: any order is PCI order
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert gpu_info.handle_for(Nvml(gpus=[GPU], mig={GPU: [MIG_A, MIG_B]}), 0) is None  # a MIG-mode card: which one?


# -- NVML errors degrade --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failing, unknown", [
    (("nvmlDeviceGetHandleByUUID", "nvmlDeviceGetHandleByIndex"), "NVML device of cuda:0 is unknown"),
    (("nvmlDeviceGetHandleByIndex",), "NVML device of cuda:0 is unknown"),
    (("nvmlDeviceGetMemoryInfo",), "memory unknown (NVML: Insufficient Permissions)"),
    (("nvmlDeviceGetName",), "device name unknown (NVML: Insufficient Permissions)"),
    (("nvmlDeviceGetComputeRunningProcesses",), "other processes unknown (NVML: Insufficient Permissions)"),
    (("nvmlDeviceGetCount",), "NVML device of cuda:0 is unknown"),
])
def test_no_permission_at_any_call_degrades_to_one_warning(no_torch_uuid, monkeypatch, failing, unknown):
    """NO_PERMISSION (common in containers) at any call: setup and the epoch readings go on; one warning names what
    is unknown; --require_exclusive_gpu does not refuse what it cannot check, and is still agreed with the others."""
    nv = Nvml(fail=failing, compute=[(os.getpid(), GB)])
    if "nvmlDeviceGetHandleByUUID" in failing:  # torch knows the UUID; NVML refuses it, then the index
        torch_uuid(monkeypatch, GPU.removeprefix("GPU-"))
    strategy = Strategy()
    monitor = GpuMonitor(require_exclusive_gpu=True)
    caught = set_up(monkeypatch, nv, monitor, strategy)
    assert len(caught) == 1 and unknown in caught[0] and "training continues" in caught[0], caught
    assert strategy.reduced == [(False, False)]
    logged: dict = {}
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        monitor.on_train_epoch_end(None, SimpleNamespace(log_dict=lambda m, **kw: logged.update(m)))
    assert not later  # one warning per run
    if "nvmlDeviceGetMemoryInfo" in failing:
        assert "gpu/memory_used_gb" not in logged and logged["gpu/other_processes"] == 0.0


def test_nvml_failing_later_does_not_stop_training(no_torch_uuid, monkeypatch):
    nv = Nvml(compute=[(os.getpid(), GB)])
    monitor = GpuMonitor()
    assert set_up(monkeypatch, nv, monitor) == []
    nv.fail = dict.fromkeys(("nvmlDeviceGetMemoryInfo", "nvmlDeviceGetName", "nvmlDeviceGetComputeRunningProcesses"),
                            pynvml.NVML_ERROR_GPU_IS_LOST)
    logged: dict = {}
    with pytest.warns(UserWarning, match="memory unknown.*GPU is lost"):
        monitor.on_train_epoch_end(None, SimpleNamespace(log_dict=lambda m, **kw: logged.update(m)))
    assert "gpu/memory_used_gb" not in logged and "gpu/other_processes" not in logged


# -- whose processes -------------------------------------------------------------------------------------------------
def test_host_pids_in_a_container_are_unknown_not_others(no_torch_uuid, monkeypatch):
    """Without the host PID namespace NVML lists host pids (ours included): neither a refusal with
    --require_exclusive_gpu nor "other processes" blamed by EpochTiming; one warning says why."""
    nv = Nvml(compute=[(HOST_PID, 10 * GB), (HOST_PID_2, 2 * GB)])
    monitor = GpuMonitor(require_exclusive_gpu=True)
    caught = set_up(monkeypatch, nv, monitor)
    assert len(caught) == 1 and "container without host PID namespace" in caught[0]
    assert monitor.start_snapshot.other_processes is None
    cause = EpochTiming().likely_cause({"data_wait_frac": 0.1, "reserved_gb": 10.0},
                                       {"data_wait_frac": 0.1, "reserved_gb": 10.0},
                                       SimpleNamespace(device=torch.device("cuda", 0)))
    assert "other process" not in cause and cause.startswith("no evidence")


def test_this_process_unlisted_while_it_holds_memory_is_unknown(no_torch_uuid, monkeypatch):
    """NVML lists a pid that exists here, but not this process although it holds memory on the GPU: NVML's pids are
    another namespace's (that pid here is a coincidence)."""
    monkeypatch.setattr(gpu_info, "holds_cuda_memory", lambda device: True, raising=False)
    coincidence = _orphan("sleep 60")
    try:
        monitor = GpuMonitor(require_exclusive_gpu=True)
        caught = set_up(monkeypatch, Nvml(compute=[(coincidence, GB)]), monitor)
    finally:
        os.kill(coincidence, 15)
    assert len(caught) == 1 and "container without host PID namespace" in caught[0]


def _orphan(command: str) -> int:
    """Start `command` so that it is not our descendant (its shell parent exits); its pid."""
    out = subprocess.run(["sh", "-c", f"{command} >/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip())


def _children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_the_trainers_own_processes_are_never_others(no_torch_uuid, monkeypatch):
    """Listed on our GPU: this rank, its augmentation worker, rank 1 (a context on our GPU) and rank 1's worker, and
    one stranger. Only the stranger is another process."""
    worker = subprocess.Popen(["sleep", "60"])
    rank1 = _orphan("sh -c 'sleep 60; true'")
    stranger = _orphan("sleep 60")
    try:
        assert wait_for(lambda: _children_of(rank1), timeout=120), "rank 1's worker never started"
        (rank1_worker,) = _children_of(rank1)
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
        monkeypatch.setattr(torch.distributed, "all_gather_object",
                            lambda out, obj, group=None: out.__setitem__(slice(None), [obj, rank1]))
        listed = [(os.getpid(), 10 * GB), (worker.pid, GB), (rank1, GB), (rank1_worker, GB), (stranger, 3 * GB)]
        monitor = GpuMonitor()
        caught = set_up(monkeypatch, Nvml(compute=listed), monitor)
        assert monitor.start_snapshot.other_processes == [(stranger, 3 * GB)]
        assert len(caught) == 1 and f"1 other process(es) use this GPU: pid {stranger} (3.0 GB)" in caught[0]
    finally:
        for pid in (*_children_of(rank1), rank1, stranger):
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
        worker.kill()
        worker.wait()


# -- agreement across ranks ------------------------------------------------------------------------------------------
def test_require_exclusive_gpu_is_agreed_by_every_rank(no_torch_uuid, monkeypatch):
    """Rank A's NVML fails (NO_PERMISSION) while rank B finds another process: A still reaches the agreement and
    refuses with B, instead of B raising alone while A waits in the first collective of training."""
    failing = Nvml(fail=("nvmlDeviceGetMemoryInfo", "nvmlDeviceGetComputeRunningProcesses"),
                   compute=[(os.getpid(), GB)])
    strategy = Strategy(peer=True)
    with pytest.raises(ExclusiveGpuError, match="another rank found other processes"):
        set_up(monkeypatch, failing, GpuMonitor(require_exclusive_gpu=True), strategy)
    assert strategy.reduced == [(False, False)]
    # rank B's side: it found one; it raises only after the agreement (any rank -> all ranks)
    crowded = Nvml(compute=[(os.getpid(), GB), (HOST_PID, GB)])
    strategy = Strategy(peer=False)
    with pytest.raises(ExclusiveGpuError, match=f"pid {HOST_PID}"):
        set_up(monkeypatch, crowded, GpuMonitor(require_exclusive_gpu=True), strategy)
    assert strategy.reduced == [(True, False)]
