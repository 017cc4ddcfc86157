// Rotary position embeddings on the CPU: one pass over x, the angles' cos and sin read once per
// (batch, position) and shared by every head.
//
// Layout: tasks are (b, t) positions split across threads with at::parallel_for; each task
// rotates the H rows of its position into the contiguous output. Rows with unit feature stride
// in the (i, i + R/2) pairing take an AVX2 loop for float32 compute when the CPU has it
// (GCC vectorizes neither the strided loop nor c10's bfloat16/half conversions).
#include "rotary.h"
#include "simd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fusedlm::cpu {
namespace {

// Positions per task are chosen so one task touches at least this many elements.
constexpr int64_t kGrainElems = 16384;

template <typename scalar_t>
constexpr bool kHasAvx2Path = std::is_same_v<scalar_t, float> ||
                              std::is_same_v<scalar_t, c10::BFloat16> ||
                              std::is_same_v<scalar_t, c10::Half>;

#if FUSEDLM_X86
// The pairs (i, i + half) of a row with unit stride, over whole 8-lane groups of i; returns how
// many pairs it did.
template <typename scalar_t>
FUSEDLM_TARGET_AVX2 int64_t rotate_halves_avx2(const scalar_t* x, const float* c, const float* s,
                                               int64_t half, float sign, scalar_t* out) {
  const __m256 sign_v = _mm256_set1_ps(sign);
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m256 x1 = simd::load8(x + i), x2 = simd::load8(x + half + i);
    const __m256 cv = _mm256_loadu_ps(c + i);
    const __m256 sv = _mm256_mul_ps(sign_v, _mm256_loadu_ps(s + i));
    simd::store8(out + i, _mm256_fmsub_ps(x1, cv, _mm256_mul_ps(x2, sv)));
    simd::store8(out + half + i, _mm256_fmadd_ps(x2, cv, _mm256_mul_ps(x1, sv)));
  }
  return i;
}
#endif

// One row: out (D) contiguous from x (D, stride sd); c, s (half) the row's angles.
template <typename scalar_t, typename acc_t>
inline void rotate_row(const scalar_t* x, int64_t sd, const acc_t* c, const acc_t* s,
                       int64_t half, int64_t D, bool interleaved, acc_t sign, scalar_t* out) {
  // Pair i is (x[i * step], x[i * step + second]) in elements (times sd in x).
  const int64_t step = interleaved ? 2 : 1, second = interleaved ? 1 : half;
  int64_t i = 0;
#if FUSEDLM_X86
  if constexpr (kHasAvx2Path<scalar_t>) {
    if (!interleaved && sd == 1 && cpu_has_avx2()) {
      i = rotate_halves_avx2(x, c, s, half, sign, out);
    }
  }
#endif
  for (; i < half; ++i) {
    const acc_t x1 = static_cast<acc_t>(x[i * step * sd]);
    const acc_t x2 = static_cast<acc_t>(x[(i * step + second) * sd]);
    const acc_t sn = sign * s[i];
    out[i * step] = static_cast<scalar_t>(x1 * c[i] - x2 * sn);
    out[i * step + second] = static_cast<scalar_t>(x2 * c[i] + x1 * sn);
  }
  for (int64_t j = 2 * half; j < D; ++j) out[j] = x[j * sd];
}

template <typename scalar_t, typename acc_t>
void rotate(const at::Tensor& x, const acc_t* cos, const acc_t* sin, int64_t cos_stride_b,
            int64_t half, bool interleaved, bool conjugate, scalar_t* out) {
  const int64_t H = x.size(1), T = x.size(2), D = x.size(3);
  const int64_t sb = x.stride(0), sh = x.stride(1), st = x.stride(2), sd = x.stride(3);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const acc_t sign = conjugate ? acc_t(-1) : acc_t(1);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(H * D, 1));
  at::parallel_for(0, x.size(0) * T, grain, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      const acc_t* c = cos + b * cos_stride_b + t * half;
      const acc_t* s = sin + b * cos_stride_b + t * half;
      for (int64_t h = 0; h < H; ++h) {
        rotate_row(x_data + b * sb + h * sh + t * st, sd, c, s, half, D, interleaved, sign,
                   out + ((b * H + h) * T + t) * D);
      }
    }
  });
}

}  // namespace

at::Tensor rotary_embedding(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            bool interleaved, bool conjugate) {
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int64_t half = cos.size(2);
  const int64_t cos_stride_b = cos.size(0) == 1 ? 0 : cos.size(1) * half;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_embedding",
                                  [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    rotate<scalar_t, acc_t>(x, cos.const_data_ptr<acc_t>(), sin.const_data_ptr<acc_t>(),
                            cos_stride_b, half, interleaved, conjugate,
                            out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace fusedlm::cpu
