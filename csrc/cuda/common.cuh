// Helpers shared by the CUDA kernels. Torch-free: the kernels and their raw-pointer
// launchers compile without torch (the fusedlm_cuda_kernels CMake target, CI's compile check).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/launchers.h"

namespace fusedlm::cuda {

// Launchers return the error of their launch so the torch-facing caller can raise it
// with the op's name; kernels are always launched on the caller's (current) stream.
inline cudaError_t last_launch_error() { return cudaGetLastError(); }

// Returns from the enclosing launcher with the error of the launch just made, if any.
#define FUSEDLM_RETURN_IF_LAUNCH_FAILED()                      \
  do {                                                         \
    const cudaError_t fusedlm_launch_error_ = cudaGetLastError(); \
    if (fusedlm_launch_error_ != cudaSuccess) return fusedlm_launch_error_; \
  } while (0)

// kernel<<<grid, block, shared_bytes, stream>>>(args...) spelled as
// FUSEDLM_LAUNCH(kernel, grid, block, shared_bytes, stream)(args...), so that the CPU emulation of
// tests/cuda_emulation can run the same launchers (it defines this macro before including).
#ifndef FUSEDLM_LAUNCH
#define FUSEDLM_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  kernel<<<(grid), (block), (shared_bytes), (stream)>>>
#endif

#define FUSEDLM_RETURN_IF_ERROR(expr)                          \
  do {                                                         \
    const cudaError_t fusedlm_error_ = (expr);                 \
    if (fusedlm_error_ != cudaSuccess) return fusedlm_error_;  \
  } while (0)

template <typename T>
__device__ __forceinline__ T warp_reduce_sum(T value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

template <typename T>
__device__ __forceinline__ T warp_reduce_max(T value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    T other = __shfl_xor_sync(0xffffffffu, value, offset);
    value = other > value ? other : value;
  }
  return value;
}

// ---- element types -----------------------------------------------------------------------------

// Accumulation ("op math") type: float for float/half/bfloat16, double for double.
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Value conversion between float, double, __half and __nv_bfloat16, rounding to nearest even
// (torch's c10::Half / c10::BFloat16 conversions round the same way).
template <typename To, typename From>
__device__ __forceinline__ To convert(From v) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else if constexpr (std::is_same_v<From, __half>) {
    return static_cast<To>(__half2float(v));
  } else if constexpr (std::is_same_v<From, __nv_bfloat16>) {
    return static_cast<To>(__bfloat162float(v));
  } else if constexpr (std::is_same_v<To, __half>) {
    if constexpr (std::is_same_v<From, double>) {
      return __double2half(v);
    } else {
      return __float2half_rn(static_cast<float>(v));
    }
  } else if constexpr (std::is_same_v<To, __nv_bfloat16>) {
    if constexpr (std::is_same_v<From, double>) {
      return __double2bfloat16(v);
    } else {
      return __float2bfloat16_rn(static_cast<float>(v));
    }
  } else {
    return static_cast<To>(v);
  }
}

// kN elements of T moved as one aligned vector access (16 bytes for kN * sizeof(T) == 16).
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Pack {
  T v[kN];
};

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// ---- reductions ----------------------------------------------------------------------------------

// Sums kN values over the warp; every lane gets the sums. Fixed order: deterministic.
template <typename A, int kN>
__device__ __forceinline__ void warp_allreduce(A (&v)[kN]) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
    for (int i = 0; i < kN; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], offset);
  }
}

// Sums kN values over the block (blockDim.x a multiple of 32, at most 1024); every thread gets
// the sums. Fixed order: deterministic. Every thread of the block must call it.
// scratch: (kN, 33) shared memory, reusable by the next call without a barrier in between.
template <typename A, int kN>
__device__ __forceinline__ void block_allreduce(A (&v)[kN], A* scratch) {
  warp_allreduce(v);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kN; ++i) scratch[i * 33 + warp] = v[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < kN; ++i) v[i] = lane < warps ? scratch[i * 33 + lane] : A(0);
    warp_allreduce(v);
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < kN; ++i) scratch[i * 33 + 32] = v[i];
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kN; ++i) v[i] = scratch[i * 33 + 32];
}

// ---- shared memory ------------------------------------------------------------------------------

#ifdef FUSEDLM_WARP_EMULATION
unsigned char* emulated_dynamic_shared_memory();  // tests/cuda_emulation
#endif

// The kernel's dynamic shared memory (size given at launch), 16-byte aligned.
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
#ifdef FUSEDLM_WARP_EMULATION
  return emulated_dynamic_shared_memory();
#else
  extern __shared__ __align__(16) unsigned char shared_raw[];
  return shared_raw;
#endif
}

// ---- launch geometry -----------------------------------------------------------------------------

// Streaming multiprocessors of the current device.
inline cudaError_t current_sm_count(int* sms) {
  int device = 0;
  FUSEDLM_RETURN_IF_ERROR(cudaGetDevice(&device));
  return cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid sizes above this run as grid-stride loops (kernels loop over their rows).
constexpr int64_t kMaxGridBlocks = int64_t{1} << 20;

}  // namespace fusedlm::cuda
