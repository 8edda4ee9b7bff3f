"""The native-vs-ours benchmark stays runnable: its smoke mode is the real `--device cpu` run (same dataset builder,
planner patch and plans derivation), only with fewer steps, and prints the table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY_ID, TINY_PLANS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_vs_nnunet.py"


def test_benchmark_smoke_prints_both_sides_and_ratios(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--workdir", str(tmp_path / "work"), "--out", str(out)]
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
    """`--parity`: a pair starts both sides from one seed (identical initial weights, hashed by each child);
    Dice per class per side, the paired difference, and the per-epoch loss curves are printed and written."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--parity", "--smoke", "--pairs", "1", "--seed", "7", "--dataset", str(TINY_ID),
           "--plans", TINY_PLANS, "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| final-validation Dice"))
    assert "native nnU-Net" in header and "| ours |" in header and "ours − native (paired)" in header
    dice_rows = [line for line in lines if line.startswith("| ") and "(label " in line]
    assert len(dice_rows) == 2 and any(line.startswith("| foreground mean") for line in lines)
    for row in dice_rows:
        native, ours, diff = (c.strip() for c in row.split("|")[2:-2])
        assert all(float(c.split(" ± ")[0]) >= -1 for c in (native, ours, diff)), row
    assert "identical initial weights (sha256 of the network state right after init" in proc.stdout
    assert "in 1/1 pairs" in proc.stdout
    curves = [line for line in lines if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(curves) == 2 and all(line.count(" ± ") == 6 for line in curves), curves
    records = [json.loads(line) for line in (out / "parity.jsonl").read_text().splitlines()]
    native, ours = (next(r for r in records if r["side"] == s) for s in ("native", "ours"))
    assert native["seed"] == ours["seed"] == 7 and native["init_hash"] == ours["init_hash"]
    assert len(native["curves"]["train_losses"]) == len(ours["curves"]["train_losses"]) == 2
    assert (out / "parity.md").read_text().startswith("| final-validation Dice")


def _parity_run(pair: int, side: str, fg: float) -> dict:
    return {"pair": pair, "seed": pair, "side": side, "init_hash": f"h{pair}", "dice": {"1": fg, "2": fg},
            "dice_fg_mean": fg, "curves": {"train_losses": [1.0, 0.5], "val_losses": [0.9, 0.4], "ema_fg_dice": [0.1, 0.2]},
            "device": "cpu", "plans": "p", "dataset": "D", "workdir": "/nonexistent", "epochs": 2, "iters": 1,
            "val_iters": 1, "threads": 1, "wall_s": 1.0}


def test_parity_table_verdict_separates_a_systematic_gap_from_chance(tmp_path):
    """Paired differences: a consistent gap beyond the paired t bound is called a GAP, noise of the same size is not."""
    spec = importlib.util.spec_from_file_location("benchmark_vs_nnunet", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    gap = [r for i, (n, o) in enumerate([(0.80, 0.70), (0.60, 0.49), (0.90, 0.81)])
           for r in (_parity_run(i, "native", n), _parity_run(i, "ours", o))]
    chance = [r for i, (n, o) in enumerate([(0.80, 0.70), (0.60, 0.71), (0.90, 0.81)])
              for r in (_parity_run(i, "native", n), _parity_run(i, "ours", o))]
    gap_row = next(line for line in bench.parity_table(gap, {"1": "a"}).splitlines() if line.startswith("| a "))
    chance_row = next(line for line in bench.parity_table(chance, {"1": "a"}).splitlines() if line.startswith("| a "))
    assert "-0.100 ± 0.010" in gap_row and "**GAP**" in gap_row, gap_row
    assert "within spread" in chance_row, chance_row
    assert "identical initial weights" in bench.parity_table(gap, {}) and "in 3/3 pairs" in bench.parity_table(gap, {})
    # --tabulate: the same table from runs split over several invocations (pairs keyed by seed)
    parts = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    parts[0].write_text("".join(json.dumps(r) + "\n" for r in gap[:4]))
    parts[1].write_text("".join(json.dumps({**r, "pair": 0}) + "\n" for r in gap[4:]))
    text = bench.main(["--parity", "--tabulate", *map(str, parts), "--out", str(tmp_path / "out")])
    assert "**GAP**" in text and "in 3/3 pairs" in text and (tmp_path / "out" / "parity.md").is_file()
