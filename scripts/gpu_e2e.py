"""End to end through `train.py` as a user runs it, with every default: train -> resume -> validate -> predict.

On CUDA the defaults are compile on, 16-mixed + GradScaler, cudnn.benchmark and all stable-epoch callbacks; this
script passes none of those, only the data, the budget (steps per epoch) and the phase flags:

1. `train.py ... --trainer.max_epochs 2 --final_validation false`      (2 epochs)
2. `train.py ... --trainer.max_epochs 3 --resume true`                  (1 more, then nnU-Net's final validation)
3. `train.py ... --validate_only true`                                  (nnU-Net's --val from checkpoint_final)
4. `nnUNetv2_predict_from_modelfolder -i <2 raw cases> -o ... -m <model folder> -f 0 -chk checkpoint_final.pth`

Each phase is its own process bounded by `timeout`: on CUDA its budget from measured phase times plus named compile
allowances (gpu_e2e_budget.py), plus the slack earlier phases left; after each one the files a user would look for
are checked, and one line with its wall time and budget is appended to `<out>/e2e.jsonl` and the table `<out>/e2e.md`
rewritten (so a run cut short still reports what passed), the phase's log goes to `<out>/<phase>.log`. A failed
phase does not stop the later ones: each runs when the files it starts from exist. Before any phase, the preflight
(gpu_preflight.py) prints one "missing X" line per absent package, Triton, C compiler or Python.h; without the
compile toolchain every phase runs with compile off (nnUNet_compile=f) instead of failing at the first compiled
step. Exit status 0 only if every phase passed.

    python scripts/gpu_e2e.py --out results/e2e                    # CUDA (builds the data or reuses the arms')
    python scripts/gpu_e2e.py --cpu-dry-run --out /tmp/e2e         # the same on CPU, tiny plans (8-12 min, 2 busy cores)

`--cpu-dry-run` builds a tiny dataset (nnunetv2's planner and preprocessor, then a shrunk copy of the plans) and
runs the identical sequence on the CPU (where the defaults are compile off and 32-true; `--extra '--model.compile
true'` forces compile).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_e2e_budget as budget  # noqa: E402
import gpu_preflight  # noqa: E402

DATASET_ID = 988  # the stable-epoch script's synthetic dataset (gpu_stable_epochs.py builds it on the GPU machine)
DATASET_NAME = f"Dataset{DATASET_ID}_StableEpochs"
TRAINER = "nnUNetTrainer_Lightning"
PREDICT = ("import sys; from nnunetv2.inference.predict_from_raw_data import predict_entry_point_modelfolder as m; "
           "sys.argv[0] = 'nnUNetv2_predict_from_modelfolder'; sys.exit(m())")
#: the file (under the fold folder) each phase starts from; missing -> the phase is skipped, naming it
NEEDS = {"resume": "checkpoints/last.ckpt", "validate_only": "checkpoints/last.ckpt", "predict": "checkpoint_final.pth"}


def set_paths(workdir: Path) -> None:
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[var] = str(workdir / var)
        Path(os.environ[var]).mkdir(parents=True, exist_ok=True)


def prepare_cuda(plans: str) -> str:
    """gpu_stable_epochs.py's dataset with its default size (reused as built there; built here if it is not)."""
    from resenc_lightning import demo

    demo.build_dataset(DATASET_ID, DATASET_NAME, plans, n_cases=5, shape_range=(176, 184),
                       num_processes=max(1, min(8, (os.cpu_count() or 2) - 1)), extra_configuration=False)
    return plans


def prepare_cpu(workdir: Path, plans: str) -> str:
    """Tiny dataset through nnunetv2's planner/preprocessor and a shrunk copy of its plans (the tests' sizes)."""
    from resenc_lightning import demo

    folder = demo.build_dataset(DATASET_ID, DATASET_NAME, plans, n_cases=5, shape_range=(18, 22), num_processes=2,
                                extra_configuration=False)
    name = f"{plans}_e2e_tiny"
    shrunk = demo.derive_plans(json.loads((folder / f"{plans}.json").read_text()), name, features=[4, 8, 16],
                               blocks_per_stage=1, patch=16, batch_size=2)
    (folder / f"{name}.json").write_text(json.dumps(shrunk, indent=2))
    return name


