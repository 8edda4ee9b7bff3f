"""Final validation: nnU-Net's summary.json (its own predictor/export/metrics) and our summary_surface.json."""

from __future__ import annotations

import json

from conftest import tiny_args

from resenc_lightning.cli import main


def test_final_validation_writes_nnunet_summary_and_surface_metrics(tiny_dataset, results_dir, capsys):
    out = main(tiny_args(results_dir, epochs=2, iters=3, val_iters=1))
    summary = json.loads((out / "validation" / "summary.json").read_text())
    assert set(summary) >= {"metric_per_case", "mean", "foreground_mean"}
    n_val = len(summary["metric_per_case"])
    assert n_val == 2  # fold 0 of 8 cases
    assert set(summary["mean"]) == {"1", "2"} and 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0
    surface = json.loads((out / "validation" / "summary_surface.json").read_text())
    assert len(surface["metric_per_case"]) == n_val and set(surface["mean"]) == {"1", "2"}
    for case in surface["metric_per_case"]:
        for metrics in case["metrics"].values():
            assert metrics["NSD"] is None or 0.0 <= metrics["NSD"] <= 1.0
    printed = capsys.readouterr().out
    assert "Final validation of the trained network: foreground mean Dice" in printed

    # --validate_only from the checkpoint gives the same summary (nnU-Net's --val)
    (out / "validation" / "summary.json").unlink()
    main(tiny_args(results_dir, "--validate_only", "true", epochs=2, iters=3, val_iters=1))
    again = json.loads((out / "validation" / "summary.json").read_text())
    assert again["foreground_mean"] == summary["foreground_mean"]
    main(tiny_args(results_dir, "--validate_only", "true", "--val_best", "true", epochs=2, iters=3, val_iters=1))
    assert (out / "validation" / "summary.json").is_file()
