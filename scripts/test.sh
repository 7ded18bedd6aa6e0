#!/usr/bin/env bash
# The whole test suite (Triton kernels under the interpreter: no GPU needed). Extra arguments go to
# pytest; paths given narrow the run, e.g. `bash scripts/test.sh tests/test_cli_train.py -x`.
# Sets up .venv/ on first use. A whole-suite run (no paths given) starts with scripts/lint.sh (ruff, mypy; a few
# seconds once mypy's cache exists); DS_CONADV_SKIP_LINT=1 skips it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$ROOT"
targets=(tests)
for a in "$@"; do
    case "$a" in
        -*) ;;
        *) if [ -e "${a%%::*}" ]; then targets=(); break; fi ;;
    esac
done
if [ ${#targets[@]} -gt 0 ] && [ "${DS_CONADV_SKIP_LINT:-0}" != "1" ]; then
    bash "$ROOT/scripts/lint.sh"
fi
export TRITON_INTERPRET=1
exec "$VENV/bin/python" -m pytest -q --timeout=900 "${targets[@]}" "$@"
