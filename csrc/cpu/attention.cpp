// Flash attention on the CPU: tiled forward with an online softmax, and a
// backward that recomputes the probabilities from the saved logsumexp. No
// T x T matrix is ever stored: scratch is a few (block x block) tiles per
// thread, plus O(T) per head for lse / Delta and the per-split dq partials.
//
// Layout conventions used throughout (all scratch is row-major):
//   a "block" of a (T, D) matrix is `rows` consecutive rows of it, copied into
//   a thread-local buffer of the compute type (float, or double for float64
//   inputs). Copying is what lets every input have arbitrary strides (transposed
//   views, stride-0 expands, offsets) and converts bf16/fp16 to float once per
//   block instead of once per multiply-add. Blocks that already are row-major
//   in the compute type (float32 with unit stride along D) are read in place.
//   The block GEMMs run on at::native::cpublas::brgemm (MKL / oneDNN); the
//   softmax exp, row reductions and tile transposes have AVX2 versions chosen
//   at runtime.

#include "cpu/attention.h"
#include "cpu/philox.h"
#include "cpu/simd.h"
#include "cpu/softmax_rows.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>


namespace fusedlm::cpu {
namespace {

// Tile sizes. A query block is the unit of forward parallelism and of the
// inner backward loop; a key block is the unit the online softmax advances by
// and the unit of dk/dv ownership in the backward.
// Sizes measured on AVX2 (B=1..4, H=4..8, T=1024, D=64): in the forward larger
// tiles amortise the K/V block copies over more queries; in the backward a
// taller key tile amortises the per-pair Q^T / dO^T transposes.
constexpr int64_t kBlockQuery = 128;
constexpr int64_t kBlockKey = 128;
constexpr int64_t kBwdBlockQuery = 64;
constexpr int64_t kBwdBlockKey = 128;
// Query tiles of at most this many rows (decoding: one new token, or a few) take their scores
// as dot products with the key rows where they lie, instead of transposing every key tile
// for the GEMM: the transpose moves the whole tile for one or two rows of work.
constexpr int64_t kDotProductRowsMax = 4;
// Fewest keys a forward key split (see key_splits) takes: below that, its merge and its own
// copy of the query tile cost about what the split saves.
constexpr int64_t kMinKeysPerSplit = 2 * kBlockKey;
// Upper bound on the backward's per-split dq partial buffers beyond the first.
constexpr int64_t kDqPartialBudgetBytes = int64_t(1) << 30;

// float64 inputs are computed in float64 (gradcheck); everything else in float32.
template <typename scalar_t>
struct ComputeTypeOf {
  using type = float;
};
template <>
struct ComputeTypeOf<double> {
  using type = double;
};
template <typename scalar_t>
using compute_t = typename ComputeTypeOf<scalar_t>::type;

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Attention dropout as the kernels apply it (cpu/philox.h): off when p is 0.
struct Dropout {
  double p = 0.0;
  uint64_t seed = 0;
  bool active() const { return p > 0; }
  uint32_t threshold() const { return dropout_threshold(p); }
  double kept_scale() const { return 1.0 / (1.0 - p); }
};

// Maps 0, 1, 2, 3, ... to 0, n-1, 1, n-2, ...: under causal masking block
// costs grow (or shrink) with the index, and at::parallel_for hands each thread
// one contiguous range, so interleaving cheap and expensive blocks balances it.
int64_t zigzag(int64_t index, int64_t n) {
  return (index % 2 == 0) ? index / 2 : n - 1 - index / 2;
}

// A read-only (B, H, T, D) tensor seen through its strides.
template <typename scalar_t>
struct StridedHeads {
  const scalar_t* data;
  int64_t stride_batch, stride_head, stride_time, stride_dim;

  explicit StridedHeads(const at::Tensor& t)
      : data(t.const_data_ptr<scalar_t>()),
        stride_batch(t.stride(0)),
        stride_head(t.stride(1)),
        stride_time(t.stride(2)),
        stride_dim(t.stride(3)) {}

  // First element of row `time` of head (batch, head).
  const scalar_t* row(int64_t batch, int64_t head, int64_t time) const {
    return data + batch * stride_batch + head * stride_head + time * stride_time;
  }
};

// dst (rows, D) = multiplier * src rows, converted to the compute type.
template <typename scalar_t, typename acc_t>
void copy_rows(const StridedHeads<scalar_t>& src, int64_t batch, int64_t head, int64_t time_start,
               int64_t rows, int64_t D, acc_t multiplier, acc_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* in = src.row(batch, head, time_start + r);
    acc_t* out = dst + r * D;
    if (src.stride_dim == 1) {
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<acc_t>(in[d]) * multiplier;
    } else {
      for (int64_t d = 0; d < D; ++d)
        out[d] = static_cast<acc_t>(in[d * src.stride_dim]) * multiplier;
    }
  }
}

// dst (D, rows) with leading dimension ld_dst = transpose of src (rows, D) with
// leading dimension ld_src. Portable version.
template <typename acc_t>
void transpose_generic(const acc_t* src, int64_t ld_src, int64_t rows, int64_t D, acc_t* dst,
                       int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) dst[d * ld_dst + r] = src[r * ld_src + d];
}

#if FUSEDLM_X86
namespace avx2 {
// Same contract as transpose_generic, in 8 x 8 register tiles: a scalar
// transpose writes one float per cache line and was a large share of the runtime.
FUSEDLM_TARGET_AVX2 void transpose(const float* src, int64_t ld_src, int64_t rows, int64_t D,
                                   float* dst, int64_t ld_dst) {
  int64_t r0 = 0;
  for (; r0 + 8 <= rows; r0 += 8) {
    int64_t d0 = 0;
    for (; d0 + 8 <= D; d0 += 8) {
      const float* s = src + r0 * ld_src + d0;
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * ld_src);
      const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
      const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
      const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
      const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* o = dst + d0 * ld_dst + r0;
      _mm256_storeu_ps(o + 0 * ld_dst, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(o + 1 * ld_dst, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(o + 2 * ld_dst, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(o + 3 * ld_dst, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(o + 4 * ld_dst, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(o + 5 * ld_dst, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(o + 6 * ld_dst, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(o + 7 * ld_dst, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
    for (; d0 < D; ++d0)
      for (int64_t r = r0; r < r0 + 8; ++r) dst[d0 * ld_dst + r] = src[r * ld_src + d0];
  }
  for (; r0 < rows; ++r0)
    for (int64_t d = 0; d < D; ++d) dst[d * ld_dst + r0] = src[r0 * ld_src + d];
}
}  // namespace avx2
#endif

void transpose(const double* src, int64_t ld_src, int64_t rows, int64_t D, double* dst,
               int64_t ld_dst) {
  transpose_generic(src, ld_src, rows, D, dst, ld_dst);
}
void transpose(const float* src, int64_t ld_src, int64_t rows, int64_t D, float* dst,
               int64_t ld_dst) {
#if FUSEDLM_X86
  if (cpu_has_avx2()) return avx2::transpose(src, ld_src, rows, D, dst, ld_dst);
#endif
  transpose_generic(src, ld_src, rows, D, dst, ld_dst);
}

// `rows` rows of head (batch, head) as a (rows, D) row-major matrix of the
// compute type with leading dimension *ld: the tensor memory itself when it
// already has that form (no copy), else `buffer` (rows, D) after a converting copy.
template <typename scalar_t, typename acc_t>
const acc_t* rows_view(const StridedHeads<scalar_t>& src, int64_t batch, int64_t head,
                       int64_t time_start, int64_t rows, int64_t D, acc_t* buffer, int64_t* ld) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    // The GEMM wants ld >= D; a single row is contiguous whatever its row stride.
    if (src.stride_dim == 1 && (rows == 1 || src.stride_time >= D)) {
      *ld = rows == 1 ? D : src.stride_time;
      return src.row(batch, head, time_start);
    }
  }
  copy_rows(src, batch, head, time_start, rows, D, acc_t(1), buffer);
  *ld = D;
  return buffer;
}

// dst (D, rows) = transpose of `rows` rows of head (batch, head), in the compute
// type. scratch (rows, D) holds the converted rows when they cannot be read in place.
template <typename scalar_t, typename acc_t>
void copy_rows_transposed(const StridedHeads<scalar_t>& src, int64_t batch, int64_t head,
                          int64_t time_start, int64_t rows, int64_t D, acc_t* dst, acc_t* scratch) {
  int64_t ld = 0;
  const acc_t* block = rows_view(src, batch, head, time_start, rows, D, scratch, &ld);
  transpose(block, ld, rows, D, dst, rows);
}

// ---- block matrix multiply: C (M, N) (+)= A (M, K) @ B (K, N), row-major ----

// float: torch's exported small-GEMM entry point (MKL / oneDNN underneath).
void matmul(int64_t M, int64_t N, int64_t K, const float* A, int64_t ld_a, const float* B,
            int64_t ld_b, float* C, int64_t ld_c, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, ld_a, ld_b, ld_c, accumulate, A, B, C);
}

// double: plain loops; float64 exists for gradcheck, where speed does not matter.
void matmul(int64_t M, int64_t N, int64_t K, const double* A, int64_t ld_a, const double* B,
            int64_t ld_b, double* C, int64_t ld_c, bool accumulate) {
  for (int64_t m = 0; m < M; ++m) {
    double* c = C + m * ld_c;
    if (!accumulate) std::fill(c, c + N, 0.0);
    for (int64_t k = 0; k < K; ++k) {
      const double a = A[m * ld_a + k];
      const double* b = B + k * ld_b;
      for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
    }
  }
}

// ---- row helpers: portable versions (used for double and as the fallback) ----

// (softmax_rows.h: the row max and exp(x - shift) with its sum, shared with cross-entropy)
using rows::exp_shift_sum;
using rows::row_max;

// x[i] = exp(x[i] * scale - shift[i]) in place (shift = +inf gives exactly 0).
template <typename acc_t>
void exp_scale_shift_generic(acc_t* x, int64_t n, acc_t scale, const acc_t* shift) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i] * scale - shift[i]);
}

// grad[i] = probs[i] * (grad[i] - delta[i]) in place: the softmax backward.
// s (rows, cols) = q (rows, D) @ k^T with k (cols, D) of leading dimension ld_k.
template <typename acc_t>
void scores_by_dots_generic(const acc_t* q, int64_t rows, const acc_t* k, int64_t ld_k,
                            int64_t cols, int64_t D, acc_t* s) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      acc_t sum = 0;
      for (int64_t d = 0; d < D; ++d) sum += q[r * D + d] * k[c * ld_k + d];
      s[r * cols + c] = sum;
    }
  }
}

