# Sourced by the GPU session scripts (benchmarks/gpu_*session.sh), run from the repo root on the device machine:
# $OUT for results, the carried wheels in .whl/ (DeepSpeed and its deps: the GPU image has none) on PYTHONPATH,
# and the repo importable as installed (ds_conadv.kernels -> kernels/, what setup.py's package_dir does).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ds_conadv_gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -e ds_conadv/kernels ] || ln -sfn ../kernels ds_conadv/kernels
