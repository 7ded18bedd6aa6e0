#!/usr/bin/env bash
# Prepared, not yet run: the GPU half of the performance targets, in one short session (H100/H200).
#   * optimizer step vs torch's fused AdamW / SGD-momentum (ratio column), ResNet-50 and BERT-large, fp32 and
#     bf16 + fp32 master, cuda and triton backends, no CUDA graphs; the device copy bandwidth is in each JSON;
#   * host time of a step with no-op kernels (CPU side of the same machine), 161 and 391 tensors, plain and ZeRO layout.
# Expects: repo root as cwd; $OUT (see gpu_env.sh). About 4 minutes.
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/perf.log" 2>&1
for ps in resnet50 bert-large; do
    for dt in fp32 bf16-master; do
        timeout 150 python3 benchmarks/optim_step.py --device cuda --paramset $ps --dtype $dt --steps 30 --warmup 5 \
            --rounds 5 --backends cuda,triton --only 'LAMB[*],LARS[*]' --machine-label "$(nvidia-smi -L | head -1)" \
            --json "$OUT/optim_step-cuda-$ps-$dt-fused-anchor.json" --markdown "$OUT/benchmarks_gpu.md" \
            2>&1 | tail -12 >> "$OUT/perf.log"
    done
done
for ps in resnet50 bert-large; do
    for z in "" --zero-layout; do
        timeout 60 python3 benchmarks/host_overhead.py --paramset $ps $z --machine-label "host CPU of the GPU machine" \
            --json "$OUT/host_overhead-$ps$z.json" 2>&1 | tail -3 >> "$OUT/perf.log"
    done
done
cat "$OUT/perf.log"
