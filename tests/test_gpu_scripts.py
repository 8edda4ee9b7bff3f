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
    short = _gpu_check(tmp_path, STEPS="datapipe arms", BUDGET_S="100")
    assert short.returncode == 0, short.stdout + short.stderr
    assert "data-pipeline benchmark skipped" in short.stdout and "STEPS=datapipe runs it alone" in short.stdout
    assert "datapipe: no result" in short.stdout
    # the arms, too, are not started when they could not end within BUDGET_S (the whole script stays under it)
    assert "stable-epoch arms skipped" in short.stdout and "DECISION: undecided" in short.stdout
    assert "preflight: " in short.stdout  # the early 'missing X' / ok line comes before any step


# -- issue 18, defect 10: the GPU script finishes on a fresh box -------------------------------------------------------
def test_preflight_names_each_missing_compile_piece_with_its_fix(tmp_path):
    """Without Triton, a C compiler (Triton's rule: $CC, else gcc, else clang) or Python.h, one 'missing X' line each,
    with the fix and the consequence (compile off); nothing when all are there."""
    pre = _load("gpu_preflight")
    (tmp_path / "inc").mkdir()
    lines = pre.compile_toolchain(env={}, which=lambda name: None, has_module=lambda name: False,
                                  include_dir=tmp_path / "inc")
    assert [line.split(":")[0] for line in lines] == ["missing triton", "missing C compiler (gcc or clang, or $CC)",
                                                     f"missing Python.h in {tmp_path / 'inc'}"], lines
    assert all(line.endswith(pre.COMPILE_OFF) for line in lines)
    (tmp_path / "inc" / "Python.h").write_text("")
    ok = pre.compile_toolchain(env={}, which=lambda name: f"/usr/bin/{name}" if name == "clang" else None,
                               has_module=lambda name: True, include_dir=tmp_path / "inc")
    assert ok == []
    cc = pre.compile_toolchain(env={"CC": "icx"}, which=lambda name: None if name == "icx" else f"/usr/bin/{name}",
                               has_module=lambda name: True, include_dir=tmp_path / "inc")
    assert len(cc) == 1 and cc[0].startswith("missing C compiler: CC=icx is not on PATH"), cc
    missing = pre.missing_packages({"monai", "torch"}, has_module=lambda name: name != "monai")
    assert len(missing) == 1 and missing[0].startswith("missing monai: pip package monai"), missing


def test_e2e_turns_compile_off_early_when_the_toolchain_is_missing(monkeypatch, capsys):
    """On CUDA the e2e preflight prints the 'missing X' line before any phase and runs the phases with compile off
    (nnUNet_compile=f, --model.compile false) instead of failing at the first compiled step."""
    e2e = _load("gpu_e2e")
    monkeypatch.setattr(e2e.gpu_preflight, "compile_toolchain", lambda: ["missing Python.h in /x; compile off"])
    monkeypatch.setattr(e2e.gpu_preflight, "missing_packages", lambda: [])
    monkeypatch.delenv("nnUNet_compile", raising=False)
    args = e2e.argparse.Namespace(cpu_dry_run=False, extra="--trainer.devices 1")
    rec = e2e.compile_preflight(args)
    assert rec["compile"] is False and rec["problems"] == ["missing Python.h in /x; compile off"]
    assert os.environ["nnUNet_compile"] == "f" and args.extra == "--trainer.devices 1 --model.compile false"
    assert "preflight: missing Python.h" in capsys.readouterr().out
    monkeypatch.setattr(e2e.gpu_preflight, "compile_toolchain", lambda: [])
    assert e2e.compile_preflight(e2e.argparse.Namespace(cpu_dry_run=False, extra=""))["compile"] is True


def test_e2e_budgets_cover_a_cold_compile_and_hand_slack_on():
    """The train phase's budget holds the measured start-up plus the cold-compile allowance (the old 150 s cap did
    not); a phase may use what the later phases' budgets leave; under MIN_PHASE_S it is not started."""
    e2e = _load("gpu_e2e")
    b = e2e.budget
    cuda = e2e.argparse.Namespace(cpu_dry_run=False, iters=5, val_iters=2)
    on, off = e2e.phase_budgets(cuda, compile_on=True), e2e.phase_budgets(cuda, compile_on=False)
    assert e2e.phase_budgets(e2e.argparse.Namespace(cpu_dry_run=True, iters=5, val_iters=2), True) is None
    assert list(on) == ["train", "resume", "validate_only", "predict"]
    assert on["train"] >= b.STARTUP_S + b.COLD_COMPILE_S + 2 * 7 * b.STEP_S > 150
    assert all(off[k] < on[k] for k in ("train", "resume", "validate_only")) and off["predict"] == on["predict"]
    assert b.e2e_total(5, 2, True) == b.PREPARE_S + sum(on.values())
    assert b.phase_cap("train", 10_000, on) == 10_000 - on["resume"] - on["validate_only"] - on["predict"]
    assert b.phase_cap("resume", on["resume"] - 30, on) == on["resume"] - 30
    assert b.phase_cap("predict", 10_000, on) == 10_000 and b.phase_cap("predict", 9.5, on) == 0
    assert b.phase_cap("train", 123.4, None) == 123


