// Row helpers of the softmax-style CPU kernels (attention, cross-entropy): a row's max, and
// exp(x - shift) in place with its sum. float takes AVX-512 or AVX2 versions when the CPU has
// them (and FUSEDLM_CPU_ISA allows them), picked at run time; double the portable loops.
#pragma once

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace fusedlm::cpu::rows {

// ---- portable versions (used for double and as the fallback) ----

template <typename acc_t>
inline acc_t row_max_generic(const acc_t* x, int64_t n) {
  acc_t result = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < n; ++i) result = std::max(result, x[i]);
  return result;
}

// x = exp(x - shift) in place; returns the sum of the new values.
template <typename acc_t>
inline acc_t exp_shift_sum_generic(acc_t* x, int64_t n, acc_t shift) {
  acc_t sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}


#if FUSEDLM_X86
namespace avx2 {

// exp(x) with a Cephes-style degree-6 polynomial (about 1 ulp on [-87, 88]), the same
// constants for every vector width (avx512::exp), so both give the same results lane by lane.
// Inputs below exp_poly::kMin (including -inf) give exactly 0; NaN stays NaN.
namespace exp_poly {
constexpr float kMax = 88.0f;
constexpr float kMin = -87.3f;
constexpr float kLog2e = 1.44269504088896341f;
// ln 2 in two parts, so r = x - n * ln2 keeps full precision.
constexpr float kLn2High = 0.693359375f;
constexpr float kLn2Low = -2.12194440e-4f;
// p(r) = kCoefficients[0] r^5 + ... + kCoefficients[5], then exp(r) ~ 1 + r + r^2 p(r).
constexpr float kCoefficients[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                    4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace exp_poly

FUSEDLM_TARGET_AVX2 inline __m256 exp(__m256 x) {
  using namespace exp_poly;
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(kMin), _CMP_LT_OQ);
  // Operand order keeps NaN: min/max return the second operand when either is NaN.
  x = _mm256_min_ps(_mm256_set1_ps(kMax), x);
  x = _mm256_max_ps(_mm256_set1_ps(kMin), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Low), r);
  __m256 p = _mm256_set1_ps(kCoefficients[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kCoefficients[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  // 2^n built directly in the exponent field; n is in [-126, 127] after the clamp.
  const __m256i exponent = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
  return _mm256_andnot_ps(underflow, result);
}

FUSEDLM_TARGET_AVX2 inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

FUSEDLM_TARGET_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Lane mask with the first `count` (0..8) lanes set, for row tails.
FUSEDLM_TARGET_AVX2 inline __m256i tail_mask(int64_t count) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lanes);
}

FUSEDLM_TARGET_AVX2 inline float row_max(const float* x, int64_t n) {
  __m256 best = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) best = _mm256_max_ps(best, _mm256_loadu_ps(x + i));
  float result = horizontal_max(best);
  for (; i < n; ++i) result = std::max(result, x[i]);
  return result;
}

FUSEDLM_TARGET_AVX2 inline float exp_shift_sum(float* x, int64_t n, float shift) {
  const __m256 shift_v = _mm256_set1_ps(shift);
  __m256 sum = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp(_mm256_sub_ps(_mm256_loadu_ps(x + i), shift_v));
    _mm256_storeu_ps(x + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (i < n) {
    const __m256i mask = tail_mask(n - i);
    // Masked-off lanes load 0 and give exp(-shift); they are dropped before summing.
    const __m256 e = exp(_mm256_sub_ps(_mm256_maskload_ps(x + i, mask), shift_v));
    _mm256_maskstore_ps(x + i, mask, e);
    sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(mask)));
  }
  return horizontal_sum(sum);
}

}  // namespace avx2

// GCC 12's avx512fintrin.h seeds unmasked intrinsics with a self-initialised "undefined"
// vector, which -Wall reports as uninitialised once inlined (GCC bug 105593, fixed in 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace avx512 {

// avx2::exp on 16 lanes (exp_poly's constants).
FUSEDLM_TARGET_AVX512 inline __m512 exp(__m512 x) {
  using namespace avx2::exp_poly;
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kMin), _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_set1_ps(kMax), x);
  x = _mm512_max_ps(_mm512_set1_ps(kMin), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low), r);
  __m512 p = _mm512_set1_ps(kCoefficients[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kCoefficients[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
  const __m512i exponent = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __m512 result = _mm512_mul_ps(p, _mm512_castsi512_ps(exponent));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~underflow), result);
}

// Lane mask with the first `count` (0..16) lanes set, for row tails.
inline __mmask16 tail_mask(int64_t count) {
  return static_cast<__mmask16>((1u << count) - 1u);
}

FUSEDLM_TARGET_AVX512 inline float row_max(const float* x, int64_t n) {
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) best = _mm512_max_ps(best, _mm512_loadu_ps(x + i));
  if (i < n) {
    const __mmask16 mask = tail_mask(n - i);
    best = _mm512_mask_max_ps(best, mask, best, _mm512_maskz_loadu_ps(mask, x + i));
  }
  return _mm512_reduce_max_ps(best);
}

FUSEDLM_TARGET_AVX512 inline float exp_shift_sum(float* x, int64_t n, float shift) {
  const __m512 shift_v = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp(_mm512_sub_ps(_mm512_loadu_ps(x + i), shift_v));
    _mm512_storeu_ps(x + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (i < n) {
    const __mmask16 mask = tail_mask(n - i);
    const __m512 e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x + i), shift_v));
    _mm512_mask_storeu_ps(x + i, mask, e);
    sum = _mm512_mask_add_ps(sum, mask, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

}  // namespace avx512
#pragma GCC diagnostic pop
#endif

// ---- what the kernels call ----

inline double row_max(const double* x, int64_t n) { return row_max_generic(x, n); }
inline double exp_shift_sum(double* x, int64_t n, double shift) {
  return exp_shift_sum_generic(x, n, shift);
}
inline float row_max(const float* x, int64_t n) {
#if FUSEDLM_X86
  if (cpu_has_avx512()) return avx512::row_max(x, n);
  if (cpu_has_avx2()) return avx2::row_max(x, n);
#endif
  return row_max_generic(x, n);
}
inline float exp_shift_sum(float* x, int64_t n, float shift) {
#if FUSEDLM_X86
  if (cpu_has_avx512()) return avx512::exp_shift_sum(x, n, shift);
  if (cpu_has_avx2()) return avx2::exp_shift_sum(x, n, shift);
#endif
  return exp_shift_sum_generic(x, n, shift);
}

}  // namespace fusedlm::cpu::rows
