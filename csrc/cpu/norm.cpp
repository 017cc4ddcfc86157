// LayerNorm and RMSNorm over the last dimension on the CPU.
//
// Layout: every kernel works on a contiguous (M, N) view, one row at a time,
// rows split across threads with at::parallel_for. A 16-bit row is first
// widened into a per-thread acc_t buffer so that the statistics passes and the
// output pass read cached floats instead of re-converting.
//
// Vectorization: the build compiles for the baseline x86-64 ISA, so the row
// kernels are written as plain `omp simd` loops and instantiated twice: once
// inside a target("avx2,fma,f16c") wrapper and once for the baseline; the
// wrapper is picked at run time from cpuid. The loop bodies are always_inline
// so GCC vectorizes them with the ISA of whichever wrapper they land in.
#include "norm.h"
#include "simd.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>


namespace fusedlm::cpu {
namespace {

// Rows per task are chosen so one task touches at least this many elements:
// below it the fork/join cost of a parallel region outweighs the work.
constexpr int64_t kGrainElems = 32768;

// Reductions keep kLanes partial sums (below) over blocks of kSumBlock
// elements, so each partial adds at most 32 terms before the block total is
// folded into a double: a single running float sum over 65536 values that
// share a large offset (x = 1000 + noise) would lose ~1e-4 of the mean, while
// this stays near float rounding.
constexpr int64_t kSumBlock = 1024;

#if FUSEDLM_X86
// 16-bit <-> float row conversions, 8 lanes at a time.
// src: (n); dst: (n)
template <typename src_t, typename dst_t>
FUSEDLM_TARGET_AVX2 void convert_avx2(const src_t* src, dst_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) simd::store8(dst + i, simd::load8(src + i));
  for (; i < n; ++i) dst[i] = static_cast<dst_t>(src[i]);
}
#endif

template <typename T>
constexpr bool kIs16Bit = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// src: (n); dst: (n)
template <bool kAvx2, typename src_t, typename dst_t>
C10_ALWAYS_INLINE void convert_row(const src_t* src, dst_t* dst, int64_t n) {
#if FUSEDLM_X86
  if constexpr (kAvx2 && std::is_same_v<dst_t, float> && kIs16Bit<src_t>) {
    convert_avx2(src, dst, n);
    return;
  }
  if constexpr (kAvx2 && std::is_same_v<src_t, float> && kIs16Bit<dst_t>) {
    convert_avx2(src, dst, n);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<dst_t>(src[i]);
}

// Gives a row as acc_t: the row itself when it already is acc_t, otherwise
// its conversion into buf.
// row: (N); buf: (N) scratch, unused when scalar_t == acc_t
template <bool kAvx2, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE const acc_t* row_as_acc(const scalar_t* row, acc_t* buf, int64_t N) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    convert_row<kAvx2>(row, buf, N);
    return buf;
  }
}

// Independent partial sums per reduction: 32 floats are four AVX2 vectors,
// enough to hide the add latency that a single vector accumulator (what
// `omp simd reduction` gives) serializes on.
constexpr int64_t kLanes = 32;

// Sums term(i) over [0, N) in blocks of kSumBlock, kLanes partial sums per
// block. term: (int64_t) -> acc_t, inlined into the vector loop.
template <typename acc_t, typename Term>
C10_ALWAYS_INLINE double blocked_sum(int64_t N, const Term& term) {
  double total = 0;
  for (int64_t b = 0; b < N; b += kSumBlock) {
    const int64_t e = std::min(N, b + kSumBlock);
    acc_t lanes[kLanes] = {};  // (kLanes)
    int64_t i = b;
    for (; i + kLanes <= e; i += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) lanes[j] += term(i + j);
    }
    // Pairwise fold of the partials: vector adds down to 8 lanes instead of
    // a serial chain of kLanes scalar adds per block.
    for (int64_t width = kLanes / 2; width >= 1; width /= 2) {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) lanes[j] += lanes[j + width];
    }
    acc_t tail = 0;
#pragma omp simd reduction(+ : tail)
    for (int64_t k = i; k < e; ++k) tail += term(k);
    total += static_cast<double>(lanes[0]) + static_cast<double>(tail);
  }
  return total;
}

#if FUSEDLM_X86
// The sum of a register's 8 lanes, folded pairwise: widths 4, 2, 1 (blocked_sum's order).
FUSEDLM_TARGET_AVX2 C10_ALWAYS_INLINE float sum8(__m256 v) {
  __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  four = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(four, _mm_movehdup_ps(four)));
}

