// ds_conadv fused multi-tensor LAMB / LARS: the per-thread work, shared by the CUDA kernels and the host
// emulation.
//
// Only CUDA's own headers (no torch): everything here is ``__host__ __device__`` so that
// dsc_host_emulation.cpp can run the exact same element code on the CPU (g++), which is how the indexing,
// masking, alignment and dtype handling are tested on machines without a GPU.  What is GPU-only lives in
// dsc_kernels.cu: the block reduction, the __global__ wrappers and the launchers.
//
// ---------------------------------------------------------------------------------------------------------
// Table (one int64 array, built on the host by ds_conadv.kernels.cuda.build_table, uploaded once and cached):
//
//   ptrs[n_seg * kSlots]   addresses of the segment's tensors, slot order kP, kG, kS0, kS1, kM (0: absent)
//   numel[n_seg]           elements of the segment (all its tensors have this many)
//   meta[n_seg]            bits 0-1: code of P, 2-3: code of G, 4-5: code of M (kF32, kBF16, kF16, kNone),
//                          bits 6-7: ``off``, bit 8: ``vec`` (see below)
//   item_begin[n_seg + 1]  the work items of segment s are item_begin[s] .. item_begin[s+1]-1
//   items[n_items]         (s << 32) | chunk
//
// Work item (s, chunk) = one thread block.  Elements are addressed in a "virtual" index space shifted by
// ``off`` (0..3) so that virtual index 0 mod 4 is a 4-element-aligned address for every tensor of the
// segment: element e <-> virtual index e + off.  The item covers virtual indices
// [chunk * kChunk, (chunk + 1) * kChunk); thread ``tid`` handles the kIlp groups of 4 consecutive virtual
// indices starting at 4 * (chunk * kGroupsPerItem + r * kThreads + tid), r = 0 .. kIlp-1 (coalesced).
// A group whose 4 elements all lie in [0, numel) is read/written with one vector access when ``vec`` is set
// (every tensor of the segment has the same misalignment ``off`` = (address / element size) mod 4);
// otherwise, and for the partial groups at the ends, element by element with bounds checks.  So segments
// may start at any element offset (ZeRO partitions); unaligned segments just take the scalar path.
// ---------------------------------------------------------------------------------------------------------
#pragma once

#include <math.h>
#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#if defined(__CUDACC__)
#define DSC_HD __host__ __device__ __forceinline__
#else
#define DSC_HD inline
#endif
#if defined(__CUDA_ARCH__)  // device compilation pass only (the host compiler does not know the pragma)
#define DSC_UNROLL _Pragma("unroll")
#else
#define DSC_UNROLL
#endif

namespace dsc {

constexpr int kThreads = 256;                      // threads per block (a multiple of 32)
constexpr int kVec = 4;                            // elements per group
constexpr int kIlp = 4;                            // groups per thread per work item (loads in flight)
constexpr int kGroupsPerItem = kThreads * kIlp;    // 1024
constexpr int kChunk = kGroupsPerItem * kVec;      // 4096 elements per work item

enum Code : int { kF32 = 0, kBF16 = 1, kF16 = 2, kNone = 3 };
enum Slot : int { kP = 0, kG = 1, kS0 = 2, kS1 = 3, kM = 4, kSlots = 5 };

DSC_HD int code_p(int64_t meta) { return (int)(meta & 3); }
DSC_HD int code_g(int64_t meta) { return (int)((meta >> 2) & 3); }
DSC_HD int code_m(int64_t meta) { return (int)((meta >> 4) & 3); }
DSC_HD int meta_off(int64_t meta) { return (int)((meta >> 6) & 3); }
DSC_HD bool meta_vec(int64_t meta) { return ((meta >> 8) & 1) != 0; }

struct Table {
  const int64_t* ptrs;
  const int64_t* numel;
  const int64_t* meta;
  const int64_t* item_begin;
  const int64_t* items;
  int64_t n_seg;
  int64_t n_items;
};

DSC_HD Table make_table(const int64_t* base, int64_t n_seg, int64_t n_items) {
  Table t;
  t.ptrs = base;
  t.numel = base + kSlots * n_seg;
  t.meta = t.numel + n_seg;
  t.item_begin = t.meta + n_seg;
  t.items = t.item_begin + n_seg + 1;
  t.n_seg = n_seg;
  t.n_items = n_items;
  return t;
}

// One work item, decoded.
struct Item {
  int64_t seg;
  int64_t chunk;
  int64_t n;     // numel of the segment
  int64_t meta;
  const int64_t* ptr;  // the kSlots addresses of the segment
};

DSC_HD Item decode_item(const Table& t, int64_t item) {
  Item it;
  const int64_t w = t.items[item];
  it.seg = w >> 32;
  it.chunk = w & 0xffffffffLL;
  it.n = t.numel[it.seg];
  it.meta = t.meta[it.seg];
  it.ptr = t.ptrs + kSlots * it.seg;
  return it;
}

template <typename T>
DSC_HD T* slot_ptr(const Item& it, int slot) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(it.ptr[slot]));
}

