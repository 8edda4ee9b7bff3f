"""Real processes, real signals: kill -9 at random moments (steps, validation, checkpoint writes) and SIGTERM.

Every run is `python train.py` on the tiny dataset, deterministic (--seed, --deterministic, in-process
augmentation, one thread), so an interrupted-and-resumed run must end bit-identical to an uninterrupted one.
Kills and signals land at events, never after a sleep: the test-only pause hook (`fault_hooks.py`) stops the
process at a chosen step, validation or write and waits there, so a fast machine cannot finish first. Checkpoint
writes run on a background thread (background_io.py): a `write=` pause holds that thread, and the kill lands while
training goes on, or once the training thread waits for the held write at its next boundary.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import tiny_args, wait_for

import resenc_lightning
from resenc_lightning.atomic import TMP_MARKER
from resenc_lightning.cli import main
from resenc_lightning.fault_hooks import PAUSE_ENV
from resenc_lightning.resume import choose_resume_checkpoint

REPO = Path(__file__).resolve().parents[1]
FOLD = Path("Dataset555_Tiny") / "nnUNetTrainer_Lightning__nnUNetResEncUNetLPlans_tiny__3d_fullres" / "fold_0"
QUIET = ("--final_validation", "false", "--nnunet_export.plot_progress", "false", "--save_every", "2")


def run_args(results: Path, *extra: str, epochs: int, iters: int) -> list[str]:
    return tiny_args(results, "--seed", "7", "--deterministic", "true", "--model.num_epochs", str(epochs), *QUIET,
                     *extra, epochs=epochs, iters=iters, val_iters=1)


def spawn(results: Path, *extra: str, epochs: int, iters: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    results.mkdir(parents=True, exist_ok=True)
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_n_proc_DA": "0",
               "PYTHONPATH": os.pathsep.join([str(Path(resenc_lightning.__file__).parents[1]),
                                              os.environ.get("PYTHONPATH", "")]), **(env or {})}
    log = open(results / "train.log", "ab")
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *run_args(results, *extra, epochs=epochs,
                                                                                 iters=iters)],
                            env=environ, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def log_of(results: Path) -> str:
    return (results / "train.log").read_text(errors="replace")[-3000:]


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # state, ppid, ...


def descendants(pid: int) -> set[int]:
    parents = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and (stat := _stat(int(p.name))) is not None:
            parents[int(p.name)] = int(stat[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if (stat := _stat(pid)) is not None and stat[0] != "Z"}


def pause_at(event: str, marker: Path) -> dict[str, str]:
    """Environment for the test-only pause hook: stop at `event` (step=N, val=E, write=NAME) and wait."""
    marker.unlink(missing_ok=True)
    marker.with_name(marker.name + ".waiting").unlink(missing_ok=True)
    return {PAUSE_ENV: f"{event}@{marker}"}


def paused(marker: Path, proc: subprocess.Popen) -> bool:
    """Wait (event-driven: the file appears when the process is held) until the process is paused at its event."""
    return wait_for(marker.exists, 240, proc)


def temporaries(results: Path) -> list[Path]:
    return [p for p in results.rglob("*") if TMP_MARKER in p.name]


def mtime(path: Path) -> float:
    return path.stat().st_mtime_ns if path.exists() else 0


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_training(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    mom_a = [s["momentum_buffer"] for s in a["optimizer_states"][0]["state"].values()]
    mom_b = [s["momentum_buffer"] for s in b["optimizer_states"][0]["state"].values()]
    assert len(mom_a) == len(mom_b) and all(torch.equal(x, y) for x, y in zip(mom_a, mom_b))
    for key in ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice", "lrs"):
        assert a["nnunet"]["logging"][key] == b["nnunet"]["logging"][key], key


def test_kill_9_at_random_moments_then_resume_matches_an_uninterrupted_run(tiny_dataset, tmp_path):
    epochs, iters = 6, 4
    total = epochs * iters
    reference = spawn(tmp_path / "reference", epochs=epochs, iters=iters)  # runs alongside the trials
    results = tmp_path / "killed"
    ckpts = results / FOLD / "checkpoints"
    marker = tmp_path / "paused"
    rng = random.Random(0)
    modes = ["checkpoint_write", "step", "random", "step", "checkpoint_write_waited", "step"]
    kills = []
    for mode in modes:
        resumed = choose_resume_checkpoint(ckpts, "last.ckpt")[0].global_step if any(ckpts.glob("*.ckpt")) else 0
        resume = ("--resume", "true") if resumed else ()
        if mode.startswith("checkpoint_write"):  # while last.ckpt's temporary file is written, not yet renamed
            event = "write=last.ckpt"
        elif mode == "step":  # during the epoch after this process's first checkpoint
            event = f"step={min(total, resumed + iters + rng.randint(1, iters))}"
        else:  # random: any step or validation ahead of the resume point
            event = rng.choice([f"step={rng.randint(resumed + 1, total)}",
                                f"val={rng.randint(resumed // iters, epochs - 1)}"])
        proc = spawn(results, *resume, epochs=epochs, iters=iters, env=pause_at(event, marker))
        hit = paused(marker, proc)
        if event.startswith("write"):  # the writer thread is held there; the training thread goes on without it
            note = marker.read_text()
            hit = hit and "on thread" in note and "MainThread" not in note
        if mode == "checkpoint_write_waited":  # kill once the training thread, at its next boundary, waits for it
            hit = hit and wait_for(marker.with_name(marker.name + ".waiting").exists, 240, proc)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            kills.append((event, hit, sorted(p.name for p in temporaries(results))))
        assert proc.returncode == -signal.SIGKILL, log_of(results)
    assert len(kills) == len(modes) and all(hit for _, hit, _ in kills), kills
    assert all(tmp for event, _, tmp in kills if event.startswith("write")), kills  # each write was really cut
    final = spawn(results, "--resume", "true", epochs=epochs, iters=iters)
    assert final.wait(600) == 0, log_of(results)
    assert reference.wait(600) == 0, log_of(tmp_path / "reference")
    full_log = (results / "train.log").read_text(errors="replace")
    left = [name for _, _, tmp in kills for name in tmp]
    assert all(f"/{name}, left by an interrupted write" in full_log for name in left), left  # cleaned at next start
    assert_same_training(load(tmp_path / "reference" / FOLD / "checkpoints" / "last.ckpt"), load(ckpts / "last.ckpt"))
    assert temporaries(results) == []
    assert (results / FOLD / "checkpoint_final.pth").is_file()
    print(f"kill -9 trials: {kills}")


def test_kill_9_leaves_no_augmentation_workers(tiny_dataset, tmp_path):
    iters = 5
    marker = tmp_path / "paused"
    proc = spawn(tmp_path, epochs=2, iters=iters, env={"nnUNet_n_proc_DA": "2", **pause_at(f"step={iters + 2}", marker)})
    assert paused(marker, proc), log_of(tmp_path)  # held in epoch 1, after last.ckpt of epoch 0
    assert (tmp_path / FOLD / "checkpoints" / "last.ckpt").exists()
    workers = descendants(proc.pid)
    assert len(workers) >= 2, "expected augmentation worker processes"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert wait_for(lambda: not alive(workers), 20), f"orphaned augmentation workers: {alive(workers)}"


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_sigterm_saves_the_current_step_stops_workers_and_resume_finishes_the_epoch(tiny_dataset, tmp_path, signum):
    epochs, iters, stop_at = 2, 6, 9  # a step in epoch 1's middle
    marker = tmp_path / "paused"
    proc = spawn(tmp_path, epochs=epochs, iters=iters, env={"nnUNet_n_proc_DA": "2", **pause_at(f"step={stop_at}", marker)})
    last = tmp_path / FOLD / "checkpoints" / "last.ckpt"
    assert paused(marker, proc), log_of(tmp_path)
    workers = descendants(proc.pid)
    assert workers, "expected augmentation worker processes"
    proc.send_signal(signum)  # ends the pause: the step finishes, the loop stops
    assert proc.wait(120) == 128 + signum, log_of(tmp_path)
    assert not alive(workers), "augmentation workers outlived a clean stop"
    ckpt = load(last)
    step = ckpt["global_step"]
    assert ckpt["epoch"] == 1 and step == stop_at, (step, log_of(tmp_path))
    progress = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"]
    assert progress == step - iters  # a mid-epoch checkpoint at exactly the step that finished
    assert f"Stopped by SIGTERM at epoch 1, step {step}" in log_of(tmp_path)
    assert temporaries(tmp_path) == []
    # resume (in this process): Lightning restores the batch progress, the epoch runs only its remaining batches
    main(run_args(tmp_path, "--resume", "true", epochs=epochs, iters=iters))
    done = load(last)
    assert done["epoch"] == 1 and done["global_step"] == epochs * iters
    assert len(done["nnunet"]["logging"]["train_losses"]) == epochs


def test_the_pause_hook_holds_the_run_at_its_step_until_released(tiny_dataset, tmp_path, monkeypatch):
    """What the tests above rely on: at its event the process waits for the test, so no machine is too fast."""
    marker = tmp_path / "paused"
    monkeypatch.setenv(PAUSE_ENV, f"step=3@{marker}")
    ckpts = tmp_path / FOLD / "checkpoints"
    seen = {}

    def test_side() -> None:
        wait_for(marker.exists, 240)
        seen.update(note=marker.read_text(), left=marker.with_name("paused.left").exists(),
                    checkpoints=sorted(p.name for p in ckpts.glob("*.ckpt")))
        marker.with_name("paused.release").touch()

    thread = threading.Thread(target=test_side)
    thread.start()
    main(run_args(tmp_path, epochs=2, iters=4))  # in this thread; returns only after the release
    thread.join()
    assert seen == {"note": "epoch 0 step 3", "left": False, "checkpoints": []}
    assert marker.with_name("paused.left").read_text() == "epoch 0 step 3"
    assert load(ckpts / "last.ckpt")["global_step"] == 8
