// Attention dropout's random numbers on the CPU: the scalar Philox4x32-10 of ../philox4x32.h
// (shared with the CUDA kernels; its comment has the layout every backend follows) and its
// AVX2 / AVX-512 versions, eight or sixteen counters at once, which give the same words.
#pragma once

#include "cpu/simd.h"
#include "philox4x32.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fusedlm::cpu {

// (philox4x32, dropout_threshold and the constants: fusedlm::, ../philox4x32.h.)

#if FUSEDLM_X86
namespace avx2 {

// High and low 32 bits of a * m in each of 8 lanes.
FUSEDLM_TARGET_AVX2 C10_ALWAYS_INLINE void multiply_high_low(__m256i a, __m256i m, __m256i* high,
                                                             __m256i* low) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  *low = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *high = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Stores the words (c0, c1, c2, c3) of 8 counters interleaved: words[4 * g + w] = c_w[g].
FUSEDLM_TARGET_AVX2 C10_ALWAYS_INLINE void store_interleaved(__m256i c0, __m256i c1, __m256i c2,
                                                             __m256i c3, uint32_t* words) {
  // A 4 x 8 transpose of 32-bit words into 8 x 4, within and then across the 128-bit halves.
  const __m256i t01_lo = _mm256_unpacklo_epi32(c0, c1), t01_hi = _mm256_unpackhi_epi32(c0, c1);
  const __m256i t23_lo = _mm256_unpacklo_epi32(c2, c3), t23_hi = _mm256_unpackhi_epi32(c2, c3);
  const __m256i g0 = _mm256_unpacklo_epi64(t01_lo, t23_lo);  // counters 0, 4
  const __m256i g1 = _mm256_unpackhi_epi64(t01_lo, t23_lo);  // counters 1, 5
  const __m256i g2 = _mm256_unpacklo_epi64(t01_hi, t23_hi);  // counters 2, 6
  const __m256i g3 = _mm256_unpackhi_epi64(t01_hi, t23_hi);  // counters 3, 7
  __m256i* out = reinterpret_cast<__m256i*>(words);
  _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(g0, g1, 0x20));  // counters 0, 1
  _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(g2, g3, 0x20));  // counters 2, 3
  _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(g0, g1, 0x31));  // counters 4, 5
  _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(g2, g3, 0x31));  // counters 6, 7
}

// Eight counters n0 .. n0 + 7 at once: words[4 * g + w] is word w of counter n0 + g.
FUSEDLM_TARGET_AVX2 inline void philox4x32_x8(uint64_t seed, uint64_t n0, uint32_t* words) {
  alignas(32) uint32_t lo[8], hi[8];
  for (int g = 0; g < 8; ++g) {
    lo[g] = static_cast<uint32_t>(n0 + g);
    hi[g] = static_cast<uint32_t>((n0 + g) >> 32);
  }
  __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
  __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i round_a = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i round_b = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  for (int round = 0; round < 10; ++round) {
    __m256i high_b, low_b, high_a, low_a;
    multiply_high_low(c2, round_b, &high_b, &low_b);
    multiply_high_low(c0, round_a, &high_a, &low_a);
    c0 = _mm256_xor_si256(_mm256_xor_si256(high_b, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(high_a, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c1 = low_b;
    c3 = low_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  store_interleaved(c0, c1, c2, c3, words);
}

// x[c] = words[c] >= threshold ? x[c] * scale : 0 for c < n, 8 lanes at a time (unsigned
// compare: both sides biased by 2^31 for the signed one AVX2 has).
FUSEDLM_TARGET_AVX2 inline void scale_kept(float* x, const uint32_t* words, int64_t n,
                                           uint32_t threshold, float scale) {
  const __m256i bias = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i biased_threshold =
      _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(threshold)), bias);
  const __m256 scale8 = _mm256_set1_ps(scale);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256i biased = _mm256_xor_si256(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + c)), bias);
    const __m256 dropped = _mm256_castsi256_ps(_mm256_cmpgt_epi32(biased_threshold, biased));
    _mm256_storeu_ps(x + c, _mm256_andnot_ps(dropped, _mm256_mul_ps(_mm256_loadu_ps(x + c),
                                                                    scale8)));
  }
  for (; c < n; ++c) x[c] = words[c] >= threshold ? x[c] * scale : 0.0f;
}

}  // namespace avx2

