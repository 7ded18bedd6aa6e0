// Fused multi-tensor LAMB / LARS passes for CPU tensors (ds_conadv backend "cpp").
//
// The kernel-set interface and its semantics are those of ds_conadv.optim.functional.ReferenceKernels; the
// scalar formulas (trust ratios, clipping, bias corrections) stay in torch, here are only the element-wise
// passes and the sums of squares.
//
// Design
// * Every call turns its segments (tensors, or 1-D views into a flat buffer at any element offset) into a
//   flat list of work items (segment, [begin, end)) of at most kChunk elements, so that big and small tensors
//   balance over the threads. Threads take items dynamically (an atomic counter inside one
//   at::parallel_for region); every item writes its own partial sums (double), and the partials are reduced
//   per norm id in item order afterwards: results do not depend on the thread count or the schedule.
//   (Within an item, squares are summed in fp32 over a few terms per vector lane, then in double.)
// * An item is processed in blocks of kBlock elements. fp32 tensors are used in place through raw
//   pointers; bf16/fp16 params and grads are converted into small fp32 stack buffers first (and params
//   rounded back to nearest-even afterwards), so the arithmetic loops exist once, on plain float arrays,
//   and vectorize (restrict pointers, `omp simd`, -O3).
// * Memory traffic per fp32 param: LAMB pass 1 reads g, m, v, p and writes m, v; pass 2 reads p, m, v and
//   writes p (the update direction is recomputed rather than stored): 40 B. LARS pass 1 reads g, p; pass 2
//   reads g, p, buf and writes buf, p: 28 B.
// * `skip` (a CPU bool tensor) is read once: when true nothing is written.
//
// Only the headers needed (not <torch/extension.h>): the one-time build is about 3x faster.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/python_variable.h>  // THPVariable_Unpack / _Wrap (the step plan's grad check)
#include <torch/csrc/utils/pybind.h>  // pybind11 + the at::Tensor / std::optional casters

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kChunk = 32768;  // elements per work item
constexpr int64_t kBlock = 1024;   // elements per staged block (fp32 stack buffers)
constexpr int64_t kSerialBelow = 65536;  // total elements under which a call runs on the calling thread

using at::ScalarType;

// ------------------------------------------------------------------------------------------------------
// dtype conversions between a tensor's storage and fp32 blocks
// ------------------------------------------------------------------------------------------------------
inline void bf16_to_f32(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    dst[i] = f;
  }
}

// round to nearest even, NaN -> 0x7FC0: the same as c10::BFloat16(float)
inline void f32_to_bf16(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float f = src[i];
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    dst[i] = (f != f) ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
  }
}

inline void f16_to_f32(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) {
    c10::Half h;
    h.x = src[i];
    dst[i] = static_cast<float>(h);
  }
}

// round to nearest even: the same as c10::Half(float)
inline void f32_to_f16(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
#endif
  for (; i < n; ++i) {
    dst[i] = c10::Half(src[i]).x;
  }
}

// A readable fp32 view of elements [off, off + n) of a tensor: the tensor itself for fp32, else `buf`.
inline const float* load_block(const void* base, ScalarType t, int64_t off, int64_t n, float* buf) {
  switch (t) {
    case ScalarType::Float:
      return static_cast<const float*>(base) + off;
    case ScalarType::BFloat16:
      bf16_to_f32(static_cast<const uint16_t*>(base) + off, buf, n);
      return buf;
    default:  // Half
      f16_to_f32(static_cast<const uint16_t*>(base) + off, buf, n);
      return buf;
  }
}

// Writable fp32 view (for an in-place update): the tensor itself for fp32, else `buf` (filled).
inline float* open_block(void* base, ScalarType t, int64_t off, int64_t n, float* buf) {
  if (t == ScalarType::Float) return static_cast<float*>(base) + off;
  load_block(base, t, off, n, buf);
  return buf;
}

// Write an fp32 block back to a tensor (no-op when the block is the tensor's own fp32 memory).
inline void store_block(const float* src, void* base, ScalarType t, int64_t off, int64_t n) {
  switch (t) {
    case ScalarType::Float: {
      float* dst = static_cast<float*>(base) + off;
      if (dst != src) std::memcpy(dst, src, sizeof(float) * n);
      return;
    }
    case ScalarType::BFloat16:
      f32_to_bf16(src, static_cast<uint16_t*>(base) + off, n);
      return;
    default:
      f32_to_f16(src, static_cast<uint16_t*>(base) + off, n);
      return;
  }
}

// ------------------------------------------------------------------------------------------------------
// segment tables and work items
// ------------------------------------------------------------------------------------------------------
struct Seg {
  void* p = nullptr;
  ScalarType pt = ScalarType::Float;
  const void* g = nullptr;
  ScalarType gt = ScalarType::Float;
  float* s0 = nullptr;
  float* s1 = nullptr;
  void* model = nullptr;
  ScalarType mt = ScalarType::Float;
  int64_t n = 0;
  int64_t id = 0;
};

struct Item {
  int64_t seg;
  int64_t begin;
  int64_t end;
};

