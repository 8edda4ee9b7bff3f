"""The stable-epoch callbacks on CPU: cuDNN pinning's warm-up, the memory cap, the GPU monitor, epoch timing.

Real fits on the tiny nnU-Net dataset where behaviour depends on the loop (warm-up shapes, state left
untouched, checkpoint round trips, logged metrics); fakes of `torch.cuda` and `pynvml` that behave like
the real APIs where a GPU would be needed (cap arithmetic, NVML reports).
"""

from __future__ import annotations

import copy
import csv
import os
import random
import re
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_ID, tiny_args
from lightning.pytorch import Callback

from resenc_lightning import gpu_info
from resenc_lightning.callbacks import memory_cap
from resenc_lightning.callbacks.cudnn_pinning import CudnnPinning
from resenc_lightning.callbacks.epoch_timing import EpochTiming
from resenc_lightning.callbacks.gpu_monitor import ExclusiveGpuError, GpuMonitor
from resenc_lightning.callbacks.memory_cap import CudaMemoryCap
from resenc_lightning.cli import UsageError, build_cli, main
from resenc_lightning.memory_target import GB, decide_cap, planner_command, plans_target_gb

PIN_ON_CPU = ("--cudnn_pinning.run_on_cpu", "true")
# A fixed PolyLR length for runs resumed with a larger max_epochs (the restored scheduler keeps the first run's length).
SCHEDULE = ("--model.num_epochs", "10")
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


@pytest.fixture()
def restore_cudnn_benchmark():
    before = torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.benchmark = before


# -- 1. CudnnPinning ------------------------------------------------------------------------------------------------
class _Phase(Callback):
    def __init__(self, state: dict, name: str) -> None:
        self.state, self.name = state, name

    def on_train_start(self, trainer, pl_module) -> None:
        self.state["phase"] = self.name


def test_cudnn_warmup_runs_at_the_shapes_later_trained_and_validated(tiny_dataset, results_dir):
    phase = {"phase": "before train start"}
    seen: list[tuple[str, bool, tuple[int, ...]]] = []  # (phase, network.training, input shape)

    def prepare(cli):
        around(cli, CudnnPinning, _Phase(phase, "warm-up"), _Phase(phase, "fit"))
        cli.model.network.register_forward_pre_hook(
            lambda m, args: seen.append((phase["phase"], m.training, tuple(args[0].shape))))

    cli = build_and_fit(tiny_args(results_dir, *PIN_ON_CPU, epochs=2, iters=3, val_iters=2), prepare)
    pin = the(cli, CudnnPinning)
    warm_train = [s for p, t, s in seen if p == "warm-up" and t]
    warm_val = [s for p, t, s in seen if p == "warm-up" and not t]
    fit_train = [s for p, t, s in seen if p == "fit" and t]
    fit_val = [s for p, t, s in seen if p == "fit" and not t]
    assert all(p != "before train start" for p, _, _ in seen)
    assert len(warm_train) == pin.warmup_steps == 3 and len(warm_val) == 1
    assert len(fit_train) == 2 * 3 and len(fit_val) == 2 * 2
    assert set(warm_train) == set(fit_train) == {(2, 1, 16, 16, 16)}
    assert set(warm_val) == set(fit_val)
    assert pin.reference["train_shape"] == list(fit_train[0]) and pin.reference["val_shape"] == list(fit_val[0])


