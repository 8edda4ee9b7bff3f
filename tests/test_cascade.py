"""nnU-Net's cascade on our folds: 3d_lowres -> 3d_cascade_fullres, and --fold all.

The tiny dataset's plans (conftest) get nnU-Net's own cascade entries, as its planner writes them for large cases:
`3d_lowres` inherits 3d_fullres at 1.5x the spacing with `next_stage: 3d_cascade_fullres`, and
`3d_cascade_fullres` is `{inherits_from: 3d_fullres, previous_stage: 3d_lowres}`; nnunetv2's preprocessor makes the
3d_lowres data. (The ResEnc L planner itself emits these for cases of 40-48 voxels at `-gpu_memory_target 0.03`,
but training and sliding-window validation at that size cost minutes here, so the plans are edited instead.)

3d_lowres trains `--fold all` (train = validation = every case, nnU-Net's do_split), so its final validation
exports every case's next-stage segmentation in one run; the cascade then trains fold 0 on them and both are
predicted with nnUNetv2_predict (-prev_stage_predictions for the cascade).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY_ID, TINY_NAME, TINY_PLANS
from test_parity import native_trainer
from test_workflow import BIN, TRAINER, nnunet

from resenc_lightning import demo, recipe
from resenc_lightning.cli import UsageError, build_cli, main

CASCADE_PLANS = "nnUNetResEncUNetLPlans_tinycascade"
LOWRES_FACTOR = 1.5
N_CASES = 8


def add_cascade(plans: dict, name: str, factor: float = LOWRES_FACTOR) -> dict:
    """nnU-Net's 3d_lowres / 3d_cascade_fullres entries (the planner's fields) on top of the plans' 3d_fullres."""
    plans = json.loads(json.dumps(plans))
    plans["plans_name"] = name
    fullres = plans["configurations"]["3d_fullres"]
    plans["configurations"]["3d_lowres"] = {
        "inherits_from": "3d_fullres", "data_identifier": f"{name}_3d_lowres", "batch_dice": False,
        "spacing": [s * factor for s in fullres["spacing"]],
        "median_image_size_in_voxels": [round(m / factor) for m in fullres["median_image_size_in_voxels"]],
        "next_stage": "3d_cascade_fullres",
    }
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    return plans


def run_args(results: Path, configuration: str, fold: str, *extra: str) -> list[str]:
    """One short epoch (2 iterations) and the final validation."""
    return ["--plans", CASCADE_PLANS, "--dataset", str(TINY_ID), "--configuration", configuration, "--fold", fold,
            "--data.results_dir", str(results), "--data.num_iterations_per_epoch", "2",
            "--data.num_val_iterations_per_epoch", "1", "--trainer.max_epochs", "1",
            "--trainer.enable_model_summary", "false", "--trainer.enable_progress_bar", "false",
            "--nnunet_export.plot_progress", "false", "--seed_everything", "123", *extra]


def model_folder(results: Path, configuration: str) -> Path:
    return results / TINY_NAME / f"{TRAINER}__{CASCADE_PLANS}__{configuration}"


@pytest.fixture(scope="module")
def cascade_dataset(tiny_dataset) -> Path:
    plans = json.loads((tiny_dataset / f"{TINY_PLANS}.json").read_text())
    (tiny_dataset / f"{CASCADE_PLANS}.json").write_text(json.dumps(add_cascade(plans, CASCADE_PLANS), indent=2))
    demo.preprocess_configuration(TINY_ID, CASCADE_PLANS, "3d_lowres", num_processes=2)
    return tiny_dataset


@pytest.fixture(scope="module")
def lowres_all(cascade_dataset, tmp_path_factory) -> Path:
    """3d_lowres trained on --fold all; its final validation exports the next stage."""
    results = tmp_path_factory.mktemp("cascade") / "results"
    main(run_args(results, "3d_lowres", "all"))
    return results


@pytest.fixture(scope="module")
def cascade_fold0(lowres_all) -> Path:
    main(run_args(lowres_all, "3d_cascade_fullres", "0"))
    return lowres_all


def test_cascade_without_lowres_predictions_is_refused(cascade_dataset, tmp_path):
    with pytest.raises(UsageError) as e:
        main(run_args(tmp_path / "results", "3d_cascade_fullres", "0"))
    message = str(e.value)
    assert "\n" not in message
    assert "needs the 3d_lowres prediction of every case" in message and f"{N_CASES} of {N_CASES} are" in message
    assert (f"python train.py --plans {CASCADE_PLANS} --dataset {TINY_ID} --configuration 3d_lowres --fold F"
            in message)


