"""Time budgets of gpu_e2e.py's phases on CUDA, built from measured phase times plus named allowances.

Every number says where it comes from. Measured: the stable-epoch arms on an H200, 2026-11-27
(docs/gpu_evidence/2026-11-27_h200/log.txt: ResEnc L, patch 192³, batch 2, compile off, one process per arm).
Allowances (not measured yet): torch.compile and nnU-Net's validation/prediction on that network. gpu_e2e.py writes
each phase's wall time to e2e.jsonl next to its budget, so the first GPU run turns allowances into measurements:
replace the constant and its comment then.

    python scripts/gpu_e2e_budget.py        # prints the planned seconds of the whole e2e step (gpu_check.sh's E2E_S)
"""

from __future__ import annotations

import math

#: measured: dataset build (synthesis, nnunetv2 fingerprint, ResEnc L planning, preprocessing), 32.3 s on 16 cores
PREPARE_S = 35
#: measured: one arm process took 55-70 s start to exit, of which 50 timed steps at 0.27 s (+3 profiled);
#: start-up (imports, CUDA context, data loaders, cuDNN benchmark at 192³) and exit are what remains, at most ~55 s
STARTUP_S = 55
#: measured: the slowest step of any arm, 379.5 ms (a resumed run); validation steps are cheaper, counted the same
STEP_S = 0.38
#: allowance: a cold inductor compile of ResEnc L at 192³ on 16 cores: the training graph (forward + backward with
#: deep supervision), the Dice loss, and the validation-step graph under inference mode
COLD_COMPILE_S = 150
#: allowance: the same graphs again from inductor's on-disk caches (FX graph cache, Triton kernels)
WARM_COMPILE_S = 30
#: allowance: one new graph cold (final validation runs the network with deep supervision off)
NEW_GRAPH_S = 40
#: allowance: writing last.ckpt (~0.8 GB with momentum) and nnU-Net's checkpoint_*.pth once
CHECKPOINT_S = 5
#: allowance: nnU-Net's final validation of one ~180³ case (sliding window at 192³, 8 mirrors), export, metrics
VALIDATION_S = 30
#: allowance: nnUNetv2_predict_from_modelfolder on 2 cases (no compile: nnU-Net's predictor compiles only when asked)
PREDICT_S = 60
#: the floor below which a phase is not started (it could not even import)
MIN_PHASE_S = 10


def phase_budgets(iters: int = 5, val_iters: int = 2, compile_on: bool = True) -> dict[str, int]:
    """Seconds each phase may take on CUDA (its `timeout`); the sum is what the e2e step needs after PREPARE_S."""
    def epochs(n: int) -> float:
        return n * (iters + val_iters) * STEP_S + n * CHECKPOINT_S

    cold, warm, new = (COLD_COMPILE_S, WARM_COMPILE_S, NEW_GRAPH_S) if compile_on else (0, 0, 0)
    raw = {
        "train": STARTUP_S + cold + epochs(2),
        "resume": STARTUP_S + warm + new + epochs(1) + VALIDATION_S,
        "validate_only": STARTUP_S + warm + VALIDATION_S,
        "predict": PREDICT_S,
    }
    return {name: math.ceil(s) for name, s in raw.items()}


def e2e_total(iters: int = 5, val_iters: int = 2, compile_on: bool = True) -> int:
    """The e2e step's planned seconds: the dataset (reused when the arms built it first) and every phase."""
    return PREPARE_S + sum(phase_budgets(iters, val_iters, compile_on).values())


def phase_cap(name: str, left: float, budgets: dict[str, int] | None) -> int:
    """The timeout of one phase: its budget plus the slack the later phases' budgets leave, never more than what is
    left (an earlier phase that finished early or was skipped hands its time on); 0 when under MIN_PHASE_S."""
    if budgets is None:
        cap = left
    else:
        names = list(budgets)
        later = sum(budgets[n] for n in names[names.index(name) + 1:])
        cap = min(left, max(budgets[name], left - later))
    return int(cap) if cap >= MIN_PHASE_S else 0


if __name__ == "__main__":
    print(e2e_total())
