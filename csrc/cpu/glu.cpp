// Gated linear units on the CPU, act(gate) * up with act one of silu (SwiGLU), exact gelu and
// tanh-approximated gelu (GeGLU): the forward reads gate and up once and writes the product; the
// backward reads the three inputs once and writes both gradients, recomputing act(gate) rather
// than keeping it (eager PyTorch saves it: one activation-sized tensor per MLP). One kernel per
// pass, templated on the activation.
//
// Layout: rows split across threads with at::parallel_for. float32 compute on rows with unit
// column stride takes an AVX2 loop (8 lanes, softmax_rows.h's polynomial exp) when the CPU has
// it: the scalar std::exp loop runs ~3x slower than torch's vectorized silu. The other rows,
// the tails of the AVX2 loop and float64 take the scalar functions (std::exp, std::erfc).
#include "glu.h"
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

using Act = GluActivation;

constexpr int64_t kGrainElems = 32768;

int64_t grain_rows(int64_t I) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(I, 1)); }

constexpr double kSqrtHalf = 0.70710678118654752440;      // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;    // 1 / sqrt(2 pi), the normal pdf at 0
constexpr double kTwoSqrt2OverPi = 1.59576912160573071176;  // 2 sqrt(2 / pi)
constexpr double kGeluCubic = 0.044715;                   // tanh-gelu's cubic coefficient

// ---- scalar activations ---------------------------------------------------------------------

template <typename acc_t>
inline acc_t sigmoid(acc_t g) {
  return acc_t(1) / (acc_t(1) + std::exp(-g));
}

// 2u of tanh-gelu, 0.5 g (1 + tanh(u)) = g sigmoid(2u): 2 sqrt(2/pi) g (1 + 0.044715 g^2).
template <typename acc_t>
inline acc_t gelu_tanh_two_u(acc_t g) {
  return acc_t(kTwoSqrt2OverPi) * g * (acc_t(1) + acc_t(kGeluCubic) * g * g);
}

// act(g)
template <Act A, typename acc_t>
inline acc_t activation(acc_t g) {
  if constexpr (A == Act::silu) {
    return g * sigmoid(g);
  } else if constexpr (A == Act::gelu) {
    // Phi(g) = erfc(-g / sqrt(2)) / 2: no cancellation in the lower tail, as 1 + erf has
    return g * (acc_t(0.5) * std::erfc(-g * acc_t(kSqrtHalf)));
  } else {
    return g * sigmoid(gelu_tanh_two_u(g));
  }
}

// act(g) and act'(g):
//   silu       s + g s (1 - s), s = sigmoid(g)
//   gelu       Phi(g) + g phi(g), phi(g) = exp(-g^2 / 2) / sqrt(2 pi)
//   gelu_tanh  s + g (2u)' s (1 - s), s = sigmoid(2u), (2u)' = 2 sqrt(2/pi) (1 + 3 0.044715 g^2);
//              1 - s = e s with e = exp(-2u) (no cancellation where s is near 1), 1 where s
//              is 0 (e overflowed)
template <Act A, typename acc_t>
inline void activation_and_slope(acc_t g, acc_t& act, acc_t& slope) {
  if constexpr (A == Act::silu) {
    const acc_t sig = sigmoid(g);
    act = g * sig;
    slope = sig * (acc_t(1) + g * (acc_t(1) - sig));
  } else if constexpr (A == Act::gelu) {
    const acc_t cdf = acc_t(0.5) * std::erfc(-g * acc_t(kSqrtHalf));
    act = g * cdf;
    slope = cdf + g * (acc_t(kInvSqrt2Pi) * std::exp(acc_t(-0.5) * g * g));
  } else {
    const acc_t e = std::exp(-gelu_tanh_two_u(g));
    const acc_t s = acc_t(1) / (acc_t(1) + e);
    const acc_t one_minus_s = s > acc_t(0) ? e * s : acc_t(1);
    const acc_t two_du = acc_t(kTwoSqrt2OverPi) * (acc_t(1) + acc_t(3 * kGeluCubic) * g * g);
    act = g * s;
    slope = s + g * two_du * (s * one_minus_s);
  }
}

template <typename scalar_t>
constexpr bool kHasAvx2Path = std::is_same_v<scalar_t, float> ||
                              std::is_same_v<scalar_t, c10::BFloat16> ||
                              std::is_same_v<scalar_t, c10::Half>;

#if FUSEDLM_X86
namespace avx2 {

// exp(a), +inf where a overflows float. The polynomial exp clamps its input at 88, so without
// the blend sigmoid(-100) would be 6e-39 instead of 0 (and silu(-inf) not NaN, as in torch).
FUSEDLM_TARGET_AVX2 inline __m256 exp_or_inf(__m256 a) {
  const __m256 overflow = _mm256_cmp_ps(a, _mm256_set1_ps(88.72f), _CMP_GT_OQ);
  return _mm256_blendv_ps(rows::avx2::exp(a), _mm256_set1_ps(INFINITY), overflow);
}

FUSEDLM_TARGET_AVX2 inline __m256 sigmoid(__m256 g) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp_or_inf(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}

FUSEDLM_TARGET_AVX2 inline __m256 gelu_tanh_two_u(__m256 g) {
  const __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(g, g), _mm256_set1_ps(float(kGeluCubic)),
                                       _mm256_set1_ps(1.0f));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(float(kTwoSqrt2OverPi)), g), inner);
}

