// Rotary position embeddings on the CPU, computed in float32 (float64 for float64 x).
#pragma once

#include <ATen/core/Tensor.h>

namespace fusedlm::cpu {

// x: (B, H, T, D) any strides, float64/float32/bfloat16/float16
// cos, sin: (B, T, R/2) or (1, T, R/2) (one table for every batch row), contiguous, in the
//   compute dtype (float32; float64 for float64 x); R <= D
// returns (B, H, T, D) contiguous, x's dtype: the first R features of each row rotated pairwise,
//   (x1, x2) -> (x1 * cos - x2 * sin, x2 * cos + x1 * sin) (sin negated when conjugate: the
//   backward), the pairs (i, i + R/2), or (2i, 2i + 1) when interleaved; the rest copied.
at::Tensor rotary_embedding(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            bool interleaved, bool conjugate);

}  // namespace fusedlm::cpu
