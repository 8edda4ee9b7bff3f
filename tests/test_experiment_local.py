"""experiment.py on a workstation: submitit's LocalExecutor, 2 concurrent CPU jobs, --stage_to, model selection,
status, and a rerun that starts nothing for finished folds."""

from __future__ import annotations

import re

import pytest
from experiment_helpers import experiment, fold_folder, tiny_train

from resenc_lightning.experiment_config import parse
from resenc_lightning.experiment_scheduler import read_pointer


def test_two_cpu_jobs_run_concurrently_from_a_staged_copy_and_end_in_model_selection(tiny_dataset, tmp_path):
    results, staged = tmp_path / "results", tmp_path / "node_local"
    out = experiment(results, "--folds", "0", "1", "--jobs", "2", "--stage_to", str(staged), train=tiny_train())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    started = [i for i, line in enumerate(lines) if line.endswith("CPU).") and ": started (pid" in line]
    ended = [i for i, line in enumerate(lines) if line.endswith(": done.")]
    assert len(started) == 2 and len(ended) == 2 and max(started) < min(ended), out.stdout  # both ran at once
    assert "nnUNetv2_predict -d Dataset555_Tiny" in out.stdout and "-f  0 1" in out.stdout, out.stdout

    # each job trained from the copy; the jobs share it: whichever staged second copied nothing
    copied = sorted(int(re.search(r": (\d+) file\(s\) copied; training from the copy", open(
        read_pointer(fold_folder(results, f)).log).read()).group(1)) for f in (0, 1))
    assert copied[0] == 0 and copied[1] > 0, copied
    copy = staged / tiny_dataset.name
    source_files = {p.relative_to(tiny_dataset) for p in tiny_dataset.rglob("*") if p.is_file()}
    assert source_files <= {p.relative_to(copy) for p in copy.rglob("*") if p.is_file()}
    assert (copy / "splits_final.json").is_file()  # nnU-Net's split, written where the training reads its data

    rows = experiment(results, "status", "--folds", "0", "1").stdout.splitlines()
    assert rows[0].split()[:3] == ["configuration", "fold", "state"]
    assert [r.split()[2] for r in rows[1:]] == ["done", "done"], rows
    assert all(r.split()[4] == "1/1" and r.endswith("_0_log.out") for r in rows[1:]), rows

    again = experiment(results, "--folds", "0", "1", "--jobs", "2", "--find_best", "false", train=tiny_train())
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("done, skipped.") == 2 and "started" not in again.stdout, again.stdout


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "555", "--gpus", "0,x"], "error: --gpus 0,x: expected GPU indices such as 0,1,2,3."),
])
def test_bad_options_stop_with_one_line(argv, message):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert str(e.value.code) == message
