"""Two-process DDP (gloo, CPU) with nnU-Net's semantics: global batch split, per-rank cases, summed statistics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
from conftest import TINY_ID, TINY_PLANS, tiny_args
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

from resenc_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
B3_PLANS = f"{TINY_PLANS}_b3"  # global batch 3: ranks get 2 + 1 (nnU-Net gives the remainder to the first ranks)


def nnunet_split(global_batch: int, world_size: int, rank: int, oversample: float = 0.33) -> tuple[int, float]:
    """nnunetv2's own `_set_batch_size_and_oversample`, run for one rank of a fake process group."""
    view = SimpleNamespace(is_ddp=True, oversample_foreground_percent=oversample,
                           configuration_manager=SimpleNamespace(batch_size=global_batch))
    fake_dist = SimpleNamespace(get_world_size=lambda: world_size, get_rank=lambda: rank)
    with mock.patch.object(trainer_module, "dist", fake_dist), mock.patch("builtins.print"):
        trainer_module.nnUNetTrainer._set_batch_size_and_oversample(view)
    return view.batch_size, view.oversample_foreground_percent


@pytest.fixture(scope="module")
def b3_plans(tiny_dataset) -> str:
    plans = json.loads((tiny_dataset / f"{TINY_PLANS}.json").read_text())
    plans["plans_name"] = B3_PLANS
    for cfg in plans["configurations"].values():
        if "batch_size" in cfg:
            cfg["batch_size"] = 3
    (tiny_dataset / f"{B3_PLANS}.json").write_text(json.dumps(plans, indent=2))
    return B3_PLANS


def run_ddp(results_dir: Path, probe_dir: Path, *extra: str, epochs: int, plans: str) -> subprocess.CompletedProcess:
    probe = json.dumps({"class_path": "ddp_probe.DDPProbe", "init_args": {"out_dir": str(probe_dir)}})
    args = tiny_args(results_dir, "--plans", plans, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                     "--trainer.strategy", "ddp", f"--trainer.callbacks+={probe}", *extra, epochs=epochs, iters=3,
                     val_iters=2)
    # one export/metrics worker per rank: nnU-Net's spawn pools dominate a tiny validation on 2 cores
    path = os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "nnUNet_def_n_proc": "1", "PYTHONPATH": path}
    start = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    print(f"DDP run took {time.time() - start:.1f}s")
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def preprocessed_folder() -> Path:
    return Path(os.environ["nnUNet_preprocessed"]) / f"Dataset{TINY_ID}_Tiny"