// x[i] = softcap * tanh(x[i] / softcap): Gemma 2's logit soft-capping of the scores. With
// tanh_out, tanh(x[i] / softcap) too, whose 1 - tanh^2 the backward needs (stride 1).
template <typename acc_t>
void cap_scores_generic(acc_t* x, int64_t n, acc_t softcap, acc_t* tanh_out) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t t = std::tanh(x[i] / softcap);
    if (tanh_out != nullptr) tanh_out[i] = t;
    x[i] = softcap * t;
  }
}

template <typename acc_t>
void softmax_grad_generic(const acc_t* probs, acc_t* grad, int64_t n, const acc_t* delta) {
  for (int64_t i = 0; i < n; ++i) grad[i] = probs[i] * (grad[i] - delta[i]);
}

// ---- AVX2 versions for float: the exp is what the softmax spends its time on ----

#if FUSEDLM_X86
namespace avx2 {

using rows::avx2::exp;
using rows::avx2::horizontal_sum;
using rows::avx2::tail_mask;

FUSEDLM_TARGET_AVX2 void exp_scale_shift(float* x, int64_t n, float scale, const float* shift) {
  const __m256 scale_v = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 arg = _mm256_fmsub_ps(_mm256_loadu_ps(x + i), scale_v, _mm256_loadu_ps(shift + i));
    _mm256_storeu_ps(x + i, exp(arg));
  }
  if (i < n) {
    const __m256i mask = tail_mask(n - i);
    const __m256 arg = _mm256_fmsub_ps(_mm256_maskload_ps(x + i, mask), scale_v,
                                       _mm256_maskload_ps(shift + i, mask));
    _mm256_maskstore_ps(x + i, mask, exp(arg));
  }
}

FUSEDLM_TARGET_AVX2 void softmax_grad(const float* probs, float* grad, int64_t n,
                                      const float* delta) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 diff = _mm256_sub_ps(_mm256_loadu_ps(grad + i), _mm256_loadu_ps(delta + i));
    _mm256_storeu_ps(grad + i, _mm256_mul_ps(_mm256_loadu_ps(probs + i), diff));
  }
  for (; i < n; ++i) grad[i] = probs[i] * (grad[i] - delta[i]);
}

// scores_by_dots_generic with four keys per pass over q's row (four accumulators, one
// horizontal sum each at the end).
// q: (rows, D); k: (cols, D), leading dimension ld_k; s: (rows, cols)
FUSEDLM_TARGET_AVX2 void scores_by_dots(const float* q, int64_t rows, const float* k,
                                        int64_t ld_k, int64_t cols, int64_t D, float* s) {
  const int64_t full = D - D % 8;
  const __m256i mask = tail_mask(D - full);
  for (int64_t r = 0; r < rows; ++r) {
    const float* qr = q + r * D;
    float* sr = s + r * cols;
    int64_t c = 0;
    for (; c + 4 <= cols; c += 4) {
      const float* k0 = k + c * ld_k;
      const float* k1 = k0 + ld_k;
      const float* k2 = k1 + ld_k;
      const float* k3 = k2 + ld_k;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      for (int64_t d = 0; d < full; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qr + d);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + d), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + d), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + d), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + d), a3);
      }
      if (full < D) {
        const __m256 qv = _mm256_maskload_ps(qr + full, mask);
        a0 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k0 + full, mask), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k1 + full, mask), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k2 + full, mask), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k3 + full, mask), a3);
      }
      sr[c] = horizontal_sum(a0);
      sr[c + 1] = horizontal_sum(a1);
      sr[c + 2] = horizontal_sum(a2);
      sr[c + 3] = horizontal_sum(a3);
    }
    for (; c < cols; ++c) {
      const float* kc = k + c * ld_k;
      __m256 a = _mm256_setzero_ps();
      for (int64_t d = 0; d < full; d += 8)
        a = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), _mm256_loadu_ps(kc + d), a);
      if (full < D)
        a = _mm256_fmadd_ps(_mm256_maskload_ps(qr + full, mask),
                            _mm256_maskload_ps(kc + full, mask), a);
      sr[c] = horizontal_sum(a);
    }
  }
}

// tanh on 8 lanes from exp, as the Triton kernels compute it (std::tanh, scalar, made a capped
// forward 6x slower than a plain one): sign(u) (1 - 2 / (e^(2|u|) + 1)) for |u| >= 0.3; below,
// where that form loses a small tanh's digits to the 1 -, the odd Taylor series to u^11 (the
// next term is under 2e-9 relative). A few ulps relative at most (tests/ops); NaN stays NaN.
namespace tanh_series {
constexpr float kSwitch = 0.3f;
// u + u^3 (c[4] + u^2 (c[3] + u^2 (c[2] + u^2 (c[1] + u^2 c[0])))): tanh's odd Taylor terms
constexpr float kCoefficients[5] = {-1382.0f / 155925.0f, 62.0f / 2835.0f, -17.0f / 315.0f,
                                    2.0f / 15.0f, -1.0f / 3.0f};
}  // namespace tanh_series

