#!/usr/bin/env bash
# The main job: `ds-conadv train` = ConAdv training through DeepSpeed, by default the embedded
# configs/conadv_digits.json (a small CNN on scikit-learn's digits, LARS, ZeRO 1, ConAdv tau=1) on
# 2 CPU ranks (gloo), about a minute. Prints the final clean and adversarial test accuracy and writes
# runs/<config>-<timestamp>/{metrics.csv,metrics.json,curves.png}.
# Extra arguments go to `ds-conadv train`, e.g. `bash scripts/run.sh --optimizer lamb`,
# `bash scripts/run.sh --mode disadv`, `bash scripts/run.sh --config configs/conadv_digits_lamb.json`,
# `bash scripts/run.sh --nproc 1` (one process). `--nproc 2` is added unless you give --nproc or run
# under a launcher (RANK/WORLD_SIZE set). Sets up .venv/ on first use.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
args=("$@")
nproc=(--nproc 2)
for a in "$@"; do
    case "$a" in
        --nproc|--nproc=*|--print-config|-h|--help) nproc=() ;;
    esac
done
if [ -n "${RANK:-}${WORLD_SIZE:-}" ]; then nproc=(); fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$VENV/bin/ds-conadv" train "${nproc[@]}" "${args[@]}"