namespace avx512 {

// High and low 32 bits of a * m in each of 16 lanes.
FUSEDLM_TARGET_AVX512 C10_ALWAYS_INLINE void multiply_high_low(__m512i a, __m512i m,
                                                               __m512i* high, __m512i* low) {
  const __m512i even = _mm512_mul_epu32(a, m);                         // even lanes
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // odd lanes
  *low = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  *high = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// Sixteen counters n0 .. n0 + 15 at once: words[4 * g + w] is word w of counter n0 + g.
FUSEDLM_TARGET_AVX512 inline void philox4x32_x16(uint64_t seed, uint64_t n0, uint32_t* words) {
  alignas(64) uint32_t lo[16], hi[16];
  for (int g = 0; g < 16; ++g) {
    lo[g] = static_cast<uint32_t>(n0 + g);
    hi[g] = static_cast<uint32_t>((n0 + g) >> 32);
  }
  __m512i c0 = _mm512_load_si512(lo), c1 = _mm512_load_si512(hi);
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m512i round_a = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m512i round_b = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundB));
  for (int round = 0; round < 10; ++round) {
    __m512i high_b, low_b, high_a, low_a;
    multiply_high_low(c2, round_b, &high_b, &low_b);
    multiply_high_low(c0, round_a, &high_a, &low_a);
    c0 = _mm512_xor_si512(_mm512_xor_si512(high_b, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c2 = _mm512_xor_si512(_mm512_xor_si512(high_a, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c1 = low_b;
    c3 = low_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  // Each 256-bit half is 8 counters: interleaved as the AVX2 version does.
  avx2::store_interleaved(_mm512_castsi512_si256(c0), _mm512_castsi512_si256(c1),
                          _mm512_castsi512_si256(c2), _mm512_castsi512_si256(c3), words);
  avx2::store_interleaved(_mm512_extracti64x4_epi64(c0, 1), _mm512_extracti64x4_epi64(c1, 1),
                          _mm512_extracti64x4_epi64(c2, 1), _mm512_extracti64x4_epi64(c3, 1),
                          words + 32);
}

}  // namespace avx512
#endif

// Attention dropout of one query row's keys [key_begin, key_begin + n): x[c * stride] (key
// key_begin + c) becomes x * kept_scale where kept and 0 where dropped. row: the flat query
// row (b * Hq + h) * Tq + i; groups = ceil(Tk / 4). words: scratch of at least n + 8 words.
template <typename acc_t>
void apply_dropout(acc_t* x, int64_t stride, int64_t n, uint64_t seed, uint64_t row,
                   int64_t groups, int64_t key_begin, uint32_t threshold, acc_t kept_scale,
                   uint32_t* words) {
  if (n <= 0) return;
  const int64_t first_group = key_begin / 4;
  const int64_t group_count = (key_begin + n - 1) / 4 - first_group + 1;
  const uint64_t n0 = row * static_cast<uint64_t>(groups) + static_cast<uint64_t>(first_group);
  int64_t g = 0;
#if FUSEDLM_X86
  if (cpu_has_avx512()) {
    for (; g + 16 <= group_count; g += 16) avx512::philox4x32_x16(seed, n0 + g, words + 4 * g);
  }
  if (cpu_has_avx2()) {
    for (; g + 8 <= group_count; g += 8) avx2::philox4x32_x8(seed, n0 + g, words + 4 * g);
  }
#endif
  for (; g < group_count; ++g) philox4x32(seed, n0 + g, words + 4 * g);
  const uint32_t* row_words = words + (key_begin - 4 * first_group);
#if FUSEDLM_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (stride == 1 && cpu_has_avx2()) {
      return avx2::scale_kept(x, row_words, n, threshold, kept_scale);
    }
  }
#endif
  for (int64_t c = 0; c < n; ++c) {
    acc_t& value = x[c * stride];
    value = row_words[c] >= threshold ? value * kept_scale : acc_t(0);
  }
}

}  // namespace fusedlm::cpu