class _StateProbe(Callback):
    """Snapshot of everything the warm-up must leave untouched, taken in on_train_start."""

    def __init__(self) -> None:
        self.state: dict | None = None
        self.forwards_at_snapshot = 0
        self.benchmark_in_steps: list[bool] = []

    def on_train_start(self, trainer, pl_module) -> None:
        net = pl_module.network
        self.forwards_at_snapshot = int(net.probe_forwards)
        self.state = {
            "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "grads": {n: None if p.grad is None else p.grad.clone() for n, p in pl_module.named_parameters()},
            "buffers": {n: b.detach().clone() for n, b in pl_module.named_buffers()},
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
            "training": pl_module.training,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.benchmark_in_steps.append(torch.backends.cudnn.benchmark)


def _add_running_stat(network: torch.nn.Module) -> None:
    """A BatchNorm-like running statistic on the network: updated by every forward in training mode.

    The forward count is a plain attribute (not a buffer, which the warm-up would restore)."""
    network.register_buffer("probe_running_mean", torch.zeros(()), persistent=False)
    network.probe_forwards = 0

    def hook(module, args):
        module.probe_forwards += 1
        if module.training:
            module.probe_running_mean.mul_(0.9).add_(0.1 * args[0].detach().float().mean())

    network.register_forward_pre_hook(hook)


def _fit_with_state_probes(args: list[str]):
    before, after = _StateProbe(), _StateProbe()

    def prepare(cli):
        _add_running_stat(cli.model.network)
        around(cli, CudnnPinning, before, after)

    cli = build_and_fit(args, prepare)
    return cli, before, after


def test_cudnn_warmup_leaves_weights_optimizer_buffers_and_rng_untouched(tiny_dataset, results_dir,
                                                                        restore_cudnn_benchmark):
    # no timing-dependent retries here (CPU timings are noisy); the retry path has its own test below
    common = (*PIN_ON_CPU, *SCHEDULE, "--trainer.benchmark", "true", "--cudnn_pinning.max_retries", "0")
    for epochs, resume in ((1, ()), (2, ("--resume", "true"))):
        cli, before, after = _fit_with_state_probes(tiny_args(results_dir, *common, *resume, epochs=epochs, iters=3,
                                                              val_iters=1))
        pin = the(cli, CudnnPinning)
        # the warm-up ran between the probes (3 train passes + 1 val pass) and the statistic moved during training
        assert after.forwards_at_snapshot - before.forwards_at_snapshot == pin.warmup_steps + 1
        assert not torch.equal(cli.model.network.probe_running_mean, before.state["buffers"]["network.probe_running_mean"])
        b, a = dict(before.state), dict(after.state)
        assert b.pop("cudnn_benchmark") is True  # --trainer.benchmark true, as nnU-Net has it on CUDA
        assert a.pop("cudnn_benchmark") is False  # frozen by the warm-up ...
        assert set(after.benchmark_in_steps) == {False}  # ... for every training step
        assert torch.backends.cudnn.benchmark is True  # and given back at train end
        assert_identical(b, a, "state")
        momentum = [s.get("momentum_buffer") for s in b["optimizer"]["state"].values()]
        if resume:  # the resumed run has SGD momentum (restored before on_train_start); it must survive as is
            assert momentum and all(isinstance(m, torch.Tensor) for m in momentum)
        else:  # a fresh run has no momentum yet, and the warm-up must not create any
            assert momentum == []
        assert len(pin.history) == epochs and pin.history[-1]["resumed"] is bool(resume)


_REAL_WARM_UP = CudnnPinning.warm_up


def _patched_warm_up(monkeypatch, factors: list[float]) -> list[float]:
    """Real warm-up, but its measured step time is `factor` x the fresh reference (one factor per call)."""
    real = _REAL_WARM_UP
    remaining = list(factors)
    measured: list[float] = []

    def warm_up(self, trainer, pl_module):
        record = real(self, trainer, pl_module)
        record["train_step_s"] = self.reference["train_step_s"] * remaining.pop(0)
        measured.append(record["train_step_s"])
        return record

    monkeypatch.setattr(CudnnPinning, "warm_up", warm_up)
    return measured


def test_cudnn_reference_round_trips_through_checkpoint_and_resume_compares(tiny_dataset, results_dir, monkeypatch,
                                                                           restore_cudnn_benchmark):
    fresh = fit(tiny_args(results_dir, *PIN_ON_CPU, *SCHEDULE, epochs=1, iters=2, val_iters=1))
    last = fresh.checkpoint_dir / "last.ckpt"
    state = load_ckpt(last)["callbacks"]["CudnnPinning"]
    reference = state["reference"]
    assert reference["train_shape"] == reference["val_shape"] == [2, 1, 16, 16, 16]
    assert reference["train_step_s"] > 0 and reference["resumed"] is False
    assert len(state["history"]) == 1
    ref_s = reference["train_step_s"]

    # slower every time: retried max_retries times, then one warning with both numbers
    measured = _patched_warm_up(monkeypatch, [2.0] * 4)
    with pytest.warns(UserWarning, match="CudnnPinning: resumed warm-up"):
        cli = fit(tiny_args(results_dir, *PIN_ON_CPU, *SCHEDULE, "--resume", "true", "--cudnn_pinning.max_retries", "3",
                            epochs=2, iters=2, val_iters=1))
    pin = the(cli, CudnnPinning)
    assert len(measured) == 1 + 3
    assert pin.reference == reference  # compared with, never replaced by, the resumed measurement
    assert pin.history[-1]["resumed"] is True and pin.history[-1]["retries"] == 3
    assert f"{2 * ref_s * 1000:.1f} ms" in pin.warning and f"{ref_s * 1000:.1f} ms" in pin.warning
    assert "+100%" in pin.warning and "after 3 retries" in pin.warning
    state = load_ckpt(last)["callbacks"]["CudnnPinning"]
    assert state["reference"] == reference and [h["resumed"] for h in state["history"]] == [False, True]

    # slower once, then within tolerance: one retry, no warning
    measured = _patched_warm_up(monkeypatch, [2.0, 1.0])
    cli = fit(tiny_args(results_dir, *PIN_ON_CPU, *SCHEDULE, "--resume", "true", epochs=3, iters=2, val_iters=1))
    pin = the(cli, CudnnPinning)
    assert len(measured) == 2 and pin.warning is None
    assert pin.history[-1]["retries"] == 1 and pin.history[-1]["train_step_s"] == pytest.approx(ref_s)

    # within tolerance at once: no retry, no warning, reference still the fresh run's
    measured = _patched_warm_up(monkeypatch, [1.0 + pin.tolerance / 2])
    cli = fit(tiny_args(results_dir, *PIN_ON_CPU, *SCHEDULE, "--resume", "true", epochs=4, iters=2, val_iters=1))
    pin = the(cli, CudnnPinning)
    assert len(measured) == 1 and pin.warning is None and pin.history[-1]["retries"] == 0
    state = load_ckpt(last)["callbacks"]["CudnnPinning"]
    assert state["reference"] == reference
    assert [h["resumed"] for h in state["history"]] == [False, True, True, True]


# -- 2. CudaMemoryCap -----------------------------------------------------------------------------------------------
class FakeCuda:
    """The part of torch.cuda the memory cap uses, for `n` cards of `total_gib` with `used_gib` taken on each."""

    def __init__(self, total_gib: float, n: int = 1, current: int = 0, used_gib: float = 0.0) -> None:
        self.total = int(total_gib * GB)
        self.used = int(used_gib * GB)
        self.n = n
        self.current = current
        self.fraction_calls: list[tuple[float, int]] = []

    def _check(self, device) -> int:
        index = device.index if isinstance(device, torch.device) else device
        if not isinstance(index, int) or not 0 <= index < self.n:
            raise RuntimeError(f"Invalid device id {device!r}")
        return index

    def get_device_properties(self, device):
        self._check(device)
        return SimpleNamespace(name="Fake GPU", total_memory=self.total)

    def current_device(self) -> int:
        return self.current

    def set_per_process_memory_fraction(self, fraction, device=None) -> None:
        if not isinstance(fraction, float):
            raise TypeError("Invalid type for fraction argument, must be `float`")
        if not 0 <= fraction <= 1:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
        self.fraction_calls.append((fraction, self._check(self.current if device is None else device)))

    def mem_get_info(self, device=None) -> tuple[int, int]:
        self._check(self.current if device is None else device)
        return self.total - self.used, self.total


PLANS_L = {"plans_name": "nnUNetResEncUNetLPlans", "experiment_planner_used": "nnUNetPlannerResEncL"}


@pytest.mark.parametrize(("card_gib", "target", "cap", "fits", "fraction"), [
    (24, 24.0, 21.6, False, 0.9),  # L on a 24 GB card: 10% headroom
    (80, 24.0, 24.0, True, 0.3),  # L on an 80 GB card: capped at the target
    (24, 8.0, 8.0, True, 1 / 3),  # M on a 24 GB card
    (8, 8.0, 6.0, False, 0.75),  # M on an 8 GB card: the 2 GB minimum headroom applies
])
def test_decide_cap(card_gib, target, cap, fits, fraction):
    d = decide_cap(int(card_gib * GB), target)
    assert d.total_gb == pytest.approx(card_gib)
    assert d.cap_gb == pytest.approx(cap)
    assert d.fits is fits
    assert d.fraction == pytest.approx(fraction)
    assert d.cap_gb <= d.max_fit_gb


@pytest.mark.parametrize(("plans", "target"), [
    ({"experiment_planner_used": "nnUNetPlannerResEncM", "plans_name": "nnUNetResEncUNetMPlans"}, 8.0),
    (PLANS_L, 24.0),
    ({"experiment_planner_used": "nnUNetPlannerResEncXL", "plans_name": "nnUNetResEncUNetXLPlans"}, 40.0),
    ({**PLANS_L, "plans_name": "nnUNetResEncUNetL_20GB_Plans"}, 20.0),  # the name wins over the planner default
    ({"experiment_planner_used": "nnUNetPlannerResEncM", "plans_name": "nnUNetResEncUNetPlans_80G"}, 80.0),  # nnU-Net docs
    ({**PLANS_L, "gpu_memory_target_in_gb": 11}, 11.0),
    ({"experiment_planner_used": "ExperimentPlanner", "plans_name": "nnUNetPlans"}, None),
    ({}, None),
])
def test_plans_target_gb(plans, target):
    value, source = plans_target_gb(plans)
    assert value == target
    assert source  # says where the target came from (or why there is none)


def test_planner_command_replans_for_what_fits_this_card():
    fit_24 = decide_cap(24 * GB, 24.0).max_fit_gb
    assert planner_command(PLANS_L, 4, fit_24) == (
        "nnUNetv2_plan_experiment -d 4 -pl nnUNetPlannerResEncL -gpu_memory_target 21 "
        "-overwrite_plans_name nnUNetResEncUNetL_21GB_Plans")
    # an already re-planned name, and nnU-Net's documented naming, get the new target, not a second one
    for name in ("nnUNetResEncUNetL_20GB_Plans", "nnUNetResEncUNetLPlans_20G"):
        assert planner_command({**PLANS_L, "plans_name": name}, 4, fit_24).endswith(" nnUNetResEncUNetL_21GB_Plans")
    assert planner_command({"experiment_planner_used": "nnUNetPlannerResEncM", "plans_name": "nnUNetResEncUNetPlans_80G"},
                           "Dataset004_Hippocampus", 6.0) == (
        "nnUNetv2_plan_experiment -d Dataset004_Hippocampus -pl nnUNetPlannerResEncM -gpu_memory_target 6 "
        "-overwrite_plans_name nnUNetResEncUNet_6GB_Plans")
    # the plans it produces carry the target the cap will then use
    name = planner_command(PLANS_L, 4, fit_24).rsplit(" ", 1)[1]
    assert plans_target_gb({**PLANS_L, "plans_name": name})[0] == 21.0


def test_memory_cap_fraction_mode_caps_the_right_device_and_warns_when_it_does_not_fit():
    fake = FakeCuda(24, n=2)
    cap = CudaMemoryCap()
    cap._cuda = fake
    with pytest.warns(UserWarning, match="does not fit"):
        d = cap.apply(torch.device("cuda", 1), 24.0, "nnUNetPlannerResEncL default", PLANS_L, 4)
    assert fake.fraction_calls == [(pytest.approx(0.9), 1)]
    assert cap.decision is d and not d.fits
    assert ("nnUNetv2_plan_experiment -d 4 -pl nnUNetPlannerResEncL -gpu_memory_target 21 "
            "-overwrite_plans_name nnUNetResEncUNetL_21GB_Plans") in cap.warning
    assert "24 GB" in cap.warning and "21.6 GB" in cap.warning

    fake = FakeCuda(80, n=2, current=1)
    cap = CudaMemoryCap()
    cap._cuda = fake
    d = cap.apply(torch.device("cuda"), 24.0, "nnUNetPlannerResEncL default", PLANS_L, 4)  # no index: current device
    assert fake.fraction_calls == [(pytest.approx(0.3), 1)]
    assert d.fits and cap.warning is None


def test_memory_cap_emulate_mode_leaves_the_cap_free(monkeypatch):
    fake = FakeCuda(24, used_gib=0.5)  # e.g. the CUDA context
    cap = CudaMemoryCap(mode="emulate")
    cap._cuda = fake
    allocations = []
    real_empty = torch.empty

    def empty(*size, dtype=None, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda":
            allocations.append((size, dtype, torch.device(device)))
            return SimpleNamespace(numel=lambda: size[0])
        return real_empty(*size, dtype=dtype, device=device, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    with pytest.warns(UserWarning, match="does not fit"):
        d = cap.apply(torch.device("cuda", 0), 24.0, "test", PLANS_L, 4)
    free, _ = fake.mem_get_info(0)
    assert allocations == [((cap.ballast_bytes,), torch.uint8, torch.device("cuda", 0))]
    assert free - cap.ballast_bytes == pytest.approx(d.cap_gb * GB, abs=1)  # what is left is the 21.6 GB cap
    assert fake.fraction_calls == []
    cap.teardown(None, None, "fit")
    assert cap._ballast is None


def test_memory_cap_setup_uses_the_plans_and_does_nothing_on_cpu(tiny_dataset, results_dir, monkeypatch):
    infos = []
    monkeypatch.setattr(memory_cap.rank_report, "info", infos.append)

    class NoCuda:
        def __getattr__(self, name):
            raise AssertionError(f"torch.cuda.{name} used on a CPU run")

    cpu_trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    cli = build_cli(tiny_args(results_dir))
    cap = the(cli, CudaMemoryCap)
    cap._cuda = NoCuda()
    cap.setup(cpu_trainer, cli.model, "fit")
    assert cap.decision is None and infos == ["CudaMemoryCap: device is cpu, no CUDA memory to cap."]

    # the same callback on a (fake) 24 GB card: L plans' 24 GB target from the tiny plans' planner
    gpu_trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    cap._cuda = fake = FakeCuda(24)
    with pytest.warns(UserWarning, match="does not fit"):
        cap.setup(gpu_trainer, cli.model, "fit")
    assert fake.fraction_calls == [(pytest.approx(0.9), 0)]
    assert f"-d {TINY_ID} -pl nnUNetPlannerResEncL -gpu_memory_target 21 " in cap.warning
    cap.setup(gpu_trainer, cli.model, "validate")  # a second stage does not cap twice
    assert len(fake.fraction_calls) == 1

    # an explicit --memory_cap.target_gb wins over the plans
    cli = build_cli(tiny_args(results_dir, "--memory_cap.target_gb", "8"))
    cap = the(cli, CudaMemoryCap)
    cap._cuda = fake = FakeCuda(24)
    cap.setup(gpu_trainer, cli.model, "fit")
    assert fake.fraction_calls == [(pytest.approx(1 / 3), 0)] and cap.warning is None


# -- 3. GpuMonitor and gpu_info -------------------------------------------------------------------------------------
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


@pytest.fixture()
def not_wsl(monkeypatch):
    monkeypatch.setattr(gpu_info, "is_wsl", lambda *a: False)


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
    nv = FakeNvml()
    assert gpu_info.handle_for(nv, 0) == ("handle", 3)
    assert gpu_info.handle_for(nv, 1) == ("handle", 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid="8e1b-42"))
    assert gpu_info.handle_for(nv, 0) == ("handle", "GPU-8e1b-42")


# -- 4. EpochTiming (and the other callbacks on a plain CPU run) ----------------------------------------------------
def _time_columns(row: dict[str, str]) -> dict[str, float]:
    return {k: float(row[k]) for k in ("time/epoch_s", "time/step_median_s", "time/data_wait_frac")}


def test_epoch_timing_logs_each_epoch_keeps_a_reference_and_warns_once_on_resumed_drift(tiny_dataset, results_dir):
    cli = fit(tiny_args(results_dir, *SCHEDULE, epochs=2, iters=3, val_iters=1))
    timing = the(cli, EpochTiming)
    rows = csv_rows(cli)
    loss_rows = [r for r in rows if r["train_loss"]]
    assert [r for r in rows if r["time/epoch_s"]] == loss_rows  # on the epoch's row, and only there
    assert [r["epoch"] for r in loss_rows] == ["0", "1"]
    for row, record in zip(loss_rows, timing.epochs):
        t = _time_columns(row)
        assert t == pytest.approx({f"time/{k}": record[k] for k in ("epoch_s", "step_median_s", "data_wait_frac")},
                                  rel=1e-5)
        assert 0 < t["time/step_median_s"] < t["time/epoch_s"] and 0 <= t["time/data_wait_frac"] < 1
    assert not any(k.startswith("gpu/") for k in rows[0])  # nothing to monitor on CPU
    # the other stable-epoch callbacks on CPU: one info line / nothing done
    assert the(cli, GpuMonitor).messages == ["GpuMonitor: training on cpu; no NVIDIA GPU to monitor."]
    assert the(cli, CudaMemoryCap).decision is None
    assert the(cli, CudnnPinning).history == [] and the(cli, CudnnPinning).reference is None  # run_on_cpu is off

    # reference: the first epoch after reference_skip_epochs (1), in the checkpoint
    assert timing.reference_skip_epochs == 1 and timing.reference == timing.epochs[1]
    last = cli.checkpoint_dir / "last.ckpt"
    ckpt = load_ckpt(last)
    assert ckpt["callbacks"]["EpochTiming"]["reference"] == timing.reference
    fresh_reference = dict(timing.reference)

    def resume_with_reference(reference: dict, epochs: int):
        ckpt = load_ckpt(last)
        ckpt["callbacks"]["EpochTiming"]["reference"] = reference
        torch.save(ckpt, last)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli = fit(tiny_args(results_dir, *SCHEDULE, "--resume", "true", epochs=epochs, iters=3, val_iters=1))
        return cli, [str(w.message) for w in caught if str(w.message).startswith("EpochTiming:")]

    # a reference 1000x slower than anything measured: no drift, no warning
    slow = {**fresh_reference, "step_median_s": fresh_reference["step_median_s"] * 1000}
    cli, timing_warnings = resume_with_reference(slow, epochs=3)
    assert timing_warnings == [] and the(cli, EpochTiming).warning is None
    assert the(cli, EpochTiming).reference == slow  # the resumed run compares, it does not re-reference

    # a reference 1000x faster, which had more memory reserved: two drifting epochs, exactly one warning
    fast = {**fresh_reference, "step_median_s": fresh_reference["step_median_s"] / 1000, "data_wait_frac": 1.0,
            "reserved_gb": 10.0}
    cli, timing_warnings = resume_with_reference(fast, epochs=5)
    timing = the(cli, EpochTiming)
    assert len(timing_warnings) == 1 and timing_warnings[0] == timing.warning
    assert timing.warning.startswith("EpochTiming: resumed epoch 3 median step")
    assert re.search(r"vs the fresh run's \d+ ms \(epoch 1\)", timing.warning)  # ~0 ms; 1 on a loaded machine
    assert "Likely cause: less GPU memory reserved (0.0 vs 10.0 GiB)" in timing.warning
    assert [int(e["epoch"]) for e in timing.epochs] == [0, 1, 2, 3, 4]
    assert load_ckpt(last)["callbacks"]["EpochTiming"]["reference"] == fast
    assert [r["epoch"] for r in csv_rows(cli, version=2) if r["time/epoch_s"]] == ["3", "4"]


def test_epoch_timing_reference_taken_by_the_resumed_run_when_the_fresh_run_stopped_before_it(tiny_dataset,
                                                                                               results_dir):
    def run(epochs: int):
        resume = ("--resume", "true") if epochs > 1 else ()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli = fit(tiny_args(results_dir, *SCHEDULE, *resume, epochs=epochs, iters=3, val_iters=1))
        return the(cli, EpochTiming), [str(w.message) for w in caught if str(w.message).startswith("EpochTiming:")]

    timing, _ = run(1)  # stopped after epoch 0, before the reference epoch 1
    last = next(results_dir.rglob("last.ckpt"))
    assert timing.reference is None and load_ckpt(last)["callbacks"]["EpochTiming"]["reference"] is None

    # the resumed run (starts at epoch 1) skips its first epoch and takes epoch 2, marked as a resumed run's
    timing, timing_warnings = run(3)
    assert timing_warnings == [] and timing.reference == timing.epochs[-1] and timing.reference["epoch"] == 2
    state = load_ckpt(last)["callbacks"]["EpochTiming"]
    assert state["reference"] == timing.reference and state["reference_resumed"] is True

    # a later resume compares with it: a 1000x faster reference is drift, reported once
    ckpt = load_ckpt(last)
    ckpt["callbacks"]["EpochTiming"]["reference"]["step_median_s"] /= 1000
    torch.save(ckpt, last)
    timing, timing_warnings = run(4)
    assert timing_warnings == [timing.warning]
    assert re.search(r"resumed epoch 3 median step .* vs the first resumed run's \d+ ms \(epoch 2\)", timing.warning)


def test_likely_cause():
    timing = EpochTiming()
    cpu = SimpleNamespace(device=torch.device("cpu"))
    ref = {"data_wait_frac": 0.20, "reserved_gb": 10.0}
    waiting = timing.likely_cause({"data_wait_frac": 0.30, "reserved_gb": 10.0}, ref, cpu)
    assert waiting.startswith("waiting for data (30% of the epoch vs 20%)") and "nnUNet_n_proc_DA" in waiting
    memory = timing.likely_cause({"data_wait_frac": 0.24, "reserved_gb": 9.4}, ref, cpu)
    assert memory.startswith("less GPU memory reserved (9.4 vs 10.0 GiB)")
    # data wait is named before memory; small changes are no evidence
    assert timing.likely_cause({"data_wait_frac": 0.30, "reserved_gb": 9.0}, ref, cpu).startswith("waiting for data")
    assert timing.likely_cause({"data_wait_frac": 0.24, "reserved_gb": 9.6}, ref, cpu).startswith("no evidence")


def test_likely_cause_names_other_processes_on_the_gpu(monkeypatch):
    def no_props(index):
        raise RuntimeError("no CUDA")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_props)
    nv = FakeNvml(compute=[(os.getpid(), GB), (4242, 3 * GB)])
    monkeypatch.setattr(gpu_info, "load_nvml", lambda: nv)
    cuda = SimpleNamespace(device=torch.device("cuda", 0))
    cause = EpochTiming().likely_cause({"data_wait_frac": 0.5, "reserved_gb": 1.0},
                                       {"data_wait_frac": 0.1, "reserved_gb": 10.0}, cuda)
    assert cause.startswith("1 other process(es) on this GPU (pids 4242)")


# -- 5. --memcheck ----------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_memcheck_without_cuda_is_a_one_line_error(tiny_dataset, results_dir):
    with pytest.raises(UsageError) as e:
        main(tiny_args(results_dir, "--memcheck", "true"))
    message = str(e.value)
    assert message.startswith("error: --memcheck") and "needs a CUDA GPU" in message and "\n" not in message
    assert not list(results_dir.rglob("*.ckpt"))  # nothing trained


# -- 6. on by default, switchable off -------------------------------------------------------------------------------
def test_stable_epoch_callbacks_are_on_by_default_and_switch_off(tiny_dataset, results_dir, restore_cudnn_benchmark):
    cli = build_cli(tiny_args(results_dir))
    for cls in STABLE_CALLBACKS.values():
        assert the(cli, cls).enabled is True, cls.__name__

    off = [arg for name in STABLE_CALLBACKS for arg in (f"--{name}.enabled", "false")]
    forwards = []

    def prepare(cli):
        cli.model.network.register_forward_pre_hook(lambda m, args: forwards.append(m.training))

    cli = build_and_fit(tiny_args(results_dir, *off, *PIN_ON_CPU, epochs=1, iters=2, val_iters=1), prepare)
    for cls in STABLE_CALLBACKS.values():
        assert the(cli, cls).enabled is False, cls.__name__
    assert len(forwards) == 2 + 1  # the training and validation batches only: no warm-up
    assert the(cli, CudnnPinning).history == [] and the(cli, GpuMonitor).messages == []
    assert not any(k.startswith("time/") for k in csv_rows(cli)[0])
    assert load_ckpt(cli.checkpoint_dir / "last.ckpt")["callbacks"]["CudnnPinning"]["reference"] is None
