"""CudaMemoryCap and the memory arithmetic it uses (memory_target.py), with a fake `torch.cuda` that
behaves like the real API where a GPU would be needed.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from callback_helpers import PLANS_L, the
from conftest import TINY_ID, tiny_args

from resenc_lightning.callbacks import memory_cap
from resenc_lightning.callbacks.memory_cap import CudaMemoryCap
from resenc_lightning.cli import build_cli
from resenc_lightning.memory_target import GB


# -- CudaMemoryCap -----------------------------------------------------------------------------------------------
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


def test_memory_cap_state_round_trips(monkeypatch):
    cap = CudaMemoryCap()
    cap._cuda = FakeCuda(80)
    d = cap.apply(torch.device("cuda", 0), 24.0, "explicit target_gb", {}, 1)
    resumed = CudaMemoryCap()
    resumed.load_state_dict(cap.state_dict())
    assert resumed.restored_decision == d and resumed.decision is None  # the resumed run decides for its own card


# -- --memory_cap.expandable_segments ------------------------------------------------------------------------------
class FakeAllocatorConfig:
    """torch's allocator settings: parsed from the environment once, at first use (CUDA initialisation), and from
    then on changed only through torch._C._accelerator_setAllocatorSettings (as torch 2.14 does, checked on CPU)."""

    def __init__(self, monkeypatch, parsed: str | None = None) -> None:
        self.settings = parsed
        self.set_calls: list[str] = []
        monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", self.get)
        monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", self.set)

    def get(self) -> str:
        if self.settings is None:
            self.settings = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", os.environ.get("PYTORCH_ALLOC_CONF", ""))
        return self.settings

    def set(self, settings: str) -> None:
        self.get()
        self.set_calls.append(settings)
        self.settings = settings


@pytest.fixture()
def alloc_env(monkeypatch):
    """Both allocator variables unset, and restored after the test whatever the code under test writes."""
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_expandable_segments_reaches_the_allocator_before_cuda_initialises(tiny_dataset, results_dir, monkeypatch,
                                                                          alloc_env):
    """A real fit through the CLI on a recording accelerator: CUDA initialises in the accelerator's setup_device
    (torch.cuda.set_device, in strategy.setup_environment, before any Callback.setup) and the caching allocator
    reads its settings then; the request must come first, and keep the user's own settings."""
    from lightning.pytorch.accelerators import CPUAccelerator

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.6")
    config = FakeAllocatorConfig(monkeypatch)
    events: list[str] = []
    seen_at_init: list[str] = []
    request = CudaMemoryCap.request_expandable_segments

    def recorded_request(*args, **kwargs):
        events.append("allocator setting applied")
        return request(*args, **kwargs)

    real_setup_device = CPUAccelerator.setup_device

    def setup_device(self, device):
        events.append("cuda initialised (set_device)")
        seen_at_init.append(config.get())  # what the caching allocator reads when CUDA initialises
        real_setup_device(self, device)

    monkeypatch.setattr(CudaMemoryCap, "request_expandable_segments", staticmethod(recorded_request))
    monkeypatch.setattr(CPUAccelerator, "setup_device", setup_device)
    cli = build_cli(tiny_args(results_dir, "--memory_cap.expandable_segments", "true", epochs=1, iters=1, val_iters=1))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert events == ["allocator setting applied", "cuda initialised (set_device)"]
    assert seen_at_init == ["garbage_collection_threshold:0.6,expandable_segments:True"]
    assert config.set_calls == []  # the environment was in time: no runtime change needed


def test_expandable_segments_after_cuda_initialised_uses_torchs_runtime_setter(monkeypatch, alloc_env):
    infos: list[str] = []
    monkeypatch.setattr(memory_cap.rank_report, "info", infos.append)
    config = FakeAllocatorConfig(monkeypatch, parsed="max_split_size_mb:256")  # CUDA is up, settings already read
    CudaMemoryCap(expandable_segments=True)
    assert config.settings == "max_split_size_mb:256,expandable_segments:True"  # merged, not replaced
    assert config.set_calls == ["max_split_size_mb:256,expandable_segments:True"]
    assert any("from now on" in line for line in infos)


def test_expandable_segments_keeps_the_users_own_value_and_is_off_with_the_cap(monkeypatch, alloc_env):
    config = FakeAllocatorConfig(monkeypatch)
    CudaMemoryCap(enabled=False, expandable_segments=True)  # the cap switched off entirely
    CudaMemoryCap(expandable_segments=False)
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and config.settings is None and config.set_calls == []
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    with pytest.warns(UserWarning, match="expandable_segments:False"):
        CudaMemoryCap(expandable_segments=True)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:False" and config.set_calls == []


def test_expandable_segments_on_a_torch_without_the_accelerator_allocator_functions(monkeypatch, alloc_env):
    """pyproject admits torch >= 2.5, whose allocator has no torch._C._accelerator_* getter/setter: before CUDA
    initialises the variable is in time; after, the older `torch.cuda.memory._set_allocator_settings` applies it."""
    from resenc_lightning import allocator_settings

    for name in ("_accelerator_getAllocatorSettings", "_accelerator_setAllocatorSettings"):
        monkeypatch.delattr(torch._C, name, raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:256")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert allocator_settings.request_expandable_segments() == ("environment", "")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:256,expandable_segments:True"
    set_calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", set_calls.append)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:256")
    assert allocator_settings.request_expandable_segments() == ("runtime", "")
    assert set_calls == ["max_split_size_mb:256,expandable_segments:True"]
