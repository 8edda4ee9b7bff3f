"""The native-vs-ours benchmark stays runnable: its smoke mode on the session's tiny dataset prints the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY_ID, TINY_PLANS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_vs_nnunet.py"


def test_benchmark_smoke_prints_both_sides_and_ratios(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--dataset", str(TINY_ID), "--plans", TINY_PLANS,
           "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| figure"))
    assert "native nnU-Net" in header and "| ours |" in header and "ours/native" in header
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| figure")}
    for figure in ("train step incl. data (ms, median)", "validation step (ms)", "start-up to 1st step done (s)",
                   "peak RSS, main process (MB)"):
        native, ours, ratio = rows[figure]
        assert float(native) > 0 and float(ours) > 0 and float(ratio) > 0, (figure, rows[figure])
    assert (out / "benchmark.md").is_file() and len((out / "benchmark.jsonl").read_text().splitlines()) == 2


def test_parity_smoke_pairs_identical_initial_weights_and_reports_paired_differences(tiny_dataset, tmp_path):
    """`--parity`: each pair starts both sides from one seed (same initial weights); Dice per class per side,
    the paired difference and its verdict, and the per-epoch loss curves are printed and written."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--parity", "--smoke", "--pairs", "2", "--dataset", str(TINY_ID),
           "--plans", TINY_PLANS, "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| final-validation Dice"))
    assert "native nnU-Net" in header and "| ours |" in header and "ours − native (paired)" in header
    dice_rows = [line for line in lines if line.startswith("| ") and "(label " in line]
    assert len(dice_rows) == 2 and any(line.startswith("| foreground mean") for line in lines)
    for row in dice_rows:
        native, ours, diff, verdict = (c.strip() for c in row.split("|")[2:-1])
        assert all(" ± " in c for c in (native, ours, diff)) and ("spread" in verdict or "GAP" in verdict), row
    assert "identical initial weights (sha256 of the network state right after init" in proc.stdout
    assert "in 2/2 pairs" in proc.stdout
    curves = [line for line in lines if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(curves) == 2 and all(line.count(" ± ") == 6 for line in curves), curves
    records = [json.loads(line) for line in (out / "parity.jsonl").read_text().splitlines()]
    assert sorted((r["pair"], r["side"]) for r in records) == [(0, "native"), (0, "ours"), (1, "native"), (1, "ours")]
    for pair in (0, 1):
        native, ours = (next(r for r in records if r["pair"] == pair and r["side"] == s) for s in ("native", "ours"))
        assert native["seed"] == ours["seed"] == pair and native["init_hash"] == ours["init_hash"]
        assert len(native["curves"]["train_losses"]) == len(ours["curves"]["train_losses"]) == 2
    assert (out / "parity.md").read_text().startswith("| final-validation Dice")