def test_e2e_later_phases_run_after_a_failed_one(tmp_path, monkeypatch):
    """A failed phase (the fresh-box case: resume exits 1) does not skip the later ones; a phase whose starting file
    is missing is skipped naming it; e2e.jsonl and e2e.md hold every phase with its wall time as it ends."""
    import sys

    e2e = _load("gpu_e2e")
    monkeypatch.setattr(e2e, "check", lambda *a: [])
    fold = tmp_path / "fold_0"
    (fold / "checkpoints").mkdir(parents=True)
    (fold / "checkpoints" / "last.ckpt").write_bytes(b"")
    (fold / "checkpoint_final.pth").write_bytes(b"")
    ok, bad = [sys.executable, "-c", "pass"], [sys.executable, "-c", "raise SystemExit(1)"]
    cmds = [("train", ok), ("resume", bad), ("validate_only", ok), ("predict", ok)]
    report = e2e.Report(tmp_path, e2e.time.time(), "test")
    assert e2e.run_phases(cmds, fold, tmp_path, [], e2e.time.time() + 600, None, report) is False
    recs = [e2e.json.loads(line) for line in (tmp_path / "e2e.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["status"]) for r in recs] == [("train", "ok"), ("resume", "FAILED"), ("validate_only", "ok"),
                                                         ("predict", "ok")]
    assert recs[1]["problems"] == ["exit 1"] and all("wall_s" in r for r in recs)
    assert "| resume | FAILED |" in (tmp_path / "e2e.md").read_text()
    (fold / "checkpoints" / "last.ckpt").unlink()
    report = e2e.Report(tmp_path, e2e.time.time(), "test")
    e2e.run_phases(cmds, fold, tmp_path, [], e2e.time.time() + 600, None, report)
    recs = [e2e.json.loads(line) for line in (tmp_path / "e2e.jsonl").read_text().splitlines()]
    assert [r["status"] for r in recs] == ["ok", "skipped", "skipped", "ok"]
    assert recs[1]["reason"] == "needs checkpoints/last.ckpt, not written"


def _bundle_pins() -> set[str]:
    text = (SCRIPTS / "make_gpu_bundle.sh").read_text()
    block = text[text.index("PKGS=(") + len("PKGS=("):text.index("\n)\n", text.index("PKGS=("))]
    return {line.split("#")[0].strip().split("==")[0] for line in block.splitlines() if line.split("#")[0].strip()}


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def test_bundle_and_box_image_cover_every_import_of_the_gpu_path():
    """Every third-party package that src/resenc_lightning, train.py or the GPU scripts import (lazy imports inside
    functions included: monai was one) is in make_gpu_bundle.sh's PKGS, the box image's list, or torch."""
    pre = _load("gpu_preflight")
    image = {line.strip().split("==")[0] for line in (SCRIPTS / "gpu_box_image.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    have = {_norm(n) for n in _bundle_pins() | image | {"torch", "torchvision"}}
    imported = pre.third_party_imports()
    assert {"monai", "nnunetv2", "jsonargparse", "lightning"} <= imported
    missing = sorted(n for n in imported if _norm(pre.DIST_NAMES.get(n, n)) not in have)
    assert not missing, f"not in gpu_bundle nor the box image: {missing}"


def test_install_ranges_keep_a_gpu_box_torch_and_ci_keeps_its_pair():
    """pyproject declares ranges (the box's torch 2.11 and Lightning 2.6.6 satisfy them, 2.9.* never), no
    torchvision (nothing imports it); CI's pair lives in constraints/ci.txt, used by the README's install command,
    which .ci/run runs verbatim."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = SCRIPTS.parent
    deps = {Requirement(d).name: Requirement(d).specifier
            for d in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert "torchvision" not in deps
    assert {v for v in ("2.4.1", "2.5.0", "2.9.1", "2.11.0", "2.14.1") if deps["torch"].contains(v)} == {
        "2.5.0", "2.11.0", "2.14.1"}
    assert deps["lightning"].contains("2.6.6") and deps["lightning"].contains("2.5.0")
    pins = (root / "constraints" / "ci.txt").read_text().split()
    assert "torch==2.14.1" in pins and "torchvision==0.29.1" in pins
    readme = (root / "README.md").read_text()
    install = readme[readme.index("```bash\n") + 8:].splitlines()[0].split("#")[0].strip()
    assert install == 'pip install -e ".[dev]" -c constraints/ci.txt'
    assert install in (root / ".ci" / "run").read_text().splitlines()


def test_final_validation_without_monai_skips_only_the_surface_summary(tmp_path, monkeypatch, capsys):
    """MONAI serves only the extra HD95/NSD file: without it one line says so and nothing fails (on the GPU box the
    resume phase exited 1 at this import after a finished training)."""
    import sys

    from resenc_lightning import validation

    monkeypatch.setitem(sys.modules, "monai", None)
    monkeypatch.setitem(sys.modules, "monai.metrics", None)
    assert validation.write_surface_summary(None, tmp_path) is None
    assert "summary_surface.json skipped: MONAI cannot be imported" in capsys.readouterr().out
    assert not (tmp_path / "summary_surface.json").exists()