// First element index of each of the thread's kIlp groups, and whether the group can use a vector access.
DSC_HD void group_positions(const Item& it, int tid, int64_t (&e0)[kIlp], bool (&full)[kIlp]) {
  const int off = meta_off(it.meta);
  const bool vec = meta_vec(it.meta);
DSC_UNROLL
  for (int r = 0; r < kIlp; ++r) {
    const int64_t k = it.chunk * kGroupsPerItem + (int64_t)r * kThreads + tid;
    e0[r] = k * kVec - off;
    full[r] = vec && e0[r] >= 0 && e0[r] + kVec <= it.n;
  }
}

DSC_HD bool in_range(int64_t e, int64_t n) { return e >= 0 && e < n; }

// ---------------------------------------------------------------------------------------------------------
// Element access: load as fp32, store rounding to nearest even.  NoneT = absent tensor (loads 0, no stores).
// No implicit half/bfloat16 conversions (torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends).
// ---------------------------------------------------------------------------------------------------------
struct NoneT {};
struct alignas(8) BF16x4 { __nv_bfloat16 v[4]; };
struct alignas(8) F16x4 { __half v[4]; };

template <typename T>
struct IO;

template <>
struct IO<float> {
  static DSC_HD float get(const float* p, int64_t i) { return p[i]; }
  static DSC_HD void put(float* p, int64_t i, float x) { p[i] = x; }
  static DSC_HD void get4(const float* p, int64_t i, float (&x)[4]) {
    const float4 q = *reinterpret_cast<const float4*>(p + i);
    x[0] = q.x; x[1] = q.y; x[2] = q.z; x[3] = q.w;
  }
  static DSC_HD void put4(float* p, int64_t i, const float (&x)[4]) {
    float4 q;
    q.x = x[0]; q.y = x[1]; q.z = x[2]; q.w = x[3];
    *reinterpret_cast<float4*>(p + i) = q;
  }
};

