"""What runs inside each submitit job: one fold's training (our train CLI, in the job's process), and the final
model selection. Kept free of heavy imports at module level: submitit unpickles these functions in the job first,
and `--stage_to` must set $nnUNet_preprocessed before anything reads it.

Training runs in-process (not as a child) so that our flag-only stop handlers (stop_signals.py) own SIGTERM and
SIGUSR1 in the one process SLURM signals; see docs/DESIGN.md "Experiments: one preemption mechanism".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def train_fold(args: list[str], dataset_folder_name: str, stage_to: str | None = None,
               stage_clean: bool = False) -> str:
    """Train (or resume) one fold; returns its output folder. A stop signal's exit (128 + N: saved, requeued or
    resumable) propagates as such, so submitit records no result and the requeued job runs this again."""
    staged = None
    if stage_to:
        from resenc_lightning.experiment_stage import stage

        source = Path(os.environ["nnUNet_preprocessed"]) / dataset_folder_name
        root = Path(os.path.expandvars(stage_to))
        staged, copied = stage(source, root)
        os.environ["nnUNet_preprocessed"] = str(root)
        print(f"Staged {source} to {staged}: {copied} file(s) copied; training from the copy.", flush=True)
    from resenc_lightning.cli import main

    try:
        out = main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, flush=True)
        if code > 128:
            raise  # stopped by a signal, checkpoint written: the requeued / rerun job continues
        if code != 0:
            raise RuntimeError(f"train.py {' '.join(args)} exited with {code}") from None
        out = None
    finally:
        if staged is not None and stage_clean:
            from resenc_lightning.experiment_stage import unstage

            unstage(staged)
    return str(out)


def find_best(dataset: str, configurations: list[str], plans: str, trainer_name: str, folds: list[str],
              results: str) -> str:
    """nnUNetv2_find_best_configuration over the trained folds; returns the inference instructions it wrote."""
    exe = Path(sys.executable).with_name("nnUNetv2_find_best_configuration")
    cmd = [str(exe), dataset, "-c", *configurations, "-p", plans, "-tr", trainer_name, "-f", *folds,
           "-np", os.environ.get("nnUNet_def_n_proc", "2")]
    env = {**os.environ, "nnUNet_results": results}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print(done.stdout[-20000:], done.stderr[-20000:], sep="\n", flush=True)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"nnUNetv2_find_best_configuration failed ({last})")
    instructions = sorted(Path(results).glob("Dataset*/inference_instructions.txt"), key=os.path.getmtime)
    return instructions[-1].read_text() if instructions else done.stdout
