"""nnU-Net's whole workflow on folds trained by us: 5 folds x (3d_fullres, 2d) with --npz,
nnUNetv2_find_best_configuration, then the predict / ensemble / postprocessing commands it prints, run as printed
(nnU-Net's console scripts, our trainer name `nnUNetTrainer_Lightning`).

Wall time on a 2-core CPU machine: ~50 s for the 10 trainings (1 epoch of 2 iterations + final validation each),
~15 s find_best_configuration, ~25 s the two predictions, ~5 s ensemble, ~4 s postprocessing."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_ID, TINY_NAME, TINY_PLANS

from resenc_lightning.cli import main

TRAINER = "nnUNetTrainer_Lightning"
CONFIGS = ("3d_fullres", "2d")
BIN = Path(sys.executable).parent


def fold_args(results: Path, configuration: str, fold: int, *extra: str) -> list[str]:
    """One short epoch (2 iterations) and the final validation with --npz."""
    return ["--plans", TINY_PLANS, "--dataset", str(TINY_ID), "--configuration", configuration, "--fold", str(fold),
            "--data.results_dir", str(results), "--data.num_iterations_per_epoch", "2",
            "--data.num_val_iterations_per_epoch", "1", "--trainer.max_epochs", "1",
            "--trainer.enable_model_summary", "false", "--trainer.enable_progress_bar", "false",
            "--nnunet_export.plot_progress", "false", "--seed_everything", "123", "--npz", "true", *extra]


def nnunet(command: str, env: dict[str, str], **replace: str) -> subprocess.CompletedProcess:
    """Run one command as nnU-Net printed it, its placeholders (OUTPUT_FOLDER...) replaced by real folders."""
    words = [replace.get(w, w) for w in shlex.split(command)]
    words[0] = str(BIN / words[0])
    if words[0].endswith("nnUNetv2_predict"):  # one process each on this CPU machine; the GPU default needs CUDA
        words += ["-npp", "1", "-nps", "1"] + ([] if torch.cuda.is_available() else ["-device", "cpu"])
    done = subprocess.run(words, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("workflow") / "results"
    for configuration in CONFIGS:
        for fold in range(5):
            main(fold_args(results, configuration, fold))
    return results


def test_five_folds_two_configurations_find_best_predict_ensemble_postprocess(trained, nnunet_env, tmp_path,
                                                                             monkeypatch):
    results = trained
    dataset = results / TINY_NAME
    for configuration in CONFIGS:
        model = dataset / f"{TRAINER}__{TINY_PLANS}__{configuration}"
        assert (model / "plans.json").is_file() and (model / "dataset.json").is_file()
        for fold in range(5):
            validation = model / f"fold_{fold}" / "validation"
            cases = sorted(p.name[:-len(".nii.gz")] for p in validation.glob("*.nii.gz"))
            assert cases, validation
            # nnU-Net's --npz files: softmax + properties per validation case, named as the segmentation
            assert sorted(p.stem for p in validation.glob("*.npz")) == cases
            assert sorted(p.stem for p in validation.glob("*.pkl")) == cases

    env = {**os.environ, "nnUNet_results": str(results), "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "0"}
    find = nnunet(f"nnUNetv2_find_best_configuration {TINY_ID} -c {' '.join(CONFIGS)} -p {TINY_PLANS} "
                  f"-tr {TRAINER} -np 1", env)
    info = json.loads((dataset / "inference_information.json").read_text())
    assert set(info["all_results"]) == {
        f"{TRAINER}__{TINY_PLANS}__3d_fullres", f"{TRAINER}__{TINY_PLANS}__2d",
        f"ensemble___{TRAINER}__{TINY_PLANS}__3d_fullres___{TRAINER}__{TINY_PLANS}__2d___0_1_2_3_4"}
    chosen = [m["configuration"] for m in info["best_model_or_ensemble"]["selected_model_or_models"]]
    pp_pkl = Path(info["best_model_or_ensemble"]["postprocessing_file"])
    assert pp_pkl.is_file() and "*Best*" in find.stdout
    instructions = (dataset / "inference_instructions.txt").read_text()
    predict = [line for line in instructions.splitlines() if line.startswith("nnUNetv2_predict")]
    assert [shlex.split(c)[shlex.split(c).index("-c") + 1] for c in predict] == chosen
    assert all(f"-tr {TRAINER}" in c and f"-p {TINY_PLANS}" in c for c in predict)

    # the printed commands on 2 raw images
    raw_in = tmp_path / "in"
    raw_in.mkdir()
    for image in sorted((nnunet_env["nnUNet_raw"] / TINY_NAME / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(image, raw_in / image.name)
    out = tmp_path / "out"
    folders = {"INPUT_FOLDER": str(raw_in), "OUTPUT_FOLDER": str(out), "OUTPUT_FOLDER_PP": str(tmp_path / "pp"),
               "OUTPUT_FOLDER_MODEL_1": str(tmp_path / "m1"), "OUTPUT_FOLDER_MODEL_2": str(tmp_path / "m2")}
    commands = [line for line in instructions.splitlines() if line.startswith("nnUNetv2_")]
    if len(chosen) == 1:
        # a single configuration won: ensembling still has to work on our folds, with nnU-Net's own commands
        from nnunetv2.evaluation.find_best_configuration import generate_inference_command

        monkeypatch.setenv("nnUNet_results", str(results))  # generate_inference_command reads the model's plans.json
        commands = [generate_inference_command(TINY_ID, c, TINY_PLANS, TRAINER, save_npz=True,
                                               output_folder=f"OUTPUT_FOLDER_MODEL_{i + 1}")
                    for i, c in enumerate(CONFIGS)]
        commands += ["nnUNetv2_ensemble -i OUTPUT_FOLDER_MODEL_1 OUTPUT_FOLDER_MODEL_2 -o OUTPUT_FOLDER -np 1",
                     next(c for c in instructions.splitlines() if c.startswith("nnUNetv2_apply_postprocessing"))]
    for command in commands:
        nnunet(command, env, **folders)
    names = {p.name[:-len("_0000.nii.gz")] + ".nii.gz" for p in raw_in.iterdir()}
    assert {p.name for p in out.glob("*.nii.gz")} == names
    assert {p.name for p in (tmp_path / "pp").glob("*.nii.gz")} == names


def test_ensembling_without_npz_is_refused_and_validate_only_npz_regenerates(trained):
    from nnunetv2.ensembling.ensemble import ensemble_crossvalidations

    models = [trained / TINY_NAME / f"{TRAINER}__{TINY_PLANS}__{c}" for c in CONFIGS]
    validation = models[1] / "fold_3" / "validation"
    for npz in validation.glob("*.npz"):
        npz.unlink()
    with pytest.raises(RuntimeError, match="No .npz files found .* --npz"):
        ensemble_crossvalidations([str(m) for m in models], str(trained / "ensemble_check"), num_processes=1)
    main(fold_args(trained, "2d", 3, "--validate_only", "true"))  # --npz true is in fold_args
    assert sorted(validation.glob("*.npz")) and len(list(validation.glob("*.npz"))) == len(
        list(validation.glob("*.nii.gz")))
