// Helpers shared by the CUDA kernels. Torch-free: the kernels and their raw-pointer
// launchers compile without torch (the fusedlm_cuda_kernels CMake target, CI's compile check).
#pragma once

#include <cuda_runtime.h>

namespace fusedlm::cuda {

// Launchers return the error of their launch so the torch-facing caller can raise it
// with the op's name; kernels are always launched on the caller's (current) stream.
inline cudaError_t last_launch_error() { return cudaGetLastError(); }

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

}  // namespace fusedlm::cuda
