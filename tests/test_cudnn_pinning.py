"""CudnnPinning on CPU: the warm-up runs at the shapes trained and validated, leaves weights,
optimizer, buffers and RNG untouched, and its reference survives a checkpoint round trip.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from callback_helpers import PIN_ON_CPU, SCHEDULE, around, assert_identical, build_and_fit, fit, load_ckpt, the
from conftest import tiny_args
from lightning.pytorch import Callback

from resenc_lightning.callbacks.cudnn_pinning import CudnnPinning


# -- CudnnPinning ------------------------------------------------------------------------------------------------
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


