// Attention dropout's random numbers, shared by the CPU kernels (cpu/philox.h adds their SIMD
// versions) and the CUDA ones: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy
// as 1, 2, 3", the generator of Random123, curand and Triton's tl.randint4x), laid out exactly
// as fusedlm.reference.attention_dropout_keep and the Triton kernels lay it out, so every
// backend drops the same probabilities for the same seed:
//   key (seed & 0xffffffff, seed >> 32); counter (n & 0xffffffff, n >> 32, 0, 0) with
//   n = row * ceil(Tk / 4) + j / 4 for key j of flat query row row = (b * Hq + h) * Tq + i;
//   the element takes output word j % 4 and is kept iff that word >= floor(p * 2^32).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FUSEDLM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSEDLM_HOST_DEVICE inline
#endif

namespace fusedlm {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

// floor(p * 2^32) for p in [0, 1): the word a kept element must reach.
FUSEDLM_HOST_DEVICE uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * 4294967296.0);
}

// The four words of counter (n lo, n hi, 0, 0) under key seed, into words[0..3]. (The 64-bit
// products compile to one mul.wide.u32 each on a GPU.)
FUSEDLM_HOST_DEVICE void philox4x32(uint64_t seed, uint64_t n, uint32_t* words) {
  uint32_t c0 = static_cast<uint32_t>(n), c1 = static_cast<uint32_t>(n >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)  // (device code only: the host compiler knows no such pragma)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t product_b = uint64_t{kPhiloxRoundB} * c2;
    const uint64_t product_a = uint64_t{kPhiloxRoundA} * c0;
    c0 = static_cast<uint32_t>(product_b >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(product_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(product_b);
    c3 = static_cast<uint32_t>(product_a);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  words[0] = c0;
  words[1] = c1;
  words[2] = c2;
  words[3] = c3;
}

}  // namespace fusedlm
