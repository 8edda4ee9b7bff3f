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



def test_benchmark_peaks_are_the_runs_maximum_although_epoch_timing_resets_them_per_epoch(monkeypatch):
    """EpochTiming resets the device's peak counters at each epoch start (per-epoch reserved_gb); the benchmark's
    ours-vs-native peak rows must still compare whole runs: the maximum of the per-epoch samples."""
    import torch

    spec = importlib.util.spec_from_file_location("benchmark_vs_nnunet", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    per_epoch = iter([(6 * 2**30, 9 * 2**30), (4 * 2**30, 5 * 2**30), (4 * 2**30, 5 * 2**30)])  # epoch 0 peaked
    current: list[tuple[int, int]] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: current[-1][0])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: current[-1][1])
    clock = bench.Clock(0.0, torch.device("cuda", 0))
    for _ in range(2):
        clock.train_epoch_start()
        current.append(next(per_epoch))
        clock.train_step_end()
        clock.train_step_end()
        clock.val_start()
        clock.val_step_end()
        clock.val_end()
    current.append(next(per_epoch))
    result = clock.result()
    assert (result["peak_alloc_gb"], result["peak_reserved_gb"]) == (6.0, 9.0)


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


DATA_PIPELINE = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_data_pipeline.py"


def test_data_pipeline_smoke_prints_both_paths_the_device_time_and_ratios(tiny_dataset, tmp_path):
    """`benchmark_data_pipeline.py --smoke --training-arms`: the CPU ms per batch of nnU-Net's pipeline (load+crop vs
    transforms) and of the device path's CPU part side by side, the device transforms' time, the `ratio` lines, and
    the training arms (nnU-Net's pipeline and ours with as many workers, nnU-Net's with more) rehearsed on CPU, as the
    GPU run prints them (there with 4, 4 and 12 workers)."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(DATA_PIPELINE), "--smoke", "--training-arms", "--dataset", str(TINY_ID), "--plans",
           TINY_PLANS, "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert rows["ms per batch"] == ["nnU-Net pipeline (CPU worker)", "device path"]
    load_nn, load_dev = (float(c) for c in rows["CPU: load + crop (per worker)"])
    transforms_nn = float(rows["CPU: transforms (per worker)"][0])
    total_nn, total_dev = (float(c) for c in rows["CPU total per batch (per worker)"])
    device_ms = float(rows["device: transforms (cpu)"][1])
    assert min(load_nn, load_dev, transforms_nn, device_ms) > 0 and total_dev == load_dev
    assert abs(total_nn - load_nn - transforms_nn) < 0.2  # nnU-Net's CPU total, split in two
    ratios = {line.split()[1]: float(line.split()[2]) for line in proc.stdout.splitlines() if line.startswith("ratio ")}
    assert abs(ratios["cpu_work_left_per_batch"] / (total_dev / total_nn) - 1) < 0.02, ratios  # table rounds to 0.1 ms
    assert ratios["transforms_device_vs_cpu"] > 0
    arms = [line for line in proc.stdout.splitlines() if line.startswith("| nnU-Net's pipeline") or line.startswith(
        "| ours, transforms on the device")]
    assert len(arms) == 3, arms
    for row in arms:  # workers, step ms (wall), step ms (EpochTiming), data wait, blocked on workers, samples/s
        workers, wall_ms, step_ms, wait, blocked, samples = (c.strip() for c in row.split("|")[2:-1])
        assert float(wall_ms) > 0 and float(step_ms) > 0 and float(samples) > 0, row
        assert wait.endswith("%") and blocked.endswith("%"), row
    assert "ratio step_device_w1_vs_nnunet_w2" in proc.stdout and "goal data_wait<=5% with 1 workers" in proc.stdout
    records = [json.loads(line) for line in (out / "data_pipeline.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["pipeline", "arm", "arm", "arm"]
    assert [(r["workers"], r["on_device"]) for r in records[1:]] == [(1, True), (2, False), (1, False)]
    assert all("error" not in r for r in records)


def test_train_compare_table_pairs_the_arms_by_seed(tmp_path):
    """--train-compare: Dice per arm (mean ± sd over seeds) and the paired on − off difference with a verdict;
    a seed with one arm missing (a failed run) is left out of the pairs; --tabulate joins runs split by seed."""
    spec = importlib.util.spec_from_file_location("benchmark_data_pipeline", DATA_PIPELINE)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def rec(seed, arm, fg):
        return {"seed": seed, "arm": arm, "dice": {"1": fg, "2": fg}, "dice_fg_mean": fg}

    records = [rec(0, "off", 0.80), rec(0, "on", 0.82), rec(1, "on", 0.70), rec(1, "off", 0.71),
               rec(2, "off", 0.60), rec(2, "on", 0.61), rec(3, "off", 0.5), {"seed": 3, "arm": "on", "error": "exit 1"}]
    text = bench.compare_table(records, {"1": "sphere", "2": "ellipsoid"})
    row = next(line for line in text.splitlines() if line.startswith("| foreground mean"))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert cells[0] == "0.703 ± 0.100" and cells[1] == "0.710 ± 0.105" and cells[2] == "0.007 ± 0.015", cells
    assert "within spread" in cells[3]
    assert "| sphere (label 1) |" in text and "3 seeds (0, 1, 2)" in text and "0.800/0.820" in text
    parts = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    parts[0].write_text("".join(json.dumps(r) + "\n" for r in records[:4]))
    parts[1].write_text("".join(json.dumps(r) + "\n" for r in records[4:]))
    joined = bench.main(["--train-compare", "--tabulate", *map(str, parts), "--out", str(tmp_path / "out")])
    assert joined.startswith(text) and (tmp_path / "out" / "train_compare.md").is_file()
