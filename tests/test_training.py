"""End-to-end training behaviour on the tiny real nnU-Net dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_args
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from resenc_lightning.cli import build_cli, validate


def nnunet_lrs(initial_lr: float, num_epochs: int, n: int) -> list[float]:
    """The LR nnU-Net's PolyLRScheduler sets at the start of epochs 0..n-1."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=initial_lr)
    ref = PolyLRScheduler(opt, initial_lr, num_epochs)
    lrs = []
    for epoch in range(n):
        ref.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def fit(args: list[str]):
    cli = build_cli(args)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resolve_ckpt_path())
    return cli


def test_loss_falls_when_overfitting(tiny_dataset, results_dir):
    cli = fit(tiny_args(results_dir, "--fold", "all", "--model.initial_lr", "0.01", epochs=6, iters=5, val_iters=1))
    losses = cli.model.nnunet_log["train_losses"]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.1, losses
    out = cli.output_folder
    assert out.name == "fold_all"
    assert out.parent.name == "nnUNetTrainer_Lightning__nnUNetResEncUNetLPlans_tiny__3d_fullres"
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "checkpoints" / "best.ckpt").is_file()


def test_deep_supervision_outputs_match_targets(tiny_dataset, results_dir):
    cli = build_cli(tiny_args(results_dir))
    dm, model = cli.datamodule, cli.model
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    dm.teardown("fit")
    outputs = model(batch["data"])
    assert isinstance(outputs, (list, tuple)) and isinstance(batch["target"], (list, tuple))
    assert len(outputs) == len(batch["target"]) == len(model.spec.configuration_manager.pool_op_kernel_sizes) - 1
    for out, tgt in zip(outputs, batch["target"]):
        assert out.shape[0] == tgt.shape[0] == 2
        assert out.shape[2:] == tgt.shape[2:]
        assert out.shape[1] == 3  # background + 2 labels
    assert tuple(batch["data"].shape[2:]) == (16, 16, 16)


def test_lr_per_epoch_equals_nnunet_polylr(tiny_dataset, results_dir):
    cli = fit(tiny_args(results_dir, "--model.num_epochs", "10", epochs=4, iters=1, val_iters=1))
    assert cli.model.nnunet_log["lrs"] == nnunet_lrs(0.01, 10, 4)


def _state(ckpt_path):
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    return ckpt


def test_resume_ends_with_same_weights_as_uninterrupted_run(tiny_dataset, tmp_path):
    common = ("--trainer.deterministic", "true", "--model.num_epochs", "3")
    full = fit(tiny_args(tmp_path / "a", *common, epochs=3, iters=3, val_iters=1))
    # "interrupted" after epoch 0: same schedule length, the process ends after one epoch
    fit(tiny_args(tmp_path / "b", *common, epochs=1, iters=3, val_iters=1))
    resumed = fit(tiny_args(tmp_path / "b", *common, "--resume", "true", epochs=3, iters=3, val_iters=1))
    a = _state(full.checkpoint_dir / "last.ckpt")
    b = _state(resumed.checkpoint_dir / "last.ckpt")
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    mom_a = [s["momentum_buffer"] for s in a["optimizer_states"][0]["state"].values()]
    mom_b = [s["momentum_buffer"] for s in b["optimizer_states"][0]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(mom_a, mom_b))
    assert a["nnunet"]["ema_fg_dice"] == b["nnunet"]["ema_fg_dice"]
    assert a["nnunet"]["logging"]["train_losses"] == b["nnunet"]["logging"]["train_losses"]
    assert b["nnunet"]["logging"]["lrs"] == full.model.nnunet_log["lrs"]


def test_2d_configuration_trains(tiny_dataset, results_dir):
    cli = fit(tiny_args(results_dir, "--configuration", "2d", epochs=1, iters=2, val_iters=1))
    assert cli.model.network.decoder.seg_layers[0].__class__.__name__ == "Conv2d"
    assert len(cli.model.nnunet_log["train_losses"]) == 1


