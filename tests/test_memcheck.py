"""--memcheck without a GPU: a one-line error, nothing trained; its peak measurement with a fake torch.cuda.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from callback_helpers import PLANS_L
from conftest import tiny_args
from fake_cuda_memory import FakeCudaMemory

from resenc_lightning.cli import UsageError, main
from resenc_lightning.memcheck import judge, measure_peaks
from resenc_lightning.memory_target import GB


# -- --memcheck ----------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_memcheck_without_cuda_is_a_one_line_error(tiny_dataset, results_dir):
    with pytest.raises(UsageError) as e:
        main(tiny_args(results_dir, "--memcheck", "true"))
    message = str(e.value)
    assert message.startswith("error: --memcheck") and "needs a CUDA GPU" in message and "\n" not in message
    assert not list(results_dir.rglob("*.ckpt"))  # nothing trained


def test_memcheck_peak_excludes_the_cudnn_benchmark_workspaces():
    """On an 80 GB card cuDNN's benchmark (first step) tries workspaces sized to the free memory, ~69 GB here; training
    steps then need 9 GB of activations and a 0.5 GB workspace. The verdict is on the steady state."""
    cuda = FakeCudaMemory(resident_gib=1.0)  # weights, optimizer state
    workspaces = iter([69.0])
    steps: list[float] = []

    def step() -> float:
        cuda.use(9.0 + next(workspaces, 0.5))
        steps.append(0.2 if len(steps) == 0 else 0.1)  # the benchmark step is the slow one
        return steps[-1]

    peaks = measure_peaks(step, torch.device("cuda", 0), 2, cuda=cuda)
    assert peaks.peak_reserved_gb == pytest.approx(10.5) and peaks.peak_allocated_gb == pytest.approx(10.5)
    assert len(steps) == 3  # the benchmark step, then the 2 measured ones
    assert peaks.benchmark_peak_reserved_gb == pytest.approx(79.0) and peaks.step_s == pytest.approx(0.1)
    result = judge("Fake 80 GB", 80 * GB, (2, 1, 128, 128, 128), peaks, SimpleNamespace(plans=PLANS_L, dataset_id=4))
    assert result.fits_card and result.fits_target and not result.advice
    report = result.report()
    assert "DOES NOT FIT" not in report and "peak reserved 10.50 GB" in report
    assert "cuDNN benchmark step 79.0 GB reserved" in report

