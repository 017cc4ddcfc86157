// LayerNorm and RMSNorm over the last dimension of a contiguous (M, N) tensor, forward and
// backward, on the GPU. Torch-free: launched through norm_fwd / norm_bwd (launchers.h).
//
// Kernels, by row length (nvec = N / kVec 16-byte vectors; kVec = 8 for 16-bit x, 4 for float):
//   * cached, warp per row (forward N <= 1024, backward N <= 512): each warp owns a row, each
//     lane holds its <= 32 (forward) or <= 16 (backward) elements of it in registers, reductions
//     are warp shuffles; 4 (forward) or 8 (backward) warps, i.e. rows, per block.
//   * cached, block per row (forward N <= 32768, backward N <= 8192): the block holds the row in
//     registers, the same number of elements per thread, on up to 1024 (forward) or 512
//     (backward) threads; reductions go through shared memory.
//   * generic, block per row: any N (up to 65536 and beyond), any alignment, float64; re-reads
//     the row from global memory (mostly L2 hits) for each pass instead of caching it, with
//     16-byte vectors when the row allows them.
// Loads and stores are 16-byte vectors of x's dtype; weights of another dtype (float32 weights
// with bfloat16 x) are read as vectors of the same element count. Statistics and every sum are
// float32 (float64 for float64 x); LayerNorm's variance is the mean of squared deviations from
// the already reduced mean (two passes over the cached row), never E[x^2] - E[x]^2.
//
// dweight / dbias: two-stage, deterministic, no atomics. The cached backward kernels run a
// persistent grid of G blocks; each thread keeps float32 sums for the columns it owns over all
// the rows its block visits, and each block writes one row of a (G, N) partial-sum workspace
// (warp-per-row blocks first add their warps' sums in shared memory, in warp order). Then
// norm_param_grad_final_kernel sums the G rows per column, in row order. The generic backward
// computes dx only and a column-tiled kernel writes the (P, N) partials instead.
#include "cuda/common.cuh"
#include "cuda/launchers.h"

#include <algorithm>
#include <climits>
#include <cstdint>

namespace fusedlm::cuda {
namespace {

constexpr int kFwdWarpsPerBlock = 4;   // warp-per-row forward: rows per block (128 threads)
constexpr int kBwdWarpsPerBlock = 8;   // warp-per-row backward: rows per block (256 threads)
constexpr int kFwdMaxThreads = 1024;   // block-per-row forward: <= 64 registers per thread
constexpr int kBwdMaxThreads = 512;    // block-per-row backward: <= 128 registers per thread
constexpr int kGenericThreads = 1024;
// Backward grids: each block should visit about this many rows, so the (G, N) partial sums stay
// ~1/16 of the (M, N) traffic, but G stays >= the number of SMs while rows last.
constexpr int64_t kRowsPerPartial = 16;
// Column-tiled kernels: 32 columns per block (one warp-wide row segment).
constexpr int kColTile = 32;
constexpr int kPartialRowsPerBlock = 8;   // norm_param_grad_partial_kernel: blockDim.y
constexpr int kFinalRowsPerBlock = 16;    // norm_param_grad_final_kernel: blockDim.y

template <typename T>
constexpr int kVecOf = 16 / static_cast<int>(sizeof(T));
// Vectors of the row each thread holds in registers, at most: 32 elements in the forward pass
// (x), 16 in the backward pass (x, grad_y and the float32 dweight/dbias sums of its columns).
// More spills at these thread counts (checked with ptxas -v for sm_80 and sm_90a).
template <typename T>
constexpr int kFwdMaxIters = 32 / kVecOf<T>;
template <typename T>
constexpr int kBwdMaxIters = 16 / kVecOf<T>;

// The rows a thread works on, and its place in the row's thread group: a warp (kWarpRows) or
// the whole block.
template <bool kWarpRows>
struct RowGroup {
  int tid;         // index of this thread in its row's group
  int size;        // threads per row
  int64_t first;   // first row of this group
  int64_t stride;  // rows between this group's consecutive rows