bool is_float_kind(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::BFloat16 || t == ScalarType::Half;
}

void check_tensor(const at::Tensor& t, const char* what, size_t s, bool fp32_only) {
  TORCH_CHECK(t.defined(), "ds_conadv cpp kernels: ", what, "[", s, "] is undefined");
  TORCH_CHECK(t.device().is_cpu(), "ds_conadv cpp kernels run on CPU tensors; ", what, "[", s, "] is on ",
              t.device());
  auto st = t.scalar_type();
  if (fp32_only) {
    TORCH_CHECK_TYPE(st == ScalarType::Float, "ds_conadv cpp kernels: ", what, "[", s,
                     "] must be float32 (optimizer state), got ", st);
  } else {
    TORCH_CHECK_TYPE(is_float_kind(st), "ds_conadv cpp kernels support float32, bfloat16 and float16 ", what,
                     ", got ", st, " for ", what, "[", s, "] (float64 runs on the 'foreach' backend)");
  }
  TORCH_CHECK(t.is_contiguous(), "ds_conadv cpp kernels need contiguous tensors; ", what, "[", s,
              "] is not");
}

void check_same_numel(const at::Tensor& a, const at::Tensor& b, const char* what, size_t s) {
  TORCH_CHECK(a.numel() == b.numel(), "ds_conadv cpp kernels: ", what, "[", s, "] has ", b.numel(),
              " elements, the param has ", a.numel());
}

// segment -> norm id (validated)
std::vector<int64_t> seg_ids_vec(const c10::optional<at::Tensor>& seg_ids, size_t n_seg, int64_t num_ids) {
  std::vector<int64_t> ids(n_seg);
  if (!seg_ids.has_value() || !seg_ids->defined()) {
    TORCH_CHECK(static_cast<int64_t>(n_seg) <= num_ids, "ds_conadv cpp kernels: ", n_seg,
                " segments but num_ids=", num_ids);
    for (size_t s = 0; s < n_seg; ++s) ids[s] = static_cast<int64_t>(s);
    return ids;
  }
  at::Tensor t = seg_ids->to(at::kCPU, at::kLong).contiguous();
  TORCH_CHECK(t.numel() == static_cast<int64_t>(n_seg), "ds_conadv cpp kernels: seg_ids has ", t.numel(),
              " entries for ", n_seg, " segments");
  const int64_t* d = t.data_ptr<int64_t>();
  for (size_t s = 0; s < n_seg; ++s) {
    TORCH_CHECK_INDEX(d[s] >= 0 && d[s] < num_ids, "ds_conadv cpp kernels: seg_ids[", s, "]=", d[s],
                      " is outside [0, ", num_ids, ")");
    ids[s] = d[s];
  }
  return ids;
}

// a per-segment or per-id fp32 vector as host floats
std::vector<float> float_vec(const at::Tensor& t, size_t n, const char* what) {
  at::Tensor c = t.to(at::kCPU, at::kFloat).contiguous().view(-1);
  TORCH_CHECK(c.numel() == static_cast<int64_t>(n), "ds_conadv cpp kernels: ", what, " has ", c.numel(),
              " entries, expected ", n);
  const float* d = c.data_ptr<float>();
  return std::vector<float>(d, d + n);
}

bool skip_flag(const c10::optional<at::Tensor>& skip) {
  if (!skip.has_value() || !skip->defined()) return false;
  TORCH_CHECK(skip->numel() == 1, "ds_conadv cpp kernels: skip must be a single flag");
  return skip->to(at::kCPU).item<bool>();
}

float coef_value(const c10::optional<at::Tensor>& coef) {
  if (!coef.has_value() || !coef->defined()) return 1.0f;
  TORCH_CHECK(coef->numel() == 1, "ds_conadv cpp kernels: grad_coef must be a single value");
  return coef->to(at::kCPU, at::kFloat).item<float>();
}

std::vector<Item> make_items(const std::vector<Seg>& segs, int64_t* total) {
  std::vector<Item> items;
  int64_t sum = 0;
  size_t count = 0;
  for (const auto& s : segs) count += static_cast<size_t>((s.n + kChunk - 1) / kChunk);
  items.reserve(count);
  for (size_t k = 0; k < segs.size(); ++k) {
    const int64_t n = segs[k].n;
    sum += n;
    for (int64_t b = 0; b < n; b += kChunk) items.push_back({static_cast<int64_t>(k), b, std::min(n, b + kChunk)});
  }
  *total = sum;
  return items;
}

// Run fn(item_index) for every item, dynamically scheduled over at::get_num_threads() threads.
template <typename F>
void run_items(int64_t n_items, int64_t total, const F& fn) {
  if (n_items == 0) return;
  const int64_t threads = at::get_num_threads();
  if (total < kSerialBelow || n_items == 1 || threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n_items; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min(threads, n_items);
  at::parallel_for(0, workers, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n_items;
           i = next.fetch_add(1, std::memory_order_relaxed)) {
        fn(i);
      }
    }
  });
}