// erfc(z) for z >= 0 as t exp(-z^2 + p(t)), t = 1 / (1 + z / 2): Numerical Recipes' erfcc
// (a Chebyshev fit), relative error under 1.2e-7 for every z >= 0 in exact arithmetic and
// under 5e-7 (z <= 2) to 4e-6 (z near 9, erfc ~ 1e-36) in float32. Unlike the absolute-error
// fit (Abramowitz-Stegun 7.1.26) ATen's vectorized erf uses, it keeps gelu's lower tail
// accurate; z^2 enters as an exact hi + lo pair.
namespace erfc_poly {
constexpr float kCoefficients[10] = {0.17087277f,  -0.82215223f, 1.48851587f, -1.13520398f,
                                     0.27886807f,  -0.18628806f, 0.09678418f, 0.37409196f,
                                     1.00002368f,  -1.26551223f};
// Past z = 10 erfc(z) < 2e-44 (float's smallest denormal is 1.4e-45): the clamp keeps z^2's
// lo part finite at z = inf, and exp underflows to exactly 0 from z ~ 9.3 on.
constexpr float kMaxZ = 10.0f;
}  // namespace erfc_poly

// Phi(x), the standard normal CDF: erfc(-x / sqrt(2)) / 2; with kPdf also phi(x) =
// exp(-x^2 / 2) / sqrt(2 pi) into *pdf. NaN stays NaN; Phi(+-inf) = 1, 0.
template <bool kPdf>
FUSEDLM_TARGET_AVX2 inline __m256 normal_cdf(__m256 x, __m256* pdf) {
  using namespace erfc_poly;
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 abs_x = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  // (min's operand order keeps NaN: it returns the second operand when either is NaN)
  const __m256 z = _mm256_min_ps(_mm256_set1_ps(kMaxZ),
                                 _mm256_mul_ps(abs_x, _mm256_set1_ps(float(kSqrtHalf))));
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(z, _mm256_set1_ps(0.5f), one));
  __m256 p = _mm256_set1_ps(kCoefficients[0]);
  for (int i = 1; i < 10; ++i) p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(kCoefficients[i]));
  const __m256 zz = _mm256_mul_ps(z, z);
  const __m256 zz_lo = _mm256_fmsub_ps(z, z, zz);  // z^2 = zz + zz_lo exactly
  const __m256 half_erfc = _mm256_mul_ps(
      _mm256_mul_ps(_mm256_set1_ps(0.5f), t),
      rows::avx2::exp(_mm256_sub_ps(_mm256_sub_ps(p, zz_lo), zz)));
  if constexpr (kPdf) {
    *pdf = _mm256_mul_ps(_mm256_set1_ps(float(kInvSqrt2Pi)),
                         rows::avx2::exp(_mm256_sub_ps(_mm256_sub_ps(_mm256_setzero_ps(), zz),
                                                       zz_lo)));
  }
  // x < 0: erfc(|x| / sqrt(2)) / 2; else 1 - that
  const __m256 negative = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
  return _mm256_blendv_ps(_mm256_sub_ps(one, half_erfc), half_erfc, negative);
}

// act(g) on 8 lanes (the scalar activation's formulas).
template <Act A>
FUSEDLM_TARGET_AVX2 inline __m256 activation(__m256 g) {
  if constexpr (A == Act::silu) {
    return _mm256_mul_ps(g, sigmoid(g));
  } else if constexpr (A == Act::gelu) {
    return _mm256_mul_ps(g, normal_cdf<false>(g, nullptr));
  } else {
    return _mm256_mul_ps(g, sigmoid(gelu_tanh_two_u(g)));
  }
}

// act(g) and act'(g) on 8 lanes (the scalar activation_and_slope's formulas).
template <Act A>
FUSEDLM_TARGET_AVX2 inline void activation_and_slope(__m256 g, __m256& act, __m256& slope) {
  const __m256 one = _mm256_set1_ps(1.0f);
  if constexpr (A == Act::silu) {
    const __m256 sig = sigmoid(g);
    act = _mm256_mul_ps(g, sig);
    slope = _mm256_mul_ps(sig, _mm256_fmadd_ps(g, _mm256_sub_ps(one, sig), one));
  } else if constexpr (A == Act::gelu) {
    __m256 pdf;
    const __m256 cdf = normal_cdf<true>(g, &pdf);
    act = _mm256_mul_ps(g, cdf);
    slope = _mm256_fmadd_ps(g, pdf, cdf);
  } else {
    const __m256 e = exp_or_inf(_mm256_sub_ps(_mm256_setzero_ps(), gelu_tanh_two_u(g)));
    const __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, e));
    const __m256 positive = _mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_GT_OQ);
    const __m256 one_minus_s = _mm256_blendv_ps(one, _mm256_mul_ps(e, s), positive);
    const __m256 two_du = _mm256_mul_ps(
        _mm256_set1_ps(float(kTwoSqrt2OverPi)),
        _mm256_fmadd_ps(_mm256_mul_ps(g, g), _mm256_set1_ps(float(3 * kGeluCubic)), one));
    act = _mm256_mul_ps(g, s);
    slope = _mm256_fmadd_ps(_mm256_mul_ps(g, two_du), _mm256_mul_ps(s, one_minus_s), s);
  }
}

