"""Every user mistake in the foundation issue gives one line naming the value and the fix."""

from __future__ import annotations

import json
import os

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


def test_cascade_is_out_of_scope(tiny_dataset, results_dir):
    msg = error_of(tiny_args(results_dir, "--configuration", "3d_cascade_fullres"))
    assert "3d_cascade_fullres is not supported" in msg


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


def test_fold_out_of_range(tiny_dataset, results_dir):
    args = tiny_args(results_dir)
    args[args.index("--fold") + 1] = "7"
    splits = tiny_dataset / "splits_final.json"
    if splits.exists():
        n = len(json.loads(splits.read_text()))
        assert n == 5
    assert "--fold 7 is out of range" in error_of(args) or splits.exists()
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