  __device__ __forceinline__ RowGroup() {
    if constexpr (kWarpRows) {
      const int warps = static_cast<int>(blockDim.x >> 5);
      tid = static_cast<int>(threadIdx.x & 31);
      size = 32;
      first = static_cast<int64_t>(blockIdx.x) * warps + (threadIdx.x >> 5);
      stride = static_cast<int64_t>(gridDim.x) * warps;
    } else {
      tid = static_cast<int>(threadIdx.x);
      size = static_cast<int>(blockDim.x);
      first = blockIdx.x;
      stride = gridDim.x;
    }
  }
};

// Sums over the row's thread group; scratch: (kN, 33) shared, used by block groups only.
template <bool kWarpRows, typename A, int kN>
__device__ __forceinline__ void row_allreduce(A (&v)[kN], A* scratch) {
  if constexpr (kWarpRows) {
    warp_allreduce(v);
  } else {
    block_allreduce(v, scratch);
  }
}

// ---- forward -------------------------------------------------------------------------------------

template <typename T, typename W, bool kRms, int kIters, bool kWarpRows>
__global__ void __launch_bounds__(kWarpRows ? 32 * kFwdWarpsPerBlock : kFwdMaxThreads)
norm_fwd_cached_kernel(
    const T* __restrict__ x,       // (M, N)
    const W* __restrict__ weight,  // (N) or nullptr
    const W* __restrict__ bias,    // (N) or nullptr
    T* __restrict__ y,             // (M, N)
    float* __restrict__ mean,      // (M), nullptr for RMSNorm
    float* __restrict__ rstd,      // (M)
    int64_t M, int N, float eps) {
  constexpr int kVec = kVecOf<T>;
  using XPack = Pack<T, kVec>;
  using WPack = Pack<W, kVec>;
  __shared__ float scratch[33];
  const RowGroup<kWarpRows> group;
  const int nvec = N / kVec;
  const WPack* w = reinterpret_cast<const WPack*>(weight);  // (nvec)
  const WPack* b = reinterpret_cast<const WPack*>(bias);    // (nvec)
  for (int64_t row = group.first; row < M; row += group.stride) {
    const XPack* xr = reinterpret_cast<const XPack*>(x + row * N);  // (nvec)
    XPack xv[kIters];  // this thread's vectors of the row
    float s[1] = {0.f};
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int j = it * group.size + group.tid;
      if (j < nvec) {
        xv[it] = xr[j];
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const float v = convert<float>(xv[it].v[k]);
          s[0] += kRms ? v * v : v;
        }
      }
    }
    row_allreduce<kWarpRows>(s, scratch);
    float mu = 0.f;
    float var = s[0] / static_cast<float>(N);  // RMSNorm: mean of squares
    if constexpr (!kRms) {
      mu = var;
      float q[1] = {0.f};
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int j = it * group.size + group.tid;
        if (j < nvec) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            const float d = convert<float>(xv[it].v[k]) - mu;
            q[0] += d * d;
          }
        }
      }
      row_allreduce<kWarpRows>(q, scratch);
      var = q[0] / static_cast<float>(N);
    }
    const float r = 1.f / sqrtf(var + eps);
    if (group.tid == 0) {
      if constexpr (!kRms) mean[row] = mu;
      rstd[row] = r;
    }
    XPack* yr = reinterpret_cast<XPack*>(y + row * N);  // (nvec)
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int j = it * group.size + group.tid;
      if (j < nvec) {
        WPack wv;
        WPack bv;
        if (w != nullptr) wv = w[j];
        if (b != nullptr) bv = b[j];
        XPack out;
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          float v = (convert<float>(xv[it].v[k]) - mu) * r;
          if (w != nullptr) v = v * convert<float>(wv.v[k]);
          if (b != nullptr) v = v + convert<float>(bv.v[k]);
          out.v[k] = convert<T>(v);
        }
        yr[j] = out;
      }
    }
  }
}

// Any N: the row is re-read for each pass. kVec elements per access (N % kVec == 0).
template <typename T, typename W, bool kRms, int kVec>
__global__ void __launch_bounds__(kGenericThreads) norm_fwd_generic_kernel(
    const T* __restrict__ x,          // (M, N)
    const W* __restrict__ weight,     // (N) or nullptr
    const W* __restrict__ bias,       // (N) or nullptr
    T* __restrict__ y,                // (M, N)
    acc_type<T>* __restrict__ mean,   // (M), nullptr for RMSNorm
    acc_type<T>* __restrict__ rstd,   // (M)
    int64_t M, int64_t N, acc_type<T> eps) {
  using A = acc_type<T>;
  using XPack = Pack<T, kVec>;
  using WPack = Pack<W, kVec>;
  __shared__ A scratch[33];
  const int64_t nvec = N / kVec;
  const WPack* w = reinterpret_cast<const WPack*>(weight);  // (nvec)
  const WPack* b = reinterpret_cast<const WPack*>(bias);    // (nvec)
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const XPack* xr = reinterpret_cast<const XPack*>(x + row * N);  // (nvec)
    A s[1] = {A(0)};
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      const XPack xv = xr[j];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const A v = convert<A>(xv.v[k]);
        s[0] += kRms ? v * v : v;
      }
    }
    block_allreduce(s, scratch);
    A mu = A(0);
    A var = s[0] / static_cast<A>(N);
    if constexpr (!kRms) {
      mu = var;
      A q[1] = {A(0)};
      for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
        const XPack xv = xr[j];
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const A d = convert<A>(xv.v[k]) - mu;
          q[0] += d * d;
        }
      }
      block_allreduce(q, scratch);
      var = q[0] / static_cast<A>(N);
    }
    const A r = A(1) / sqrt(var + eps);
    if (threadIdx.x == 0) {
      if constexpr (!kRms) mean[row] = mu;
      rstd[row] = r;
    }
    XPack* yr = reinterpret_cast<XPack*>(y + row * N);  // (nvec)
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      const XPack xv = xr[j];
      WPack wv;
      WPack bv;
      if (w != nullptr) wv = w[j];
      if (b != nullptr) bv = b[j];
      XPack out;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        A v = (convert<A>(xv.v[k]) - mu) * r;
        if (w != nullptr) v = v * convert<A>(wv.v[k]);
        if (b != nullptr) v = v + convert<A>(bv.v[k]);
        out.v[k] = convert<T>(v);
      }
      yr[j] = out;
    }
  }
}

