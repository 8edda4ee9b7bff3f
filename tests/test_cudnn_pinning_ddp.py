"""CudnnPinning under DDP (gloo, CPU): warm-up decisions are agreed across ranks, and the first compile of the
network happens inside DDP.forward, so DDPOptimizer splits it at bucket boundaries as in a run without warm-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from callback_helpers import PIN_ON_CPU
from conftest import tiny_args

REPO = Path(__file__).resolve().parents[1]


def run_train(results_dir: Path, probe: str, probe_args: dict, *extra: str, devices: int, timeout: float,
              **kw) -> tuple[int | None, str]:
    """`python train.py` on `devices` gloo ranks with a test probe from warmup_probe.py. Returns (exit code or None
    when it hung past `timeout`, output tail). A hung run's whole process group (rank 0 and its children) is killed."""
    callback = json.dumps({"class_path": f"warmup_probe.{probe}", "init_args": probe_args})
    args = tiny_args(results_dir, "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
                     "--trainer.strategy", "ddp", f"--trainer.callbacks+={callback}", "--final_validation", "false",
                     "--nnunet_export.plot_progress", "false", *extra, **kw)
    env = {**os.environ, "nnUNet_def_n_proc": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    start = time.time()
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        code = None
    print(f"train.py on {devices} rank(s) took {time.time() - start:.1f}s, exit {code}\n{out[-3000:]}")
    return code, out[-3000:]


def read_ranks(probe_dir: Path, n: int) -> list[dict]:
    return [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in range(n)]


def test_ranks_agree_on_the_warm_up_retry(tiny_dataset, results_dir, tmp_path):
    """2d: batch Dice, so every warm-up step all-gathers (and DDP all-reduces the gradients). A resumed run where only
    rank 1 measures a slow warm-up: all ranks retry together and the run completes."""
    code, out = run_train(results_dir, "SlowRankProbe", {"out_dir": str(tmp_path / "probe")}, "--configuration", "2d",
                          *PIN_ON_CPU, devices=2, timeout=180, epochs=1, iters=2, val_iters=1)
    assert code == 0, f"the DDP run {'hung' if code is None else f'exited {code}'}:\n{out}"
    ranks = read_ranks(tmp_path / "probe", 2)
    assert [r["rank"] for r in ranks] == [0, 1]
    steps = 3  # CudnnPinning's default warmup_steps; max_retries 2
    assert [(r["warm_ups"], r["warm_up_train_forwards"], r["retries"]) for r in ranks] == [(3, 3 * steps, 2)] * 2


def test_first_compile_happens_inside_ddp_forward(tiny_dataset, results_dir, tmp_path):
    """Compile on, one gloo rank: the warm-up's first call of the network goes through DDP.forward, so DDPOptimizer
    compiles it and splits it at the (small) bucket boundaries, as when the first call is a training step."""
    code, out = run_train(results_dir, "DDPSplitProbe", {"out_dir": str(tmp_path / "probe")}, "--model.compile", "true",
                          *PIN_ON_CPU, devices=1, timeout=500, epochs=1, iters=1, val_iters=1)
    assert code == 0, out
    buckets = read_ranks(tmp_path / "probe", 1)[0]["ddp_optimizer_buckets"]
    assert buckets and max(buckets) > 1, f"no graph split by DDPOptimizer (buckets per compiled graph: {buckets})"
