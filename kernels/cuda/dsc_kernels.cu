// ds_conadv fused multi-tensor LAMB / LARS CUDA kernels: __global__ wrappers, block reduction, launchers.
//
// Only CUDA headers (no torch/ATen/c10): this file compiles with a bare nvcc.  The element work is in
// dsc_multi_tensor.cuh (shared with the host emulation); the C interface is dsc_api.h.
//
// Launches per call, whatever the number of tensors:
//   dsc_sumsq2 / dsc_lamb_phase1: 1 element kernel (one block per work item, per-block partial sums)
//                                 + 1 per-segment reduction + 1 per-id reduction when seg_ids is given
//   dsc_lamb_phase2 / dsc_lars_phase2: 1 element kernel.
// All reductions are in a fixed order (no atomics): results are bitwise reproducible run to run.
#include <cuda_runtime.h>
#include <limits.h>

#include "dsc_api.h"
#include "dsc_multi_tensor.cuh"

namespace dsc {

// Sum a and b over the block (blockDim.x == kThreads); the result is valid in thread 0.  Fixed order.
__device__ __forceinline__ void block_reduce2(float& a, float& b) {
  __shared__ float sa[kThreads / 32];
  __shared__ float sb[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = 0.f;
    b = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) {
      a += sa[w];
      b += sb[w];
    }
  }
}

__global__ void __launch_bounds__(kThreads)
sumsq2_kernel(const int64_t* table, int64_t n_seg, int64_t n_items, SumsqArgs args, float* partial) {
  if (skipped(args.skip)) return;  // the segment reduction writes zeros
  const Table t = make_table(table, n_seg, n_items);
  float sa = 0.f, sb = 0.f;
  sumsq2_thread(t, args, blockIdx.x, threadIdx.x, sa, sb);
  block_reduce2(sa, sb);
  if (threadIdx.x == 0) {
    partial[2 * (int64_t)blockIdx.x] = sa;
    partial[2 * (int64_t)blockIdx.x + 1] = sb;
  }
}

__global__ void __launch_bounds__(kThreads)
lamb1_kernel(const int64_t* table, int64_t n_seg, int64_t n_items, Lamb1Args args, float* partial) {
  if (skipped(args.skip)) return;
  const Table t = make_table(table, n_seg, n_items);
  float su = 0.f, sp = 0.f;
  lamb1_thread(t, args, blockIdx.x, threadIdx.x, su, sp);
  block_reduce2(su, sp);
  if (threadIdx.x == 0) {
    partial[2 * (int64_t)blockIdx.x] = su;
    partial[2 * (int64_t)blockIdx.x + 1] = sp;
  }
}

__global__ void __launch_bounds__(kThreads)
lamb2_kernel(const int64_t* table, int64_t n_seg, int64_t n_items, Lamb2Args args) {
  if (skipped(args.skip)) return;
  const Table t = make_table(table, n_seg, n_items);
  lamb2_thread(t, args, blockIdx.x, threadIdx.x);
}

__global__ void __launch_bounds__(kThreads)
lars2_kernel(const int64_t* table, int64_t n_seg, int64_t n_items, Lars2Args args) {
  if (skipped(args.skip)) return;
  const Table t = make_table(table, n_seg, n_items);
  lars2_thread(t, args, blockIdx.x, threadIdx.x);
}

// One block per segment: out[2*s .. 2*s+1] = sum of the partials of its work items (zeros when skipped).
// (out_cols = 1: out[s] = a only.)
__global__ void __launch_bounds__(kThreads)
reduce_segments_kernel(const int64_t* table, int64_t n_seg, int64_t n_items, const float* partial,
                       const uint8_t* skip, float* out, int out_cols) {
  const Table t = make_table(table, n_seg, n_items);
  const int64_t s = blockIdx.x;
  const bool skip_now = skipped(skip);  // uniform over the block
  float a = 0.f, b = 0.f;
  if (!skip_now) reduce_segment_thread(t, partial, s, threadIdx.x, kThreads, a, b);
  block_reduce2(a, b);
  if (threadIdx.x == 0) write_sums(out, s, out_cols, a, b);
}

// One block per norm id: out[2*id .. 2*id+1] = sum of seg_sums over the segments with that id.
__global__ void __launch_bounds__(kThreads)
reduce_ids_kernel(const float* seg_sums, const int64_t* seg_ids, int64_t n_seg, float* out, int out_cols) {
  const int64_t id = blockIdx.x;
  float a = 0.f, b = 0.f;
  reduce_id_thread(seg_sums, seg_ids, n_seg, id, threadIdx.x, kThreads, a, b);
  block_reduce2(a, b);
  if (threadIdx.x == 0) write_sums(out, id, out_cols, a, b);
}

static bool grid_ok(int64_t n) { return n >= 0 && n <= (int64_t)INT_MAX; }

static int finish(int launched) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? launched : -(int)err;
}