def test_lowres_fold_all_validates_every_case_and_exports_the_next_stage(cascade_dataset, lowres_all):
    cases = sorted(p.stem for p in (cascade_dataset / "nnUNetPlans_3d_fullres").glob("*.pkl"))
    assert len(cases) == N_CASES
    fold_all = model_folder(lowres_all, "3d_lowres") / "fold_all"
    summary = json.loads((fold_all / "validation" / "summary.json").read_text())
    # nnU-Net's fold 'all': training cases = validation cases = every case
    assert sorted(Path(c["prediction_file"]).name[:-len(".nii.gz")] for c in summary["metric_per_case"]) == cases
    weights = torch.load(fold_all / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert all(torch.isfinite(w).all() for w in weights.values())
    next_stage = model_folder(lowres_all, "3d_lowres") / "predicted_next_stage" / "3d_cascade_fullres"
    assert sorted(p.name[:-len(".b2nd")] for p in next_stage.glob("*.b2nd")) == cases
    # at the cascade's (3d_fullres) resolution, as nnU-Net's resample_and_save writes them
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    data, _, seg_prev, _ = nnUNetDatasetBlosc2(str(cascade_dataset / "nnUNetPlans_3d_fullres"), [cases[0]],
                                               folder_with_segs_from_previous_stage=str(next_stage)).load_case(cases[0])
    assert seg_prev.shape[-3:] == data.shape[1:]


def test_cascade_recipe_matches_nnunet_trainer(cascade_dataset, lowres_all):
    """Same previous-stage folder (for our trainer name), is_cascaded transforms and input channels as nnUNetTrainer."""
    ours = build_cli(run_args(lowres_all, "3d_cascade_fullres", "0")).model
    plans = json.loads((cascade_dataset / f"{CASCADE_PLANS}.json").read_text())
    ref = native_trainer(cascade_dataset, "3d_cascade_fullres", plans)
    assert ours.view.is_cascaded and ref.is_cascaded
    folder, ref_folder = Path(ours.view.folder_with_segs_from_previous_stage), Path(ref.folder_with_segs_from_previous_stage)
    assert folder == model_folder(lowres_all, "3d_lowres") / "predicted_next_stage" / "3d_cascade_fullres"
    assert folder.parts[-2:] == ref_folder.parts[-2:]
    assert folder.parts[-3].replace(TRAINER, "nnUNetTrainer") == ref_folder.parts[-3]  # nnU-Net's, our trainer name
    a, b = ours.network.state_dict(), ref.network.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)  # 1 + 2 input channels in both
    aug = recipe.augmentation_params(ours.view)
    lm = ref.label_manager
    assert repr(recipe.training_transforms(ours.view, aug)) == repr(ref.get_training_transforms(
        ref.configuration_manager.patch_size, aug.rotation_for_da, ref._get_deep_supervision_scales(), aug.mirror_axes,
        aug.do_dummy_2d_data_aug, use_mask_for_norm=ref.configuration_manager.use_mask_for_norm, is_cascaded=True,
        foreground_labels=lm.foreground_labels, regions=None, ignore_label=lm.ignore_label))
    assert repr(recipe.validation_transforms(ours.view)) == repr(ref.get_validation_transforms(
        ref._get_deep_supervision_scales(), is_cascaded=True, foreground_labels=lm.foreground_labels, regions=None,
        ignore_label=lm.ignore_label))


def test_cascade_trains_validates_and_predicts_with_lowres_predictions(cascade_dataset, cascade_fold0, nnunet_env,
                                                                      tmp_path):
    results = cascade_fold0
    fold0 = model_folder(results, "3d_cascade_fullres") / "fold_0"
    weights = torch.load(fold0 / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    first_conv = next(v for k, v in weights.items() if k.endswith("weight") and v.ndim == 5)
    assert first_conv.shape[1] == 1 + 2  # the image + one-hot lowres segmentation (2 foreground labels)
    assert all(torch.isfinite(w).all() for w in weights.values())
    summary = json.loads((fold0 / "validation" / "summary.json").read_text())
    splits = json.loads((cascade_dataset / "splits_final.json").read_text())
    assert len(summary["metric_per_case"]) == len(splits[0]["val"])

    raw_in = tmp_path / "in"
    raw_in.mkdir()
    for image in sorted((nnunet_env["nnUNet_raw"] / TINY_NAME / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(image, raw_in / image.name)
    env = {**os.environ, "nnUNet_results": str(results), "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "0"}
    lowres, cascade = tmp_path / "lowres", tmp_path / "cascade"
    nnunet(f"nnUNetv2_predict -d {TINY_ID} -i {raw_in} -o {lowres} -f all -tr {TRAINER} -c 3d_lowres "
           f"-p {CASCADE_PLANS}", env)
    nnunet(f"nnUNetv2_predict -d {TINY_ID} -i {raw_in} -o {cascade} -f 0 -tr {TRAINER} -c 3d_cascade_fullres "
           f"-p {CASCADE_PLANS} -prev_stage_predictions {lowres}", env)
    names = {p.name[:-len("_0000.nii.gz")] + ".nii.gz" for p in raw_in.iterdir()}
    assert {p.name for p in lowres.glob("*.nii.gz")} == names
    assert {p.name for p in cascade.glob("*.nii.gz")} == names


def test_find_best_configuration_with_a_fold_missing_stops_with_nnunets_message(cascade_fold0):
    env = {**os.environ, "nnUNet_results": str(cascade_fold0), "nnUNet_def_n_proc": "1"}
    done = subprocess.run([str(BIN / "nnUNetv2_find_best_configuration"), str(TINY_ID), "-c", "3d_cascade_fullres",
                           "-p", CASCADE_PLANS, "-tr", TRAINER, "-np", "1"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode != 0
    assert "fold 1 of model" in done.stderr and "is missing. Please train it!" in done.stderr