// blocked_sum of x (kSquare false) or of (x - shift)^2 (true) over a float row on AVX2: the
// same blocks and kLanes = 32 partial sums, held in four registers and folded in the same
// pairwise order. The portable loop's compiled form keeps the partials in a stack array and
// folds them through memory, which cost more than the terms themselves for rows of a few
// hundred elements (LayerNorm forward at N = 256: benchmarks/NOTES.md).
// x: (N)
template <bool kSquare>
FUSEDLM_TARGET_AVX2 double shifted_sum_avx2(const float* x, float shift, int64_t N) {
  static_assert(kLanes == 32, "four 8-lane registers");
  const __m256 shift8 = _mm256_set1_ps(shift);
  auto term = [&](int64_t i) FUSEDLM_TARGET_AVX2 {
    const __m256 v = _mm256_loadu_ps(x + i);
    if constexpr (kSquare) {
      const __m256 d = _mm256_sub_ps(v, shift8);
      return _mm256_mul_ps(d, d);
    } else {
      return v;
    }
  };
  double total = 0;
  for (int64_t b = 0; b < N; b += kSumBlock) {
    const int64_t e = std::min(N, b + kSumBlock);
    __m256 lanes0 = _mm256_setzero_ps();  // lanes 0-7, then 8-15, 16-23, 24-31
    __m256 lanes1 = _mm256_setzero_ps();
    __m256 lanes2 = _mm256_setzero_ps();
    __m256 lanes3 = _mm256_setzero_ps();
    int64_t i = b;
    for (; i + kLanes <= e; i += kLanes) {
      lanes0 = _mm256_add_ps(lanes0, term(i));
      lanes1 = _mm256_add_ps(lanes1, term(i + 8));
      lanes2 = _mm256_add_ps(lanes2, term(i + 16));
      lanes3 = _mm256_add_ps(lanes3, term(i + 24));
    }
    // widths 16 and 8 of blocked_sum's fold, then 4, 2, 1 within a register
    const float lanes_sum = sum8(_mm256_add_ps(_mm256_add_ps(lanes0, lanes2),
                                               _mm256_add_ps(lanes1, lanes3)));
    float tail = 0;
    for (; i < e; ++i) {
      const float d = x[i] - shift;
      tail += kSquare ? d * d : x[i];
    }
    total += static_cast<double>(lanes_sum) + static_cast<double>(tail);
  }
  return total;
}
#endif

// Sum of x. x: (N)
template <bool kAvx2, typename acc_t>
C10_ALWAYS_INLINE double sum_row(const acc_t* x, int64_t N) {
#if FUSEDLM_X86
  if constexpr (kAvx2 && std::is_same_v<acc_t, float>) return shifted_sum_avx2<false>(x, 0, N);
#endif
  return blocked_sum<acc_t>(N, [x](int64_t i) { return x[i]; });
}

// Sum of (x - shift)^2. x: (N)
template <bool kAvx2, typename acc_t>
C10_ALWAYS_INLINE double sum_sq_row(const acc_t* x, acc_t shift, int64_t N) {
#if FUSEDLM_X86
  if constexpr (kAvx2 && std::is_same_v<acc_t, float>) {
    return shifted_sum_avx2<true>(x, shift, N);
  }
#endif
  return blocked_sum<acc_t>(N, [x, shift](int64_t i) {
    const acc_t d = x[i] - shift;
    return d * d;
  });
}

#if FUSEDLM_X86
// sum_g_gxhat_row for float rows on AVX2 with two registers per sum: with one, each step
// waited on the previous step's add (4 cycles for 8 elements). Blocks of kSumBlock / 2 keep
// each of the 16 lanes per sum at <= 32 terms before the block is folded into a double.
// dy, x: (N); w: (N) or nullptr; g: (N) written when w is given
template <bool kHasWeight>
FUSEDLM_TARGET_AVX2 void sum_g_gxhat_avx2(const float* dy, const float* x, const float* w,
                                          float shift, float rstd, float* g, int64_t N,
                                          double& sum_g, double& sum_gxhat) {
  constexpr int64_t kBlock = kSumBlock / 2;
  const __m256 shift8 = _mm256_set1_ps(shift);
  const __m256 rstd8 = _mm256_set1_ps(rstd);
  auto step = [&](int64_t i, __m256& s_g, __m256& s_gx) FUSEDLM_TARGET_AVX2 {
    __m256 gi = _mm256_loadu_ps(dy + i);
    if constexpr (kHasWeight) {
      gi = _mm256_mul_ps(gi, _mm256_loadu_ps(w + i));
      _mm256_storeu_ps(g + i, gi);
    }
    const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), shift8), rstd8);
    s_g = _mm256_add_ps(s_g, gi);
    s_gx = _mm256_fmadd_ps(gi, xhat, s_gx);
  };
  sum_g = 0;
  sum_gxhat = 0;
  for (int64_t b = 0; b < N; b += kBlock) {
    const int64_t e = std::min(N, b + kBlock);
    __m256 s_g0 = _mm256_setzero_ps();
    __m256 s_g1 = _mm256_setzero_ps();
    __m256 s_gx0 = _mm256_setzero_ps();
    __m256 s_gx1 = _mm256_setzero_ps();
    int64_t i = b;
    for (; i + 16 <= e; i += 16) {
      step(i, s_g0, s_gx0);
      step(i + 8, s_g1, s_gx1);
    }
    if (i + 8 <= e) {
      step(i, s_g0, s_gx0);
      i += 8;
    }
    float tail_g = 0;
    float tail_gx = 0;
    for (; i < e; ++i) {
      float gi = dy[i];
      if constexpr (kHasWeight) {
        gi = dy[i] * w[i];
        g[i] = gi;
      }
      tail_g += gi;
      tail_gx += gi * ((x[i] - shift) * rstd);
    }
    sum_g += static_cast<double>(sum8(_mm256_add_ps(s_g0, s_g1))) + tail_g;
    sum_gxhat += static_cast<double>(sum8(_mm256_add_ps(s_gx0, s_gx1))) + tail_gx;
  }
}
#endif

