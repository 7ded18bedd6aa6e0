#!/usr/bin/env bash
# Optional piece: Horovod 0.28.1 (PyTorch + Gloo, CPU operations, no MPI/TF/MXNet) into .venv/.
#
#   bash scripts/install_horovod.sh          # or: DS_CONADV_WITH_HOROVOD=1 bash scripts/test.sh
#
# - Skips at once when `import horovod.torch` already works in that python.
# - Builds from the sdist with --no-build-isolation against the torch already installed (build isolation
#   would hide it). The sdist forces C++14 but torch 2.13's headers need C++17, so the C++ compiler is a
#   wrapper that appends -std=c++17 last (gcc honours the last -std); CXXFLAGS cannot do it (the CMake
#   files strip -std=). See docs/horovod.md.
# - Caches the built wheel in $DS_CONADV_WHEEL_CACHE (default ~/.cache/ds_conadv/wheels/), in a folder named
#   after the python and torch versions it was built against (Horovod's torch extension is tied to both),
#   so later runs / fresh venvs install it in seconds instead of rebuilding (3-6+ min on 2 cores).
#
# Environment: PYTHON (default: .venv/bin/python at the repo root), DS_CONADV_WHEEL_CACHE, MAKEFLAGS
# (default -j2), DS_CONADV_HOROVOD_REBUILD=1 to ignore the cached wheel.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VPY="${PYTHON:-$ROOT/.venv/bin/python}"
HOROVOD_VERSION="0.28.1"
_log() { echo "[horovod] $*" >&2; }

if "$VPY" -c "import horovod.torch" >/dev/null 2>&1; then
    _log "horovod.torch already importable ($("$VPY" -c 'import horovod; print(horovod.__version__)')); nothing to do"
    exit 0
fi

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    _log "ERROR: torch must be installed in $VPY first (the build links against it)"; exit 1
fi
KEY="$("$VPY" -c 'import sys, torch; print("py%d%d-torch%s" % (sys.version_info[0], sys.version_info[1], torch.__version__.replace("+", "_")))')"
CACHE="${DS_CONADV_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ds_conadv/wheels}/$KEY"
mkdir -p "$CACHE"
PIP=("$VPY" -m pip --disable-pip-version-check)
INSTALL=(install)
[ "${CI:-}" = "true" ] && INSTALL+=(--progress-bar off) || true

_cached_wheel() { ls -1 "$CACHE"/horovod-"$HOROVOD_VERSION"-*.whl 2>/dev/null | head -n1 || true; }

_install_wheel() {  # $1: wheel path. Its runtime deps (cloudpickle, psutil, pyyaml, packaging) come from PyPI.
    "${PIP[@]}" "${INSTALL[@]}" "$1" && "$VPY" -c "import horovod.torch" >/dev/null 2>&1
}

WHL="$(_cached_wheel)"
if [ -n "$WHL" ] && [ "${DS_CONADV_HOROVOD_REBUILD:-0}" != "1" ]; then
    _log "installing cached wheel $WHL"
    if _install_wheel "$WHL"; then
        _log "horovod $HOROVOD_VERSION ready (cached wheel)"; exit 0
    fi
    _log "cached wheel did not import; removing it and rebuilding"
    "${PIP[@]}" uninstall -y horovod >/dev/null 2>&1 || true
    rm -f "$WHL"
fi

command -v cmake >/dev/null 2>&1 || { _log "ERROR: cmake is needed (apt-get install cmake)"; exit 1; }
command -v g++ >/dev/null 2>&1 || { _log "ERROR: g++ is needed (apt-get install g++)"; exit 1; }

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
REAL_CXX="$(command -v g++)"
printf '#!/bin/sh\nexec %s "$@" -std=c++17\n' "$REAL_CXX" > "$TMP/cxx17"
chmod +x "$TMP/cxx17"
# --no-build-isolation needs, besides torch, setuptools with bdist_wheel (built in since setuptools 70.1,
# else the `wheel` package); torch 2.13 already pulls a recent setuptools.
"$VPY" -c "import setuptools" >/dev/null 2>&1 || "${PIP[@]}" "${INSTALL[@]}" setuptools
"$VPY" -c "import setuptools.command.bdist_wheel" >/dev/null 2>&1 || "${PIP[@]}" "${INSTALL[@]}" wheel

_log "building horovod $HOROVOD_VERSION from source (gloo, C++17 wrapper, ${MAKEFLAGS:--j2}); takes minutes"
start=$(date +%s)
env CXX="$TMP/cxx17" \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=GLOO \
    MAKEFLAGS="${MAKEFLAGS:--j2}" \
    "${PIP[@]}" wheel --no-build-isolation --no-deps --no-cache-dir --no-binary horovod \
        ${CI:+--progress-bar off} -w "$TMP/out" "horovod==$HOROVOD_VERSION"
_log "build took $(( $(date +%s) - start )) s"
BUILT="$(ls -1 "$TMP"/out/horovod-*.whl | head -n1)"
# Move into the cache atomically (a concurrent run sees either no wheel or a whole one).
cp "$BUILT" "$CACHE/.$(basename "$BUILT").part" && mv -f "$CACHE/.$(basename "$BUILT").part" "$CACHE/$(basename "$BUILT")"
_install_wheel "$CACHE/$(basename "$BUILT")" || { _log "ERROR: built wheel does not import horovod.torch"; exit 1; }
_log "horovod $HOROVOD_VERSION ready; wheel cached in $CACHE"