// out (I) = act(g) * u over whole 8-lane groups; returns how many columns it did.
template <Act A, typename scalar_t>
FUSEDLM_TARGET_AVX2 int64_t forward_row(const scalar_t* g, const scalar_t* u, int64_t I,
                                        scalar_t* out) {
  int64_t i = 0;
  for (; i + 8 <= I; i += 8) {
    simd::store8(out + i, _mm256_mul_ps(activation<A>(simd::load8(g + i)), simd::load8(u + i)));
  }
  return i;
}

// dgate = dy * u * act'(g), dup = dy * act(g) (I) over whole 8-lane groups; returns how many
// columns it did.
template <Act A, typename scalar_t>
FUSEDLM_TARGET_AVX2 int64_t backward_row(const scalar_t* dy, const scalar_t* g,
                                         const scalar_t* u, int64_t I, scalar_t* dgate,
                                         scalar_t* dup) {
  int64_t i = 0;
  for (; i + 8 <= I; i += 8) {
    const __m256 dv = simd::load8(dy + i);
    __m256 act, slope;
    activation_and_slope<A>(simd::load8(g + i), act, slope);
    simd::store8(dgate + i, _mm256_mul_ps(_mm256_mul_ps(dv, simd::load8(u + i)), slope));
    simd::store8(dup + i, _mm256_mul_ps(dv, act));
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

template <Act A, typename scalar_t, typename acc_t>
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
          if (cpu_has_avx2()) i = avx2::forward_row<A>(gr, ur, I, o);
        }
#endif
        for (; i < I; ++i) {
          o[i] = static_cast<scalar_t>(activation<A>(static_cast<acc_t>(gr[i])) *
                                       static_cast<acc_t>(ur[i]));
        }
        continue;
      }
      for (int64_t i = 0; i < I; ++i) {
        o[i] = static_cast<scalar_t>(activation<A>(static_cast<acc_t>(g.at(n, i))) *
                                     static_cast<acc_t>(u.at(n, i)));
      }
    }
  });
}

template <Act A, typename scalar_t, typename acc_t>
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
          i = avx2::backward_row<A>(dy.data + n * dy.row, g.data + n * g.row,
                                    u.data + n * u.row, I, dgate + n * I, dup + n * I);
        }
      }
#endif
      for (; i < I; ++i) {
        const acc_t dv = static_cast<acc_t>(dy.at(n, i));
        acc_t act, slope;
        activation_and_slope<A>(static_cast<acc_t>(g.at(n, i)), act, slope);
        dgate[n * I + i] = static_cast<scalar_t>(dv * static_cast<acc_t>(u.at(n, i)) * slope);
        dup[n * I + i] = static_cast<scalar_t>(dv * act);
      }
    }
  });
}

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// f(std::integral_constant<Act, activation>{}): the kernels' activation as a template argument.
template <typename F>
void with_activation(Act activation, F&& f) {
  switch (activation) {
    case Act::silu:
      return f(std::integral_constant<Act, Act::silu>{});
    case Act::gelu:
      return f(std::integral_constant<Act, Act::gelu>{});
    case Act::gelu_tanh:
      return f(std::integral_constant<Act, Act::gelu_tanh>{});
  }
}

}  // namespace

at::Tensor glu_fwd(const at::Tensor& gate, const at::Tensor& up, GluActivation activation) {
  at::Tensor out = at::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "glu_fwd", [&] {
    with_activation(activation, [&](auto act) {
      forward<decltype(act)::value, scalar_t, acc_type<scalar_t>>(
          gate, up, out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> glu_bwd(const at::Tensor& grad_out, const at::Tensor& gate,
                                           const at::Tensor& up, GluActivation activation) {
  const auto options = gate.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dgate = at::empty(gate.sizes(), options), dup = at::empty(gate.sizes(), options);
  if (dgate.numel() == 0) return {dgate, dup};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "glu_bwd", [&] {
    with_activation(activation, [&](auto act) {
      backward<decltype(act)::value, scalar_t, acc_type<scalar_t>>(
          grad_out, gate, up, dgate.mutable_data_ptr<scalar_t>(), dup.mutable_data_ptr<scalar_t>());
    });
  });
  return {dgate, dup};
}

}  // namespace fusedlm::cpu