// Sums of g and g * xhat with g = dy * w (dy when w is null) and
// xhat = (x - shift) * rstd, the two row reductions of both backward passes.
// g is also stored: dx_row then subtracts mean(g) from the same rounded g
// rather than from a freshly recomputed product the compiler may fuse into
// an FMA, which would leave a rounding residual where g - mean(g) is exactly
// 0 (N = 1, constant rows) and scale it by rstd.
// dy, x: (N); w: (N) or nullptr; g: (N) written when w is given
template <bool kAvx2, bool kHasWeight, typename acc_t>
C10_ALWAYS_INLINE void sum_g_gxhat_row(const acc_t* dy, const acc_t* x, const acc_t* w,
                                       acc_t shift, acc_t rstd, acc_t* g, int64_t N,
                                       double& sum_g, double& sum_gxhat) {
#if FUSEDLM_X86
  if constexpr (kAvx2 && std::is_same_v<acc_t, float>) {
    sum_g_gxhat_avx2<kHasWeight>(dy, x, w, shift, rstd, g, N, sum_g, sum_gxhat);
    return;
  }
#endif
  // One vector accumulator per sum in this portable loop (the AVX2 path
  // keeps two), so blocks are kLanes / 8 = 4x shorter than kSumBlock to
  // keep the same <= 32 terms per partial.
  constexpr int64_t kBlock = kSumBlock * 8 / kLanes;
  sum_g = 0;
  sum_gxhat = 0;
  for (int64_t b = 0; b < N; b += kBlock) {
    const int64_t e = std::min(N, b + kBlock);
    acc_t s_g = 0;
    acc_t s_gx = 0;
#pragma omp simd reduction(+ : s_g, s_gx)
    for (int64_t i = b; i < e; ++i) {
      acc_t gi = dy[i];
      if constexpr (kHasWeight) {
        gi = dy[i] * w[i];
        g[i] = gi;
      }
      s_g += gi;
      s_gx += gi * ((x[i] - shift) * rstd);
    }
    sum_g += s_g;
    sum_gxhat += s_gx;
  }
}

// dx = rstd * (g - c_g - xhat * c_gxhat), the shared tail of both backward
// passes (RMSNorm has shift = 0, c_g = 0).
// g, x, dx: (N). dx may alias g.
template <typename acc_t>
C10_ALWAYS_INLINE void dx_row(const acc_t* g, const acc_t* x, acc_t shift, acc_t rstd,
                              acc_t c_g, acc_t c_gxhat, acc_t* dx, int64_t N) {
#pragma omp simd
  for (int64_t i = 0; i < N; ++i) {
    const acc_t xhat = (x[i] - shift) * rstd;
    dx[i] = rstd * ((g[i] - c_g) - xhat * c_gxhat);
  }
}

// Accumulates this row's dweight (dy * xhat) and dbias (dy) terms into the
// task's partial sums.
// dy, x: (N); dw_part, db_part: (N) or nullptr
template <typename acc_t>
C10_ALWAYS_INLINE void accumulate_param_grads(const acc_t* dy, const acc_t* x, acc_t shift,
                                              acc_t rstd, acc_t* dw_part, acc_t* db_part,
                                              int64_t N) {
  if (dw_part != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) dw_part[i] += dy[i] * ((x[i] - shift) * rstd);
  }
  if (db_part != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) db_part[i] += dy[i];
  }
}

// y = (x - shift) * rstd * w + b with w, b optional; shift = 0 for RMSNorm.
// x, y: (N); w, b: (N) or nullptr. y may alias x.
template <bool kHasWeight, bool kHasBias, typename acc_t>
C10_ALWAYS_INLINE void normalize_row_impl(const acc_t* x, const acc_t* w, const acc_t* b,
                                          acc_t shift, acc_t rstd, acc_t* y, int64_t N) {
#pragma omp simd
  for (int64_t i = 0; i < N; ++i) {
    acc_t v = (x[i] - shift) * rstd;
    if constexpr (kHasWeight) v = v * w[i];
    if constexpr (kHasBias) v = v + b[i];
    y[i] = v;
  }
}

// x, y: (N); w, b: (N) or nullptr
template <typename acc_t>
C10_ALWAYS_INLINE void normalize_row(const acc_t* x, const acc_t* w, const acc_t* b, acc_t shift,
                                     acc_t rstd, acc_t* y, int64_t N) {
  if (w != nullptr && b != nullptr) {
    normalize_row_impl<true, true>(x, w, b, shift, rstd, y, N);
  } else if (w != nullptr) {
    normalize_row_impl<true, false>(x, w, b, shift, rstd, y, N);
  } else if (b != nullptr) {
    normalize_row_impl<false, true>(x, w, b, shift, rstd, y, N);
  } else {
    normalize_row_impl<false, false>(x, w, b, shift, rstd, y, N);
  }
}

