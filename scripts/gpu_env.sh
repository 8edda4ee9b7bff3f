# shellcheck shell=bash
# Source this on the lent GPU machine, from the repo root, after carrying gpu_bundle/ along
# (built here by scripts/make_gpu_bundle.sh):
#
#     source scripts/gpu_env.sh
#
# Installs gpu_bundle/wheels/*.whl offline into /tmp/rl_site (once per machine) and puts the
# SimpleITK stand-in, /tmp/rl_site and src/ on PYTHONPATH. nnUNet_* variables are left alone.
# No `set -e` here: this file is sourced into the caller's shell.

# RL_BUNDLE / RL_SITE (defaults gpu_bundle, /tmp/rl_site) let scripts/rehearse_gpu_bundle.sh take the same route.
_rl_site=${RL_SITE:-/tmp/rl_site}
_rl_root=$PWD
_rl_bundle=$(cd "${RL_BUNDLE:-gpu_bundle}" 2>/dev/null && pwd)
_rl_marker=$_rl_site/.rl_bundle_installed

if [[ -z "$_rl_bundle" || ! -d "$_rl_bundle/wheels" || ! -f "$_rl_bundle/stubs/SimpleITK/__init__.py" ]]; then
    echo "gpu_env.sh: ${RL_BUNDLE:-gpu_bundle}/ missing or incomplete under $_rl_root (run from the repo root;" \
         "build it with scripts/make_gpu_bundle.sh and carry it)" >&2
    return 1 2>/dev/null || exit 1
fi

# Reinstall only when the set of wheels changed since the last install on this machine.
_rl_want=$(cd "$_rl_bundle/wheels" && ls -1 -- *.whl | sort)
if [[ -f "$_rl_marker" && "$(cat "$_rl_marker")" == "$_rl_want" ]]; then
    _rl_state="already installed"
else
    rm -rf "$_rl_site"
    if python3 -m pip install -q --no-index --no-deps --no-compile --target "$_rl_site" \
            "$_rl_bundle"/wheels/*.whl; then
        printf '%s\n' "$_rl_want" >"$_rl_marker"
        _rl_state="installed"
    else
        echo "gpu_env.sh: offline pip install into $_rl_site failed" >&2
        return 1 2>/dev/null || exit 1
    fi
fi

export PYTHONPATH="$_rl_bundle/stubs:$_rl_site:$_rl_root/src${PYTHONPATH:+:$PYTHONPATH}"

echo "gpu_env: $(echo "$_rl_want" | wc -l) wheels $_rl_state in $_rl_site;" \
     "PYTHONPATH=stubs(SimpleITK stand-in):$_rl_site:src; $(python3 --version 2>&1)"
unset _rl_site _rl_root _rl_bundle _rl_marker _rl_want _rl_state
