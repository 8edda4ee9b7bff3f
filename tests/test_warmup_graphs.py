"""The warm-up runs the graphs training runs: its batch is built like the DataModule's, and with compile on no
graph is recompiled after it through the first training and validation epochs (validation's grad mode forced to
`inference_mode`, Lightning's choice outside gloo for its evaluation loops)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.convert_frame
from callback_helpers import PIN_ON_CPU, around, build_and_fit
from conftest import tiny_args
from lightning.pytorch import Callback
from torch._dynamo.utils import counters

from resenc_lightning.callbacks.cudnn_pinning import CudnnPinning
from resenc_lightning.cli import build_cli


def _structure(batch: dict) -> tuple:
    targets = batch["target"] if isinstance(batch["target"], list) else [batch["target"]]
    return (batch["data"].dtype, tuple(batch["data"].shape)), [(t.dtype, tuple(t.shape)) for t in targets]


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_warm_up_batch_is_built_like_the_datamodules(tiny_dataset, results_dir, configuration):
    from resenc_lightning.warmup_steps import synthetic_batch

    cli = build_cli(tiny_args(results_dir, "--configuration", configuration))
    dm = cli.datamodule
    dm.setup("fit")
    try:
        synthetic = synthetic_batch(cli.model, dm.batch_size, torch.Generator().manual_seed(0))
        for loader in (dm.train_dataloader(), dm.val_dataloader()):
            assert _structure(synthetic) == _structure(next(iter(loader)))
    finally:
        dm.teardown("fit")
    assert _structure(synthetic)[1][0][0] == torch.int16  # nnUNetDataLoader's targets, not int64


class _CompileWatch(Callback):
    """Dynamo frames compiled (first compiles and recompiles) from the end of the warm-up to the end of fit."""

    def __init__(self) -> None:
        self.frames_after_warm_up: int | None = None
        self.reasons: list[str] = []
        self.accumulators: dict | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.frames_after_warm_up = counters["frames"]["ok"]
        self.accumulators = {"train_losses": len(pl_module._train_losses), "val": len(pl_module._val)}


def test_no_recompile_after_the_warm_up(tiny_dataset, results_dir, monkeypatch, restore_cudnn_benchmark):
    watch = _CompileWatch()
    real_reasons = torch._dynamo.convert_frame.get_and_maybe_log_recompilation_reasons

    def reasons(*args, **kwargs):
        found = real_reasons(*args, **kwargs)
        if watch.frames_after_warm_up is not None:
            watch.reasons.extend(str(r) for r in found)
        return found

    monkeypatch.setattr(torch._dynamo.convert_frame, "get_and_maybe_log_recompilation_reasons", reasons)

    def prepare(cli):
        around(cli, CudnnPinning, Callback(), watch)
        cli.trainer.fit_loop.epoch_loop.val_loop.inference_mode = True  # as outside gloo: inference_mode

    torch._dynamo.reset()
    counters.clear()
    build_and_fit(tiny_args(results_dir, "--model.compile", "true", *PIN_ON_CPU, "--final_validation", "false",
                            epochs=1, iters=2, val_iters=1), prepare)
    assert watch.frames_after_warm_up, "the warm-up compiled nothing"
    assert watch.accumulators == {"train_losses": 0, "val": 0}
    compiled_later = counters["frames"]["ok"] - watch.frames_after_warm_up
    assert compiled_later == 0 and not watch.reasons, f"{compiled_later} compile(s) after the warm-up: {watch.reasons}"