FUSEDLM_TARGET_AVX2 inline __m256 tanh(__m256 u) {
  using namespace tanh_series;
  const __m256 sign_bit = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
  const __m256 magnitude = _mm256_andnot_ps(sign_bit, u);
  const __m256 e = exp(_mm256_add_ps(magnitude, magnitude));  // (exp saturates at e^88)
  __m256 large = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
  large = _mm256_or_ps(large, _mm256_and_ps(sign_bit, u));  // large >= 0: u's sign
  const __m256 small_lanes = _mm256_cmp_ps(magnitude, _mm256_set1_ps(kSwitch), _CMP_LT_OQ);
  const __m256 u_small = _mm256_and_ps(small_lanes, u);  // (0 elsewhere: no overflow)
  const __m256 u2 = _mm256_mul_ps(u_small, u_small);
  __m256 series = _mm256_set1_ps(kCoefficients[0]);
  for (int i = 1; i < 5; ++i) {
    series = _mm256_fmadd_ps(series, u2, _mm256_set1_ps(kCoefficients[i]));
  }
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(u_small, u2), series, u_small);
  return _mm256_blendv_ps(large, small, small_lanes);
}

FUSEDLM_TARGET_AVX2 void cap_scores(float* x, int64_t n, float softcap, float* tanh_out) {
  const __m256 cap = _mm256_set1_ps(softcap);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 t = tanh(_mm256_div_ps(_mm256_loadu_ps(x + i), cap));
    if (tanh_out != nullptr) _mm256_storeu_ps(tanh_out + i, t);
    _mm256_storeu_ps(x + i, _mm256_mul_ps(cap, t));
  }
  if (i < n) {
    const __m256i mask = tail_mask(n - i);
    const __m256 t = tanh(_mm256_div_ps(_mm256_maskload_ps(x + i, mask), cap));
    if (tanh_out != nullptr) _mm256_maskstore_ps(tanh_out + i, mask, t);
    _mm256_maskstore_ps(x + i, mask, _mm256_mul_ps(cap, t));
  }
}

}  // namespace avx2

// ---- AVX-512 versions of the softmax's exp passes: twice the lanes per instruction ----
// (The forward spends a quarter of its non-GEMM time in exp_shift_sum on AVX2.)
// GCC 12's avx512fintrin.h seeds unmasked intrinsics with a self-initialised "undefined"
// vector, which -Wall reports as uninitialised once inlined (GCC bug 105593, fixed in 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace avx512 {

using rows::avx512::exp;
using rows::avx512::tail_mask;

FUSEDLM_TARGET_AVX512 void exp_scale_shift(float* x, int64_t n, float scale, const float* shift) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 arg = _mm512_fmsub_ps(_mm512_loadu_ps(x + i), scale_v, _mm512_loadu_ps(shift + i));
    _mm512_storeu_ps(x + i, exp(arg));
  }
  if (i < n) {
    const __mmask16 mask = tail_mask(n - i);
    const __m512 arg = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(mask, x + i), scale_v,
                                       _mm512_maskz_loadu_ps(mask, shift + i));
    _mm512_mask_storeu_ps(x + i, mask, exp(arg));
  }
}

// avx2::tanh on 16 lanes.
FUSEDLM_TARGET_AVX512 inline __m512 tanh(__m512 u) {
  using namespace avx2::tanh_series;
  const __m512i sign_bit = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 magnitude =
      _mm512_castsi512_ps(_mm512_andnot_si512(sign_bit, _mm512_castps_si512(u)));
  const __m512 e = exp(_mm512_add_ps(magnitude, magnitude));
  __m512 large = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
  large = _mm512_castsi512_ps(_mm512_or_si512(
      _mm512_castps_si512(large), _mm512_and_si512(sign_bit, _mm512_castps_si512(u))));
  const __mmask16 small_lanes =
      _mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(kSwitch), _CMP_LT_OQ);
  const __m512 u_small = _mm512_maskz_mov_ps(small_lanes, u);
  const __m512 u2 = _mm512_mul_ps(u_small, u_small);
  __m512 series = _mm512_set1_ps(kCoefficients[0]);
  for (int i = 1; i < 5; ++i) {
    series = _mm512_fmadd_ps(series, u2, _mm512_set1_ps(kCoefficients[i]));
  }
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(u_small, u2), series, u_small);
  return _mm512_mask_blend_ps(small_lanes, large, small);
}

FUSEDLM_TARGET_AVX512 void cap_scores(float* x, int64_t n, float softcap, float* tanh_out) {
  const __m512 cap = _mm512_set1_ps(softcap);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 t = tanh(_mm512_div_ps(_mm512_loadu_ps(x + i), cap));
    if (tanh_out != nullptr) _mm512_storeu_ps(tanh_out + i, t);
    _mm512_storeu_ps(x + i, _mm512_mul_ps(cap, t));
  }
  if (i < n) {
    const __mmask16 mask = tail_mask(n - i);
    const __m512 t = tanh(_mm512_div_ps(_mm512_maskz_loadu_ps(mask, x + i), cap));
    if (tanh_out != nullptr) _mm512_mask_storeu_ps(tanh_out + i, mask, t);
    _mm512_mask_storeu_ps(x + i, mask, _mm512_mul_ps(cap, t));
  }
}

}  // namespace avx512
#pragma GCC diagnostic pop

#endif

// Overloads the kernels call: float goes to AVX-512 or AVX2 when the CPU has it (and
// FUSEDLM_CPU_ISA allows it).
void exp_scale_shift(double* x, int64_t n, double scale, const double* shift) {
  exp_scale_shift_generic(x, n, scale, shift);
}
void softmax_grad(const double* probs, double* grad, int64_t n, const double* delta) {
  softmax_grad_generic(probs, grad, n, delta);
}
void scores_by_dots(const double* q, int64_t rows, const double* k, int64_t ld_k, int64_t cols,
                    int64_t D, double* s) {
  scores_by_dots_generic(q, rows, k, ld_k, cols, D, s);
}
void cap_scores(double* x, int64_t n, double softcap, double* tanh_out = nullptr) {
  cap_scores_generic(x, n, softcap, tanh_out);
}
void cap_scores(float* x, int64_t n, float softcap, float* tanh_out = nullptr) {
#if FUSEDLM_X86
  if (cpu_has_avx512()) return avx512::cap_scores(x, n, softcap, tanh_out);
  if (cpu_has_avx2()) return avx2::cap_scores(x, n, softcap, tanh_out);
#endif
  cap_scores_generic(x, n, softcap, tanh_out);
}

void exp_scale_shift(float* x, int64_t n, float scale, const float* shift) {
#if FUSEDLM_X86
  if (cpu_has_avx512()) return avx512::exp_scale_shift(x, n, scale, shift);
  if (cpu_has_avx2()) return avx2::exp_scale_shift(x, n, scale, shift);
#endif
  exp_scale_shift_generic(x, n, scale, shift);
}
void softmax_grad(const float* probs, float* grad, int64_t n, const float* delta) {
#if FUSEDLM_X86
  if (cpu_has_avx2()) return avx2::softmax_grad(probs, grad, n, delta);
#endif
  softmax_grad_generic(probs, grad, n, delta);
}
void scores_by_dots(const float* q, int64_t rows, const float* k, int64_t ld_k, int64_t cols,
                    int64_t D, float* s) {
#if FUSEDLM_X86
  if (cpu_has_avx2()) return avx2::scores_by_dots(q, rows, k, ld_k, cols, D, s);
#endif
  scores_by_dots_generic(q, rows, k, ld_k, cols, D, s);
}

// Key ranges: (B, 2) int32 [start, end) per batch row, or (B, Tq, 2) per query (per_query);
// data nullptr without them.
struct KeyRanges {
  const int32_t* data = nullptr;
  bool per_query = false;
};

// The mask: key j is visible to query i iff (!causal || j <= i + causal_offset) and
// (!windowed || j >= i + window_offset) and key_lo <= j < key_hi (the batch row's key range:
// the rest is padding) and, with per-query ranges, query_ranges[i] holds j. So each query
// sees one contiguous run of keys and, without per-query ranges, each key is seen by one
// contiguous run of queries (with them, the run query_begin/query_end give holds those that
// do, and each row's range hides the rest). Offsets are clamped to [-Tq, Tk] and the key
// ranges to [0, Tk] (past those bounds a limit excludes everything or nothing), so no index
// computation overflows.
struct Visibility {
  int64_t Tq, Tk;
  bool causal;
  int64_t causal_offset;
  bool windowed;
  int64_t window_offset;
  int64_t key_lo = 0, key_hi;
  const int32_t* query_ranges = nullptr;  // (Tq, 2) int32 of this batch row, or nullptr

