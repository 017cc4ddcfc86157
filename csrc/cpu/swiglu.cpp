// SwiGLU on the CPU: the forward reads gate and up once and writes the product; the backward
// reads the three inputs once and writes both gradients, recomputing sigmoid(gate) rather than
// keeping silu(gate) (eager PyTorch saves it: one activation-sized tensor per MLP).
//
// Layout: rows split across threads with at::parallel_for. float32 compute on rows with unit
// column stride takes an AVX2 loop (8 lanes, softmax_rows.h's polynomial exp) when the CPU has
// it: the scalar std::exp loop runs ~3x slower than torch's vectorized silu.
#include "swiglu.h"
#include "softmax_rows.h"
#include "simd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fusedlm::cpu {
namespace {

constexpr int64_t kGrainElems = 32768;

int64_t grain_rows(int64_t I) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(I, 1)); }

template <typename acc_t>
inline acc_t sigmoid(acc_t g) {
  return acc_t(1) / (acc_t(1) + std::exp(-g));
}

template <typename scalar_t>
constexpr bool kHasAvx2Path = std::is_same_v<scalar_t, float> ||
                              std::is_same_v<scalar_t, c10::BFloat16> ||
                              std::is_same_v<scalar_t, c10::Half>;

#if FUSEDLM_X86
namespace avx2 {

// sigmoid(g) = 1 / (1 + exp(-g)). The polynomial exp clamps its input at 88, so lanes where -g
// overflows float get exp = +inf: sigmoid(-inf) is then 0 and silu(-inf) NaN, as in torch.
FUSEDLM_TARGET_AVX2 inline __m256 sigmoid(__m256 g) {
  const __m256 minus_g = _mm256_sub_ps(_mm256_setzero_ps(), g);
  const __m256 overflow = _mm256_cmp_ps(minus_g, _mm256_set1_ps(88.72f), _CMP_GT_OQ);
  const __m256 e = _mm256_blendv_ps(rows::avx2::exp(minus_g), _mm256_set1_ps(INFINITY), overflow);
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, e));
}

// out (I) = silu(g) * u over whole 8-lane groups; returns how many columns it did.
template <typename scalar_t>
FUSEDLM_TARGET_AVX2 int64_t forward_row(const scalar_t* g, const scalar_t* u, int64_t I,
                                        scalar_t* out) {
  int64_t i = 0;
  for (; i + 8 <= I; i += 8) {
    const __m256 gv = simd::load8(g + i);
    simd::store8(out + i, _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid(gv)), simd::load8(u + i)));
  }
  return i;
}

// dgate, dup (I) from dy, g, u (I) over whole 8-lane groups; returns how many columns it did.
template <typename scalar_t>
FUSEDLM_TARGET_AVX2 int64_t backward_row(const scalar_t* dy, const scalar_t* g,
                                         const scalar_t* u, int64_t I, scalar_t* dgate,
                                         scalar_t* dup) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= I; i += 8) {
    const __m256 dv = simd::load8(dy + i), gv = simd::load8(g + i), uv = simd::load8(u + i);
    const __m256 sig = sigmoid(gv);
    // dgate = dy * u * sig * (1 + g * (1 - sig)), dup = dy * g * sig
    const __m256 slope = _mm256_fmadd_ps(gv, _mm256_sub_ps(one, sig), one);
    simd::store8(dgate + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(dv, uv), sig), slope));
    simd::store8(dup + i, _mm256_mul_ps(_mm256_mul_ps(dv, gv), sig));
  }
  return i;
}

}  // namespace avx2
#endif

// A strided (N, I) operand: element (n, i) at data[n * row + i * col].
template <typename scalar_t>
struct Rows {
  const scalar_t* data;
  int64_t row, col;
  explicit Rows(const at::Tensor& t) : data(t.const_data_ptr<scalar_t>()), row(t.stride(0)), col(t.stride(1)) {}
  const scalar_t& at(int64_t n, int64_t i) const { return data[n * row + i * col]; }
};

template <typename scalar_t, typename acc_t>
void forward(const at::Tensor& gate, const at::Tensor& up, scalar_t* out) {
  const int64_t N = gate.size(0), I = gate.size(1);
  const Rows<scalar_t> g(gate), u(up);
  at::parallel_for(0, N, grain_rows(I), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      scalar_t* o = out + n * I;
      if (g.col == 1 && u.col == 1) {  // (the usual case: a loop the compiler vectorizes)
        const scalar_t* gr = g.data + n * g.row;
        const scalar_t* ur = u.data + n * u.row;
        int64_t i = 0;
#if FUSEDLM_X86
        if constexpr (kHasAvx2Path<scalar_t>) {
          if (cpu_has_avx2()) i = avx2::forward_row(gr, ur, I, o);
        }
#endif
        for (; i < I; ++i) {
          const acc_t gv = static_cast<acc_t>(gr[i]);
          o[i] = static_cast<scalar_t>(gv * sigmoid(gv) * static_cast<acc_t>(ur[i]));
        }
        continue;
      }
      for (int64_t i = 0; i < I; ++i) {
        const acc_t gv = static_cast<acc_t>(g.at(n, i));
        o[i] = static_cast<scalar_t>(gv * sigmoid(gv) * static_cast<acc_t>(u.at(n, i)));
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& up,
              scalar_t* dgate, scalar_t* dup) {
  const int64_t N = gate.size(0), I = gate.size(1);
  const Rows<scalar_t> dy(grad_out), g(gate), u(up);
  at::parallel_for(0, N, grain_rows(I), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int64_t i = 0;
#if FUSEDLM_X86
      if constexpr (kHasAvx2Path<scalar_t>) {
        if (cpu_has_avx2() && dy.col == 1 && g.col == 1 && u.col == 1) {
          i = avx2::backward_row(dy.data + n * dy.row, g.data + n * g.row, u.data + n * u.row, I,
                                 dgate + n * I, dup + n * I);
        }
      }
#endif
      for (; i < I; ++i) {
        const acc_t gv = static_cast<acc_t>(g.at(n, i)), uv = static_cast<acc_t>(u.at(n, i));
        const acc_t dv = static_cast<acc_t>(dy.at(n, i));
        const acc_t sig = sigmoid(gv);
        dgate[n * I + i] = static_cast<scalar_t>(dv * uv * sig * (acc_t(1) + gv * (acc_t(1) - sig)));
        dup[n * I + i] = static_cast<scalar_t>(dv * gv * sig);
      }
    }
  });
}

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

}  // namespace

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  at::Tensor out = at::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_fwd", [&] {
    forward<scalar_t, acc_type<scalar_t>>(gate, up, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& grad_out, const at::Tensor& gate,
                                              const at::Tensor& up) {
  const auto options = gate.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dgate = at::empty(gate.sizes(), options), dup = at::empty(gate.sizes(), options);
  if (dgate.numel() == 0) return {dgate, dup};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_bwd", [&] {
    backward<scalar_t, acc_type<scalar_t>>(grad_out, gate, up, dgate.mutable_data_ptr<scalar_t>(),
                                           dup.mutable_data_ptr<scalar_t>());
  });
  return {dgate, dup};
}

}  // namespace fusedlm::cpu
