#!/usr/bin/env bash
# The DeepSpeed integration tests against the OLDEST DeepSpeed release ds_conadv declares supported
# (ds_conadv/integrations/deepspeed/compat.py MIN_VERSION = pyproject.toml's "deepspeed" extra), so that the range is
# tested, not claimed. The newest (the pinned test version) runs in scripts/test.sh.
#
# DeepSpeed goes into .ds-oldest/ (pip --target, no dependencies: the venv's, installed for the newest, serve;
# DS_BUILD_OPS=0: no op is compiled) and shadows the venv's through PYTHONPATH, for pytest and the ranks it starts.
# A few minutes on 2 cores: the install once (cached), then the DeepSpeed tests. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$ROOT"
OLDEST="$("$VPY" -c 'import ast, sys
src = open("ds_conadv/integrations/deepspeed/compat.py").read()
print(next(n.value.value for n in ast.parse(src).body if isinstance(n, ast.Assign)
           and getattr(n.targets[0], "id", "") == "MIN_VERSION"))')"
TARGET="$ROOT/.ds-oldest/$OLDEST"
if [ ! -f "$TARGET/.complete" ]; then
    _log "installing deepspeed==$OLDEST into $TARGET (no deps, DS_BUILD_OPS=0)"
    rm -rf "$TARGET"
    DS_BUILD_OPS=0 "$VPY" -m pip --disable-pip-version-check install --quiet --no-deps --no-build-isolation \
        --target "$TARGET" "deepspeed==$OLDEST"
    touch "$TARGET/.complete"
fi
have="$(PYTHONPATH="$TARGET" DS_ACCELERATOR=cpu "$VPY" -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null | tail -1)"
if [ "$have" != "$OLDEST" ]; then
    _log "ERROR: PYTHONPATH=$TARGET imports deepspeed $have, expected $OLDEST"; exit 1
fi
_log "DeepSpeed integration tests against deepspeed $have"
export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=1
# One test per private DeepSpeed part the seam uses (compat.PRIVATE_USES), not the whole matrix: the newest
# release runs every DeepSpeed test in scripts/test.sh. Arguments replace the selection (e.g. a whole file).
if [ $# -eq 0 ]; then
    set -- tests/test_compat.py \
        tests/test_deepspeed.py::test_zero_stages_equal_single_process \
        tests/test_deepspeed.py::test_naive_slices_would_differ \
        tests/test_deepspeed.py::test_bf16_stages_agree \
        "tests/test_deepspeed.py::test_zero_offload_steps_on_our_cpu_kernels_exactly[lamb-stages0]" \
        "tests/test_deepspeed.py::test_nonfinite_gradient_skips_the_step_on_every_rank[3-lamb-False]" \
        "tests/test_deepspeed.py::test_checkpoint_resume_equals_uninterrupted[3]" \
        tests/test_deepspeed.py::test_config_errors_name_the_key \
        tests/test_deepspeed.py::test_offload_config_errors_name_the_key \
        tests/test_conadv_deepspeed.py::test_generation_starts_when_the_reduction_begins \
        tests/test_conadv_deepspeed.py::test_zero_stages_agree_and_generation_overlaps \
        tests/test_monitor.py::test_metrics_in_tensorboard_and_csv
fi
exec "$VPY" -m pytest -q --timeout=900 "$@"