template <>
struct IO<__nv_bfloat16> {
  static DSC_HD float get(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
  static DSC_HD void put(__nv_bfloat16* p, int64_t i, float x) { p[i] = __float2bfloat16_rn(x); }
  static DSC_HD void get4(const __nv_bfloat16* p, int64_t i, float (&x)[4]) {
    const BF16x4 q = *reinterpret_cast<const BF16x4*>(p + i);
DSC_UNROLL
    for (int j = 0; j < 4; ++j) x[j] = __bfloat162float(q.v[j]);
  }
  static DSC_HD void put4(__nv_bfloat16* p, int64_t i, const float (&x)[4]) {
    BF16x4 q;
DSC_UNROLL
    for (int j = 0; j < 4; ++j) q.v[j] = __float2bfloat16_rn(x[j]);
    *reinterpret_cast<BF16x4*>(p + i) = q;
  }
};

template <>
struct IO<__half> {
  static DSC_HD float get(const __half* p, int64_t i) { return __half2float(p[i]); }
  static DSC_HD void put(__half* p, int64_t i, float x) { p[i] = __float2half_rn(x); }
  static DSC_HD void get4(const __half* p, int64_t i, float (&x)[4]) {
    const F16x4 q = *reinterpret_cast<const F16x4*>(p + i);
DSC_UNROLL
    for (int j = 0; j < 4; ++j) x[j] = __half2float(q.v[j]);
  }
  static DSC_HD void put4(__half* p, int64_t i, const float (&x)[4]) {
    F16x4 q;
DSC_UNROLL
    for (int j = 0; j < 4; ++j) q.v[j] = __float2half_rn(x[j]);
    *reinterpret_cast<F16x4*>(p + i) = q;
  }
};

template <>
struct IO<NoneT> {
  static DSC_HD float get(const NoneT*, int64_t) { return 0.f; }
  static DSC_HD void put(NoneT*, int64_t, float) {}
  static DSC_HD void get4(const NoneT*, int64_t, float (&x)[4]) { x[0] = x[1] = x[2] = x[3] = 0.f; }
  static DSC_HD void put4(NoneT*, int64_t, const float (&)[4]) {}
};

// The 4 elements e0 .. e0+3 (those in [0, n); the others read as 0 / are not written).
template <typename T>
DSC_HD void load4(const T* p, int64_t e0, int64_t n, bool full, float (&x)[4]) {
  if (full) {
    IO<T>::get4(p, e0, x);
    return;
  }
DSC_UNROLL
  for (int j = 0; j < 4; ++j) x[j] = in_range(e0 + j, n) ? IO<T>::get(p, e0 + j) : 0.f;
}

template <typename T>
DSC_HD void store4(T* p, int64_t e0, int64_t n, bool full, const float (&x)[4]) {
  if (full) {
    IO<T>::put4(p, e0, x);
    return;
  }
DSC_UNROLL
  for (int j = 0; j < 4; ++j)
    if (in_range(e0 + j, n)) IO<T>::put(p, e0 + j, x[j]);
}

// Runtime dtype code -> type NAME, then run the statement(s).  The switch is uniform per block (one segment).
#define DSC_CASE_(CODE, TYPE, NAME, ...) \
  case CODE: {                           \
    typedef TYPE NAME;                   \
    __VA_ARGS__                          \
  } break;
#define DSC_DISPATCH_FLOAT(code, NAME, ...)                     \
  switch (code) {                                               \
    DSC_CASE_(::dsc::kF32, float, NAME, __VA_ARGS__)            \
    DSC_CASE_(::dsc::kBF16, __nv_bfloat16, NAME, __VA_ARGS__)   \
    DSC_CASE_(::dsc::kF16, __half, NAME, __VA_ARGS__)           \
    default: break;                                             \
  }
#define DSC_DISPATCH_OPTIONAL(code, NAME, ...)                  \
  switch (code) {                                               \
    DSC_CASE_(::dsc::kF32, float, NAME, __VA_ARGS__)            \
    DSC_CASE_(::dsc::kBF16, __nv_bfloat16, NAME, __VA_ARGS__)   \
    DSC_CASE_(::dsc::kF16, __half, NAME, __VA_ARGS__)           \
    DSC_CASE_(::dsc::kNone, ::dsc::NoneT, NAME, __VA_ARGS__)    \
    default: break;                                             \
  }

// Param type TP and model-copy type TM: a model copy exists only next to fp32 (master) params, so bf16/fp16
// params are only instantiated without one (the Python layer rejects other combinations).
#define DSC_DISPATCH_PARAM_MODEL(cp, cm, TP, TM, ...)                        \
  switch (cp) {                                                               \
    case ::dsc::kF32: {                                                       \
      typedef float TP;                                                       \
      DSC_DISPATCH_OPTIONAL(cm, TM, __VA_ARGS__)                              \
    } break;                                                                  \
    case ::dsc::kBF16:                                                        \
      if ((cm) == ::dsc::kNone) {                                             \
        typedef __nv_bfloat16 TP;                                             \
        typedef ::dsc::NoneT TM;                                              \
        __VA_ARGS__                                                           \
      }                                                                       \
      break;                                                                  \
    case ::dsc::kF16:                                                         \
      if ((cm) == ::dsc::kNone) {                                             \
        typedef __half TP;                                                    \
        typedef ::dsc::NoneT TM;                                              \
        __VA_ARGS__                                                           \
      }                                                                       \
      break;                                                                  \
    default: break;                                                           \
  }

// ---------------------------------------------------------------------------------------------------------
// Kernel arguments (passed by value to the kernels).
// ---------------------------------------------------------------------------------------------------------
struct SumsqArgs {
  const float* coef;     // nullable
  const uint8_t* skip;   // nullable
};

struct Lamb1Args {
  const float* coef;     // nullable
  const float* bc1;      // [n_seg]
  const float* bc2;      // [n_seg]
  float beta1, beta2, beta3, one_minus_beta2, eps, weight_decay;
  int adam_w_mode;
  const uint8_t* skip;
};

struct Lamb2Args {
  const float* step_size;  // [num_ids]
  const int64_t* seg_ids;  // nullable
  const float* bc1;
  const float* bc2;
  float eps, weight_decay;
  int adam_w_mode;
  const uint8_t* skip;
};

struct Lars2Args {
  const float* coef;       // nullable
  const float* ratio;      // [num_ids]
  const int64_t* seg_ids;  // nullable
  const float* steps;      // [n_seg]
  const float* lr_ptr;     // nullable: then lr
  float lr, weight_decay, momentum, one_minus_dampening;
  int nesterov;
  const uint8_t* skip;
};

// The arguments of each dsc_api.h launcher, in its order, packed for the kernels: one mapping, used by the GPU
// launchers (dsc_kernels.cu) and the host emulation (dsc_host_emulation.cpp) alike.
inline SumsqArgs sumsq_args(const float* coef, const uint8_t* skip) {
  SumsqArgs a;
  a.coef = coef;
  a.skip = skip;
  return a;
}

inline Lamb1Args lamb1_args(const float* coef, const float* bc1, const float* bc2, float beta1, float beta2,
                            float beta3, float one_minus_beta2, float eps, float weight_decay, int adam_w_mode,
                            const uint8_t* skip) {
  Lamb1Args a;
  a.coef = coef;
  a.bc1 = bc1;
  a.bc2 = bc2;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.beta3 = beta3;
  a.one_minus_beta2 = one_minus_beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.adam_w_mode = adam_w_mode;
  a.skip = skip;
  return a;
}

inline Lamb2Args lamb2_args(const float* step_size, const int64_t* seg_ids, const float* bc1, const float* bc2,
                            float eps, float weight_decay, int adam_w_mode, const uint8_t* skip) {
  Lamb2Args a;
  a.step_size = step_size;
  a.seg_ids = seg_ids;
  a.bc1 = bc1;
  a.bc2 = bc2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.adam_w_mode = adam_w_mode;
  a.skip = skip;
  return a;
}

inline Lars2Args lars2_args(const float* coef, const float* ratio, const int64_t* seg_ids, const float* steps,
                            const float* lr_ptr, float lr, float weight_decay, float momentum,
                            float one_minus_dampening, int nesterov, const uint8_t* skip) {
  Lars2Args a;
  a.coef = coef;
  a.ratio = ratio;
  a.seg_ids = seg_ids;
  a.steps = steps;
  a.lr_ptr = lr_ptr;
  a.lr = lr;
  a.weight_decay = weight_decay;
  a.momentum = momentum;
  a.one_minus_dampening = one_minus_dampening;
  a.nesterov = nesterov;
  a.skip = skip;
  return a;
}

DSC_HD bool skipped(const uint8_t* skip) { return skip != nullptr && *skip != 0; }

DSC_HD int64_t norm_id(const int64_t* seg_ids, int64_t s) { return seg_ids != nullptr ? seg_ids[s] : s; }

// u = (m / bc1) / (sqrt(v / bc2) + eps) (+ wd * p): the LAMB direction, the same code in both passes.
DSC_HD float lamb_direction(float p, float m, float v, float bc1, float bc2, float eps, float weight_decay,
                            bool decoupled_decay) {
  float u = (m / bc1) / (sqrtf(v / bc2) + eps);
  if (decoupled_decay) u = u + weight_decay * p;
  return u;
}

// ---------------------------------------------------------------------------------------------------------
// sum (coef * G)^2 and sum P^2 (P may be absent).
// ---------------------------------------------------------------------------------------------------------
template <typename TG, typename TP>
DSC_HD void sumsq2_body(const Item& it, int tid, float coef, float& sa, float& sb) {
  const TG* g = slot_ptr<const TG>(it, kG);
  const TP* p = slot_ptr<const TP>(it, kP);
  int64_t e0[kIlp];
  bool full[kIlp];
  group_positions(it, tid, e0, full);
  float xg[kIlp][kVec], xp[kIlp][kVec];
DSC_UNROLL
  for (int r = 0; r < kIlp; ++r) {
    load4(g, e0[r], it.n, full[r], xg[r]);
    load4(p, e0[r], it.n, full[r], xp[r]);
  }
DSC_UNROLL
  for (int r = 0; r < kIlp; ++r) {
DSC_UNROLL
    for (int j = 0; j < kVec; ++j) {
      if (!in_range(e0[r] + j, it.n)) continue;  // (0 * an inf coef would be NaN)
      const float gj = xg[r][j] * coef;
      sa += gj * gj;
      sb += xp[r][j] * xp[r][j];
    }
  }
}

DSC_HD void sumsq2_thread(const Table& t, const SumsqArgs& a, int64_t item, int tid, float& sa, float& sb) {
  const Item it = decode_item(t, item);
  const float coef = a.coef != nullptr ? *a.coef : 1.f;
  DSC_DISPATCH_FLOAT(code_g(it.meta), TG,
                     DSC_DISPATCH_OPTIONAL(code_p(it.meta), TP, sumsq2_body<TG, TP>(it, tid, coef, sa, sb);))
}

// ---------------------------------------------------------------------------------------------------------
// LAMB pass 1: moments + (sum u^2, sum p^2).
// ---------------------------------------------------------------------------------------------------------
template <typename TP, typename TG>
DSC_HD void lamb1_body(const Item& it, int tid, const Lamb1Args& a, float coef, float bc1, float bc2, float& su,
                       float& sp) {
  const TP* p = slot_ptr<const TP>(it, kP);
  const TG* g = slot_ptr<const TG>(it, kG);
  float* m = slot_ptr<float>(it, kS0);
  float* v = slot_ptr<float>(it, kS1);
  int64_t e0[kIlp];
  bool full[kIlp];
  group_positions(it, tid, e0, full);
  float xp[kIlp][kVec], xg[kIlp][kVec], xm[kIlp][kVec], xv[kIlp][kVec];
DSC_UNROLL
  for (int r = 0; r < kIlp; ++r) {
    load4(p, e0[r], it.n, full[r], xp[r]);
    load4(g, e0[r], it.n, full[r], xg[r]);
    load4(m, e0[r], it.n, full[r], xm[r]);
    load4(v, e0[r], it.n, full[r], xv[r]);
  }
  const bool l2 = !a.adam_w_mode && a.weight_decay != 0.f;
  const bool decoupled = a.adam_w_mode && a.weight_decay != 0.f;
DSC_UNROLL
  for (int r = 0; r < kIlp; ++r) {
DSC_UNROLL
    for (int j = 0; j < kVec; ++j) {
      if (!in_range(e0[r] + j, it.n)) continue;  // eps may be 0: never compute 0/0 into the sums
      const float pj = xp[r][j];
      float gj = xg[r][j] * coef;
      if (l2) gj = gj + a.weight_decay * pj;
      const float mj = a.beta1 * xm[r][j] + a.beta3 * gj;
      const float vj = a.beta2 * xv[r][j] + a.one_minus_beta2 * gj * gj;
      xm[r][j] = mj;
      xv[r][j] = vj;
      const float u = lamb_direction(pj, mj, vj, bc1, bc2, a.eps, a.weight_decay, decoupled);
      su += u * u;
      sp += pj * pj;
    }
  }
DSC_UNROLL
  for (int r = 0; r < kIlp; ++r) {
    store4(m, e0[r], it.n, full[r], xm[r]);
    store4(v, e0[r], it.n, full[r], xv[r]);
  }
}

DSC_HD void lamb1_thread(const Table& t, const Lamb1Args& a, int64_t item, int tid, float& su, float& sp) {
  const Item it = decode_item(t, item);
  const float coef = a.coef != nullptr ? *a.coef : 1.f;
  const float bc1 = a.bc1[it.seg];
  const float bc2 = a.bc2[it.seg];
  DSC_DISPATCH_FLOAT(code_p(it.meta), TP,
                     DSC_DISPATCH_FLOAT(code_g(it.meta), TG,
                                        lamb1_body<TP, TG>(it, tid, a, coef, bc1, bc2, su, sp);))
}

// ---------------------------------------------------------------------------------------------------------
// LAMB pass 2: p -= step_size[id] * u; rounded model copy.
// ---------------------------------------------------------------------------------------------------------
template <typename TP, typename TM>
DSC_HD void lamb2_body(const Item& it, int tid, const Lamb2Args& a, float step, float bc1, float bc2) {
  TP* p = slot_ptr<TP>(it, kP);
  const float* m = slot_ptr<const float>(it, kS0);
  const float* v = slot_ptr<const float>(it, kS1);
  TM* model = slot_ptr<TM>(it, kM);
  int64_t e0[kIlp];
  bool full[kIlp];
  group_positions(it, tid, e0, full);
  float xp[kIlp][kVec], xm[kIlp][kVec], xv[kIlp][kVec];
DSC_UNROLL
  for (int r = 0; r < kIlp; ++r) {
    load4(p, e0[r], it.n, full[r], xp[r]);
    load4(m, e0[r], it.n, full[r], xm[r]);
    load4(v, e0[r], it.n, full[r], xv[r]);
  }
  const bool decoupled = a.adam_w_mode && a.weight_decay != 0.f;
DSC_UNROLL
  for (int r = 0; r < kIlp; ++r) {
DSC_UNROLL
    for (int j = 0; j < kVec; ++j) {
      const float u = lamb_direction(xp[r][j], xm[r][j], xv[r][j], bc1, bc2, a.eps, a.weight_decay, decoupled);
      xp[r][j] = xp[r][j] - step * u;  // out-of-range lanes are computed but never stored
    }
  }
DSC_UNROLL
  for (int r = 0; r < kIlp; ++r) {
    store4(p, e0[r], it.n, full[r], xp[r]);
    store4(model, e0[r], it.n, full[r], xp[r]);
  }
}

DSC_HD void lamb2_thread(const Table& t, const Lamb2Args& a, int64_t item, int tid) {
  const Item it = decode_item(t, item);
  const float step = a.step_size[norm_id(a.seg_ids, it.seg)];
  const float bc1 = a.bc1[it.seg];
  const float bc2 = a.bc2[it.seg];
  DSC_DISPATCH_PARAM_MODEL(code_p(it.meta), code_m(it.meta), TP, TM,
                           lamb2_body<TP, TM>(it, tid, a, step, bc1, bc2);)
}

// ---------------------------------------------------------------------------------------------------------
// LARS pass 2: momentum buffer and update; rounded model copy.
// ---------------------------------------------------------------------------------------------------------
template <typename TP, typename TG, typename TM>
DSC_HD void lars2_body(const Item& it, int tid, const Lars2Args& a, float coef, float ratio, float lr, bool first) {
  TP* p = slot_ptr<TP>(it, kP);
  const TG* g = slot_ptr<const TG>(it, kG);
  float* buf = slot_ptr<float>(it, kS0);
  TM* model = slot_ptr<TM>(it, kM);
  int64_t e0[kIlp];
  bool full[kIlp];
  group_positions(it, tid, e0, full);
  float xp[kIlp][kVec], xg[kIlp][kVec], xb[kIlp][kVec];
DSC_UNROLL
  for (int r = 0; r < kIlp; ++r) {
    load4(p, e0[r], it.n, full[r], xp[r]);
    load4(g, e0[r], it.n, full[r], xg[r]);
    if (first) {  // the buffer starts as d: do not read it
      xb[r][0] = xb[r][1] = xb[r][2] = xb[r][3] = 0.f;
    } else {
      load4(static_cast<const float*>(buf), e0[r], it.n, full[r], xb[r]);
    }
  }
DSC_UNROLL
  for (int r = 0; r < kIlp; ++r) {
DSC_UNROLL
    for (int j = 0; j < kVec; ++j) {
      const float pj = xp[r][j];
      const float d = ratio * (xg[r][j] * coef + a.weight_decay * pj);
      const float b = first ? d : a.momentum * xb[r][j] + a.one_minus_dampening * d;
      xb[r][j] = b;
      const float step = a.nesterov ? d + a.momentum * b : b;
      xp[r][j] = pj - lr * step;  // out-of-range lanes are computed but never stored
    }
  }
DSC_UNROLL
  for (int r = 0; r < kIlp; ++r) {
    store4(buf, e0[r], it.n, full[r], xb[r]);
    store4(p, e0[r], it.n, full[r], xp[r]);
    store4(model, e0[r], it.n, full[r], xp[r]);
  }
}

DSC_HD void lars2_thread(const Table& t, const Lars2Args& a, int64_t item, int tid) {
  const Item it = decode_item(t, item);
  const float coef = a.coef != nullptr ? *a.coef : 1.f;
  const float ratio = a.ratio[norm_id(a.seg_ids, it.seg)];
  const float lr = a.lr_ptr != nullptr ? *a.lr_ptr : a.lr;
  const bool first = a.steps[it.seg] == 1.f;
  DSC_DISPATCH_PARAM_MODEL(code_p(it.meta), code_m(it.meta), TP, TM,
                           DSC_DISPATCH_FLOAT(code_g(it.meta), TG,
                                              lars2_body<TP, TG, TM>(it, tid, a, coef, ratio, lr, first);))
}

// ---------------------------------------------------------------------------------------------------------
// Deterministic reductions of the per-work-item partial sums (fixed order: no atomics).
// ---------------------------------------------------------------------------------------------------------
// partial[2*i .. 2*i+1] of the items of segment s, thread tid takes items begin+tid, begin+tid+nthreads, ...
DSC_HD void reduce_segment_thread(const Table& t, const float* partial, int64_t s, int tid, int nthreads, float& a,
                                  float& b) {
  for (int64_t i = t.item_begin[s] + tid; i < t.item_begin[s + 1]; i += nthreads) {
    a += partial[2 * i];
    b += partial[2 * i + 1];
  }
}

// seg_sums of the segments whose norm id is ``id``; thread tid takes segments tid, tid+nthreads, ...
DSC_HD void reduce_id_thread(const float* seg_sums, const int64_t* seg_ids, int64_t n_seg, int64_t id, int tid,
                             int nthreads, float& a, float& b) {
  for (int64_t s = tid; s < n_seg; s += nthreads) {
    if (seg_ids[s] == id) {
      a += seg_sums[2 * s];
      b += seg_sums[2 * s + 1];
    }
  }
}

// Final sums of norm id (or segment) i: out is [num, 2] (out_cols = 2) or [num] (out_cols = 1, first sum only).
DSC_HD void write_sums(float* out, int64_t i, int out_cols, float a, float b) {
  if (out_cols == 2) {
    out[2 * i] = a;
    out[2 * i + 1] = b;
  } else {
    out[i] = a;
  }
}

}  // namespace dsc
