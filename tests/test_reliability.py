"""Atomic writes, resume fallback, disk-full and first-step OOM, --seed/--deterministic (in-process, fast)."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from conftest import stop_at_step_and_resume, tiny_args

from resenc_lightning import atomic
from resenc_lightning.atomic import AtomicCheckpointIO, CheckpointWriteError, atomic_save
from resenc_lightning.background_io import BackgroundCheckpointIO
from resenc_lightning.cli import UsageError, build_cli, main
from resenc_lightning.memory_target import GB, first_step_oom_message
from resenc_lightning.module import ResEncUNetModule

QUIET = ("--final_validation", "false", "--nnunet_export.plot_progress", "false")


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_save_replaces_whole_files_and_a_failed_write_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_save({"v": 1}, target)
    atomic_save({"v": 2}, target)
    assert torch.load(target)["v"] == 2 and os.listdir(tmp_path) == ["last.ckpt"]
    with pytest.raises(CheckpointWriteError, match="the disk is full; the previous last.ckpt is intact"):
        atomic_save({"v": 3}, target, save=disk_full)
    assert torch.load(target)["v"] == 2 and os.listdir(tmp_path) == ["last.ckpt"]  # no temporary left behind
    (tmp_path / f".last.ckpt{atomic.TMP_MARKER}999").write_bytes(b"half")  # what a kill -9 mid-write leaves
    assert [p.name for p in atomic.remove_stale_temporaries(tmp_path)] == [f".last.ckpt{atomic.TMP_MARKER}999"]
    AtomicCheckpointIO().save_checkpoint({"v": 4}, tmp_path / "sub" / "x.ckpt")
    assert torch.load(tmp_path / "sub" / "x.ckpt")["v"] == 4


def test_disk_full_during_training_gives_one_line_and_keeps_the_previous_checkpoint(tiny_dataset, results_dir,
                                                                                      monkeypatch):
    real_save = torch.save
    saves = []

    def save_until_epoch_1(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 1:
            saves.append(obj["epoch"])
            disk_full()
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(atomic.torch, "save", save_until_epoch_1)
    args = tiny_args(results_dir, *QUIET, epochs=2, iters=1, val_iters=1)
    with pytest.raises(UsageError) as e:
        main(args)
    message = str(e.value)
    assert "\n" not in message and "the disk is full" in message and "--resume" in message
    cli = build_cli(args)
    last = cli.checkpoint_dir / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 0  # epoch 0 survives intact
    assert saves and not [p for p in cli.output_folder.rglob("*") if atomic.TMP_MARKER in p.name]


def test_corrupt_last_checkpoint_falls_back_to_the_newest_intact_one(tiny_dataset, results_dir, capsys):
    args = tiny_args(results_dir, *QUIET, "--save_every", "1", epochs=2, iters=1, val_iters=1)
    main(args)
    cli = build_cli(tiny_args(results_dir, *QUIET, "--resume", "true", epochs=3, iters=1, val_iters=1))
    ckpts = cli.checkpoint_dir
    assert {"last.ckpt", "best.ckpt", "epoch_0000.ckpt", "epoch_0001.ckpt"} <= {p.name for p in ckpts.iterdir()}
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])  # truncated (e.g. a copy cut short)
    (ckpts / f".best.ckpt{atomic.TMP_MARKER}4242").write_bytes(b"left by a killed write")
    capsys.readouterr()
    chosen = cli.resolve_ckpt_path()
    out = capsys.readouterr().out
    assert chosen == str(ckpts / "epoch_0001.ckpt")  # epoch 1 / step 2, newer than best (maybe epoch 0)
    assert f"error: checkpoint {ckpts / 'last.ckpt'} is corrupt or truncated" in out
    assert f"Resuming from the newest intact checkpoint {ckpts / 'epoch_0001.ckpt'} (epoch 1, step 2)" in out
    assert not list(ckpts.glob(f".*{atomic.TMP_MARKER}*"))
    for p in ckpts.glob("*.ckpt"):
        p.write_bytes(b"garbage")
    with pytest.raises(UsageError, match="--resume found no intact checkpoint: checkpoint .*last.ckpt is corrupt"):
        cli.resolve_ckpt_path()


def test_cuda_oom_in_the_first_step_names_the_planner_command(tiny_dataset, results_dir, monkeypatch):
    def oom(self, batch, batch_idx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ResEncUNetModule, "training_step", oom)
    with pytest.raises(UsageError) as e:
        main(tiny_args(results_dir, *QUIET, epochs=1, iters=1, val_iters=1))
    message = str(e.value)
    assert "\n" not in message and "CUDA out of memory in the first training step" in message
    assert "nnUNetv2_plan_experiment -d 555 -pl nnUNetPlannerResEncL -gpu_memory_target 12" in message  # 24 GB / 2
    cli = build_cli(tiny_args(results_dir, epochs=1))
    on_16gb = first_step_oom_message(cli.datamodule.spec, torch.device("cuda", 0), total_bytes=lambda d: 16 * GB)
    assert "this 16.0 GB card" in on_16gb and "-gpu_memory_target 14 " in on_16gb  # 16 GB less 2 GB headroom


def test_seed_and_deterministic_flags_reach_lightning(tiny_dataset, results_dir):
    cli = build_cli(tiny_args(results_dir, "--seed", "99", "--deterministic", "true"))
    assert cli.config["seed_everything"] == 99 and os.environ["PL_GLOBAL_SEED"] == "99"
    assert cli.config.trainer.deterministic is True and torch.are_deterministic_algorithms_enabled()
    io = cli.trainer.strategy.checkpoint_io
    assert isinstance(io, BackgroundCheckpointIO) and isinstance(io.checkpoint_io, AtomicCheckpointIO)


def test_sigterm_mid_epoch_then_resume_ends_bit_identical_to_an_uninterrupted_run(tiny_dataset, tmp_path):
    """Lightning restores the batch progress; the epoch yields only its remaining batches and the RNGs are rewound
    past any batch fetched but not trained on, so the resumed run draws the batches the stopped one would have."""
    import signal

    a, b, mid, code = stop_at_step_and_resume(tmp_path, step=7)
    assert code == 128 + signal.SIGTERM
    assert mid["global_step"] == 7 and mid["epoch"] == 1
    assert a["global_step"] == b["global_step"] == 10
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for x, y in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])
    log_a, log_b = a["nnunet"]["logging"], b["nnunet"]["logging"]
    assert log_a["val_losses"] == log_b["val_losses"] and log_a["lrs"] == log_b["lrs"]
    # the stopped epoch's logged train loss averages only the batches after the resume (documented)
    assert log_a["train_losses"][0] == log_b["train_losses"][0] and len(log_b["train_losses"]) == 2


@pytest.mark.parametrize("signame", ["SIGINT", "SIGUSR1"])
def test_first_ctrl_c_and_sigusr1_stop_like_sigterm(tiny_dataset, results_dir, signame):
    import signal

    import lightning.pytorch as pl

    from resenc_lightning.cli import fit

    signum = getattr(signal, signame)
    before = signal.getsignal(signum)

    class SignalAtStep(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 2:
                os.kill(os.getpid(), signum)

    cli = build_cli(tiny_args(results_dir, *QUIET, epochs=1, iters=5, val_iters=1))
    cli.trainer.callbacks.append(SignalAtStep())
    with pytest.raises(SystemExit) as e:
        fit(cli, None)
    assert e.value.code == 128 + signum
    assert torch.load(cli.checkpoint_dir / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2
    assert signal.getsignal(signum) == before  # our handler is removed again
