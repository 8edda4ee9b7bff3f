#!/usr/bin/env bash
# Build gpu_bundle/ (ignored by git) for a lent GPU machine that has only Python 3.12 + torch,
# lightning, numpy/scipy/skimage/sklearn/pandas/matplotlib/seaborn/tqdm/tifffile/pynvml/einops/
# timm/torchvision/rich/pyyaml/requests and NO package index. See ../shared/GPU_NOTES.md.
#
#   gpu_bundle/wheels/  cp312 / abi3 / py3-none-any wheels of everything else we import
#   gpu_bundle/stubs/   import-only SimpleITK stand-in (the real wheel is 52 MB, too big)
#
# Run from the repo root on the development machine:  bash scripts/make_gpu_bundle.sh
# Idempotent: wheels already in gpu_bundle/wheels are reused. On the GPU machine:
#   source scripts/gpu_env.sh
#
# PY_VERSION (default 3.12, the GPU box's) picks the wheels' Python tag and BUNDLE (default gpu_bundle) the folder:
# the same pins for every version, only the cpXY tag of the compiled wheels differs. The CPU rehearsal of the bundle
# route (scripts/rehearse_gpu_bundle.sh) builds one for this machine's Python:  PY_VERSION=3.11 BUNDLE=/tmp/b bash ...
# The packages of the box's image are listed in scripts/gpu_box_image.txt; tests/test_gpu_scripts.py checks that
# PKGS plus that list cover every third-party import of src/resenc_lightning and the GPU scripts.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY_VERSION=${PY_VERSION:-3.12}
PY_TAG=cp${PY_VERSION//./}
BUNDLE=${BUNDLE:-gpu_bundle}
WHEELS=$BUNDLE/wheels
STUBS=$BUNDLE/stubs
MAX_MIB=60

# Pinned to the versions installed in .venv (checked below when .venv exists).
PKGS=(
    nnunetv2==2.8.1
    dynamic_network_architectures==0.4.4
    acvl_utils==0.2.6                    # sdist only: built locally with `pip wheel`
    batchgenerators==0.25.5
    batchgeneratorsv2==0.3.6
    blosc2==4.14.1
    numexpr==2.14.2                      # blosc2
    ndindex==1.10.1                      # blosc2
    msgpack==1.2.4                       # blosc2 (blosc2/schunk.py imports it at module level)
    httpx==0.28.1                        # blosc2/__init__ -> remote_ctable imports httpx at module level
    httpcore==1.0.9                      # httpx
    h11==0.16.0                          # httpcore
    anyio==4.16.0                        # httpx / httpcore (certifi, idna come with requests)
    connected-components-3d==4.1.1
    nibabel==5.4.2
    yacs==0.1.8
    monai==1.6.1                         # final validation's HD95 / surface Dice (validation.py)
    jsonargparse==4.53.0                 # LightningCLI (our cli.py)
    submitit==1.5.4                      # experiment.py's job executors (pure Python)
    cloudpickle==3.1.3                   # submitit
    docstring_parser==0.18.0             # jsonargparse[signatures]
    typeshed_client==2.15.0              # jsonargparse[signatures]
)
# Built from an sdist rather than downloaded.
SDIST_ONLY=(acvl_utils)

if [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi

pip_() {  # pip, minus this machine's harmless "Location 'file:///opt/...' is ignored" noise
    "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

norm() {  # PEP 503-ish normalisation, then the wheel-filename form (lowercase, '_')
    echo "$1" | tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/_/g'
}

# --- 1. pins must match .venv ------------------------------------------------------------------
if [[ -x .venv/bin/pip ]]; then
    freeze=$(.venv/bin/pip freeze 2>/dev/null)
    bad=0
    for spec in "${PKGS[@]}"; do
        name=${spec%%==*}; ver=${spec##*==}
        have=$(echo "$freeze" | awk -F'==' -v n="$(norm "$name")" '
            { m=tolower($1); gsub(/[-_.]+/, "_", m); if (m==n) print $2 }')
        if [[ -z "$have" ]]; then
            echo "WARN: $name not installed in .venv (pinned $ver)" >&2
        elif [[ "$have" != "$ver" ]]; then
            echo "ERROR: $name pinned $ver here but .venv has $have: update PKGS" >&2
            bad=1
        fi
    done
    [[ $bad == 0 ]] || exit 1
fi

mkdir -p "$WHEELS" "$STUBS"

find_wheel() {  # prints the existing wheel for name/version, if any
    local n; n=$(norm "$1")
    find "$WHEELS" -maxdepth 1 -type f -iname "${n}-${2}-*.whl" -print -quit
}

# --- 2. wheels ----------------------------------------------------------------------------------
wanted=()
for spec in "${PKGS[@]}"; do
    name=${spec%%==*}; ver=${spec##*==}
    existing=$(find_wheel "$name" "$ver")
    if [[ -n "$existing" ]]; then
        echo "reuse    $(basename "$existing")"
    elif [[ " ${SDIST_ONLY[*]} " == *" $name "* ]]; then
        echo "build    $spec"
        pip_ wheel -q --no-deps -w "$WHEELS" "$spec"
    else
        echo "download $spec"
        pip_ download -q --no-deps --only-binary=:all: \
            --python-version "$PY_VERSION" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux_2_17_x86_64 \
            -d "$WHEELS" "$spec"
    fi
    existing=$(find_wheel "$name" "$ver")
    if [[ -z "$existing" ]]; then
        echo "ERROR: no wheel for $spec in $WHEELS after download/build" >&2
        exit 1
    fi
    wanted+=("$(basename "$existing")")
done

# Drop wheels that are no longer pinned (e.g. after a version bump) so the bundle stays small.
for whl in "$WHEELS"/*.whl; do
    b=$(basename "$whl")
    if [[ " ${wanted[*]} " != *" $b "* ]]; then
        echo "remove   $b (not pinned)"
        rm -f "$whl"
    fi
done
# Anything that is not a wheel (e.g. an sdist pip left behind) does not belong here.
find "$WHEELS" -maxdepth 1 -type f ! -name '*.whl' -print -delete

# --- 3. every wheel must install on CPython $PY_VERSION / manylinux x86_64 ------------------------
bad=0
for whl in "$WHEELS"/*.whl; do
    b=$(basename "$whl" .whl)
    IFS=- read -r -a parts <<<"$b"
    n=${#parts[@]}
    pytag=${parts[n-3]}; abitag=${parts[n-2]}; plattag=${parts[n-1]}
    ok=0
    if [[ "$abitag" == none && "$plattag" == any && "$pytag" =~ (^|\.)py3($|\.) ]]; then
        ok=1
    elif [[ ( "$abitag" == abi3 || "$abitag" == "$PY_TAG" ) && "$plattag" =~ manylinux.*x86_64 ]]; then
        ok=1
    fi
    if [[ $ok == 0 ]]; then
        echo "ERROR: $b.whl is not py3-none-any / abi3 / $PY_TAG manylinux x86_64" >&2
        bad=1
    fi
done
[[ $bad == 0 ]] || exit 1

# --- 4. SimpleITK stand-in ----------------------------------------------------------------------
mkdir -p "$STUBS/SimpleITK"
cat >"$STUBS/SimpleITK/__init__.py" <<'EOF'
"""Import-only stand-in for SimpleITK (written by scripts/make_gpu_bundle.sh).

The real SimpleITK wheel (~52 MB) does not fit in the GPU bundle, but nnunetv2 and acvl_utils
`import SimpleITK` at module level. This package makes those imports succeed; using anything
from it raises SimpleITKUnavailableError. Datasets used on the GPU machine must therefore be
NIfTI with "overwrite_image_reader_writer": "NibabelIO" in their dataset.json.

SimpleITKUnavailableError is a RuntimeError; it is also an AttributeError so that
introspection such as hasattr(SimpleITK, name) / getattr(..., default) or pickle's module scan
does not crash, while any real use (SimpleITK.ReadImage(...)) fails with the message below.
"""

__standin__ = True
__version__ = "0+standin"
__all__ = []


class SimpleITKUnavailableError(RuntimeError, AttributeError):
    pass


def __getattr__(name):
    if name.startswith("__") and name.endswith("__"):
        # Leave dunder lookups (import system, copy, pickle, inspect, ...) to the normal rules.
        raise AttributeError(f"module 'SimpleITK' has no attribute {name!r}")
    raise SimpleITKUnavailableError(
        f"SimpleITK stand-in: SimpleITK.{name} is not available on this machine "
        f"(the real SimpleITK is not installed); use NibabelIO datasets "
        f'("overwrite_image_reader_writer": "NibabelIO" in dataset.json)'
    )


def __dir__():
    return ["__standin__", "__version__", "SimpleITKUnavailableError"]
EOF

# --- 5. size ------------------------------------------------------------------------------------
echo
echo "wheels in $WHEELS:"
for whl in "$WHEELS"/*.whl; do
    printf '  %8d KiB  %s\n' $(( $(stat -c %s "$whl") / 1024 )) "$(basename "$whl")"
done
total=$(du -sb "$BUNDLE" | cut -f1)
printf 'gpu_bundle total: %d bytes (%.2f MiB), %d wheels\n' "$total" \
    "$(echo "$total / 1048576" | bc -l)" "$(ls "$WHEELS"/*.whl | wc -l)"
if (( total > MAX_MIB * 1024 * 1024 )); then
    echo "ERROR: gpu_bundle exceeds ${MAX_MIB} MiB (the device transfer limit is 64 MiB incl. the tree)" >&2
    exit 1
fi