// ---- backward ------------------------------------------------------------------------------------
//
// With g = grad_y * weight (grad_y without weight) and xhat = (x - mean) * rstd (mean = 0 for
// RMSNorm): dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), without the mean(g) term for
// RMSNorm; dweight = sum over rows of grad_y * xhat; dbias = sum over rows of grad_y.

template <typename T, typename W, bool kRms, int kIters, bool kWarpRows>
__global__ void __launch_bounds__(kWarpRows ? 32 * kBwdWarpsPerBlock : kBwdMaxThreads)
norm_bwd_cached_kernel(
    const T* __restrict__ grad_y,     // (M, N)
    const T* __restrict__ x,          // (M, N)
    const float* __restrict__ mean,   // (M), nullptr for RMSNorm
    const float* __restrict__ rstd,   // (M)
    const W* __restrict__ weight,     // (N) or nullptr
    T* __restrict__ dx,               // (M, N)
    float* __restrict__ dw_part,      // (gridDim.x, N) or nullptr: this block's dweight sums
    float* __restrict__ db_part,      // (gridDim.x, N) or nullptr: this block's dbias sums
    int64_t M, int N) {
  constexpr int kVec = kVecOf<T>;
  using XPack = Pack<T, kVec>;
  using WPack = Pack<W, kVec>;
  // Warp rows with partial sums: (warps per block, N) staging of each warp's sums.
  float* stage = reinterpret_cast<float*>(dynamic_shared_memory());
  __shared__ float scratch[2 * 33];
  const RowGroup<kWarpRows> group;
  const int nvec = N / kVec;
  const WPack* w = reinterpret_cast<const WPack*>(weight);  // (nvec)
  const bool want_dw = dw_part != nullptr;
  const bool want_db = db_part != nullptr;
  float dw_acc[kIters][kVec];  // this thread's columns: sums of grad_y * xhat
  float db_acc[kIters][kVec];  // and of grad_y
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      dw_acc[it][k] = 0.f;
      db_acc[it][k] = 0.f;
    }
  }
  for (int64_t row = group.first; row < M; row += group.stride) {
    const XPack* xr = reinterpret_cast<const XPack*>(x + row * N);        // (nvec)
    const XPack* dyr = reinterpret_cast<const XPack*>(grad_y + row * N);  // (nvec)
    XPack xv[kIters];
    XPack dyv[kIters];
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int j = it * group.size + group.tid;
      if (j < nvec) {
        xv[it] = xr[j];
        dyv[it] = dyr[j];
      }
    }
    const float mu = kRms ? 0.f : mean[row];
    const float r = rstd[row];
    float s[2] = {0.f, 0.f};  // sums of g and g * xhat
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int j = it * group.size + group.tid;
      if (j < nvec) {
        WPack wv;
        if (w != nullptr) wv = w[j];
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const float xhat = (convert<float>(xv[it].v[k]) - mu) * r;
          const float d = convert<float>(dyv[it].v[k]);
          const float g = w != nullptr ? d * convert<float>(wv.v[k]) : d;
          s[0] += g;
          s[1] += g * xhat;
          if (want_dw) dw_acc[it][k] += d * xhat;
          if (want_db) db_acc[it][k] += d;
        }
      }
    }
    row_allreduce<kWarpRows>(s, scratch);
    const float c_g = kRms ? 0.f : s[0] / static_cast<float>(N);
    const float c_gxhat = s[1] / static_cast<float>(N);
    XPack* dxr = reinterpret_cast<XPack*>(dx + row * N);  // (nvec)
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int j = it * group.size + group.tid;
      if (j < nvec) {
        WPack wv;
        if (w != nullptr) wv = w[j];
        XPack out;
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const float xhat = (convert<float>(xv[it].v[k]) - mu) * r;
          const float d = convert<float>(dyv[it].v[k]);
          const float g = w != nullptr ? d * convert<float>(wv.v[k]) : d;
          out.v[k] = convert<T>(r * ((g - c_g) - xhat * c_gxhat));
        }
        dxr[j] = out;
      }
    }
  }
  // This block's partial sums -> row blockIdx.x of the workspace.
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    float* part = which == 0 ? dw_part : db_part;  // (gridDim.x, N)
    if (part == nullptr) continue;
    float* out = part + static_cast<int64_t>(blockIdx.x) * N;  // (N)
    if constexpr (kWarpRows) {
      const int warp = static_cast<int>(threadIdx.x >> 5);
      const int warps = static_cast<int>(blockDim.x >> 5);
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int j = it * group.size + group.tid;
        if (j < nvec) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            stage[warp * N + j * kVec + k] = which == 0 ? dw_acc[it][k] : db_acc[it][k];
          }
        }
      }
      __syncthreads();
      for (int c = static_cast<int>(threadIdx.x); c < N; c += static_cast<int>(blockDim.x)) {
        float total = 0.f;
        for (int k = 0; k < warps; ++k) total += stage[k * N + c];
        out[c] = total;
      }
      __syncthreads();
    } else {
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int j = it * group.size + group.tid;
        if (j < nvec) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            out[j * kVec + k] = which == 0 ? dw_acc[it][k] : db_acc[it][k];
          }
        }
      }
    }
  }
}