def read_ranks(probe_dir: Path) -> list[dict]:
    return [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_process_ddp_fit_and_resume(b3_plans, results_dir, tmp_path):
    proc = run_ddp(results_dir, tmp_path / "fresh", "--final_validation", "true", epochs=2, plans=b3_plans)
    ranks = read_ranks(tmp_path / "fresh")

    # nnU-Net's split of the global batch (3) over 2 ranks, computed by nnunetv2's own method.
    for rec in ranks:
        assert rec["world_size"] == 2
        assert (rec["batch_size"], rec["oversample"]) == nnunet_split(3, 2, rec["rank"])
        assert set(rec["train_batch_sizes"]) == {rec["batch_size"]}
        # Batch Dice over all ranks (ddp=True) and nnU-Net's DDP deep-supervision rule (last weight tiny, not 0).
        assert rec["loss_ddp"] is True
        assert 0 < rec["ds_weights"][-1] < 1e-5
    assert [r["batch_size"] for r in ranks] == [2, 1]

    # Each rank draws its own cases (no DistributedSampler): its data streams are seeded per rank.
    assert ranks[0]["rng_digest"] != ranks[1]["rng_digest"]
    assert ranks[0]["train_keys"] != ranks[1]["train_keys"]

    # Pseudo-Dice from tp/fp/fn summed over both ranks; identical on every rank.
    for epoch in ("0", "1"):
        stats = np.array(ranks[0]["val_stats"][epoch]) + np.array(ranks[1]["val_stats"][epoch])
        tp, fp, fn = stats[:, 0], stats[:, 1], stats[:, 2]
        expected = 2 * tp / (2 * tp + fp + fn)
        for rec in ranks:
            np.testing.assert_allclose(rec["logged"][epoch]["dice"], expected, rtol=1e-6)
            assert rec["logged"][epoch]["mean_fg_dice"] == pytest.approx(float(np.nanmean(expected)), rel=1e-6)
    for epoch in ("0", "1"):
        local = np.array(ranks[0]["val_stats"][epoch])
        assert not np.allclose(local, np.array(ranks[0]["val_stats"][epoch]) + np.array(ranks[1]["val_stats"][epoch]))

    # Exactly one set of output files (rank 0 writes).
    out = results_dir / f"Dataset{TINY_ID}_Tiny" / f"nnUNetTrainer_Lightning__{b3_plans}__3d_fullres" / "fold_0"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    # written by rank 0's background writer; complete when the job exited (every rank waited for rank 0)
    import torch

    assert torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 1
    assert torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=True)["current_epoch"] == 2
    assert [p.name for p in (out / "logs").iterdir()] == ["version_0"]
    assert (out / "checkpoint_final.pth").is_file()
    # final validation: nnU-Net's split of the fold's cases over the ranks covers each case once
    splits = json.loads((preprocessed_folder() / "splits_final.json").read_text())
    predicted = sorted(p.name.split(".")[0] for p in (out / "validation").glob("*.nii.gz"))
    assert predicted == sorted(splits[0]["val"])
    summary = json.loads((out / "validation" / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == len(splits[0]["val"])
    # the stable-epoch callbacks report per rank: every rank's timing is in rank 0's log
    header = (out / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    for rank in (0, 1):
        assert {f"time/rank{rank}/step_median_s", f"time/rank{rank}/data_wait_frac"} <= set(header)
    assert proc.stdout.count("Output folder:") == 1
    assert proc.stdout.count("Final validation of the trained network") == 1

    # --resume under DDP continues the run: epoch 2 with the EMA carried over, on both ranks.
    run_ddp(results_dir, tmp_path / "resumed", "--resume", "true", "--final_validation", "false", epochs=3,
            plans=b3_plans)
    resumed = read_ranks(tmp_path / "resumed")
    for rec in resumed:
        assert list(rec["logged"]) == ["2"]
        assert rec["batch_size"] == nnunet_split(3, 2, rec["rank"])[0]
    ema_before = ranks[0]["logged"]["1"]["ema_fg_dice"]
    m = resumed[0]["logged"]["2"]
    assert m["ema_fg_dice"] == pytest.approx(0.9 * ema_before + 0.1 * m["mean_fg_dice"], rel=1e-6)
    assert resumed[0]["train_keys"] != resumed[1]["train_keys"]


def test_world_size_above_global_batch_is_refused(tiny_dataset, results_dir):
    args = tiny_args(results_dir, "--trainer.accelerator", "cpu", "--trainer.devices", "3", "--trainer.strategy", "ddp")
    with pytest.raises(SystemExit) as e:
        main(args)
    message = str(e.value)
    assert "3 processes" in message and "global batch size 2" in message and TINY_PLANS in message
    assert "\n" not in message
    assert not results_dir.exists() or not any(results_dir.rglob("*.ckpt"))


def test_callback_messages_carry_the_rank_under_ddp(monkeypatch):
    from resenc_lightning import rank_report

    fake = SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, get_world_size=lambda: 2,
                           get_rank=lambda: 1)
    monkeypatch.setattr(rank_report, "dist", fake)
    with pytest.warns(UserWarning, match=r"^\[rank: 1\] EpochTiming: slow"):
        rank_report.warn("EpochTiming: slow")
    monkeypatch.setattr(rank_report, "dist", SimpleNamespace(**{**vars(fake), "get_world_size": lambda: 1}))
    with pytest.warns(UserWarning, match=r"^EpochTiming: slow"):
        rank_report.warn("EpochTiming: slow")