// partial -> out [num_ids, 2] (through seg_sums when several segments may share an id).
static int launch_reductions(const int64_t* table, int64_t n_seg, int64_t n_items, const float* partial,
                             const int64_t* seg_ids, int64_t num_ids, const uint8_t* skip, float* seg_sums,
                             float* out, int out_cols, cudaStream_t stream) {
  int launched = 0;
  if (n_seg > 0) {
    if (seg_ids != nullptr) {
      reduce_segments_kernel<<<(unsigned)n_seg, kThreads, 0, stream>>>(table, n_seg, n_items, partial, skip,
                                                                       seg_sums, 2);
    } else {
      reduce_segments_kernel<<<(unsigned)n_seg, kThreads, 0, stream>>>(table, n_seg, n_items, partial, skip, out,
                                                                       out_cols);
    }
    ++launched;
  }
  if (seg_ids != nullptr && num_ids > 0) {
    reduce_ids_kernel<<<(unsigned)num_ids, kThreads, 0, stream>>>(seg_sums, seg_ids, n_seg, out, out_cols);
    ++launched;
  }
  return launched;
}

}  // namespace dsc

using namespace dsc;

extern "C" int dsc_chunk_elems(void) { return kChunk; }

extern "C" const char* dsc_error_string(int code) {
  if (code == (int)cudaErrorInvalidConfiguration) return "grid too large (more than 2^31-1 work items / ids)";
  return cudaGetErrorString((cudaError_t)code);
}

extern "C" int dsc_sumsq2(const int64_t* table, int64_t n_seg, int64_t n_items, const float* coef,
                          const int64_t* seg_ids, int64_t num_ids, const uint8_t* skip, float* partial,
                          float* seg_sums, float* out, int out_cols, void* stream) {
  if (!grid_ok(n_items) || !grid_ok(n_seg) || !grid_ok(num_ids)) return -(int)cudaErrorInvalidConfiguration;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  int launched = 0;
  if (n_items > 0) {
    sumsq2_kernel<<<(unsigned)n_items, kThreads, 0, st>>>(table, n_seg, n_items, sumsq_args(coef, skip), partial);
    ++launched;
  }
  launched += launch_reductions(table, n_seg, n_items, partial, seg_ids, num_ids, skip, seg_sums, out, out_cols,
                                st);
  return finish(launched);
}

extern "C" int dsc_lamb_phase1(const int64_t* table, int64_t n_seg, int64_t n_items, const float* coef,
                               const float* bc1, const float* bc2, float beta1, float beta2, float beta3,
                               float one_minus_beta2, float eps, float weight_decay, int adam_w_mode,
                               const int64_t* seg_ids, int64_t num_ids, const uint8_t* skip, float* partial,
                               float* seg_sums, float* out, void* stream) {
  if (!grid_ok(n_items) || !grid_ok(n_seg) || !grid_ok(num_ids)) return -(int)cudaErrorInvalidConfiguration;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  int launched = 0;
  if (n_items > 0) {
    const Lamb1Args a = lamb1_args(coef, bc1, bc2, beta1, beta2, beta3, one_minus_beta2, eps, weight_decay,
                                   adam_w_mode, skip);
    lamb1_kernel<<<(unsigned)n_items, kThreads, 0, st>>>(table, n_seg, n_items, a, partial);
    ++launched;
  }
  launched += launch_reductions(table, n_seg, n_items, partial, seg_ids, num_ids, skip, seg_sums, out, 2, st);
  return finish(launched);
}

extern "C" int dsc_lamb_phase2(const int64_t* table, int64_t n_seg, int64_t n_items, const float* step_size,
                               const int64_t* seg_ids, const float* bc1, const float* bc2, float eps,
                               float weight_decay, int adam_w_mode, const uint8_t* skip, void* stream) {
  if (!grid_ok(n_items)) return -(int)cudaErrorInvalidConfiguration;
  if (n_items == 0) return 0;
  const Lamb2Args a = lamb2_args(step_size, seg_ids, bc1, bc2, eps, weight_decay, adam_w_mode, skip);
  lamb2_kernel<<<(unsigned)n_items, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(table, n_seg, n_items,
                                                                                            a);
  return finish(1);
}

extern "C" int dsc_lars_phase2(const int64_t* table, int64_t n_seg, int64_t n_items, const float* coef,
                               const float* ratio, const int64_t* seg_ids, const float* steps, const float* lr_ptr,
                               float lr, float weight_decay, float momentum, float one_minus_dampening,
                               int nesterov, const uint8_t* skip, void* stream) {
  if (!grid_ok(n_items)) return -(int)cudaErrorInvalidConfiguration;
  if (n_items == 0) return 0;
  const Lars2Args a = lars2_args(coef, ratio, seg_ids, steps, lr_ptr, lr, weight_decay, momentum, one_minus_dampening,
                                 nesterov, skip);
  lars2_kernel<<<(unsigned)n_items, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(table, n_seg, n_items,
                                                                                            a);
  return finish(1);
}
