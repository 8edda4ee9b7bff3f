#!/usr/bin/env bash
# CPU rehearsal of the GPU box's install route, so that a lease is not spent finding a missing wheel:
#
#   1. bundle   scripts/make_gpu_bundle.sh for this machine's Python (the box's bundle is the same pins, cp312 tag);
#               the wheel set must equal gpu_bundle/'s (when one was built) apart from that tag;
#   2. image    a venv standing in for the box: torch (BOX_TORCH) + exactly scripts/gpu_box_image.txt from PyPI,
#               built once under $WORK and reused while that list is unchanged (--fresh rebuilds it);
#   3. check    scripts/gpu_check.sh in that venv with a bare environment (env -i), STEPS=e2e and the CPU dry run:
#               it finds no nnunetv2, sources gpu_env.sh, which installs ONLY the bundle's wheels offline
#               (--no-index --no-deps) into a fresh $WORK/site, runs the preflight (every resenc_lightning module
#               imported; Triton, C compiler, Python.h) and scripts/gpu_e2e.py --cpu-dry-run;
#   4. verdict  one line per e2e phase with its wall time; on failure the phase, why, and its log's tail.
#
#   bash scripts/rehearse_gpu_bundle.sh [--fresh]        # ~3 min with the image venv built, +5 min to build it
#
# Not part of CI (a 5.5 GB torch). The box has torch 2.11; this machine has only 2.14.1 on disk (BOX_TORCH), and a
# CPU 2.11 cannot be had here without a multi-GB download: the rehearsal proves the wheel set, not the torch version.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
WORK=${WORK:-/tmp/rl_rehearse}
PY=${PYTHON:-python3}
BOX_TORCH=${BOX_TORCH:-torch==2.14.1 torchvision==0.29.1}
T0=$(date +%s)
STAGE=start
mkdir -p "$WORK"

stage() { STAGE=$1; printf '== [%4ds] %s\n' $(( $(date +%s) - T0 )) "$2"; }
fail() {
    echo "REHEARSAL FAILED in stage '$STAGE': $*"
    exit 1
}

PYV=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')

stage bundle "make_gpu_bundle.sh for Python $PYV -> $WORK/bundle"
PY_VERSION=$PYV BUNDLE=$WORK/bundle bash scripts/make_gpu_bundle.sh >"$WORK/bundle.log" 2>&1 \
    || fail "make_gpu_bundle.sh exited non-zero: $(tail -n 3 "$WORK/bundle.log")"
tail -n 1 "$WORK/bundle.log"
untagged() { (cd "$1" && ls -1 -- *.whl) | sed -E 's/-cp[0-9]+-cp[0-9]+-/-TAG-/' | sort; }
if [[ -d gpu_bundle/wheels ]]; then
    diff <(untagged gpu_bundle/wheels) <(untagged "$WORK/bundle/wheels") >"$WORK/bundle.diff" \
        || fail "gpu_bundle/ and the Python $PYV bundle differ beyond the cpXY tag: $(cat "$WORK/bundle.diff")"
    echo "same wheels as gpu_bundle/ apart from the Python tag"
fi

stage image "box stand-in venv: $BOX_TORCH + scripts/gpu_box_image.txt (the box: torch 2.11, Python 3.12)"
VENV=$WORK/box_venv
want="$PYV $BOX_TORCH $(grep -v '^#' scripts/gpu_box_image.txt | tr '\n' ' ')"
if [[ "${1:-}" == --fresh || ! -x "$VENV/bin/python" || "$(cat "$VENV/.rl_image" 2>/dev/null)" != "$want" ]]; then
    rm -rf "$VENV"
    "$PY" -m venv "$VENV" || fail "python -m venv failed"
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q $BOX_TORCH -r scripts/gpu_box_image.txt >"$WORK/image.log" 2>&1 \
        || fail "pip install of the box image failed: $(grep -v 'is ignored' "$WORK/image.log" | tail -n 3)"
    echo "$want" >"$VENV/.rl_image"
fi
"$VENV/bin/python" -c "import torch, lightning; print('torch', torch.__version__, '| lightning', lightning.__version__)"
if "$VENV/bin/python" -c "import nnunetv2" 2>/dev/null; then
    fail "the box stand-in already has nnunetv2: it would hide a missing wheel"
fi

stage check "gpu_check.sh (STEPS=e2e, CPU dry run) in a bare environment with only the bundle added"
rm -rf "$WORK/site" "$WORK/out"
env -i HOME="$HOME" PATH="$VENV/bin:/usr/local/bin:/usr/bin:/bin" LANG=C.UTF-8 \
    RL_BUNDLE="$WORK/bundle" RL_SITE="$WORK/site" OUT="$WORK/out" STEPS=e2e BUDGET_S=1800 E2E_S=1700 \
    E2E_ARGS="--cpu-dry-run --workdir $WORK/nnunet" bash scripts/gpu_check.sh >"$WORK/check.log" 2>&1
grep -E "^(gpu_env|preflight|== |\[)" "$WORK/check.log"

stage verdict "phases (from $WORK/out/e2e/e2e.jsonl)"
[[ -s "$WORK/out/e2e/e2e.jsonl" ]] || fail "gpu_e2e.py wrote no phase record: $(tail -n 5 "$WORK/check.log")"
"$VENV/bin/python" - "$WORK/out/e2e" <<'EOF' || fail "see the phase lines above"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
recs = [json.loads(line) for line in (out / "e2e.jsonl").read_text().splitlines() if line.strip()]
bad = []
for r in recs:
    print(f"  {r['phase']:>13}: {r['status']:<8} {r.get('wall_s', '-'):>7} s  {'; '.join(r.get('problems', []))}"
          f"{r.get('reason', '')}")
    if r["status"] not in ("ok",) and r["phase"] != "preflight":
        bad.append(r)
missing = {"train", "resume", "validate_only", "predict"} - {r["phase"] for r in recs}
for r in bad:
    log = out / f"{r['phase']}.log"
    tail = log.read_text().splitlines()[-15:] if log.is_file() else []
    print(f"phase {r['phase']} {r['status']}: {'; '.join(r.get('problems', [])) or r.get('reason', '')}")
    print("\n".join("    " + line for line in tail))
if missing:
    print(f"phases never reached: {sorted(missing)}")
pre = next((r for r in recs if r["phase"] == "preflight"), {})
sys.exit(1 if bad or missing or pre.get("status") != "ok" else 0)
EOF
grep -q "^preflight: missing" "$WORK/check.log" && fail "gpu_check.sh's preflight: $(grep '^preflight: missing' "$WORK/check.log")"
echo "REHEARSAL PASSED in $(( $(date +%s) - T0 )) s: the bundle alone (+ the box image + torch) runs every phase"
