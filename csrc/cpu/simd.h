// x86 SIMD helpers shared by the CPU kernels. The extension is compiled for baseline x86-64
// (it must load on any x86-64 CPU), so AVX2 (AVX-512) code opts in per function with
// FUSEDLM_TARGET_AVX2 (FUSEDLM_TARGET_AVX512) and runs only after cpu_has_avx2()
// (cpu_has_avx512()) says the CPU has it and the instruction-set cap allows it.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define FUSEDLM_X86 1
#define FUSEDLM_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FUSEDLM_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#else
#define FUSEDLM_X86 0
#endif

namespace fusedlm::cpu {

// Instruction sets the kernels have code paths for, in increasing order.
enum class CpuIsa : int { generic = 0, avx2 = 1, avx512 = 2 };

// The best of them this CPU runs (AVX2 with FMA and F16C, which every AVX2 CPU has; AVX-512F),
// detected once.
inline CpuIsa cpu_isa_detected() {
#if FUSEDLM_X86
  static const CpuIsa detected = [] {
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
          __builtin_cpu_supports("f16c"))) {
      return CpuIsa::generic;
    }
    return __builtin_cpu_supports("avx512f") ? CpuIsa::avx512 : CpuIsa::avx2;
  }();
  return detected;
#else
  return CpuIsa::generic;
#endif
}

// The instruction set the kernels use: the detected one unless capped lower (set_cpu_isa in
// the bindings, from FUSEDLM_CPU_ISA, so the tests reach the AVX2 and portable paths on a CPU
// that has more). One per process: inline functions share their statics across the library.
inline std::atomic<int>& cpu_isa_in_use() {
  static std::atomic<int> in_use{static_cast<int>(cpu_isa_detected())};
  return in_use;
}

inline bool cpu_has_avx2() {
  return cpu_isa_in_use().load(std::memory_order_relaxed) >= static_cast<int>(CpuIsa::avx2);
}

inline bool cpu_has_avx512() {
  return cpu_isa_in_use().load(std::memory_order_relaxed) >= static_cast<int>(CpuIsa::avx512);
}

#if FUSEDLM_X86
namespace simd {

// 8-lane loads that widen to float and stores that round back to nearest even, keeping
// NaN a quiet NaN, as c10's scalar conversions do (which GCC does not vectorize).
FUSEDLM_TARGET_AVX2 C10_ALWAYS_INLINE __m256 load8(const float* src) {
  return _mm256_loadu_ps(src);
}
FUSEDLM_TARGET_AVX2 C10_ALWAYS_INLINE __m256 load8(const c10::BFloat16* src) {
  // bfloat16 is the top half of a float: widen and shift into place.
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
FUSEDLM_TARGET_AVX2 C10_ALWAYS_INLINE __m256 load8(const c10::Half* src) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
}
FUSEDLM_TARGET_AVX2 C10_ALWAYS_INLINE void store8(float* dst, __m256 v) {
  _mm256_storeu_ps(dst, v);
}
FUSEDLM_TARGET_AVX2 C10_ALWAYS_INLINE void store8(c10::BFloat16* dst, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
  // Rounding a NaN's payload could carry into the exponent; write a canonical quiet NaN.
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), is_nan);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
FUSEDLM_TARGET_AVX2 C10_ALWAYS_INLINE void store8(c10::Half* dst, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

}  // namespace simd
#endif

}  // namespace fusedlm::cpu
