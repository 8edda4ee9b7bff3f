"""scripts/benchmark_checkpoint_io.py runs end to end (tiny state) and prints what the issue asks for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_checkpoint_io.py"


def test_checkpoint_benchmark_prints_the_table_the_ratio_bytes_and_snapshot_memory(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--epochs", "2", "--dir", str(tmp_path)],
                          capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in lines if line.startswith("| ") and not line.startswith("| per epoch")}
    improving = rows["ours, improving epoch (last + best + checkpoint_best.pth)"]
    assert float(improving[0]) > 0 and float(improving[1]) > 0
    plain = rows["ours, non-improving epoch (last)"]
    assert float(plain[0]) > 0
    # last, best and checkpoint_best.pth: one serialisation, the bytes of the last.ckpt-only epoch (plus a few keys;
    # the tiny state is 1 MiB, so zip and pickle overhead shows as ~15% of it)
    assert float(improving[2].split("×")[0]) < 1.1 * float(plain[2].split("×")[0]) < 1.5
    assert float(rows["before: synchronous, improving epoch"][0]) > 0
    assert float(rows["nnU-Net save_checkpoint (one write)"][0]) > 0
    ratio = next(line for line in lines if line.startswith("ratio ours improving epoch"))
    assert float(ratio.split("=")[1].split()[0]) > 0
    assert any(line.startswith("bytes serialised per improving epoch") for line in lines)
    snapshot = next(line for line in lines if line.startswith("peak host memory of the snapshot"))
    assert "(1.00× the state)" in snapshot
    assert list(tmp_path.iterdir()) == []  # its temporary folder is removed
