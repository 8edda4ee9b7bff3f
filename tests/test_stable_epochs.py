"""The stable-epoch callbacks together: on by default, each switchable off.

One file per callback holds its own tests (test_cudnn_pinning.py, test_memory_cap.py, test_gpu_monitor.py,
test_epoch_timing.py); --memcheck is in test_memcheck.py.
"""

from __future__ import annotations

from callback_helpers import PIN_ON_CPU, STABLE_CALLBACKS, build_and_fit, csv_rows, load_ckpt, the
from conftest import tiny_args

from resenc_lightning.callbacks.cudnn_pinning import CudnnPinning
from resenc_lightning.callbacks.gpu_monitor import GpuMonitor
from resenc_lightning.cli import build_cli


# -- on by default, switchable off -------------------------------------------------------------------------------
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
