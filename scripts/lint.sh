#!/usr/bin/env bash
# Lint and type checks (a few seconds; run by scripts/test.sh before pytest, so by .ci/run too):
#   ruff check            every Python file (rules in ruff.toml)
#   ruff format --check   the modules written in the formatter's style (FORMATTED below; the older ones keep their
#                         hand-aligned style until they are next reworked, then join this list)
#   mypy                  the library (mypy.ini: strict for the integration seams, a ratchet list of modules still
#                         to be typed)
# DS_CONADV_SKIP_LINT=1 skips it (scripts/test.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$ROOT"
FORMATTED=(
    ds_conadv/_registry.py
    ds_conadv/config/builders.py
    ds_conadv/integrations/deepspeed/compat.py
    ds_conadv/integrations/deepspeed/monitor.py
    ds_conadv/integrations/deepspeed/zero_layout.py
    ds_conadv/integrations/horovod/compat.py
    ds_conadv/torch_compat.py
    tests/test_layout.py
    tests/test_compat.py
)
"$VENV/bin/ruff" check --quiet ds_conadv tests benchmarks examples kernels setup.py
"$VENV/bin/ruff" format --check --quiet "${FORMATTED[@]}"
"$VENV/bin/mypy" --config-file mypy.ini