  Visibility(int64_t Tq_, int64_t Tk_, bool causal_, int64_t causal_offset_,
             std::optional<int64_t> window_offset_)
      : Tq(Tq_), Tk(Tk_), causal(causal_),
        causal_offset(std::clamp<int64_t>(causal_offset_, -Tq_, Tk_)),
        windowed(window_offset_.has_value()),
        window_offset(std::clamp<int64_t>(window_offset_.value_or(0), -Tq_, Tk_)),
        key_hi(Tk_) {}

  // The mask of batch row `batch`.
  Visibility for_batch(const KeyRanges& ranges, int64_t batch) const {
    Visibility row = *this;
    if (ranges.data != nullptr && ranges.per_query) {
      row.query_ranges = ranges.data + 2 * batch * Tq;
    } else if (ranges.data != nullptr) {
      row.key_hi = std::clamp<int64_t>(ranges.data[2 * batch + 1], 0, Tk);
      row.key_lo = std::clamp<int64_t>(ranges.data[2 * batch], 0, row.key_hi);
    }
    return row;
  }

  bool per_query() const { return query_ranges != nullptr; }
  bool in_range(int64_t key) const { return key >= key_lo && key < key_hi; }

  // Keys [key_begin(i), key_end(i)) are visible to query i (empty when begin >= end).
  int64_t key_begin(int64_t query) const {
    int64_t begin =
        std::max(key_lo, windowed ? std::clamp<int64_t>(query + window_offset, 0, Tk) : 0);
    if (query_ranges != nullptr) {
      begin = std::max(begin, std::clamp<int64_t>(query_ranges[2 * query], 0, Tk));
    }
    return begin;
  }
  int64_t key_end(int64_t query) const {
    int64_t end =
        std::min(key_hi, causal ? std::clamp<int64_t>(query + causal_offset + 1, 0, Tk) : Tk);
    if (query_ranges != nullptr) {
      end = std::min(end, std::clamp<int64_t>(query_ranges[2 * query + 1], 0, Tk));
    }
    return end;
  }
  // Keys that some query of [query_start, query_start + rows) sees lie in [first, second)
  // (empty if first >= second). Without per-query ranges: the first row's begin, the last
  // row's end.
  std::pair<int64_t, int64_t> rows_keys(int64_t query_start, int64_t rows) const {
    if (query_ranges == nullptr) return {key_begin(query_start), key_end(query_start + rows - 1)};
    int64_t first = Tk, second = 0;
    for (int64_t query = query_start; query < query_start + rows; ++query) {
      const int64_t begin = key_begin(query), end = key_end(query);
      if (begin < end) {
        first = std::min(first, begin);
        second = std::max(second, end);
      }
    }
    return {first, second};
  }
  // Queries [query_begin(j), query_end(j)) see key j (none for keys outside the batch row's
  // range); with per-query ranges, some of them may not (their own range hides it).
  int64_t query_begin(int64_t key) const {
    if (!in_range(key)) return Tq;
    return causal ? std::clamp<int64_t>(key - causal_offset, 0, Tq) : 0;
  }
  int64_t query_end(int64_t key) const {
    if (!in_range(key)) return 0;
    return windowed ? std::clamp<int64_t>(key - window_offset + 1, 0, Tq) : Tq;
  }
  // Queries that see some key of [key_start, key_stop): [first, second), empty if none.
  std::pair<int64_t, int64_t> block_queries(int64_t key_start, int64_t key_stop) const {
    const int64_t first = std::max(key_start, key_lo), last = std::min(key_stop, key_hi) - 1;
    if (first > last) return {Tq, 0};
    return {query_begin(first), query_end(last)};
  }
};

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------

// Query heads that share one forward tile. The query heads of a GQA group read the same
// K/V; when the whole query sequence is short enough that several heads' rows fit one
// tile (KV-cache decoding, chunked prefill), they share the tile, so each K/V block is
// read and converted once per group instead of once per query head. The count divides the
// group, and leaves work for every thread: a tile per thread, or enough keys to split the
// tiles' keys across the threads (key_splits).
int64_t heads_per_tile(int64_t B, int64_t Hkv, int64_t group, int64_t Tq, int64_t Tk) {
  const int64_t threads = at::get_num_threads();
  const int64_t most_splits = std::max<int64_t>(1, Tk / kMinKeysPerSplit);
  int64_t best = 1;
  for (int64_t heads = 2; heads <= group && heads * Tq <= kBlockQuery; ++heads) {
    const int64_t tiles = B * Hkv * (group / heads);
    if (group % heads == 0 && tiles * most_splits >= threads) best = heads;
  }
  return best;
}

// Key splits per forward tile (flash-decoding). With fewer tiles than threads (decoding a
// batch of one with few kv heads: every tile is one query block), a tile's keys are split into
// contiguous runs of whole key blocks, each a work item of its own, and the runs' partial
// results are merged by their row max and sum afterwards, so every thread has work.
int64_t key_splits(int64_t tiles, int64_t query_blocks, int64_t Tk) {
  const int64_t threads = at::get_num_threads();
  if (query_blocks != 1 || tiles >= threads) return 1;
  return std::max<int64_t>(1, std::min(ceil_div(threads, tiles), Tk / kMinKeysPerSplit));
}

