"""--init_from_nnunet: nnU-Net's pretrained-weights rule, loaded on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_PLANS, tiny_args
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

from resenc_lightning.cli import UsageError, build_cli, main
from resenc_lightning.nnunet_import import NnUNetImportError, init_from_nnunet


def _native_checkpoint(cli, path):
    """A checkpoint of the same architecture with other weights (set through the parameters, so the
    state_dict's aliases, e.g. all_modules.* and decoder.encoder.*, stay consistent)."""
    net = cli.model.network
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save({"network_weights": weights, "trainer_name": "nnUNetTrainer"}, path)
    return weights


def test_init_from_nnunet_matches_nnunets_own_loader(tiny_dataset, results_dir, tmp_path):
    source = build_cli(tiny_args(results_dir))
    path = tmp_path / "checkpoint_final.pth"
    weights = _native_checkpoint(source, path)
    ours = build_cli(tiny_args(tmp_path / "r1")).model.network
    ref = build_cli(tiny_args(tmp_path / "r2")).model.network
    ref.load_state_dict(ours.state_dict())
    copied = init_from_nnunet(ours, path)
    load_pretrained_weights(ref, str(path))
    for key, value in ours.state_dict().items():
        assert torch.equal(value, ref.state_dict()[key]), key
        if ".seg_layers." in key:
            assert not torch.equal(value, weights[key])  # heads keep their fresh init, as in nnU-Net
    assert copied and all(torch.equal(ours.state_dict()[k], weights[k]) for k in copied)


def test_init_from_nnunet_rejects_another_architecture_in_one_line(tiny_dataset, results_dir, tmp_path):
    path = tmp_path / "checkpoint_2d.pth"
    _native_checkpoint(build_cli(tiny_args(results_dir, "--configuration", "2d")), path)
    net = build_cli(tiny_args(tmp_path / "r")).model.network
    with pytest.raises(NnUNetImportError, match="use the plans/configuration it was trained with"):
        init_from_nnunet(net, path)
    with pytest.raises(UsageError) as e:
        main(tiny_args(tmp_path / "r3", "--init_from_nnunet", str(path)))
    assert "\n" not in str(e.value) and TINY_PLANS not in str(e.value)
    with pytest.raises(UsageError, match="does not exist"):
        main(tiny_args(tmp_path / "r4", "--init_from_nnunet", str(tmp_path / "missing.pth")))


def test_resume_from_native_nnunet_continues_epoch_lr_ema_and_logging(tiny_dataset, results_dir, tmp_path):
    """A checkpoint written by nnunetv2's own nnUNetTrainer (after 2 epochs) continues here."""
    import json

    import numpy as np
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from test_training import nnunet_lrs

    plans = json.loads((tiny_dataset / f"{TINY_PLANS}.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((tiny_dataset / "dataset.json").read_text())
    native = nnUNetTrainer(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    native.initialize()
    dl_train, dl_val = native.get_dataloaders()
    for epoch in range(2):  # two short native epochs, logged the way nnU-Net logs them
        native.network.train()
        native.lr_scheduler.step(epoch)
        native.logger.log("lrs", native.optimizer.param_groups[0]["lr"], epoch)
        native.logger.log("epoch_start_timestamps", 0.0, epoch)
        losses = [native.train_step(next(dl_train))["loss"] for _ in range(2)]
        native.logger.log("train_losses", float(np.mean(losses)), epoch)
        native.logger.log("val_losses", 0.5, epoch)
        native.logger.log("mean_fg_dice", np.float32(0.2 + 0.1 * epoch), epoch)  # numpy scalars, as nnU-Net logs
        native.logger.log("dice_per_class_or_region", [0.2, 0.2], epoch)
        native.logger.log("epoch_end_timestamps", 1.0, epoch)
        native.current_epoch = epoch
        native._best_ema = native.logger.get_value("ema_fg_dice", step=-1)
    path = tmp_path / "checkpoint_latest.pth"
    native.save_checkpoint(str(path))  # current_epoch + 1 = 2: epochs 0 and 1 are done
    native_ema = native.logger.get_value("ema_fg_dice", step=-1)

    out = main(tiny_args(results_dir, "--resume_from_nnunet", str(path), "--final_validation", "false",
                         epochs=4, iters=2, val_iters=1))
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    log = last["nnunet"]["logging"]
    assert last["epoch"] == 3  # epochs 2 and 3 ran here
    assert len(log["train_losses"]) == 4 and log["train_losses"][:2] == native.logger.get_value("train_losses", None)
    assert log["lrs"][2:] == nnunet_lrs(0.01, 4, 4)[2:]  # the schedule continues at epoch 2
    first_new = log["mean_fg_dice"][2]
    assert np.isclose(log["ema_fg_dice"][2], 0.9 * native_ema + 0.1 * first_new)  # EMA continues
    imported = torch.load(out / "checkpoints" / "imported_from_nnunet.ckpt", map_location="cpu", weights_only=True)
    assert type(imported["nnunet"]["ema_fg_dice"]) is float  # plain values: loadable with weights_only=True
    for dl in (dl_train, dl_val):
        getattr(dl, "_finish", lambda: None)()


@pytest.mark.parametrize("native_best, written", [(0.99, False), (-1.0, True)])
def test_resume_from_nnunet_continues_best_tracking_from_the_native_best_ema(tiny_dataset, tmp_path, native_best,
                                                                             written):
    """best.ckpt and checkpoint_best.pth are only written when the EMA beats the native run's `_best_ema`."""
    source = main(tiny_args(tmp_path / "native", "--final_validation", "false", epochs=1, iters=1, val_iters=1))
    native = torch.load(source / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    native["_best_ema"] = native_best
    path = tmp_path / "checkpoint_final.pth"
    torch.save(native, path)
    out = main(tiny_args(tmp_path / "resumed", "--resume_from_nnunet", str(path), "--final_validation", "false",
                         epochs=2, iters=1, val_iters=1))
    assert (out / "checkpoints" / "best.ckpt").is_file() is written
    assert (out / "checkpoint_best.pth").is_file() is written
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ema = last["nnunet"]["logging"]["ema_fg_dice"][-1]
    assert last["nnunet"]["best_ema"] == (ema if written else native_best)
    # the best ModelCheckpoint's state as it stood after this epoch (last.ckpt is written before it updates)
    after = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False) if written else last
    best_state = next(v for k, v in after["callbacks"].items() if "'monitor': 'ema_fg_dice'" in k)
    assert float(best_state["best_model_score"]) == pytest.approx(ema if written else native_best)