// partial sums of items (2 per item) -> [num_ids, 2] in item order (deterministic)
at::Tensor reduce_pairs(const std::vector<Item>& items, const std::vector<Seg>& segs, const std::vector<double>& part,
                        int64_t num_ids, at::ScalarType out_type) {
  std::vector<double> acc(static_cast<size_t>(num_ids) * 2, 0.0);
  for (size_t i = 0; i < items.size(); ++i) {
    const int64_t id = segs[items[i].seg].id;
    acc[2 * id] += part[2 * i];
    acc[2 * id + 1] += part[2 * i + 1];
  }
  at::Tensor out = at::empty({num_ids, 2}, at::TensorOptions().dtype(at::kDouble));
  if (num_ids > 0) std::memcpy(out.data_ptr<double>(), acc.data(), sizeof(double) * acc.size());
  return out_type == at::kDouble ? out : out.to(out_type);
}

// ------------------------------------------------------------------------------------------------------
// arithmetic on fp32 blocks
// ------------------------------------------------------------------------------------------------------
// Sums of squares of one or two fp32 blocks, accumulated in double. The squares are first summed in fp32 over
// 8 terms per vector lane, then converted and added to double accumulators: this keeps the loads streaming
// (a plain fp32->fp64 convert-and-FMA loop ran ~30% below memory speed here) at an error of a few fp32 ulps
// per 8 terms, far below what a trust ratio can notice. Plain loops where neither AVX-512 nor AVX2 exists.
template <bool TWO>
inline void sumsq_block(const float* __restrict x, const float* __restrict y, int64_t n, double& ax, double& ay) {
  int64_t i = 0;
  double sx = 0.0, sy = 0.0;
#if defined(__AVX512F__)
  __m512d dx0 = _mm512_setzero_pd(), dx1 = _mm512_setzero_pd(), dy0 = _mm512_setzero_pd(),
          dy1 = _mm512_setzero_pd();
  for (; i + 128 <= n; i += 128) {
    __m512 fx0 = _mm512_setzero_ps(), fx1 = _mm512_setzero_ps(), fy0 = _mm512_setzero_ps(),
           fy1 = _mm512_setzero_ps();
    for (int k = 0; k < 128; k += 32) {
      const __m512 a = _mm512_loadu_ps(x + i + k), b = _mm512_loadu_ps(x + i + k + 16);
      fx0 = _mm512_fmadd_ps(a, a, fx0);
      fx1 = _mm512_fmadd_ps(b, b, fx1);
      if (TWO) {
        const __m512 c = _mm512_loadu_ps(y + i + k), d = _mm512_loadu_ps(y + i + k + 16);
        fy0 = _mm512_fmadd_ps(c, c, fy0);
        fy1 = _mm512_fmadd_ps(d, d, fy1);
      }
    }
    const __m512 fx = _mm512_add_ps(fx0, fx1);
    dx0 = _mm512_add_pd(dx0, _mm512_cvtps_pd(_mm512_castps512_ps256(fx)));
    dx1 = _mm512_add_pd(dx1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(fx), 1))));
    if (TWO) {
      const __m512 fy = _mm512_add_ps(fy0, fy1);
      dy0 = _mm512_add_pd(dy0, _mm512_cvtps_pd(_mm512_castps512_ps256(fy)));
      dy1 = _mm512_add_pd(dy1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(fy), 1))));
    }
  }
  sx = _mm512_reduce_add_pd(_mm512_add_pd(dx0, dx1));
  if (TWO) sy = _mm512_reduce_add_pd(_mm512_add_pd(dy0, dy1));
#elif defined(__AVX2__) && defined(__FMA__)
  __m256d dx0 = _mm256_setzero_pd(), dx1 = _mm256_setzero_pd(), dy0 = _mm256_setzero_pd(),
          dy1 = _mm256_setzero_pd();
  for (; i + 64 <= n; i += 64) {
    __m256 fx0 = _mm256_setzero_ps(), fx1 = _mm256_setzero_ps(), fy0 = _mm256_setzero_ps(),
           fy1 = _mm256_setzero_ps();
    for (int k = 0; k < 64; k += 16) {
      const __m256 a = _mm256_loadu_ps(x + i + k), b = _mm256_loadu_ps(x + i + k + 8);
      fx0 = _mm256_fmadd_ps(a, a, fx0);
      fx1 = _mm256_fmadd_ps(b, b, fx1);
      if (TWO) {
        const __m256 c = _mm256_loadu_ps(y + i + k), d = _mm256_loadu_ps(y + i + k + 8);
        fy0 = _mm256_fmadd_ps(c, c, fy0);
        fy1 = _mm256_fmadd_ps(d, d, fy1);
      }
    }
    const __m256 fx = _mm256_add_ps(fx0, fx1);
    dx0 = _mm256_add_pd(dx0, _mm256_cvtps_pd(_mm256_castps256_ps128(fx)));
    dx1 = _mm256_add_pd(dx1, _mm256_cvtps_pd(_mm256_extractf128_ps(fx, 1)));
    if (TWO) {
      const __m256 fy = _mm256_add_ps(fy0, fy1);
      dy0 = _mm256_add_pd(dy0, _mm256_cvtps_pd(_mm256_castps256_ps128(fy)));
      dy1 = _mm256_add_pd(dy1, _mm256_cvtps_pd(_mm256_extractf128_ps(fy, 1)));
    }
  }
  alignas(32) double tmp[4];
  _mm256_store_pd(tmp, _mm256_add_pd(dx0, dx1));
  sx = (tmp[0] + tmp[1]) + (tmp[2] + tmp[3]);
  if (TWO) {
    _mm256_store_pd(tmp, _mm256_add_pd(dy0, dy1));
    sy = (tmp[0] + tmp[1]) + (tmp[2] + tmp[3]);
  }