// q: (B, Hq, Tq, D), k/v: (B, Hkv, Tk, D) any strides; out: (B, Hq, Tq, D) and
// lse: (B, Hq, Tq) contiguous; key_ranges: see KeyRanges. Requires Tq, Tk, D >= 1.
template <typename scalar_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    at::Tensor& out, at::Tensor& lse, double scale, double softcap,
                    const Dropout& dropout, const Visibility& full_mask,
                    const KeyRanges& key_ranges) {
  using acc_t = compute_t<scalar_t>;
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Tk = k.size(2);
  const int64_t group = Hq / Hkv;
  const StridedHeads<scalar_t> query(q), key(k), value(v);
  scalar_t* out_data = out.data_ptr<scalar_t>();  // (B, Hq, Tq, D)
  acc_t* lse_data = lse.data_ptr<acc_t>();        // (B, Hq, Tq)
  const int64_t query_blocks = ceil_div(Tq, kBlockQuery);
  // A tile is `heads` query heads x up to kBlockQuery / heads query rows; heads > 1 only
  // when Tq fits one block, so a tile's rows are contiguous in out and lse.
  const int64_t heads = heads_per_tile(B, Hkv, group, Tq, Tk);
  const int64_t head_tiles = Hq / heads;  // per batch
  const int64_t tiles = B * head_tiles * query_blocks;
  const int64_t splits = key_splits(tiles, query_blocks, Tk);
  const int64_t split_keys = ceil_div(ceil_div(Tk, kBlockKey), splits) * kBlockKey;
  const acc_t scale_value = static_cast<acc_t>(scale);
  const acc_t softcap_value = static_cast<acc_t>(softcap);  // 0: no capping
  const acc_t neg_inf = static_cast<acc_t>(kNegInf);
  const uint32_t dropout_threshold_value = dropout.threshold();
  const acc_t dropout_scale = static_cast<acc_t>(dropout.kept_scale());
  const int64_t key_groups = ceil_div(Tk, 4);  // Philox counters per query row
  // Each split's unnormalised output rows and their running max and sum, for the merge:
  // (tiles * splits, BQ, D) and (tiles * splits, BQ); empty without splits.
  const int64_t partials = splits > 1 ? tiles * splits : 0;
  std::vector<acc_t> partial_out(partials * kBlockQuery * D);
  std::vector<acc_t> partial_max(partials * kBlockQuery);
  std::vector<acc_t> partial_sum(partials * kBlockQuery);

  // Normalises `rows` accumulated rows (o: (rows, D), their max and sum) into out and lse
  // from flat row `first_row` of (B * Hq * Tq).
  const auto write_rows = [&](int64_t first_row, int64_t rows, const acc_t* o_rows,
                              const acc_t* max_rows, const acc_t* sum_rows) {
    scalar_t* out_rows = out_data + first_row * D;
    acc_t* lse_rows = lse_data + first_row;
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t sum = sum_rows[r];
      const acc_t* o = o_rows + r * D;
      scalar_t* dst = out_rows + r * D;
      if (sum > 0) {
        const acc_t inverse = acc_t(1) / sum;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(o[d] * inverse);
        lse_rows[r] = max_rows[r] + std::log(sum);
      } else {
        // A row that sees no key: defined as zero output and lse = -inf.
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(0);
        lse_rows[r] = neg_inf;
      }
    }
  };

  at::parallel_for(0, tiles * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> query_block(kBlockQuery * D);      // (BQ, D), pre-scaled
    std::vector<acc_t> key_block_t(D * kBlockKey);        // (D, BK): K^T for Q @ K^T
    std::vector<acc_t> key_block(kBlockKey * D);    // (BK, D): K rows unless read in place
    std::vector<acc_t> value_block(kBlockKey * D);  // (BK, D): V rows unless read in place
    std::vector<acc_t> scores(kBlockQuery * kBlockKey);   // (BQ, BK): S, then P in place
    std::vector<acc_t> out_acc(kBlockQuery * D);          // (BQ, D): unnormalised output
    std::vector<acc_t> running_max(kBlockQuery);          // (BQ)
    std::vector<acc_t> running_sum(kBlockQuery);          // (BQ)
    std::vector<uint32_t> dropout_words(dropout.active() ? kBlockKey + 8 : 0);  // Philox words

    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile = item / splits;
      const int64_t tile_index = tile / query_blocks;  // b * head_tiles + tile of heads
      const int64_t batch = tile_index / head_tiles;
      const int64_t first_head = tile_index % head_tiles * heads;
      const int64_t kv_head = first_head / group;
      const int64_t query_start = zigzag(tile % query_blocks, query_blocks) * kBlockQuery;
      const int64_t head_rows = std::min(kBlockQuery, Tq - query_start);  // rows per head
      const int64_t rows = heads * head_rows;  // tile row r: head r / head_rows, time r % head_rows
      const Visibility mask = full_mask.for_batch(key_ranges, batch);
      // The tile's rows see keys [rows_begin, rows_end); this split takes keys
      // [key_begin, kv_end) of them.
      const auto [rows_begin, rows_end] = mask.rows_keys(query_start, head_rows);
      const int64_t split_begin = item % splits * split_keys;
      const int64_t key_begin = std::max(split_begin, rows_begin);
      const int64_t kv_end = std::min(split_begin + split_keys, rows_end);

      std::fill(out_acc.begin(), out_acc.begin() + rows * D, acc_t(0));
      std::fill(running_max.begin(), running_max.end(), neg_inf);
      std::fill(running_sum.begin(), running_sum.end(), acc_t(0));
      if (kv_end > key_begin) {
        // Scaling q once here is cheaper than scaling every score tile.
        for (int64_t h = 0; h < heads; ++h) {
          copy_rows(query, batch, first_head + h, query_start, head_rows, D, scale_value,
                    query_block.data() + h * head_rows * D);
        }
      }

      for (int64_t key_start = key_begin; key_start < kv_end; key_start += kBlockKey) {
        const int64_t cols = std::min(kBlockKey, kv_end - key_start);
        // S (rows, cols) = (scale * Q) (rows, D) @ K^T (D, cols)
        if (rows <= kDotProductRowsMax) {
          int64_t key_ld = 0;
          const acc_t* key_rows =
              rows_view(key, batch, kv_head, key_start, cols, D, key_block.data(), &key_ld);
          scores_by_dots(query_block.data(), rows, key_rows, key_ld, cols, D, scores.data());
        } else {
          copy_rows_transposed(key, batch, kv_head, key_start, cols, D, key_block_t.data(),
                               key_block.data());
          matmul(rows, cols, D, query_block.data(), D, key_block_t.data(), cols, scores.data(),
                 cols, /*accumulate=*/false);
        }
        int64_t value_ld = 0;
        const acc_t* value_rows =
            rows_view(value, batch, kv_head, key_start, cols, D, value_block.data(), &value_ld);

        for (int64_t r = 0; r < rows; ++r) {
          acc_t* s = scores.data() + r * cols;
          // Keys outside the row's visible run are treated as absent: only the visible
          // columns [lo, hi) enter the softmax, the rest of P is zero.
          const int64_t time = query_start + r % head_rows;
          const int64_t hi = std::clamp<int64_t>(mask.key_end(time) - key_start, 0, cols);
          const int64_t lo = std::clamp<int64_t>(mask.key_begin(time) - key_start, 0, hi);
          std::fill(s, s + lo, acc_t(0));
          std::fill(s + hi, s + cols, acc_t(0));
          const int64_t visible = hi - lo;
          if (visible == 0) continue;
          if (softcap_value != 0) cap_scores(s + lo, visible, softcap_value);
          const acc_t old_max = running_max[r];
          const acc_t new_max = std::max(old_max, row_max(s + lo, visible));
          const acc_t block_sum = exp_shift_sum(s + lo, visible, new_max);
          if (old_max == neg_inf) {
            // First visible keys of this row: nothing accumulated to rescale.
            running_sum[r] = block_sum;
          } else if (new_max != old_max) {
            const acc_t correction = std::exp(old_max - new_max);
            running_sum[r] = running_sum[r] * correction + block_sum;
            acc_t* o = out_acc.data() + r * D;
            for (int64_t d = 0; d < D; ++d) o[d] *= correction;
          } else {
            running_sum[r] += block_sum;
          }
          running_max[r] = new_max;
          if (dropout.active()) {
            // After the row sum (the softmax is that of every key), before P @ V.
            const int64_t flat_row = (batch * Hq + first_head + r / head_rows) * Tq + time;
            apply_dropout(s + lo, 1, visible, dropout.seed, static_cast<uint64_t>(flat_row),
                          key_groups, key_start + lo, dropout_threshold_value, dropout_scale,
                          dropout_words.data());
          }
        }
        // O (rows, D) += P (rows, cols) @ V (cols, D)
        matmul(rows, D, cols, scores.data(), cols, value_rows, value_ld, out_acc.data(), D,
               /*accumulate=*/true);
      }

      if (splits == 1) {
        write_rows((batch * Hq + first_head) * Tq + query_start, rows, out_acc.data(),
                   running_max.data(), running_sum.data());
      } else {
        std::copy_n(out_acc.data(), rows * D, partial_out.data() + item * kBlockQuery * D);
        std::copy_n(running_max.data(), rows, partial_max.data() + item * kBlockQuery);
        std::copy_n(running_sum.data(), rows, partial_sum.data() + item * kBlockQuery);
      }
    }
  });
  if (splits == 1) return;

  // Merge each tile's splits: rescale every split's rows to the largest max, then add.
  // (Split tiles are one query block each, heads x Tq rows, contiguous in out and lse.)
  const int64_t rows = heads * Tq;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> merged_out(rows * D);  // (rows, D)
    std::vector<acc_t> merged_max(rows);      // (rows)
    std::vector<acc_t> merged_sum(rows);      // (rows)
    for (int64_t tile = begin; tile < end; ++tile) {
      for (int64_t r = 0; r < rows; ++r) {
        acc_t row_max_all = neg_inf;
        for (int64_t split = 0; split < splits; ++split) {
          row_max_all = std::max(row_max_all, partial_max[(tile * splits + split) * kBlockQuery + r]);
        }
        acc_t* o = merged_out.data() + r * D;
        std::fill(o, o + D, acc_t(0));
        acc_t sum = 0;
        for (int64_t split = 0; split < splits && row_max_all != neg_inf; ++split) {
          const int64_t part = tile * splits + split;
          const acc_t split_max = partial_max[part * kBlockQuery + r];
          if (split_max == neg_inf) continue;  // no visible key in this split
          const acc_t weight = std::exp(split_max - row_max_all);
          sum += partial_sum[part * kBlockQuery + r] * weight;
          const acc_t* split_out = partial_out.data() + (part * kBlockQuery + r) * D;
          for (int64_t d = 0; d < D; ++d) o[d] += split_out[d] * weight;
        }
        merged_max[r] = row_max_all;
        merged_sum[r] = sum;
      }
      // tile = b * head_tiles + tile of heads (one query block): its first row is tile * rows.
      write_rows(tile * rows, rows, merged_out.data(), merged_max.data(), merged_sum.data());
    }
  });
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------