// Writes an acc_t row result to the output row; a no-op when the result was
// computed in place in the output.
// src: (N); dst: (N)
template <bool kAvx2, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void store_row(const acc_t* src, scalar_t* dst, int64_t N) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) convert_row<kAvx2>(src, dst, N);
}

// Where a row result is computed: straight into the output row when it is
// acc_t, else into the scratch buffer and converted by store_row.
// out_row: (N); buf: (N)
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE acc_t* result_row(scalar_t* out_row, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return out_row;
  } else {
    return buf;
  }
}

// h = branch + residual, computed in acc_t and rounded once to scalar_t (eager
// `branch + residual`), stored to h. Returns the rounded h as acc_t: the h row itself when
// scalar_t is acc_t, else buf (the statistics must see the values that were stored).
// branch: (N) scalar_t, or 16-bit beside a float residual; residual, h: (N);
// buf, buf2: (N) scratch (buf also when branch_t is not acc_t; buf2 when scalar_t is not)
template <bool kAvx2, typename scalar_t, typename branch_t, typename acc_t>
C10_ALWAYS_INLINE const acc_t* add_residual_row(const branch_t* branch, const scalar_t* residual,
                                                scalar_t* h, acc_t* buf, acc_t* buf2,
                                                int64_t N) {
  const acc_t* b = row_as_acc<kAvx2>(branch, buf, N);
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) h[i] = b[i] + residual[i];
    return h;
  } else {
    const acc_t* r = row_as_acc<kAvx2>(residual, buf2, N);
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) buf[i] = b[i] + r[i];
    convert_row<kAvx2>(buf, h, N);
    convert_row<kAvx2>(h, buf, N);
    return buf;
  }
}

// dx += grad_h, in acc_t before dx's one rounding.
// dx: (N) acc_t; grad_h: (N); buf: (N) scratch when scalar_t is not acc_t
template <bool kAvx2, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void add_grad_h_row(acc_t* dx, const scalar_t* grad_h, acc_t* buf, int64_t N) {
  const acc_t* g = row_as_acc<kAvx2>(grad_h, buf, N);
#pragma omp simd
  for (int64_t i = 0; i < N; ++i) dx[i] += g[i];
}

// ---------------------------------------------------------------------------
// Row kernels. Each is a struct with an Args bundle and a run<kAvx2>(args,
// rows) body; run_rows picks the ISA wrapper.

// Scratch of a forward row: buf holds the widened input row (then y), buf2 the widened
// residual row of a fused add.
template <typename scalar_t, typename branch_t, typename acc_t>
struct FwdScratch {
  std::vector<acc_t> buf, buf2;
  FwdScratch(bool add, int64_t N)
      : buf(!std::is_same_v<scalar_t, acc_t> || (add && !std::is_same_v<branch_t, acc_t>) ? N
                                                                                           : 0),
        buf2(add && !std::is_same_v<scalar_t, acc_t> ? N : 0) {}

  // Row r of the norm's input as acc_t: x itself, or h = branch + x (stored to h) when the
  // kernel adds a residual.
  // x, h: (M, N) scalar_t; branch: (M, N) or nullptr
  template <bool kAvx2>
  C10_ALWAYS_INLINE const acc_t* input_row(const scalar_t* x, const branch_t* branch,
                                           scalar_t* h, int64_t r, int64_t N) {
    if (branch == nullptr) return row_as_acc<kAvx2>(x + r * N, buf.data(), N);
    return add_residual_row<kAvx2>(branch + r * N, x + r * N, h + r * N, buf.data(),
                                   buf2.data(), N);
  }
};

// x is the norm's input, or with branch the residual that branch is added to (h = branch + x
// is normalized and stored).
template <typename scalar_t, typename acc_t, typename branch_t = scalar_t>
struct LayerNormFwd {
  struct Args {
    const scalar_t* x;       // (M, N)
    const branch_t* branch;  // (M, N) or nullptr
    const acc_t* weight;     // (N) or nullptr
    const acc_t* bias;       // (N) or nullptr
    scalar_t* y;             // (M, N)
    scalar_t* h;             // (M, N) when branch
    acc_t* mean;             // (M)
    acc_t* rstd;             // (M)
    int64_t N;
    acc_t eps;
  };

  template <bool kAvx2>
  static C10_ALWAYS_INLINE void run(const Args& a, int64_t row_begin, int64_t row_end) {
    const int64_t N = a.N;
    // (N) input row widened to acc_t, overwritten in place by the y row
    FwdScratch<scalar_t, branch_t, acc_t> scratch(a.branch != nullptr, N);
    std::vector<acc_t>& buf = scratch.buf;
    for (int64_t r = row_begin; r < row_end; ++r) {
      const acc_t* x = scratch.template input_row<kAvx2>(a.x, a.branch, a.h, r, N);
      // Two passes over the cached row: the mean first, then squared
      // deviations from it, so a large common offset does not cancel.
      const acc_t mean = static_cast<acc_t>(sum_row<kAvx2>(x, N) / N);
      const double var = sum_sq_row<kAvx2>(x, mean, N) / N;
      const acc_t rstd = static_cast<acc_t>(1.0 / std::sqrt(var + static_cast<double>(a.eps)));
      acc_t* y = result_row(a.y + r * N, buf.data());
      normalize_row(x, a.weight, a.bias, mean, rstd, y, N);
      store_row<kAvx2>(y, a.y + r * N, N);
      a.mean[r] = mean;
      a.rstd[r] = rstd;
    }
  }
};

