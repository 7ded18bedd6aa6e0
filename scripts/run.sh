#!/usr/bin/env bash
# The main job: `ds-conadv train` on its embedded default (MLP on scikit-learn digits, large batch,
# LAMB). Extra arguments go to `ds-conadv train`, e.g. `bash scripts/run.sh --optimizer lars`
# or `bash scripts/run.sh --config configs/digits_lars.json`. Sets up .venv/ on first use.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
exec "$VENV/bin/ds-conadv" train "$@"
