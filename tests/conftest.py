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


@pytest.fixture(autouse=True)
def restore_deterministic_algorithms():
    """Lightning's `deterministic` sets torch's process-wide flag and never unsets it; the cuDNN warm-up reads it."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.fixture()
def restore_cudnn_benchmark():
    """Tests that run the cuDNN warm-up leave torch.backends.cudnn.benchmark as they found it."""
    before = torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.benchmark = before


def stop_at_step_and_resume(folder: Path, *extra: str, step: int = 7) -> tuple[dict, dict, dict, int]:
    """The same deterministic 2-epoch x 5-step run twice: uninterrupted, and stopped by SIGTERM after `step` then
    continued with --resume. Returns (uninterrupted last.ckpt, resumed last.ckpt, the stop checkpoint, the stopped
    run's exit code); all three load with weights_only=True."""
    import os
    import signal

    import lightning.pytorch as pl

    from resenc_lightning.cli import build_cli, fit

    class SigtermAtStep(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == step:
                os.kill(os.getpid(), signal.SIGTERM)

    def args(run: str, *more: str) -> list[str]:
        return tiny_args(folder / run, "--seed", "5", "--deterministic", "true", "--model.num_epochs", "2",
                         "--final_validation", "false", "--nnunet_export.plot_progress", "false", *extra, *more,
                         epochs=2, iters=5, val_iters=1)

    def load(path: Path) -> dict:
        return torch.load(path, map_location="cpu", weights_only=True)

    reference = build_cli(args("a"))
    fit(reference, None)
    stopped = build_cli(args("b"))
    stopped.trainer.callbacks.append(SigtermAtStep())
    with pytest.raises(SystemExit) as e:
        fit(stopped, None)
    last = stopped.checkpoint_dir / "last.ckpt"
    mid = load(last)
    resumed = build_cli(args("b", "--resume", "true"))
    fit(resumed, resumed.resolve_ckpt_path())
    return load(reference.checkpoint_dir / "last.ckpt"), load(last), mid, e.value.code


def wait_for(condition, timeout: float, proc=None, poll: float = 0.02) -> bool:
    """Poll for an event (a marker file, workers gone) until it happens: True; False when `proc` exits first or after
    `timeout`, which only bounds a hung run (the tests never rely on a process being slow or fast)."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(poll)
    return False