template <typename scalar_t, typename acc_t, typename branch_t = scalar_t>
struct RmsNormFwd {
  struct Args {
    const scalar_t* x;       // (M, N)
    const branch_t* branch;  // (M, N) or nullptr
    const acc_t* weight;     // (N) or nullptr
    scalar_t* y;             // (M, N)
    scalar_t* h;             // (M, N) when branch
    acc_t* rstd;             // (M)
    int64_t N;
    acc_t eps;
  };

  template <bool kAvx2>
  static C10_ALWAYS_INLINE void run(const Args& a, int64_t row_begin, int64_t row_end) {
    const int64_t N = a.N;
    // (N) input row widened to acc_t, overwritten in place by the y row
    FwdScratch<scalar_t, branch_t, acc_t> scratch(a.branch != nullptr, N);
    std::vector<acc_t>& buf = scratch.buf;
    for (int64_t r = row_begin; r < row_end; ++r) {
      const acc_t* x = scratch.template input_row<kAvx2>(a.x, a.branch, a.h, r, N);
      const double ms = sum_sq_row<kAvx2>(x, acc_t(0), N) / N;
      const acc_t rstd = static_cast<acc_t>(1.0 / std::sqrt(ms + static_cast<double>(a.eps)));
      acc_t* y = result_row(a.y + r * N, buf.data());
      normalize_row(x, a.weight, static_cast<const acc_t*>(nullptr), acc_t(0), rstd, y, N);
      store_row<kAvx2>(y, a.y + r * N, N);
      a.rstd[r] = rstd;
    }
  }
};

// Backward of both norms; RMSNorm is LayerNorm with mean = 0 and without the
// mean(g) term, selected by kRms.
template <typename scalar_t, typename acc_t, bool kRms>
struct NormBwd {
  struct Args {
    const scalar_t* dy;    // (M, N)
    const scalar_t* x;     // (M, N)
    const acc_t* mean;     // (M) or nullptr for RMSNorm
    const acc_t* rstd;     // (M)
    const acc_t* weight;   // (N) or nullptr
    const scalar_t* grad_h;  // (M, N) or nullptr: added to dx (the fused residual add's h)
    scalar_t* dx;          // (M, N)
    int64_t N;
  };

  // dw_part, db_part: (N) this task's partial sums, or nullptr when not wanted
  template <bool kAvx2>
  static C10_ALWAYS_INLINE void run(const Args& a, int64_t row_begin, int64_t row_end,
                                    acc_t* dw_part, acc_t* db_part) {
    if (a.weight != nullptr) {
      rows<kAvx2, true>(a, row_begin, row_end, dw_part, db_part);
    } else {
      rows<kAvx2, false>(a, row_begin, row_end, dw_part, db_part);
    }
  }

  template <bool kAvx2, bool kHasWeight>
  static C10_ALWAYS_INLINE void rows(const Args& a, int64_t row_begin, int64_t row_end,
                                     acc_t* dw_part, acc_t* db_part) {
    constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
    const int64_t N = a.N;
    // (N) each: dy and x rows widened to acc_t; g = dy * w (when weighted)
    // and then dx are written over whichever of dy_buf / g_buf holds g
    std::vector<acc_t> dy_buf(kConvert ? N : 0);
    std::vector<acc_t> x_buf(kConvert ? N : 0);
    std::vector<acc_t> g_buf(kHasWeight ? N : 0);
    const double inv_n = 1.0 / static_cast<double>(N);
    for (int64_t r = row_begin; r < row_end; ++r) {
      const acc_t* dy = row_as_acc<kAvx2>(a.dy + r * N, dy_buf.data(), N);
      const acc_t* x = row_as_acc<kAvx2>(a.x + r * N, x_buf.data(), N);
      const acc_t shift = kRms ? acc_t(0) : a.mean[r];
      const acc_t rstd = a.rstd[r];
      double sum_g = 0;
      double sum_gxhat = 0;
      sum_g_gxhat_row<kAvx2, kHasWeight>(dy, x, a.weight, shift, rstd, g_buf.data(), N, sum_g,
                                         sum_gxhat);
      const acc_t* g = kHasWeight ? g_buf.data() : dy;
      const acc_t c_g = kRms ? acc_t(0) : static_cast<acc_t>(sum_g * inv_n);
      const acc_t c_gxhat = static_cast<acc_t>(sum_gxhat * inv_n);
      // Parameter grads read dy before dx_row may overwrite its buffer.
      accumulate_param_grads(dy, x, shift, rstd, dw_part, db_part, N);
      acc_t* dx = result_row(a.dx + r * N, kHasWeight ? g_buf.data() : dy_buf.data());
      dx_row(g, x, shift, rstd, c_g, c_gxhat, dx, N);
      // (x_buf is free now: x is not read again for this row)
      if (a.grad_h != nullptr) add_grad_h_row<kAvx2>(dx, a.grad_h + r * N, x_buf.data(), N);
      store_row<kAvx2>(dx, a.dx + r * N, N);
    }
  }
};

