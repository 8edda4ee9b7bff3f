"""The GPU evidence scripts: the decision rule for CudnnPinning's default is printed from the measured ratios."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _arms(on: tuple[float, float] | None, off: tuple[float, float] | None) -> list[dict]:
    rows = []
    for pair, times in (("ours_on", on), ("ours_off", off)):
        if times is not None:
            rows += [{"pair": pair, "phase": "fresh", "step_ms": times[0]},
                     {"pair": pair, "phase": "resume", "step_ms": times[1]}]
    return rows


@pytest.mark.parametrize(("on", "off", "expected"), [
    ((100.0, 141.0), (100.0, 98.5), "CudnnPinning OFF by default"),
    ((100.0, 101.0), (100.0, 98.5), "CudnnPinning stays ON by default"),
    ((100.0, 141.0), (100.0, 130.0), "undecided, callbacks off is not stable either"),
    ((100.0, 141.0), None, "undecided (ours_on"),
])
def test_decision_rule_for_cudnn_pinning_default(on, off, expected):
    line = _load("gpu_stable_epochs").decision(_arms(on, off))
    assert line.startswith("DECISION: ") and expected in line, line
    assert "> 1.02 while ours_off <= 1.02" in line


def test_e2e_checks_flag_compiled_wrapper_keys_and_missing_outputs(tmp_path):
    """gpu_e2e's per-phase checks fail a phase whose checkpoint holds the compiled network twice or whose
    outputs are missing (what the GPU run must catch, checked here on fabricated folders)."""
    import torch

    e2e = _load("gpu_e2e")
    fold = tmp_path / "fold_0"
    (fold / "checkpoints").mkdir(parents=True)
    weight = torch.zeros(2)
    torch.save({"state_dict": {"network.w": weight, "_forward_impl._orig_mod.w": weight}},
               fold / "checkpoints" / "last.ckpt")
    torch.save({"logging": {"train_losses": [1.0, 0.9]}}, fold / "checkpoint_final.pth")
    (fold / "progress.png").write_bytes(b"")
    problems = e2e.check("train", fold, tmp_path, [])
    assert len(problems) == 1 and "compiled-wrapper keys" in problems[0], problems
    torch.save({"state_dict": {"network.w": weight}}, fold / "checkpoints" / "last.ckpt")
    assert e2e.check("train", fold, tmp_path, []) == []
    resume = e2e.check("resume", fold, tmp_path, [])
    assert any("logs 2 epochs, expected 3" in p for p in resume) and any("summary.json" in p for p in resume)
    assert e2e.check("predict", fold, tmp_path, ["case_000"]) == [f"missing {tmp_path / 'predict_out' / 'case_000.nii.gz'}"]


def _gpu_check(tmp_path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "OUT": str(tmp_path / "out"), **env}
    return subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh")], capture_output=True, text=True, env=full,
                          timeout=120)


def test_gpu_check_steps_are_checked_before_any_runs_and_datapipe_yields_to_the_budget(tmp_path):
    """STEPS picks gpu_check.sh's steps: a wrong entry is refused, naming it, before a step starts; the data-pipeline
    step is skipped with the command that runs it alone when the budget leaves it too little time."""
    bad = _gpu_check(tmp_path, STEPS="datapipe arm")
    assert bad.returncode == 2 and "STEPS entry 'arm' is not one of arms, e2e, datapipe, extra" in bad.stderr
    assert "== [" not in bad.stdout
    short = _gpu_check(tmp_path, STEPS="datapipe", BUDGET_S="100")
    assert short.returncode == 0, short.stdout + short.stderr
    assert "data-pipeline benchmark skipped" in short.stdout and "STEPS=datapipe runs it alone" in short.stdout
    assert "datapipe: no result" in short.stdout and "DECISION" not in short.stdout