// Delta (B, Hq, Tq) = rowsum(grad_out * out) - grad_lse: the softmax-backward correction term
// (a gradient of lse adds grad_lse * P to dS, the same as lowering Delta by it).
template <typename scalar_t>
void compute_delta(const at::Tensor& grad_out, const at::Tensor& out,
                   const compute_t<scalar_t>* grad_lse,  // (B, Hq, Tq) contiguous, or nullptr
                   compute_t<scalar_t>* delta) {         // (B, Hq, Tq)
  using acc_t = compute_t<scalar_t>;
  const int64_t Hq = out.size(1), Tq = out.size(2), D = out.size(3);
  const StridedHeads<scalar_t> grad_view(grad_out), out_view(out);
  const int64_t total_rows = out.size(0) * Hq * Tq;
  at::parallel_for(0, total_rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t time = row % Tq, head = (row / Tq) % Hq, batch = row / (Tq * Hq);
      const scalar_t* g = grad_view.row(batch, head, time);
      const scalar_t* o = out_view.row(batch, head, time);
      // In double (O(T D) work, once): Delta cancels against rowsum(P dP) in dS, so its
      // rounding reaches dq and dk amplified, by 1 / (1 - p) with dropout (a float sum over
      // D = 215 put dq at 3.2x torch's error where p = 0.95: tests/test_fuzz.py).
      double sum = 0;
      for (int64_t d = 0; d < D; ++d)
        sum += static_cast<double>(g[d * grad_view.stride_dim]) *
               static_cast<double>(o[d * out_view.stride_dim]);
      delta[row] = static_cast<acc_t>(grad_lse == nullptr ? sum : sum - grad_lse[row]);
    }
  });
}

