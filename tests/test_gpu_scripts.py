"""The GPU evidence scripts: the decision rule for CudnnPinning's default is printed from the measured ratios."""

from __future__ import annotations

import importlib.util
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
