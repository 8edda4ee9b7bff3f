#!/usr/bin/env bash
# One command for the GPU evidence (README, "GPU evidence"): run from the repo root on a GPU machine.
#   OUT=results bash scripts/gpu_check.sh [extra gpu_stable_epochs.py flags]
# On a machine without nnunetv2 & co. (no package index), carry gpu_bundle/ (scripts/make_gpu_bundle.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
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
python3 scripts/gpu_stable_epochs.py --out "$OUT" "$@" 2>&1 | grep -v "it/s\]" | tee "$OUT/log.txt"
