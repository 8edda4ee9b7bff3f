"""A tiny real nnU-Net dataset, fingerprinted, planned (ResEnc L) and preprocessed by nnunetv2 itself,
with a copy of the plans whose architecture, patch and batch are shrunk so a step takes well under a
second on a CPU. Built once per test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

TINY_ID = 555
TINY_NAME = f"Dataset{TINY_ID}_Tiny"
TINY_PLANS = "nnUNetResEncUNetLPlans_tiny"
SOURCE_PLANS = "nnUNetResEncUNetLPlans"

os.environ.setdefault("nnUNet_n_proc_DA", "0")  # in-process augmentation: deterministic and light
os.environ.setdefault("nnUNet_compile", "f")
os.environ.setdefault("nnUNet_def_n_proc", "2")  # nnU-Net's export/metrics pools (default 8)


def shrink_plans(plans: dict) -> dict:
    """Same planner output, smaller network/patch/batch: 3 stages of 4/8/16 features, 16^3 patch, batch 2."""
    from resenc_lightning.demo import derive_plans

    return derive_plans(plans, TINY_PLANS, features=[4, 8, 16], blocks_per_stage=1, patch=16, batch_size=2)


@pytest.fixture(scope="session")
def nnunet_env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nnunet")
    paths = {}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        paths[var] = root / var
        paths[var].mkdir()
        os.environ[var] = str(paths[var])
    return paths


@pytest.fixture(scope="session")
def tiny_dataset(nnunet_env) -> Path:
    from resenc_lightning import demo

    folder = demo.build_dataset(TINY_ID, TINY_NAME, SOURCE_PLANS, n_cases=8, shape_range=(18, 22),
                                extra_configuration=False)
    demo.preprocess_configuration(TINY_ID, SOURCE_PLANS, "2d", num_processes=2)
    plans = json.loads((folder / f"{SOURCE_PLANS}.json").read_text())
    (folder / f"{TINY_PLANS}.json").write_text(json.dumps(shrink_plans(plans), indent=2))
    return folder


@pytest.fixture()
def results_dir(tmp_path) -> Path:
    return tmp_path / "results"


def tiny_args(results_dir: Path, *extra: str, epochs: int = 2, iters: int = 3, val_iters: int = 2) -> list[str]:
    return [
        "--plans", TINY_PLANS, "--dataset", str(TINY_ID), "--configuration", "3d_fullres", "--fold", "0",
        "--data.results_dir", str(results_dir), "--data.num_iterations_per_epoch", str(iters),
        "--data.num_val_iterations_per_epoch", str(val_iters), "--trainer.max_epochs", str(epochs),
        "--trainer.enable_model_summary", "false", "--seed_everything", "123", *extra,
    ]


@pytest.fixture()
def restore_cudnn_benchmark():
    """Tests that run the cuDNN warm-up leave torch.backends.cudnn.benchmark as they found it."""
    before = torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.benchmark = before
