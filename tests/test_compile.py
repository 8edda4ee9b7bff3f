"""torch.compile (`--model.compile true`, forced on the CPU with inductor): checkpoints keep nnU-Net's keys once,
every load path loads them strictly, and the loss follows nnUNetTrainer._build_loss with compile on and off."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_PLANS, tiny_args
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch._dynamo.eval_frame import OptimizedModule

from resenc_lightning import recipe
from resenc_lightning.cli import build_cli, main

COMPILE = ("--model.compile", "true")
NO_VAL = ("--final_validation", "false")


def _run(folder, *extra, epochs=1):
    torch._dynamo.reset()  # a fresh dynamo cache per run: its recompile limit is shared by every compiled module
    return main(tiny_args(folder, *extra, epochs=epochs, iters=2, val_iters=1))


def _assert_nnunet_keys(out, expected: list[str]) -> None:
    """Every checkpoint of the fold holds the network once, under nnU-Net's keys."""
    files = sorted((out / "checkpoints").glob("*.ckpt"))
    assert files
    for path in files:
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        assert list(state) == expected, path
    for path in out.glob("checkpoint_*.pth"):
        weights = torch.load(path, map_location="cpu", weights_only=False)["network_weights"]
        assert [f"network.{k}" for k in weights] == expected, path


@pytest.fixture(scope="module")
def compiled_run(tiny_dataset, tmp_path_factory):
    """One compiled training run (1 epoch), shared: compiling is what costs time on the CPU."""
    root = tmp_path_factory.mktemp("compiled")
    out = _run(root / "results", *COMPILE, *NO_VAL)
    expected = list(build_cli(tiny_args(root / "fresh")).model.state_dict())
    return SimpleNamespace(root=root, out=out, expected=expected)


def test_compiled_run_checkpoints_load_strictly_for_validation(compiled_run):
    _assert_nnunet_keys(compiled_run.out, compiled_run.expected)
    _run(compiled_run.root / "results", "--validate_only", "true")
    assert (compiled_run.out / "validation" / "summary.json").is_file()


def test_resume_with_compile_toggled_and_from_nnunet_checkpoints(compiled_run, tmp_path):
    # compile on -> off
    shutil.copytree(compiled_run.root / "results", tmp_path / "on_off")
    out = _run(tmp_path / "on_off", "--resume", "true", *NO_VAL, epochs=2)
    _assert_nnunet_keys(out, compiled_run.expected)
    # --init_from_nnunet with a compiled run's checkpoint_final.pth (uncompiled), then compile off -> on
    final = str(compiled_run.out / "checkpoint_final.pth")
    _run(tmp_path / "off_on", "--init_from_nnunet", final, *NO_VAL)
    out = _run(tmp_path / "off_on", "--resume", "true", *COMPILE, *NO_VAL, epochs=2)
    _assert_nnunet_keys(out, compiled_run.expected)
    # --resume_from_nnunet with a compiled run's checkpoint_final.pth, compiled
    out = _run(tmp_path / "native", "--resume_from_nnunet", final, *COMPILE, *NO_VAL, epochs=2)
    _assert_nnunet_keys(out, compiled_run.expected)
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 1


def _native_loss(tiny_dataset, compile_network: bool, ddp: bool):
    plans = {**json.loads((tiny_dataset / f"{TINY_PLANS}.json").read_text()), "continue_training": False}
    dataset_json = json.loads((tiny_dataset / "dataset.json").read_text())
    ref = nnUNetTrainer(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    ref.is_ddp = ddp
    ref._do_i_compile = lambda: compile_network
    return ref._build_loss()


@pytest.mark.parametrize("ddp", [False, True])
@pytest.mark.parametrize("compile_flag", ["true", "false", None])
def test_loss_follows_nnunet_build_loss_with_compile_on_and_off(tiny_dataset, results_dir, monkeypatch, ddp,
                                                                compile_flag):
    """The loss is built on the training device with the network's compile decision (None: nnU-Net's default,
    on for CUDA with nnUNet_compile=t): Dice compiled, and the last DS weight 1e-6 only under DDP without compile."""
    monkeypatch.setenv("nnUNet_compile", "t")
    monkeypatch.setattr(recipe, "is_distributed", lambda: ddp)
    flags = ("--model.compile", compile_flag) if compile_flag else ()
    model = build_cli(tiny_args(results_dir, *flags)).model
    model._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    model.configure_model()  # Lightning calls it with the module still on the CPU
    compiled = compile_flag != "false"
    ref = _native_loss(tiny_dataset, compiled, ddp)
    assert np.array_equal(model.loss.weight_factors, ref.weight_factors)
    assert isinstance(model.loss.loss.dc, OptimizedModule) is isinstance(ref.loss.dc, OptimizedModule) is compiled
    assert (model.network._compiled_call_impl is not None) is compiled
    assert not [k for k in model.state_dict() if "_orig_mod" in k or "_forward_impl" in k]


def test_checkpoints_of_compiled_runs_from_before_the_fix_still_load(tiny_dataset, results_dir):
    """Those held every weight twice, the second copy as `_forward_impl._orig_mod.*`."""
    from resenc_lightning.module import drop_compiled_duplicates

    model = build_cli(tiny_args(results_dir)).model
    state = model.state_dict()
    old = {**state, **{f"_forward_impl._orig_mod.{k.removeprefix('network.')}": v for k, v in state.items()}}
    checkpoint = {"state_dict": old, "nnunet": {}}
    model.on_load_checkpoint(checkpoint)  # Lightning's --resume path, before its strict load
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    model.load_state_dict(drop_compiled_duplicates(dict(old)), strict=True)  # --validate_only's path
