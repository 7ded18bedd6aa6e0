#!/usr/bin/env bash
# A short GPU check after a refactor: the CUDA and Triton kernel tests and the GPU optimizer tests
# (channels_last included) for real, then the LARS bf16 ResNet-50 step re-timed with more steps (its median was
# 2x its min on the H200) and the ConAdv overlap at ZeRO-1. Expects: repo root as cwd; wheels in .whl/; $OUT.
source "$(dirname "$0")/gpu_env.sh"  # $OUT, carried wheels, PYTHONPATH
LOG="$OUT/check.log"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$LOG" 2>&1
timeout 200 python3 -m pytest -q -p no:cacheprovider --timeout=180 tests/test_cuda_kernels.py \
    tests/test_triton_kernels.py tests/test_optim.py -k "not cpp" 2>&1 | tail -25 >> "$LOG"
echo "=== optim_step resnet50 bf16-master, LARS and AdamW(fused), 60 steps" >> "$LOG"
timeout 60 python3 benchmarks/optim_step.py --device cuda --paramset resnet50 --dtype bf16-master --steps 60 --warmup 5 \
    --backends triton,cuda --only "LARS[*],SGD(*)" --json "$OUT/optim_step-cuda-resnet50-bf16-master-lars.json" \
    2>&1 | tail -8 >> "$LOG"
echo "=== conadv overlap ZeRO-1" >> "$LOG"
timeout 90 python3 benchmarks/conadv_overlap.py --device cuda --compare-start --tag s1-b2048 --stage 1 --batch 2048 \
    --rounds 30 --json "$OUT/conadv_overlap-cuda-s1-b2048.json" 2>&1 | grep -E "exposed_fraction\"|wrote" >> "$LOG"
cat "$LOG"
