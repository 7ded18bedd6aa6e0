#!/usr/bin/env bash
# One short GPU session on an H100 or H200: tests the CUDA and Triton kernels for real,
# then benchmarks every optimizer step on ResNet-50 and BERT-large shapes, fp32 and bf16-with-master.
# Expects: repo root as cwd; optional wheels in .whl/ (DeepSpeed + deps, for deepspeed.FusedLamb); $OUT.
source "$(dirname "$0")/gpu_env.sh"  # $OUT, carried wheels, PYTHONPATH
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/tests.log" 2>&1
# DeepSpeed's FusedLamb is JIT-built on first use: build it while the tests run
(timeout 240 python3 -c "from deepspeed.ops.op_builder import FusedLambBuilder; FusedLambBuilder().load()" \
    > "$OUT/ds_build.log" 2>&1 &)
timeout 170 python3 -m pytest -q -p no:cacheprovider --timeout=150 tests/test_cuda_kernels.py tests/test_triton_kernels.py \
    2>&1 | tail -40 >> "$OUT/tests.log"
for ps in resnet50 bert-large; do
    for dt in fp32 bf16-master; do
        timeout 120 python3 benchmarks/optim_step.py --device cuda --paramset $ps --dtype $dt --steps 20 --warmup 3 \
            --backends triton,cuda,foreach --json "$OUT/optim_step-cuda-$ps-$dt.json" --markdown "$OUT/benchmarks_gpu.md" \
            2>&1 | tee -a "$OUT/bench.log" | tail -20
    done
done
tail -3 "$OUT/ds_build.log" >> "$OUT/tests.log"
cat "$OUT/tests.log"
