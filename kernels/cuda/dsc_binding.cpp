// Python binding of the ds_conadv CUDA launchers (dsc_api.h).
//
// Deliberately thin and torch-free: the Python layer (ds_conadv.kernels.cuda) builds and caches the segment
// tables, keeps the tensors alive and passes raw addresses (tensor.data_ptr()), scalars and the current stream
// (torch.cuda.current_stream().cuda_stream) as Python ints/floats.  So this file needs only pybind11 (shipped
// with torch) and compiles against a CPU-only torch too; CI checks it with g++ -fsyntax-only.
// Pointer arguments: 0 means "absent" (nullptr).  Each function returns the launcher's result: the number of
// kernels launched, or a negative CUDA error code (the Python layer raises, with error_string(-code)).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "dsc_api.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME dsc_cuda_ext
#endif

namespace {

template <typename T>
T* ptr(int64_t address) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(address));
}

int sumsq2(int64_t table, int64_t n_seg, int64_t n_items, int64_t coef, int64_t seg_ids, int64_t num_ids,
           int64_t skip, int64_t partial, int64_t seg_sums, int64_t out, int out_cols, int64_t stream) {
  return dsc_sumsq2(ptr<const int64_t>(table), n_seg, n_items, ptr<const float>(coef), ptr<const int64_t>(seg_ids),
                    num_ids, ptr<const uint8_t>(skip), ptr<float>(partial), ptr<float>(seg_sums), ptr<float>(out),
                    out_cols, ptr<void>(stream));
}

int lamb_phase1(int64_t table, int64_t n_seg, int64_t n_items, int64_t coef, int64_t bc1, int64_t bc2, float beta1,
                float beta2, float beta3, float one_minus_beta2, float eps, float weight_decay, int adam_w_mode,
                int64_t seg_ids, int64_t num_ids, int64_t skip, int64_t partial, int64_t seg_sums, int64_t out,
                int64_t stream) {
  return dsc_lamb_phase1(ptr<const int64_t>(table), n_seg, n_items, ptr<const float>(coef), ptr<const float>(bc1),
                         ptr<const float>(bc2), beta1, beta2, beta3, one_minus_beta2, eps, weight_decay, adam_w_mode,
                         ptr<const int64_t>(seg_ids), num_ids, ptr<const uint8_t>(skip), ptr<float>(partial),
                         ptr<float>(seg_sums), ptr<float>(out), ptr<void>(stream));
}

int lamb_phase2(int64_t table, int64_t n_seg, int64_t n_items, int64_t step_size, int64_t seg_ids, int64_t bc1,
                int64_t bc2, float eps, float weight_decay, int adam_w_mode, int64_t skip, int64_t stream) {
  return dsc_lamb_phase2(ptr<const int64_t>(table), n_seg, n_items, ptr<const float>(step_size),
                         ptr<const int64_t>(seg_ids), ptr<const float>(bc1), ptr<const float>(bc2), eps, weight_decay,
                         adam_w_mode, ptr<const uint8_t>(skip), ptr<void>(stream));
}

int lars_phase2(int64_t table, int64_t n_seg, int64_t n_items, int64_t coef, int64_t ratio, int64_t seg_ids,
                int64_t steps, int64_t lr_ptr, float lr, float weight_decay, float momentum, float one_minus_dampening,
                int nesterov, int64_t skip, int64_t stream) {
  return dsc_lars_phase2(ptr<const int64_t>(table), n_seg, n_items, ptr<const float>(coef), ptr<const float>(ratio),
                         ptr<const int64_t>(seg_ids), ptr<const float>(steps), ptr<const float>(lr_ptr), lr,
                         weight_decay, momentum, one_minus_dampening, nesterov, ptr<const uint8_t>(skip),
                         ptr<void>(stream));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ds_conadv fused multi-tensor LAMB/LARS CUDA kernels (raw launchers; use ds_conadv.kernels.cuda)";
  m.def("chunk_elems", &dsc_chunk_elems);
  m.def("error_string", [](int code) { return std::string(dsc_error_string(code)); });
  m.def("sumsq2", &sumsq2);
  m.def("lamb_phase1", &lamb_phase1);
  m.def("lamb_phase2", &lamb_phase2);
  m.def("lars_phase2", &lars_phase2);
}
