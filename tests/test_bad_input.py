"""Every user mistake in the foundation issue gives one line naming the value and the fix."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import TINY_ID, TINY_NAME, TINY_PLANS, tiny_args

from resenc_lightning.cli import UsageError, build_cli
from resenc_lightning.plans import RunSpecError, resolve_run


def error_of(args: list[str]) -> str:
    with pytest.raises(UsageError) as e:
        cli = build_cli(args)
        cli.resolve_ckpt_path()
    message = str(e.value)
    assert "\n" not in message
    return message


def test_unknown_dataset_id(tiny_dataset, results_dir):
    args = tiny_args(results_dir)
    args[args.index("--dataset") + 1] = "777"
    msg = error_of(args)
    assert "no dataset with ID 777" in msg and "nnUNetv2_plan_and_preprocess -d 777" in msg


def test_unknown_dataset_name(tiny_dataset, results_dir):
    args = tiny_args(results_dir)
    args[args.index("--dataset") + 1] = "Dataset777_Nope"
    assert "'Dataset777_Nope' not found" in error_of(args)


def test_dataset_by_full_name_resolves(tiny_dataset, results_dir):
    spec = resolve_run(TINY_PLANS, TINY_NAME, "3d_fullres", 0)
    assert spec.dataset_name == TINY_NAME and spec.dataset_id == TINY_ID


def test_plans_not_found_lists_existing(tiny_dataset, results_dir):
    args = tiny_args(results_dir)
    args[args.index("--plans") + 1] = "nnUNetResEncUNetXLPlans"
    msg = error_of(args)
    assert "'nnUNetResEncUNetXLPlans' not found" in msg and TINY_PLANS in msg and "nnUNetResEncUNetLPlans" in msg


def test_configuration_not_in_plans(tiny_dataset, results_dir):
    msg = error_of(tiny_args(results_dir, "--configuration", "3d_lowres"))
    assert "'3d_lowres' is not in" in msg and "3d_fullres" in msg and "2d" in msg


def test_cascade_absent_from_the_plans(tiny_dataset, results_dir):
    # plans without a cascade (no 3d_lowres planned): nnU-Net's configurations listed; test_cascade.py trains one
    msg = error_of(tiny_args(results_dir, "--configuration", "3d_cascade_fullres"))
    assert "'3d_cascade_fullres' is not in" in msg and "3d_fullres" in msg


def test_not_preprocessed_gives_command(tiny_dataset, results_dir):
    plans_file = tiny_dataset / f"{TINY_PLANS}.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_unprocessed"] = {"inherits_from": "3d_fullres", "data_identifier": "nope_3d"}
    other = tiny_dataset / "nnUNetResEncUNetLPlans_unprocessed.json"
    plans["plans_name"] = other.stem
    other.write_text(json.dumps(plans))
    args = tiny_args(results_dir, "--configuration", "3d_unprocessed")
    args[args.index("--plans") + 1] = other.stem
    msg = error_of(args)
    assert "not preprocessed for 3d_unprocessed" in msg
    assert f"nnUNetv2_preprocess -d {TINY_ID} -plans_name {other.stem} -c 3d_unprocessed" in msg
    other.unlink()


def test_missing_plans_key_is_named(tiny_dataset, results_dir):
    plans = json.loads((tiny_dataset / f"{TINY_PLANS}.json").read_text())
    del plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    broken = tiny_dataset / "nnUNetResEncUNetLPlans_broken.json"
    broken.write_text(json.dumps(plans))
    with pytest.raises(RunSpecError, match="'architecture.arch_kwargs'"):
        resolve_run(broken.stem, TINY_ID, "3d_fullres", 0)
    broken.write_text("{not json")
    with pytest.raises(RunSpecError, match="not valid JSON"):
        resolve_run(broken.stem, TINY_ID, "3d_fullres", 0)
    broken.unlink()


def test_unset_nnunet_paths(tiny_dataset, results_dir, monkeypatch):
    monkeypatch.delenv("nnUNet_preprocessed")
    msg = error_of(tiny_args(results_dir))
    assert "nnUNet_preprocessed is not set" in msg and "export nnUNet_preprocessed" in msg


def test_fold_not_a_fold(tiny_dataset, results_dir):
    # A fold >= 5 is not refused: nnU-Net trains a seeded 80:20 split for it (tests/test_data_path.py).
    args = tiny_args(results_dir)
    args[args.index("--fold") + 1] = "-1"
    assert "--fold -1 is negative" in error_of(args)
    args[args.index("--fold") + 1] = "x"
    assert "--fold 'x' is not a fold" in error_of(args)


def test_resume_without_checkpoint(tiny_dataset, results_dir):
    msg = error_of(tiny_args(results_dir, "--resume", "true"))
    assert "--resume given but there is no checkpoint" in msg


def test_existing_checkpoints_are_not_overwritten(tiny_dataset, results_dir):
    cli = build_cli(tiny_args(results_dir))
    cli.checkpoint_dir.mkdir(parents=True)
    (cli.checkpoint_dir / "last.ckpt").write_bytes(b"precious")
    msg = error_of(tiny_args(results_dir))
    assert "already holds checkpoints; add --resume" in msg
    assert (cli.checkpoint_dir / "last.ckpt").read_bytes() == b"precious"
    assert os.listdir(cli.checkpoint_dir) == ["last.ckpt"]


def test_too_few_cases_for_five_folds(nnunet_env):
    from resenc_lightning import demo

    demo.build_dataset(558, "Dataset558_Three", "nnUNetResEncUNetLPlans", n_cases=3, shape_range=(12, 12),
                       num_processes=1, extra_configuration=False)
    with pytest.raises(RunSpecError, match="3 preprocessed cases, too few for nnU-Net's 5-fold split; use --fold all"):
        resolve_run("nnUNetResEncUNetLPlans", 558, "3d_fullres", 0)
    assert resolve_run("nnUNetResEncUNetLPlans", 558, "3d_fullres", "all").fold == "all"


# -- reliability catalogue (issue 7): data, network, memory, resume and config mistakes ------------------------------
@pytest.fixture()
def bad_copy(tiny_dataset, request):
    """A copy of the tiny dataset's 3d_fullres data under a new ID, for a test to break (removed afterwards)."""
    new_id = 600 + sum(map(ord, request.node.name)) % 300
    target = tiny_dataset.parent / f"Dataset{new_id}_Broken"
    shutil.copytree(tiny_dataset, target, ignore=shutil.ignore_patterns("nnUNetPlans_2d", "gt_segmentations"))
    yield target
    shutil.rmtree(target, ignore_errors=True)


