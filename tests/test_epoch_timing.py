"""EpochTiming: per-epoch times in the logs, the reference kept in the checkpoint, drift on resume.
"""

from __future__ import annotations

import os
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from callback_helpers import SCHEDULE, FakeNvml, csv_rows, fit, load_ckpt, the
from conftest import tiny_args
from fake_cuda_memory import FakeCudaMemory

from resenc_lightning import gpu_info
from resenc_lightning.callbacks.cudnn_pinning import CudnnPinning
from resenc_lightning.callbacks.epoch_timing import EpochTiming
from resenc_lightning.callbacks.gpu_monitor import GpuMonitor
from resenc_lightning.callbacks.memory_cap import CudaMemoryCap
from resenc_lightning.memory_target import GB


# -- EpochTiming (and the other callbacks on a plain CPU run) ----------------------------------------------------
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


def test_reserved_gb_is_each_epochs_own_peak(monkeypatch):
    """Epoch 0 holds cuDNN's benchmark workspaces (20 GB), released afterwards; epoch 1 peaks at 9 GB. A cumulative
    peak would report epoch 0's 21 GB again and hide a later epoch reserving less than the reference."""
    cuda = FakeCudaMemory(resident_gib=1.0)
    for name in ("synchronize", "reset_peak_memory_stats", "max_memory_reserved"):
        monkeypatch.setattr(torch.cuda, name, getattr(cuda, name))
    timing = EpochTiming()
    module = SimpleNamespace(device=torch.device("cuda", 0), log_dict=lambda metrics, **kwargs: None)
    trainer = SimpleNamespace(current_epoch=0, world_size=1)
    for epoch, gib in enumerate([20.0, 9.0]):
        trainer.current_epoch = epoch
        timing.on_train_epoch_start(trainer, module)
        timing.on_train_batch_start(trainer, module, None, 0)
        cuda.use(gib)
        timing.on_train_batch_end(trainer, module, None, None, 0)
        timing.on_train_epoch_end(trainer, module)
        cuda.empty_cache()  # e.g. the warm-up's clean-up releases the cached workspaces
    assert [e["reserved_gb"] for e in timing.epochs] == pytest.approx([21.0, 10.0])