def phases(args: argparse.Namespace, plans: str) -> list[tuple[str, list[str]]]:
    train = [sys.executable, str(ROOT / "train.py"), "--plans", plans, "--dataset", str(DATASET_ID), "--fold", "0",
             "--data.num_iterations_per_epoch", str(args.iters), "--data.num_val_iterations_per_epoch",
             str(args.val_iters), *shlex.split(args.extra)]
    if args.cpu_dry_run:
        train += ["--trainer.accelerator", "cpu"]
    model = Path(os.environ["nnUNet_results"]) / DATASET_NAME / f"{TRAINER}__{plans}__3d_fullres"
    return [
        ("train", [*train, "--trainer.max_epochs", "2", "--final_validation", "false"]),
        ("resume", [*train, "--trainer.max_epochs", "3", "--resume", "true"]),
        ("validate_only", [*train, "--trainer.max_epochs", "3", "--validate_only", "true"]),
        ("predict", [sys.executable, "-c", PREDICT, "-i", str(Path(args.out) / "predict_in"), "-o",
                     str(Path(args.out) / "predict_out"), "-m", str(model), "-f", "0", "-chk", "checkpoint_final.pth",
                     "-npp", "1", "-nps", "1", *(["-device", "cpu"] if args.cpu_dry_run else [])]),
    ]


def _epochs_logged(fold: Path) -> int:
    import torch

    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    return len(ckpt["logging"]["train_losses"])


