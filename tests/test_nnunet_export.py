"""Our fold folder is an nnU-Net fold folder: nnUNetv2_predict(_from_modelfolder) use our model as is."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from conftest import TINY_ID, TINY_NAME, TINY_PLANS, tiny_args
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from resenc_lightning.cli import build_cli
from resenc_lightning.recipe import set_deep_supervision

NNUNET_KEYS = {"network_weights", "optimizer_state", "grad_scaler_state", "logging", "_best_ema", "current_epoch",
               "init_args", "trainer_name", "inference_allowed_mirroring_axes"}


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def test_export_is_used_by_nnunet_predict_and_matches_our_network(tiny_dataset, tmp_path, monkeypatch):
    results = Path(os.environ["nnUNet_results"])  # nnUNetv2_predict finds models there
    cli = build_cli(tiny_args(results, "--fold", "1", epochs=2, iters=2, val_iters=1))
    shutil.rmtree(cli.output_folder, ignore_errors=True)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resolve_ckpt_path())
    fold = cli.output_folder
    model_dir = fold.parent
    assert {"plans.json", "dataset.json", "dataset_fingerprint.json"} <= {p.name for p in model_dir.iterdir()}
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "checkpoint_best.pth").is_file()
    assert not (fold / "checkpoint_latest.pth").exists()  # removed at the end, like nnU-Net
    assert (fold / "progress.png").is_file()
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert set(ckpt) == NNUNET_KEYS
    assert ckpt["current_epoch"] == 2 and len(ckpt["logging"]["ema_fg_dice"]) == 2
    assert ckpt["init_args"]["configuration"] == "3d_fullres" and ckpt["init_args"]["fold"] == 1
    for k, v in cli.model.network.state_dict().items():
        assert torch.equal(ckpt["network_weights"][k], v), k

    raw = Path(os.environ["nnUNet_raw"]) / TINY_NAME / "imagesTr"
    inp = tmp_path / "in"
    inp.mkdir()
    for f in sorted(raw.iterdir())[:2]:
        shutil.copy(f, inp / f.name)
    env = {**os.environ, "nnUNet_compile": "f"}
    common = ["-i", str(inp), "-f", "1", "-npp", "1", "-nps", "1", "-device", "cpu", "--disable_progress_bar"]
    out_folder = tmp_path / "out_modelfolder"
    subprocess.run([_bin("nnUNetv2_predict_from_modelfolder"), *common, "-o", str(out_folder), "-m", str(model_dir)],
                   check=True, env=env, capture_output=True)
    out_predict = tmp_path / "out_predict"
    subprocess.run([_bin("nnUNetv2_predict"), *common, "-o", str(out_predict), "-d", str(TINY_ID), "-p", TINY_PLANS,
                    "-c", "3d_fullres", "-tr", fold.parent.name.split("__")[0]],
                   check=True, env=env, capture_output=True)

    # the same prediction from our in-memory network, through nnunetv2's predictor
    ours = tmp_path / "out_ours"
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                device=torch.device("cpu"), allow_tqdm=False)
    spec = cli.datamodule.spec
    set_deep_supervision(cli.model.network, False)  # as nnU-Net's final validation does
    predictor.manual_initialization(cli.model.network, spec.plans_manager, spec.configuration_manager,
                                    [cli.model.network.state_dict()], spec.dataset_json, "nnUNetTrainer",
                                    cli.model.inference_allowed_mirroring_axes)
    predictor.predict_from_files(str(inp), str(ours), save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)
    cases = sorted(p.name for p in ours.glob("*.nii.gz"))
    assert len(cases) == 2
    for name in cases:
        a = np.asarray(nib.load(ours / name).dataobj)
        for other in (out_folder, out_predict):
            assert np.array_equal(a, np.asarray(nib.load(other / name).dataobj)), (other, name)


def test_checkpoint_latest_follows_save_every_like_nnunet(tiny_dataset, results_dir, monkeypatch):
    from test_training import fit

    from resenc_lightning import background_io

    written: list[tuple[str, int]] = []
    real_save, real_copy = background_io.atomic_save, background_io.copy_finished

    def recording_save(obj, path):
        written.append((Path(path).name, obj.get("current_epoch")))
        real_save(obj, path)

    def recording_copy(source, target):  # the boundary's other files: copies of the one just serialised
        written.append((Path(target).name, written[-1][1]))
        real_copy(source, target)

    monkeypatch.setattr(background_io, "atomic_save", recording_save)  # the writer thread's saves
    monkeypatch.setattr(background_io, "copy_finished", recording_copy)
    fit(tiny_args(results_dir, "--save_every", "2", "--nnunet_export.plot_progress", "false", epochs=5, iters=1,
                  val_iters=1))
    # nnU-Net: after every save_every-th epoch except the last (checkpoint epoch = epochs done: 2, 4); final at the end
    assert [e for name, e in written if name == "checkpoint_latest.pth"] == [2, 4]
    assert [name for name, _ in written if name == "checkpoint_final.pth"] == ["checkpoint_final.pth"]