#endif
  double tx = 0.0, ty = 0.0;
#pragma omp simd reduction(+ : tx, ty)
  for (int64_t j = i; j < n; ++j) {
    tx += static_cast<double>(x[j]) * static_cast<double>(x[j]);
    if (TWO) ty += static_cast<double>(y[j]) * static_cast<double>(y[j]);
  }
  ax += sx + tx;
  if (TWO) ay += sy + ty;
}

// Read-only passes stream better with a software prefetch ~1 KiB ahead of the loads (measured here).
constexpr int64_t kPrefetchBytes = 1024;
inline void prefetch_ahead(const void* base, ScalarType t, int64_t off, int64_t n) {
  const int64_t esize = t == ScalarType::Float ? 4 : 2;
  const char* b = static_cast<const char*>(base) + (off * esize + kPrefetchBytes);
  for (int64_t k = 0; k < n * esize; k += 64) __builtin_prefetch(b + k, 0, 3);
}

struct LambArgs {
  float coef, beta1, beta2, beta3, one_minus_beta2, eps, wd;
};

// pass 1: moments, then u = (m / bc1) / (sqrt(v / bc2) + eps) (+ wd * p); sums of u^2 and p^2 (fp32 partials
// over sub-blocks of 128 elements, i.e. a handful of terms per vector lane, added in double)
template <bool L2, bool DECAY>
inline void lamb1_block(const float* __restrict g, const float* __restrict p, float* __restrict m,
                        float* __restrict v, int64_t n, const LambArgs& a, float inv_bc1, float inv_bc2, double& su,
                        double& sp) {
  const float coef = a.coef, b1 = a.beta1, b2 = a.beta2, b3 = a.beta3, c2 = a.one_minus_beta2, eps = a.eps,
              wd = a.wd;
  double acc_u = 0.0, acc_p = 0.0;
  for (int64_t s = 0; s < n; s += 128) {
    const int64_t e = std::min(n, s + 128);
    float part_u = 0.0f, part_p = 0.0f;
#pragma omp simd reduction(+ : part_u, part_p)
    for (int64_t i = s; i < e; ++i) {
      const float pi = p[i];
      float gi = g[i] * coef;
      if (L2) gi = gi + wd * pi;
      const float mi = b1 * m[i] + b3 * gi;
      const float vi = b2 * v[i] + c2 * (gi * gi);
      m[i] = mi;
      v[i] = vi;
      float u = (mi * inv_bc1) / (std::sqrt(vi * inv_bc2) + eps);
      if (DECAY) u = u + wd * pi;
      part_u += u * u;
      part_p += pi * pi;
    }
    acc_u += part_u;
    acc_p += part_p;
  }
  su += acc_u;
  sp += acc_p;
}

// pass 2: the same u, p <- p - step * u
template <bool DECAY>
inline void lamb2_block(float* __restrict p, const float* __restrict m, const float* __restrict v, int64_t n,
                        float step, float eps, float wd, float inv_bc1, float inv_bc2) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float pi = p[i];
    float u = (m[i] * inv_bc1) / (std::sqrt(v[i] * inv_bc2) + eps);
    if (DECAY) u = u + wd * pi;
    p[i] = pi - step * u;
  }
}

struct LarsArgs {
  float coef, wd, momentum, one_minus_dampening, lr;
};

template <bool FIRST, bool NESTEROV>
inline void lars2_block(const float* __restrict g, float* __restrict p, float* __restrict buf, int64_t n,
                        float ratio, const LarsArgs& a) {
  const float coef = a.coef, wd = a.wd, mom = a.momentum, damp = a.one_minus_dampening, lr = a.lr;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float pi = p[i];
    const float d = ratio * (g[i] * coef + wd * pi);
    const float b = FIRST ? d : mom * buf[i] + damp * d;
    buf[i] = b;
    const float step = NESTEROV ? d + mom * b : b;
    p[i] = pi - lr * step;
  }
}

