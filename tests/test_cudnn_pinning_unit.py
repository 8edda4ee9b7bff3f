"""CudnnPinning's decisions with a fake `torch.cuda`: the free-memory pad under each memory-cap mode (the
arithmetic is in docs/DESIGN.md), and no benchmark at all when deterministic algorithms are on."""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import pytest
import torch

from resenc_lightning import rank_report
from resenc_lightning.callbacks.cudnn_pinning import CudnnPinning
from resenc_lightning.memory_target import GB

CUDA0 = torch.device("cuda", 0)


class FakeCudaMemory:
    """One card of `total_gib`: other processes hold `others_gib`; our caching allocator reserves `reserved_gib` and
    may hold at most fraction x total (torch's per-process cap); freed blocks stay cached until empty_cache()."""

    def __init__(self, total_gib: float, others_gib: float, reserved_gib: float, fraction: float = 1.0) -> None:
        self.total, self.others, self.fraction = int(total_gib * GB), int(others_gib * GB), fraction
        self.in_use, self.cached = int(reserved_gib * GB), 0

    # what the callback calls
    def mem_get_info(self, device=None) -> tuple[int, int]:
        return self.free(), self.total

    def get_device_properties(self, device=None):
        return SimpleNamespace(name="Fake GPU", total_memory=self.total)

    def get_device_name(self, device=None) -> str:
        return "Fake GPU"

    def get_per_process_memory_fraction(self, device=None) -> float:
        return self.fraction

    def set_per_process_memory_fraction(self, fraction: float, device=None) -> None:
        assert 0 <= fraction <= 1, fraction
        self.fraction = fraction

    def empty_cache(self) -> None:
        self.cached = 0

    def empty(self, nbytes: int) -> torch.Tensor:
        """torch.empty on the card: through the cap, then the device."""
        if self.in_use + self.cached + nbytes > self.fraction * self.total:
            raise torch.OutOfMemoryError(f"fake CUDA: {nbytes / GB:.2f} GiB over the cap "
                                         f"({self.fraction:.3f} x {self.total / GB:.0f} GiB)")
        if nbytes > self.free():
            raise torch.OutOfMemoryError(f"fake CUDA: {nbytes / GB:.2f} GiB > {self.free() / GB:.2f} GiB free")
        self.in_use += nbytes
        block = torch.empty(0)
        weakref.finalize(block, self._freed, nbytes)
        return block

    def _freed(self, nbytes: int) -> None:
        self.in_use -= nbytes
        self.cached += nbytes

    # what cuDNN sees
    def free(self) -> int:
        return self.total - self.others - self.in_use - self.cached

    def headroom(self) -> float:
        return self.fraction * self.total - self.in_use - self.cached

    def workspace_limit(self) -> float:
        """The largest workspace cuDNN can get: free on the device and, through the allocator, under the cap."""
        return min(self.free(), self.headroom())


@pytest.fixture()
def fake_cuda(monkeypatch):
    def install(fake: FakeCudaMemory) -> FakeCudaMemory:
        for name in ("mem_get_info", "get_device_properties", "get_device_name", "get_per_process_memory_fraction",
                     "set_per_process_memory_fraction", "empty_cache"):
            monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
        real_empty = torch.empty

        def empty(*size, device=None, **kwargs):
            if device is not None and torch.device(device).type == "cuda":
                return fake.empty(int(size[0]))
            return real_empty(*size, device=device, **kwargs)

        monkeypatch.setattr(torch, "empty", empty)
        return fake
    return install


def _resumed_pin(fresh_free: int) -> CudnnPinning:
    pin = CudnnPinning()
    pin.load_state_dict({"reference": {"free_at_benchmark": fresh_free, "device": "Fake GPU"}, "history": []})
    return pin


# (total, cap fraction, our reserved at warm-up, others in the fresh run, others on resume), GiB
CASES = {
    "fraction cap, more free on resume": (80, 24 / 80, 2, 30, 24),
    "fraction cap, pad larger than the cap's headroom": (80, 24 / 80, 2, 58, 8),
    "fraction cap near the card, raise clamped at 1": (80, 0.9, 2, 68, 38),
    "emulate (ballast, no fraction)": (80, 1.0, 2 + 56, 2, 1.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pad_gives_cudnn_the_fresh_runs_workspace_limit(fake_cuda, case):
    total, fraction, ours, others_fresh, others_resumed = CASES[case]
    fresh = FakeCudaMemory(total, others_fresh, ours, fraction)
    cuda = fake_cuda(FakeCudaMemory(total, others_resumed, ours, fraction))
    assert cuda.free() > fresh.free()
    pin = _resumed_pin(fresh.free())

    pad = pin._pad_to_reference(CUDA0, cuda.free())  # raised a raw OutOfMemoryError in on_train_start before
    assert pad is not None
    assert cuda.free() == fresh.free()  # cuDNN's candidate filter: the fresh run's free memory
    assert cuda.workspace_limit() == pytest.approx(fresh.workspace_limit())  # and the workspace it can allocate
    pad.release()
    assert (cuda.fraction, cuda.in_use, cuda.cached) == (fraction, int(ours * GB), 0)


def test_pad_that_cannot_be_allocated_warns_and_warms_up_without_it(fake_cuda):
    cuda = fake_cuda(FakeCudaMemory(80, 10, 2))
    real = cuda.empty
    cuda.empty = lambda nbytes: (_ for _ in ()).throw(torch.OutOfMemoryError("fragmented"))
    pin = _resumed_pin(cuda.free() - 4 * GB)
    with pytest.warns(UserWarning, match="padding 4.00 GiB failed"):
        assert pin._pad_to_reference(CUDA0, cuda.free()) is None
    cuda.empty = real
    assert cuda.fraction == 1.0 and cuda.in_use == 2 * GB


def test_no_benchmark_when_deterministic_algorithms_are_on(monkeypatch):
    """--trainer.deterministic: a benchmark would override cuDNN's deterministic choice, so no warm-up at all."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    calls: list[bool] = []

    def warm_up(self, trainer, pl_module):
        calls.append(torch.backends.cudnn.benchmark)
        raise AssertionError("the warm-up ran with deterministic algorithms on")

    monkeypatch.setattr(CudnnPinning, "warm_up", warm_up)
    lines: list[str] = []
    monkeypatch.setattr(rank_report, "info", lines.append)
    decisions: list[bool] = []
    strategy = SimpleNamespace(reduce_boolean_decision=lambda d, all=True: decisions.append(d) or d)
    trainer = SimpleNamespace(strategy=strategy, current_epoch=0)
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)  # what the CLI makes of it on CUDA
        CudnnPinning().on_train_start(trainer, SimpleNamespace(device=CUDA0))
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    assert calls == [] and decisions == [False]  # every rank takes part in the decision, none warms up
    assert torch.backends.cudnn.benchmark is benchmark
    assert lines == [
        "CudnnPinning: deterministic algorithms are on, so cuDNN must not benchmark: no warm-up, cudnn.benchmark left "
        "as the Trainer set it."]