#if FUSEDLM_X86
template <typename Kernel, typename... Extra>
FUSEDLM_TARGET_AVX2 void run_rows_avx2(const typename Kernel::Args& a, int64_t row_begin,
                                     int64_t row_end, Extra... extra) {
  Kernel::template run<true>(a, row_begin, row_end, extra...);
}
#endif

template <typename Kernel, typename... Extra>
void run_rows_baseline(const typename Kernel::Args& a, int64_t row_begin, int64_t row_end,
                       Extra... extra) {
  Kernel::template run<false>(a, row_begin, row_end, extra...);
}

// Runs Kernel over rows [row_begin, row_end) with the best ISA this CPU has.
template <typename Kernel, typename... Extra>
void run_rows(const typename Kernel::Args& a, int64_t row_begin, int64_t row_end,
              Extra... extra) {
#if FUSEDLM_X86
  if (cpu_has_avx2()) {
    run_rows_avx2<Kernel>(a, row_begin, row_end, extra...);
    return;
  }
#endif
  run_rows_baseline<Kernel>(a, row_begin, row_end, extra...);
}

int64_t rows_per_task(int64_t N) { return std::max<int64_t>(1, kGrainElems / N); }

at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// weight (N) or None -> (N) contiguous acc dtype copy, or undefined.
at::Tensor weight_as_acc(const std::optional<at::Tensor>& w, at::ScalarType acc) {
  if (!w.has_value() || !w->defined()) return at::Tensor();
  return w->to(acc).contiguous();
}

template <typename acc_t>
const acc_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

// Runs the backward kernel over all rows and reduces the per-task dweight /
// dbias partials. Rows are cut into one contiguous block per thread, each
// block owning a row of the partial buffers, and the partials are summed in
// block order afterwards: deterministic for a given thread count, no atomics.
// dw_acc, db_acc: (N) acc dtype outputs, or undefined when not wanted
template <typename scalar_t, typename acc_t, bool kRms>
void norm_bwd_driver(const typename NormBwd<scalar_t, acc_t, kRms>::Args& args, int64_t M,
                     at::Tensor& dw_acc, at::Tensor& db_acc) {
  using Kernel = NormBwd<scalar_t, acc_t, kRms>;
  const int64_t N = args.N;
  const bool want_dw = dw_acc.defined();
  const bool want_db = db_acc.defined();
  if (!want_dw && !want_db) {
    at::parallel_for(0, M, rows_per_task(N), [&](int64_t begin, int64_t end) {
      run_rows<Kernel>(args, begin, end, static_cast<acc_t*>(nullptr),
                       static_cast<acc_t*>(nullptr));
    });
    return;
  }
  // Fewer blocks when there is too little work per thread to split.
  const int64_t max_blocks = std::max<int64_t>(1, (M * N) / kGrainElems);
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>({M, at::get_num_threads(), max_blocks}));
  const at::TensorOptions acc_opts = dw_acc.defined() ? dw_acc.options() : db_acc.options();
  // (blocks, N) each: per-block partial sums of dy * xhat and dy
  at::Tensor dw_part = want_dw ? at::empty({blocks, N}, acc_opts) : at::Tensor();
  at::Tensor db_part = want_db ? at::empty({blocks, N}, acc_opts) : at::Tensor();
  acc_t* dw_part_ptr = want_dw ? dw_part.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* db_part_ptr = want_db ? db_part.mutable_data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      acc_t* dw_row = want_dw ? dw_part_ptr + blk * N : nullptr;
      acc_t* db_row = want_db ? db_part_ptr + blk * N : nullptr;
      if (want_dw) std::fill(dw_row, dw_row + N, acc_t(0));
      if (want_db) std::fill(db_row, db_row + N, acc_t(0));
      run_rows<Kernel>(args, blk * M / blocks, (blk + 1) * M / blocks, dw_row, db_row);
    }
  });
  // Column sums of the partials, in fixed block order.
  auto reduce = [&](const acc_t* part, acc_t* out) {
    at::parallel_for(0, N, kGrainElems / std::max<int64_t>(1, blocks),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t j = begin; j < end; ++j) out[j] = part[j];
                       for (int64_t blk = 1; blk < blocks; ++blk) {
                         const acc_t* p = part + blk * N;
                         for (int64_t j = begin; j < end; ++j) out[j] += p[j];
                       }
                     });
  };
  if (want_dw) reduce(dw_part_ptr, dw_acc.mutable_data_ptr<acc_t>());
  if (want_db) reduce(db_part_ptr, db_acc.mutable_data_ptr<acc_t>());
}