// dx only, any N: the row is re-read for each pass. kVec elements per access (N % kVec == 0).
template <typename T, typename W, bool kRms, int kVec>
__global__ void __launch_bounds__(kGenericThreads) norm_bwd_generic_kernel(
    const T* __restrict__ grad_y,           // (M, N)
    const T* __restrict__ x,                // (M, N)
    const acc_type<T>* __restrict__ mean,   // (M), nullptr for RMSNorm
    const acc_type<T>* __restrict__ rstd,   // (M)
    const W* __restrict__ weight,           // (N) or nullptr
    T* __restrict__ dx,                     // (M, N)
    int64_t M, int64_t N) {
  using A = acc_type<T>;
  using XPack = Pack<T, kVec>;
  using WPack = Pack<W, kVec>;
  __shared__ A scratch[2 * 33];
  const int64_t nvec = N / kVec;
  const WPack* w = reinterpret_cast<const WPack*>(weight);  // (nvec)
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const XPack* xr = reinterpret_cast<const XPack*>(x + row * N);        // (nvec)
    const XPack* dyr = reinterpret_cast<const XPack*>(grad_y + row * N);  // (nvec)
    const A mu = kRms ? A(0) : mean[row];
    const A r = rstd[row];
    A s[2] = {A(0), A(0)};  // sums of g and g * xhat
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      const XPack xv = xr[j];
      const XPack dyv = dyr[j];
      WPack wv;
      if (w != nullptr) wv = w[j];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const A xhat = (convert<A>(xv.v[k]) - mu) * r;
        const A d = convert<A>(dyv.v[k]);
        const A g = w != nullptr ? d * convert<A>(wv.v[k]) : d;
        s[0] += g;
        s[1] += g * xhat;
      }
    }
    block_allreduce(s, scratch);
    const A c_g = kRms ? A(0) : s[0] / static_cast<A>(N);
    const A c_gxhat = s[1] / static_cast<A>(N);
    XPack* dxr = reinterpret_cast<XPack*>(dx + row * N);  // (nvec)
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      const XPack xv = xr[j];
      const XPack dyv = dyr[j];
      WPack wv;
      if (w != nullptr) wv = w[j];
      XPack out;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const A xhat = (convert<A>(xv.v[k]) - mu) * r;
        const A d = convert<A>(dyv.v[k]);
        const A g = w != nullptr ? d * convert<A>(wv.v[k]) : d;
        out.v[k] = convert<T>(r * ((g - c_g) - xhat * c_gxhat));
      }
      dxr[j] = out;
    }
  }
}

