"""Checkpoints off the training thread (background_io.py): what the training thread keeps, what a user sees on disk.

Unit tests drive BackgroundCheckpointIO directly (fast); the run tests train on the tiny dataset: resume from a
checkpoint the writer thread wrote ends bit-identical, and SIGTERM with a write held open (the test-only pause hook
holds the writer between fsync and rename) exits only once every file is complete.
"""

from __future__ import annotations

import errno
import signal
import threading
from pathlib import Path

import pytest
import torch
from conftest import tiny_args, wait_for
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from test_faults import FOLD, load, log_of, pause_at, paused, spawn, temporaries

from resenc_lightning import background_io
from resenc_lightning.atomic import TMP_MARKER, CheckpointWriteError
from resenc_lightning.background_io import BackgroundCheckpointIO, HostSnapshot
from resenc_lightning.background_io import background_io as io_of
from resenc_lightning.cli import build_cli

NNUNET_KEYS = {"network_weights", "optimizer_state", "grad_scaler_state", "logging", "_best_ema", "current_epoch",
               "init_args", "trainer_name", "inference_allowed_mirroring_axes"}


def state(n: int = 1000) -> dict:
    """A Lightning-like checkpoint: weights and momentum sharing nothing, plus a callback state."""
    w = torch.randn(n)
    return {"epoch": 0, "global_step": 4, "state_dict": {"network.w": w},
            "optimizer_states": [{"state": {0: {"momentum_buffer": torch.randn(n)}}}], "callbacks": {"cb": 0}}


def counting_saves(monkeypatch) -> list[tuple[str, str]]:
    """Record (file name, thread name) of every serialisation the writer does."""
    calls: list[tuple[str, str]] = []
    real = background_io.atomic_save

    def save(obj, path, *args):
        calls.append((Path(path).name, threading.current_thread().name))
        real(obj, path, *args)

    monkeypatch.setattr(background_io, "atomic_save", save)
    return calls


def test_one_boundary_is_serialised_once_and_the_other_files_are_copies_of_it(tmp_path, monkeypatch):
    calls = counting_saves(monkeypatch)
    io = BackgroundCheckpointIO()
    ckpt = state()
    io.save_checkpoint(ckpt, tmp_path / "last.ckpt")
    ckpt["callbacks"] = {"cb": 1}  # the next ModelCheckpoint updated its state before saving
    io.save_checkpoint(ckpt, tmp_path / "best.ckpt")
    nnunet = {"network_weights": {"w": ckpt["state_dict"]["network.w"]}, "current_epoch": 1}
    io.save_derived(nnunet, tmp_path / "checkpoint_best.pth", key=(0, 4))
    assert io.peak_snapshot_bytes == 2 * 1000 * 4  # weights + momentum once: the nnU-Net dict reused the copy
    expected = ckpt["state_dict"]["network.w"].clone()
    io.flush()
    ckpt["state_dict"]["network.w"].add_(1)  # training goes on while the writer writes: it wrote the snapshot
    io.teardown()
    assert [name for name, _ in calls] == ["last.ckpt"]  # one serialisation for the three files
    assert all(thread != threading.main_thread().name for _, thread in calls)
    last, best, exported = tmp_path / "last.ckpt", tmp_path / "best.ckpt", tmp_path / "checkpoint_best.pth"
    assert last.read_bytes() == best.read_bytes() == exported.read_bytes()  # one serialisation, three files
    assert last.stat().st_size < 2 * 1000 * 4 + 4000  # each tensor stored once although two formats refer to it
    assert len({p.stat().st_ino for p in (last, best, exported)}) == 3  # independent: `cp x last.ckpt` spares best
    written = torch.load(exported, weights_only=True)  # plain data only: loads without Lightning
    assert written["callbacks"] == {"cb": 1} and torch.equal(written["state_dict"]["network.w"], expected)
    assert written["current_epoch"] == 1 and torch.equal(written["network_weights"]["w"], expected)
    assert not [p for p in tmp_path.iterdir() if TMP_MARKER in p.name]


def test_a_new_boundary_waits_for_the_previous_write_and_replaces_only_its_own_names(tmp_path):
    io = BackgroundCheckpointIO()
    first = state()
    io.save_checkpoint(first, tmp_path / "last.ckpt")
    io.save_checkpoint(first, tmp_path / "best.ckpt")
    second = {**state(), "epoch": 1, "global_step": 8}
    io.save_checkpoint(second, tmp_path / "last.ckpt")  # new boundary: epoch 0's batch is submitted first
    io.teardown()
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 1
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["epoch"] == 0


def test_disk_full_in_the_writer_surfaces_once_at_the_next_boundary_and_keeps_the_previous_file(tmp_path,
                                                                                                monkeypatch):
    io = BackgroundCheckpointIO()
    io.save_checkpoint(state(), tmp_path / "last.ckpt")
    io.wait()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("resenc_lightning.atomic.torch.save", disk_full)
    io.save_checkpoint({**state(), "epoch": 1, "global_step": 8}, tmp_path / "last.ckpt")
    io.flush()  # the write runs (and fails) on the writer thread; the training thread goes on
    with pytest.raises(CheckpointWriteError) as e:
        io.wait()  # the next boundary
    message = str(e.value)
    assert "\n" not in message and "the disk is full; the previous last.ckpt is intact" in message
    io.wait()  # reported once
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 0
    assert not [p for p in tmp_path.iterdir() if TMP_MARKER in p.name]
    io.teardown()