// All Tq, Tk, D >= 1. dk/dv: (B, Hkv, Tk, D) contiguous, fully written here.
// dq_partial: (splits, B, Hq, D, Tq) zero-initialised; split s accumulates the
// dq^T contributions of its key range (transposed so that dQ^T += K^T @ dS^T
// needs no transpose of the dS tile). The caller reduces it into dq.
template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const compute_t<scalar_t>* lse,
                     const compute_t<scalar_t>* delta, compute_t<scalar_t>* dq_partial,
                     int64_t splits, at::Tensor& dk, at::Tensor& dv, double scale,
                     double softcap, const Dropout& dropout, const Visibility& full_mask,
                     const KeyRanges& key_ranges) {
  using acc_t = compute_t<scalar_t>;
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Tk = k.size(2);
  const int64_t group = Hq / Hkv;
  const StridedHeads<scalar_t> query(q), key(k), value(v), grad_view(grad_out);
  scalar_t* dk_data = dk.data_ptr<scalar_t>();  // (B, Hkv, Tk, D)
  scalar_t* dv_data = dv.data_ptr<scalar_t>();  // (B, Hkv, Tk, D)
  const int64_t key_blocks = ceil_div(Tk, kBwdBlockKey);
  const acc_t scale_value = static_cast<acc_t>(scale);
  const acc_t softcap_value = static_cast<acc_t>(softcap);  // 0: no capping
  const acc_t pos_inf = std::numeric_limits<acc_t>::infinity();
  const uint32_t dropout_threshold_value = dropout.threshold();
  const acc_t dropout_scale = static_cast<acc_t>(dropout.kept_scale());
  const int64_t key_groups = ceil_div(Tk, 4);  // Philox counters per query row

  at::parallel_for(0, B * Hkv * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> key_block(kBwdBlockKey * D);             // (BK, D)
    std::vector<acc_t> key_block_t(D * kBwdBlockKey);           // (D, BK)
    std::vector<acc_t> value_block(kBwdBlockKey * D);           // (BK, D)
    std::vector<acc_t> query_block(kBwdBlockQuery * D);         // (BQ, D)
    std::vector<acc_t> query_block_t(D * kBwdBlockQuery);       // (D, BQ)
    std::vector<acc_t> grad_block(kBwdBlockQuery * D);          // (BQ, D): dO
    std::vector<acc_t> grad_block_t(D * kBwdBlockQuery);        // (D, BQ): dO^T
    std::vector<acc_t> probs_t(kBwdBlockKey * kBwdBlockQuery);     // (BK, BQ): P^T
    std::vector<acc_t> grad_scores_t(kBwdBlockKey * kBwdBlockQuery);  // (BK, BQ): dP^T, then dS^T
    // (BK, BQ): tanh(S^T / softcap) of the capped scores; empty without capping
    std::vector<acc_t> tanh_t(softcap_value != 0 ? kBwdBlockKey * kBwdBlockQuery : 0);
    // The dropout multipliers (1 / (1 - p) kept, 0 dropped), (BQ, BK) as generated and (BK, BQ)
    // transposed: M^T; P^T * M^T; the Philox words of one query row. Empty without dropout.
    const int64_t dropout_tile = dropout.active() ? kBwdBlockKey * kBwdBlockQuery : 0;
    std::vector<acc_t> dropout_rows(dropout_tile);
    std::vector<acc_t> dropout_t(dropout_tile);
    std::vector<acc_t> dropped_probs_t(dropout_tile);
    std::vector<uint32_t> dropout_words(dropout.active() ? kBwdBlockKey + 8 : 0);
    std::vector<acc_t> lse_shift(kBwdBlockQuery);               // (BQ)
    std::vector<acc_t> delta_block(kBwdBlockQuery);             // (BQ)
    std::vector<acc_t> dk_acc(kBwdBlockKey * D);                // (BK, D), unscaled
    std::vector<acc_t> dv_acc(kBwdBlockKey * D);                // (BK, D)

    for (int64_t item = begin; item < end; ++item) {
      const int64_t kv_head_index = item / splits;  // b * Hkv + h_kv
      const int64_t batch = kv_head_index / Hkv, kv_head = kv_head_index % Hkv;
      const Visibility mask = full_mask.for_batch(key_ranges, batch);
      const int64_t split = zigzag(item % splits, splits);
      const int64_t block_begin = split * key_blocks / splits;
      const int64_t block_end = (split + 1) * key_blocks / splits;

      for (int64_t key_block_index = block_begin; key_block_index < block_end;
           ++key_block_index) {
        const int64_t key_start = key_block_index * kBwdBlockKey;
        const int64_t cols = std::min(kBwdBlockKey, Tk - key_start);
        // Queries [query_begin, query_stop) see some key of the block.
        const auto [query_begin, query_stop] = mask.block_queries(key_start, key_start + cols);
        std::fill(dk_acc.begin(), dk_acc.begin() + cols * D, acc_t(0));
        std::fill(dv_acc.begin(), dv_acc.begin() + cols * D, acc_t(0));

        const acc_t* key_rows = nullptr;    // (cols, D), leading dimension key_ld
        const acc_t* value_rows = nullptr;  // (cols, D), leading dimension value_ld
        int64_t key_ld = 0, value_ld = 0;
        if (query_begin < query_stop) {
          key_rows = rows_view(key, batch, kv_head, key_start, cols, D, key_block.data(), &key_ld);
          transpose(key_rows, key_ld, cols, D, key_block_t.data(), cols);
          value_rows =
              rows_view(value, batch, kv_head, key_start, cols, D, value_block.data(), &value_ld);
        }

        for (int64_t head = kv_head * group;
             head < (kv_head + 1) * group && query_begin < query_stop; ++head) {
          const int64_t head_index = batch * Hq + head;
          acc_t* dq_transposed = dq_partial + ((split * B * Hq) + head_index) * D * Tq;  // (D, Tq)
          const int64_t first_block_start = query_begin / kBwdBlockQuery * kBwdBlockQuery;
          for (int64_t query_start = first_block_start; query_start < query_stop;
               query_start += kBwdBlockQuery) {
            const int64_t rows = std::min(kBwdBlockQuery, Tq - query_start);
            if (mask.per_query()) {
              // The band's run of queries may hold whole blocks whose own ranges miss the keys.
              const auto [rows_begin, rows_end] = mask.rows_keys(query_start, rows);
              if (rows_end <= key_start || rows_begin >= key_start + cols) continue;
            }
            int64_t query_ld = 0, grad_ld = 0;
            const acc_t* query_rows =  // (rows, D), leading dimension query_ld
                rows_view(query, batch, head, query_start, rows, D, query_block.data(), &query_ld);
            transpose(query_rows, query_ld, rows, D, query_block_t.data(), rows);
            // (scale * Q)^T: the scores rounded as the forward's (scale * Q) @ K^T rounds them,
            // so that exp(S - lse) meets the lse they made. Scaling S afterwards instead differs
            // by a few ulps of S, which moved dq by ~1e-5 (relative) where |S| ~ 50 and only lse
            // had a gradient (found by tests/test_fuzz.py's sinks/lse fuzzing).
            for (int64_t i = 0; i < D * rows; ++i) query_block_t[i] *= scale_value;
            const acc_t* grad_rows =  // (rows, D), leading dimension grad_ld
                rows_view(grad_view, batch, head, query_start, rows, D, grad_block.data(),
                          &grad_ld);
            transpose(grad_rows, grad_ld, rows, D, grad_block_t.data(), rows);
            for (int64_t r = 0; r < rows; ++r) {
              const acc_t row_lse = lse[head_index * Tq + query_start + r];
              // lse = -inf marks a row that saw no key: shifting by +inf makes
              // its probabilities exactly 0 instead of exp(+inf).
              lse_shift[r] = (row_lse == -pos_inf) ? pos_inf : row_lse;
              delta_block[r] = delta[head_index * Tq + query_start + r];
            }

            // S^T (cols, rows) = K (cols, D) @ (scale * Q)^T (D, rows)
            matmul(cols, rows, D, key_rows, key_ld, query_block_t.data(), rows,
                   probs_t.data(), rows, /*accumulate=*/false);
            for (int64_t c = 0; c < cols; ++c) {
              acc_t* p = probs_t.data() + c * rows;
              if (softcap_value != 0) cap_scores(p, rows, softcap_value, tanh_t.data() + c * rows);
              exp_scale_shift(p, rows, acc_t(1), lse_shift.data());
              // Only queries [query_begin(key), query_end(key)) see this key.
              const int64_t key = key_start + c;
              const int64_t hidden_end =
                  std::clamp<int64_t>(mask.query_end(key) - query_start, 0, rows);
              const int64_t hidden_begin =
                  std::clamp<int64_t>(mask.query_begin(key) - query_start, 0, hidden_end);
              std::fill(p, p + hidden_begin, acc_t(0));
              std::fill(p + hidden_end, p + rows, acc_t(0));
            }
            if (mask.per_query()) {
              // Each query's own range hides the rest of the block's keys from it.
              for (int64_t r = 0; r < rows; ++r) {
                const int64_t hidden_from =
                    std::clamp<int64_t>(mask.key_end(query_start + r) - key_start, 0, cols);
                const int64_t hidden_to = std::clamp<int64_t>(
                    mask.key_begin(query_start + r) - key_start, 0, hidden_from);
                for (int64_t c = 0; c < hidden_to; ++c) probs_t[c * rows + r] = acc_t(0);
                for (int64_t c = hidden_from; c < cols; ++c) probs_t[c * rows + r] = acc_t(0);
              }
            }
            const acc_t* kept_probs_t = probs_t.data();  // (cols, rows): P^T, or (P * M)^T
            if (dropout.active()) {
              // Row by row (the generator's order, unit stride), then transposed.
              std::fill_n(dropout_rows.data(), rows * cols, acc_t(1));
              for (int64_t r = 0; r < rows; ++r) {
                apply_dropout(dropout_rows.data() + r * cols, 1, cols, dropout.seed,
                              static_cast<uint64_t>(head_index * Tq + query_start + r),
                              key_groups, key_start, dropout_threshold_value, dropout_scale,
                              dropout_words.data());
              }
              transpose(dropout_rows.data(), cols, rows, cols, dropout_t.data(), rows);
              for (int64_t i = 0; i < cols * rows; ++i) {
                dropped_probs_t[i] = probs_t[i] * dropout_t[i];
              }
              kept_probs_t = dropped_probs_t.data();
            }
            // dV (cols, D) += (P * M)^T (cols, rows) @ dO (rows, D)
            matmul(cols, D, rows, kept_probs_t, rows, grad_rows, grad_ld, dv_acc.data(), D,
                   /*accumulate=*/true);
            // dP^T (cols, rows) = V (cols, D) @ dO^T (D, rows), times M^T with dropout: out
            // = (P * M) V, so the gradient reaching P is M * (dO V^T), and Delta = rowsum(dO *
            // out) is still rowsum(P * dP).
            matmul(cols, rows, D, value_rows, value_ld, grad_block_t.data(), rows,
                   grad_scores_t.data(), rows, /*accumulate=*/false);
            if (dropout.active()) {
              for (int64_t i = 0; i < cols * rows; ++i) grad_scores_t[i] *= dropout_t[i];
            }
            // dS^T = P^T * (dP^T - Delta), the scale is applied to dk / dq at the end.
            for (int64_t c = 0; c < cols; ++c) {
              softmax_grad(probs_t.data() + c * rows, grad_scores_t.data() + c * rows, rows,
                           delta_block.data());
            }
            if (softcap_value != 0) {
              // Through the cap: d(softcap * tanh(s / softcap)) / ds = 1 - tanh^2.
              for (int64_t i = 0; i < cols * rows; ++i) {
                grad_scores_t[i] *= acc_t(1) - tanh_t[i] * tanh_t[i];
              }
            }
            // dK (cols, D) += dS^T (cols, rows) @ Q (rows, D)
            matmul(cols, D, rows, grad_scores_t.data(), rows, query_rows, query_ld,
                   dk_acc.data(), D, /*accumulate=*/true);
            // dQ^T (D, rows) += K^T (D, cols) @ dS^T (cols, rows), rows query_start.. of (D, Tq)
            matmul(D, rows, cols, key_block_t.data(), cols, grad_scores_t.data(), rows,
                   dq_transposed + query_start, Tq, /*accumulate=*/true);
          }
        }

        scalar_t* dk_rows = dk_data + (kv_head_index * Tk + key_start) * D;
        scalar_t* dv_rows = dv_data + (kv_head_index * Tk + key_start) * D;
        for (int64_t i = 0; i < cols * D; ++i) {
          dk_rows[i] = static_cast<scalar_t>(dk_acc[i] * scale_value);
          dv_rows[i] = static_cast<scalar_t>(dv_acc[i]);
        }
      }
    }
  });
}

// dq (B, Hq, Tq, D) = scale * sum over splits of dq_partial (splits, B, Hq, D, Tq)^T.
template <typename scalar_t>
void reduce_dq(const compute_t<scalar_t>* dq_partial, int64_t splits, double scale,
               at::Tensor& dq) {
  using acc_t = compute_t<scalar_t>;
  const int64_t heads = dq.size(0) * dq.size(1), Tq = dq.size(2), D = dq.size(3);
  scalar_t* dq_data = dq.data_ptr<scalar_t>();
  const acc_t scale_value = static_cast<acc_t>(scale);
  const int64_t time_blocks = ceil_div(Tq, kBlockQuery);
  at::parallel_for(0, heads * time_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(kBlockQuery * D);  // (BQ, D)
    for (int64_t item = begin; item < end; ++item) {
      const int64_t head_index = item / time_blocks;
      const int64_t time_start = (item % time_blocks) * kBlockQuery;
      const int64_t rows = std::min(kBlockQuery, Tq - time_start);
      std::fill(tile.begin(), tile.end(), acc_t(0));
      for (int64_t split = 0; split < splits; ++split) {
        const acc_t* src = dq_partial + (split * heads + head_index) * D * Tq;  // (D, Tq)
        for (int64_t d = 0; d < D; ++d)
          for (int64_t r = 0; r < rows; ++r) tile[r * D + d] += src[d * Tq + time_start + r];
      }
      scalar_t* dst = dq_data + (head_index * Tq + time_start) * D;
      for (int64_t i = 0; i < rows * D; ++i) dst[i] = static_cast<scalar_t>(tile[i] * scale_value);
    }
  });
}