// ------------------------------------------------------------------------------------------------------
// table builders
// ------------------------------------------------------------------------------------------------------
std::vector<Seg> build_segs(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>* grads,
                            const std::vector<at::Tensor>* s0, const std::vector<at::Tensor>* s1,
                            const std::vector<c10::optional<at::Tensor>>* models,
                            const c10::optional<at::Tensor>& seg_ids, int64_t num_ids) {
  const size_t n = params.size();
  TORCH_CHECK(num_ids >= 0, "ds_conadv cpp kernels: num_ids must be >= 0");
  if (grads) TORCH_CHECK(grads->size() == n, "ds_conadv cpp kernels: ", grads->size(), " grads for ", n, " params");
  if (s0) TORCH_CHECK(s0->size() == n, "ds_conadv cpp kernels: ", s0->size(), " state tensors for ", n, " params");
  if (s1) TORCH_CHECK(s1->size() == n, "ds_conadv cpp kernels: ", s1->size(), " state tensors for ", n, " params");
  if (models && !models->empty())
    TORCH_CHECK(models->size() == n, "ds_conadv cpp kernels: ", models->size(), " model params for ", n, " params");
  std::vector<int64_t> ids = seg_ids_vec(seg_ids, n, num_ids);
  std::vector<Seg> segs(n);
  for (size_t s = 0; s < n; ++s) {
    const at::Tensor& p = params[s];
    check_tensor(p, "params", s, false);
    Seg& d = segs[s];
    d.p = p.data_ptr();
    d.pt = p.scalar_type();
    d.n = p.numel();
    d.id = ids[s];
    if (grads) {
      const at::Tensor& g = (*grads)[s];
      check_tensor(g, "grads", s, false);
      check_same_numel(p, g, "grads", s);
      d.g = g.data_ptr();
      d.gt = g.scalar_type();
    }
    if (s0) {
      const at::Tensor& t = (*s0)[s];
      check_tensor(t, "state", s, true);
      check_same_numel(p, t, "state", s);
      d.s0 = t.data_ptr<float>();
    }
    if (s1) {
      const at::Tensor& t = (*s1)[s];
      check_tensor(t, "state", s, true);
      check_same_numel(p, t, "state", s);
      d.s1 = t.data_ptr<float>();
    }
    if (models && !models->empty() && (*models)[s].has_value() && (*models)[s]->defined()) {
      const at::Tensor& mp = *(*models)[s];
      check_tensor(mp, "model_params", s, false);
      check_same_numel(p, mp, "model_params", s);
      d.model = mp.data_ptr();
      d.mt = mp.scalar_type();
    }
  }
  return segs;
}

// ------------------------------------------------------------------------------------------------------
// entry points
// ------------------------------------------------------------------------------------------------------

// per id: sum over its segments of x^2 (float64 [num_ids]); the caller applies coef^2 and the dtype
at::Tensor sumsq(const std::vector<at::Tensor>& tensors, const c10::optional<at::Tensor>& seg_ids, int64_t num_ids) {
  std::vector<Seg> segs = build_segs(tensors, nullptr, nullptr, nullptr, nullptr, seg_ids, num_ids);
  int64_t total = 0;
  std::vector<Item> items = make_items(segs, &total);
  std::vector<double> part(items.size(), 0.0);
  {
    pybind11::gil_scoped_release nogil;
    run_items(static_cast<int64_t>(items.size()), total, [&](int64_t i) {
      const Item& it = items[i];
      const Seg& s = segs[it.seg];
      alignas(64) float xb[kBlock];
      double acc = 0.0;
      for (int64_t off = it.begin; off < it.end; off += kBlock) {
        const int64_t n = std::min(kBlock, it.end - off);
        prefetch_ahead(s.p, s.pt, off, n);
        const float* x = load_block(s.p, s.pt, off, n, xb);
        double unused = 0.0;
        sumsq_block<false>(x, x, n, acc, unused);
      }
      part[i] = acc;
    });
  }
  std::vector<double> acc(static_cast<size_t>(num_ids), 0.0);
  for (size_t i = 0; i < items.size(); ++i) acc[segs[items[i].seg].id] += part[i];
  at::Tensor out = at::empty({num_ids}, at::TensorOptions().dtype(at::kDouble));
  if (num_ids > 0) std::memcpy(out.data_ptr<double>(), acc.data(), sizeof(double) * acc.size());
  return out;
}

