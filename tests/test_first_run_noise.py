"""A first run prints our lines, Lightning's progress and warnings about the run, nothing else.

`python train.py` as a user runs it (no warning options, no seed, Lightning's defaults as our CLI sets them), one
short epoch and nnU-Net's final validation on the tiny dataset, in a subprocess; every line of its output must match
the allow-list below. A new third-party line fails this test: silence it at its source (quiet.py, by message and
module) or, if it concerns the user's run, add it here with the reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import TINY_ID, TINY_PLANS

REPO = Path(__file__).resolve().parents[1]

ALLOWED = [re.compile(p) for p in (
    r"Seed set to 0",  # Lightning: the run's seed (ours, explicit: no "No seed found")
    r"GPU available: (True|False) \(\w+\), used: (True|False)|GPU available: (True|False), used: (True|False)",
    r"TPU available: (True|False), using: \d+ TPU cores",
    r"HPU available: (True|False), using: \d+ HPUs",
    # Lightning on a machine with SLURM's srun: the run is on a cluster node, so the hint concerns it
    r".*The `srun` command is available on your system but is not used\. HINT: .*",
    r"Network: ResidualEncoderUNet \(.*\), [\d.]+ M parameters \(.*\)\.",  # ours (instead of a FLOPs-less table)
    r"CudaMemoryCap: .*", r"CudnnPinning: .*", r"GpuMonitor: .*", r"EpochTiming: .*",
    # the same callbacks' warnings (a drift, another process on the GPU), printed with their source line
    r".*resenc_lightning/callbacks/\w+\.py:\d+: (CudaMemoryCap|CudnnPinning|GpuMonitor|EpochTiming): .*",
    r"nnU-Net export: .*",
    # ours, only when the last epoch's checkpoint writes (background_io.py) are still running at the end
    r"Waiting for the checkpoint writes to finish before training ends\.",
    r"Epoch \d+/\d+  train_loss .*",
    r"`Trainer\.fit` stopped: `max_epochs=\d+` reached\.",
    r"Validation complete", r"Mean Validation Dice: .*",  # nnU-Net's final validation, about the run
    r"Final validation of the trained network: .*",
    r"summary_surface\.json: class \S+ is absent from the prediction or the reference of .*",  # ours, about the run
    r"Output folder: .*",
    # resume: Lightning says where it restored from, which concerns the run
    r"Restoring states from the checkpoint path at .*last\.ckpt", r"Restored all states from the checkpoint at .*",
)]


def _noise(results: Path, *extra: str, epochs: int) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])})
    args = ["--plans", TINY_PLANS, "--dataset", str(TINY_ID), "--configuration", "3d_fullres", "--fold", "0",
            "--data.results_dir", str(results), "--data.num_iterations_per_epoch", "2",
            "--data.num_val_iterations_per_epoch", "1", "--trainer.max_epochs", str(epochs), *extra]
    run = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=900)
    lines = [line.rstrip() for line in run.stdout.splitlines() if line.strip()]
    assert run.returncode == 0, run.stdout[-3000:]
    assert any(line.startswith(f"Epoch {epochs - 1}/{epochs - 1}") for line in lines)
    assert lines[-1].startswith("Output folder: ")
    return [line for line in lines if not any(p.fullmatch(line) for p in ALLOWED)]


def test_a_first_run_and_its_resume_print_only_lines_about_the_run(tiny_dataset, tmp_path):
    noise = _noise(tmp_path / "results", epochs=1)
    assert noise == [], "\n".join(noise)
    noise = _noise(tmp_path / "results", "--resume", "--final_validation", "false", epochs=2)
    assert noise == [], "\n".join(noise)


def test_the_filters_match_one_message_from_one_module():
    """A silenced message from another module, or another message from the silenced module, still shows."""
    import warnings

    from resenc_lightning import quiet

    message = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.install()
        for module, text in (("lightning.pytorch.utilities._pytree", message), ("my_code", message),
                             ("lightning.pytorch.utilities._pytree", "something else is deprecated")):
            warnings.warn_explicit(text, FutureWarning, "x.py", 1, module=module)
    assert [str(w.message) for w in caught] == [message, "something else is deprecated"]