// The (B, 2) or (B, Tq, 2) int32 [start, end) key ranges, or none. The bindings hand over a
// contiguous int32 CPU tensor of that shape (checked again here: it is read raw).
KeyRanges key_range_data(const std::optional<at::Tensor>& key_range, int64_t B, int64_t Tq) {
  if (!key_range.has_value() || !key_range->defined()) return {};
  const at::Tensor& range = *key_range;
  const bool per_query = range.dim() == 3;
  TORCH_CHECK(range.scalar_type() == at::kInt && range.is_contiguous() &&
                  (range.dim() == 2 || per_query) && range.size(0) == B &&
                  (!per_query || range.size(1) == Tq) && range.size(-1) == 2 &&
                  range.device().is_cpu(),
              "attention: key_range must be a contiguous (B, 2) or (B, Tq, 2) int32 CPU tensor");
  return {range.const_data_ptr<int32_t>(), per_query};
}

// The bindings check the values; checked again here for C++ callers of cpu::attention_*.
// (Any seed: its 64 bits are Philox's key.)
Dropout attention_dropout(double dropout_p, int64_t dropout_seed) {
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "attention: dropout_p must be in [0, 1)");
  return {dropout_p, static_cast<uint64_t>(dropout_seed)};
}

at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, double scale, bool causal,
                                                 int64_t causal_offset,
                                                 std::optional<int64_t> window_offset,
                                                 const std::optional<at::Tensor>& key_range,
                                                 double softcap, double dropout_p,
                                                 int64_t dropout_seed) {
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Tk = k.size(2);
  TORCH_CHECK(Hkv > 0 ? Hq % Hkv == 0 : Hq == 0, "attention_fwd: Hq must be a multiple of Hkv");
  const Visibility mask(Tq, Tk, causal, causal_offset, window_offset);
  const KeyRanges key_ranges = key_range_data(key_range, B, Tq);
  at::Tensor out = at::empty({B, Hq, Tq, D}, q.options());                       // (B, Hq, Tq, D)
  at::Tensor lse = at::empty({B, Hq, Tq}, q.options().dtype(lse_dtype(q)));  // (B, Hq, Tq)
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};

  if (Tk == 0 || D == 0) {
    // Every score is 0 (D == 0) or there is no key (Tk == 0): the output is
    // zero and lse = log(number of visible keys), -inf when there are none.
    out.zero_();
    AT_DISPATCH_FLOATING_TYPES(lse.scalar_type(), "fusedlm_attention_fwd_degenerate", [&] {
      scalar_t* lse_data = lse.data_ptr<scalar_t>();
      for (int64_t row = 0; row < lse.numel(); ++row) {
        const Visibility row_mask = mask.for_batch(key_ranges, row / (Hq * Tq));
        const int64_t visible =
            std::max<int64_t>(0, row_mask.key_end(row % Tq) - row_mask.key_begin(row % Tq));
        lse_data[row] = visible > 0 ? static_cast<scalar_t>(std::log(static_cast<double>(visible)))
                                    : static_cast<scalar_t>(kNegInf);
      }
    });
    return {out, lse};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                  "fusedlm_attention_fwd", [&] {
    forward_kernel<scalar_t>(q, k, v, out, lse, scale, softcap,
                             attention_dropout(dropout_p, dropout_seed), mask, key_ranges);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale, bool causal,
    int64_t causal_offset, std::optional<int64_t> window_offset,
    const std::optional<at::Tensor>& key_range, const std::optional<at::Tensor>& grad_lse,
    double softcap, double dropout_p, int64_t dropout_seed) {
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Tk = k.size(2);
  TORCH_CHECK(Hkv > 0 ? Hq % Hkv == 0 : Hq == 0, "attention_bwd: Hq must be a multiple of Hkv");
  const Visibility mask(Tq, Tk, causal, causal_offset, window_offset);
  const KeyRanges key_ranges = key_range_data(key_range, B, Tq);
  at::Tensor dq = at::empty({B, Hq, Tq, D}, q.options());   // (B, Hq, Tq, D)
  at::Tensor dk = at::empty({B, Hkv, Tk, D}, k.options());  // (B, Hkv, Tk, D)
  at::Tensor dv = at::empty({B, Hkv, Tk, D}, v.options());  // (B, Hkv, Tk, D)
  if (B == 0 || Hq == 0 || Tq == 0 || Tk == 0 || D == 0) {
    // No (query, key) pair contributes: every gradient is zero.
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }

  // Splitting each kv head's key range gives enough work items to fill the
  // threads even when B * Hkv is small; each split owns its dk/dv rows and
  // writes its own dq partial, so the result is deterministic.
  // The partials cost splits * |dq| floats, so the split count is also capped by
  // a memory budget (at least one split always fits: it is dq itself in float).
  const int64_t key_blocks = ceil_div(Tk, kBwdBlockKey);
  const int64_t wanted_items = 2 * static_cast<int64_t>(at::get_num_threads());
  const int64_t partial_bytes = B * Hq * Tq * D * static_cast<int64_t>(sizeof(float));
  const int64_t max_splits_by_memory = std::max<int64_t>(1, kDqPartialBudgetBytes / partial_bytes);
  const int64_t splits = std::clamp<int64_t>(ceil_div(wanted_items, B * Hkv), 1,
                                             std::min(key_blocks, max_splits_by_memory));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                  "fusedlm_attention_bwd", [&] {
    using acc_t = compute_t<scalar_t>;
    const at::ScalarType acc_dtype = lse_dtype(q);
    // lse may come in with any strides (or dtype): one contiguous copy, O(T) per head.
    const at::Tensor lse_c = lse.to(acc_dtype).contiguous();  // (B, Hq, Tq)
    // The kernels read grad_out / out as q's dtype; .to is a no-op when they already are.
    const at::Tensor grad_out_c = grad_out.to(q.scalar_type());  // (B, Hq, Tq, D)
    const at::Tensor out_c = out.to(q.scalar_type());            // (B, Hq, Tq, D)
    at::Tensor delta = at::empty({B, Hq, Tq}, q.options().dtype(acc_dtype));  // (B, Hq, Tq)
    std::optional<at::Tensor> grad_lse_c;                                        // (B, Hq, Tq)
    if (grad_lse.has_value()) grad_lse_c = grad_lse->to(acc_dtype).contiguous();
    compute_delta<scalar_t>(grad_out_c, out_c,
                            grad_lse_c.has_value() ? grad_lse_c->const_data_ptr<acc_t>() : nullptr,
                            delta.data_ptr<acc_t>());
    at::Tensor dq_partial =
        at::zeros({splits, B, Hq, D, Tq}, q.options().dtype(acc_dtype));  // (splits, B, Hq, D, Tq)
    backward_kernel<scalar_t>(grad_out_c, q, k, v, lse_c.const_data_ptr<acc_t>(),
                              delta.const_data_ptr<acc_t>(), dq_partial.data_ptr<acc_t>(),
                              splits, dk, dv, scale, softcap,
                              attention_dropout(dropout_p, dropout_seed), mask, key_ranges);
    reduce_dq<scalar_t>(dq_partial.const_data_ptr<acc_t>(), splits, scale, dq);
  });
  return {dq, dk, dv};
}

}  // namespace fusedlm::cpu