at::Tensor lamb_phase1(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                       const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                       const c10::optional<at::Tensor>& seg_ids, int64_t num_ids,
                       const c10::optional<at::Tensor>& grad_coef, const at::Tensor& bc1, const at::Tensor& bc2,
                       double beta1, double beta2, double beta3, double eps, double weight_decay, bool adam_w_mode,
                       const c10::optional<at::Tensor>& skip) {
  std::vector<Seg> segs = build_segs(params, &grads, &exp_avgs, &exp_avg_sqs, nullptr, seg_ids, num_ids);
  if (skip_flag(skip)) return at::zeros({num_ids, 2}, at::TensorOptions().dtype(at::kFloat));
  const size_t n_seg = segs.size();
  std::vector<float> b1 = float_vec(bc1, n_seg, "bc1"), b2 = float_vec(bc2, n_seg, "bc2");
  std::vector<float> inv1(n_seg), inv2(n_seg);
  for (size_t s = 0; s < n_seg; ++s) {
    inv1[s] = static_cast<float>(1.0 / static_cast<double>(b1[s]));
    inv2[s] = static_cast<float>(1.0 / static_cast<double>(b2[s]));
  }
  const LambArgs a{coef_value(grad_coef), static_cast<float>(beta1), static_cast<float>(beta2),
                   static_cast<float>(beta3), static_cast<float>(1.0 - beta2), static_cast<float>(eps),
                   static_cast<float>(weight_decay)};
  const bool l2 = !adam_w_mode && weight_decay != 0.0;
  const bool decay = adam_w_mode && weight_decay != 0.0;
  int64_t total = 0;
  std::vector<Item> items = make_items(segs, &total);
  std::vector<double> part(2 * items.size(), 0.0);
  {
    pybind11::gil_scoped_release nogil;
    run_items(static_cast<int64_t>(items.size()), total, [&](int64_t i) {
      const Item& it = items[i];
      const Seg& s = segs[it.seg];
      alignas(64) float gb[kBlock];
      alignas(64) float pb[kBlock];
      double su = 0.0, sp = 0.0;
      const float i1 = inv1[it.seg], i2 = inv2[it.seg];
      for (int64_t off = it.begin; off < it.end; off += kBlock) {
        const int64_t n = std::min(kBlock, it.end - off);
        const float* g = load_block(s.g, s.gt, off, n, gb);
        const float* p = load_block(s.p, s.pt, off, n, pb);
        float* m = s.s0 + off;
        float* v = s.s1 + off;
        if (l2)
          lamb1_block<true, false>(g, p, m, v, n, a, i1, i2, su, sp);
        else if (decay)
          lamb1_block<false, true>(g, p, m, v, n, a, i1, i2, su, sp);
        else
          lamb1_block<false, false>(g, p, m, v, n, a, i1, i2, su, sp);
      }
      part[2 * i] = su;
      part[2 * i + 1] = sp;
    });
  }
  return reduce_pairs(items, segs, part, num_ids, at::kFloat);
}

void lamb_phase2(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& exp_avgs,
                 const std::vector<at::Tensor>& exp_avg_sqs, const std::vector<c10::optional<at::Tensor>>& model_params,
                 const c10::optional<at::Tensor>& seg_ids, int64_t num_ids, const at::Tensor& step_size,
                 const at::Tensor& bc1, const at::Tensor& bc2, double eps, double weight_decay, bool adam_w_mode,
                 const c10::optional<at::Tensor>& skip) {
  std::vector<Seg> segs = build_segs(params, nullptr, &exp_avgs, &exp_avg_sqs, &model_params, seg_ids, num_ids);
  if (skip_flag(skip)) return;
  const size_t n_seg = segs.size();
  std::vector<float> b1 = float_vec(bc1, n_seg, "bc1"), b2 = float_vec(bc2, n_seg, "bc2");
  std::vector<float> steps = float_vec(step_size, static_cast<size_t>(num_ids), "step_size");
  std::vector<float> inv1(n_seg), inv2(n_seg);
  for (size_t s = 0; s < n_seg; ++s) {
    inv1[s] = static_cast<float>(1.0 / static_cast<double>(b1[s]));
    inv2[s] = static_cast<float>(1.0 / static_cast<double>(b2[s]));
  }
  const float e = static_cast<float>(eps), wd = static_cast<float>(weight_decay);
  const bool decay = adam_w_mode && weight_decay != 0.0;
  int64_t total = 0;
  std::vector<Item> items = make_items(segs, &total);
  pybind11::gil_scoped_release nogil;
  run_items(static_cast<int64_t>(items.size()), total, [&](int64_t i) {
    const Item& it = items[i];
    const Seg& s = segs[it.seg];
    alignas(64) float pb[kBlock];
    const float step = steps[s.id], i1 = inv1[it.seg], i2 = inv2[it.seg];
    for (int64_t off = it.begin; off < it.end; off += kBlock) {
      const int64_t n = std::min(kBlock, it.end - off);
      float* p = open_block(s.p, s.pt, off, n, pb);
      const float* m = s.s0 + off;
      const float* v = s.s1 + off;
      if (decay)
        lamb2_block<true>(p, m, v, n, step, e, wd, i1, i2);
      else
        lamb2_block<false>(p, m, v, n, step, e, wd, i1, i2);
      if (s.pt != ScalarType::Float) store_block(p, s.p, s.pt, off, n);
      if (s.model) store_block(p, s.model, s.mt, off, n);
    }
  });
}

