"""epoch_times.png: written in the fold folder every epoch; its history survives --resume, which adds a marker."""

from __future__ import annotations

import torch
from callback_helpers import SCHEDULE, fit, load_ckpt, the
from conftest import tiny_args

from resenc_lightning import epoch_plot
from resenc_lightning.callbacks.epoch_timing import EpochTiming


def _resume_lines(fig) -> list[float]:
    """x of the dashed resume lines in the step-time panel (one per resume)."""
    ax_step = fig.axes[1]
    return [line.get_xdata()[0] for line in ax_step.get_lines() if line.get_linestyle() == "--"]


def _draw(timing: EpochTiming):
    return epoch_plot.draw(epochs=timing.epochs, reference=timing.reference, tolerance=timing.tolerance,
                           resumes=timing.resumes, drifts=timing.drifts, reference_resumed=timing.reference_resumed)


def test_epoch_times_png_every_epoch_and_a_resume_adds_a_marker_and_the_drift_cause(tiny_dataset, results_dir):
    cli = fit(tiny_args(results_dir, *SCHEDULE, epochs=2, iters=3, val_iters=1))
    png = cli.output_folder / "epoch_times.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (cli.output_folder / "progress.png").is_file()  # next to nnU-Net's own picture
    fresh = the(cli, EpochTiming)
    assert [int(e["epoch"]) for e in fresh.epochs] == [0, 1] and fresh.resumes == [] and fresh.drifts == []
    assert _resume_lines(_draw(fresh)) == []
    first_png = png.read_bytes()

    # a resumed run against a reference 1000x faster: a resume marker and a drift warning with its cause
    last = cli.checkpoint_dir / "last.ckpt"
    ckpt = load_ckpt(last)
    state = ckpt["callbacks"]["EpochTiming"]
    assert state["resumes"] == [] and len(state["epochs"]) == 2
    state["reference"] = {**state["reference"], "step_median_s": state["reference"]["step_median_s"] / 1000,
                          "reserved_gb": 10.0}
    torch.save(ckpt, last)
    cli = fit(tiny_args(results_dir, *SCHEDULE, "--resume", "true", epochs=3, iters=3, val_iters=1))
    timing = the(cli, EpochTiming)
    assert [int(e["epoch"]) for e in timing.epochs] == [0, 1, 2]  # the fresh run's epochs are still there
    assert timing.resumes == [2]
    assert [d["epoch"] for d in timing.drifts] == [2]
    assert timing.drifts[0]["cause"].startswith("less GPU memory reserved (0.0 vs 10.0 GiB)")
    assert load_ckpt(last)["callbacks"]["EpochTiming"]["resumes"] == [2]
    assert png.read_bytes() != first_png
    fig = _draw(timing)
    assert _resume_lines(fig) == [1.5]  # between the last fresh epoch and the first resumed one
    texts = [" ".join(t.get_text().split()) for ax in fig.axes for t in ax.texts]  # unwrapped
    assert "resume at epoch 2" in texts
    assert any(t.startswith("epoch 2: median step +") and "Likely cause: less GPU memory reserved" in t for t in texts)

    # a second resume adds a second marker; the first one stays
    cli = fit(tiny_args(results_dir, *SCHEDULE, "--resume", "true", epochs=4, iters=3, val_iters=1))
    timing = the(cli, EpochTiming)
    assert timing.resumes == [2, 3] and _resume_lines(_draw(timing)) == [1.5, 2.5]


def test_epoch_times_png_can_be_switched_off(tiny_dataset, results_dir):
    cli = fit(tiny_args(results_dir, "--epoch_timing.plot", "false", epochs=1, iters=2, val_iters=1))
    assert not (cli.output_folder / "epoch_times.png").exists()
    assert len(the(cli, EpochTiming).epochs) == 1  # timing itself still runs


def test_a_mid_epoch_resume_times_its_partial_epoch_from_its_first_step(tiny_dataset, results_dir):
    """Lightning skips on_train_epoch_start when it resumes mid-epoch; the epoch clock then starts at the first
    step (it once ran from 0, i.e. the machine's uptime), and the record says how many steps the epoch had."""
    import os
    import signal
    import time

    import lightning.pytorch as pl
    import pytest

    from resenc_lightning.cli import build_cli
    from resenc_lightning.cli import fit as cli_fit

    class TermAtStep(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 4:  # epoch 1, one of its 3 steps done
                os.kill(os.getpid(), signal.SIGTERM)

    quiet = ("--final_validation", "false", "--nnunet_export.plot_progress", "false")
    cli = build_cli(tiny_args(results_dir, *SCHEDULE, *quiet, epochs=2, iters=3, val_iters=1))
    cli.trainer.callbacks.append(TermAtStep())
    with pytest.raises(SystemExit):
        cli_fit(cli, None)
    start = time.perf_counter()
    cli = fit(tiny_args(results_dir, *SCHEDULE, *quiet, "--resume", "true", epochs=2, iters=3, val_iters=1))
    elapsed = time.perf_counter() - start
    timing = the(cli, EpochTiming)
    assert timing.resumes == [1]
    assert [(int(e["epoch"]), int(e["steps"])) for e in timing.epochs] == [(0, 3), (1, 2)]
    assert 0 < timing.epochs[1]["epoch_s"] < elapsed
    fig = _draw(timing)
    assert any("partial epoch" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