def args_for(folder, results_dir, *extra):
    args = tiny_args(results_dir, *extra)
    args[args.index("--dataset") + 1] = folder.name
    return args


def case_data(folder) -> Path:
    return folder / "nnUNetPlans_3d_fullres"


def rewrite_b2nd(path: Path, change) -> None:
    import blosc2
    import numpy as np

    array = np.ascontiguousarray(blosc2.open(str(path))[:])
    change(array)
    path.unlink()
    blosc2.asarray(array, urlpath=str(path), mode="w")


def assert_nothing_written(results_dir) -> None:
    assert not results_dir.exists()


def test_plans_without_configurations_or_architecture(tiny_dataset, results_dir):
    plans = json.loads((tiny_dataset / f"{TINY_PLANS}.json").read_text())
    broken = tiny_dataset / "nnUNetResEncUNetLPlans_noarch.json"
    del plans["configurations"]["3d_fullres"]["architecture"]
    broken.write_text(json.dumps(plans))
    with pytest.raises(RunSpecError, match="has no 'architecture' key; regenerate"):
        resolve_run(broken.stem, TINY_ID, "3d_fullres", 0)
    del plans["configurations"]
    broken.write_text(json.dumps(plans))
    with pytest.raises(RunSpecError, match="has no 'configurations' key; regenerate"):
        resolve_run(broken.stem, TINY_ID, "3d_fullres", 0)
    broken.unlink()


def error_with_edited_plans(tiny_dataset: Path, results_dir: Path, name: str, edit) -> str:
    """The one-line error for a copy of the tiny plans changed by `edit(3d_fullres configuration)`."""
    plans = json.loads((tiny_dataset / f"{TINY_PLANS}.json").read_text())
    edit(plans["configurations"]["3d_fullres"])
    other = tiny_dataset / f"nnUNetResEncUNetLPlans_{name}.json"
    other.write_text(json.dumps(plans))
    args = tiny_args(results_dir)
    args[args.index("--plans") + 1] = other.stem
    try:
        return error_of(args)
    finally:
        other.unlink()