// per id: [sum g^2, sum p^2] in float64 (the caller applies grad_coef^2 and the dtype)
at::Tensor lars_phase1(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                       const c10::optional<at::Tensor>& seg_ids, int64_t num_ids,
                       const c10::optional<at::Tensor>& skip) {
  std::vector<Seg> segs = build_segs(params, &grads, nullptr, nullptr, nullptr, seg_ids, num_ids);
  if (skip_flag(skip)) return at::zeros({num_ids, 2}, at::TensorOptions().dtype(at::kDouble));
  int64_t total = 0;
  std::vector<Item> items = make_items(segs, &total);
  std::vector<double> part(2 * items.size(), 0.0);
  {
    pybind11::gil_scoped_release nogil;
    run_items(static_cast<int64_t>(items.size()), total, [&](int64_t i) {
      const Item& it = items[i];
      const Seg& s = segs[it.seg];
      alignas(64) float gb[kBlock];
      alignas(64) float pb[kBlock];
      double sg = 0.0, sp = 0.0;
      for (int64_t off = it.begin; off < it.end; off += kBlock) {
        const int64_t n = std::min(kBlock, it.end - off);
        prefetch_ahead(s.g, s.gt, off, n);
        prefetch_ahead(s.p, s.pt, off, n);
        sumsq_block<true>(load_block(s.g, s.gt, off, n, gb), load_block(s.p, s.pt, off, n, pb), n, sg, sp);
      }
      part[2 * i] = sg;
      part[2 * i + 1] = sp;
    });
  }
  return reduce_pairs(items, segs, part, num_ids, at::kDouble);
}

void lars_phase2(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const std::vector<at::Tensor>& bufs, const std::vector<c10::optional<at::Tensor>>& model_params,
                 const at::Tensor& steps, const c10::optional<at::Tensor>& seg_ids, int64_t num_ids,
                 const c10::optional<at::Tensor>& grad_coef, const at::Tensor& ratio, double lr, double weight_decay,
                 double momentum, double dampening, bool nesterov, const c10::optional<at::Tensor>& skip) {
  std::vector<Seg> segs = build_segs(params, &grads, &bufs, nullptr, &model_params, seg_ids, num_ids);
  if (skip_flag(skip)) return;
  const size_t n_seg = segs.size();
  std::vector<float> step_count = float_vec(steps, n_seg, "steps");
  std::vector<float> ratios = float_vec(ratio, static_cast<size_t>(num_ids), "ratio");
  const LarsArgs a{coef_value(grad_coef), static_cast<float>(weight_decay), static_cast<float>(momentum),
                   static_cast<float>(1.0 - dampening), static_cast<float>(lr)};
  int64_t total = 0;
  std::vector<Item> items = make_items(segs, &total);
  pybind11::gil_scoped_release nogil;
  run_items(static_cast<int64_t>(items.size()), total, [&](int64_t i) {
    const Item& it = items[i];
    const Seg& s = segs[it.seg];
    alignas(64) float gb[kBlock];
    alignas(64) float pb[kBlock];
    const float r = ratios[s.id];
    const bool first = step_count[it.seg] == 1.0f;
    for (int64_t off = it.begin; off < it.end; off += kBlock) {
      const int64_t n = std::min(kBlock, it.end - off);
      const float* g = load_block(s.g, s.gt, off, n, gb);
      float* p = open_block(s.p, s.pt, off, n, pb);
      float* buf = s.s0 + off;
      if (first) {
        if (nesterov)
          lars2_block<true, true>(g, p, buf, n, r, a);
        else
          lars2_block<true, false>(g, p, buf, n, r, a);
      } else {
        if (nesterov)
          lars2_block<false, true>(g, p, buf, n, r, a);
        else
          lars2_block<false, false>(g, p, buf, n, r, a);
      }
      if (s.pt != ScalarType::Float) store_block(p, s.p, s.pt, off, n);
      if (s.model) store_block(p, s.model, s.mt, off, n);
    }
  });
}

int64_t chunk_size() { return kChunk; }

// ------------------------------------------------------------------------------------------------------
// step plan checks (ds_conadv/optim/_step_plan.py): one call per group and step instead of a Python loop
// ------------------------------------------------------------------------------------------------------
// [n, 3] int64 per param: dtype code, data pointer, device (type * 65536 + index)
at::Tensor plan_meta(const std::vector<at::Tensor>& params) {
  const int64_t n = static_cast<int64_t>(params.size());
  at::Tensor out = at::empty({n, 3}, at::TensorOptions().dtype(at::kLong));
  int64_t* d = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    d[3 * i] = static_cast<int64_t>(p.scalar_type());
    d[3 * i + 1] = reinterpret_cast<int64_t>(p.data_ptr());
    d[3 * i + 2] = static_cast<int64_t>(p.device().type()) * 65536 + p.device().index();
  }
  return out;
}

// -1 when every param still has the dtype, data pointer and device recorded in `meta` (plan_meta) and every
// grad is defined, strided (not sparse) and has its param's dtype, device, sizes and strides; else the first
// index where something differs (the caller then takes its slow path, which says what is wrong).
int64_t plan_mismatch(const std::vector<at::Tensor>& params, const std::vector<c10::optional<at::Tensor>>& grads,
                      const at::Tensor& meta) {
  const int64_t n = static_cast<int64_t>(params.size());
  if (static_cast<int64_t>(grads.size()) != n || meta.dim() != 2 || meta.size(0) != n || meta.size(1) != 3 ||
      meta.scalar_type() != at::kLong || !meta.is_contiguous() || !meta.device().is_cpu())
    return 0;
  const int64_t* d = meta.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    if (!p.defined() || static_cast<int64_t>(p.scalar_type()) != d[3 * i] ||
        reinterpret_cast<int64_t>(p.data_ptr()) != d[3 * i + 1] ||
        static_cast<int64_t>(p.device().type()) * 65536 + p.device().index() != d[3 * i + 2])
      return i;
    const auto& og = grads[i];
    if (!og.has_value() || !og->defined()) return i;
    const at::Tensor& g = *og;
    if (g.layout() != at::kStrided || g.scalar_type() != p.scalar_type() || g.device() != p.device() ||
        g.sizes() != p.sizes() || g.strides() != p.strides())
      return i;
  }
  return -1;
}

