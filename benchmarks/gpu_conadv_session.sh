#!/usr/bin/env bash
# One short GPU session for the ConAdv overlap: two DeepSpeed ranks share the GPU through gloo
# (NCCL refuses two ranks on one device), ZeRO 0 and 2, with and without CUDA MPS, each with the generation
# started at the reduction (default) and with the backward (conadv_bwd). With the argument "resnet": the
# ResNet-18-shaped CNN instead, with DeepSpeed's overlap_comm at ZeRO 1/2.
# Expects: repo root as cwd; wheels in .whl/ (DeepSpeed + deps); $OUT.
source "$(dirname "$0")/gpu_env.sh"  # $OUT, carried wheels, PYTHONPATH
LOG="$OUT/session.log"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$LOG" 2>&1
run() {  # $1: tag, rest: arguments
    local tag=$1; shift
    echo "=== $tag: $*" >> "$LOG"
    timeout 110 python3 benchmarks/conadv_overlap.py --device cuda --compare-start --tag "$tag" \
        --json "$OUT/conadv_overlap-cuda-$tag.json" "$@" 2>&1 | grep -v -i "warn\|return func" | tail -22 >> "$LOG"
}
if [ "${1:-}" = "resnet" ]; then
    # the ResNet-18 shape at ZeRO 0, 1 and 2, at 1 and 2 with DeepSpeed's overlap_comm beside ConAdv (modes *_oc)
    run r18-s0-b256 --model resnet18 --image-size 32 --batch 256 --stage 0 --rounds 15
    run r18-s1-b256 --model resnet18 --image-size 32 --batch 256 --stage 1 --rounds 15 --overlap-comm
    run r18-s2-b256 --model resnet18 --image-size 32 --batch 256 --stage 2 --rounds 15 --overlap-comm
    cat "$LOG"
    exit 0
fi
run s2-b2048 --stage 2 --batch 2048 --rounds 30
run s0-b2048 --stage 0 --batch 2048 --rounds 30
# The same with CUDA MPS: without it the two ranks' processes time-slice the GPU, so one rank's generation
# kernels can stall the other rank's gloo staging copies (a one-GPU artefact; ranks on separate GPUs have none).
if command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
    mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
    if nvidia-cuda-mps-control -d >> "$LOG" 2>&1; then
        echo "MPS daemon started" >> "$LOG"
        timeout 30 python3 -c "import torch; print('MPS client ok', torch.ones(1, device='cuda').item())" >> "$LOG" 2>&1 &&
        run s2-b2048-mps --stage 2 --batch 2048 --rounds 30
        run s0-b2048-mps --stage 0 --batch 2048 --rounds 30 &&
        run s2-b256-mps --stage 2 --batch 256 --rounds 30
        echo quit | nvidia-cuda-mps-control >> "$LOG" 2>&1
    fi
else
    echo "no nvidia-cuda-mps-control" >> "$LOG"
fi
cat "$LOG"