// Runs fn.template operator()<branch_t>() with branch_t the C++ type of branch's dtype: scalar_t
// itself (also when there is no branch), or a 16-bit type beside a float residual.
template <typename scalar_t, typename Fn>
void dispatch_branch(const at::Tensor& branch, const Fn& fn) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (branch.defined() && branch.scalar_type() == at::kBFloat16) {
      return fn.template operator()<c10::BFloat16>();
    }
    if (branch.defined() && branch.scalar_type() == at::kHalf) {
      return fn.template operator()<c10::Half>();
    }
  }
  fn.template operator()<scalar_t>();
}

// The forward of both norms (mean undefined for RMSNorm). With branch, x is the residual: the
// kernel normalizes h = branch + x and returns it, else h is undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd(
    const at::Tensor& x,                        // (M, N)
    const at::Tensor& branch,                   // (M, N) or undefined
    const std::optional<at::Tensor>& weight,    // (N) or None
    const std::optional<at::Tensor>& bias,      // (N) or None
    double eps, bool rms) {
  const at::Tensor x_c = x.contiguous();  // (M, N)
  const at::Tensor branch_c = branch.defined() ? branch.contiguous() : at::Tensor();  // (M, N)
  const int64_t M = x_c.size(0);
  const int64_t N = x_c.size(1);
  const at::ScalarType acc = acc_dtype(x_c);
  at::Tensor y = at::empty({M, N}, x_c.options());                                  // (M, N)
  at::Tensor h = branch.defined() ? at::empty({M, N}, x_c.options()) : at::Tensor();  // (M, N)
  at::Tensor mean = rms ? at::Tensor() : at::empty({M}, x_c.options().dtype(acc));  // (M)
  at::Tensor rstd = at::empty({M}, x_c.options().dtype(acc));                      // (M)
  if (M == 0) return {y, h, mean, rstd};
  const at::Tensor w = weight_as_acc(weight, acc);  // (N) or undefined
  const at::Tensor b = weight_as_acc(bias, acc);    // (N) or undefined
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_c.scalar_type(), "norm_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_branch<scalar_t>(branch_c, [&]<typename branch_t>() {
      const branch_t* branch_ptr = branch_c.defined() ? branch_c.const_data_ptr<branch_t>()
                                                      : nullptr;
      scalar_t* h_ptr = h.defined() ? h.mutable_data_ptr<scalar_t>() : nullptr;
      if (rms) {
        using Kernel = RmsNormFwd<scalar_t, acc_t, branch_t>;
        const typename Kernel::Args args{x_c.const_data_ptr<scalar_t>(), branch_ptr,
                                         data_or_null<acc_t>(w),
                                         y.mutable_data_ptr<scalar_t>(), h_ptr,
                                         rstd.mutable_data_ptr<acc_t>(), N,
                                         static_cast<acc_t>(eps)};
        at::parallel_for(0, M, rows_per_task(N),
                         [&](int64_t begin, int64_t end) { run_rows<Kernel>(args, begin, end); });
      } else {
        using Kernel = LayerNormFwd<scalar_t, acc_t, branch_t>;
        const typename Kernel::Args args{x_c.const_data_ptr<scalar_t>(), branch_ptr,
                                         data_or_null<acc_t>(w),         data_or_null<acc_t>(b),
                                         y.mutable_data_ptr<scalar_t>(), h_ptr,
                                         mean.mutable_data_ptr<acc_t>(),
                                         rstd.mutable_data_ptr<acc_t>(), N,
                                         static_cast<acc_t>(eps)};
        at::parallel_for(0, M, rows_per_task(N),
                         [&](int64_t begin, int64_t end) { run_rows<Kernel>(args, begin, end); });
      }
    });
  });
  return {y, h, mean, rstd};
}