def test_the_cuda_snapshot_goes_to_pinned_host_memory_with_one_synchronisation(monkeypatch):
    """No GPU here: the device calls are replaced, the snapshot's logic (pinned target, non-blocking copy, one sync
    per snapshot, no device-side clone) is what runs."""
    allocated, synced, cloned = [], [], []
    monkeypatch.setattr(background_io, "on_host", lambda t: False)
    monkeypatch.setattr(background_io, "pinned_empty", lambda t: allocated.append(t.shape) or torch.empty_like(t))
    monkeypatch.setattr(background_io, "synchronize", lambda device: synced.append(device))
    real_clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda self, *a, **k: cloned.append(1) or real_clone(self, *a, **k))
    ckpt = state(10)
    snap = HostSnapshot()
    out = snap(ckpt)
    assert allocated == [torch.Size([10]), torch.Size([10])] and len(synced) == 1 and cloned == []
    assert torch.equal(out["state_dict"]["network.w"], ckpt["state_dict"]["network.w"])
    snap({"again": ckpt["state_dict"]["network.w"]})  # same tensor, same version: the copy is reused
    assert len(allocated) == 2 and snap.nbytes == 2 * 10 * 4
    ckpt["state_dict"]["network.w"].add_(1)  # a training step later, the next boundary: the written buffers serve
    nxt = HostSnapshot(snap.buffers())(ckpt)
    assert len(allocated) == 2 and len(synced) == 2
    assert torch.equal(nxt["state_dict"]["network.w"], ckpt["state_dict"]["network.w"])


QUIET = ("--final_validation", "false", "--nnunet_export.plot_progress", "false", "--model.num_epochs", "3",
         "--seed", "5", "--deterministic", "true")


def test_resume_from_a_background_written_checkpoint_is_bit_identical(tiny_dataset, tmp_path, monkeypatch):
    calls = counting_saves(monkeypatch)

    folds = {}

    def fit(folder: str, epochs: int, *extra: str) -> dict:
        cli = build_cli(tiny_args(tmp_path / folder, *QUIET, *extra, epochs=epochs, iters=3, val_iters=1))
        assert io_of(cli.trainer) is not None
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resolve_ckpt_path())
        folds[folder] = cli.output_folder
        return torch.load(cli.checkpoint_dir / "last.ckpt", map_location="cpu", weights_only=True)

    reference = fit("a", 3)
    stopped = fit("b", 2)  # the run ends after epoch 1: last.ckpt of epoch 1 was written by the writer thread
    assert stopped["epoch"] == 1
    assert ("last.ckpt", threading.main_thread().name) not in calls and ("last.ckpt" in {n for n, _ in calls})
    # the best epoch's three files are one serialisation; nnU-Net's predictor loads it as its checkpoint_best.pth
    fold = folds["b"]
    assert (fold / "checkpoint_best.pth").read_bytes() == (fold / "checkpoints" / "best.ckpt").read_bytes()
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(fold.parent), use_folds=(0,), checkpoint_name="checkpoint_best.pth")
    exported = torch.load(fold / "checkpoint_best.pth", map_location="cpu", weights_only=True)
    assert NNUNET_KEYS <= set(exported) and exported["trainer_name"] == "nnUNetTrainer"
    for key, value in predictor.list_of_parameters[0].items():
        assert torch.equal(value, exported["network_weights"][key]), key
    resumed = fit("b", 3, "--resume", "true")
    assert resumed["global_step"] == reference["global_step"] == 9
    for key, value in reference["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for x, y in zip(reference["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])
    for key in ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice", "lrs"):
        assert reference["nnunet"]["logging"][key] == resumed["nnunet"]["logging"][key], key


def test_sigterm_with_a_write_pending_exits_only_once_every_file_is_complete(tiny_dataset, tmp_path):
    """The writer is held in last.ckpt's write (fsynced, not renamed) while training goes on; SIGTERM then: the
    process must wait for that write before it stops, and exit 143 with complete files and no temporaries."""
    marker = tmp_path / "paused"
    proc = spawn(tmp_path, epochs=4, iters=3, env=pause_at("write=last.ckpt", marker))
    assert paused(marker, proc), log_of(tmp_path)
    note = marker.read_text()
    assert "on thread" in note and "MainThread" not in note  # held on the writer thread; training goes on
    proc.send_signal(signal.SIGTERM)
    waiting = marker.with_name(marker.name + ".waiting")
    assert wait_for(waiting.exists, 240, proc), log_of(tmp_path)  # the training thread blocks on the held write
    assert proc.poll() is None and any(TMP_MARKER in p.name for p in temporaries(tmp_path))
    marker.with_name(marker.name + ".release").touch()
    assert proc.wait(240) == 128 + signal.SIGTERM, log_of(tmp_path)
    assert temporaries(tmp_path) == []
    last = load(tmp_path / FOLD / "checkpoints" / "last.ckpt")
    assert "Stopped by SIGTERM" in log_of(tmp_path)
    assert f"step {last['global_step']}" in log_of(tmp_path)  # the stop checkpoint is the one on disk
