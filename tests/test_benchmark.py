"""The native-vs-ours benchmark stays runnable: its smoke mode is the real `--device cpu` run (same dataset builder,
planner patch and plans derivation), only with fewer steps, and prints the table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
