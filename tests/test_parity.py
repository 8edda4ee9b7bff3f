"""Parity with nnunetv2's own nnUNetTrainer, instantiated here for the reference values."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import TINY_PLANS, tiny_args
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from resenc_lightning import recipe
from resenc_lightning.cli import build_cli
from resenc_lightning.module import _tp_fp_fn


def native_trainer(tiny_dataset, configuration: str, plans: dict | None = None) -> nnUNetTrainer:
    plans = dict(plans or json.loads((tiny_dataset / f"{TINY_PLANS}.json").read_text()))
    plans["continue_training"] = False
    dataset_json = json.loads((tiny_dataset / "dataset.json").read_text())
    trainer = nnUNetTrainer(plans, configuration, 0, dataset_json, device=torch.device("cpu"))
    trainer.initialize()
    return trainer


def assert_augmentation_matches(ours, ref: nnUNetTrainer) -> None:
    """Rotation, dummy 2D, initial patch size, mirror axes, and the transform pipeline with its parameters."""
    rot, dummy2d, initial, mirror = ref.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert ours.aug.rotation_for_da == rot and ours.aug.do_dummy_2d_data_aug == dummy2d
    assert ours.aug.initial_patch_size == tuple(int(i) for i in initial) and ours.aug.mirror_axes == tuple(mirror)
    ours_tr = recipe.training_transforms(ours.view, ours.aug)
    ref_tr = ref.get_training_transforms(ref.configuration_manager.patch_size, rot, ref._get_deep_supervision_scales(),
                                         mirror, dummy2d, use_mask_for_norm=ref.configuration_manager.use_mask_for_norm,
                                         is_cascaded=False, foreground_labels=ref.label_manager.foreground_labels,
                                         regions=None, ignore_label=ref.label_manager.ignore_label)
    assert repr(ours_tr) == repr(ref_tr)


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_network_loss_and_augmentation_match_nnunet_trainer(tiny_dataset, results_dir, configuration):
    cli = build_cli(tiny_args(results_dir, "--configuration", configuration))
    ours = cli.model
    ref = native_trainer(tiny_dataset, configuration)
    # network: same class, same state_dict keys and shapes; weights load both ways with strict=True
    assert type(ours.network) is type(ref.network)
    a, b = ours.network.state_dict(), ref.network.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    ours.network.load_state_dict(b, strict=True)
    ref.network.load_state_dict(a, strict=True)
    # deep supervision weights/scales
    assert np.allclose(ours.loss.weight_factors, ref.loss.weight_factors)
    assert recipe.deep_supervision_scales(ours.view) == ref._get_deep_supervision_scales()
    assert_augmentation_matches(ours, ref)
    # batch size and oversampling (single process)
    assert cli.datamodule.spec.configuration_manager.batch_size == ref.batch_size


def test_loss_and_pseudo_dice_statistics_equal_nnunet_on_the_same_batch(tiny_dataset, results_dir):
    cli = build_cli(tiny_args(results_dir))
    ours, dm = cli.model, cli.datamodule
    ref = native_trainer(tiny_dataset, "3d_fullres")
    ref.network.load_state_dict(ours.network.state_dict(), strict=True)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    dm.teardown("fit")
    ours.eval()
    ref.network.eval()
    with torch.no_grad():
        out = ours(batch["data"])
        our_loss = ours.loss(out, batch["target"])
        ref_loss = ref.loss(ref.network(batch["data"]), batch["target"])
        tp, fp, fn = (t.cpu().numpy() for t in _tp_fp_fn(out[0], batch["target"][0], ours.label_manager))
        ref_stats = ref.validation_step(copy.deepcopy(batch))
    assert torch.allclose(our_loss, ref_loss)
    assert np.isclose(float(our_loss), ref_stats["loss"])
    assert np.array_equal(tp, ref_stats["tp_hard"])
    assert np.array_equal(fp, ref_stats["fp_hard"])
    assert np.array_equal(fn, ref_stats["fn_hard"])


def test_split_is_nnunets(tiny_dataset, results_dir):
    cli = build_cli(tiny_args(results_dir))
    cli.datamodule.setup("fit")
    ref = native_trainer(tiny_dataset, "3d_fullres")
    tr, val = ref.do_split()
    assert cli.datamodule.train_keys == list(tr) and cli.datamodule.val_keys == list(val)
    assert not set(tr) & set(val)


def test_anisotropic_3d_plans_match_nnunet_trainer(tiny_dataset, results_dir):
    """A 3D configuration with an anisotropic patch (dummy-2D augmentation, +-180 deg rotation)."""
    plans_file = tiny_dataset / f"{TINY_PLANS}.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_aniso"] = {
        "inherits_from": "3d_fullres", "patch_size": [4, 16, 16], "spacing": [3.0, 1.0, 1.0],
        "architecture": {**plans["configurations"]["3d_fullres"]["architecture"]},
    }
    arch = json.loads(json.dumps(plans["configurations"]["3d_fullres"]["architecture"]))
    arch["arch_kwargs"]["strides"] = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    arch["arch_kwargs"]["kernel_sizes"] = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
    plans["configurations"]["3d_aniso"]["architecture"] = arch
    aniso_file = tiny_dataset / f"{TINY_PLANS}_aniso.json"
    plans["plans_name"] = aniso_file.stem
    aniso_file.write_text(json.dumps(plans))
    try:
        args = tiny_args(results_dir, "--configuration", "3d_aniso")
        args[args.index("--plans") + 1] = aniso_file.stem
        ours = build_cli(args).model
        ref = native_trainer(tiny_dataset, "3d_aniso", plans)
        assert ours.aug.do_dummy_2d_data_aug is True
        assert list(ours.network.state_dict()) == list(ref.network.state_dict())
        assert_augmentation_matches(ours, ref)
    finally:
        aniso_file.unlink()


class _FakeDist:
    """torch.distributed as nnUNetTrainer's epoch ends use it: all_gather_object hands out each rank's object."""

    def __init__(self, per_rank_calls: list[list]) -> None:
        self.calls = iter(per_rank_calls)

    def get_world_size(self) -> int:
        return 2

    def all_gather_object(self, out: list, obj) -> None:
        out[:] = next(self.calls)


@pytest.mark.parametrize("world_size", [1, 2])
def test_logged_losses_pseudo_dice_and_ema_equal_nnunets_logger_bit_for_bit(monkeypatch, world_size):
    """30 epochs of per-step float32 statistics (voxel counts beyond float32's exact integers, a class without
    foreground) through nnUNetTrainer's epoch ends and MetaLogger, and through our module's: identical floats."""
    from types import SimpleNamespace

    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    from nnunetv2.training.logging.nnunet_logger import MetaLogger

    from resenc_lightning.module import NNUNET_LOG_KEYS, ResEncUNetModule

    rng = np.random.default_rng(0)
    native = SimpleNamespace(logger=MetaLogger(None, False), is_ddp=world_size > 1, current_epoch=0)
    n, steps = 3, 50
    # our module's epoch end, unbound on the attributes it reads
    ours = SimpleNamespace(trainer=SimpleNamespace(sanity_checking=False), hparams=SimpleNamespace(ema_momentum=0.9),
                           device=torch.device("cpu"), ema_fg_dice=None, best_ema=None,
                           nnunet_log={k: [] for k in NNUNET_LOG_KEYS},
                           optimizers=lambda: SimpleNamespace(param_groups=[{"lr": 0.01}]),
                           class_names=lambda: ["a", "b", "c"])
    ours._record = lambda key, value: ResEncUNetModule._record(ours, key, value)
    for epoch in range(30):
        native.current_epoch = epoch
        val_rows, train_rows = [], []
        for _ in range(world_size):
            counts = rng.integers(0, 4_000_000, size=(steps, 3 * n)).astype(np.float32)
            counts[:, [n - 1, 2 * n - 1, 3 * n - 1]] *= epoch % 2  # last class: no voxels every other epoch
            val_rows.append(np.concatenate([rng.random((steps, 1), dtype=np.float32), counts], axis=1))
            train_rows.append(rng.random(steps, dtype=np.float32) - 0.5)
        val_out = [[{"loss": r[0], "tp_hard": r[1:1 + n], "fp_hard": r[1 + n:1 + 2 * n], "fn_hard": r[1 + 2 * n:]}
                    for r in rank] for rank in val_rows]
        train_out = [[{"loss": np.array(v)} for v in rank] for rank in train_rows]
        if world_size > 1:
            def rank_sums(key, val_out=val_out):
                return [np.sum(np.vstack([o[key][None] for o in rank]), 0) for rank in val_out]

            losses = [np.vstack([o["loss"][None] for o in rank]) for rank in val_out]
            monkeypatch.setattr(trainer_module, "dist", _FakeDist(
                [[np.vstack([o["loss"][None] for o in rank]) for rank in train_out]]))
            nnUNetTrainer.on_train_epoch_end(native, train_out[0])
            monkeypatch.setattr(trainer_module, "dist", _FakeDist(
                [rank_sums("tp_hard"), rank_sums("fp_hard"), rank_sums("fn_hard"), losses]))
        else:
            nnUNetTrainer.on_train_epoch_end(native, train_out[0])
        nnUNetTrainer.on_validation_epoch_end(native, val_out[0])

        gathered = iter([torch.stack([torch.from_numpy(r) for r in val_rows]),
                         torch.stack([torch.from_numpy(r) for r in train_rows])])
        ours.trainer.world_size, ours.current_epoch = world_size, epoch
        ours.all_gather = lambda tensor, gathered=gathered: next(gathered)
        ours._val = [torch.from_numpy(row) for row in val_rows[0]]
        ours._train_losses = [torch.tensor(v) for v in train_rows[0]]
        ResEncUNetModule.on_validation_epoch_end(ours)
        log = native.logger.local_logger.my_fantastic_logging
        for key in ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice"):
            assert ours.nnunet_log[key][epoch] == float(log[key][epoch]), (key, epoch)
        ours_dice, native_dice = ours.nnunet_log["dice_per_class_or_region"][epoch], log["dice_per_class_or_region"][epoch]
        assert np.array_equal(ours_dice, [float(d) for d in native_dice], equal_nan=True)
        assert ours.ema_fg_dice == float(log["ema_fg_dice"][epoch])
    assert len({round(v, 3) for v in log["ema_fg_dice"]}) > 10  # the sequence moves


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_one_lightning_training_step_equals_nnunet_train_step(tiny_dataset, results_dir, compiled):
    """The real Lightning step (our module, TRAINER_DEFAULTS' norm-12 clipping, SGD Nesterov) and
    nnUNetTrainer.train_step, from the same weights, optimizer state and batch, on the CPU in fp32: weights,
    momentum buffers and loss are bit-identical. Compiled: both sides compile network and Dice loss (inductor)."""
    import lightning.pytorch as pl

    from resenc_lightning.cli import TRAINER_DEFAULTS

    cli = build_cli(tiny_args(results_dir, "--model.compile", str(compiled).lower(), epochs=1, iters=1, val_iters=1))
    ours, dm = cli.model, cli.datamodule
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    dm.teardown("fit")
    ref = native_trainer(tiny_dataset, "3d_fullres")
    ours.network.load_state_dict(ref.network.state_dict(), strict=True)
    if compiled:  # what nnUNetTrainer.initialize does when _do_i_compile() (it is never true on the CPU)
        torch._dynamo.reset()  # so that no earlier test's compiled modules count towards the recompile limit
        ref._do_i_compile = lambda: True
        ref.loss = ref._build_loss()
        ref.network = torch.compile(ref.network)
    ref.network.train()
    ref.lr_scheduler.step(0)  # nnUNetTrainer.on_train_epoch_start
    ref_loss = ref.train_step(copy.deepcopy(batch))["loss"]

    trainer = pl.Trainer(**{**TRAINER_DEFAULTS, "num_sanity_val_steps": 0, "enable_model_summary": False},
                         max_epochs=1, limit_val_batches=0, accelerator="cpu", precision="32-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(ours, train_dataloaders=torch.utils.data.DataLoader([copy.deepcopy(batch)], batch_size=None))
    assert trainer.global_step == 1
    assert float(ours._train_losses[0]) == float(ref_loss)
    mine = ours.network.state_dict()
    theirs = {k.removeprefix("_orig_mod."): v for k, v in ref.network.state_dict().items()}
    assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    ours_opt = trainer.optimizers[0]
    # the lowest-resolution head has DS weight 0, so no gradient and no momentum buffer, on both sides
    buffers = [(ours_opt.state[a].get("momentum_buffer"), ref.optimizer.state[b].get("momentum_buffer"))
               for a, b in zip(ours.network.parameters(), ref.network.parameters(), strict=True)]
    assert sum(a is not None for a, _ in buffers) > len(buffers) // 2
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in buffers)
    hyper = [{k: v for k, v in opt.param_groups[0].items() if k != "params"} for opt in (ours_opt, ref.optimizer)]
    assert hyper[0] == hyper[1] and hyper[0]["nesterov"]  # lr, momentum, weight decay, Nesterov
