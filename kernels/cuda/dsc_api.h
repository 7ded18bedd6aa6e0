// ds_conadv fused multi-tensor LAMB / LARS kernels: the C launcher interface.
//
// Plain C, no CUDA and no torch headers: it is included by the CUDA sources (dsc_kernels.cu), the torch
// binding (dsc_binding.cpp) and the host emulation used by the CPU tests (dsc_host_emulation.cpp).
//
// Every pointer is a raw device address (host address in the emulation).  ``table`` is the int64 segment /
// work-item table built by ``ds_conadv.kernels.cuda.build_table`` (layout in dsc_multi_tensor.cuh).
// Nullable pointers: coef (no grad coefficient), seg_ids (identity: segment s is norm id s), skip (never
// skip), lr_ptr (use the ``lr`` value), seg_sums (only needed when seg_ids is given).
// Per-segment vectors (bc1, bc2, steps) have n_seg fp32 entries; per-id vectors (step_size, ratio) num_ids.
// ``skip`` points to one byte (a torch.bool): when it is non-zero the kernels write nothing but zero sums.
//
// Every launcher returns the number of kernels it launched (>= 0), or -(cudaError_t) when a launch failed.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Work-item size in elements; the table builder must use the same value.
int dsc_chunk_elems(void);
const char* dsc_error_string(int code);

// out[id] = (sum over segments s of id, of (coef * G)^2 ;  sum of P^2) with P absent -> 0.
// Used for sumsq (G = the tensors) and for the first LARS pass (G = grads, P = params).
// out_cols = 2: out is [num_ids, 2]; out_cols = 1: out is [num_ids] and receives only the first sum.
int dsc_sumsq2(const int64_t* table, int64_t n_seg, int64_t n_items, const float* coef, const int64_t* seg_ids,
               int64_t num_ids, const uint8_t* skip, float* partial, float* seg_sums, float* out, int out_cols,
               void* stream);

// First LAMB pass: g = coef*G (+ wd*P unless adam_w_mode); m = beta1*m + beta3*g; v = beta2*v + (1-beta2)*g^2;
// u = (m/bc1)/(sqrt(v/bc2)+eps) (+ wd*P if adam_w_mode and wd != 0); out[id] = (sum u^2, sum P^2).
int dsc_lamb_phase1(const int64_t* table, int64_t n_seg, int64_t n_items, const float* coef, const float* bc1,
                    const float* bc2, float beta1, float beta2, float beta3, float one_minus_beta2, float eps,
                    float weight_decay, int adam_w_mode, const int64_t* seg_ids, int64_t num_ids,
                    const uint8_t* skip, float* partial, float* seg_sums, float* out, void* stream);

// Second LAMB pass: u recomputed as in pass 1; P = P - step_size[id] * u; model copy (if any) = rounded P.
int dsc_lamb_phase2(const int64_t* table, int64_t n_seg, int64_t n_items, const float* step_size,
                    const int64_t* seg_ids, const float* bc1, const float* bc2, float eps, float weight_decay,
                    int adam_w_mode, const uint8_t* skip, void* stream);

// Second LARS pass: d = ratio[id]*(coef*G + wd*P); buf = d if steps[s] == 1 else momentum*buf + (1-dampening)*d;
// d = d + momentum*buf if nesterov else buf; P = P - lr*d (lr = *lr_ptr if given); model copy = rounded P.
int dsc_lars_phase2(const int64_t* table, int64_t n_seg, int64_t n_items, const float* coef, const float* ratio,
                    const int64_t* seg_ids, const float* steps, const float* lr_ptr, float lr, float weight_decay,
                    float momentum, float one_minus_dampening, int nesterov, const uint8_t* skip, void* stream);

#ifdef __cplusplus
}
#endif
