# Sourced by scripts/run.sh and scripts/test.sh: makes .venv/ at the repo root ready.
#
#  1. create .venv/ if missing (python3 -m venv, or $PYTHON -m venv);
#  2. pip install torch==2.13.0 FIRST, in its own step (skipped when already installed): an unpinned
#     torch requirement resolved before it would pull the multi-GB CUDA wheels;
#  3. pip install -e ".[test,lint]" (triton pinned 3.7.1; ruff and mypy for scripts/lint.sh) and timm without its deps (timm requires
#     torchvision, which is broken beside this torch; benchmarks load timm's optim files directly).
#
# Steps 2-3 are skipped when the stamp in .venv/ matches a hash of setup.py, pyproject.toml and this file, so re-runs
# are fast. DS_CONADV_FORCE_SETUP=1 redoes them.
#
#  4. optional, outside the stamp: Horovod, when DS_CONADV_WITH_HOROVOD=1 or CI=true, through
#     scripts/install_horovod.sh (a no-op when `import horovod.torch` works; else the cached wheel, else a
#     source build). Then DS_CONADV_REQUIRE_HOROVOD=1 is exported: the Horovod tests fail, not skip, without it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
TORCH_VERSION="2.13.0"
TIMM_VERSION="1.0.31"
STAMP="$VENV/.ds_conadv_setup.stamp"

_log() { echo "[setup] $*" >&2; }

if [ ! -x "$VPY" ]; then
    _log "creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi

_want_stamp() {
    cat "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/scripts/_setup.sh" | "$VPY" -c \
        'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest(), sys.version.split()[0])'
}
WANT="$(_want_stamp)"

if [ "${DS_CONADV_FORCE_SETUP:-0}" != "1" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
    && "$VPY" -c "import torch, ds_conadv, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" \
        >/dev/null 2>&1; then
    :  # up to date
else
    PIP=("$VPY" -m pip --disable-pip-version-check)
    # install-only options go after the subcommand
    INSTALL=(install)
    [ "${CI:-}" = "true" ] && INSTALL+=(--progress-bar off) || true
    # 2. torch first, alone.
    have="$("$VPY" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)"
    if [ "$have" != "$TORCH_VERSION" ]; then
        _log "installing torch==$TORCH_VERSION (first, alone)"
        "${PIP[@]}" "${INSTALL[@]}" "torch==$TORCH_VERSION"
    else
        _log "torch $have already installed"
    fi
    # 3. the package (editable) with the test extra, then timm without deps.
    _log "installing ds_conadv (editable) with [test,lint] extras"
    "${PIP[@]}" "${INSTALL[@]}" -e "$ROOT[test,lint]"
    "${PIP[@]}" "${INSTALL[@]}" --no-deps "timm==$TIMM_VERSION" || _log "timm not installed (optional: benchmarks only)"
    have="$("$VPY" -c "import torch; print(torch.__version__.split('+')[0])")"
    if [ "$have" != "$TORCH_VERSION" ]; then
        _log "ERROR: torch is $have after install, expected $TORCH_VERSION"; exit 1
    fi
    echo "$WANT" > "$STAMP"
    _log "environment ready"
fi

if [ "${DS_CONADV_WITH_HOROVOD:-0}" = "1" ] || [ "${CI:-}" = "true" ]; then
    PYTHON="$VPY" bash "$ROOT/scripts/install_horovod.sh"
    export DS_CONADV_REQUIRE_HOROVOD=1
fi

export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
