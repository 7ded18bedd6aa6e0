// Host (CPU) emulation of dsc_kernels.cu, for tests on machines without a GPU.
//
// Implements the dsc_api.h launchers by running the same per-thread element code (dsc_multi_tensor.cuh) for
// every (work item, thread) in turn on the CPU; only the block reduction (a fixed-order sum over the block's
// threads here, a shuffle tree on the GPU) and the launch itself differ from the GPU build.  Pointers are host
// addresses (CPU tensors).  Build: g++ -O1 -std=c++17 -shared -fPIC -I<cuda>/include dsc_host_emulation.cpp
#include "dsc_api.h"
#include "dsc_multi_tensor.cuh"

using namespace dsc;

namespace {

template <typename F>
void run_items(int64_t n_items, float* partial, F&& thread_fn) {
  for (int64_t item = 0; item < n_items; ++item) {
    float a_block = 0.f, b_block = 0.f;
    for (int tid = 0; tid < kThreads; ++tid) {
      float a = 0.f, b = 0.f;
      thread_fn(item, tid, a, b);
      a_block += a;
      b_block += b;
    }
    if (partial != nullptr) {
      partial[2 * item] = a_block;
      partial[2 * item + 1] = b_block;
    }
  }
}

int reductions(const int64_t* table, int64_t n_seg, int64_t n_items, const float* partial, const int64_t* seg_ids,
               int64_t num_ids, const uint8_t* skip, float* seg_sums, float* out, int out_cols) {
  const Table t = make_table(table, n_seg, n_items);
  float* seg_out = seg_ids != nullptr ? seg_sums : out;
  const int seg_cols = seg_ids != nullptr ? 2 : out_cols;
  int launched = 0;
  if (n_seg > 0) {
    for (int64_t s = 0; s < n_seg; ++s) {
      float a = 0.f, b = 0.f;
      if (!skipped(skip)) {
        for (int tid = 0; tid < kThreads; ++tid) {
          float ta = 0.f, tb = 0.f;
          reduce_segment_thread(t, partial, s, tid, kThreads, ta, tb);
          a += ta;
          b += tb;
        }
      }
      write_sums(seg_out, s, seg_cols, a, b);
    }
    ++launched;
  }
  if (seg_ids != nullptr && num_ids > 0) {
    for (int64_t id = 0; id < num_ids; ++id) {
      float a = 0.f, b = 0.f;
      for (int tid = 0; tid < kThreads; ++tid) {
        float ta = 0.f, tb = 0.f;
        reduce_id_thread(seg_sums, seg_ids, n_seg, id, tid, kThreads, ta, tb);
        a += ta;
        b += tb;
      }
      write_sums(out, id, out_cols, a, b);
    }
    ++launched;
  }
  return launched;
}

}  // namespace

extern "C" int dsc_chunk_elems(void) { return kChunk; }

extern "C" const char* dsc_error_string(int) { return "host emulation error"; }

extern "C" int dsc_sumsq2(const int64_t* table, int64_t n_seg, int64_t n_items, const float* coef,
                          const int64_t* seg_ids, int64_t num_ids, const uint8_t* skip, float* partial,
                          float* seg_sums, float* out, int out_cols, void*) {
  const Table t = make_table(table, n_seg, n_items);
  const SumsqArgs a = sumsq_args(coef, skip);
  int launched = 0;
  if (n_items > 0) {
    if (!skipped(skip))
      run_items(n_items, partial,
                [&](int64_t item, int tid, float& x, float& y) { sumsq2_thread(t, a, item, tid, x, y); });
    ++launched;
  }
  return launched + reductions(table, n_seg, n_items, partial, seg_ids, num_ids, skip, seg_sums, out, out_cols);
}

extern "C" int dsc_lamb_phase1(const int64_t* table, int64_t n_seg, int64_t n_items, const float* coef,
                               const float* bc1, const float* bc2, float beta1, float beta2, float beta3,
                               float one_minus_beta2, float eps, float weight_decay, int adam_w_mode,
                               const int64_t* seg_ids, int64_t num_ids, const uint8_t* skip, float* partial,
                               float* seg_sums, float* out, void*) {
  const Table t = make_table(table, n_seg, n_items);
  const Lamb1Args a = lamb1_args(coef, bc1, bc2, beta1, beta2, beta3, one_minus_beta2, eps, weight_decay, adam_w_mode,
                                 skip);
  int launched = 0;
  if (n_items > 0) {
    if (!skipped(skip))
      run_items(n_items, partial,
                [&](int64_t item, int tid, float& x, float& y) { lamb1_thread(t, a, item, tid, x, y); });
    ++launched;
  }
  return launched + reductions(table, n_seg, n_items, partial, seg_ids, num_ids, skip, seg_sums, out, 2);
}

extern "C" int dsc_lamb_phase2(const int64_t* table, int64_t n_seg, int64_t n_items, const float* step_size,
                               const int64_t* seg_ids, const float* bc1, const float* bc2, float eps,
                               float weight_decay, int adam_w_mode, const uint8_t* skip, void*) {
  if (n_items == 0) return 0;
  const Table t = make_table(table, n_seg, n_items);
  const Lamb2Args a = lamb2_args(step_size, seg_ids, bc1, bc2, eps, weight_decay, adam_w_mode, skip);
  if (!skipped(skip))
    run_items(n_items, nullptr, [&](int64_t item, int tid, float&, float&) { lamb2_thread(t, a, item, tid); });
  return 1;
}

extern "C" int dsc_lars_phase2(const int64_t* table, int64_t n_seg, int64_t n_items, const float* coef,
                               const float* ratio, const int64_t* seg_ids, const float* steps, const float* lr_ptr,
                               float lr, float weight_decay, float momentum, float one_minus_dampening,
                               int nesterov, const uint8_t* skip, void*) {
  if (n_items == 0) return 0;
  const Table t = make_table(table, n_seg, n_items);
  const Lars2Args a = lars2_args(coef, ratio, seg_ids, steps, lr_ptr, lr, weight_decay, momentum, one_minus_dampening,
                                 nesterov, skip);
  if (!skipped(skip))
    run_items(n_items, nullptr, [&](int64_t item, int tid, float&, float&) { lars2_thread(t, a, item, tid); });
  return 1;
}