def test_unknown_network_class(tiny_dataset, results_dir):
    msg = error_with_edited_plans(tiny_dataset, results_dir, "nosuchnet",
                                  lambda cfg: cfg["architecture"].update(network_class_name="my_lab.nets.NoSuchUNet"))
    assert "network class 'my_lab.nets.NoSuchUNet'" in msg and "cannot be imported" in msg
    assert_nothing_written(results_dir)


def test_missing_case_file(bad_copy, results_dir):
    (case_data(bad_copy) / "case_004_seg.b2nd").unlink()
    msg = error_of(args_for(bad_copy, results_dir))
    assert "preprocessed case 'case_004' has no case_004_seg.b2nd" in msg and "nnUNetv2_preprocess -d" in msg
    assert_nothing_written(results_dir)


def test_unreadable_case_file(bad_copy, results_dir):
    (case_data(bad_copy) / "case_006.b2nd").write_bytes(b"not blosc2 at all")
    msg = error_of(args_for(bad_copy, results_dir))
    assert "preprocessed case 'case_006'" in msg and "cannot be read" in msg
    assert_nothing_written(results_dir)


def test_label_value_not_in_dataset_json(bad_copy, results_dir):
    rewrite_b2nd(case_data(bad_copy) / "case_005_seg.b2nd", lambda seg: seg.__setitem__((0, 0, 0, 0), 7))
    msg = error_of(args_for(bad_copy, results_dir))
    assert "preprocessed case 'case_005' has label values [7]" in msg and "dataset.json" in msg
    assert_nothing_written(results_dir)


def test_nan_in_preprocessed_image(bad_copy, results_dir):
    rewrite_b2nd(case_data(bad_copy) / "case_000.b2nd", lambda data: data.__setitem__((0, 1, 1, 1), float("nan")))
    msg = error_of(args_for(bad_copy, results_dir))
    assert "preprocessed case 'case_000' contains NaN voxels" in msg
    assert_nothing_written(results_dir)


def test_channel_count_differs_from_dataset_json(bad_copy, results_dir):
    dataset_json = json.loads((bad_copy / "dataset.json").read_text())
    dataset_json["channel_names"] = {"0": "CT", "1": "PET"}
    (bad_copy / "dataset.json").write_text(json.dumps(dataset_json))
    msg = error_of(args_for(bad_copy, results_dir))
    assert "has 1 image channels but dataset.json's channel_names lists 2" in msg
    assert_nothing_written(results_dir)


def test_memory_target_larger_than_the_card():
    from types import SimpleNamespace

    import torch

    from resenc_lightning.callbacks.memory_cap import CudaMemoryCap, MemoryTargetError

    cap = CudaMemoryCap(target_gb=100)
    cap._cuda = SimpleNamespace(get_device_properties=lambda i: SimpleNamespace(total_memory=80 * 1024**3),
                                current_device=lambda: 0)
    with pytest.raises(MemoryTargetError, match=r"--memory_cap.target_gb 100 is larger than this 80.0 GB card .*"
                                                r"use at most 72.0"):
        cap.apply(torch.device("cuda", 0), 100.0, "explicit target_gb", {}, TINY_ID)
    assert cap.decision is None


def test_resume_with_a_checkpoint_of_another_fold(tiny_dataset, results_dir):
    import torch

    cli = build_cli(tiny_args(results_dir))
    cli.checkpoint_dir.mkdir(parents=True)
    foreign = {"dataset_name": TINY_NAME, "plans_identifier": TINY_PLANS, "configuration": "3d_fullres", "fold": 1}
    torch.save({"state_dict": {}, "epoch": 3, "global_step": 30, "nnunet": foreign}, cli.checkpoint_dir / "last.ckpt")
    msg = error_of(tiny_args(results_dir, "--resume", "true"))
    assert "was trained on Dataset555_Tiny/nnUNetResEncUNetLPlans_tiny/3d_fullres/1 but this run is" in msg
    assert msg.endswith("start a new run in another folder.")


def test_config_with_an_unknown_key(tiny_dataset, results_dir, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("trainer:\n  max_epochz: 3\n")
    msg = error_of(["--config", str(config), *tiny_args(results_dir)])
    assert "does not accept option 'max_epochz'" in msg and "python train.py --help" in msg
    assert_nothing_written(results_dir)