def _strict_keys(fold: Path) -> list[str]:
    """Problems with the Lightning checkpoint's keys: a compiled wrapper saved inside (`_orig_mod`) doubles them."""
    import torch

    ckpt = torch.load(fold / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    bad = [k for k in ckpt["state_dict"] if "_orig_mod" in k or "_forward_impl" in k]
    return [f"last.ckpt holds compiled-wrapper keys, e.g. {bad[0]} ({len(bad)})"] if bad else []


def check(phase: str, fold: Path, out: Path, cases: list[str]) -> list[str]:
    """What a user would look for after each phase; returns the failures."""
    problems: list[str] = []

    def need(path: Path) -> bool:
        if not path.is_file():
            problems.append(f"missing {path}")
        return path.is_file()

    if phase in ("train", "resume"):
        want = 2 if phase == "train" else 3
        if need(fold / "checkpoints" / "last.ckpt"):
            problems += _strict_keys(fold)
        need(fold / "progress.png")
        if need(fold / "checkpoint_final.pth") and (n := _epochs_logged(fold)) != want:
            problems.append(f"checkpoint_final.pth logs {n} epochs, expected {want}")
    if phase in ("resume", "validate_only"):
        if need(fold / "validation" / "summary.json"):
            dice = json.loads((fold / "validation" / "summary.json").read_text())["foreground_mean"]["Dice"]
            if not 0.0 <= dice <= 1.0:
                problems.append(f"foreground Dice {dice} out of [0, 1]")
    if phase == "predict":
        for case in cases:
            need(out / "predict_out" / f"{case}.nii.gz")
    return problems


def compile_preflight(args: argparse.Namespace) -> dict:
    """Missing packages and compile toolchain, printed before any phase; compile is turned off if it would fail."""
    wants_compile = not args.cpu_dry_run or "--model.compile true" in args.extra
    missing = gpu_preflight.missing_packages()
    toolchain = gpu_preflight.compile_toolchain()
    for line in missing + toolchain:
        print(f"preflight: {line}", flush=True)
    compile_on = wants_compile and not toolchain
    if wants_compile and toolchain:
        os.environ["nnUNet_compile"] = "f"
        args.extra = " ".join(part for part in (args.extra.replace("--model.compile true", ""), "--model.compile false")
                              if part.strip())
    return {"phase": "preflight", "status": "ok" if not missing + toolchain else "missing",
            "problems": missing + toolchain, "compile": compile_on}


def phase_budgets(args: argparse.Namespace, compile_on: bool) -> dict[str, int] | None:
    """Per-phase timeouts on CUDA from gpu_e2e_budget (measured times + compile allowances); the CPU dry run: none."""
    return None if args.cpu_dry_run else budget.phase_budgets(args.iters, args.val_iters, compile_on)


class Report:
    """e2e.jsonl (one line per phase) and e2e.md (the table so far), both rewritten as each phase ends."""

    def __init__(self, out: Path, start: float, footer: str) -> None:
        self.out, self.start, self.footer, self.lines = out, start, footer, []
        (out / "e2e.jsonl").write_text("")

    def add(self, rec: dict) -> None:
        with open(self.out / "e2e.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        detail = "; ".join(rec.get("problems", [])) or rec.get("reason", "")
        self.lines.append(f"| {rec['phase']} | {rec['status']} | {rec.get('wall_s', '-')} | {rec.get('cap_s', '-')} "
                          f"| {detail} |")
        print(f"[{time.time() - self.start:5.0f}s] e2e {rec['phase']}: {rec['status']} "
              f"{rec.get('wall_s', '')} {rec.get('problems') or rec.get('reason', '')}", flush=True)
        (self.out / "e2e.md").write_text(self.markdown())

    def markdown(self) -> str:
        return ("## End to end through train.py (defaults)\n\n| phase | status | wall s | cap s | problems |\n"
                "|---|---|---|---|---|\n" + "\n".join(self.lines)
                + f"\n\n{time.time() - self.start:.0f} s in all; {self.footer}\n")


def run_phases(phase_cmds: list[tuple[str, list[str]]], fold: Path, out: Path, cases: list[str], deadline: float,
               budgets: dict[str, int] | None, report: Report) -> bool:
    """Each phase under its cap; a phase whose starting file (NEEDS) is missing is skipped, the others still run."""
    ok = True
    for name, cmd in phase_cmds:
        cap = budget.phase_cap(name, deadline - time.time(), budgets)
        need = fold / NEEDS[name] if name in NEEDS else None
        if not cap:
            rec = {"phase": name, "status": "skipped", "reason": "budget spent"}
        elif need is not None and not need.is_file():
            rec = {"phase": name, "status": "skipped", "reason": f"needs {need.relative_to(fold)}, not written"}
        else:
            t0 = time.time()
            if name == "validate_only":  # the check below then proves this phase wrote it
                (fold / "validation" / "summary.json").unlink(missing_ok=True)
            with open(out / f"{name}.log", "w") as log:
                rc = subprocess.run(["timeout", "-k", "10", str(cap), *cmd], stdout=log, stderr=subprocess.STDOUT,
                                    env=os.environ.copy()).returncode
            problems = [f"exit {rc}" + (" (timeout)" if rc in (124, 137) else "")] if rc else []
            problems += check(name, fold, out, cases) if rc == 0 else []
            rec = {"phase": name, "status": "ok" if not problems else "FAILED", "wall_s": round(time.time() - t0, 1),
                   "cap_s": cap, "budget_s": budgets[name] if budgets else None, "problems": problems,
                   "cmd": shlex.join(cmd)}
        ok = ok and rec["status"] == "ok"
        report.add(rec)
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_results/e2e", help="e2e.jsonl, e2e.md, per-phase logs, predictions")
    p.add_argument("--workdir", default="/tmp/rl_stable_epochs", help="nnU-Net folders (gpu_stable_epochs.py's)")
    p.add_argument("--plans", default="nnUNetResEncUNetLPlans")
    p.add_argument("--iters", type=int, default=5, help="training steps per epoch (the only budget change)")
    p.add_argument("--val-iters", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=None,
                   help="dataset and all four phases together (cuda: gpu_e2e_budget.e2e_total(), cpu dry run 1800)")
    p.add_argument("--extra", default="", help="more train.py arguments for phases 1-3")
    p.add_argument("--cpu-dry-run", action="store_true", help="same sequence on CPU with tiny plans")
    args = p.parse_args(argv)
    start = time.time()
    out = Path(args.out).resolve()
    args.out = str(out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "predict_in").mkdir(parents=True)
    pre = compile_preflight(args)
    budgets = phase_budgets(args, pre["compile"])
    args.budget_s = args.budget_s or (1800 if args.cpu_dry_run else budget.e2e_total(args.iters, args.val_iters,
                                                                                     pre["compile"]))
    report = Report(out, start, f"{args.iters}+{args.val_iters} steps per epoch; compile "
                    f"{'on' if pre['compile'] else 'off'}{'; CPU dry run' if args.cpu_dry_run else ''}")
    report.add({**pre, "wall_s": round(time.time() - start, 1)})
    workdir = Path(args.workdir).resolve()
    set_paths(workdir)
    plans = args.plans
    t0 = time.time()
    prepared = {"phase": "prepare", "status": "ok", "budget_s": None if args.cpu_dry_run else budget.PREPARE_S}
    try:
        if args.cpu_dry_run:
            os.environ.setdefault("nnUNet_n_proc_DA", "0")
            os.environ.setdefault("nnUNet_def_n_proc", "2")
            plans = prepare_cpu(workdir, plans)
        else:
            plans = prepare_cuda(plans)
    except Exception as err:  # no data, no phase: record why before the traceback
        report.add({**prepared, "status": "FAILED", "wall_s": round(time.time() - t0, 1),
                    "problems": [f"{type(err).__name__}: {err}"]})
        raise
    report.add({**prepared, "wall_s": round(time.time() - t0, 1)})
    fold = Path(os.environ["nnUNet_results"]) / DATASET_NAME / f"{TRAINER}__{plans}__3d_fullres" / "fold_0"
    shutil.rmtree(fold.parent, ignore_errors=True)  # a fresh run, as on a new machine
    images = sorted((Path(os.environ["nnUNet_raw"]) / DATASET_NAME / "imagesTr").glob("*_0000.nii.gz"))[:2]
    for img in images:
        shutil.copy(img, out / "predict_in" / img.name)
    cases = [img.name[: -len("_0000.nii.gz")] for img in images]
    print(f"e2e: plans {plans}, fold {fold}, predict cases {cases}, budgets {budgets or 'what is left'}", flush=True)
    report.footer = f"plans {plans}; " + report.footer
    ok = run_phases(phases(args, plans), fold, out, cases, start + args.budget_s, budgets, report)
    print(report.markdown(), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
