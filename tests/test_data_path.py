"""What nnU-Net trains, we train: plans whose patch exceeds every case, folds beyond the 5-fold file, legacy .npz data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import TINY_PLANS, tiny_args

from resenc_lightning.cli import build_cli


def fit(args: list[str]):
    cli = build_cli(args)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resolve_ckpt_path())
    return cli


def test_patch_larger_than_every_case_trains(tiny_dataset, results_dir):
    """nnU-Net's planner rounds the patch up to the pooling factor and its loader pads: such plans train."""
    plans = json.loads((tiny_dataset / f"{TINY_PLANS}.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    pooling = np.prod(cfg["architecture"]["arch_kwargs"]["strides"], axis=0)
    cfg["patch_size"] = [32, 24, 24]  # the tiny cases are 18-22 voxels along every axis
    assert all(p % k == 0 for p, k in zip(cfg["patch_size"], pooling))
    big = tiny_dataset / "nnUNetResEncUNetLPlans_bigpatch.json"
    plans["plans_name"] = big.stem
    big.write_text(json.dumps(plans))
    try:
        args = tiny_args(results_dir, epochs=1, iters=2, val_iters=1)
        args[args.index("--plans") + 1] = big.stem
        cli = fit(args)
    finally:
        big.unlink()
    assert len(cli.model.nnunet_log["train_losses"]) == 1
    assert np.isfinite(cli.model.nnunet_log["train_losses"][0])
    assert (cli.checkpoint_dir / "last.ckpt").is_file()


@pytest.fixture()
def no_splits_file(tiny_dataset):
    """splits_final.json moved aside (an earlier test may have written it), restored afterwards."""
    splits = tiny_dataset / "splits_final.json"
    aside = splits.with_name("splits_final.json.aside_data_path")
    if splits.exists():
        splits.rename(aside)
    yield splits
    splits.unlink(missing_ok=True)
    if aside.exists():
        aside.rename(splits)


def test_fold_beyond_five_without_splits_file_trains_nnunets_random_split(tiny_dataset, results_dir, no_splits_file):
    """nnU-Net's do_split writes the 5-fold file, then trains a seeded 80:20 split for fold >= 5."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    args = tiny_args(results_dir, epochs=1, iters=1, val_iters=1)
    args[args.index("--fold") + 1] = "5"
    cli = fit(args)
    assert cli.output_folder.name == "fold_5" and (cli.checkpoint_dir / "last.ckpt").is_file()
    assert len(json.loads(no_splits_file.read_text())) == 5

    plans = json.loads((tiny_dataset / f"{TINY_PLANS}.json").read_text())
    plans["continue_training"] = False  # what nnunetv2.run.run_training adds before constructing the trainer
    dataset_json = json.loads((tiny_dataset / "dataset.json").read_text())
    native = nnUNetTrainer(plans, "3d_fullres", 5, dataset_json, device=torch.device("cpu"))
    native_train, native_val = native.do_split()
    # (nnU-Net's dataset class sorts the key lists it is given in place, ours and native alike)
    assert sorted(cli.datamodule.train_keys) == sorted(str(k) for k in native_train)
    assert sorted(cli.datamodule.val_keys) == sorted(str(k) for k in native_val)
    assert len(native_val) == 2  # 8 cases: 80:20


@pytest.fixture()
def npz_copy(tiny_dataset):
    """The tiny 3d_fullres data in nnU-Net's legacy format (.npz written by nnunetv2's own nnUNetDatasetNumpy)."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, nnUNetDatasetNumpy

    target = tiny_dataset.parent / "Dataset559_TinyNpz"
    shutil.copytree(tiny_dataset, target, ignore=shutil.ignore_patterns("nnUNetPlans_*", "gt_segmentations"))
    for plans_file in target.glob("*.json"):
        text = plans_file.read_text()
        if '"dataset_name"' in text:
            plans = json.loads(text)
            plans["dataset_name"] = target.name
            plans_file.write_text(json.dumps(plans))
    source = tiny_dataset / "nnUNetPlans_3d_fullres"
    folder = target / "nnUNetPlans_3d_fullres"
    folder.mkdir()
    dataset = nnUNetDatasetBlosc2(str(source))
    for case in dataset.identifiers:
        data, seg, _, properties = dataset.load_case(case)
        nnUNetDatasetNumpy.save_case(np.asarray(data[:]), np.asarray(seg[:]), properties, str(folder / case))
    yield target
    shutil.rmtree(target, ignore_errors=True)


def test_legacy_npz_data_is_unpacked_once_before_training(npz_copy, results_dir):
    """nnU-Net unpacks .npz to .npy on rank 0 before training; reads then memory-map the .npy, never decompress."""
    folder = npz_copy / "nnUNetPlans_3d_fullres"
    cases = sorted(p.stem for p in folder.glob("*.npz"))
    assert cases and not list(folder.glob("*.npy"))
    args = tiny_args(results_dir, "--fold", "all", epochs=1, iters=2, val_iters=1)
    args[args.index("--dataset") + 1] = npz_copy.name
    cli = fit(args)
    assert len(cli.model.nnunet_log["train_losses"]) == 1
    assert sorted(p.stem for p in folder.glob("*.npy") if not p.stem.endswith("_seg")) == cases
    assert sorted(p.stem[:-4] for p in folder.glob("*_seg.npy")) == cases
    data, seg, _, _ = cli.datamodule._dl_train._data.load_case(cases[0])
    assert isinstance(data, np.memmap) and isinstance(seg, np.memmap)  # read from .npy, not decompressed
