#!/usr/bin/env bash
# One command for the GPU evidence (README, "GPU evidence"): run from the repo root on a GPU machine.
#   OUT=results bash scripts/gpu_check.sh [extra gpu_stable_epochs.py flags]
# On a machine without nnunetv2 & co. (no package index), carry gpu_bundle/ (scripts/make_gpu_bundle.sh).
#
# First the preflight (scripts/gpu_preflight.py -> $OUT/preflight.txt): one "missing X" line per absent package,
# Triton, C compiler or Python.h (without the compile toolchain the e2e step runs with compile off).
# Then within BUDGET_S (default 540 s = 9 min), in this order, each bounded by `timeout`, results written as they come:
#   1. end to end through train.py with every CUDA default (compile, 16-mixed, callbacks): 2 epochs -> --resume 1
#      more -> --validate_only -> nnUNetv2_predict_from_modelfolder on 2 cases -> $OUT/e2e/ (E2E_S, default: the
#      planned seconds of scripts/gpu_e2e_budget.py, measured phase times + a cold-compile allowance; ~594 s with
#      compile, so the e2e step alone may take the whole budget on a first run);
#   2. fresh vs resumed stable-epoch arms ours_on (CudnnPinning v2) and ours_off with what is left -> $OUT/results.md
#      + the DECISION line (README rule: ours_on resumed/fresh > 1.02 while ours_off is stable => CudnnPinning off by
#      default); they need ~290 s (measured on the H200, 2026-11-27): STEPS=arms runs them alone;
#   3. with what is left (at least 150 s): the data-pipeline benchmark (issue 13: nnU-Net's CPU augmentation vs
#      --data.augment_on_device, CPU ms per batch, device ms, ResEnc L arms 4 vs 4 vs 12 workers) -> $OUT/datapipe/;
#   4. with what is left: the native and pressure arms -> $OUT/extra/.
# STEPS picks and orders the steps (default "e2e arms datapipe extra"); STEPS=datapipe runs only the data-pipeline
# benchmark (an estimated 4-5 min on an H200, the dataset built first), STEPS="datapipe arms e2e" puts it first.
# CPU rehearsal of step 1 (no GPU needed): python scripts/gpu_e2e.py --cpu-dry-run --out /tmp/e2e
# CPU rehearsal of the whole script: BUDGET_S=3000 E2E_S=1500 DP_S=600 E2E_ARGS=--cpu-dry-run bash scripts/gpu_check.sh --smoke
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
STEPS=${STEPS:-e2e arms datapipe extra}
for step in $STEPS; do
    case $step in
        arms|e2e|datapipe|extra) ;;
        *) echo "gpu_check.sh: STEPS entry '$step' is not one of arms, e2e, datapipe, extra" >&2; exit 2 ;;
    esac
done
BUDGET_S=${BUDGET_S:-540}
E2E_S=${E2E_S:-$(python3 scripts/gpu_e2e_budget.py)}
T0=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; df -h /dev/shm | tail -1; nproc; } \
    >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
if ! python3 -c "import nnunetv2, jsonargparse" 2>/dev/null; then
    # shellcheck disable=SC1091
    source scripts/gpu_env.sh || exit 1
else
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 scripts/gpu_preflight.py 2>&1 | tee "$OUT/preflight.txt"
quiet() { grep --line-buffered -v "it/s\]"; }
DP_S=${DP_S:-300}
reserve() {  # seconds the steps after $1 in STEPS keep for themselves (e2e: E2E_S; datapipe, extra: none)
    local after=0 seen=0 s
    for s in $STEPS; do
        (( seen )) && [[ $s == e2e ]] && after=$(( after + E2E_S ))
        [[ $s == "$1" ]] && seen=1
    done
    echo "$after"
}

# the decision-rule arms (they build the dataset when the e2e step has not)
step_arms() {
    local arms_s=$(( $(left) - $(reserve arms) - 30 ))  # each arm is killed at the deadline: +20 s covers the exit
    if (( arms_s < 90 )); then  # one arm pair needs ~130 s (H200, 2026-11-27)
        echo "== [$(( $(date +%s) - T0 ))s] stable-epoch arms skipped (${arms_s}s left; STEPS=arms runs them alone)"
        return
    fi
    echo "== [$(( $(date +%s) - T0 ))s] stable-epoch arms ours_on, ours_off (deadline ${arms_s}s)"
    timeout -k 10 $(( arms_s + 20 )) python3 scripts/gpu_stable_epochs.py --out "$OUT" --arms ours_on ours_off \
        --deadline-s "$arms_s" "$@" 2>&1 | quiet | tee "$OUT/log.txt"
}

# end to end through train.py, every default
step_e2e() {
    local e2e_s=$(( $(left) - $(reserve e2e) - 25 )); (( e2e_s > E2E_S )) && e2e_s=$E2E_S
    echo "== [$(( $(date +%s) - T0 ))s] e2e train -> resume -> validate_only -> predict (budget ${e2e_s}s)"
    # shellcheck disable=SC2086
    timeout -k 5 $(( e2e_s + 15 )) python3 scripts/gpu_e2e.py --out "$OUT/e2e" --budget-s "$e2e_s" ${E2E_ARGS:-} 2>&1 \
        | quiet | tee "$OUT/e2e_log.txt"
}

# the data pipeline: CPU ms per batch, device ms, ResEnc L arms (same dataset as step 1)
step_datapipe() {
    local dp_s=$(( $(left) - $(reserve datapipe) - 10 )); (( dp_s > DP_S )) && dp_s=$DP_S
    if (( dp_s < 150 )); then
        echo "== [$(( $(date +%s) - T0 ))s] data-pipeline benchmark skipped (${dp_s}s left; STEPS=datapipe runs it alone)"
        return
    fi
    echo "== [$(( $(date +%s) - T0 ))s] data-pipeline benchmark (deadline ${dp_s}s)"
    local dp_args="--device cuda"
    [[ " $* " == *" --smoke "* ]] && dp_args="--smoke --training-arms"
    # shellcheck disable=SC2086
    timeout -k 10 $(( dp_s + 30 )) python3 scripts/benchmark_data_pipeline.py $dp_args --workdir /tmp/rl_stable_epochs \
        --out "$OUT/datapipe" --deadline-s $(( dp_s - 20 )) ${DP_ARGS:-} 2>&1 | quiet | tee "$OUT/datapipe_log.txt"
}

# the rest, if time is left
step_extra() {
    local rest_s=$(( $(left) - 10 ))
    if (( rest_s > 90 )); then
        echo "== [$(( $(date +%s) - T0 ))s] native and pressure arms (deadline ${rest_s}s)"
        timeout -k 10 $(( rest_s + 5 )) python3 scripts/gpu_stable_epochs.py --out "$OUT/extra" --arms native pressure \
            --deadline-s "$rest_s" "$@" 2>&1 | quiet | tee "$OUT/extra_log.txt"
    fi
}

for step in $STEPS; do "step_$step" "$@"; done
echo "== [$(( $(date +%s) - T0 ))s] done"
[[ " $STEPS " == *" arms "* ]] && { grep -h "DECISION" "$OUT/results.md" 2>/dev/null \
    || echo "DECISION: undecided (stable-epoch arms did not finish)"; }
[[ " $STEPS " == *" e2e "* ]] && { cat "$OUT/e2e/e2e.md" 2>/dev/null || echo "e2e: no result"; }
[[ " $STEPS " == *" datapipe "* ]] && { cat "$OUT/datapipe/data_pipeline.md" 2>/dev/null || echo "datapipe: no result"; }
exit 0
