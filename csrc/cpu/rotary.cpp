// Rotary position embeddings on the CPU: one pass over x, the angles' cos and sin read once per
// (batch, position) and shared by every head.
//
// Layout: tasks are (b, t) positions split across threads with at::parallel_for; each task
// rotates the H rows of its position into the contiguous output.
#include "rotary.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fusedlm::cpu {
namespace {

// Positions per task are chosen so one task touches at least this many elements.
constexpr int64_t kGrainElems = 16384;

// One row: out (D) contiguous from x (D, stride sd); c, s (half) the row's angles.
template <typename scalar_t, typename acc_t>
inline void rotate_row(const scalar_t* x, int64_t sd, const acc_t* c, const acc_t* s,
                       int64_t half, int64_t D, bool interleaved, acc_t sign, scalar_t* out) {
  // Pair i is (x[i * step], x[i * step + second]) in elements (times sd in x).
  const int64_t step = interleaved ? 2 : 1, second = interleaved ? 1 : half;
  for (int64_t i = 0; i < half; ++i) {
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
