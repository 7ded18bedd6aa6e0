#!/usr/bin/env bash
# The whole test suite (Triton kernels under the interpreter: no GPU needed). Extra arguments go to
# pytest; paths given narrow the run, e.g. `bash scripts/test.sh tests/test_cli_train.py -x`.
# Sets up .venv/ on first use.
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
export TRITON_INTERPRET=1
exec "$VENV/bin/python" -m pytest -q --timeout=900 "${targets[@]}" "$@"