def test_resume_with_more_epochs_follows_the_new_polylr_schedule(tiny_dataset, results_dir):
    """nnU-Net recomputes PolyLR from the current num_epochs on --c; a longer resumed run must too."""
    fit(tiny_args(results_dir, epochs=1, iters=1, val_iters=1))
    resumed = fit(tiny_args(results_dir, "--resume", "true", epochs=4, iters=1, val_iters=1))
    expected = nnunet_lrs(0.01, 4, 4)
    lrs = resumed.model.nnunet_log["lrs"]
    assert lrs[0] == 0.01  # epoch 0 ran with the first invocation's schedule (1 epoch)
    assert lrs[1:] == expected[1:]


def test_last_checkpoint_is_written_every_epoch_even_when_the_ema_does_not_improve(tiny_dataset, results_dir):
    """An interrupted run must lose at most the epoch in progress, whatever the pseudo-Dice did."""
    import lightning.pytorch as pl

    cli = build_cli(tiny_args(results_dir, epochs=3, iters=1, val_iters=1))
    saved = []

    class EpochEnds(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            saved.append(trainer.current_epoch)

    # make every epoch after the first look worse than the best, so the 'best' checkpoint is not rewritten
    original = cli.model.on_validation_epoch_end

    def worse_each_epoch():
        original()
        if cli.model._epoch_metrics is not None and cli.trainer.current_epoch > 0:
            cli.model._epoch_metrics["ema_fg_dice"] = -float(cli.trainer.current_epoch)

    cli.model.on_validation_epoch_end = worse_each_epoch
    cli.trainer.callbacks.append(EpochEnds())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    last = torch.load(cli.checkpoint_dir / "last.ckpt", map_location="cpu", weights_only=False)
    best = torch.load(cli.checkpoint_dir / "best.ckpt", map_location="cpu", weights_only=False)
    assert saved == [0, 1, 2]
    assert last["epoch"] == 2 and best["epoch"] == 0


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_deep_supervision_flag_drives_network_loss_and_targets(tiny_dataset, results_dir, deep_supervision):
    """`--model.enable_deep_supervision` is the one switch (as nnU-Net's trainer): off, the targets are single
    tensors too, and training, validation and the final validation run."""
    cli = build_cli(tiny_args(results_dir, "--model.enable_deep_supervision", str(deep_supervision).lower(),
                              epochs=1, iters=2, val_iters=1))
    assert cli.datamodule.enable_deep_supervision is deep_supervision
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(cli.model.nnunet_log["val_losses"]) == 1 and np.isfinite(cli.model.nnunet_log["val_losses"][0])
    result = validate(cli, "the trained network")
    assert Path(result["summary"]).is_file() and np.isfinite(result["final_val/foreground_dice"])
    network = cli.model.network
    assert network.decoder.deep_supervision is deep_supervision
    dm = cli.datamodule
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    dm.teardown("fit")
    with torch.no_grad():
        output = cli.model(batch["data"])
    ds_output = isinstance(output, (list, tuple))
    assert ds_output is deep_supervision and isinstance(batch["target"], (list, tuple)) is deep_supervision
    assert isinstance(cli.model.loss, DeepSupervisionWrapper) is deep_supervision


@pytest.mark.parametrize("labels, order, expected", [
    # a region given as a single int ("b") and as a one-element list ("c"); an ignore label
    ({"background": 0, "a": [1, 2], "b": 2, "c": [3], "ignore": 4}, [1, 2, 3], ["a", "b", "c"]),
    ({"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}, [1, 2, 3], ["whole", "core", "enhancing"]),
    ({"background": 0, "x": 2, "y": 1}, None, ["y", "x"]),  # labels: by value, as foreground_labels
])
def test_dice_columns_follow_the_pseudo_dice_vector_for_regions_and_labels(labels, order, expected):
    """`dice/<name>` columns are named in the order of nnU-Net's per-class/region pseudo-Dice vector."""
    from types import SimpleNamespace

    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from resenc_lightning.module import ResEncUNetModule

    lm = LabelManager(labels, regions_class_order=order)
    module = SimpleNamespace(spec=SimpleNamespace(dataset_json={"labels": labels}), label_manager=lm)
    names = ResEncUNetModule.class_names(module)
    assert names == expected
    vector = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    assert len(names) == len(vector) == (lm.num_segmentation_heads if lm.has_regions else len(vector))