// A plan's per-step check and grad collection in one call: given the group's params list, its grads when the list
// holds the very param objects the plan was built with (compared by identity), every param still has the dtype,
// data pointer and device of plan_meta, and every grad is defined, strided and has its param's dtype, device,
// sizes and strides; else None (the caller takes its slow path). This replaces `[p.grad for p in params]` and
// plan_mismatch's conversion of two tensor lists per step.
class GroupCheck {
 public:
  GroupCheck(const pybind11::list& params, const at::Tensor& meta) {
    const int64_t n = static_cast<int64_t>(pybind11::len(params));
    TORCH_CHECK(meta.dim() == 2 && meta.size(0) == n && meta.size(1) == 3 && meta.scalar_type() == at::kLong &&
                    meta.is_contiguous() && meta.device().is_cpu(),
                "GroupCheck: meta must be plan_meta(params)");
    objects_.reserve(static_cast<size_t>(n));
    for (const auto& item : params) {
      TORCH_CHECK(THPVariable_Check(item.ptr()), "GroupCheck: params must be tensors");
      objects_.push_back(pybind11::reinterpret_borrow<pybind11::object>(item));
    }
    const int64_t* d = meta.data_ptr<int64_t>();
    meta_.assign(d, d + 3 * n);
  }

  pybind11::object grads(const pybind11::handle& params) const {
    PyObject* list = params.ptr();
    const Py_ssize_t n = static_cast<Py_ssize_t>(objects_.size());
    if (!PyList_Check(list) || PyList_GET_SIZE(list) != n) return pybind11::none();
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* obj = PyList_GET_ITEM(list, i);
      if (obj != objects_[static_cast<size_t>(i)].ptr()) return pybind11::none();
      const at::Tensor& p = THPVariable_Unpack(obj);
      const int64_t* d = meta_.data() + 3 * i;
      if (static_cast<int64_t>(p.scalar_type()) != d[0] || reinterpret_cast<int64_t>(p.data_ptr()) != d[1] ||
          static_cast<int64_t>(p.device().type()) * 65536 + p.device().index() != d[2])
        return pybind11::none();
      const at::Tensor& g = p.grad();
      if (!g.defined() || g.layout() != at::kStrided || g.scalar_type() != p.scalar_type() ||
          g.device() != p.device() || g.sizes() != p.sizes() || g.strides() != p.strides())
        return pybind11::none();
    }
    PyObject* out = PyList_New(n);
    if (out == nullptr) throw pybind11::error_already_set();
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* wrapped = THPVariable_Wrap(THPVariable_Unpack(PyList_GET_ITEM(list, i)).grad());
      if (wrapped == nullptr) {
        Py_DECREF(out);
        throw pybind11::error_already_set();
      }
      PyList_SET_ITEM(out, i, wrapped);
    }
    return pybind11::reinterpret_steal<pybind11::object>(out);
  }

 private:
  std::vector<pybind11::object> objects_;
  std::vector<int64_t> meta_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ds_conadv fused LAMB/LARS passes for CPU tensors";
  m.def("sumsq", &sumsq, "per-id sums of squares (float64)", pybind11::arg("tensors"), pybind11::arg("seg_ids"),
        pybind11::arg("num_ids"));
  m.def("lamb_phase1", &lamb_phase1, "LAMB pass 1: moments, per-id [sum u^2, sum p^2]");
  m.def("lamb_phase2", &lamb_phase2, "LAMB pass 2: p -= step_size[id] * u (+ model copy)");
  m.def("lars_phase1", &lars_phase1, "LARS pass 1: per-id [sum g^2, sum p^2] (float64)");
  m.def("lars_phase2", &lars_phase2, "LARS pass 2: momentum buffer and param update (+ model copy)");
  m.def("chunk_size", &chunk_size, "elements per work item");
  m.def("plan_meta", &plan_meta, "per param [dtype code, data pointer, device] (int64 [n, 3])");
  pybind11::class_<GroupCheck>(m, "GroupCheck")
      .def(pybind11::init<const pybind11::list&, const at::Tensor&>())
      .def("grads", &GroupCheck::grads, "the grads of params, or None when the plan does not fit");
  m.def("plan_mismatch", &plan_mismatch, "-1 when params match plan_meta and grads match their params, else an index");
#if defined(__AVX512F__)
  m.attr("isa") = "avx512";
#elif defined(__AVX2__)
  m.attr("isa") = "avx2";
#else
  m.attr("isa") = "generic";
#endif
#if defined(_OPENMP)
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