// The backward of both norms: dx (+ grad_h when given), dweight in weight's dtype or
// undefined, dbias (LayerNorm) in weight's dtype, or the accumulation dtype without a weight
// (the bias dtype is unknown here: x's or float32; the caller rounds it once).
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd(
    const at::Tensor& grad_y,                   // (M, N)
    const at::Tensor& x,                        // (M, N)
    const at::Tensor& mean,                     // (M), undefined for RMSNorm
    const at::Tensor& rstd,                     // (M)
    const std::optional<at::Tensor>& weight,    // (N) or None
    bool has_bias,
    const at::Tensor& grad_h) {                 // (M, N) or undefined
  const at::Tensor x_c = x.contiguous();        // (M, N)
  const at::Tensor dy_c = grad_y.contiguous();  // (M, N)
  const at::Tensor dh_c = grad_h.defined() ? grad_h.contiguous() : at::Tensor();  // (M, N)
  const int64_t M = x_c.size(0);
  const int64_t N = x_c.size(1);
  const bool rms = !mean.defined();
  const at::ScalarType acc = acc_dtype(x_c);
  const at::Tensor mean_c = rms ? at::Tensor() : mean.to(acc).contiguous();  // (M)
  const at::Tensor rstd_c = rstd.to(acc).contiguous();                       // (M)
  const at::Tensor w = weight_as_acc(weight, acc);                           // (N) or undefined
  at::Tensor dx = at::empty({M, N}, x_c.options());                          // (M, N)
  const at::TensorOptions acc_opts = x_c.options().dtype(acc);
  // (N) each: parameter grads in acc dtype, cast to the parameter dtype at the end
  at::Tensor dw_acc = w.defined() ? at::empty({N}, acc_opts) : at::Tensor();
  at::Tensor db_acc = has_bias ? at::empty({N}, acc_opts) : at::Tensor();
  if (M == 0) {
    if (dw_acc.defined()) dw_acc.zero_();
    if (db_acc.defined()) db_acc.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_c.scalar_type(), "norm_bwd",
                                    [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto run = [&]<bool kRms>() {
        const typename NormBwd<scalar_t, acc_t, kRms>::Args args{
            dy_c.const_data_ptr<scalar_t>(),  x_c.const_data_ptr<scalar_t>(),
            data_or_null<acc_t>(mean_c),      rstd_c.const_data_ptr<acc_t>(),
            data_or_null<acc_t>(w),           data_or_null<scalar_t>(dh_c),
            dx.mutable_data_ptr<scalar_t>(),  N};
        norm_bwd_driver<scalar_t, acc_t, kRms>(args, M, dw_acc, db_acc);
      };
      if (rms) {
        run.template operator()<true>();
      } else {
        run.template operator()<false>();
      }
    });
  }
  if (dw_acc.defined()) dw_acc = dw_acc.to(weight->scalar_type());
  if (db_acc.defined() && w.defined()) db_acc = db_acc.to(weight->scalar_type());
  return {dx, dw_acc, db_acc};
}

std::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x,                        // (M, N)
    const std::optional<at::Tensor>& weight,    // (N) or None
    const std::optional<at::Tensor>& bias,      // (N) or None
    double eps) {
  auto [y, h, mean, rstd] = norm_fwd(x, at::Tensor(), weight, bias, eps, false);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> layer_norm_bwd(
    const at::Tensor& grad_y,                   // (M, N)
    const at::Tensor& x,                        // (M, N)
    const at::Tensor& mean,                     // (M)
    const at::Tensor& rstd,                     // (M)
    const std::optional<at::Tensor>& weight,    // (N) or None
    bool has_bias) {
  auto [dx, dw, db] = norm_bwd(grad_y, x, mean, rstd, weight, has_bias, at::Tensor());
  return {dx, optional_of(dw), optional_of(db)};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(
    const at::Tensor& x,                        // (M, N)
    const std::optional<at::Tensor>& weight,    // (N) or None
    double eps) {
  auto [y, h, mean, rstd] = norm_fwd(x, at::Tensor(), weight, std::nullopt, eps, true);
  return {y, rstd};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> rms_norm_bwd(
    const at::Tensor& grad_y,                   // (M, N)
    const at::Tensor& x,                        // (M, N)
    const at::Tensor& rstd,                     // (M)
    const std::optional<at::Tensor>& weight) {  // (N) or None
  auto [dx, dw, db] = norm_bwd(grad_y, x, at::Tensor(), rstd, weight, false, at::Tensor());
  return {dx, optional_of(dw)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
    const at::Tensor& x,                        // (M, N)
    const at::Tensor& residual,                 // (M, N)
    const std::optional<at::Tensor>& weight,    // (N) or None
    const std::optional<at::Tensor>& bias,      // (N) or None
    double eps) {
  // (the kernel adds its "branch" to its input: here x to the residual)
  return norm_fwd(residual, x, weight, bias, eps, false);
}

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> add_layer_norm_bwd(
    const at::Tensor& grad_y,                   // (M, N)
    const std::optional<at::Tensor>& grad_h,    // (M, N) or None
    const at::Tensor& h,                        // (M, N)
    const at::Tensor& mean,                     // (M)
    const at::Tensor& rstd,                     // (M)
    const std::optional<at::Tensor>& weight,    // (N) or None
    bool has_bias) {
  auto [dh, dw, db] =
      norm_bwd(grad_y, h, mean, rstd, weight, has_bias, grad_h.value_or(at::Tensor()));
  return {dh, optional_of(dw), optional_of(db)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd(
    const at::Tensor& x,                        // (M, N)
    const at::Tensor& residual,                 // (M, N)
    const std::optional<at::Tensor>& weight,    // (N) or None
    double eps) {
  auto [y, h, mean, rstd] = norm_fwd(residual, x, weight, std::nullopt, eps, true);
  return {y, h, rstd};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> add_rms_norm_bwd(
    const at::Tensor& grad_y,                   // (M, N)
    const std::optional<at::Tensor>& grad_h,    // (M, N) or None
    const at::Tensor& h,                        // (M, N)
    const at::Tensor& rstd,                     // (M)
    const std::optional<at::Tensor>& weight) {  // (N) or None
  auto [dh, dw, db] =
      norm_bwd(grad_y, h, at::Tensor(), rstd, weight, false, grad_h.value_or(at::Tensor()));
  return {dh, optional_of(dw)};
}

}  // namespace fusedlm::cpu
