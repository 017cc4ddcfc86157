// Argument checks shared by every op. Each failure raises a Python exception
// (ValueError or TypeError through c10's typed errors) that names the argument
// and says what is wrong, so a bad call never reaches a kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#ifdef FUSEDLM_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fusedlm {

// ValueError: a value or shape is wrong.
#define FUSEDLM_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, "fusedlm: ", __VA_ARGS__)
// TypeError: a dtype is wrong.
#define FUSEDLM_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, "fusedlm: ", __VA_ARGS__)

inline void check_defined(const at::Tensor& t, const char* name) {
  FUSEDLM_CHECK_VALUE(t.defined(), "argument '", name, "' is an undefined tensor");
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  check_defined(t, name);
  FUSEDLM_CHECK_VALUE(t.dim() == dim, "argument '", name, "' must be ", dim,
                      "-D, got shape ", t.sizes());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  FUSEDLM_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf,
                     "argument '", name, "' must be float64, float32, float16 or bfloat16, got ",
                     s);
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  FUSEDLM_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "argument '", name,
                     "' has dtype ", t.scalar_type(), " but '", ref_name, "' has dtype ",
                     ref.scalar_type(), "; they must match");
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  FUSEDLM_CHECK_VALUE(t.device() == ref.device(), "argument '", name, "' is on ", t.device(),
                      " but '", ref_name, "' is on ", ref.device(),
                      "; all tensors must be on one device");
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  FUSEDLM_CHECK_VALUE(t.sizes() == expected, "argument '", name, "' must have shape ", expected,
                      ", got ", t.sizes());
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  FUSEDLM_CHECK_VALUE(t.device().is_cpu(), "argument '", name,
                      "' must be a CPU tensor for the cpu kernels, got ", t.device());
}

// Kernels index with int64_t; sizes past this would overflow offsets computed
// as products of sizes and strides.
inline void check_fits_index(const at::Tensor& t, const char* name) {
  FUSEDLM_CHECK_VALUE(t.numel() < (int64_t{1} << 62), "argument '", name,
                      "' has too many elements (", t.numel(), ") for the kernel's index type");
}

// A scalar argument that must be a finite number (NaN and +-inf rejected).
inline void check_finite(double value, const char* name) {
  FUSEDLM_CHECK_VALUE(std::isfinite(value), "argument '", name, "' must be finite, got ", value);
}

// Kernels index every size and stride with int64_t; a tensor whose largest reachable element
// offset (sum of (size - 1) * stride) does not fit would make that arithmetic overflow.
inline void check_fits_strides(const at::Tensor& t, const char* name) {
  if (t.numel() == 0) return;
  int64_t reach = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t step = t.size(d) - 1;
    const int64_t stride = t.stride(d);
    FUSEDLM_CHECK_VALUE(stride >= 0, "argument '", name, "' has a negative stride ", stride,
                        " in dim ", d);
    FUSEDLM_CHECK_VALUE(stride == 0 || step <= (std::numeric_limits<int64_t>::max() - reach) / stride,
                        "argument '", name, "' has strides ", t.strides(), " and sizes ",
                        t.sizes(), " whose offsets overflow the kernel's index type");
    reach += step * stride;
  }
}

// A size the kernel indexes with a 32-bit int (e.g. a row length of the CUDA norm kernels).
inline void check_fits_int32(int64_t value, const char* name, const char* what) {
  FUSEDLM_CHECK_VALUE(value <= std::numeric_limits<int32_t>::max(), "argument '", name, "' has ",
                      what, " ", value, ", over the kernel's limit of ",
                      std::numeric_limits<int32_t>::max());
}

// An optional one-element tensor argument (a device scalar such as a learning rate or
// GradScaler's grad_scale / found_inf): defined, one element, dense, on `device` (or, when
// allow_cpu, on the CPU), float32 when require_float32 (else any floating dtype).
inline void check_scalar_tensor(const std::optional<at::Tensor>& t, const char* name,
                                const at::Device& device, bool allow_cpu, bool require_float32) {
  if (!t.has_value()) return;
  check_defined(*t, name);
  FUSEDLM_CHECK_VALUE(t->numel() == 1, "argument '", name,
                      "' must be a one-element tensor, got shape ", t->sizes());
  FUSEDLM_CHECK_VALUE(t->layout() == at::kStrided, "argument '", name, "' must be dense");
  FUSEDLM_CHECK_VALUE(t->device() == device || (allow_cpu && t->device().is_cpu()), "argument '",
                      name, "' is on ", t->device(), " but must be on ", device,
                      allow_cpu ? " (or the CPU)" : "");
  if (require_float32) {
    FUSEDLM_CHECK_TYPE(t->scalar_type() == at::kFloat, "argument '", name,
                       "' must be float32, got ", t->scalar_type());
  } else {
    check_floating(*t, name);
  }
}

// The CUDA AdamW kernel indexes a tensor's 64K-element chunks with a 32-bit int.
// t is list[index] of the argument `list`.
inline void check_fits_chunked_index(const at::Tensor& t, const char* list, size_t index) {
  constexpr int64_t kMaxNumel = int64_t{std::numeric_limits<int32_t>::max()} * 65536;
  FUSEDLM_CHECK_VALUE(t.numel() <= kMaxNumel, "argument '", list, "[", index,
                      "]' has too many elements (", t.numel(), ") for the CUDA kernel's chunk index");
}

#ifdef FUSEDLM_WITH_CUDA
// Raises (RuntimeError) with the op's name when a CUDA launcher reports an error.
inline void check_cuda_status(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "fusedlm: ", op, ": CUDA error ", cudaGetErrorName(status),
              ": ", cudaGetErrorString(status));
}
#endif

}  // namespace fusedlm
