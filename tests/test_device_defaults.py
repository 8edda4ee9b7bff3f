"""What the CLI decides from the device before training: nnU-Net's one torch thread on CUDA, the deterministic mode
on CUDA, and bf16-mixed precision (trains and resumes on the CPU). CUDA is mocked where a GPU would be needed."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import tiny_args

from resenc_lightning import cli as cli_module
from resenc_lightning.cli import _uses_cuda, build_cli, deterministic_mode, limit_torch_threads
from resenc_lightning.module import ResEncUNetModule

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS")


@pytest.fixture()
def thread_calls(monkeypatch):
    """Records torch's thread settings; nnU-Net's thread variables unset, and restored after the test whatever the
    code writes, as is inductor's compile_threads (a config module: its own patch(), not monkeypatch)."""
    import torch._inductor.config as inductor_config

    for name in THREAD_ENV:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("intra", n)))
    monkeypatch.setattr(torch, "set_num_interop_threads", lambda n: calls.append(("interop", n)))
    with inductor_config.patch(compile_threads=16):
        yield calls


@pytest.fixture()
def restore_deterministic():
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


# -- torch threads (nnunetv2/run/run_training.py) -------------------------------------------------------------------
@pytest.mark.parametrize("accelerator", [None, "auto", "gpu", "cuda"])
def test_cuda_runs_use_one_torch_thread_like_nnunet(monkeypatch, thread_calls, accelerator):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert limit_torch_threads(_uses_cuda(accelerator)) is True
    assert thread_calls == [("intra", 1), ("interop", 1)]


def test_cpu_runs_keep_torchs_threads(monkeypatch, thread_calls):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert limit_torch_threads(_uses_cuda("cpu")) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not any(limit_torch_threads(_uses_cuda(a)) for a in (None, "auto", "gpu", "cuda"))
    assert thread_calls == []


def test_cuda_runs_set_nnunets_thread_variables_unless_the_user_did(monkeypatch, thread_calls):
    """nnunetv2/run/run_training.py (__main__) sets OMP/MKL/OPENBLAS_NUM_THREADS and TORCHINDUCTOR_COMPILE_THREADS to 1:
    they reach the processes the run starts (DDP ranks, inductor's compile workers); inductor's own pool size was read
    when lightning imported torch._inductor.config, so it is set directly. A user's exported value stands."""
    import torch._inductor.config as inductor_config

    assert limit_torch_threads(False) is False
    assert not any(name in os.environ for name in THREAD_ENV) and inductor_config.compile_threads == 16  # CPU: none
    assert limit_torch_threads(True) is True
    assert {name: os.environ.get(name) for name in THREAD_ENV} == dict.fromkeys(THREAD_ENV, "1")
    assert inductor_config.compile_threads == 1

    for name in THREAD_ENV:
        monkeypatch.setenv(name, "4")
    inductor_config.compile_threads = 4  # read from the user's variable at import
    limit_torch_threads(True)
    assert {name: os.environ.get(name) for name in THREAD_ENV} == dict.fromkeys(THREAD_ENV, "4")
    assert inductor_config.compile_threads == 4


def test_interop_threads_set_earlier_in_the_process_is_no_error(monkeypatch, thread_calls):
    def refuse(n):
        raise RuntimeError("Error: cannot set number of interop threads after parallel work has started")

    monkeypatch.setattr(torch, "set_num_interop_threads", refuse)
    assert limit_torch_threads(True) is True and thread_calls == [("intra", 1)]


# -- --trainer.deterministic true on CUDA ---------------------------------------------------------------------------
def test_deterministic_true_becomes_warn_on_cuda_only(capsys):
    assert deterministic_mode(True, on_cuda=True) == "warn"
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and 'deterministic true on CUDA -> "warn"' in line and "AvgPool3d" in line
    assert deterministic_mode(True, on_cuda=False) is True
    for other in (None, False, "warn"):
        assert deterministic_mode(other, on_cuda=True) == other
    assert capsys.readouterr().out == ""


def test_cli_decides_threads_and_deterministic_mode_from_the_device_before_training(
        tiny_dataset, results_dir, monkeypatch, thread_calls, restore_deterministic, capsys):
    build_cli(tiny_args(results_dir, "--deterministic", "true"))  # this CPU machine
    assert thread_calls == []
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    capsys.readouterr()
    # as on a GPU machine (the Trainer itself stays on the CPU here)
    monkeypatch.setattr(cli_module, "_uses_cuda", lambda accelerator: True)
    build_cli(tiny_args(results_dir, "--deterministic", "true", "--trainer.accelerator", "cpu",
                        "--trainer.precision", "32-true"))
    assert thread_calls == [("intra", 1), ("interop", 1)]
    assert os.environ["OMP_NUM_THREADS"] == "1"  # set before fit starts augmentation workers or DDP ranks
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert 'deterministic true on CUDA -> "warn"' in capsys.readouterr().out


# -- --trainer.precision bf16-mixed ---------------------------------------------------------------------------------
def test_bf16_mixed_trains_and_resumes_on_cpu(tiny_dataset, results_dir):
    dtypes: list[torch.dtype] = []

    def run(epochs: int, *extra: str):
        cli = build_cli(tiny_args(results_dir, "--trainer.precision", "bf16-mixed", "--model.num_epochs", "2", *extra,
                                  epochs=epochs, iters=2, val_iters=1))
        cli.model.network.register_forward_hook(lambda m, args, out: dtypes.append(out[0].dtype))
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resolve_ckpt_path())
        return cli

    run(1)
    cli = run(2, "--resume", "true")
    assert set(dtypes) == {torch.bfloat16}  # autocast to bf16 in training and validation, fresh and resumed
    ckpt = torch.load(cli.checkpoint_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1
    log = ckpt["nnunet"]["logging"]
    for key in ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice"):
        assert len(log[key]) == 2 and all(math.isfinite(v) for v in log[key]), (key, log[key])
    module = ResEncUNetModule(spec=cli.datamodule.spec)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    assert all(p.dtype == torch.float32 for p in module.parameters())  # fp32 master weights