// First stage of dweight / dbias for the generic backward: block (x, y) sums columns
// [32 x, 32 x + 32) over rows [y * rows_per_part, (y + 1) * rows_per_part) into row y of the
// partials. Block: (kColTile, kPartialRowsPerBlock) threads.
template <typename T, bool kRms>
__global__ void __launch_bounds__(kColTile * kPartialRowsPerBlock) norm_param_grad_partial_kernel(
    const T* __restrict__ grad_y,           // (M, N)
    const T* __restrict__ x,                // (M, N)
    const acc_type<T>* __restrict__ mean,   // (M), nullptr for RMSNorm
    const acc_type<T>* __restrict__ rstd,   // (M)
    acc_type<T>* __restrict__ dw_part,      // (gridDim.y, N) or nullptr
    acc_type<T>* __restrict__ db_part,      // (gridDim.y, N) or nullptr
    int64_t M, int64_t N, int64_t rows_per_part) {
  using A = acc_type<T>;
  __shared__ A sums[2][kPartialRowsPerBlock][kColTile + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_part;
  const int64_t end = begin + rows_per_part < M ? begin + rows_per_part : M;
  A dw = A(0);
  A db = A(0);
  if (col < N) {
    for (int64_t row = begin + threadIdx.y; row < end; row += kPartialRowsPerBlock) {
      const A d = convert<A>(grad_y[row * N + col]);
      const A mu = kRms ? A(0) : mean[row];
      dw += d * ((convert<A>(x[row * N + col]) - mu) * rstd[row]);
      db += d;
    }
  }
  sums[0][threadIdx.y][threadIdx.x] = dw;
  sums[1][threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    A total_w = A(0);
    A total_b = A(0);
#pragma unroll
    for (int k = 0; k < kPartialRowsPerBlock; ++k) {
      total_w += sums[0][k][threadIdx.x];
      total_b += sums[1][k][threadIdx.x];
    }
    if (dw_part != nullptr) dw_part[static_cast<int64_t>(blockIdx.y) * N + col] = total_w;
    if (db_part != nullptr) db_part[static_cast<int64_t>(blockIdx.y) * N + col] = total_b;
  }
}

// Second stage: out[c] = sum over p of part[p, c], in p order per thread then over the block's
// rows in order. Block: (kColTile, kFinalRowsPerBlock) threads; grid: ceil(N / kColTile).
template <typename A, typename O>
__global__ void __launch_bounds__(kColTile * kFinalRowsPerBlock) norm_param_grad_final_kernel(
    const A* __restrict__ part,  // (P, N)
    O* __restrict__ out,         // (N)
    int64_t P, int64_t N) {
  __shared__ A sums[kFinalRowsPerBlock][kColTile + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  A total = A(0);
  if (col < N) {
    for (int64_t p = threadIdx.y; p < P; p += kFinalRowsPerBlock) total += part[p * N + col];
  }
  sums[threadIdx.y][threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    A result = A(0);
#pragma unroll
    for (int k = 0; k < kFinalRowsPerBlock; ++k) result += sums[k][threadIdx.x];
    out[col] = convert<O>(result);
  }
}

// ---- host side -----------------------------------------------------------------------------------

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<x type>, Tag<param type>) for the supported (x, param) dtype pairs.
template <typename F>
cudaError_t dispatch_norm_types(DType x_dtype, DType param_dtype, const F& f) {
  switch (x_dtype) {
    case DType::kFloat64:
      if (param_dtype == DType::kFloat64) return f(Tag<double>{}, Tag<double>{});
      break;
    case DType::kFloat32:
      if (param_dtype == DType::kFloat32) return f(Tag<float>{}, Tag<float>{});
      break;
    case DType::kFloat16:
      if (param_dtype == DType::kFloat16) return f(Tag<__half>{}, Tag<__half>{});
      if (param_dtype == DType::kFloat32) return f(Tag<__half>{}, Tag<float>{});
      break;
    case DType::kBFloat16:
      if (param_dtype == DType::kBFloat16) return f(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
      if (param_dtype == DType::kFloat32) return f(Tag<__nv_bfloat16>{}, Tag<float>{});
      break;
  }
  return cudaErrorInvalidValue;
}

int round_up_warp(int64_t threads) { return static_cast<int>(ceil_div(threads, 32) * 32); }

// Vectors per lane of a warp-per-row kernel for nvec vectors: the power of two >= nvec / 32.
int warp_iters(int nvec) {
  int iters = 1;
  while (iters * 32 < nvec) iters *= 2;
  return iters;
}

// Block-per-row geometry for nvec vectors: up to 256 threads with up to 4 vectors each if that
// holds the row, else up to max_threads threads with min(4, max_iters) or more vectors each.
// False if max_iters vectors on max_threads threads do not hold the row.
bool block_config(int nvec, int max_iters, int max_threads, int* iters, int* threads) {
  const int ilp = std::min(4, max_iters);
  for (int i = 1; i <= ilp; i *= 2) {
    if (nvec <= 256 * i) {
      *iters = i;
      *threads = round_up_warp(ceil_div(nvec, i));
      return true;
    }
  }
  for (int i = ilp; i <= max_iters; i *= 2) {
    if (nvec <= max_threads * i) {
      *iters = i;
      *threads = round_up_warp(ceil_div(nvec, i));
      return true;
    }
  }
  return false;
}

// Calls f(std::integral_constant<int, iters>) for iters a power of two in [kIters, kMax], so only
// the configurations a dtype can use are instantiated.
template <int kIters, int kMax, typename F>
cudaError_t dispatch_iters(int iters, const F& f) {
  if constexpr (kIters > kMax) {
    return cudaErrorInvalidValue;
  } else {
    if (iters == kIters) return f(std::integral_constant<int, kIters>{});
    return dispatch_iters<kIters * 2, kMax>(iters, f);
  }
}

// Threads of a generic (block per row) kernel for nvec accesses per row.
int generic_threads(int64_t nvec) {
  return round_up_warp(std::clamp<int64_t>(nvec, 32, kGenericThreads));
}

template <typename T, typename W>
bool can_vectorize(int64_t N, const void* row_a, const void* row_b, const void* row_c,
                   const void* param_a, const void* param_b) {
  constexpr int kVec = kVecOf<T>;
  if (N % kVec != 0 || N > INT_MAX) return false;
  for (const void* p : {row_a, row_b, row_c}) {
    if (p != nullptr && !is_aligned(p, 16)) return false;
  }
  for (const void* p : {param_a, param_b}) {
    if (p != nullptr && !is_aligned(p, sizeof(W) * kVec)) return false;
  }
  return true;
}

template <typename T, typename W, bool kRms>
cudaError_t norm_fwd_typed(const NormFwdArgs& a, cudaStream_t stream) {
  using A = acc_type<T>;
  const T* x = static_cast<const T*>(a.x);
  const W* weight = static_cast<const W*>(a.weight);
  const W* bias = static_cast<const W*>(a.bias);
  T* y = static_cast<T*>(a.y);
  A* mean = static_cast<A*>(a.mean);
  A* rstd = static_cast<A*>(a.rstd);
  const int64_t M = a.M;
  const int64_t N = a.N;
  if (M == 0) return cudaSuccess;
  if constexpr (!std::is_same_v<T, double>) {
    constexpr int kVec = kVecOf<T>;
    if (can_vectorize<T, W>(N, x, y, nullptr, weight, bias)) {
      const int n = static_cast<int>(N);
      const int nvec = n / kVec;
      const float eps = static_cast<float>(a.eps);
      constexpr int kMaxIters = kFwdMaxIters<T>;
      if (nvec <= 32 * kMaxIters) {
        const int64_t grid = std::min(ceil_div(M, kFwdWarpsPerBlock), kMaxGridBlocks);
        return dispatch_iters<1, kMaxIters>(warp_iters(nvec), [&](auto iters) {
          auto kernel = norm_fwd_cached_kernel<T, W, kRms, decltype(iters)::value, true>;
          FUSEDLM_LAUNCH(kernel, grid, 32 * kFwdWarpsPerBlock, 0, stream)(x, weight, bias, y, mean,
                                                                         rstd, M, n, eps);
          return cudaGetLastError();
        });
      }
      int iters = 0;
      int threads = 0;
      if (block_config(nvec, kMaxIters, kFwdMaxThreads, &iters, &threads)) {
        const int64_t grid = std::min(M, kMaxGridBlocks);
        return dispatch_iters<1, kMaxIters>(iters, [&](auto kiters) {
          auto kernel = norm_fwd_cached_kernel<T, W, kRms, decltype(kiters)::value, false>;
          FUSEDLM_LAUNCH(kernel, grid, threads, 0, stream)(x, weight, bias, y, mean, rstd, M, n,
                                                           eps);
          return cudaGetLastError();
        });
      }
    }
  }
  constexpr int kVec = kVecOf<T>;
  const A eps = static_cast<A>(a.eps);
  const int64_t grid = std::min(M, kMaxGridBlocks);
  if (N % kVec == 0 && is_aligned(x, 16) && is_aligned(y, 16) &&
      (weight == nullptr || is_aligned(weight, sizeof(W) * kVec)) &&
      (bias == nullptr || is_aligned(bias, sizeof(W) * kVec))) {
    auto kernel = norm_fwd_generic_kernel<T, W, kRms, kVec>;
    FUSEDLM_LAUNCH(kernel, grid, generic_threads(N / kVec), 0, stream)(x, weight, bias, y, mean,
                                                                       rstd, M, N, eps);
  } else {
    auto kernel = norm_fwd_generic_kernel<T, W, kRms, 1>;
    FUSEDLM_LAUNCH(kernel, grid, generic_threads(N), 0, stream)(x, weight, bias, y, mean, rstd, M,
                                                                N, eps);
  }
  return cudaGetLastError();
}

// Reduces the (P, N) partial sums into dweight / dbias (dbias in the acc dtype without weight).
template <typename A, typename W>
cudaError_t finish_param_grads(const NormBwdArgs& a, const A* dw_part, const A* db_part,
                               int64_t P, cudaStream_t stream) {
  const int64_t N = a.N;
  const dim3 block(kColTile, kFinalRowsPerBlock);
  const int64_t grid = ceil_div(N, kColTile);
  if (dw_part != nullptr) {
    auto kernel = norm_param_grad_final_kernel<A, W>;
    FUSEDLM_LAUNCH(kernel, grid, block, 0, stream)(dw_part, static_cast<W*>(a.dweight), P, N);
    FUSEDLM_RETURN_IF_LAUNCH_FAILED();
  }
  if (db_part != nullptr) {
    if (a.weight != nullptr) {
      auto kernel = norm_param_grad_final_kernel<A, W>;
      FUSEDLM_LAUNCH(kernel, grid, block, 0, stream)(db_part, static_cast<W*>(a.dbias), P, N);
    } else {
      auto kernel = norm_param_grad_final_kernel<A, A>;
      FUSEDLM_LAUNCH(kernel, grid, block, 0, stream)(db_part, static_cast<A*>(a.dbias), P, N);
    }
    FUSEDLM_RETURN_IF_LAUNCH_FAILED();
  }
  return cudaSuccess;
}

// Allocates the (P, N) partial sums of the wanted parameter grads.
template <typename A>
cudaError_t alloc_partials(const NormBwdArgs& a, int64_t P, A** dw_part, A** db_part) {
  const bool want_dw = a.dweight != nullptr;
  const bool want_db = a.dbias != nullptr;
  *dw_part = nullptr;
  *db_part = nullptr;
  if (!want_dw && !want_db) return cudaSuccess;
  const size_t one = static_cast<size_t>(P) * static_cast<size_t>(a.N) * sizeof(A);
  if (a.alloc == nullptr) return cudaErrorInvalidValue;
  A* base = static_cast<A*>(a.alloc(one * (want_dw + want_db), a.alloc_context));
  if (base == nullptr) return cudaErrorMemoryAllocation;
  *dw_part = want_dw ? base : nullptr;
  *db_part = want_db ? (want_dw ? base + P * a.N : base) : nullptr;
  return cudaSuccess;
}

template <typename T, typename W>
using CachedBwdKernel = void (*)(const T*, const T*, const float*, const float*, const W*, T*,
                                 float*, float*, int64_t, int);

// Runs a cached backward kernel; blocks_needed is the grid that gives every row group a row.
template <typename T, typename W>
cudaError_t run_cached_bwd(const NormBwdArgs& a, CachedBwdKernel<T, W> kernel, int threads,
                           int64_t blocks_needed, size_t stage_bytes, cudaStream_t stream) {
  const int64_t M = a.M;
  const int n = static_cast<int>(a.N);
  const bool want_params = a.dweight != nullptr || a.dbias != nullptr;
  int64_t grid = std::min(blocks_needed, kMaxGridBlocks);
  size_t smem = 0;
  if (want_params) {
    int sms = 0;
    FUSEDLM_RETURN_IF_ERROR(current_sm_count(&sms));
    int per_sm = 0;
    smem = stage_bytes;
    FUSEDLM_RETURN_IF_ERROR(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    const int64_t resident = static_cast<int64_t>(sms) * std::max(per_sm, 1);
    const int64_t target = std::max<int64_t>(sms, ceil_div(M, kRowsPerPartial));
    grid = std::min({blocks_needed, resident, target});
  }
  float* dw_part = nullptr;
  float* db_part = nullptr;
  FUSEDLM_RETURN_IF_ERROR(alloc_partials<float>(a, grid, &dw_part, &db_part));
  FUSEDLM_LAUNCH(kernel, grid, threads, smem, stream)(
      static_cast<const T*>(a.grad_y), static_cast<const T*>(a.x),
      static_cast<const float*>(a.mean), static_cast<const float*>(a.rstd),
      static_cast<const W*>(a.weight), static_cast<T*>(a.dx), dw_part, db_part, M, n);
  FUSEDLM_RETURN_IF_LAUNCH_FAILED();
  return finish_param_grads<float, W>(a, dw_part, db_part, grid, stream);
}

template <typename T, typename W, bool kRms>
cudaError_t norm_bwd_typed(const NormBwdArgs& a, cudaStream_t stream) {
  using A = acc_type<T>;
  const int64_t M = a.M;
  const int64_t N = a.N;
  if (M == 0) return cudaSuccess;  // the caller zero-fills dweight / dbias
  if constexpr (!std::is_same_v<T, double>) {
    constexpr int kVec = kVecOf<T>;
    if (can_vectorize<T, W>(N, a.grad_y, a.x, a.dx, a.weight, nullptr)) {
      const int nvec = static_cast<int>(N) / kVec;
      constexpr int kMaxIters = kBwdMaxIters<T>;
      if (nvec <= 32 * kMaxIters) {
        const size_t stage = sizeof(float) * kBwdWarpsPerBlock * static_cast<size_t>(N);
        const int64_t blocks = ceil_div(M, kBwdWarpsPerBlock);
        return dispatch_iters<1, kMaxIters>(warp_iters(nvec), [&](auto iters) {
          return run_cached_bwd<T, W>(
              a, norm_bwd_cached_kernel<T, W, kRms, decltype(iters)::value, true>,
              32 * kBwdWarpsPerBlock, blocks, stage, stream);
        });
      }
      int iters = 0;
      int threads = 0;
      if (block_config(nvec, kMaxIters, kBwdMaxThreads, &iters, &threads)) {
        return dispatch_iters<1, kMaxIters>(iters, [&](auto kiters) {
          return run_cached_bwd<T, W>(
              a, norm_bwd_cached_kernel<T, W, kRms, decltype(kiters)::value, false>, threads, M,
              0, stream);
        });
      }
    }
  }
  // Generic: dx by a block per row, then the parameter grads column-tiled.
  const T* grad_y = static_cast<const T*>(a.grad_y);
  const T* x = static_cast<const T*>(a.x);
  const A* mean = static_cast<const A*>(a.mean);
  const A* rstd = static_cast<const A*>(a.rstd);
  const W* weight = static_cast<const W*>(a.weight);
  T* dx = static_cast<T*>(a.dx);
  constexpr int kVec = kVecOf<T>;
  const int64_t grid = std::min(M, kMaxGridBlocks);
  if (N % kVec == 0 && is_aligned(grad_y, 16) && is_aligned(x, 16) && is_aligned(dx, 16) &&
      (weight == nullptr || is_aligned(weight, sizeof(W) * kVec))) {
    auto kernel = norm_bwd_generic_kernel<T, W, kRms, kVec>;
    FUSEDLM_LAUNCH(kernel, grid, generic_threads(N / kVec), 0, stream)(grad_y, x, mean, rstd,
                                                                       weight, dx, M, N);
  } else {
    auto kernel = norm_bwd_generic_kernel<T, W, kRms, 1>;
    FUSEDLM_LAUNCH(kernel, grid, generic_threads(N), 0, stream)(grad_y, x, mean, rstd, weight, dx,
                                                                M, N);
  }
  FUSEDLM_RETURN_IF_LAUNCH_FAILED();
  if (a.dweight == nullptr && a.dbias == nullptr) return cudaSuccess;
  int sms = 0;
  FUSEDLM_RETURN_IF_ERROR(current_sm_count(&sms));
  // About 8 blocks per SM, each over >= kPartialRowsPerBlock rows.
  const int64_t col_blocks = ceil_div(N, kColTile);
  int64_t parts = ceil_div(static_cast<int64_t>(sms) * 8, col_blocks);
  parts = std::clamp<int64_t>(parts, 1, std::min<int64_t>(65535, ceil_div(M, kPartialRowsPerBlock)));
  const int64_t rows_per_part = ceil_div(M, parts);
  parts = ceil_div(M, rows_per_part);
  A* dw_part = nullptr;
  A* db_part = nullptr;
  FUSEDLM_RETURN_IF_ERROR(alloc_partials<A>(a, parts, &dw_part, &db_part));
  auto partial_kernel = norm_param_grad_partial_kernel<T, kRms>;
  FUSEDLM_LAUNCH(partial_kernel,
                 dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(parts)),
                 dim3(kColTile, kPartialRowsPerBlock), 0, stream)(grad_y, x, mean, rstd, dw_part,
                                                                  db_part, M, N, rows_per_part);
  FUSEDLM_RETURN_IF_LAUNCH_FAILED();
  return finish_param_grads<A, W>(a, dw_part, db_part, parts, stream);
}

}  // namespace

cudaError_t norm_fwd(const NormFwdArgs& args, cudaStream_t stream) {
  if (args.N < 1 || args.M < 0 || (args.rms && args.bias != nullptr) ||
      (!args.rms && args.mean == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_norm_types(args.x_dtype, args.param_dtype, [&](auto t, auto w) {
    using T = typename decltype(t)::type;
    using W = typename decltype(w)::type;
    return args.rms ? norm_fwd_typed<T, W, true>(args, stream)
                    : norm_fwd_typed<T, W, false>(args, stream);
  });
}

cudaError_t norm_bwd(const NormBwdArgs& args, cudaStream_t stream) {
  if (args.N < 1 || args.M < 0 || (args.dweight != nullptr && args.weight == nullptr) ||
      (args.rms && args.dbias != nullptr) || (!args.rms && args.mean == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_norm_types(args.x_dtype, args.param_dtype, [&](auto t, auto w) {
    using T = typename decltype(t)::type;
    using W = typename decltype(w)::type;
    return args.rms ? norm_bwd_typed<T, W, true>(args, stream)
                    : norm_bwd_typed<T, W, false>(args, stream);
  });
}

}  // namespace fusedlm::cuda
